"""Batch-axis tracking: which elementwise ops in ``grad_fn`` pair samples with each other.

During the batch call of :func:`~pytest_gradcheck.numpy_backend.assert_gradequiv_numpy`
(working dtype only) the copies of ``inputs`` and ``targets`` handed to ``grad_fn``
are :class:`TrackedArray` views that know which of their axes is the **batch axis**
(axis 0 to start with). The batch axis is followed through ufuncs and operators,
reductions, indexing (``x[:, None]``, ``x[i]``, slices, one index array),
``reshape``/``ravel``/``squeeze``/``expand_dims``, ``transpose``/``.T``/``swapaxes``/
``moveaxis``, ``@``/``np.matmul``, ``np.dot``, ``np.tensordot``, ``np.einsum``,
``np.where``, ``np.concatenate``/``np.hstack``/``np.stack``. Any other op (or
``np.asarray``) loses the batch axis, and an operand without a known batch axis
never triggers a flag: where the tracking cannot follow, it stays silent.

An elementwise op (a ufunc such as ``-`` or ``*``, or ``np.where``) is flagged
when both hold:

1. the shared rule :func:`pytest_gradcheck.broadcast.is_implicit_broadcast`:
   no operand already had the result's shape (every operand was expanded); and
2. two operands carry a batch axis and broadcasting puts those batch axes on
   *different* axes of the result: the op pairs every sample with every other
   sample, as ``(N, 1) - (N,) -> (N, N)`` does.

So the predictions-vs-targets bug is caught wherever it sits in ``grad_fn``,
while the broadcasting hand-written backprop relies on is not: a bias ``(H,)``
over ``(B, H)`` (rule 1: one operand has the result's shape), per-sample outer
products ``d[:, :, None] * a[:, None, :]`` (rule 2: both batch axes stay on
axis 0), one-hot encodings ``y[:, None] == np.arange(C)`` (``np.arange`` has no
batch axis). Intended pairwise terms (contrastive losses) can be wrapped in
:func:`pytest_gradcheck.allow_broadcast`. Records use the torch guard's record
type, user file:line and message (:func:`pytest_gradcheck.broadcast.report_broadcast`),
with NumPy spellings in the suggestion (``y[..., None]``, ``.reshape(...)``):
:func:`recording_pairings`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections import Counter
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from ..broadcast import BroadcastRecord, broadcast_shape, is_implicit_broadcast, recording, report_broadcast

__all__ = ["TrackedArray", "recording_pairings"]

#: Batch-axis marker of a tracked array whose batch axis was lost (merged by a
#: reshape, moved by an op we do not follow). Such arrays are never flagged.
_LOST = -1


@contextlib.contextmanager
def recording_pairings() -> Iterator[list[BroadcastRecord]]:
    """Record the ops of tracked arrays that pair samples, in the block; never raise, never warn.

    The list it yields is filled when the block ends (normally or by an exception), with the
    suggestions in NumPy spelling. Honours :func:`pytest_gradcheck.allow_broadcast`.
    """
    with recording(torch_ops=False) as records:
        found: list[BroadcastRecord] = []
        try:
            yield found
        finally:
            found.extend(_numpy_records(records))


_VIEW_AS = re.compile(r"\.view_as\(([^()]*)\)")


def _numpy_spelling(suggestion: Optional[str]) -> Optional[str]:
    """Translate a torch-flavoured fix (``.unsqueeze(-1)``, ``.view_as(x)``) into NumPy.

    >>> _numpy_spelling("did you mean labels.unsqueeze(-1)?")
    'did you mean labels[..., None]?'
    >>> _numpy_spelling("did you mean y.view_as(out)?")
    'did you mean y.reshape(out.shape)?'
    """
    if not suggestion:
        return suggestion
    s = suggestion.replace(".unsqueeze(-1)", "[..., None]")
    s = s.replace(".view_as(other)", ".reshape(other.shape)")
    s = _VIEW_AS.sub(lambda m: f".reshape({m.group(1)}.shape)", s)
    return s.replace(".view(", ".reshape(")


def _numpy_records(records: Sequence[BroadcastRecord]) -> list[BroadcastRecord]:
    out = []
    for r in records:
        fixed = _numpy_spelling(r.suggestion)
        out.append(dataclasses.replace(r, suggestion=fixed) if fixed != r.suggestion else r)
    return out


def _safe(fn: Callable[..., Optional[int]], *args: Any) -> Optional[int]:
    """``fn(*args)``, or "lost" if the bookkeeping fails on a form it does not know."""
    try:
        return fn(*args)
    except Exception:
        return _LOST


def _track(a: np.ndarray, batch: Optional[int]) -> "TrackedArray":
    t = a.view(TrackedArray)
    t._gc_batch = batch
    return t


def _batch(x: Any) -> Optional[int]:
    return x._gc_batch if isinstance(x, TrackedArray) else None


def _wrap(result: Any, batch: Optional[int]) -> Any:
    if type(result) is np.ndarray or isinstance(result, TrackedArray):
        if batch is not None and batch != _LOST and not 0 <= batch < result.ndim:
            batch = _LOST
        if isinstance(result, TrackedArray):
            result._gc_batch = batch
            return result
        return _track(result, batch)
    return result


def _unwrap(x: Any) -> Any:
    if isinstance(x, TrackedArray):
        return x.view(np.ndarray)
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v) for v in x)
    if type(x) is dict:
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _norm_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _combine(placed: Sequence[tuple[int, int]], lost: bool) -> Optional[int]:
    """The result's batch axis from ``(result axis, size)`` of each operand's batch axis."""
    big = {pos for pos, size in placed if size > 1}
    if len(big) == 1:
        return big.pop()
    if len(big) > 1:
        return _LOST  # an explicit pairing (outer, gram matrix): no single batch axis
    every = {pos for pos, _ in placed}
    if len(every) == 1 and not lost:
        return every.pop()
    return _LOST if (every or lost) else None


def _elementwise(operands: Sequence[Any], out_ndim: int) -> tuple[list[tuple[int, int]], bool]:
    """Where each operand's batch axis lands in a broadcast result (right-aligned)."""
    placed: list[tuple[int, int]] = []
    lost = False
    for x in operands:
        b = _batch(x)
        if b is None:
            continue
        if b == _LOST:
            lost = True
            continue
        placed.append((b + out_ndim - x.ndim, int(x.shape[b])))
    return placed, lost


