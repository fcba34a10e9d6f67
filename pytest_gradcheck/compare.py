"""The one comparison rule: tolerances per dtype, gradients as flat buffers, per-parameter figures.

A parameter matches when ``max|batch - reference| <= atol + rtol * scale``, with
``scale`` the larger of its own gradient's largest magnitude and
``PROBLEM_SCALE_FRACTION`` of the largest gradient entry of the whole problem; in
the float64 re-check an error that shrank from the working dtype as rounding error
does is rounding (:func:`mark_rounding`). Every check compares through :class:`Pair`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

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

    The comparison reduces every parameter in a handful of NumPy calls over the
    buffer (``ufunc.reduceat`` per statistic) instead of ~10 calls per parameter,
    which dominated the check for models with many small parameters. Backends
    that can lay their gradients out this way (the torch backend: one
    ``np.concatenate`` of the CPU gradients' shared memory, or one ``torch.cat``
    and one copy to the host) build it with :meth:`from_flat`;
    any other mapping is concatenated once by :meth:`of`.
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
    def of(cls, grads: Mapping[str, "np.ndarray"], names: Optional[Sequence[str]] = None) -> "FlatGrads":
        """``grads`` as FlatGrads (itself if it already is one, in the order of ``names``)."""
        import numpy as np

        names = list(grads) if names is None else list(names)
        if isinstance(grads, FlatGrads) and list(grads) == names:
            return grads
        arrays = [np.asarray(grads[n]) for n in names]
        flat = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else np.zeros(0)
        return cls.from_flat(flat, names, [a.shape for a in arrays])


class Side:
    """One gradient's figures that do not depend on the other side, per parameter:
    the largest magnitude and the squared norm, each in one pass over all parameters."""

    def __init__(self, grads: Mapping[str, "np.ndarray"], names: Sequence[str]) -> None:
        import numpy as np

        self.g = FlatGrads.of(grads, names)
        flat, starts = self.g.flat, self.g.starts
        self.amax: dict[str, float] = dict.fromkeys(names, 0.0)
        self.sq: dict[str, float] = dict.fromkeys(names, 0.0)
        if len(starts):
            # max and -min, not |x|.max(): no temporary; NaN propagates through both
            hi, lo = np.maximum.reduceat(flat, starts), np.minimum.reduceat(flat, starts)
            np.maximum(hi, np.negative(lo, out=lo), out=hi)
            sq = np.add.reduceat(np.square(flat), starts, dtype=np.float64)  # accumulated in float64
            self.amax.update(zip(self.g.nonempty, hi.tolist()))  # one conversion, not one per parameter
            self.sq.update(zip(self.g.nonempty, sq.tolist()))

    def finite(self, name: str) -> bool:
        return math.isfinite(self.amax[name]) and math.isfinite(self.sq[name])

    def non_finite(self, name: str) -> int:
        import numpy as np

        return int((~np.isfinite(self.g[name])).sum())


class Pair:
    """A batch gradient and a reference, compared under any scale ``k`` of the reference."""

    def __init__(
        self,
        batch: Mapping[str, "np.ndarray"],
        reference: Mapping[str, "np.ndarray"],
        batch_side: Optional["Side"] = None,
    ) -> None:
        import numpy as np

        self.names = list(reference)
        self.b = batch_side if batch_side is not None and list(batch_side.g) == self.names else Side(batch, self.names)
        self.r = Side(reference, self.names)
        self.shapes = {n: tuple(int(x) for x in a.shape) for n, a in self.r.g.items()}
        self.dot: dict[str, float] = dict.fromkeys(self.names, 0.0)
        starts = self.r.g.starts
        if len(starts):
            dots = np.add.reduceat(np.multiply(self.b.g.flat, self.r.g.flat), starts, dtype=np.float64)
            self.dot.update(zip(self.r.g.nonempty, dots.tolist()))

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
        import numpy as np

        if problem_scale is None:
            problem_scale = self.problem_scale(k)
        floor = PROBLEM_SCALE_FRACTION * problem_scale

        worst: dict[str, float] = {}
        diff = None
        starts = self.r.g.starts
        if len(starts):
            b, r = self.b.g.flat, self.r.g.flat
            diff = np.subtract(b, r) if k == 1.0 else np.subtract(b, np.multiply(r, k))
            np.abs(diff, out=diff)
            worst = dict(zip(self.r.g.nonempty, np.maximum.reduceat(diff, starts).tolist()))
        out = []
        for n in self.names:
            shape = self.shapes[n]
            numel = math.prod(shape)
            if numel == 0:
                out.append(ParamComparison(n, shape, 0.0, 0.0, atol, float("nan"), float("nan"), 0, 0))
                continue
            if not (self.b.finite(n) and self.r.finite(n)):
                bad = self.b.non_finite(n) + self.r.non_finite(n)
                out.append(ParamComparison(n, shape, math.inf, math.inf, atol, float("nan"), float("nan"), bad, numel))
                continue
            own = max(self.b.amax[n], abs(k) * self.r.amax[n])
            scale = max(own, floor)
            allowed = atol + rtol * scale
            max_abs = worst[n]
            over = 0
            if max_abs > allowed and diff is not None:
                i = self.r.g.nonempty.index(n)
                start = int(starts[i])
                over = int((diff[start : start + numel] > allowed).sum())
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
    batch: Mapping[str, "np.ndarray"],
    reference: Mapping[str, "np.ndarray"],
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
