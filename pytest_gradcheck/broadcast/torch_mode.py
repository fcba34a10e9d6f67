"""The torch side of the guard: the watched torch callables, their operands, the ``TorchFunctionMode``.

This module imports torch; :mod:`.guard` imports it when a guard that watches
torch ops is entered.

Cost: an op that is not watched, or whose operands have the same shape, costs
a dictionary lookup. An elementwise op between two tensors of different shapes
is decided from its two shapes and the guard's batch size, memoised (a step runs
the same ops on the same shapes every time), so a broadcast that is flagged by
no guard costs about as little. Only an op that is flagged walks the stack to
find whose code ran it, and its record is built once per call site
(:func:`~.frames.record_at`).
"""

from __future__ import annotations

import sys
import warnings
from collections import deque
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.nn import Parameter
from torch.overrides import TorchFunctionMode

from .frames import op_site, site_record
from .guard import Guard, deliver
from .rule import DUNDERS, ELEMENTWISE_OPS, LOSS_OPERANDS, SPECIAL_OPS, Shape, pairing_result

__all__ = ["ELEMENTWISE", "LOSS", "GuardMode", "OpSpec", "WATCHED", "decide"]

#: Kinds of watched op: every tensor operand counts, or the listed operands of a loss.
ELEMENTWISE, LOSS = 0, 1


class OpSpec:
    """A watched op: its name, its kind, whether its operands come reversed, a loss's operands."""

    __slots__ = ("name", "kind", "reverse", "operands")

    def __init__(self, name: str, kind: int, reverse: bool = False, operands: tuple[tuple[int, str], ...] = ()) -> None:
        self.name = name
        self.kind = kind
        self.reverse = reverse
        self.operands = operands


def _build_watched() -> dict[Callable[..., Any], OpSpec]:
    watched: dict[Callable[..., Any], OpSpec] = {}

    def add(obj: object, spec: OpSpec) -> None:
        if obj is None or not callable(obj):
            return
        try:
            watched.setdefault(obj, spec)
        except TypeError:  # pragma: no cover - unhashable callable
            pass

    owners = (torch.Tensor, torch._C.TensorBase)
    for name in ELEMENTWISE_OPS:
        spec = OpSpec(name, ELEMENTWISE)
        add(getattr(torch, name, None), spec)
        add(getattr(torch._C._VariableFunctions, name, None), spec)
        for owner in owners:
            add(getattr(owner, name, None), spec)
            add(getattr(owner, name + "_", None), OpSpec(name + "_", ELEMENTWISE))
    for name in SPECIAL_OPS:
        add(getattr(torch.special, name, None), OpSpec(name, ELEMENTWISE))
    for dunder, (name, reverse) in DUNDERS.items():
        spec = OpSpec(name, ELEMENTWISE, reverse)
        for owner in owners:
            add(getattr(owner, dunder, None), spec)
    for name, operands in LOSS_OPERANDS.items():
        add(getattr(F, name, None), OpSpec(name, LOSS, operands=operands))
    return watched


#: torch callable -> how it is watched.
WATCHED = _build_watched()

#: (batch size, *operand shapes) -> the result shape if the op is flagged, else None.
_decisions: dict[tuple[object, ...], Shape | None] = {}
_DECISIONS_MAX = 4096


def decide(shapes: Sequence[Sequence[int]], batch_size: int | None) -> Shape | None:
    """:func:`~.rule.pairing_result` of ``shapes`` under ``batch_size``, memoised.

    Shapes with symbolic sizes are never flagged. Raises ``TypeError`` when a
    shape cannot be hashed (symbolic sizes do not hash).
    """
    key = (batch_size, *shapes)
    try:
        return _decisions[key]
    except KeyError:
        pass
    result = None
    if all(type(d) is int for s in shapes for d in s):  # symbolic sizes: stay out of the way
        result = pairing_result([tuple(s) for s in shapes], batch_size)
    if len(_decisions) >= _DECISIONS_MAX:
        _decisions.clear()
    _decisions[key] = result
    return result


def _covers(big: Sequence[int], small: Sequence[int]) -> bool:
    """True when ``small`` broadcasts into ``big`` without expanding ``big``."""
    nb, ns = len(big), len(small)
    if ns > nb:
        return False
    for x, y in zip(big[nb - ns :], small):
        if y != 1 and y != x:
            return False
    return True


