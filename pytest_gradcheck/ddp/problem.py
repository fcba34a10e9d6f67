"""The data-parallel gradient against the single-process one, as a problem for the shared verdict path.

:class:`DDPProblem` gives :func:`~pytest_gradcheck.verdict.run_check` the
gradients to compare (DDP's, or FSDP's gathered from its shards) and, on a
mismatch, its own diagnosis (:meth:`DDPProblem.diagnose_mismatch`): each cause
is a hypothesis recomputed here (the ranks' steps re-run one at a time, in this
process, or the declared weights regrouped per rank) and compared with the same
comparator, and is recorded as figures (:mod:`pytest_gradcheck.report.ddp` says
them in words).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from ..compare import Pair, compare_gradients, default_tolerances
from ..errors import first_line
from ..report import Finding
from ..report.ddp import (
    BatchNormPerRank,
    DDPRun,
    InitDiffers,
    MicroBatchWeighting,
    NotRankAverage,
    OwnCountPerRank,
    RankAverage,
    RanksDisagree,
    RankSpread,
    RerunFailed,
    SamplerPadding,
    ScaledGradient,
    ShardCoverage,
    ShardSizeWeighting,
    UnusedParameters,
    run_notes,
    scale_cause,
)
from .config import DDPConfig
from .launch import RankResult
from .reference import Reference

__all__ = ["DDPProblem"]

Grads = Mapping[str, np.ndarray]


class DDPProblem:
    """The data-parallel gradient against the single-process full-batch gradient, for ``run_check``.

    ``batch_gradient`` is, per parameter, the gradient of the rank farthest from
    the reference (every rank must hold the same one after the all-reduce);
    ``reference_gradient`` is the full-batch gradient as is, scaled so that the
    declared reduction recovers it, or, with declared weights, the weighted
    accumulation of per-sample gradients (each sample run alone).
    ``dtype`` is the precision whose tolerance the comparison uses: the
    parameters', or FSDP's lower mixed-precision dtype.
    """

    backend = "torch"
    dropout_disabled: tuple[str, ...] = ()
    broadcasts: tuple[Any, ...] = ()

    def __init__(
        self, cfg: DDPConfig, ref: Reference, results: Sequence[RankResult], inferred: Optional[str] = None
    ) -> None:
        self.cfg = cfg
        self.ref = ref
        self.results = list(results)
        self.inferred = inferred
        self.batch_size = cfg.work.batch_size
        self.dtype = ref.dtype if cfg.fsdp is None else cfg.fsdp.precision
        self.device = str(ref.device)
        self.weights = None if cfg.verdict.weights is None else np.asarray(cfg.verdict.weights, dtype=np.float64)

    @property
    def reference_method(self) -> str:
        """``"ddp"`` (one process on the whole batch), or the per-sample method of a weighted check."""
        return "ddp" if self.weights is None else self.ref.per_sample_problem().reference_method

    @property
    def fallback_reason(self) -> Optional[str]:
        return None if self.weights is None else self.ref.per_sample_problem().fallback_reason

    # -- GradientProblem ------------------------------------------------------------------------
    def rank_grads(self, float64: bool) -> list[dict[str, np.ndarray]]:
        if not float64:
            return [r.grads for r in self.results]
        grads = [r.grads64 for r in self.results]
        if any(g is None for g in grads):
            errors = [r.f64_error for r in self.results if r.f64_error]
            if errors:
                raise RuntimeError(f"the float64 {self.cfg.check.upper()} step failed: {errors[0]}")
            raise RuntimeError("the ranks did not run the float64 step (float64_recheck=False)")
        return [g for g in grads if g is not None]

    def batch_gradient(self, float64: bool) -> dict[str, np.ndarray]:
        ranks = self.rank_grads(float64)
        ref = self.ref.gradient(float64)
        out: dict[str, np.ndarray] = {}
        for name in self.ref.names:
            errs = [float(np.max(np.abs(g[name] - ref[name]), initial=0.0)) for g in ranks]
            out[name] = ranks[int(np.argmax(errs)) if errs else 0][name]
        return out

    def reference_gradient(self, coeffs: np.ndarray, float64: bool) -> dict[str, np.ndarray]:
        if self.weights is not None:
            return self.ref.weighted(coeffs, float64)
        full = self.ref.gradient(float64)
        scale = float(np.sum(coeffs)) if self.cfg.verdict.reduction == "mean" else 1.0
        return {n: v * scale for n, v in full.items()}

    def per_sample_gradients(self, float64: bool) -> None:
        return None  # the DDP diagnosis tests its own hypotheses (see diagnose_mismatch)

    def weight_candidates(self) -> list[tuple[str, np.ndarray]]:
        return []

    def loss_values(self, float64: bool) -> None:
        return None

    def diagnose_mismatch(self, g: Grads, declared: Grads, rtol: float, atol: float, precision: str) -> list[Finding]:
        """The causes of a mismatch, as figures (each one a hypothesis that was tested)."""
        float64 = precision == "float64" and self.dtype != "float64"
        return _Diagnosis(self, g, declared, float64, rtol, atol, precision).findings()

    # -- figures --------------------------------------------------------------------------------
    def rank_spread(self, float64: bool, rtol: float, atol: float) -> tuple[bool, Optional[RankSpread]]:
        """(the ranks disagree beyond tolerance, the largest difference from rank 0's gradient)."""
        ranks = self.rank_grads(float64)
        worst: Optional[RankSpread] = None
        failed = False
        precision = "float64" if float64 else self.dtype
        for r in range(1, len(ranks)):
            cmp = compare_gradients(ranks[r], ranks[0], rtol=rtol, atol=atol, reduction="-", precision=precision)
            failed = failed or not cmp.passed
            for p in cmp.params:
                if p.max_abs_err > 0 and (worst is None or p.max_abs_err > worst.max_abs_diff):
                    worst = RankSpread(r, p.name, p.max_abs_err)
        return (failed and worst is not None), worst

    def disagreement(self, float64: bool, rtol: float, atol: float) -> list[Finding]:
        """Ranks that do not agree: on the initial model (FSDP shards each rank's own), or on the
        gradient after the all-reduce (with DDP's unused parameters named)."""
        if self.cfg.fsdp is not None:
            first = self.results[0].init_hash if self.results else ""
            differ = tuple(r.rank for r in self.results if r.init_hash != first)
            if differ:
                return [InitDiffers(ranks=differ)]
        disagree, spread = self.rank_spread(float64, rtol, atol)
        if not disagree:
            return []
        out: list[Finding] = [RanksDisagree(spread=spread)]
        unused = self.no_gradient()
        if self.cfg.fsdp is None and unused and not self.cfg.ddp_options.get("find_unused_parameters"):
            out.append(UnusedParameters(names=tuple(unused)))
        return out

    def rank_weights(self) -> tuple[float, ...]:
        """Per rank, the declared weight of its shard (its token count); empty without weights."""
        if self.weights is None:
            return ()
        return tuple(float(self.weights[np.asarray(s, dtype=np.int64)].sum()) for s in self.cfg.plan.shards)

    def no_gradient(self) -> list[str]:
        """Parameters that some rank ended the step without a gradient for."""
        return sorted({n for r in self.results for n in r.missing})

    def run(self) -> DDPRun:
        """The figures the notes state."""
        cfg, ref = self.cfg, self.ref
        hashes = [r.init_hash for r in self.results]
        spread = None
        rtol, atol = default_tolerances(self.dtype, cfg.verdict.rtol, cfg.verdict.atol)
        with contextlib.suppress(Exception):
            failed, worst = self.rank_spread(False, rtol, atol)
            spread = None if failed else worst
        fsdp = cfg.fsdp
        weights = self.weights
        return DDPRun(
            world_size=cfg.launch.world_size,
            backend=cfg.launch.backend,
            shards=tuple(tuple(int(i) for i in s) for s in cfg.plan.shards),
            shard_source=cfg.plan.source,
            micro_batches=cfg.plan.micro_batches,
            batch_size=cfg.work.batch_size,
            inferred_reduction=self.inferred,
            repeated=cfg.plan.repeated,
            init_differs=tuple(r.rank for r in self.results if r.init_hash != hashes[0]),
            reference_from_rank0=ref.from_rank0,
            no_gradient=tuple(self.no_gradient()),
            dropout=tuple(ref.dropout),
            spread=spread,
            check=cfg.check,
            units=() if fsdp is None else fsdp.units,
            mixed_precision=() if fsdp is None else fsdp.dtype_names(),
            precision=(self.dtype, rtol) if self.dtype != ref.dtype else None,
            rank_weights=self.rank_weights(),
            weights_integral=weights is not None and bool(np.all(weights == np.round(weights))),
        )

    def notes(self) -> list[str]:
        return run_notes(self.run())


class _Diagnosis:
    """One failed comparison explained: the hypotheses tried, most specific first."""

    def __init__(
        self, problem: DDPProblem, g: Grads, declared: Grads, float64: bool, rtol: float, atol: float, precision: str
    ):
        self.p = problem
        self.cfg = problem.cfg
        self.g = g
        self.float64 = float64
        self.rtol, self.atol, self.precision = rtol, atol, precision
        self.full = declared  # the reference the declared reduction (and weights) gives

    def close(self, a: Grads, b: Grads, slack: float = 10.0) -> bool:
        return compare_gradients(
            a, b, rtol=self.rtol * slack, atol=self.atol * slack, reduction="-", precision=self.precision
        ).passed

    def findings(self) -> list[Finding]:
        found = [*self.p.disagreement(self.float64, self.rtol, self.atol), *self.batchnorm(), *self.coverage()]
        disagree = any(isinstance(f, (RanksDisagree, InitDiffers)) for f in found)
        scaled = None if disagree else self.scale()
        if scaled is not None:
            return [*found, scaled]
        return [*found, *self.rank_average(found, disagree)]

    def batchnorm(self) -> list[Finding]:
        if self.p.ref.batchnorms and self.cfg.launch.world_size > 1:
            return [BatchNormPerRank(modules=tuple(self.p.ref.batchnorms))]
        return []

    def coverage(self) -> list[Finding]:
        plan = self.cfg.plan
        if plan.repeated:
            return []  # said with the sampler's padding
        counts = np.bincount(np.concatenate(plan.shards), minlength=self.p.batch_size)
        unseen = tuple(int(i) for i in np.nonzero(counts == 0)[0])
        twice = tuple(int(i) for i in np.nonzero(counts > 1)[0])
        return [ShardCoverage(unseen=unseen, repeated=twice)] if unseen or twice else []

    def scale(self) -> Optional[ScaledGradient]:
        """The DDP gradient as a multiple of the full-batch gradient, if it is one."""
        pair = Pair(self.g, self.full)
        rr = sum(pair.r.sq.values())
        factor = sum(pair.dot.values()) / rr if rr > 0 else 0.0
        if not np.isfinite(factor) or factor == 0:
            return None
        if not pair.compare(factor, self.rtol, self.atol, "-", self.precision).passed:
            return None
        w, k = self.cfg.launch.world_size, self.cfg.plan.micro_batches
        return ScaledGradient(factor=factor, world_size=w, micro_batches=k, cause=scale_cause(factor, w, k))

    def ranks_alone(self) -> dict[str, np.ndarray]:
        """What the ranks' own losses give, DDP-averaged: each rank's micro-batch gradients re-run
        one at a time in this process, summed per rank, averaged over ranks."""
        w = self.cfg.launch.world_size
        expected = {n: np.zeros_like(v) for n, v in self.full.items()}
        for r in range(w):
            for idx in self.cfg.plan.micro_splits(r):
                g = self.p.ref.local(idx, self.float64)
                for n in expected:
                    expected[n] = expected[n] + g[n] / w
        return expected

    def rank_average(self, found: Sequence[Finding], disagree: bool) -> list[Finding]:
        try:
            own = None if disagree else self.own_count()
            if own is not None:
                return [own]
            expected = self.ranks_alone()
        except Exception as exc:  # the hypothesis could not be computed: say nothing about it
            return [RerunFailed(error=first_line(exc))]
        if self.close(self.g, expected):
            weighting = self.weighting()
            if weighting is not None:
                return [weighting]
            return [] if found else [RankAverage()]
        return [] if disagree else [NotRankAverage()]

    def own_count(self) -> Optional[OwnCountPerRank]:
        """With declared weights (token counts): did each rank, or each micro-batch, divide its loss by
        its own total weight? The hypothesis weights sample ``i`` of group ``G`` (a rank's shard, or
        one of its micro-batches) by ``c_i / (world_size * sum of c over G)``, and is run through the
        same per-sample reference as the declared weights."""
        c = self.p.weights
        if c is None:
            return None
        plan, b = self.cfg.plan, self.p.batch_size
        w = self.cfg.launch.world_size
        integral = bool(np.all(c == np.round(c)))
        levels = ["rank", "micro-batch"] if plan.micro_batches > 1 else ["rank"]
        for level in levels:
            groups = [
                [np.asarray(plan.shards[r], dtype=np.int64)] if level == "rank" else plan.micro_splits(r)
                for r in range(w)
            ]
            totals = tuple(tuple(float(c[idx].sum()) for idx in row) for row in groups)
            if any(t <= 0 for row in totals for t in row):
                continue  # a group with no weight divides by zero: not this hypothesis
            coeffs = np.zeros(b)
            for row, row_totals in zip(groups, totals):
                for idx, total in zip(row, row_totals):
                    np.add.at(coeffs, idx, c[idx] / (w * total))
            expected = self.p.ref.weighted(coeffs, self.float64)
            if self.close(expected, self.full, slack=1.0) or not self.close(self.g, expected):
                continue
            relative = np.divide(coeffs * float(c.sum()), c, out=np.ones(b), where=c > 0)
            return OwnCountPerRank(
                weights=tuple(float(x) for x in relative),
                level=level,
                totals=totals,
                integral=integral,
                world_size=w,
            )
        return None

    def weighting(self) -> Optional[Finding]:
        """How the ranks' own steps weight the samples, when that is what differs."""
        cfg, b = self.cfg, self.p.batch_size
        w, plan = cfg.launch.world_size, cfg.plan
        weights = np.zeros(b)
        for r in range(w):
            for idx in plan.micro_splits(r):
                np.add.at(weights, idx, b / (w * len(idx)))
        relative = tuple(float(x) for x in weights)
        if plan.repeated:
            counts = np.bincount(np.concatenate(plan.shards), minlength=b)
            return SamplerPadding(
                counts=tuple(int(c) for c in counts),
                repeated=plan.repeated,
                world_size=w,
                batch_size=b,
                padded=sum(plan.sizes),
            )
        if len(set(plan.sizes)) > 1 and not self.p.ref.batchnorms:
            return ShardSizeWeighting(weights=relative, sizes=plan.sizes, world_size=w, batch_size=b)
        micro = tuple(tuple(len(m) for m in plan.micro_splits(r)) for r in range(w))
        if plan.micro_batches > 1 and any(len(set(sizes)) > 1 for sizes in micro):
            return MicroBatchWeighting(weights=relative, sizes=micro)
        return None