def _check_pairing(op: str, operands: Sequence[Any], placed: Sequence[tuple[int, int]]) -> None:
    """Report ``op`` when it expands every operand and puts two batch axes on different axes."""
    __tracebackhide__ = True
    if len({pos for pos, size in placed if size > 1}) < 2:
        return
    shapes = [tuple(int(d) for d in np.shape(x)) for x in operands]
    result = broadcast_shape(shapes)
    if result is None or not is_implicit_broadcast(shapes, result):
        return
    report_broadcast(op, shapes, result)


def _matmul_batch(a: Any, b: Any, out_ndim: int) -> Optional[int]:
    na, nb = np.ndim(a), np.ndim(b)
    placed: list[tuple[int, int]] = []
    lost = False
    lead = out_ndim - (2 if na >= 2 and nb >= 2 else 1 if max(na, nb) >= 2 else 0)
    for which, x, n in (("a", a, na), ("b", b, nb)):
        ba = _batch(x)
        if ba is None:
            continue
        if ba == _LOST:
            lost = True
            continue
        size = int(np.shape(x)[ba])
        if n == 1:
            continue  # contracted
        if which == "a":
            if ba == n - 1:
                continue  # contracted
            if ba == n - 2:
                placed.append((out_ndim - 2 if nb >= 2 else out_ndim - 1, size))
            else:
                placed.append((ba + lead - (n - 2), size))
        else:
            if ba == n - 2:
                continue  # contracted
            if ba == n - 1:
                placed.append((out_ndim - 1, size))
            else:
                placed.append((ba + lead - (n - 2), size))
    return _combine(placed, lost)


