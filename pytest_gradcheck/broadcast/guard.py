"""The guards: per-thread state, the context managers, and what a flagged op does to them.

- :class:`no_implicit_broadcast`: context manager and decorator, with a
  ``mode`` of ``"error"`` (default), ``"warn"``, ``"record"`` or ``"off"``.
- :func:`allow_broadcast`: opt-out for intentional pairwise terms.
- :func:`recording`: what the gradient checks use around the loss call.
- :func:`report_broadcast`: how another backend (NumPy) hands a broadcast over.
- :func:`emit_after_check`: the ``broadcast=`` policy applied after a check.

Nesting and threads:

- Every active guard of the thread records each flagged op. Guards act
  innermost first, each per its own mode: a ``"warn"`` guard warns and lets the
  op run, a ``"record"`` guard only records, an ``"error"`` guard raises
  :class:`~pytest_gradcheck.errors.BroadcastError` before the op runs (so the
  guards around it do not see the op run, but they still get the record when
  their own rule flags it).
- :func:`allow_broadcast` silences the guards entered *before* it; a guard
  entered inside an ``allow_broadcast()`` block is active again.
- Guards are per thread (PyTorch's function-mode stack is thread-local): a
  guard entered in one thread never sees ops run by another thread.

The torch side (which ops are watched, the ``TorchFunctionMode``) is in
:mod:`.torch_mode`, imported when a guard that watches torch ops is entered:
importing this module imports neither torch nor numpy.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
import threading
import warnings
from types import FrameType, TracebackType
from typing import Iterator, Protocol, Sequence

from ..errors import BroadcastError, BroadcastWarning, InvalidArgument
from .frames import op_site, record_at
from .rule import MODES, BroadcastRecord, Shape, check_batch_size, is_implicit_broadcast, pairs_samples

__all__ = [
    "Guard",
    "allow_broadcast",
    "deliver",
    "emit_after_check",
    "guards",
    "no_implicit_broadcast",
    "recording",
    "report_broadcast",
]

_tls = threading.local()
_seq = itertools.count(1)
_allow_blocks = 0  # allow_broadcast() blocks open, all threads together (a fast-path hint)
_allow_lock = threading.Lock()


class Guard:
    """One entered guard: its mode, its records, its batch size (or None) and its entry order."""

    __slots__ = ("batch_size", "mode", "records", "seq")

    def __init__(self, mode: str, records: list[BroadcastRecord], batch_size: int | None = None) -> None:
        self.mode = mode
        self.records = records
        self.batch_size = batch_size
        self.seq = next(_seq)

    def active(self) -> bool:
        """False inside an :func:`allow_broadcast` block entered after this guard."""
        if not _allow_blocks:  # no allow_broadcast() block open in any thread
            return True
        allow: int = getattr(_tls, "allow", 0)
        return allow < self.seq


def guards() -> list[Guard]:
    """This thread's entered guards, outermost first."""
    stack: list[Guard] | None = getattr(_tls, "guards", None)
    if stack is None:
        stack = _tls.guards = []
    return stack


def _remove_guard(guard: Guard) -> None:
    stack = guards()
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is guard:
            del stack[i]
            return


@contextlib.contextmanager
def allow_broadcast() -> Iterator[None]:
    """Let ops inside the block broadcast freely (contrastive, ranking losses).

    Silences every guard entered before it in this thread; nothing inside is
    flagged or recorded by them.

    >>> import torch
    >>> a, b = torch.ones(3, 1), torch.ones(1, 3)
    >>> with no_implicit_broadcast("error"):
    ...     with allow_broadcast():
    ...         pairwise = a - b          # intended (3, 3)
    """
    global _allow_blocks
    prev = getattr(_tls, "allow", 0)
    _tls.allow = next(_seq)
    with _allow_lock:
        _allow_blocks += 1
    try:
        yield
    finally:
        _tls.allow = prev
        with _allow_lock:
            _allow_blocks -= 1


def _warn(record: BroadcastRecord, frame: FrameType | None) -> None:
    if frame is None:
        warnings.warn(record.message(), BroadcastWarning, stacklevel=3)
        return
    module_globals = frame.f_globals
    registry = module_globals.setdefault("__warningregistry__", {})
    warnings.warn_explicit(
        record.message(),
        BroadcastWarning,
        record.filename,
        record.lineno,
        module=module_globals.get("__name__", "<string>"),
        registry=registry,
        module_globals=module_globals,
    )


