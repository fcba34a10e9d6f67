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
import time
from typing import Iterator, Protocol


class CheckRecord(Protocol):
    """What the plugin reads from a check's report: whether it passed (the rest through ``getattr``)."""

    @property
    def passed(self) -> bool: ...


_lock = threading.Lock()
_scopes: list[Scope] = []  # the open scopes, innermost last


class Scope(list[CheckRecord]):
    """The reports of the checks run in a scope, in order, and the seconds each took (``seconds[i]``).

    A check's time runs from the end of the previous check of the scope (or the
    opening of the scope) to its :func:`record`: the check itself, plus whatever
    the test did since the previous one (building the model and the batch).
    """

    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self.kinds: list[str | None] = []  # the kind of check, where the caller named it (else its report says)
        self.one_check = False  # see as_one_check
        self._mark = time.perf_counter()

    def add(self, report: CheckRecord, kind: str | None = None) -> None:
        now = time.perf_counter()
        self.append(report)
        self.kinds.append(kind)
        self.seconds.append(now - self._mark)
        self._mark = now


def record(report: CheckRecord, kind: str | None = None) -> None:
    """Note that a check ran (``report`` is its report: a GradEquivReport or another check's), from any thread."""
    with _lock:
        for scope in reversed(_scopes):  # innermost first: a one-check scope keeps its checks to itself
            scope.add(report, kind)
            if scope.one_check:
                break


@contextlib.contextmanager
def as_one_check(kind: str) -> Iterator[None]:
    """The checks run inside the block count as one check of ``kind``: the last one's report, recorded when it ends.

    For a check made of many (a fuzz run: each example is a check, a failure is
    shrunk through many more); the time of the one is the whole block's.
    """
    with collecting() as inner:
        inner.one_check = True
        try:
            yield
        finally:
            with _lock:  # close the inner scope first, so the last report reaches only the outer ones
                _remove(inner)
            if inner:
                record(inner[-1], kind)


@contextlib.contextmanager
def collecting() -> Iterator[Scope]:
    """Collect the reports of the checks run, in any thread, while the ``with`` block is open."""
    scope = Scope()
    with _lock:
        _scopes.append(scope)
    try:
        yield scope
    finally:
        with _lock:
            _remove(scope)


def _remove(scope: Scope) -> None:
    """Close ``scope`` (under the lock; a closed one: nothing to do)."""
    # by identity: two scopes holding equal (e.g. empty) lists compare equal
    for i in range(len(_scopes) - 1, -1, -1):
        if _scopes[i] is scope:
            del _scopes[i]
            break


#: the report kind of each public check, by its option-table name (see ``_options.CHECKS``)
_KINDS = {
    "gradequiv": "per-sample",
    "step": "step",
    "numpy": "numpy",
    "accumulation": "accumulation",
    "independent": "independence",
    "per_sample_gradients": "grad-sample",
}


class CheckError:
    """What :func:`record` keeps of a check that could not run (it raised ``InvalidArgument``).

    ``cause`` is a stable key: ``randomness`` (a random step), ``unsupported-model`` (a model
    that has no per-sample gradients, e.g. BatchNorm in train mode) or ``invalid-argument``.
    """

    passed = False
    error = True

    def __init__(self, check: str, exc: BaseException) -> None:
        self.check = check
        self.message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if type(exc).__name__ == "UnsupportedModelError":
            random = self.message.startswith("the training step is random")
            self.cause = "randomness" if random else "unsupported-model"
        else:
            self.cause = "invalid-argument"

    def __str__(self) -> str:
        return self.message


def record_error(check: str, exc: BaseException) -> None:
    """Record that a check raised ``exc`` instead of a verdict, once (nested checks re-raise it)."""
    if getattr(exc, "_gradequiv_recorded", False):
        return
    try:
        exc._gradequiv_recorded = True  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - an exception type with __slots__
        pass
    record(CheckError(_KINDS.get(check, check), exc))
