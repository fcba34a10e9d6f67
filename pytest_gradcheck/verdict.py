"""The one comparison and verdict path, shared by every backend (torch, NumPy, DDP).

A backend describes its check as a :class:`GradientProblem`: it can compute the
batch gradient and the weighted accumulation ``sum_i c_i * grad(loss_i)`` of
per-sample gradients (each sample run alone), in the working dtype and in
float64, as NumPy arrays. :func:`run_check` then compares, re-checks in float64
before calling a mismatch a bug, diagnoses the cause, and returns a
:class:`~pytest_gradcheck.report.GradEquivReport` or raises
:class:`~pytest_gradcheck.errors.GradEquivError`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Protocol, Sequence

from . import _tracking
from .errors import GradEquivError, InvalidArgument
from .report import Comparison, Finding, GradEquivReport, ParamComparison

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

__all__ = [
    "DEFAULT_RTOL",
    "FlatGrads",
    "GradientProblem",
    "default_tolerances",
    "compare_gradients",
    "run_check",
]

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

#: Per-sample gradient matrices larger than this many entries are not built
#: for the diagnosis (the weights a failing batch gradient uses are then not
#: inferred; the verdict is unaffected).
MAX_PER_SAMPLE_ENTRIES = 20_000_000


class GradientProblem(Protocol):
    """What a backend provides to :func:`run_check`.

    Gradients are returned as ``{parameter name: float64 ndarray}``.
    """

    backend: str
    batch_size: int
    dtype: str
    device: str
    reference_method: str
    fallback_reason: Optional[str]
    dropout_disabled: tuple[str, ...]
    broadcasts: tuple[Any, ...]

    def batch_gradient(self, float64: bool) -> dict[str, "np.ndarray"]: ...

    def reference_gradient(self, coeffs: "np.ndarray", float64: bool) -> dict[str, "np.ndarray"]: ...

    def per_sample_gradients(self, float64: bool) -> Optional[dict[str, "np.ndarray"]]: ...

    def weight_candidates(self) -> list[tuple[str, "np.ndarray"]]: ...

    def loss_values(self, float64: bool) -> Optional[tuple[float, "np.ndarray"]]:
        """The batch loss and the per-sample losses of the last evaluation, if known."""
        ...


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


class FlatGrads(dict):
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


class _Side:
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


class _Pair:
    """A batch gradient and a reference, compared under any scale ``k`` of the reference."""

    def __init__(
        self,
        batch: Mapping[str, "np.ndarray"],
        reference: Mapping[str, "np.ndarray"],
        batch_side: Optional["_Side"] = None,
    ) -> None:
        import numpy as np

        self.names = list(reference)
        self.b = batch_side if batch_side is not None and list(batch_side.g) == self.names else _Side(batch, self.names)
        self.r = _Side(reference, self.names)
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
    return _Pair(batch, reference).compare(1.0, rtol, atol, reduction, precision)


def _mark_rounding(f64: Comparison, working: Comparison, limit: float) -> Comparison:
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


def _label(hyp: str, weighted: bool) -> str:
    return f"weighted {hyp}" if weighted else hyp


def _references(
    s: Mapping[str, "np.ndarray"], coeffs: "np.ndarray", hyps: Sequence[str]
) -> dict[str, dict[str, "np.ndarray"]]:
    total = float(coeffs.sum())
    out: dict[str, dict[str, np.ndarray]] = {}
    for h in hyps:
        if h == "sum":
            out[h] = dict(s)
        else:
            out[h] = {n: v / total for n, v in s.items()}
    return out


def _raise_non_finite(side: "_Side", what: str) -> None:
    for name in side.g:
        if not side.finite(name):
            n_bad = side.non_finite(name)
            raise InvalidArgument(
                f"the {what} of parameter {name!r} has {n_bad} non-finite entr"
                f"{'y' if n_bad == 1 else 'ies'} (NaN or inf): gradients cannot be compared. "
                "Check the inputs and the loss for overflow, log(0) or division by zero."
            )


def _raise_reference_non_finite(side: "_Side") -> None:
    """A non-finite reference next to a finite batch gradient: the loss needs the whole batch."""
    for name in side.g:
        if not side.finite(name):
            n_bad = side.non_finite(name)
            raise InvalidArgument(
                f"the per-sample reference gradient of parameter {name!r} has {n_bad} non-finite entr"
                f"{'y' if n_bad == 1 else 'ies'} (NaN or inf) but the batch gradient is finite: the loss "
                "(or the model) depends on the whole batch, most likely through a statistic over the batch "
                "dimension (x.std(0), x.var(0), normalising by the batch), which is undefined for a batch of "
                "one (the std of one sample is NaN), so per-sample gradients do not exist. Compute the "
                "statistic per sample, or pass it in as a constant, to check the rest."
            )


def _flat(grads: Mapping[str, "np.ndarray"], names: Sequence[str]) -> "np.ndarray":
    import numpy as np

    return np.concatenate([np.asarray(grads[n], dtype=np.float64).ravel() for n in names])


def _close(x: float, target: float, rel: float = 1e-3) -> bool:
    return abs(x - target) <= rel * max(abs(target), 1e-12)


def diagnose(
    problem: GradientProblem,
    g: Mapping[str, "np.ndarray"],
    declared: Mapping[str, "np.ndarray"],
    coeffs: "np.ndarray",
    hyp: str,
    weighted: bool,
    rtol: float,
    atol: float,
    float64: bool,
) -> list[Finding]:
    """Explain why ``g`` is not ``declared`` (the reference under reduction ``hyp``).

    The explanations are tried from the most specific to the most general: a
    standard reduction off by the batch size, a weighting the problem can name
    (non-ignored targets, tokens), the plain reduction when declared weights are
    wrong, any single factor, a scale confined to some parameters, and last the
    weights the batch gradient gives each sample (which tell a reweighting from
    samples that interact).
    """
    import numpy as np

    # A recorded broadcast comes first, unless a scale factor or a named weighting
    # explains the mismatch on its own: then the broadcast is listed after it.
    broadcast = [Finding("broadcast", records=tuple(problem.broadcasts))] if problem.broadcasts else []
    findings: list[Finding] = list(broadcast)

    names = list(declared)
    precision = "float64" if float64 else problem.dtype
    pair = _Pair(g, declared)
    scale = pair.problem_scale(1.0)

    def matches(ref: Mapping[str, "np.ndarray"], label: str) -> bool:
        return compare_gradients(g, ref, rtol=rtol, atol=atol, reduction=label, precision=precision).passed

    # 1. a pure scale factor of the whole gradient (sum vs mean, a double division, a flipped sign)
    factor = _fit_factor(pair, names)
    factor_finding: Optional[Finding] = None
    if factor is not None and pair.compare(factor, rtol, atol, hyp, precision).passed:
        total = float(coeffs.sum())
        if hyp == "mean" and _close(factor, total):
            return [Finding("factor", factor=factor, matched=_label("sum", weighted)), *broadcast]
        if hyp == "sum" and _close(factor, 1.0 / total):
            return [Finding("factor", factor=factor, matched=_label("mean", weighted)), *broadcast]
        factor_finding = Finding("factor", factor=factor)

    # 2. a weighting we can name (e.g. by the number of non-ignored targets)
    for label, v in problem.weight_candidates():
        if v.shape != coeffs.shape or not np.all(np.isfinite(v)) or v.sum() <= 0:
            continue
        if np.allclose(v / v.sum(), coeffs / coeffs.sum()):
            continue
        s_v = problem.reference_gradient(v, float64)
        for h in ("mean", "sum"):
            if matches(_references(s_v, v, [h])[h], h):
                rel = v / v.mean() if h == "mean" else v
                known = Finding(
                    "known-weights", label=label, matched=f"{h} weighted by {label}",
                    weights=tuple(float(x) for x in rel), counts=_small_integers(v),
                )
                return [known, *broadcast]

    # 3. declared weights that the loss does not apply: the plain mean or sum matches
    if weighted:
        ones = np.ones_like(coeffs)
        s_1 = problem.reference_gradient(ones, float64)
        for h in ("mean", "sum"):
            if matches(_references(s_1, ones, [h])[h], h):
                return [Finding("unweighted", matched=h), *broadcast]

    # 4. any other single factor
    if factor_finding is not None:
        return [factor_finding, *broadcast]

    # 5. a scale confined to some parameters (a custom backward, a hand-written gradient)
    scales = _parameter_scales(pair, names, rtol, atol, hyp, precision, scale)
    if scales:
        findings.append(Finding("parameter-scale", scales=scales))
        return findings

    # 6. the weights the batch gradient gives each sample, if they can be identified
    gv, rv = _flat(g, names), _flat(declared, names)
    b = problem.batch_size
    n_entries = int(rv.size)
    if n_entries <= b:
        if not findings:
            if n_entries > 2:
                hint = f"re-run with at most {n_entries - 1} samples for a diagnosis."
            else:
                hint = "check a model with more parameters (or fewer samples) for a diagnosis."
            findings.append(
                Finding(
                    "unidentifiable",
                    label=(
                        f"the model has {n_entries} gradient entries for {b} samples, too few to "
                        f"tell how the batch gradient weights each sample; {hint}"
                    ),
                )
            )
        return findings
    if b * n_entries > MAX_PER_SAMPLE_ENTRIES:
        return findings
    per_sample = problem.per_sample_gradients(float64)
    if per_sample is None:
        return findings
    G = np.stack([_flat({n: per_sample[n][i] for n in names}, names) for i in range(b)])  # (B, P)
    w, _res, rank, _sv = np.linalg.lstsq(G.T, gv, rcond=None)
    fitted = G.T @ w
    offsets = np.cumsum([0] + [int(np.size(declared[n])) for n in names])
    fitted_g = {n: fitted[offsets[i] : offsets[i + 1]].reshape(np.shape(declared[n])) for i, n in enumerate(names)}
    in_span = compare_gradients(
        g, fitted_g, rtol=rtol * 10, atol=atol, reduction=hyp, precision=precision
    ).passed
    if not in_span:
        findings.append(Finding("not-combination"))
        return findings
    if rank < b:
        return findings  # in the span, but the weights are not unique: say nothing about them
    declared_c = coeffs / coeffs.sum() if hyp == "mean" else coeffs
    rel_w = w / declared_c
    kind = "weights" if np.all(rel_w > 0) else "coupled"
    if kind == "weights" and not _losses_reweighted(problem, w, float64, rtol):
        # The gradients recombine, but the loss values do not: with one output per
        # sample every loss change looks like a reweighting of the gradients, so
        # the losses decide. A real weighting (padding, sample weights) reweights
        # the per-sample losses the same way.
        kind = "coupled"
    counts = _small_integers(rel_w) if kind == "weights" else None
    findings.append(Finding(kind, weights=tuple(float(x) for x in rel_w), counts=counts))
    return findings


def _fit_factor(pair: "_Pair", names: Sequence[str]) -> Optional[float]:
    """The least-squares ``k`` in ``batch ~ k * reference`` over every parameter, if any."""
    rr = sum(pair.r.sq[n] for n in names)
    if not rr > 0:
        return None
    factor = sum(pair.dot[n] for n in names) / rr
    return factor if math.isfinite(factor) and factor != 0 else None


def _parameter_scales(
    pair: "_Pair", names: Sequence[str], rtol: float, atol: float, hyp: str, precision: str, scale: float
) -> tuple[tuple[str, float], ...]:
    """``(name, factor)`` for each mismatched parameter, when every one of them is a pure
    scale of its reference and every other parameter matches; otherwise ``()``."""
    base = pair.compare(1.0, rtol, atol, hyp, precision, scale)
    failing = [p.name for p in base.params if not p.passed]
    if not failing:
        return ()
    out = []
    for n in failing:
        rr = pair.r.sq[n]
        k = pair.dot[n] / rr if rr > 0 else float("nan")
        if not (math.isfinite(k) and k != 0):
            return ()
        sub = _Pair({n: pair.b.g[n]}, {n: pair.r.g[n]})
        if not sub.compare(k, rtol, atol, hyp, precision, scale).passed:
            return ()
        out.append((n, float(k)))
    # Any number is a scale of any other: a one-entry parameter is evidence of nothing. The
    # finding needs a parameter of several entries that is a pure scale, and a one-entry
    # parameter is named only with a factor that such a parameter shows too.
    evidence = [k for n, k in out if pair.r.g[n].size > 1]
    if not evidence:
        return ()
    for n, k in out:
        if pair.r.g[n].size == 1 and not any(_close(k, e) for e in evidence):
            return ()
    return tuple(out)


def _small_integers(values: "np.ndarray", limit: int = 1000) -> Optional[tuple[int, ...]]:
    """``values`` as the smallest proportional non-negative integers (at most ``limit``), if they are."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    if v.size < 2 or not np.all(np.isfinite(v)) or np.any(v < 0) or not np.any(v > 0):
        return None
    base = float(v[v > 0].min())
    for mult in range(1, 13):
        scaled = v / base * mult
        ints = np.rint(scaled)
        if np.all(np.abs(scaled - ints) <= 1e-3 * np.maximum(ints, 1.0)) and ints.max() <= limit:
            out = ints.astype(np.int64)
            gcd = int(np.gcd.reduce(out[out > 0]))
            return tuple(int(x) for x in out // max(gcd, 1))
    return None


def _losses_reweighted(problem: GradientProblem, w: "np.ndarray", float64: bool, rtol: float) -> bool:
    """Whether the batch loss is the same weighted combination of per-sample losses."""
    import numpy as np

    values = problem.loss_values(float64)
    if values is None:
        return True  # nothing to contradict the gradients with
    batch_loss, losses = values
    if losses.shape != w.shape:
        return True
    combined = float(np.dot(w, losses))
    scale = max(abs(batch_loss), float(np.abs(w * losses).sum()), 1e-30)
    return abs(batch_loss - combined) <= max(rtol * 100, 1e-6) * scale


def run_check(
    problem: GradientProblem,
    *,
    reduction: str = "mean",
    weights: Optional["np.ndarray"] = None,
    rtol: float | None = None,
    atol: float | None = None,
    float64_recheck: bool = True,
    check: str = "per-sample",
    notes: Sequence[str] = (),
) -> GradEquivReport:
    """Compare, re-check in float64, diagnose; return the report or raise ``GradEquivError``."""
    __tracebackhide__ = True
    import numpy as np

    b = problem.batch_size
    weighted = weights is not None
    coeffs = np.ones(b, dtype=np.float64) if weights is None else np.asarray(weights, dtype=np.float64)
    hyps = ["mean", "sum"] if reduction == "auto" else [reduction]

    # supplied gradients (per-sample checks) keep their dtype: the float64 re-check can only
    # make the reference exact, so their own dtype's tolerance holds there too
    fixed = getattr(problem, "fixed_batch_precision", False)

    def evaluate(float64: bool) -> tuple[dict, dict, dict[str, Comparison]]:
        precision = "float64" if float64 else problem.dtype
        r, a = default_tolerances(problem.dtype if fixed else precision, rtol, atol)
        g = problem.batch_gradient(float64)
        g_side = _Side(g, list(g))
        _raise_non_finite(g_side, "batch gradient")  # before the reference is computed
        s = problem.reference_gradient(coeffs, float64)
        pair = _Pair(g, s, batch_side=g_side)
        _raise_reference_non_finite(pair.r)  # the batch gradient is finite (checked above)
        total = float(coeffs.sum())
        # each hypothesis scales the one reference (1 for sum, 1/sum(c) for mean): no copies
        comps = {
            h: pair.compare(1.0 if h == "sum" else 1.0 / total, r, a, _label(h, weighted), precision)
            for h in hyps
        }
        return g, s, comps

    def first_pass(comps: Mapping[str, Comparison]) -> Optional[str]:
        return next((h for h in hyps if comps[h].passed), None)

    g, s, comps = evaluate(False)
    matched = first_pass(comps)
    confirm = getattr(problem, "confirm_deterministic", None)
    # randomness is refused as randomness, before any diagnosis; state the forward writes
    # (found only now, by value) means the comparison is run again from the saved state
    if matched is None and confirm is not None and confirm(g):
        g, s, comps = evaluate(False)
        matched = first_pass(comps)
    working = comps[matched or hyps[0]]
    f64: Optional[Comparison] = None
    f64_error: Optional[str] = None
    used_f64 = problem.dtype == "float64"
    vacuous = working.scale == 0.0  # every gradient exactly zero: nothing to compare
    if matched is None and float64_recheck and problem.dtype != "float64":
        try:
            g64, s64, comps64 = evaluate(True)
        except InvalidArgument:
            raise
        except Exception as exc:  # the re-check is best effort: say why it could not run
            f64_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        else:
            limit = rounding_shrink_limit(problem.dtype)
            comps64 = {h: _mark_rounding(comps64[h], comps[h], limit) for h in hyps}
            matched = first_pass(comps64)
            f64 = comps64[matched or hyps[0]]
            g, s, used_f64 = g64, s64, True
            # every gradient shrank like rounding: the model's gradients are all zero
            vacuous = f64.scale <= limit * comps[matched or hyps[0]].scale
    report = GradEquivReport(
        passed=matched is not None,
        check=check,
        backend=problem.backend,
        batch_size=b,
        dtype=problem.dtype,
        device=problem.device,
        reduction=reduction,
        weighted=weighted,
        matched=_label(matched, weighted) if matched else None,
        working=working,
        float64=f64,
        rounding=matched is not None and f64 is not None,
        float64_error=f64_error,
        reference_method=problem.reference_method,
        fallback_reason=problem.fallback_reason,
        dropout_disabled=tuple(problem.dropout_disabled),
        broadcasts=tuple(problem.broadcasts),
        broadcast_scope=getattr(problem, "broadcast_scope", "the loss"),
        notes=[*notes, *filter(None, [getattr(problem, "random_note", None)])],
        weights=tuple(float(x) for x in coeffs) if weighted else None,
        vacuous=vacuous and matched is not None,
    )
    _tracking.record(report)  # the plugin counts every check, pass or fail
    if report.passed:
        return report
    final = report.final
    declared = _references(s, coeffs, hyps[:1])[hyps[0]]
    own = getattr(problem, "diagnose_mismatch", None)  # a check with its own unit of comparison (per-sample rows)
    if own is not None:
        findings = own(g, declared, final.rtol, final.atol, final.precision)
    else:
        findings = diagnose(problem, g, declared, coeffs, hyps[0], weighted, final.rtol, final.atol, used_f64)
    report.findings = tuple(findings)
    report.would_match = next(
        (
            f"{f.matched} (unweighted)" if f.kind == "unweighted" else f.matched
            for f in report.findings
            if f.kind in ("factor", "known-weights", "unweighted") and f.matched
        ),
        None,
    )
    raise GradEquivError(report)