def _dot_batch(a: Any, b: Any, out_ndim: int) -> Optional[int]:
    na, nb = np.ndim(a), np.ndim(b)
    if na == 0 or nb == 0:
        return _combine(*_elementwise([a, b], out_ndim))
    if na <= 2 and nb <= 2:
        return _matmul_batch(a, b, out_ndim)
    placed: list[tuple[int, int]] = []
    lost = False
    ba, bb = _batch(a), _batch(b)
    if ba == _LOST or bb == _LOST:
        lost = True
    if ba is not None and ba != _LOST and ba != na - 1:
        placed.append((ba, int(np.shape(a)[ba])))
    if bb is not None and bb != _LOST and nb >= 2 and bb != nb - 2:
        pos = na - 1 + (bb if bb < nb - 2 else nb - 2)
        placed.append((pos, int(np.shape(b)[bb])))
    return _combine(placed, lost)


def _tensordot_batch(a: Any, b: Any, axes: Any) -> Optional[int]:
    na, nb = np.ndim(a), np.ndim(b)
    try:
        if isinstance(axes, (int, np.integer)):
            ax_a = list(range(na - int(axes), na))
            ax_b = list(range(int(axes)))
        else:
            ax_a, ax_b = axes
            ax_a = [int(ax_a)] if isinstance(ax_a, (int, np.integer)) else [int(v) for v in ax_a]
            ax_b = [int(ax_b)] if isinstance(ax_b, (int, np.integer)) else [int(v) for v in ax_b]
    except (TypeError, ValueError):
        return _LOST
    ax_a = [_norm_axis(v, na) for v in ax_a]
    ax_b = [_norm_axis(v, nb) for v in ax_b]
    free_a = [i for i in range(na) if i not in ax_a]
    free_b = [i for i in range(nb) if i not in ax_b]
    placed: list[tuple[int, int]] = []
    lost = False
    for x, free, offset in ((a, free_a, 0), (b, free_b, len(free_a))):
        bx = _batch(x)
        if bx is None:
            continue
        if bx == _LOST:
            lost = True
        elif bx in free:
            placed.append((offset + free.index(bx), int(np.shape(x)[bx])))
    return _combine(placed, lost)


def _einsum_batch(subscripts: str, operands: Sequence[Any], out_ndim: int) -> Optional[int]:
    s = subscripts.replace(" ", "")
    ins, out = s.split("->") if "->" in s else (s, None)
    specs = ins.split(",")
    if len(specs) != len(operands):
        return _LOST
    labels: list[list[Any]] = []
    max_ell = 0
    for spec, x in zip(specs, operands):
        n = np.ndim(x)
        if "..." in spec:
            pre, post = spec.split("...")
            ell = n - len(pre) - len(post)
            max_ell = max(max_ell, ell)
            labels.append(list(pre) + [("...", k, ell) for k in range(ell)] + list(post))
        else:
            labels.append(list(spec))
    if out is None:
        counts = Counter(c for spec in specs for c in spec.replace("...", ""))
        out = ("..." if "..." in ins else "") + "".join(sorted(c for c, k in counts.items() if k == 1))
    opre, opost = out.split("...") if "..." in out else (out, None)
    if len(opre) + (max_ell + len(opost) if opost is not None else 0) != out_ndim:
        return _LOST

    def position(label: Any) -> Optional[int]:
        if isinstance(label, tuple):
            if opost is None:
                return None
            _, k, ell = label
            return len(opre) + (max_ell - int(ell)) + int(k)
        if label in opre:
            return opre.index(label)
        if opost is not None and label in opost:
            return len(opre) + max_ell + opost.index(label)
        return None

    placed: list[tuple[int, int]] = []
    lost = False
    for x, lab in zip(operands, labels):
        bx = _batch(x)
        if bx is None:
            continue
        if bx == _LOST or len(lab) != np.ndim(x):
            lost = True
            continue
        pos = position(lab[bx])
        if pos is not None:
            placed.append((pos, int(np.shape(x)[bx])))
    return _combine(placed, lost)


