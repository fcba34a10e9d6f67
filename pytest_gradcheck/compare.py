"""The one comparison rule: tolerances per dtype, per-parameter figures, for every backend.

A parameter matches when ``max|batch - reference| <= atol + rtol * scale``, with
``scale`` the larger of its own gradient's largest magnitude and
``PROBLEM_SCALE_FRACTION`` of the largest gradient entry of the whole problem; in
the float64 re-check an error that shrank from the working dtype as rounding error
does is rounding (:func:`mark_rounding`). Every check compares through :class:`Pair`.

The figures (largest magnitudes, norms, dot products, largest errors) come from
:class:`Reductions` of the library that holds the gradients: torch tensors are
reduced by torch on their own device, chunk by chunk in float64, without flat or
float64 copies of whole gradients (:mod:`pytest_gradcheck._torch.reductions`);
NumPy arrays (the NumPy backend, DDP ranks) by NumPy over one flat buffer. Only a few
scalars per parameter leave the device on a passing check.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, Sequence

from .report import Comparison, ParamComparison

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np


#: Default relative tolerance per working dtype. The comparison is normwise per
#: parameter (``max|b - r| <= atol + rtol * max(|b|, |r|)``), so cancellation in
#: single entries does not inflate it; a real bug (a factor B, a broadcast) is
#: off by O(1). Anything above these in float32/16 is re-checked in float64.
DEFAULT_RTOL: dict[str, float] = {
    "float64": 1e-7,
    "float32": 1e-4,
    "float16": 1e-2,
    "bfloat16": 4e-2,
}


#: A parameter is judged against at least this fraction of the largest gradient
#: entry of the whole problem (every parameter, both sides), not only against its
#: own gradient: a parameter whose true gradient is zero (an attention key bias, a
#: bias before a normalisation) holds nothing but rounding noise from terms that
#: cancel, and comparing that noise with itself would call it a bug. With the
#: float32 rtol (1e-4) this floor is 1e-7 of the largest gradient, the resolution
#: of float32 itself.
PROBLEM_SCALE_FRACTION = 1e-3


def rounding_shrink_limit(working: str) -> float:
    """How much a rounding error must shrink from ``working`` to float64 to be called rounding.

    Rounding error scales with the unit roundoff: from float32 to float64 it
    shrinks by about ``eps64 / eps32 = 2e-9``, while a bug's error does not shrink
    at all. The limit is the geometric middle of the two, ``sqrt(eps64 / eps)``:
    an error that kept more than that fraction of itself in float64 is a bug.

    >>> f"{rounding_shrink_limit('float32'):.1e}"
    '4.3e-05'
    """
    eps = {"float64": 2.2e-16, "float32": 1.19e-7, "float16": 9.77e-4, "bfloat16": 7.81e-3}
    return math.sqrt(eps["float64"] / eps.get(working, eps["float32"]))


def default_tolerances(dtype: str, rtol: float | None = None, atol: float | None = None) -> tuple[float, float]:
    """The ``(rtol, atol)`` a check in ``dtype`` uses, explicit values winning.

    >>> default_tolerances("float32")
    (0.0001, 0.0)
    >>> default_tolerances("float32", rtol=1e-3)
    (0.001, 0.0)
    """
    r = DEFAULT_RTOL.get(dtype, DEFAULT_RTOL["float32"]) if rtol is None else float(rtol)
    a = 0.0 if atol is None else float(atol)
    return r, a


class FlatGrads(dict[str, Any]):
    """``{parameter name: ndarray}`` whose arrays are views into one flat buffer.

    The NumPy reductions work on the buffer (``ufunc.reduceat`` per statistic)
    instead of ~10 calls per parameter, which dominated the check for models with
    many small parameters. Backends that can lay their gradients out this way
    build it with :meth:`from_flat`; any other mapping of arrays is concatenated
    once by :meth:`of`. Torch gradients are never flattened: see
    :mod:`pytest_gradcheck._torch.reductions`.
    """

    flat: "np.ndarray"
    starts: "np.ndarray"  # offsets of the non-empty parameters, in order
    nonempty: list[str]

    @classmethod
    def from_flat(cls, flat: "np.ndarray", names: Sequence[str], shapes: Sequence[tuple[int, ...]]) -> "FlatGrads":
        import numpy as np

        if flat.dtype not in (np.float32, np.float64):  # e.g. float16: widen once, to float32 at least
            wide = np.result_type(np.float32, flat.dtype)
            flat = flat.astype(wide if wide in (np.float32, np.float64) else np.float64)
        out = cls()
        out.flat = flat
        out.nonempty, starts, offset = [], [], 0
        for name, shape in zip(names, shapes):
            n = math.prod(shape)
            out[name] = flat[offset : offset + n].reshape(shape)
            if n:
                out.nonempty.append(name)
                starts.append(offset)
            offset += n
        if offset != flat.size:
            raise ValueError(f"flat buffer has {flat.size} entries, the shapes {offset}")
        out.starts = np.asarray(starts, dtype=np.intp)
        return out

    @classmethod
    def of(cls, grads: Mapping[str, Any], names: Optional[Sequence[str]] = None) -> "FlatGrads":
        """``grads`` as FlatGrads (itself if it already is one, in the order of ``names``)."""
        import numpy as np

        names = list(grads) if names is None else list(names)
        if isinstance(grads, FlatGrads) and list(grads) == names:
            return grads
        arrays = [host64(grads[n]) if is_tensor(grads[n]) else np.asarray(grads[n]) for n in names]
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
        return cls.from_flat(flat, names, [a.shape for a in arrays])


# --------------------------------------------------------------------------- reductions


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor, without importing torch (a NumPy session never does)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def host64(x: Any) -> "np.ndarray":
    """``x`` (a NumPy array or a torch tensor on any device) as a float64 NumPy array on the host.

    Only the diagnosis of a mismatch calls it: a passing check copies nothing to the host.
    """
    import numpy as np

    if is_tensor(x):
        return np.asarray(x.detach().to("cpu", dtype=sys.modules["torch"].float64).numpy())
    return np.asarray(x, dtype=np.float64)


class Reductions(Protocol):
    """The per-parameter figures a comparison needs, computed by one array library.

    Every method takes the arrays in parameter order, as :meth:`prepare` made them,
    and returns plain floats: on the passing path these few scalars per parameter
    are all that leaves the gradients' device.
    """

    def prepare(self, arrays: Sequence[Any], names: Sequence[str]) -> Any:
        """The arrays laid out for the other methods (no copy where the library allows)."""
        ...

    def amax(self, data: Any) -> list[float]:
        """``max |x|`` per parameter (NaN if it holds a NaN, 0 if empty)."""
        ...

    def sq(self, data: Any) -> list[float]:
        """``sum x**2`` per parameter, accumulated in float64."""
        ...

    def joint(self, b: Any, r: Any, ks: Sequence[float]) -> "Joint":
        """One pass over both sides: their squared norms, their dot product and, for each
        ``k``, ``max |b - k * r|`` per parameter."""
        ...

    def max_diff(self, b: Any, r: Any, k: float) -> list[float]:
        """``max |b - k * r|`` per parameter."""
        ...

    def count_over(self, b: Any, r: Any, i: int, k: float, allowed: float) -> int:
        """How many entries of parameter ``i`` have ``|b - k * r| > allowed``."""
        ...

    def non_finite(self, data: Any, i: int) -> int:
        """How many entries of parameter ``i`` are NaN or infinite."""
        ...


@dataclass
class Joint:
    """What :meth:`Reductions.joint` computes, per parameter in order."""

    sq_b: list[float]
    sq_r: list[float]
    dot: list[float]
    diff: dict[float, list[float]]


class NumpyReductions:
    """The reductions over one flat NumPy buffer per side (:class:`FlatGrads`), ``reduceat`` each."""

    def prepare(self, arrays: Sequence[Any], names: Sequence[str]) -> FlatGrads:
        return FlatGrads.of(dict(zip(names, arrays)), names)

    @staticmethod
    def _per_param(data: FlatGrads, values: "np.ndarray") -> list[float]:
        out = dict.fromkeys(data, 0.0)
        out.update(zip(data.nonempty, values.tolist()))  # one conversion, not one per parameter
        return list(out.values())

    def amax(self, data: FlatGrads) -> list[float]:
        import numpy as np

        if not len(data.starts):
            return [0.0] * len(data)
        # max and -min, not |x|.max(): no temporary; NaN propagates through both
        hi, lo = np.maximum.reduceat(data.flat, data.starts), np.minimum.reduceat(data.flat, data.starts)
        return self._per_param(data, np.maximum(hi, np.negative(lo, out=lo), out=hi))

    def sq(self, data: FlatGrads) -> list[float]:
        import numpy as np

        if not len(data.starts):
            return [0.0] * len(data)
        return self._per_param(data, np.add.reduceat(np.square(data.flat), data.starts, dtype=np.float64))

    def joint(self, b: FlatGrads, r: FlatGrads, ks: Sequence[float]) -> Joint:
        import numpy as np

        if len(r.starts):
            dot = self._per_param(r, np.add.reduceat(np.multiply(b.flat, r.flat), r.starts, dtype=np.float64))
        else:
            dot = [0.0] * len(r)
        return Joint(self.sq(b), self.sq(r), dot, {k: self.max_diff(b, r, k) for k in ks})

    def max_diff(self, b: FlatGrads, r: FlatGrads, k: float) -> list[float]:
        import numpy as np

        if not len(r.starts):
            return [0.0] * len(r)
        diff = np.subtract(b.flat, r.flat) if k == 1.0 else np.subtract(b.flat, np.multiply(r.flat, k))
        return self._per_param(r, np.maximum.reduceat(np.abs(diff, out=diff), r.starts))

    def count_over(self, b: FlatGrads, r: FlatGrads, i: int, k: float, allowed: float) -> int:
        import numpy as np

        name = list(r)[i]
        return int((np.abs(np.asarray(b[name]) - k * np.asarray(r[name])) > allowed).sum())

    def non_finite(self, data: FlatGrads, i: int) -> int:
        import numpy as np

        return int((~np.isfinite(data[list(data)[i]])).sum())


_NUMPY = NumpyReductions()


def reductions_for(arrays: Sequence[Any]) -> Reductions:
    """The reductions of the library that holds ``arrays``: torch's for tensors (on their own
    device), NumPy's otherwise (a mix of both is compared on the host, in NumPy)."""
    if arrays and all(is_tensor(a) for a in arrays):
        from ._torch.reductions import TORCH

        return TORCH
    return _NUMPY