def _operands(spec: OpSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensor operands of a watched op, in the user's order."""
    tensor = torch.Tensor
    if spec.kind == ELEMENTWISE:
        tensors = [a for a in args if isinstance(a, tensor)]
        if kwargs:
            tensors += [v for k, v in kwargs.items() if k != "out" and isinstance(v, tensor)]
        if spec.reverse and len(tensors) == 2:
            tensors.reverse()  # x.__rsub__(y) is y - x: report in the user's order
        return tensors
    tensors = []
    for pos, key in spec.operands:
        v = args[pos] if len(args) > pos else kwargs.get(key)
        if isinstance(v, tensor):
            tensors.append(v)
    return tensors


def _depends_on_parameter(t: torch.Tensor, budget: int = 10_000) -> bool:
    """Whether ``t`` is, or was computed from, an ``nn.Parameter`` (a model's weights).

    Walks the autograd graph breadth first, so the nearest weight is found in a
    few steps; a graph larger than ``budget`` nodes counts as a prediction.
    """
    if isinstance(t, Parameter):
        return True
    fn = getattr(t, "grad_fn", None)
    if fn is None:
        return False
    seen = {fn}
    queue = deque([fn])
    while queue:
        node = queue.popleft()
        if isinstance(getattr(node, "variable", None), Parameter):
            return True
        for nxt, _ in getattr(node, "next_functions", ()):
            if nxt is not None and nxt not in seen:
                if len(seen) >= budget:
                    return True
                seen.add(nxt)
                queue.append(nxt)
    return False


def _between_loss_inputs(spec: OpSpec, tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the operands are the loss's inputs: predictions against targets.

    An elementwise loss's input and target are. Otherwise the floating-point
    operands tell: one computed from the model's parameters (a prediction)
    against one that is not (a target, a mask, data). When all of them come
    from parameters the op is a term of predictions only (in-batch pairs).
    When none does, or there are fewer than two, it cannot be told: True.
    (``requires_grad`` would not tell: the checks pass the batch as aliases
    that require grad.)
    """
    if spec.kind == LOSS:
        return True
    floats = [t for t in tensors if (t.dtype.is_floating_point or t.dtype.is_complex) and t.numel() != 1]
    if len(floats) < 2:
        return True
    try:
        return not all(_depends_on_parameter(t) for t in floats)
    except (RuntimeError, TypeError, AttributeError):  # pragma: no cover - an exotic tensor subclass
        return True


def _operand_shapes(spec: OpSpec, args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Shape] | None:
    """Shapes of the tensor operands, or None when the op cannot be an implicit broadcast."""
    shapes: list[Sequence[int]] = [t.shape for t in _operands(spec, args, kwargs)]
    if spec.name == "gaussian_nll_loss" and len(shapes) == 3:
        inp, var = shapes[0], shapes[2]
        if var != inp and tuple(inp)[:-1] == tuple(var):
            shapes[2] = tuple(var) + (1,)  # torch unsqueezes a homoscedastic var
    if len(shapes) < 2:
        return None
    if len(shapes) == 2:
        s0, s1 = shapes
        if s0 == s1 or _covers(s0, s1) or _covers(s1, s0):
            return None
    out: list[Shape] = []
    for s in shapes:
        t = tuple(s)
        for d in t:
            if type(d) is not int:  # symbolic sizes: stay out of the way
                return None
        out.append(t)
    return out


def _flag(
    guard: Guard, spec: OpSpec, shapes: tuple[Shape, ...], result: Shape, tensors: Sequence[torch.Tensor]
) -> None:
    """Record a flagged op for ``guard``, unless an installed library's own code ran it."""
    __tracebackhide__ = True
    frame, library = op_site(sys._getframe(1))
    if library:
        return  # an installed library's own, deliberate broadcast
    try:
        record = site_record(spec.name, shapes, result, frame, _between_loss_inputs(spec, tensors))
        deliver(guard, record, shapes, frame)
    finally:
        del frame


def _check_and_call(
    guard: Guard, spec: OpSpec, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """The general case: any watched op, with keywords, a loss, three operands."""
    __tracebackhide__ = True
    shapes = _operand_shapes(spec, args, kwargs)
    if shapes is not None and guard.active():
        result = decide(shapes, guard.batch_size)
        if result is not None:
            _flag(guard, spec, tuple(shapes), result, _operands(spec, args, kwargs))
            if spec.kind == LOSS:
                with warnings.catch_warnings():
                    # torch's own "Using a target size ... different to the input size"
                    warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
                    return func(*args, **kwargs)
    return func(*args, **kwargs)


class GuardMode(TorchFunctionMode):
    """Torch function mode of one entered guard (see :class:`~.guard.no_implicit_broadcast`)."""

    def __init__(self, guard: Guard) -> None:
        super().__init__()
        self.guard = guard

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: object,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        __tracebackhide__ = True
        try:
            spec = WATCHED.get(func)
        except TypeError:  # pragma: no cover - unhashable callable
            spec = None
        if spec is None:
            if kwargs:
                return func(*args, **kwargs)
            return func(*args)
        if kwargs or len(args) != 2 or spec.kind != ELEMENTWISE:
            return _check_and_call(self.guard, spec, func, args, kwargs or {})
        x, y = args  # the common case: a binary elementwise op
        if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)):
            return func(x, y)  # a python number: never flagged
        s0, s1 = x.shape, y.shape
        if s0 == s1:
            return func(x, y)
        guard = self.guard
        try:
            result = _decisions[(guard.batch_size, s0, s1)]
        except KeyError:
            result = decide((s0, s1), guard.batch_size)
        except TypeError:  # symbolic sizes do not hash: stay out of the way
            return func(x, y)
        if result is not None and guard.active():
            shapes = (tuple(s1), tuple(s0)) if spec.reverse else (tuple(s0), tuple(s1))
            _flag(guard, spec, shapes, result, args)
        return func(x, y)
