"""Why a batch gradient is not the declared accumulation: the cause, as figures (Findings).

Tried from the most specific explanation to the most general: a standard reduction
off by the batch size, a weighting the problem can name, the plain reduction when
declared weights are not applied, any single factor, a scale confined to some
parameters, and last the weights the batch gradient gives each unit.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

from .report import Finding

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from .verdict import GradientProblem

from .compare import Pair, compare_gradients, host64

#: the label value losses ignore by default (``F.cross_entropy``'s ``ignore_index``), used to name
#: token-count weightings by every backend
IGNORE_INDEX = -100

#: Per-sample gradient matrices larger than this many entries are not built
#: for the diagnosis (the weights a failing batch gradient uses are then not
#: inferred; the verdict is unaffected).
MAX_PER_SAMPLE_ENTRIES = 20_000_000


def reduction_label(hyp: str, weighted: bool) -> str:
    return f"weighted {hyp}" if weighted else hyp


def references(
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


def flat(grads: Mapping[str, Any], names: Sequence[str]) -> "np.ndarray":
    """The gradients of ``names`` as one float64 vector on the host (a diagnosis only)."""
    import numpy as np

    return np.concatenate([host64(grads[n]).ravel() for n in names])


def close(x: float, target: float, rel: float = 1e-3) -> bool:
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
    pair = Pair(g, declared)
    scale = pair.problem_scale(1.0)

    def matches(ref: Mapping[str, "np.ndarray"], label: str) -> bool:
        return compare_gradients(g, ref, rtol=rtol, atol=atol, reduction=label, precision=precision).passed

    # 1. a pure scale factor of the whole gradient (sum vs mean, a double division, a flipped sign)
    factor = _fit_factor(pair, names)
    factor_finding: Optional[Finding] = None
    if factor is not None and pair.compare(factor, rtol, atol, hyp, precision).passed:
        total = float(coeffs.sum())
        if hyp == "mean" and close(factor, total):
            return [Finding("factor", factor=factor, matched=reduction_label("sum", weighted)), *broadcast]
        if hyp == "sum" and close(factor, 1.0 / total):
            return [Finding("factor", factor=factor, matched=reduction_label("mean", weighted)), *broadcast]
        factor_finding = Finding("factor", factor=factor)

    # 2. a weighting we can name (e.g. by the number of non-ignored targets)
    for label, v in problem.weight_candidates():
        if v.shape != coeffs.shape or not np.all(np.isfinite(v)) or v.sum() <= 0:
            continue
        if np.allclose(v / v.sum(), coeffs / coeffs.sum()):
            continue
        s_v = problem.reference_gradient(v, float64)
        for h in ("mean", "sum"):
            if matches(references(s_v, v, [h])[h], h):
                rel = v / v.mean() if h == "mean" else v
                known = Finding(
                    "known-weights",
                    label=label,
                    matched=f"{h} weighted by {label}",
                    weights=tuple(float(x) for x in rel),
                    counts=_small_integers(v),
                )
                return [known, *broadcast]

    # 3. declared weights that the loss does not apply: the plain mean or sum matches
    if weighted:
        ones = np.ones_like(coeffs)
        s_1 = problem.reference_gradient(ones, float64)
        for h in ("mean", "sum"):
            if matches(references(s_1, ones, [h])[h], h):
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
    gv, rv = flat(g, names), flat(declared, names)
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
    G = np.stack([flat({n: per_sample[n][i] for n in names}, names) for i in range(b)])  # (B, P)
    w, _res, rank, _sv = np.linalg.lstsq(G.T, gv, rcond=None)
    fitted = G.T @ w
    offsets = np.cumsum([0] + [math.prod(pair.shapes[n]) for n in names])
    fitted_g = {n: fitted[offsets[i] : offsets[i + 1]].reshape(pair.shapes[n]) for i, n in enumerate(names)}
    in_span = compare_gradients(g, fitted_g, rtol=rtol * 10, atol=atol, reduction=hyp, precision=precision).passed
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


def _fit_factor(pair: "Pair", names: Sequence[str]) -> Optional[float]:
    """The least-squares ``k`` in ``batch ~ k * reference`` over every parameter, if any."""
    rr = sum(pair.r.sq[n] for n in names)
    if not rr > 0:
        return None
    factor = sum(pair.dot[n] for n in names) / rr
    return factor if math.isfinite(factor) and factor != 0 else None


def _parameter_scales(
    pair: "Pair", names: Sequence[str], rtol: float, atol: float, hyp: str, precision: str, scale: float
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
        sub = Pair({n: pair.b.g[n]}, {n: pair.r.g[n]})
        if not sub.compare(k, rtol, atol, hyp, precision, scale).passed:
            return ()
        out.append((n, float(k)))
    # Any number is a scale of any other: a one-entry parameter is evidence of nothing. The
    # finding needs a parameter of several entries that is a pure scale, and a one-entry
    # parameter is named only with a factor that such a parameter shows too.
    evidence = [k for n, k in out if math.prod(pair.shapes[n]) > 1]
    if not evidence:
        return ()
    for n, k in out:
        if math.prod(pair.shapes[n]) == 1 and not any(close(k, e) for e in evidence):
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