def deliver(guard: Guard, record: BroadcastRecord, shapes: Sequence[Shape], frame: FrameType | None) -> None:
    """Hand a torch op flagged by ``guard`` to it: record, then raise or warn per its mode.

    An ``"error"`` guard stops the op, so the guards entered before it would
    never see it: they get the record first, when their own rule flags it.
    """
    __tracebackhide__ = True
    guard.records.append(record)
    if guard.mode == "error":
        for other in guards():
            if (
                other.seq < guard.seq
                and other.active()
                and other.records is not guard.records
                and pairs_samples(shapes, record.result, batch_size=other.batch_size)
            ):
                other.records.append(record)
        raise BroadcastError(record.message(), [record])
    if guard.mode == "warn":
        _warn(record, frame)


def report_broadcast(op: str, shapes: Sequence[Sequence[int]], result: Sequence[int]) -> BroadcastRecord | None:
    """Hand a broadcast found by another backend (NumPy) to this thread's guards.

    Returns ``None`` when the op is not an implicit broadcast, no active
    guard wants it, or an installed library's code ran it (see
    :mod:`pytest_gradcheck.broadcast.frames`). Otherwise every active guard records it, ``"warn"`` guards
    warn, and if any active guard is in ``"error"`` mode a
    :class:`~pytest_gradcheck.errors.BroadcastError` is raised. The caller has
    decided that the op pairs samples (the NumPy backend tracks batch axes).

    >>> report_broadcast("subtract", [(4, 1), (4,)], (4, 4)) is None   # no guard
    True
    """
    __tracebackhide__ = True
    if not is_implicit_broadcast(shapes, result):
        return None
    active = [g for g in reversed(guards()) if g.active() and g.mode != "off"]
    if not active:
        return None
    frame, library = op_site(sys._getframe(1))
    if library:
        return None
    try:
        record = record_at(op, shapes, result, frame)
        for g in active:
            g.records.append(record)
        if any(g.mode == "error" for g in active):
            raise BroadcastError(record.message(), [record])
        for g in active:
            if g.mode == "warn":
                _warn(record, frame)
    finally:
        del frame
    return record


class no_implicit_broadcast(contextlib.ContextDecorator):
    """Flag ops that broadcast both of their operands, like ``(4, 1) - (4,) -> (4, 4)``.

    ``mode``: ``"error"`` (default) raises
    :class:`~pytest_gradcheck.errors.BroadcastError` at the offending op;
    ``"warn"`` emits a :class:`~pytest_gradcheck.errors.BroadcastWarning`
    pointing at the user's line; ``"record"`` only records; ``"off"`` installs
    nothing. ``with`` yields :attr:`records`, filled in every mode.

    ``batch_size``: the batch size of the tensors in the block, if known; then
    only broadcasts that pair samples are flagged (a ``(1, T) < (B, 1)`` length
    mask is not). Without it the ambiguous cases are flagged; see
    :func:`~pytest_gradcheck.broadcast.pairs_samples`. Broadcasts run by installed
    libraries' own code (transformers' masks, rotary embeddings) are never flagged.

    Watched: elementwise/binary ops (``add``, ``sub``, ``mul``, ``div``,
    ``pow``, comparisons, logical/bitwise ops, ``where``, ``lerp``,
    ``addcmul``, ... in function, method, operator and in-place forms) and the
    elementwise losses of ``torch.nn.functional`` (``mse_loss``, ``l1_loss``,
    ``binary_cross_entropy``, ``kl_div``, ...). Class-index losses
    (``cross_entropy``, ``nll_loss``) are never flagged. Under
    ``torch.func.vmap`` the shapes seen and reported are per-sample shapes (a
    ``batch_size`` then refers to those shapes).

    >>> import torch
    >>> out, labels = torch.zeros(4, 1), torch.zeros(4)
    >>> with no_implicit_broadcast("record") as records:
    ...     loss = (out - labels).pow(2).mean()
    >>> records[0].describe()
    'sub((4, 1), (4,)) -> (4, 4): both operands were expanded'

    As a decorator, each call gets its own guard; all calls share ``records``.
    """

    def __init__(self, mode: str = "error", *, batch_size: int | None = None) -> None:
        if not isinstance(mode, str) or mode not in MODES:
            raise InvalidArgument(
                f"no_implicit_broadcast(mode={mode!r}): mode must be one of " + ", ".join(repr(m) for m in MODES)
            )
        self.mode = mode
        self.batch_size = check_batch_size(batch_size, "no_implicit_broadcast")
        self.records: list[BroadcastRecord] = []
        self._entered: list[tuple[Guard, contextlib.ExitStack] | None] = []

    def _recreate_cm(self) -> no_implicit_broadcast:
        fresh = type(self).__new__(type(self))
        fresh.mode = self.mode
        fresh.batch_size = self.batch_size
        fresh.records = self.records
        fresh._entered = []
        return fresh

    def __enter__(self) -> list[BroadcastRecord]:
        if self.mode == "off" or any(g.records is self.records and g.active() for g in guards()):
            # "off", or this guard re-entered (a recursive decorated call): the
            # enclosing entry already watches this thread.
            self._entered.append(None)
            return self.records
        from .torch_mode import GuardMode  # imports torch

        guard = Guard(self.mode, self.records, self.batch_size)
        torch_mode = GuardMode(guard)
        guards().append(guard)
        entered = contextlib.ExitStack()
        try:
            entered.enter_context(torch_mode)
        except BaseException:
            _remove_guard(guard)
            raise
        self._entered.append((guard, entered))
        return self.records

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._entered:
            raise InvalidArgument("no_implicit_broadcast.__exit__ called without a matching __enter__")
        entered = self._entered.pop()
        if entered is None:
            return
        guard, mode_stack = entered
        try:
            mode_stack.__exit__(exc_type, exc, tb)
        finally:
            _remove_guard(guard)

    def __repr__(self) -> str:
        if self.batch_size is None:
            return f"no_implicit_broadcast(mode={self.mode!r})"
        return f"no_implicit_broadcast(mode={self.mode!r}, batch_size={self.batch_size})"


