"""Exception and warning types of pytest-gradcheck.

Importing this module imports neither torch nor numpy.

- :class:`GradEquivError` (an ``AssertionError``): a check ran and the gradients
  disagree; ``.report`` holds the figures.
- :class:`InvalidArgument` (both a ``ValueError`` and a ``TypeError``): the check
  could not be run as asked (bad shapes, a non-scalar loss, B < 2, ...).
- :class:`UnsupportedModelError`: the model cannot have per-sample gradients as
  it stands (BatchNorm in train mode, randomness outside ``nn.Dropout``, ...).
- :class:`BroadcastError` / :class:`BroadcastWarning`: an implicit broadcast that
  expanded both operands of an op in a loss term.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = [
    "GradCheckError",
    "GradEquivError",
    "InvalidArgument",
    "UnsupportedModelError",
    "BroadcastError",
    "BroadcastWarning",
    "DDPTimeoutError",
    "DDPWorkerError",
]


class GradCheckError(Exception):
    """Base class of every exception raised by pytest-gradcheck."""


class GradEquivError(GradCheckError, AssertionError):
    """The batch gradient is not the declared accumulation of per-sample gradients.

    ``str(err)`` is the rendered report; ``err.report`` is the report object with
    every figure (per-parameter errors, the float64 re-check, the diagnosis).
    """

    def __init__(self, report: Any, message: str | None = None) -> None:
        self.report = report
        super().__init__(message if message is not None else str(report))


class InvalidArgument(GradCheckError, ValueError, TypeError):
    """A check was called with arguments it cannot run on.

    It is both a ``ValueError`` and a ``TypeError`` so that either ``except``
    clause a caller already has catches it.
    """


class UnsupportedModelError(InvalidArgument):
    """The model, as it stands, cannot have per-sample gradients.

    Raised before any gradient is computed, e.g. for BatchNorm in train mode,
    whose output for one sample depends on the other samples of the batch.
    """


class BroadcastError(GradCheckError, AssertionError):
    """An op broadcast *both* of its operands (``(4, 1) - (4,) -> (4, 4)``).

    Raised by :func:`pytest_gradcheck.no_implicit_broadcast` in ``"error"``
    mode and by the gradient checks with ``broadcast="error"``. ``.records``
    holds the :class:`pytest_gradcheck.broadcast.BroadcastRecord` objects.
    """

    def __init__(self, message: str, records: Any = ()) -> None:
        self.records = list(records)
        super().__init__(message)


class BroadcastWarning(UserWarning):
    """Warning category for implicit broadcasts seen in ``"warn"`` mode."""


class DDPTimeoutError(GradCheckError, TimeoutError):
    """:func:`assert_ddp_equiv` ran out of time; the child processes were stopped.

    ``.ranks_done`` and ``.ranks_pending`` list the ranks that had finished
    their step and those that had not.
    """

    def __init__(self, message: str, ranks_done: Sequence[int] = (), ranks_pending: Sequence[int] = ()) -> None:
        self.ranks_done = list(ranks_done)
        self.ranks_pending = list(ranks_pending)
        super().__init__(message)


class DDPWorkerError(GradCheckError, RuntimeError):
    """A rank failed (an exception in the model or the loss, or the process died).

    ``.rank`` is the rank; ``.remote_traceback`` the child's traceback, as text.
    """

    def __init__(self, message: str, rank: int, remote_traceback: str = "") -> None:
        self.rank = rank
        self.remote_traceback = remote_traceback
        super().__init__(message)


class BatchLeakError(GradEquivError):
    """A sample's output depends on other samples of the batch.

    A :class:`~pytest_gradcheck.errors.GradEquivError` (so an ``AssertionError``):
    ``err.report`` is the :class:`~pytest_gradcheck.report.independence.BatchIndependenceReport`.
    """


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."
