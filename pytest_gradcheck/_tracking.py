"""Which checks ran during the current test (torch-free).

The engines call :func:`record` after every check, pass or fail; the pytest
plugin opens a :func:`collecting` scope around each test so that a test marked
``gradequiv`` that ran no check can be failed, and counts can be summarised.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Iterator

_local = threading.local()


def _stack() -> list[list[Any]]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def record(report: Any) -> None:
    """Note that a check ran (``report`` is its GradEquivReport)."""
    for scope in _stack():
        scope.append(report)


@contextlib.contextmanager
def collecting() -> Iterator[list[Any]]:
    """Collect the reports of the checks run inside the ``with`` block."""
    scope: list[Any] = []
    stack = _stack()
    stack.append(scope)
    try:
        yield scope
    finally:
        # by identity: two scopes holding equal (e.g. empty) lists compare equal
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is scope:
                del stack[i]
                break