class Side:
    """One gradient's figures that do not depend on the other side, per parameter: the
    largest magnitude (computed at once) and the squared norm (when first needed)."""

    def __init__(self, grads: Mapping[str, Any], names: Sequence[str], reductions: Optional[Reductions] = None) -> None:
        self.names = list(names)
        arrays = [grads[n] for n in self.names]
        self.ops: Reductions = reductions if reductions is not None else reductions_for(arrays)
        self.data = self.ops.prepare(arrays, self.names)
        self.g: dict[str, Any] = dict(zip(self.names, arrays)) if not isinstance(self.data, dict) else self.data
        self.shapes = {n: tuple(int(x) for x in a.shape) for n, a in zip(self.names, arrays)}
        self.amax: dict[str, float] = dict(zip(self.names, self.ops.amax(self.data)))
        self._sq: Optional[dict[str, float]] = None

    @property
    def sq(self) -> dict[str, float]:
        if self._sq is None:
            self._sq = dict(zip(self.names, self.ops.sq(self.data)))
        return self._sq

    def finite(self, name: str) -> bool:
        return math.isfinite(self.amax[name])  # NaN and inf both show in the largest magnitude

    def non_finite(self, name: str) -> int:
        return self.ops.non_finite(self.data, self.names.index(name))


class Pair:
    """A batch gradient and a reference, compared under any scale ``k`` of the reference.

    ``ks`` are the scales the caller will compare under: their errors are computed in
    the same pass as the norms and the dot product (one read of both gradients).
    """

    def __init__(
        self,
        batch: Mapping[str, Any],
        reference: Mapping[str, Any],
        batch_side: Optional["Side"] = None,
        ks: Sequence[float] = (1.0,),
    ) -> None:
        self.names = list(reference)
        ops = reductions_for([*(reference[n] for n in self.names), *(batch[n] for n in self.names)])
        if batch_side is not None and batch_side.names == self.names and batch_side.ops is ops:
            self.b = batch_side
        else:
            self.b = Side(batch, self.names, ops)
        self.r = Side(reference, self.names, ops)
        self.ops = ops
        self.shapes = self.r.shapes
        joint = ops.joint(self.b.data, self.r.data, tuple(dict.fromkeys(float(k) for k in ks)))
        self.b._sq, self.r._sq = dict(zip(self.names, joint.sq_b)), dict(zip(self.names, joint.sq_r))
        self.dot: dict[str, float] = dict(zip(self.names, joint.dot))
        self._diff = {k: dict(zip(self.names, v)) for k, v in joint.diff.items()}

    def max_diff(self, k: float) -> dict[str, float]:
        """``max |batch - k * reference|`` per parameter."""
        k = float(k)
        if k not in self._diff:
            self._diff[k] = dict(zip(self.names, self.ops.max_diff(self.b.data, self.r.data, k)))
        return self._diff[k]

    def problem_scale(self, k: float) -> float:
        """The largest gradient entry of any parameter, on either side (``k`` scales the reference)."""
        amax = [self.b.amax[n] for n in self.names if self.b.finite(n)]
        amax += [abs(k) * self.r.amax[n] for n in self.names if self.r.finite(n)]
        return max(amax, default=0.0)

    def compare(
        self,
        k: float,
        rtol: float,
        atol: float,
        reduction: str,
        precision: str,
        problem_scale: Optional[float] = None,
    ) -> Comparison:
        """Figures for ``batch`` against ``k * reference``.

        Each parameter is judged against the larger of its own gradient scale and
        ``PROBLEM_SCALE_FRACTION`` of ``problem_scale`` (by default the largest
        gradient entry of the whole problem, see :meth:`problem_scale`).
        """
        if problem_scale is None:
            problem_scale = self.problem_scale(k)
        floor = PROBLEM_SCALE_FRACTION * problem_scale
        worst: Optional[dict[str, float]] = None
        out = []
        for i, n in enumerate(self.names):
            shape = self.shapes[n]
            numel = math.prod(shape)
            if numel == 0:
                out.append(ParamComparison(n, shape, 0.0, 0.0, atol, float("nan"), float("nan"), 0, 0))
                continue
            if not (self.b.finite(n) and self.r.finite(n)):
                bad = self.b.non_finite(n) + self.r.non_finite(n)
                out.append(ParamComparison(n, shape, math.inf, math.inf, atol, float("nan"), float("nan"), bad, numel))
                continue
            if worst is None:
                worst = self.max_diff(k)
            own = max(self.b.amax[n], abs(k) * self.r.amax[n])
            scale = max(own, floor)
            allowed = atol + rtol * scale
            max_abs = worst[n]
            over = self.ops.count_over(self.b.data, self.r.data, i, k, allowed) if max_abs > allowed else 0
            rel = max_abs / scale if scale > 0 else 0.0
            nb, nr = math.sqrt(self.b.sq[n]), abs(k) * math.sqrt(self.r.sq[n])
            if nb > 0 and nr > 0:
                cosine = min(1.0, max(-1.0, k * self.dot[n] / (nb * nr)))
            else:
                cosine = float("nan")
            if nr > 0:
                ratio = nb / nr
            else:
                ratio = float("nan") if nb == 0 else math.inf
            out.append(ParamComparison(n, shape, max_abs, rel, allowed, cosine, ratio, over, numel))
        return Comparison(
            reduction=reduction, precision=precision, rtol=rtol, atol=atol, params=tuple(out), scale=problem_scale
        )