@contextlib.contextmanager
def recording(
    enabled: bool = True, *, torch_ops: bool = True, batch_size: int | None = None
) -> Iterator[list[BroadcastRecord]]:
    """Record implicit broadcasts in the block; never raise, never warn.

    Used by the gradient checks around the loss call (or the whole step),
    with the ``batch_size`` of the batch run so that only broadcasts that pair
    samples are recorded (see :func:`~pytest_gradcheck.broadcast.pairs_samples`).
    Honours :func:`allow_broadcast`. With ``enabled=False`` it installs nothing and
    yields an empty list. With ``torch_ops=False`` it watches no torch op (and
    imports no torch): it only joins this thread's guard stack, so broadcasts
    handed over with :func:`report_broadcast` (the NumPy backend's) are recorded.

    >>> import torch
    >>> with recording() as records:
    ...     _ = torch.ones(2, 1) * torch.ones(1, 2)
    >>> [r.op for r in records]
    ['mul']
    """
    batch_size = check_batch_size(batch_size, "recording")
    if not enabled:
        yield []
        return
    if not torch_ops:
        records: list[BroadcastRecord] = []
        guard = Guard("record", records, batch_size)
        guards().append(guard)
        try:
            yield records
        finally:
            _remove_guard(guard)
        return
    with no_implicit_broadcast("record", batch_size=batch_size) as records:
        yield records


class CheckedReport(Protocol):
    """What :func:`emit_after_check` reads from a check's report: its records (and ``str()``)."""

    @property
    def broadcasts(self) -> Sequence[BroadcastRecord]: ...


def _error_text(report: CheckedReport, records: Sequence[BroadcastRecord], where: str) -> str:
    lines = [
        f"implicit broadcast in {where} (broadcast='error'): "
        f"{len(records)} op{'s' if len(records) != 1 else ''} expanded both operands."
    ]
    lines += ["  " + r.message() for r in records]
    if any(getattr(r, "loss_inputs", True) for r in records):
        lines.append(
            "Give predictions and targets the same shape, or wrap an intended pairwise term in "
            "pytest_gradcheck.allow_broadcast()."
        )
    else:
        lines.append("Wrap an intended pairwise term in pytest_gradcheck.allow_broadcast().")
    lines.append("")
    lines.append(str(report))
    return "\n".join(lines)


def emit_after_check(report: CheckedReport, mode: str, where: str = "the loss") -> None:
    """Apply the ``broadcast=`` policy to the broadcasts a gradient check recorded.

    Shared by every backend, after a check whose gradients agree (when they
    disagree the broadcast is the report's stated cause instead): ``"error"``
    raises :class:`~pytest_gradcheck.errors.BroadcastError` with the report,
    ``"warn"`` emits a :class:`~pytest_gradcheck.errors.BroadcastWarning` at each
    user line, ``"off"`` does nothing. ``where`` names the code that was watched.
    """
    __tracebackhide__ = True
    records: list[BroadcastRecord] = list(getattr(report, "broadcasts", ()))
    if not records:
        return
    if mode == "error":
        raise BroadcastError(_error_text(report, records, where), records)
    if mode == "warn":
        for r in records:
            if getattr(r, "loss_inputs", True):
                why = f"{where} broadcasts predictions against targets; this usually breaks at other batch sizes"
            else:
                why = f"this term of {where} expands both of its operands, which can pair samples"
            warnings.warn_explicit(
                r.message() + f" (the gradients agree here, but {why})",
                BroadcastWarning,
                r.filename,
                r.lineno,
            )
