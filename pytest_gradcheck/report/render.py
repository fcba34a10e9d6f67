"""The words of a gradient-equivalence report: one renderer, the cause decided before the words.

``render(report)`` reads like ``torch.testing.assert_close``: a one-line verdict, a
small table per parameter, the cause, then what to do. Pure Python.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

from . import Comparison, Finding, GradEquivReport, ddp
from .format import close_to, columns, fmt_counts, fmt_factor, fmt_number, fmt_ratio, fmt_shape, fmt_weights

__all__ = ["render", "headline", "cause_headline"]


def _what(report: GradEquivReport) -> str:
    unit = {
        "per-sample": "per-sample gradients",
        "grad-sample": "the per-sample gradients run alone",
        "accumulation": "micro-batch gradients",
        "ddp": "the single-process gradient",
        "fsdp": "the single-process gradient",
    }.get(report.check, "per-sample gradients")
    return unit


def _units(report: GradEquivReport) -> tuple[str, str]:
    """(plural noun, count symbol) of what is accumulated: samples/B or micro-batches/k."""
    return ("micro-batches", "k") if report.check == "accumulation" else ("samples", "B")


def _unit(report: GradEquivReport) -> str:
    """The singular of what is accumulated: sample or micro-batch."""
    return "micro-batch" if report.check == "accumulation" else "sample"


def _declared(report: GradEquivReport) -> str:
    if report.reduction == "auto":
        return "the mean or the sum"
    word = report.reduction
    if report.weighted:
        word = f"the weighted {word}"
    else:
        word = f"the {word}"
    return word


def headline(report: GradEquivReport) -> str:
    what = _what(report)
    if report.check == "grad-sample":
        if report.passed:
            line = "Per-sample gradients are equivalent: every supplied row equals that sample's gradient, run alone"
            return line + (" (the differences are rounding: they vanish in float64)." if report.rounding else ".")
        final = report.final
        bad = [f.label for f in report.findings if f.kind == "grad-sample"]
        return (
            f"Per-sample gradients are NOT equivalent: {len(final.failing)} of {len(final.params)} "
            f"(parameter, sample) rows differ from each sample's gradient run alone"
            + (f", in {', '.join(str(b) for b in bad[:6])}" if bad else "")
            + "."
        )
    if report.check in ddp.CHECKS:
        return ddp.headline(report)
    if report.passed and report.vacuous:
        return "Gradients are equivalent, but every gradient is zero (or rounding noise): the check could see nothing."
    if report.passed:
        line = f"Gradients are equivalent: the batch gradient equals the {report.matched} of {what}"
        if report.rounding:
            line += f" (the {report.dtype} differences are rounding: they vanish in float64)"
        return line + "."
    final = report.final
    n_fail, n = len(final.failing), len(final.params)
    survives = ""
    if report.float64 is not None:
        survives = "; the mismatch survives a float64 re-check, so it is a bug, not rounding"
    return (
        f"Gradients are NOT equivalent: the batch gradient is not {_declared(report)} of "
        f"{what} ({n_fail} of {n} parameter{'s' if n != 1 else ''} differ{survives})."
    )


def _broadcast_call(rec: object) -> str:
    """``sub((8, 1), (8,)) -> (8, 8)``: the op and its shapes, without the prose."""
    shapes = getattr(rec, "shapes", None)
    if shapes is None:
        return str(rec)
    args = ", ".join(fmt_shape(s) for s in shapes)
    return f"{getattr(rec, 'op', '?')}({args}) -> {fmt_shape(getattr(rec, 'result', ()))}"


def _first_broadcast(f: Finding, report: GradEquivReport) -> str:
    recs = f.records
    if not recs:
        return f"implicit broadcast in {report.broadcast_scope}"
    rec = recs[0]
    loc = rec.location() if hasattr(rec, "location") else "?"
    line = f"implicit broadcast in {report.broadcast_scope} at {loc}: {_broadcast_call(rec)}"
    if getattr(rec, "suggestion", None):
        line += f"; {rec.suggestion}"
    if len(recs) > 1:
        line += f" (and {len(recs) - 1} more)"
    return line


def _first_factor(f: Finding, report: GradEquivReport) -> str:
    b = report.batch_size
    _, sym = _units(report)
    factor = f.factor if f.factor is not None else float("nan")
    what = _what(report)
    declared = f"(declared: {report.reduction}{', weighted' if report.weighted else ''})"
    if f.matched is not None and f.matched.endswith("sum") and report.reduction in ("mean", "auto"):
        return f"the batch gradient is the SUM of {what}, {fmt_factor(factor)} times their mean {declared}"
    if f.matched is not None and f.matched.endswith("mean") and report.reduction == "sum":
        return f"the batch gradient is the MEAN of {what}, 1/{b} of their sum {declared}"
    if abs(factor + 1) < 1e-3:
        return f"the batch gradient has the opposite sign of {_declared(report)} of {what} (factor -1)"
    if b and abs(factor * b - 1) < 1e-3:
        return f"the batch gradient is 1/{sym} of {_declared(report)} of {what} ({sym}={b}): divided by {sym} once too often"
    return f"the batch gradient is {fmt_factor(factor)} times {_declared(report)} of {what}; only the scale is off"


def _first_parameter_scales(f: Finding, report: GradEquivReport) -> str:
    groups: dict[str, list[str]] = {}
    for name, factor in f.scales:
        groups.setdefault(_name_factor(factor, report), []).append(name)
    parts = [f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} {words}" for words, names in groups.items()]
    rest = len(report.final.params) - len(f.scales)
    return "; ".join(parts) + ("; every other parameter matches" if rest > 0 else "")


def cause_headline(report: GradEquivReport) -> str:
    """The first line of a failure: what is wrong and where, one wording per cause (``report.cause``)."""
    what, declared = _what(report), _declared(report)
    final = report.final
    n_fail, n = len(final.failing), len(final.params)
    if report.check in ddp.CHECKS:
        causes = ddp.cause_lines(report)
        if causes:  # the cause, without its fix (the detail below says what to change)
            return causes[0].split("; ")[0].rstrip(".")
        return f"the {ddp.wrapper_of(report.check).name} gradient differs from the single-process full-batch gradient"
    f = report.findings[0] if report.findings else None
    kind = f.kind if f is not None else None
    if f is None:
        return (
            f"the batch gradient is not {declared} of {what} ({n_fail} of {n} parameter{'s' if n != 1 else ''} differ)"
        )
    if kind == "broadcast":
        return _first_broadcast(f, report)
    if kind == "factor":
        return _first_factor(f, report)
    if kind == "parameter-scale":
        return _first_parameter_scales(f, report)
    if kind == "known-weights":
        return f"the batch gradient weights the {_units(report)[0]} by {f.label}, not {declared} of {what}"
    if kind == "weights":
        how = "in proportion to a count per " + _unit(report) if f.counts else "unequally"
        return f"the batch gradient weights the {_units(report)[0]} {how}, not {declared} of {what}"
    if kind == "unweighted":
        return f"the loss ignores the declared weights: the batch gradient is the plain {f.matched} of {what}"
    if kind == "coupled":
        return (
            "the loss couples samples: no weighting of per-sample losses gives the batch loss "
            f"({n_fail} of {n} parameter{'s' if n != 1 else ''} differ)"
        )
    if kind == "not-combination":
        return f"samples interact: the batch gradient is no weighted combination of {what}"
    if kind == "sample-mixing":
        return (f.label or "a module mixes samples").split(": ")[0].rstrip(".")
    if kind == "grad-sample":
        more = sum(g.kind == "grad-sample" for g in report.findings) - 1
        line = "per-sample gradient rows of " + _explain_grad_sample(f, report).rstrip(".")
        return line + (f" (and {more} more parameter{'s' if more != 1 else ''})" if more > 0 else "")
    return f"the batch gradient is not {declared} of {what}: too few gradient entries to tell why"


def _context_line(report: GradEquivReport) -> str:
    method = {
        "vmap": "each sample run alone, via torch.func.vmap",
        "loop": "each sample run alone, in a loop",
        "per-sample calls": "each sample run alone",
        "micro-batches": "micro-batches run one by one",
        "ddp": "one process on the whole batch",
    }.get(report.reference_method, report.reference_method)
    if report.chunk_size:
        method += f", in chunks of {report.chunk_size} samples (chunk_size={report.chunk_size})"
    unit = "micro-batches" if report.check == "accumulation" else "batch"
    size = f"{unit} of {report.batch_size}" if unit == "batch" else f"{report.batch_size} {unit}"
    bits = [size, report.dtype, report.device, f"reference: {method}"]
    line = " · ".join(b for b in bits if b)
    if not report.passed and report.check != "grad-sample":
        line += f"\nReduction checked: {report.reduction}" + (" (weighted)" if report.weighted else "")
        line += f" · would have matched: {report.would_match or 'neither mean nor sum'}"
    return line


def _table(cmp: Comparison, only_failing_first: bool = True, limit: int = 12) -> list[str]:
    params = list(cmp.params)
    if only_failing_first:
        params.sort(key=lambda p: (p.passed, -p.rel_err))
    shown = params[:limit]
    header = ("parameter", "shape", "max abs err", "rel err", "allowed", "cosine", "ratio", "")
    rows = [header]
    for p in shown:
        rows.append(
            (
                p.name,
                fmt_shape(p.shape),
                fmt_number(p.max_abs_err),
                fmt_number(p.rel_err),
                fmt_number(p.allowed),
                "—" if math.isnan(p.cosine) else f"{p.cosine:.4f}",
                fmt_ratio(p.ratio),
                "rounding" if p.rounding else ("ok" if p.passed else "MISMATCH"),
            )
        )
    lines = columns(rows)
    if len(params) > limit:
        hidden = params[limit:]
        n_bad = sum(not p.passed for p in hidden)
        lines.append(f"  ... {len(hidden)} more parameter(s), {n_bad} of them mismatched")
    return lines


def _explain_factor(f: Finding, report: GradEquivReport) -> list[str]:
    b = report.batch_size
    _, sym = _units(report)
    factor = f.factor if f.factor is not None else float("nan")
    what = _what(report)
    if f.matched == "sum" and report.reduction in ("mean", "auto"):
        return [
            f"the batch gradient is the SUM of {what}, not their mean: "
            f"{fmt_factor(factor)} times too large ({sym}={b} times the mean)."
        ]
    if f.matched == "mean" and report.reduction == "sum":
        return [f"the batch gradient is the MEAN of {what}, not their sum: {sym}={b} times too small (factor 1/{b})."]
    if abs(factor + 1) < 1e-3:
        return [f"the batch gradient has the opposite sign of {_declared(report)} of {what} (factor -1)."]
    rel_b = factor / b if b else float("nan")
    extra = ""
    if b and abs(factor * b - 1) < 1e-3:
        extra = f" (1/{sym}: the loss is divided by {sym} once more than {_declared(report)} needs)"
    elif b and abs(rel_b - b) < 1e-3 * b:
        extra = f" ({sym}² = {b}²: summed where a mean was meant, and once more)"
    return [
        f"the batch gradient is {fmt_factor(factor)} times {_declared(report)} of {what}{extra}; "
        f"the directions agree, only the scale is off."
    ]


def _name_factor(factor: float, report: GradEquivReport) -> str:
    """A factor in words: 'B times the reference (B=8)', '1/B of the reference (B=8)', ..."""
    b = report.batch_size
    _, sym = _units(report)
    if b > 1 and close_to(factor, b):
        return f"{sym} times the reference ({sym}={b})"
    if b > 1 and close_to(factor, 1.0 / b):
        return f"1/{sym} of the reference ({sym}={b})"
    if close_to(factor, -1.0):
        return "the reference with the opposite sign"
    if abs(factor) < 1 and close_to(1.0 / factor, round(1.0 / factor)):
        return f"1/{fmt_factor(round(1.0 / factor))} of the reference"
    return f"{fmt_factor(factor)} times the reference"


def _explain_parameter_scales(f: Finding, report: GradEquivReport, n_params: int) -> str:
    groups: dict[str, list[str]] = {}
    for name, factor in f.scales:
        groups.setdefault(_name_factor(factor, report), []).append(name)
    parts = [f"{', '.join(names)}: {words}" for words, names in groups.items()]
    rest = n_params - len(f.scales)
    tail = "; every other parameter matches." if rest > 0 else "."
    return "the mismatch is confined to some parameters, each off by a pure scale: " + "; ".join(parts) + tail


def _samples(indices: Sequence[int], b: int) -> str:
    if len(indices) == b:
        return f"in all {b} samples"
    shown = ", ".join(str(i) for i in indices[:10]) + (", ..." if len(indices) > 10 else "")
    return f"in sample{'s' if len(indices) != 1 else ''} {shown} of {b}"


def _explain_grad_sample(f: Finding, report: GradEquivReport) -> str:
    where = _samples(f.counts or (), report.batch_size)
    if f.factor is not None:
        return f"{f.label}: {_name_factor(f.factor, report)}, {where}."
    if f.matched == "sum":
        return (
            f"{f.label}: every differing row holds the SUM of the batch's per-sample gradients ({where}): the "
            "grad sampler sums over the batch dimension it must keep."
        )
    if f.matched == "mean":
        return (
            f"{f.label}: every differing row holds the MEAN of the batch's per-sample gradients ({where}): the "
            "grad sampler averages over the batch dimension it must keep."
        )
    return f"{f.label}: the rows differ {where}, and no single factor explains them."


def _cause_lines(report: GradEquivReport) -> list[str]:
    if report.check in ddp.CHECKS:
        return ddp.cause_lines(report)
    lines: list[str] = []
    for f in report.findings:
        if f.kind == "broadcast":
            for rec in f.records[:3]:
                loc = rec.location() if hasattr(rec, "location") else "?"
                lines.append(f"implicit broadcast in {report.broadcast_scope} at {loc}:")
                lines.append(f"    {rec.describe() if hasattr(rec, 'describe') else rec}")
                if getattr(rec, "code", None):
                    lines.append(f"    > {rec.code}")
                if getattr(rec, "suggestion", None):
                    lines.append(f"    {rec.suggestion}")
            if any(getattr(rec, "loss_inputs", True) for rec in f.records):
                lines.append(
                    "    Predictions and targets of different shapes were broadcast against each other, so "
                    "every prediction is compared with every target: each sample's loss involves the "
                    "whole batch. It is harmless at batch size 1, which is why it hides."
                )
            else:
                lines.append(
                    "    The broadcast pairs every sample with the others of the batch, so each sample's "
                    "loss involves the whole batch. It is harmless at batch size 1, which is why it hides."
                )
        elif f.kind == "sample-mixing":
            lines.append(f"{f.label}")
        elif f.kind == "factor":
            lines.extend(_explain_factor(f, report))
        elif f.kind == "known-weights":
            shown = fmt_counts(f.counts) if f.counts else (fmt_weights(f.weights) if f.weights else "")
            lines.append(
                f"the batch gradient matches when {_units(report)[0]} are weighted by {f.label}"
                + (f": {shown}" if shown else "")
                + "."
            )
        elif f.kind == "weights":
            if f.counts:
                lines.append(
                    f"the batch gradient weights the {_units(report)[0]} in proportion to "
                    f"{fmt_counts(f.counts)}: a count per {_unit(report)} (tokens, valid "
                    "targets, pixels)? Relative to a plain mean = 1 the weights are "
                    f"{fmt_weights(f.weights or ())}."
                )
            else:
                lines.append(
                    f"the batch gradient is a weighted combination of {_what(report)}, with "
                    f"unequal weights (relative to a plain mean = 1): {fmt_weights(f.weights or ())}."
                )
        elif f.kind == "unweighted":
            lines.append(
                f"the batch gradient is the plain (unweighted) {f.matched} of {_what(report)}: the "
                "loss does not apply the declared weights"
                + (f" {fmt_weights(report.weights)}" if report.weights else "")
                + "."
            )
        elif f.kind == "parameter-scale":
            lines.append(_explain_parameter_scales(f, report, len(report.final.params)))
        elif f.kind == "grad-sample":
            lines.append(_explain_grad_sample(f, report))
        elif f.kind == "coupled":
            lines.append(
                "the loss couples samples: no fixed weighting of per-sample losses gives the batch "
                "loss (the per-sample gradients recombine into the batch gradient only with weights "
                f"{fmt_weights(f.weights or ())}, relative to a plain mean = 1, that do not reproduce "
                "the batch loss), e.g. each prediction is compared with other samples' targets."
            )
        elif f.kind == "not-combination":
            lines.append(
                "the batch gradient is not any weighted combination of per-sample gradients: "
                "something in the model or the loss lets samples interact (a layer that mixes the "
                "batch, a reshape/view across the batch dimension, a broadcast that pairs samples)."
            )
        elif f.kind == "unidentifiable":
            lines.append(f"{f.label}")
    return lines


def _advice_lines(report: GradEquivReport) -> list[str]:
    if report.check in ddp.CHECKS:
        return ddp.advice_lines(report)
    kinds = {f.kind for f in report.findings}
    out: list[str] = []
    if "broadcast" in kinds:
        records = [r for f in report.findings if f.kind == "broadcast" for r in f.records]
        if any(getattr(r, "loss_inputs", True) for r in records):
            out.append(
                "give predictions and targets the same shape before the loss (see the suggestion above), "
                "or, if pairing every sample with every other is intended (contrastive, ranking), wrap "
                "that term in pytest_gradcheck.allow_broadcast()."
            )
        else:
            out.append(
                "line up the operands' batch dimensions; if pairing every sample with every other is "
                "intended (contrastive, ranking, in-batch negatives), samples interact by design and the "
                "per-sample check does not apply to that term."
            )
    for f in report.findings:
        if f.kind == "factor" and f.matched == "sum" and report.reduction != "sum":
            if report.backend == "numpy":
                out.append(
                    "divide the accumulated gradient by the batch size (np.mean over the batch "
                    'axis instead of np.sum), or declare reduction="sum" if summing is intended.'
                )
            else:
                out.append(
                    "use a mean-reduced loss (divide by the batch size), or declare "
                    'reduction="sum" if a summed loss is intended.'
                )
        elif f.kind == "factor" and f.matched == "mean" and report.reduction == "sum":
            out.append('declare reduction="mean" if the mean is intended, or sum the loss over the batch.')
        elif f.kind == "factor":
            out.append(
                "find where the loss (or the gradient) is scaled: the check expects "
                f"{_declared(report)} of {_what(report)}."
            )
        elif f.kind in ("known-weights", "weights"):
            out.append(
                "if that weighting is intended (token-level losses with padding, sample weights), "
                f"declare it with weights=...; otherwise make all {_units(report)[0]} count equally."
            )
        elif f.kind == "parameter-scale":
            names = ", ".join(n for n, _ in f.scales)
            if report.backend == "numpy":
                out.append(
                    f"look at how grad_fn computes the gradient of {names}: a division by the batch "
                    "size applied twice, or a sum where a mean is meant; the other gradients show "
                    "the loss itself is right."
                )
            else:
                out.append(
                    f"look at what computes the gradient of {names} alone: a custom "
                    "torch.autograd.Function's backward, a gradient hook (register_hook, "
                    "register_full_backward_hook) or a .grad edit that rescales it; the other "
                    "parameters show the loss itself is right."
                )
        elif f.kind == "grad-sample" and not any("grad sampler" in a for a in out):
            out.append(
                "look at the grad sampler (or the per-sample computation) of the parameters named above: "
                "row i must be the gradient of sample i's loss alone, with the parameter's shape; opacus "
                "grad samplers get the backprops already scaled for the loss reduction."
            )
        elif f.kind == "unweighted":
            out.append(
                f"if the plain {f.matched} is intended, drop weights=...; otherwise make the loss "
                "apply the weights (e.g. reduction='none', multiply by the weights, then reduce)."
            )
        elif f.kind == "not-combination" and report.check in ("per-sample", "step"):
            out.append(
                "run pytest_gradcheck.assert_batch_independent(model, inputs) to find which "
                "samples' outputs depend on each other."
            )
    if report.float64_error:
        out.append(
            "the float64 re-check could not run, so rounding cannot be ruled out; if these "
            "differences are rounding, pass a larger rtol."
        )
    return out


def _compared_with(report: GradEquivReport) -> str:
    if report.check == "grad-sample":
        return "each sample's gradient run alone, row by row,"
    return _declared(report) if not report.passed else f"the {report.matched}"


def render(report: GradEquivReport) -> str:
    """Render ``report`` as text (the ``GradEquivError`` message, ``str(report)``)."""
    lines = [headline(report)] if report.passed else [cause_headline(report), headline(report)]
    if report.example:  # the shrunk example (fuzz) right below the first line
        lines[1:1] = ["", report.example, ""]
    lines += ["", _context_line(report)]
    w = report.working
    lines.append(
        f"Compared with {_compared_with(report)} "
        f"in {w.precision} (rtol={w.rtol:g}, atol={w.atol:g}; a parameter matches when "
        "max|batch - reference| <= atol + rtol * max(max|gradient|, 1e-3 * largest gradient of "
        "any parameter)):"
    )
    lines.append("")
    lines.extend(_table(w))
    if report.float64 is not None:
        f64 = report.float64
        lines.append("")
        shrunk = [p.name for p in f64.params if p.rounding]
        if f64.passed and shrunk:
            lines.append(
                f"float64 re-check: the differences shrink in float64 as rounding error does (by "
                f"orders of magnitude; a bug's error would not shrink), also for {', '.join(shrunk[:6])}"
                f"{', ...' if len(shrunk) > 6 else ''}: they were {report.dtype} rounding, not a bug."
            )
        elif f64.passed:
            lines.append(
                f"float64 re-check: the differences vanish (max rel err {fmt_number(f64.max_rel_err)}, "
                f"rtol={f64.rtol:g}): they were {report.dtype} rounding, not a bug."
            )
        elif {p.name for p in f64.failing} == {p.name for p in w.failing}:  # the same table: one line
            lines.append(
                f"float64 re-check: the mismatch survives in float64 with the same errors "
                f"(rtol={f64.rtol:g}): a bug, not rounding."
            )
        else:
            lines.append(
                f"float64 re-check: the mismatch survives in float64 (rtol={f64.rtol:g}), so it is a bug, not rounding:"
            )
            lines.append("")
            lines.extend(_table(f64))
    elif report.float64_error:
        lines.append("")
        lines.append(f"float64 re-check could not run: {report.float64_error}")
    causes = _cause_lines(report)
    if causes:
        lines.append("")
        lines.append("Cause: " + causes[0])
        lines.extend("  " + c if not c.startswith("    ") else c for c in causes[1:])
    advice = _advice_lines(report)
    if advice and not report.passed:
        lines.append("")
        lines.append("What to do: " + advice[0])
        lines.extend("  " + a for a in advice[1:])
    loop = _accumulation_advice(report) if report.check == "accumulation" and not report.passed else None
    notes = list(report.notes)
    if report.vacuous:
        notes.append(
            "every gradient is zero (or rounding noise that vanishes in float64): the loss does not "
            "depend on the parameters for this batch, so the check could see nothing. Check a "
            "batch and a loss that train the model."
        )
    if report.dropout_disabled:
        notes.append(
            "dropout was switched off during the check (random masks differ between the batch "
            f"and per-sample runs): {', '.join(report.dropout_disabled)}."
        )
    if report.fallback_reason:
        notes.append(
            "the reference was computed with a per-sample loop because torch.func.vmap could not "
            f"run the model: {report.fallback_reason}"
        )
    if report.broadcasts and report.passed:
        notes.append(
            f"implicit broadcast in {report.broadcast_scope} (gradients agree anyway): "
            + "; ".join(r.message() if hasattr(r, "message") else str(r) for r in report.broadcasts[:3])
        )
    if notes:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  - {n}" for n in notes)
    if loop:  # how to write the accumulation loop, last: it is the fix
        lines.append("")
        lines.append(loop)
    return "\n".join(lines)


def _accumulation_advice(report: GradEquivReport) -> Optional[str]:
    """How to write the accumulation loop so that it gives the full-batch gradient."""
    for f in report.findings:
        if f.kind == "known-weights" and f.label:
            what = f.label.removeprefix("their ")
            if f.label.startswith("equal weights"):
                return (
                    "Accumulation: the full-batch gradient here is the plain mean of micro-batch "
                    "losses: divide each micro-batch's loss by the number of micro-batches before "
                    ".backward(), and declare weights=[1] * k."
                )
            return (
                f"Accumulation: to reproduce the full-batch gradient, scale micro-batch k's loss by "
                f"w_k / sum(w) before .backward(), with w_k = its {what}; dividing every loss by the "
                "number of micro-batches (a plain mean of micro-batch means) is only right when all "
                "micro-batches weigh the same. Declare that weighting with weights=... to make this "
                "check pass."
            )
        if f.kind == "factor" and f.matched and f.matched.endswith("sum"):
            return (
                f"Accumulation: with k={report.batch_size} micro-batches the full-batch gradient is "
                'their sum: do not divide the micro-batch losses by k (or declare reduction="sum").'
            )
    return None