def compare_gradients(
    batch: Mapping[str, Any],
    reference: Mapping[str, Any],
    *,
    rtol: float,
    atol: float,
    reduction: str,
    precision: str,
) -> Comparison:
    """Compare two gradients parameter by parameter.

    A parameter matches when ``max|batch - reference| <= atol + rtol * scale``,
    with ``scale`` the largest magnitude in either gradient of that parameter, or
    ``PROBLEM_SCALE_FRACTION`` (1e-3) of the largest magnitude of any parameter's
    gradient, whichever is larger: a parameter whose true gradient is zero holds
    only rounding noise, which is judged against the scale of the whole problem.

    >>> import numpy as np
    >>> c = compare_gradients({"w": np.array([1.0, 2.0])}, {"w": np.array([1.0, 2.0 + 1e-9])},
    ...                       rtol=1e-7, atol=0.0, reduction="mean", precision="float64")
    >>> c.passed, c.params[0].name
    (True, 'w')
    """
    return Pair(batch, reference).compare(1.0, rtol, atol, reduction, precision)


def mark_rounding(f64: Comparison, working: Comparison, limit: float) -> Comparison:
    """``f64`` with each failing parameter whose error shrank like rounding marked so.

    A parameter fails the float64 re-check only if its error also stayed of the
    same order as in the working dtype: rounding error shrinks by about nine
    orders of magnitude from float32 to float64, a bug's error does not shrink.
    """
    if f64.passed:
        return f64
    import dataclasses

    before = {p.name: p.max_abs_err for p in working.params}
    params = tuple(
        dataclasses.replace(p, rounding=True)
        if not p.passed and math.isfinite(p.max_abs_err) and p.max_abs_err <= limit * before.get(p.name, 0.0)
        else p
        for p in f64.params
    )
    return dataclasses.replace(f64, params=params)