def _index_batch(b: int, ndim: int, index: Any) -> Optional[int]:
    """Where batch axis ``b`` goes under ``x[index]`` (None: one sample was picked)."""
    idx = index if isinstance(index, tuple) else (index,)
    advanced = [
        i for i in idx
        if isinstance(i, (list, np.ndarray)) and not (isinstance(i, np.ndarray) and i.ndim == 0)
    ]  # fmt: skip
    if advanced:
        if len(advanced) > 1 or np.ndim(advanced[0]) != 1:
            return _LOST
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded += [slice(None)] * (ndim - consumed)
        else:
            expanded.append(i)
    if Ellipsis not in idx:
        expanded += [slice(None)] * (ndim - consumed)
    in_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        is_int = isinstance(i, (int, np.integer)) or (isinstance(i, np.ndarray) and i.ndim == 0)
        if is_int and not isinstance(i, bool):
            if in_dim == b:
                return None
            in_dim += 1
            continue
        if in_dim == b:
            return out_dim
        in_dim += 1
        out_dim += 1
    return _LOST


def _transposed_batch(b: Optional[int], ndim: int, axes: tuple[Any, ...]) -> Optional[int]:
    if b is None or b == _LOST:
        return b
    if not axes or axes == (None,):
        perm = tuple(range(ndim))[::-1]
    elif len(axes) == 1 and not isinstance(axes[0], (int, np.integer)):
        perm = tuple(int(a) for a in axes[0])
    else:
        perm = tuple(int(a) for a in axes)
    return tuple(_norm_axis(a, ndim) for a in perm).index(b)


def _swapped_batch(b: Optional[int], ndim: int, axis1: Any, axis2: Any) -> Optional[int]:
    if b is None or b == _LOST:
        return b
    a1, a2 = _norm_axis(int(axis1), ndim), _norm_axis(int(axis2), ndim)
    return a2 if b == a1 else a1 if b == a2 else b


def _squeezed_batch(b: Optional[int], shape: tuple[int, ...], axis: Any) -> Optional[int]:
    if b is None or b == _LOST:
        return b
    if axis is None:
        removed = [i for i, d in enumerate(shape) if d == 1]
    else:
        removed = [_norm_axis(int(a), len(shape)) for a in (axis if np.ndim(axis) else (axis,))]
    return None if b in removed else b - sum(1 for a in removed if a < b)


def _reshape_batch(src: "TrackedArray", shape: Sequence[int], order: str = "C") -> Optional[int]:
    b = src._gc_batch
    if b is None or b == _LOST:
        return b
    if order not in ("C", "A") or (order == "A" and not src.flags.c_contiguous):
        return _LOST
    before = math.prod(src.shape[:b])
    size = src.shape[b]
    prefix = 1
    for k, d in enumerate(shape):
        if prefix == before and d == size:
            return k
        prefix *= d
    return _LOST


