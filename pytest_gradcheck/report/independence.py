"""The report of a batch-independence check: its figures, and the one renderer that words them.

Filled by :func:`pytest_gradcheck.assert_batch_independent`; ``str(report)`` renders it.
Pure Python: importing it imports neither torch nor numpy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .format import fmt_number

__all__ = [
    "Leak",
    "AloneMismatch",
    "BatchIndependenceReport",
    "render",
    "cause_headline",
    "headline",
    "CAUSE_POOL",
    "CAUSE_VIEW",
    "CAUSE_MASK",
    "CAUSE_BATCH_SIZE",
]

#: leaking outputs (and batch-of-one mismatches) listed one per line before "... more"
_MAX_PAIR_LINES = 20

# Cause keys, in the order the renderer explains them.
# Cause keys, in the order the renderer explains them.
CAUSE_POOL = "pool"


CAUSE_VIEW = "view"


CAUSE_MASK = "mask"


CAUSE_BATCH_SIZE = "batch-size"


@dataclass(frozen=True)
class Leak:
    """One leaking pair: the output of ``output_sample`` depends on ``input_sample``.

    ``evidence`` is ``"gradient"`` (a non-zero row of ``d out[i] / d input``;
    ``strength`` is its norm relative to the sample's own row, ``inf`` when the
    own row is zero) or ``"perturbation"`` (changing the other sample's input
    changed this output; ``strength`` is the largest change relative to the
    output's largest magnitude).
    """

    output_sample: int
    input_sample: int
    input: str
    evidence: str
    strength: float

    def sentence(self) -> str:
        """``"output of sample 0 depends on input of sample 2"``."""
        return f"output of sample {self.output_sample} depends on input of sample {self.input_sample}"


@dataclass(frozen=True)
class AloneMismatch:
    """Sample ``sample`` gives a different output alone (a batch of one) than in the batch."""

    sample: int
    max_abs_err: float
    rel_err: float
    allowed: float
    output: str
    survives_float64: Optional[bool] = None  # None: the float64 re-check could not run
    shape: Optional[tuple[tuple[int, ...], tuple[int, ...]]] = None  # (in batch, alone) if they differ


@dataclass
class BatchIndependenceReport:
    """What :func:`assert_batch_independent` measured. ``str(report)`` renders it.

    >>> import torch
    >>> from pytest_gradcheck import assert_batch_independent
    >>> report = assert_batch_independent(torch.nn.Linear(3, 2), torch.randn(4, 3))
    >>> report.passed, report.checked, report.leaks
    (True, (0, 1, 2, 3), ())
    """

    passed: bool
    batch_size: int
    dtype: str
    device: str
    checked: tuple[int, ...]
    subset: bool  # True when ``checked`` is a seeded random subset (max_samples)
    seed: int
    methods: tuple[tuple[str, str], ...]  # (input name, "gradient" | "perturbation")
    rtol: float
    atol: float
    leaks: tuple[Leak, ...] = ()
    alone: tuple[AloneMismatch, ...] = ()
    alone_checked: bool = True
    causes: tuple[str, ...] = ()
    not_own: tuple[int, ...] = ()  # outputs that depend on other samples but not on their own input
    incomplete_pairs: bool = False  # the pair search ran out of budget
    rounding: bool = False  # a batch-of-one difference vanished in float64
    dropout_disabled: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    check: str = "independence"
    reference_method: str = "batch of one"

    @property
    def leaking_samples(self) -> tuple[int, ...]:
        """The checked samples whose output depends on another sample (or differs alone)."""
        return tuple(sorted({lk.output_sample for lk in self.leaks} | {a.sample for a in self.alone}))

    @property
    def pairs(self) -> tuple[tuple[int, int], ...]:
        """``(output sample, input sample)`` of every leak, without duplicates, sorted."""
        return tuple(sorted({(lk.output_sample, lk.input_sample) for lk in self.leaks}))

    @property
    def cause(self) -> Optional[str]:
        """Why the check failed, as a stable key: the likely cause (``pool``, ``view``, ``mask``,
        ``batch-size``), ``coupling`` when none stands out; ``None`` for a pass."""
        if self.passed:
            return None
        return self.causes[0] if self.causes else "coupling"

    @property
    def location(self) -> Optional[str]:
        """``path:line`` behind a failure: not known for this check (the leak is in the model)."""
        return None

    def summary(self) -> str:
        """The first line of the report: the verdict of a pass, the cause of a failure."""
        return headline(self) if self.passed else cause_headline(self)

    def __str__(self) -> str:
        return render(self)


_CAUSE_TEXT = {
    CAUSE_POOL: (
        "a layer that normalises or pools over the batch axis (statistics over dim 0 such as "
        "x.mean(0) or softmax(dim=0), hand-written batch normalisation), or attention along the "
        "batch axis (nn.MultiheadAttention / nn.TransformerEncoderLayer without batch_first=True fed "
        "(batch, seq, feature) tensors, so each position attends across samples)"
    ),
    CAUSE_VIEW: (
        "a view/reshape across the batch dimension: x.view(T, B, -1) or x.reshape(...) where "
        "x.permute(1, 0, 2) or x.transpose(0, 1) was meant regroups memory, so rows of one sample "
        "end up in another"
    ),
    CAUSE_MASK: (
        "a mask, index or length built along the batch axis (e.g. (ids == pad).any(0), "
        "mask.sum(0) instead of mask.sum(1), padding trimmed to the longest sequence of the batch): "
        "such paths carry no gradient, only changing the other samples' inputs shows them"
    ),
    CAUSE_BATCH_SIZE: (
        "the output depends on the batch itself rather than on another sample's values: the batch "
        "size is used inside forward (x.shape[0], len(x)), or a layer computes differently for a "
        "batch of one"
    ),
}


_SHORT_CAUSE = {
    CAUSE_POOL: "a layer that pools, normalises or attends over the batch axis",
    CAUSE_VIEW: "a view/reshape across the batch dimension",
    CAUSE_MASK: "a mask or index built along the batch axis",
    CAUSE_BATCH_SIZE: "the batch size used inside forward",
}


_ADVICE_TEXT = {
    CAUSE_POOL: (
        "normalise each sample alone (LayerNorm/GroupNorm instead of statistics over dim 0) and pass "
        "batch_first=True to attention/recurrent layers that receive (batch, seq, feature) tensors"
    ),
    CAUSE_VIEW: (
        "reorder axes with .permute()/.transpose() (then .reshape()); .view()/.reshape() alone only "
        "regroups memory and moves data between samples"
    ),
    CAUSE_MASK: "build masks per sample, from each sample's own inputs (reduce over dim=1, not dim=0)",
    CAUSE_BATCH_SIZE: "do not use the batch size inside forward; make every op act on one sample at a time",
}


def _fmt_samples(samples: Sequence[int], limit: int = 12) -> str:
    shown = ", ".join(str(s) for s in samples[:limit])
    return shown + (f", ... ({len(samples)} in all)" if len(samples) > limit else "")


def headline(report: BatchIndependenceReport) -> str:
    n, b = len(report.checked), report.batch_size
    scope = f"{n} of {b} samples checked" + (f", drawn with seed={report.seed}" if report.subset else "")
    if report.passed:
        line = f"Samples are independent: no output depends on another sample's input ({scope})"
        if report.rounding:
            line += f"; the {report.dtype} differences of a batch of one are rounding (they vanish in float64)"
        return line + "."
    if report.leaks:
        leaking = {lk.output_sample for lk in report.leaks}
        return (
            f"Samples are NOT independent: the output of {len(leaking)} of {n} checked sample"
            f"{'s' if n != 1 else ''} depends on other samples' inputs "
            f"({len(report.pairs)} leaking pair{'s' if len(report.pairs) != 1 else ''})."
        )
    return (
        f"Samples are NOT independent: {len(report.alone)} of {n} checked sample{'s' if n != 1 else ''} "
        "give a different output alone (a batch of one) than in the batch."
    )


def cause_headline(report: BatchIndependenceReport) -> str:
    """The first line of a failure: which samples leak into which, and the likely cause."""
    if report.leaks:
        first = min(report.leaks, key=lambda lk: (lk.output_sample, lk.input_sample))
        more = len(report.pairs) - 1
        what = first.sentence() + (f" (and {more} more pair{'s' if more != 1 else ''})" if more > 0 else "")
    else:
        bad = _fmt_samples([a.sample for a in report.alone], limit=6)
        what = f"sample{'s' if len(report.alone) != 1 else ''} {bad} give a different output alone than in the batch"
    if report.causes:
        return f"{what}: likely {_SHORT_CAUSE[report.causes[0]]}"
    return what


def _evidence(lk: Leak) -> str:
    if lk.evidence == "gradient":
        rel = "" if math.isinf(lk.strength) else f", {lk.strength:.3g} x the sample's own row"
        return f"gradient w.r.t. {lk.input}[{lk.input_sample}] is non-zero{rel}"
    if math.isnan(lk.strength):
        return "changing all other samples together changes it"
    return f"changing {lk.input}[{lk.input_sample}] changes it by rel {fmt_number(lk.strength)}"


def render(report: BatchIndependenceReport) -> str:
    """Render ``report`` as text (the ``BatchLeakError`` message, ``str(report)``)."""
    top = [headline(report)] if report.passed else [cause_headline(report), headline(report)]
    lines = [*top, "", *_context_lines(report)]
    for section in (_pair_lines(report), _alone_lines(report), _cause_lines(report), _note_lines(report)):
        if section:
            lines.append("")
            lines.extend(section)
    return "\n".join(lines)


def _context_lines(report: BatchIndependenceReport) -> list[str]:
    methods: dict[str, list[str]] = {}
    for name, how in report.methods:
        methods.setdefault(how, []).append(name)
    how_text = "; ".join(f"{how}: {', '.join(names)}" for how, names in methods.items()) or "none"
    checked = "all" if len(report.checked) == report.batch_size else _fmt_samples(report.checked)
    return [
        f"batch of {report.batch_size} · {report.dtype} · {report.device} · outputs checked: {checked}"
        f" · tests: {how_text}" + ("; batch of one" if report.alone_checked else ""),
        f"Tolerance (perturbation, batch of one): rtol={report.rtol:g}, atol={report.atol:g}; "
        "gradient rows of other samples must be exactly 0.",
    ]


def _pair_lines(report: BatchIndependenceReport) -> list[str]:
    if not report.leaks:
        return []
    by_output: dict[int, dict[int, Leak]] = {}
    for lk in report.leaks:
        row = by_output.setdefault(lk.output_sample, {})
        prev = row.get(lk.input_sample)
        if prev is None or (prev.evidence != "gradient" and lk.evidence == "gradient"):
            row[lk.input_sample] = lk
    lines = [f"Leaking pairs ({len(report.pairs)}):"]
    outputs = sorted(by_output)
    for i in outputs[:_MAX_PAIR_LINES]:
        row = by_output[i]
        js = sorted(row)
        first = row[js[0]]
        also = ""
        if len(js) > 1:
            also = f"; also on sample{'s' if len(js) > 2 else ''} {_fmt_samples(js[1:])}"
        lines.append(f"  {first.sentence()}{also}  ({_evidence(first)})")
    if len(outputs) > _MAX_PAIR_LINES:
        lines.append(f"  ... {len(outputs) - _MAX_PAIR_LINES} more leaking outputs")
    if report.incomplete_pairs:
        lines.append(
            "  (not every pair could be named one by one: the search budget ran out or the leak "
            "only shows when several samples change)"
        )
    return lines


def _alone_lines(report: BatchIndependenceReport) -> list[str]:
    if report.alone and report.leaks:
        worst = max(a.rel_err for a in report.alone)
        return [
            f"Run alone (a batch of one), sample{'s' if len(report.alone) != 1 else ''} "
            f"{_fmt_samples([a.sample for a in report.alone])} give a different output than in the "
            f"batch too (max rel err {fmt_number(worst)})."
        ]
    if report.alone:
        lines = ["Run alone (a batch of one) instead of in the batch:"]
        for a in report.alone[:_MAX_PAIR_LINES]:
            if a.shape is not None:
                lines.append(
                    f"  sample {a.sample}: {a.output} has shape {a.shape[0]} in the batch but {a.shape[1]} alone"
                )
                continue
            f64 = {True: "; survives float64", False: "", None: "; float64 re-check could not run"}[a.survives_float64]
            lines.append(
                f"  sample {a.sample}: {a.output} differs (max abs err {fmt_number(a.max_abs_err)}, rel err "
                f"{fmt_number(a.rel_err)}, allowed {fmt_number(a.allowed)}{f64})"
            )
        if len(report.alone) > _MAX_PAIR_LINES:
            lines.append(f"  ... {len(report.alone) - _MAX_PAIR_LINES} more samples")
        return lines
    if report.leaks and report.alone_checked:
        return [
            "Run alone (a batch of one), every checked sample gives the output it has in this batch: "
            "the leak shows only when the other samples change."
        ]
    return []


def _cause_lines(report: BatchIndependenceReport) -> list[str]:
    if report.passed or not report.causes:
        return []
    lines = ["Cause: likely " + _CAUSE_TEXT[report.causes[0]] + "."]
    if report.not_own:
        many = len(report.not_own) != 1
        lines.append(
            f"  The output of sample{'s' if many else ''} {_fmt_samples(report.not_own)} "
            f"{'do' if many else 'does'} not depend on {'their' if many else 'its'} own input at "
            "all: the rows came from other samples."
        )
    if len(report.causes) > 1:
        lines.append("  Less likely: " + "; ".join(_SHORT_CAUSE[c] for c in report.causes[1:]) + ".")
    lines.append("")
    lines.append("What to do: " + _ADVICE_TEXT[report.causes[0]] + ".")
    lines.append(
        "  To find the layer, check the model's prefixes (e.g. assert_batch_independent(model[:k], "
        "inputs)): the first that fails mixes samples."
    )
    return lines


def _note_lines(report: BatchIndependenceReport) -> list[str]:
    notes = list(report.notes)
    if report.dropout_disabled:
        notes.append(f"dropout was switched off during the check: {', '.join(report.dropout_disabled)}.")
    if report.subset:
        notes.append(
            f"the batch has {report.batch_size} samples: {len(report.checked)} outputs were drawn at random "
            f"(seed={report.seed}; raise max_samples to check more), each against every other sample."
        )
    return ["Notes:", *(f"  - {n}" for n in notes)] if notes else []
