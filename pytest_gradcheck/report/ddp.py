"""The figures and the words of a data-parallel report (:func:`~pytest_gradcheck.assert_ddp_equiv`,
:func:`~pytest_gradcheck.assert_fsdp_equiv`).

The data-parallel diagnosis (:mod:`pytest_gradcheck.ddp.problem`) records each
cause it confirmed as a :class:`~pytest_gradcheck.report.Finding` subclass
holding the figures (ranks, shard sizes, sample indices, parameter names, a
factor, token counts), and the run itself as a :class:`DDPRun`; this module
turns them into sentences. The general renderer
(:mod:`pytest_gradcheck.report.render`) hands the cause and advice lines of
every report whose ``check`` is in :data:`CHECKS` (``"ddp"``, ``"fsdp"``) to
:func:`cause_lines` and :func:`advice_lines`; the sentences name the wrapper of
the report's check (:data:`WRAPPERS`: DDP's all-reduce and ``no_sync()``, FSDP's
reduce-scatter and ``set_requires_gradient_sync(False)``).

A cause that is a plain scale keeps the shared ``"factor"`` kind, and one that
reweights samples the shared ``"known-weights"`` kind, so that the verdict reads
their ``matched`` (what the DDP gradient would have matched) as for every other
check; the causes only DDP has get ``"ddp-..."`` kinds.

Pure Python: importing it imports neither torch nor numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from . import Finding, GradEquivReport
from .format import close_to, fmt_and, fmt_factor, fmt_indices

__all__ = [
    "CHECKS",
    "WRAPPERS",
    "BatchNormPerRank",
    "DDPRun",
    "InitDiffers",
    "MicroBatchWeighting",
    "NotRankAverage",
    "OwnCountPerRank",
    "RankAverage",
    "RanksDisagree",
    "RankSpread",
    "RerunFailed",
    "SamplerPadding",
    "ScaledGradient",
    "ShardCoverage",
    "ShardSizeWeighting",
    "UnusedParameters",
    "Wrapper",
    "advice_lines",
    "cause_lines",
    "headline",
    "run_notes",
    "scale_cause",
    "wrapper_of",
]

#: How each shard plan is named in the report.
SHARD_SOURCES = {
    "contiguous": "contiguous split",
    "explicit": "explicit shards",
    "sampler": "DistributedSampler(shuffle=False, drop_last=False)",
}


@dataclass(frozen=True)
class Wrapper:
    """How a data-parallel wrapper is named: its name, its gradient collective, its sync switch."""

    name: str  # "DDP"
    collective: str  # "all-reduce"
    sync_off: str  # "no_sync()"
    accumulated: str  # how the micro-batches before the last are run: "under no_sync()"


#: the wrapper of each data-parallel check (a report's ``check``)
WRAPPERS: dict[str, Wrapper] = {
    "ddp": Wrapper("DDP", "all-reduce", "no_sync()", "under no_sync()"),
    "fsdp": Wrapper(
        "FSDP",
        "reduce-scatter",
        "set_requires_gradient_sync(False)",
        "with set_requires_gradient_sync(False)",
    ),
}
#: the checks whose reports this module words
CHECKS = tuple(WRAPPERS)


def wrapper_of(check: str) -> Wrapper:
    """The wrapper of a data-parallel check (DDP's for an unknown one).

    >>> wrapper_of("fsdp").name, wrapper_of("ddp").sync_off
    ('FSDP', 'no_sync()')
    """
    return WRAPPERS.get(check, WRAPPERS["ddp"])


# --------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class RankSpread:
    """The largest difference between a rank's gradient and rank 0's, after the all-reduce."""

    rank: int
    parameter: str
    max_abs_diff: float


@dataclass(frozen=True)
class RanksDisagree(Finding):
    """The ranks end the step with different gradients (``spread``: the largest difference)."""

    kind: str = "ddp-ranks-disagree"
    spread: Optional[RankSpread] = None


@dataclass(frozen=True)
class InitDiffers(Finding):
    """The ranks built different initial parameters and the wrapper does not broadcast rank 0's
    (``fully_shard`` keeps each rank's own shard): ``ranks`` differ from rank 0."""

    kind: str = "ddp-init-differs"
    ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class UnusedParameters(Finding):
    """Parameters with no gradient in the step, and ``find_unused_parameters`` was off."""

    kind: str = "ddp-unused-parameters"
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class BatchNormPerRank(Finding):
    """BatchNorm modules in train mode: ``(path, class name)`` each."""

    kind: str = "ddp-batchnorm"
    modules: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class ShardCoverage(Finding):
    """Explicit shards that do not hold each sample once: samples on no rank, on several ranks."""

    kind: str = "ddp-shard-coverage"
    unseen: tuple[int, ...] = ()
    repeated: tuple[int, ...] = ()


@dataclass(frozen=True)
class ScaledGradient(Finding):
    """The data-parallel gradient is ``factor`` times the full-batch gradient.

    ``cause`` (see :func:`scale_cause`): ``"no-sync-sum"`` (the micro-batch gradients
    summed, ``1/k`` missing), ``"sum-over-ranks"`` (a summed loss that the wrapper averages
    over the ranks, ``1/world_size``), ``"both"`` (``k/world_size``), ``"sign"`` (-1), or
    ``"scale"`` (any other factor).
    """

    kind: str = "factor"
    world_size: int = 1
    micro_batches: int = 1
    cause: str = "scale"

    def __post_init__(self) -> None:
        if self.matched is None:
            object.__setattr__(self, "matched", _scaled_label(self))


@dataclass(frozen=True)
class ShardSizeWeighting(Finding):
    """Each rank's mean, averaged over ranks of different ``sizes``: ``weights`` per sample
    (relative to a plain mean = 1)."""

    kind: str = "known-weights"
    matched: Optional[str] = "the shard-size-weighted mean (each rank's mean weighted 1/world_size)"
    sizes: tuple[int, ...] = ()
    world_size: int = 1
    batch_size: int = 0


@dataclass(frozen=True)
class SamplerPadding(Finding):
    """``DistributedSampler`` repeated the samples ``repeated`` to even out the shards:
    ``counts`` says how often each sample is in the step (``padded`` in all)."""

    kind: str = "known-weights"
    matched: Optional[str] = "the mean over the padded shards (repeated samples counted twice)"
    repeated: tuple[int, ...] = ()
    world_size: int = 1
    batch_size: int = 0
    padded: int = 0


@dataclass(frozen=True)
class MicroBatchWeighting(Finding):
    """Micro-batches of different sizes, each loss normalised by its own size: ``sizes`` per
    rank, ``weights`` per sample (relative to a plain mean = 1)."""

    kind: str = "known-weights"
    matched: Optional[str] = "the micro-batch-size-weighted mean"
    sizes: tuple[tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class OwnCountPerRank(Finding):
    """Each rank (``level="rank"``) or each micro-batch (``level="micro-batch"``) divided its loss
    by its own total of the declared weights (its token count) instead of the total over all ranks.

    ``totals``: per rank, the declared weight of each micro-batch (one entry per rank when
    ``level="rank"``); ``integral``: the weights are whole numbers (counts: "tokens");
    ``weights``: each sample's weight relative to the declared weighting (1 everywhere when right).
    """

    kind: str = "known-weights"
    matched: Optional[str] = "each rank's loss divided by its own token count"
    level: str = "rank"
    totals: tuple[tuple[float, ...], ...] = ()
    integral: bool = True
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.level == "micro-batch" and self.matched == OwnCountPerRank.matched:
            what = "token count" if self.integral else "total weight"
            object.__setattr__(self, "matched", f"each micro-batch's loss divided by its own {what}")
        elif not self.integral and self.matched == OwnCountPerRank.matched:
            object.__setattr__(self, "matched", "each rank's loss divided by its own total weight")


@dataclass(frozen=True)
class RankAverage(Finding):
    """The data-parallel gradient is the average of the ranks' own steps, which is not the
    full-batch gradient."""

    kind: str = "ddp-rank-average"


@dataclass(frozen=True)
class NotRankAverage(Finding):
    """The data-parallel gradient is not even the average of the ranks' own steps (re-run one at a time)."""

    kind: str = "ddp-not-rank-average"


@dataclass(frozen=True)
class RerunFailed(Finding):
    """The ranks' steps could not be re-run in this process for a diagnosis (``error``)."""

    kind: str = "ddp-rerun-failed"
    error: str = ""


@dataclass(frozen=True)
class DDPRun:
    """The figures of one data-parallel run that the report's notes state, failed or passed.

    ``shard_source``: ``"contiguous"``, ``"explicit"`` or ``"sampler"``;
    ``inferred_reduction``: the reduction ``reduction="auto"`` found, if it ran;
    ``init_differs``: the ranks whose ``make_model()`` built other parameters than
    rank 0's; ``spread``: a difference between the ranks within tolerance;
    ``check``: ``"ddp"`` or ``"fsdp"`` (the wrapper); ``units``: the submodules
    ``fully_shard`` wrapped before the root; ``mixed_precision``: the
    ``MixedPrecisionPolicy`` arguments (``(name, dtype)``); ``precision``: the
    lowest precision of the step (a reduce dtype below the parameters') and its
    ``rtol``, when it is not the parameters' dtype; ``rank_weights``: per rank, the
    declared weights in its shard (``weights_integral``: whole numbers, i.e. counts).
    """

    world_size: int
    backend: str
    shards: tuple[tuple[int, ...], ...]
    shard_source: str
    micro_batches: int
    batch_size: int
    inferred_reduction: Optional[str] = None
    repeated: tuple[int, ...] = ()
    init_differs: tuple[int, ...] = ()
    reference_from_rank0: bool = False
    no_gradient: tuple[str, ...] = ()
    dropout: tuple[str, ...] = ()
    spread: Optional[RankSpread] = None
    check: str = "ddp"
    units: tuple[str, ...] = ()
    mixed_precision: tuple[tuple[str, str], ...] = ()
    precision: Optional[tuple[str, float]] = None
    rank_weights: tuple[float, ...] = ()
    weights_integral: bool = False

    @property
    def shard_sizes(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.shards)


def scale_cause(factor: float, world_size: int, micro_batches: int) -> str:
    """Which known cause a scale ``factor`` of the data-parallel gradient points to (see :class:`ScaledGradient`).

    >>> scale_cause(2.0, 2, 2), scale_cause(0.5, 2, 1), scale_cause(3.0, 2, 1)
    ('no-sync-sum', 'sum-over-ranks', 'scale')
    """
    w, k = world_size, micro_batches
    if k > 1 and close_to(factor, k):
        return "no-sync-sum"
    if w > 1 and close_to(factor, 1.0 / w):
        return "sum-over-ranks"
    if w > 1 and k > 1 and close_to(factor, k / w):
        return "both"
    if close_to(factor, -1.0):
        return "sign"
    return "scale"


# --------------------------------------------------------------------------- words


def _scaled_label(f: ScaledGradient) -> str:
    w, k = f.world_size, f.micro_batches
    factor = {"no-sync-sum": f"{k}", "sum-over-ranks": f"1/{w}", "both": f"{k}/{w}", "sign": "-1"}.get(
        f.cause, fmt_factor(f.factor if f.factor is not None else float("nan"))
    )
    return f"{factor} × the full-batch gradient"


def _spread(s: Optional[RankSpread]) -> str:
    if s is None:
        return "the ranks' gradients differ"
    return f"rank {s.rank}'s gradient of {s.parameter!r} differs from rank 0's (max abs diff {s.max_abs_diff:.2e})"


def _names(names: Sequence[str], limit: int = 6) -> str:
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _plural(n: int, word: str = "s") -> str:
    return word if n != 1 else ""


def _number(x: float) -> str:
    return fmt_factor(x)


def _ranks_disagree(f: RanksDisagree, w: Wrapper) -> str:
    return (
        f"ranks disagree with each other: after {w.name}'s {w.collective} every rank must hold the same "
        f"gradient, but {_spread(f.spread)}. The model or the step is rank-dependent or non-deterministic, or "
        f"some gradients are not synchronised (a parameter {w.name} ignores, {w.sync_off} around the last "
        "backward, gradients changed after backward()). The table shows, per parameter, the "
        "rank farthest from the reference."
    )


def _init_differs(f: InitDiffers, w: Wrapper) -> str:
    n = len(f.ranks)
    return (
        f"ranks disagree on the model: rank{_plural(n)} {fmt_and(f.ranks)} built other initial parameters than "
        "rank 0 (make_model() is not deterministic across ranks after torch.manual_seed(0), e.g. it seeds by "
        f"rank); {w.name} does not broadcast rank 0's parameters, it shards each rank's own, so the sharded "
        "model mixes different initialisations and its gradient is no single model's. Build the model the "
        "same way in every rank (the same seed, or one state dict loaded everywhere, e.g. "
        "set_model_state_dict(..., options=StateDictOptions(broadcast_from_rank0=True)))."
    )


def _unused(f: UnusedParameters, w: Wrapper) -> str:
    return (
        f"parameters {_names(f.names)} get no gradient "
        f"in the step, and {w.name} was not told: with find_unused_parameters=False the gradient "
        "bucket that holds them is never all-reduced, so the ranks keep their own gradients. "
        "Pass ddp_options={'find_unused_parameters': True}, or remove the unused parameters."
    )


def _batchnorm(f: BatchNormPerRank, w: Wrapper) -> str:
    modules = [f"{path} ({cls})" for path, cls in f.modules]
    return (
        "BatchNorm normalises per rank; use SyncBatchNorm: "
        f"{fmt_and(modules)} {'is' if len(modules) == 1 else 'are'} in train mode, so "
        "each rank normalises its shard with that shard's own mean and variance instead of the "
        f"whole batch's, and the {w.name} gradient is not the full-batch one. Convert the model with "
        "torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) (CUDA), or check in eval mode, or "
        "use GroupNorm/LayerNorm, which normalise each sample alone."
    )


def _coverage(f: ShardCoverage, w: Wrapper) -> str:
    bits = []
    if f.unseen:
        bits.append(f"samples {fmt_indices(f.unseen)} are on no rank")
    if f.repeated:
        bits.append(f"samples {fmt_indices(f.repeated)} are on more than one rank")
    return (
        "the shards do not hold each sample once: "
        + "; ".join(bits)
        + ", while the full-batch reference counts every sample once."
    )


def _scaled(f: ScaledGradient, w: Wrapper) -> str:
    ws, k = f.world_size, f.micro_batches
    factor = fmt_factor(f.factor if f.factor is not None else float("nan"))
    if f.cause == "no-sync-sum":
        return (
            f"{w.sync_off} accumulation over {k} micro-batches sums their gradients: the {w.name} gradient is "
            f"{factor} times the full-batch gradient (the 1/{k} is missing); divide each micro-batch loss "
            f"by {k} (loss / micro_batches) before backward(), or normalise by the global sample count."
        )
    if f.cause == "sum-over-ranks":
        return (
            f"{w.name} averages the ranks' gradients (it divides by world_size={ws}), but the loss is a sum "
            f"over each rank's shard: the {w.name} gradient is 1/{ws} of the full-batch gradient. Multiply "
            "the loss by world_size (dist.get_world_size()), or use a mean normalised by the global count."
        )
    if f.cause == "both":
        return (
            f"the {w.name} gradient is {factor} times the full-batch gradient: the {k} micro-batch gradients are "
            f"summed (1/{k} missing) and {w.name} averages over world_size={ws} ranks a loss that is a sum "
            "over the shard."
        )
    if f.cause == "sign":
        return f"the {w.name} gradient has the opposite sign of the full-batch gradient (factor -1)."
    return (
        f"the {w.name} gradient is {factor} times the full-batch gradient (world_size={ws}, "
        f"micro_batches={k}): the directions agree, only the scale is off; find where the loss "
        "or the gradients are scaled."
    )


def _sampler(f: SamplerPadding, w: Wrapper) -> str:
    return (
        f"DistributedSampler repeated samples {fmt_indices(f.repeated)} to even out the shards "
        f"({f.batch_size} samples over {f.world_size} ranks are padded to {f.padded}): each "
        f"repeated sample counts twice in the {w.name} gradient. Use a batch size divisible by "
        "world_size, drop_last=True, or mask the padded samples out of the loss."
    )


def _shard_sizes(f: ShardSizeWeighting, w: Wrapper) -> str:
    ws, b = f.world_size, f.batch_size
    per = ", ".join(f"1/{ws * n} on a rank with {n}" for n in sorted(set(f.sizes), reverse=True))
    return (
        f"ranks weight samples by 1/shard size: with shards of {fmt_and(f.sizes)} samples the {w.name} "
        f"gradient is a shard-size-weighted mean ({w.name} averages the ranks' means, so a sample "
        f"counts {per} instead of 1/{b}); divide by the global count instead: "
        f"loss = sum over the shard / {b} (the global batch size) * {ws} (world_size, "
        f"because {w.name} averages the ranks' gradients)."
    )


def _micro_batches(f: MicroBatchWeighting, w: Wrapper) -> str:
    sizes = "; ".join(f"rank {r}: {'+'.join(str(n) for n in micro)}" for r, micro in enumerate(f.sizes))
    return (
        f"the micro-batches of a rank have different sizes ({sizes}) and each "
        "micro-batch loss is normalised by its own size: samples in smaller micro-batches count "
        "more. Normalise every micro-batch loss by the global sample count instead."
    )


def _own_count(f: OwnCountPerRank, w: Wrapper) -> str:
    count, unit = ("token count", "tokens") if f.integral else ("total weight", "weight")
    ws = f.world_size
    if f.level == "micro-batch":
        per = ", ".join(f"rank {r}: {'+'.join(_number(t) for t in totals)}" for r, totals in enumerate(f.totals))
        return (
            f"each micro-batch divided its loss by its own {count} ({per} {unit}); divide every micro-batch's loss by "
            f"the {count} over all micro-batches and ranks instead (sum it over the micro-batches, all-reduce it "
            f"over the ranks, and multiply by world_size={ws} because {w.name} averages the ranks' gradients): "
            f"as it is, a {unit[:-1] if f.integral else 'unit of weight'} in a small micro-batch counts more."
        )
    rank_totals = [sum(t) for t in f.totals]
    total = sum(rank_totals)
    ranks = f"rank{_plural(len(rank_totals))}: {fmt_and([_number(t) for t in rank_totals])} {unit}"
    if f.integral:
        per = ", ".join(f"1/{_number(ws * t)} on rank {r}" for r, t in enumerate(rank_totals))
        weigh = f"a token counts {per} instead of 1/{_number(total)}"
    else:
        weigh = f"each rank's weighted mean counts 1/{ws} whatever its total weight"
    return (
        f"each rank divided its loss by its own {count} ({ranks}); divide by the {count} over all ranks "
        f"(all-reduce it) instead. {w.name} averages the ranks' gradients, so {weigh}: "
        f"loss = sum over the rank's {unit} / all-reduced {count} * {ws} (world_size)."
    )


def _rank_average(f: RankAverage, w: Wrapper) -> str:
    return (
        f"the {w.name} gradient is the average of what the ranks' own losses give, but that is not "
        "the full-batch gradient: the loss is normalised per rank (or per micro-batch) in a way "
        "that does not add up to the full-batch loss."
    )


def _not_rank_average(f: NotRankAverage, w: Wrapper) -> str:
    return (
        f"the {w.name} gradient is not the average of the ranks' own gradients (each rank's step re-run "
        f"alone in one process): the step behaves differently under {w.name}, e.g. collectives or "
        "rank-dependent code in the model or the loss, randomness outside nn.Dropout, or hooks "
        "that change gradients."
    )


def _rerun_failed(f: RerunFailed, w: Wrapper) -> str:
    return f"(the ranks' steps could not be re-run one at a time for a diagnosis: {f.error})"


#: the sentence of each data-parallel cause
_SENTENCES: dict[type[Finding], Callable[[Any, Wrapper], str]] = {
    RanksDisagree: _ranks_disagree,
    InitDiffers: _init_differs,
    UnusedParameters: _unused,
    BatchNormPerRank: _batchnorm,
    ShardCoverage: _coverage,
    ScaledGradient: _scaled,
    SamplerPadding: _sampler,
    ShardSizeWeighting: _shard_sizes,
    MicroBatchWeighting: _micro_batches,
    OwnCountPerRank: _own_count,
    RankAverage: _rank_average,
    NotRankAverage: _not_rank_average,
    RerunFailed: _rerun_failed,
}


def _cause(f: Finding, w: Wrapper) -> Optional[str]:
    say = _SENTENCES.get(type(f))
    return say(f, w) if say is not None else f.label


def headline(report: GradEquivReport) -> str:
    """The verdict line of a data-parallel report."""
    name = wrapper_of(report.check).name
    reference = f"single-process {'weighted ' if report.weighted else ''}full-batch gradient"
    if report.passed:
        return f"Gradients are equivalent: the {name} gradient equals the {reference}."
    return f"Gradients are NOT equivalent: the {name} gradient differs from the {reference}."


def cause_lines(report: GradEquivReport) -> list[str]:
    """The causes of a failed data-parallel check, one sentence each (each says what to change)."""
    w = wrapper_of(report.check)
    return [line for line in (_cause(f, w) for f in report.findings) if line]


def advice_lines(report: GradEquivReport) -> list[str]:
    """What to do beyond the causes (each data-parallel cause sentence carries its own fix)."""
    if report.float64_error:
        return [
            "the float64 re-check could not run, so rounding cannot be ruled out; if these "
            "differences are rounding, pass a larger rtol."
        ]
    return []


def describe_run(run: DDPRun) -> str:
    """The run in one sentence: ranks, backend, the sharded modules, shards, micro-batches."""
    wrapper = wrapper_of(run.check)
    sizes = run.shard_sizes
    w = run.world_size
    text = f"{wrapper.name} step on {w} rank{_plural(w)} ({run.backend}), "
    if run.check == "fsdp":
        units = [f"model.{u}" for u in run.units[:6]] + (["..."] if len(run.units) > 6 else [])
        text += f"fully_shard on {fmt_and([*units, 'the root'])}, "
    text += (
        f"shards of {fmt_and(sizes)} sample{'s' if sizes != (1,) else ''} "
        f"({SHARD_SOURCES.get(run.shard_source, run.shard_source)}"
    )
    shown = "; ".join(fmt_indices(s) for s in run.shards[:4])
    if len(run.shards) > 4:
        shown += "; ..."
    text += f": {shown})"
    if run.micro_batches > 1:
        text += (
            f", {run.micro_batches} micro-batches per rank accumulated {wrapper.accumulated} "
            "(the last one synchronised), each loss back-propagated as is"
        )
    return text + "."


def run_notes(run: DDPRun) -> list[str]:
    """The notes of a data-parallel report, passed or failed."""
    wrapper = wrapper_of(run.check)
    out = []
    if run.inferred_reduction is not None:
        out.append(
            f"the loss is a {run.inferred_reduction} over the batch (inferred: doubling the batch "
            + ("leaves it unchanged)." if run.inferred_reduction == "mean" else "doubles it).")
        )
    out.append(describe_run(run))
    if run.mixed_precision:
        policy = ", ".join(f"{k}=torch.{v}" for k, v in run.mixed_precision)
        line = f"mixed precision: MixedPrecisionPolicy({policy})"
        reduce = dict(run.mixed_precision).get("reduce_dtype")
        if reduce is not None:
            line += f"; the gradient reduction ran in {reduce}"
        if run.precision is not None:
            dtype, rtol = run.precision
            line += f", so the comparison uses {dtype}'s tolerance (rtol={rtol:g})"
        out.append(line + "; the float64 re-check runs the step without the policy.")
    if run.rank_weights:
        unit = "tokens" if run.weights_integral else "weight"
        out.append(
            f"the reference weights each sample by its declared weight ({_number(sum(run.rank_weights))} "
            f"{unit} in all; per rank: {fmt_and([_number(t) for t in run.rank_weights])})."
        )
    if run.repeated:
        out.append(
            f"DistributedSampler repeated samples {fmt_indices(run.repeated)} to even out the shards "
            f"({run.batch_size} samples padded to {sum(run.shard_sizes)})."
        )
    if run.init_differs and run.check == "ddp":
        n = len(run.init_differs)
        out.append(
            f"the ranks built different initial parameters (rank{_plural(n)} {fmt_and(run.init_differs)} "
            f"differ{'s' if n == 1 else ''} from rank 0 after torch.manual_seed(0); make_model() is not "
            "deterministic): DDP broadcast rank 0's at construction."
        )
    if run.reference_from_rank0:
        out.append(
            "make_model() built different initial parameters here than in rank 0; the reference "
            f"starts from rank 0's, which {'DDP broadcast to every rank' if run.check == 'ddp' else 'every rank built'}."
        )
    if run.no_gradient:
        out.append(f"parameters with no gradient after the step (counted as zero): {_names(run.no_gradient)}")
    if run.dropout:
        out.append(
            "dropout was switched off in every rank and in the reference (random masks differ "
            f"between processes): {', '.join(run.dropout)}."
        )
    if run.spread is not None:
        out.append(
            f"the ranks' gradients are not bitwise identical after the {wrapper.collective}: {_spread(run.spread)}."
        )
    return out