class TrackedArray(np.ndarray):
    """An ``np.ndarray`` that knows which of its axes is the batch axis.

    ``grad_fn`` receives its inputs and targets as tracked views during the batch
    call of :func:`assert_gradequiv_numpy` (never otherwise). Values, dtypes and
    results are exactly those of plain arrays: every operation runs on plain
    views; the wrapper only follows the batch axis and reports elementwise ops
    that pair samples with each other (the rule is in the module docstring).

    >>> x = TrackedArray.of_batch(np.zeros((4, 3)))
    >>> (x[:, None, :] * x[:, :, None]).batch_axis      # per-sample outer product
    0
    >>> x.T.batch_axis, x.sum(axis=0).batch_axis
    (1, None)
    """

    _gc_batch: Optional[int] = None

    @classmethod
    def of_batch(cls, a: np.ndarray, axis: int = 0) -> "TrackedArray":
        """A tracked view of ``a`` whose batch axis is ``axis``."""
        return _track(np.asarray(a), _norm_axis(axis, np.ndim(a)))

    @property
    def batch_axis(self) -> Optional[int]:
        """The batch axis, ``None`` if there is none, ``-1`` if it was lost."""
        return self._gc_batch

    def __array_finalize__(self, obj: Any) -> None:
        b = getattr(obj, "_gc_batch", None)
        if b is None:
            self._gc_batch = None
        elif getattr(obj, "shape", None) == self.shape:
            self._gc_batch = b
        else:
            self._gc_batch = _LOST

    # -- ufuncs -------------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        if "where" in kwargs:
            kwargs["where"] = _unwrap(kwargs["where"])
        raw = [_unwrap(x) for x in inputs]
        batch: Optional[int] = None
        if method == "__call__" and ufunc.signature is None:
            try:
                out_ndim = max((np.ndim(x) for x in inputs), default=0)
                placed, lost = _elementwise(inputs, out_ndim)
            except Exception:  # bookkeeping must never break the user's computation
                placed, lost = [], True
            if len(inputs) >= 2:
                _check_pairing(ufunc.__name__, inputs, placed)
            batch = _combine(placed, lost)
            result = ufunc(*raw, **kwargs)
        else:
            result = getattr(ufunc, method)(*raw, **kwargs)
            batch = _safe(self._other_batch, ufunc, method, inputs, kwargs, result)
        if out is not None and all(o is not None for o in out):
            return out[0] if len(out) == 1 else tuple(out)
        if isinstance(result, tuple):
            return tuple(_wrap(r, batch) for r in result)
        return _wrap(result, batch)

    @staticmethod
    def _other_batch(
        ufunc: np.ufunc, method: str, inputs: Sequence[Any], kwargs: Mapping[str, Any], result: Any
    ) -> Optional[int]:
        if method == "__call__" and ufunc is np.matmul and len(inputs) == 2:
            return _matmul_batch(inputs[0], inputs[1], np.ndim(result))
        if method in ("reduce", "accumulate"):
            return TrackedArray._reduced_batch(inputs[0], method, kwargs)
        # other gufuncs, reduceat, outer, at
        return _LOST if any(_batch(x) is not None for x in inputs) else None

    @staticmethod
    def _reduced_batch(x: Any, method: str, kwargs: Mapping[str, Any]) -> Optional[int]:
        b = _batch(x)
        if b is None or b == _LOST:
            return b
        n = np.ndim(x)
        axis = kwargs.get("axis", 0)
        axes = tuple(range(n)) if axis is None else (axis,) if np.ndim(axis) == 0 else tuple(axis)
        axes = tuple(_norm_axis(int(a), n) for a in axes)
        if method == "accumulate":
            return _LOST if b in axes else b
        if b in axes:
            return None  # summed over the samples
        if kwargs.get("keepdims", False):
            return b
        return b - sum(1 for a in axes if a < b)

    # -- numpy functions ----------------------------------------------------------------------
    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        __tracebackhide__ = True
        handler = _FUNCTIONS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func in _THROUGH_METHODS:
            return super().__array_function__(func, types, args, kwargs)
        return func(*_unwrap(args), **_unwrap(kwargs))

    # -- methods that move axes -----------------------------------------------------------------
    def __getitem__(self, index: Any) -> Any:
        result = super().__getitem__(index)
        if isinstance(result, TrackedArray):
            b = self._gc_batch
            if b is not None and b != _LOST:
                try:
                    b = _index_batch(b, self.ndim, index)
                except Exception:  # an index form we do not follow
                    b = _LOST
            result._gc_batch = b if b is None or b == _LOST or b < result.ndim else _LOST
        return result

    def reshape(self, *shape: Any, **kwargs: Any) -> Any:
        result = super().reshape(*shape, **kwargs)
        return _wrap(result, _safe(_reshape_batch, self, result.shape, kwargs.get("order", "C")))

    def ravel(self, order: Any = "C") -> Any:
        result = super().ravel(order)
        return _wrap(result, _safe(_reshape_batch, self, result.shape, order or "C"))

    def flatten(self, order: Any = "C") -> Any:
        result = super().flatten(order)
        return _wrap(result, _safe(_reshape_batch, self, result.shape, order or "C"))

    def transpose(self, *axes: Any) -> Any:
        result = super().transpose(*axes)
        return _wrap(result, _safe(_transposed_batch, self._gc_batch, self.ndim, axes))

    @property
    def T(self) -> Any:
        return self.transpose()

    @property
    def mT(self) -> Any:
        if self.ndim < 2:
            return super().mT
        return self.swapaxes(-1, -2)

    def swapaxes(self, axis1: Any, axis2: Any) -> Any:
        result = super().swapaxes(axis1, axis2)
        return _wrap(result, _safe(_swapped_batch, self._gc_batch, self.ndim, axis1, axis2))

    def squeeze(self, axis: Any = None) -> Any:
        result = super().squeeze(axis)
        return _wrap(result, _safe(_squeezed_batch, self._gc_batch, self.shape, axis))

    def dot(self, b: Any, out: Any = None) -> Any:
        return _dot(self, b, out=out)


