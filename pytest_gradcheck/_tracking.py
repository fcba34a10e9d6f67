"""Which checks ran during the current test (torch-free).

The engines call :func:`record` after every check, pass or fail; the pytest
plugin opens a :func:`collecting` scope around each test so that a test marked
``gradequiv`` that ran no check can be failed, and counts can be summarised.

The open scopes are process-wide (guarded by a lock), not per thread: a test
may run its check in a ``threading.Thread`` or a ``ThreadPoolExecutor`` worker,
and the check counts for the test that is running. pytest runs one test at a
time per process (pytest-xdist runs each worker in its own process), so a
process-wide slot cannot mix two tests.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, Protocol


class CheckRecord(Protocol):
    """What the plugin reads from a check's report: whether it passed (the rest through ``getattr``)."""

    @property
    def passed(self) -> bool: ...


_lock = threading.Lock()
_scopes: list[list[CheckRecord]] = []  # the open scopes, innermost last


def record(report: CheckRecord) -> None:
    """Note that a check ran (``report`` is its report: a GradEquivReport or another check's), from any thread."""
    with _lock:
        for scope in _scopes:
            scope.append(report)


@contextlib.contextmanager
def collecting() -> Iterator[list[CheckRecord]]:
    """Collect the reports of the checks run, in any thread, while the ``with`` block is open."""
    scope: list[CheckRecord] = []
    with _lock:
        _scopes.append(scope)
    try:
        yield scope
    finally:
        with _lock:
            # by identity: two scopes holding equal (e.g. empty) lists compare equal
            for i in range(len(_scopes) - 1, -1, -1):
                if _scopes[i] is scope:
                    del _scopes[i]
                    break