def _dot(a: Any, b: Any, out: Any = None) -> Any:
    result = np.dot(_unwrap(a), _unwrap(b), out=_unwrap(out))
    if out is not None:
        return out
    return _wrap(result, _safe(_dot_batch, a, b, np.ndim(result)))


def _tensordot(a: Any, b: Any, axes: Any = 2) -> Any:
    result = np.tensordot(_unwrap(a), _unwrap(b), axes=_unwrap(axes))
    return _wrap(result, _safe(_tensordot_batch, a, b, axes))


def _einsum(*operands: Any, **kwargs: Any) -> Any:
    out = kwargs.get("out")
    result = np.einsum(*_unwrap(operands), **_unwrap(kwargs))
    if out is not None:
        return out
    if operands and isinstance(operands[0], str):
        return _wrap(result, _safe(_einsum_batch, operands[0], operands[1:], np.ndim(result)))
    return _wrap(result, _LOST if any(_batch(x) is not None for x in operands) else None)


def _where(condition: Any, *xy: Any) -> Any:
    __tracebackhide__ = True
    if len(xy) != 2:
        return np.where(_unwrap(condition), *_unwrap(xy))
    operands = (condition, *xy)
    try:
        placed, lost = _elementwise(operands, max(np.ndim(x) for x in operands))
    except Exception:  # bookkeeping must never break the user's computation
        placed, lost = [], True
    _check_pairing("where", operands, placed)
    return _wrap(np.where(*_unwrap(operands)), _combine(placed, lost))


def _joined_batch(arrays: Sequence[Any], axis: Optional[int], new_axis: bool) -> Optional[int]:
    """The batch axis of ``concatenate``/``stack`` of ``arrays`` along ``axis``."""
    batches = [_batch(a) for a in arrays]
    known = {b for b in batches if b is not None}
    if not known:
        return None
    if _LOST in known or len(known) > 1 or axis is None:
        return _LOST
    b = known.pop()
    ndim = np.ndim(arrays[0]) + (1 if new_axis else 0)
    ax = _norm_axis(int(axis), ndim)
    if new_axis:
        return b if b < ax else b + 1
    return _LOST if ax == b else b  # joining along the batch axis mixes samples


def _concatenate(arrays: Sequence[Any], axis: Optional[int] = 0, **kwargs: Any) -> Any:
    result = np.concatenate(_unwrap(list(arrays)), axis, **_unwrap(kwargs))
    if kwargs.get("out") is not None:
        return kwargs["out"]
    return _wrap(result, _safe(_joined_batch, list(arrays), axis, False))


def _hstack(arrays: Sequence[Any], **kwargs: Any) -> Any:
    arrays = list(arrays)
    result = np.hstack(_unwrap(arrays), **kwargs)
    return _wrap(result, _safe(_joined_batch, arrays, 0 if np.ndim(arrays[0]) == 1 else 1, False))


def _stack(arrays: Sequence[Any], axis: int = 0, **kwargs: Any) -> Any:
    arrays = list(arrays)
    result = np.stack(_unwrap(arrays), axis, **_unwrap(kwargs))
    if kwargs.get("out") is not None:
        return kwargs["out"]
    return _wrap(result, _safe(_joined_batch, arrays, axis, True))


_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    np.dot: _dot,
    np.tensordot: _tensordot,
    np.einsum: _einsum,
    np.where: _where,
    np.concatenate: _concatenate,
    np.hstack: _hstack,
    np.stack: _stack,
}

# Functions whose NumPy implementation calls the array's own methods and ufuncs,
# which the tracked array follows: let them run on the tracked array.
_THROUGH_METHODS = frozenset(
    f
    for f in (
        np.sum, np.mean, np.prod, np.max, np.min, np.amax, np.amin, np.std, np.var,
        np.reshape, np.ravel, np.transpose, np.squeeze, np.expand_dims, np.moveaxis,
        np.swapaxes, np.clip, np.zeros_like, np.ones_like, np.empty_like, np.full_like,
        np.copy, np.shape, np.ndim, np.size,
    )
    if f is not None
)  # fmt: skip
