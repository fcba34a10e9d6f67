"""``assert_ddp_equiv``: one DDP step against the single-process full-batch gradient.

Every check starts real processes (gloo over 127.0.0.1). The first one also starts the
forkserver (torch imported once); the later ones fork from it (benchmarks/README.md has the
figures).
The model factories and losses are module-level functions of this file: the ranks import
this module to unpickle them.
"""

from __future__ import annotations

import doctest
import importlib.util
import multiprocessing
import os
import sys
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel_steps import (
    IDS,
    LABELS,
    TinyLM,
    all_reduced_token_mean,
    assert_no_ranks_left,
    assert_port_free,
    per_rank_token_mean,
    record_ports,
    token_count,
)
from torch import nn

from pytest_gradcheck import GradEquivError, InvalidArgument, assert_ddp_equiv, assert_gradequiv_step, ddp
from pytest_gradcheck.report import Comparison, Finding, GradEquivReport, ParamComparison
from pytest_gradcheck.report import ddp as report_ddp
from pytest_gradcheck.report.ddp import (
    BatchNormPerRank,
    DDPRun,
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

GLOBAL_BATCH = 8

_g = torch.Generator().manual_seed(1)
X = torch.randn(GLOBAL_BATCH, 3, generator=_g)
Y = torch.randn(GLOBAL_BATCH, 1, generator=_g)
UNEVEN = [[0, 1, 2, 3, 4], [5, 6, 7]]


# --------------------------------------------------------------------------- factories and losses


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def make_bn_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1))


def make_mlp_ignoring_last_weight() -> nn.Module:
    """DDP leaves ``2.weight`` out of the all-reduce: each rank keeps its own gradient."""
    model = make_mlp()
    model._ddp_params_and_buffers_to_ignore = ["2.weight"]  # type: ignore[assignment]
    return model


class WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(3, 1)
        self.unused = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def make_classifier() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))


#: a loss module with float32 state of its own (the class weights)
WEIGHTED_CROSS_ENTROPY = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5]))


def make_pid_dependent_mlp() -> nn.Module:
    """Not deterministic under torch.manual_seed(0): every process builds another bias."""
    model = make_mlp()
    with torch.no_grad():
        model[0].bias.fill_((os.getpid() % 997) / 997)
    return model


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def global_count_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the shard / global sample count, times world_size because DDP averages."""
    n = torch.tensor(float(y.shape[0]))
    if dist.is_initialized():
        dist.all_reduce(n)
    return ((out - y) ** 2).sum() / n * world()


def constant_count_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The same normalisation with a known global batch size: right for micro-batches too."""
    return ((out - y) ** 2).sum() / GLOBAL_BATCH * world()


def sum_squared_error(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum()


def training_step(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
    return {"loss": F.mse_loss(model(batch["x"]), batch["y"]), "log": batch["tag"]}


def hangs_on_rank_1(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_rank() == 1:
        while True:
            time.sleep(1)
    return F.mse_loss(out, y)


def fails_on_rank_1(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_rank() == 1:
        raise ValueError("labels out of range on rank 1")
    return F.mse_loss(out, y)


# --------------------------------------------------------------------------- process bookkeeping


@pytest.fixture
def used_ports(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The rendezvous ports the checks of one test listened on."""
    return record_ports(monkeypatch)


# --------------------------------------------------------------------------- passing steps


def test_even_shards_pass_and_leave_the_caller_as_found(used_ports: list[int]) -> None:
    x, y = X.clone(), Y.clone()
    rng = torch.get_rng_state()
    report = assert_ddp_equiv(make_mlp, F.mse_loss, x, y)
    assert report.passed and report.check == "ddp" and report.matched == "mean"
    assert report.batch_size == GLOBAL_BATCH and report.reference_method == "ddp"
    assert "the DDP gradient equals the single-process full-batch gradient" in str(report)
    assert "DDP step on 2 ranks (gloo), shards of 4 and 4 samples (contiguous split" in str(report)
    assert torch.equal(x, X) and torch.equal(y, Y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_no_ranks_left()
    assert_port_free(used_ports[-1])


def test_uneven_shards_with_a_global_count_loss_pass() -> None:
    report = assert_ddp_equiv(make_mlp, global_count_mse, X, Y, shards=UNEVEN)
    assert report.passed
    assert "shards of 5 and 3 samples (explicit shards: [0..4]; [5..7])" in str(report)


def test_no_sync_accumulation_with_global_normalisation_passes() -> None:
    report = assert_ddp_equiv(make_mlp, constant_count_mse, X, Y, shards=UNEVEN, micro_batches=2)
    assert report.passed
    assert "2 micro-batches per rank accumulated under no_sync()" in str(report)


def test_step_fn_form_and_three_ranks() -> None:
    batch = {"x": X[:6], "y": Y[:6], "tag": "not a tensor"}
    report = assert_ddp_equiv(make_mlp, None, batch, step_fn=training_step, world_size=3)
    assert report.passed
    assert "shards of 2, 2 and 2 samples" in str(report)


# --------------------------------------------------------------------------- diagnosed failures


def test_per_rank_mean_over_uneven_shards_names_the_weighting() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_ddp_equiv(make_mlp, F.mse_loss, X, Y, shards=UNEVEN)
    text = str(info.value)
    assert "the DDP gradient differs from the single-process full-batch gradient" in text
    assert (
        "ranks weight samples by 1/shard size: with shards of 5 and 3 samples the DDP gradient is a "
        "shard-size-weighted mean" in text
    )
    assert "a sample counts 1/10 on a rank with 5, 1/6 on a rank with 3 instead of 1/8" in text
    assert "divide by the global count instead" in text
    assert "float64 re-check: the mismatch survives" in text
    report = info.value.report
    assert not report.passed and report.check == "ddp"
    # the cause as figures (the renderer says them in words), with the shared kind of a weighting
    assert [type(f) for f in report.findings] == [ShardSizeWeighting]
    (finding,) = report.findings
    assert finding.kind == "known-weights"
    assert (finding.sizes, finding.world_size, finding.batch_size) == ((5, 3), 2, 8)
    assert finding.weights == pytest.approx([0.8] * 5 + [8 / 6] * 3)
    assert report.would_match and "shard-size-weighted" in report.would_match


def test_no_sync_accumulation_missing_1_over_k_names_the_factor() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_ddp_equiv(make_mlp, F.mse_loss, X, Y, micro_batches=2)
    text = str(info.value)
    assert "no_sync() accumulation over 2 micro-batches sums their gradients" in text
    assert "the DDP gradient is 2 times the full-batch gradient (the 1/2 is missing)" in text
    assert "ratio" in text and " 2  " in text  # the table's batch/reference ratio


def test_summed_loss_is_divided_by_world_size() -> None:
    with pytest.raises(GradEquivError, match=r"the DDP gradient is 1/2 of the full-batch gradient"):
        assert_ddp_equiv(make_mlp, sum_squared_error, X, Y, reduction="sum")


def test_batchnorm_in_train_mode_gets_the_syncbatchnorm_sentence() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_ddp_equiv(make_bn_mlp, F.mse_loss, X, Y)
    text = str(info.value)
    assert "BatchNorm normalises per rank; use SyncBatchNorm" in text
    assert "model.1 (BatchNorm1d) is in train mode" in text


def test_distributed_sampler_padding_names_the_repeated_samples() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_ddp_equiv(make_mlp, F.mse_loss, X[:7], Y[:7], sampler=True)
    text = str(info.value)
    assert "DistributedSampler repeated samples [0] to even out the shards" in text
    assert "(7 samples over 2 ranks are padded to 8)" in text
    assert "DistributedSampler(shuffle=False, drop_last=False): [0, 2, 4, 6]; [1, 3, 5, 0]" in text


def test_ranks_that_disagree_after_the_all_reduce_fail() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_ddp_equiv(make_mlp_ignoring_last_weight, F.mse_loss, X, Y)
    text = str(info.value)
    assert "ranks disagree with each other" in text
    assert "rank 1's gradient of '2.weight' differs from rank 0's" in text


def test_unused_parameters_without_find_unused_parameters_are_named() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_ddp_equiv(WithUnusedLayer, F.mse_loss, X, Y)
    text = str(info.value)
    assert "ranks disagree with each other" in text
    assert "parameters unused.bias, unused.weight get no gradient in the step, and DDP was not told" in text
    report = assert_ddp_equiv(WithUnusedLayer, F.mse_loss, X, Y, ddp_options={"find_unused_parameters": True})
    assert "parameters with no gradient after the step (counted as zero): unused.bias, unused.weight" in str(report)


def test_a_loss_module_runs_in_float64_for_the_recheck_as_in_every_check() -> None:
    """The ranks and the reference run the package's one loss call: in the float64 re-check a loss
    module runs on a float64 copy (its float32 class weights included), as in assert_gradequiv.
    DDP's own copy of the loss call used the module as is, and the re-check failed on the dtypes."""
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    with pytest.raises(GradEquivError) as info:
        assert_ddp_equiv(make_classifier, WEIGHTED_CROSS_ENTROPY, X, labels, shards=UNEVEN)
    text = str(info.value)
    assert "float64 re-check: the mismatch survives" in text
    assert "could not run" not in text


def test_a_non_deterministic_factory_is_checked_from_rank_0s_parameters() -> None:
    report = assert_ddp_equiv(make_pid_dependent_mlp, F.mse_loss, X, Y)
    text = str(report)
    assert report.passed
    assert "the ranks built different initial parameters (rank 1 differs from rank 0" in text
    assert "the reference starts from rank 0's, which DDP broadcast to every rank" in text


# --------------------------------------------------------------------------- weights= (token-level losses)


def test_a_loss_normalised_by_each_ranks_own_token_count_is_named() -> None:
    """transformers issue 34242: the token count was taken per device; the declared weights (each
    sequence's token count) make the reference the token-level mean over all ranks."""
    with pytest.raises(GradEquivError) as info:
        assert_ddp_equiv(TinyLM, per_rank_token_mean, IDS, LABELS, weights=token_count)
    text = str(info.value)
    assert text.splitlines()[0] == "each rank divided its loss by its own token count (ranks: 21 and 17 tokens)"
    assert (
        "Cause: each rank divided its loss by its own token count (ranks: 21 and 17 tokens); divide by the "
        "token count over all ranks (all-reduce it) instead. DDP averages the ranks' gradients, so a token "
        "counts 1/42 on rank 0, 1/34 on rank 1 instead of 1/38" in text
    )
    assert "the DDP gradient differs from the single-process weighted full-batch gradient" in text
    assert "float64 re-check: the mismatch survives" in text
    report = info.value.report
    assert report.weighted and report.weights == (10.0, 11.0, 9.0, 8.0)
    assert [type(f) for f in report.findings] == [OwnCountPerRank]
    (finding,) = report.findings
    assert (finding.level, finding.totals, finding.integral) == ("rank", ((21.0,), (17.0,)), True)
    assert finding.weights == pytest.approx([38 / 42] * 2 + [38 / 34] * 2)
    assert report.cause == "weights"
    assert report.would_match == "each rank's loss divided by its own token count"


def test_a_loss_normalised_by_the_all_reduced_token_count_passes() -> None:
    report = assert_ddp_equiv(TinyLM, all_reduced_token_mean, IDS, LABELS, weights=torch.tensor([10, 11, 9, 8]))
    assert report.passed and report.matched == "weighted mean"
    text = str(report)
    assert "the DDP gradient equals the single-process weighted full-batch gradient" in text
    assert "the reference weights each sample by its declared weight (38 tokens in all; per rank: 21 and 17)" in text
    assert report.reference_method in ("vmap", "loop")  # each sample run alone


def test_weights_are_checked_before_any_process_starts() -> None:
    with pytest.raises(InvalidArgument, match=r"weights has shape \(2,\): expected one weight per sample, \(4,\)"):
        assert_ddp_equiv(TinyLM, all_reduced_token_mean, IDS, LABELS, weights=[1.0, 2.0])
    with pytest.raises(InvalidArgument, match=r"weights\(sample 0\) returned a tensor of shape \(12,\)"):
        assert_ddp_equiv(TinyLM, all_reduced_token_mean, IDS, LABELS, weights=lambda y: (y != -100)[0])
    assert multiprocessing.active_children() == []


# --------------------------------------------------------------------------- bad arguments (no process started)


def test_lambdas_and_local_functions_are_rejected_up_front() -> None:
    def local_model() -> nn.Module:
        return make_mlp()

    expected = (
        "make_model must be importable by the child processes (a module-level function), lambdas "
        "and local functions cannot be sent to spawned processes"
    )
    for factory in (lambda: make_mlp(), local_model):
        with pytest.raises(InvalidArgument) as info:
            assert_ddp_equiv(factory, F.mse_loss, X, Y)
        assert str(info.value).startswith(expected)
    with pytest.raises(InvalidArgument, match="loss_fn must be importable by the child processes"):
        assert_ddp_equiv(make_mlp, lambda out, y: F.mse_loss(out, y), X, Y)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"shards": [[0, 1, 2]]}, "shards has 1 index list(s) but world_size=2"),
        ({"shards": [[0, 1], [2, 9]]}, "shards[1] has indices outside the batch of 8"),
        ({"shards": [[0, 1], []]}, "shards[1] is empty"),
        ({"sampler": True, "shards": UNEVEN}, "either shards=... or sampler=True"),
        ({"micro_batches": 4, "shards": UNEVEN}, "rank 1 has 3 sample(s), fewer than micro_batches=4"),
        ({"world_size": 0}, "Invalid world_size=0"),
        ({"world_size": 9}, "a batch of 8 cannot be split over world_size=9 ranks"),
        ({"backend": "mpi"}, "Invalid backend='mpi'"),
        ({"timeout": 0}, "Invalid timeout=0"),
        ({"reduction": "max"}, "Invalid reduction='max'"),
        ({"ddp_options": {"device_ids": [0]}}, "ddp_options may not set device_ids"),
    ],
)
def test_bad_arguments_are_rejected_before_any_process_starts(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        assert_ddp_equiv(make_mlp, F.mse_loss, X, Y, **kwargs)
    assert message in str(info.value)


def test_a_step_batch_is_sized_by_the_rule_every_check_shares() -> None:
    """The step form's batch goes through the shared batch-size helper: the same refusals, in the
    same words, as assert_gradequiv_step (DDP used to say "nothing to shard over the ranks")."""
    for batch in ({"tag": "no tensor"}, {"x": X[:1], "y": Y[:1], "tag": "a batch of one"}):
        with pytest.raises(InvalidArgument) as ours:
            assert_ddp_equiv(make_mlp, None, batch, step_fn=training_step, world_size=1)
        with pytest.raises(InvalidArgument) as shared:
            assert_gradequiv_step(training_step, make_mlp(), batch)
        assert str(ours.value) == str(shared.value)
    assert multiprocessing.active_children() == []


def test_a_non_scalar_loss_is_rejected_in_the_parent() -> None:
    with pytest.raises(InvalidArgument, match=r"has shape \(8, 1\), not a scalar"):
        assert_ddp_equiv(make_mlp, nn.L1Loss(reduction="none"), X, Y)


# --------------------------------------------------------------------------- failures, time-outs, clean-up


def test_an_exception_in_a_rank_is_reported_with_its_traceback() -> None:
    with pytest.raises(ddp.DDPWorkerError) as info:
        assert_ddp_equiv(make_mlp, fails_on_rank_1, X, Y, timeout=30)
    err = info.value
    assert err.rank == 1
    assert "rank 1 of 2 failed: ValueError: labels out of range on rank 1" in str(err)
    assert "fails_on_rank_1" in err.remote_traceback
    assert_no_ranks_left()


def test_a_rank_that_never_finishes_times_out_and_nothing_is_left_behind(used_ports: list[int]) -> None:
    start = time.monotonic()
    with pytest.raises(ddp.DDPTimeoutError) as info:
        assert_ddp_equiv(make_mlp, hangs_on_rank_1, X, Y, timeout=5)
    elapsed = time.monotonic() - start
    assert isinstance(info.value, TimeoutError)
    text = str(info.value)
    assert "assert_ddp_equiv ran out of time (timeout=5 s) before every rank finished the step" in text
    assert "rank 1 was in the forward pass and the loss (micro-batch 1 of 1)" in text
    assert "rank 0 was in backward() (micro-batch 1 of 1), whose gradient all-reduce waits" in text or (
        "rank 0 waited 5 s in a collective" in text
    )
    assert "The child processes were stopped" in text
    assert 1 in info.value.ranks_pending
    assert elapsed < 5 + ddp.launch.TERM_GRACE + 5
    assert_no_ranks_left()
    assert_port_free(used_ports[-1])
    # and the next check runs as usual
    assert assert_ddp_equiv(make_mlp, F.mse_loss, X, Y).passed


def test_keyboard_interrupt_stops_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    real_wait = multiprocessing.connection.wait
    calls = []

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return real_wait(*args, **kwargs)

    monkeypatch.setattr(multiprocessing.connection, "wait", interrupted)
    with pytest.raises(KeyboardInterrupt):
        assert_ddp_equiv(make_mlp, hangs_on_rank_1, X, Y, timeout=30)
    monkeypatch.undo()
    assert_no_ranks_left()


# --------------------------------------------------------------------------- the words, from figures alone


def ddp_report(*findings: Finding, float64_error: str | None = None) -> GradEquivReport:
    params = (ParamComparison("0.weight", (4, 3), 1.0, 0.5, 1e-4, 0.9, 1.2, 12, 12),)
    report = GradEquivReport(
        passed=False,
        check="ddp",
        backend="torch",
        batch_size=8,
        dtype="float32",
        device="cpu",
        reduction="mean",
        weighted=False,
        matched=None,
        working=Comparison("mean", "float32", 1e-4, 0.0, params, 1.0),
        float64_error=float64_error,
    )
    report.findings = findings
    return report


def scaled(factor: float, world_size: int, micro_batches: int) -> ScaledGradient:
    cause = scale_cause(factor, world_size, micro_batches)
    return ScaledGradient(factor=factor, world_size=world_size, micro_batches=micro_batches, cause=cause)


@pytest.mark.parametrize(
    ("finding", "words"),
    [
        (
            scaled(2.0, 2, 2),
            "no_sync() accumulation over 2 micro-batches sums their gradients: the DDP gradient is 2 times "
            "the full-batch gradient (the 1/2 is missing); divide each micro-batch loss by 2",
        ),
        (scaled(0.5, 2, 1), "but the loss is a sum over each rank's shard: the DDP gradient is 1/2 of the full-batch"),
        (scaled(0.5, 4, 2), "the 2 micro-batch gradients are summed (1/2 missing) and DDP averages over world_size=4"),
        (scaled(-1.0, 2, 1), "the DDP gradient has the opposite sign of the full-batch gradient (factor -1)."),
        (scaled(3.0, 2, 1), "the DDP gradient is 3 times the full-batch gradient (world_size=2, micro_batches=1)"),
        (
            ShardSizeWeighting(sizes=(5, 3), world_size=2, batch_size=8),
            "a sample counts 1/10 on a rank with 5, 1/6 on a rank with 3 instead of 1/8",
        ),
        (
            SamplerPadding(repeated=(0,), world_size=2, batch_size=7, padded=8),
            "DistributedSampler repeated samples [0] to even out the shards (7 samples over 2 ranks are padded to 8)",
        ),
        (MicroBatchWeighting(sizes=((2, 1, 1), (3, 2))), "different sizes (rank 0: 2+1+1; rank 1: 3+2)"),
        (BatchNormPerRank(modules=(("model.1", "BatchNorm1d"),)), "model.1 (BatchNorm1d) is in train mode"),
        (
            BatchNormPerRank(modules=(("model.1", "BatchNorm1d"), ("model.4", "BatchNorm2d"))),
            "model.1 (BatchNorm1d) and model.4 (BatchNorm2d) are in train mode",
        ),
        (
            ShardCoverage(unseen=(7,), repeated=(3,)),
            "the shards do not hold each sample once: samples [7] are on no rank; samples [3] are on more than one",
        ),
        (
            RanksDisagree(spread=RankSpread(1, "2.weight", 0.5)),
            "ranks disagree with each other: after DDP's all-reduce every rank must hold the same gradient, but "
            "rank 1's gradient of '2.weight' differs from rank 0's (max abs diff 5.00e-01)",
        ),
        (
            UnusedParameters(names=tuple(f"p{i}" for i in range(8))),
            "parameters p0, p1, p2, p3, p4, p5 ... get no gradient in the step, and DDP was not told",
        ),
        (RankAverage(), "the DDP gradient is the average of what the ranks' own losses give, but"),
        (NotRankAverage(), "the DDP gradient is not the average of the ranks' own gradients"),
        (RerunFailed(error="ValueError: boom"), "could not be re-run one at a time for a diagnosis: ValueError: boom"),
    ],
)
def test_each_ddp_cause_is_said_from_its_figures(finding: Finding, words: str) -> None:
    text = str(ddp_report(finding))
    cause = next(line for line in text.splitlines() if line.startswith("Cause: "))
    assert words in cause
    assert "What to do" not in text  # each DDP sentence carries its own fix


def test_ddp_findings_keep_the_shared_kinds_the_verdict_reads() -> None:
    """A scale and a reweighting keep the shared kinds, so run_check takes would_match from them."""
    assert (scaled(2.0, 2, 2).kind, scaled(2.0, 2, 2).matched) == ("factor", "2 × the full-batch gradient")
    assert scaled(0.5, 4, 2).matched == "2/4 × the full-batch gradient"
    assert scaled(1.5, 2, 1).matched == "1.5 × the full-batch gradient"
    assert ShardSizeWeighting().kind == SamplerPadding().kind == MicroBatchWeighting().kind == "known-weights"
    assert {RanksDisagree().kind, BatchNormPerRank().kind, ShardCoverage().kind} == {
        "ddp-ranks-disagree",
        "ddp-batchnorm",
        "ddp-shard-coverage",
    }


def test_a_failed_float64_recheck_is_the_only_ddp_advice() -> None:
    text = str(ddp_report(RankAverage(), float64_error="RuntimeError: the float64 DDP step failed"))
    assert "What to do: the float64 re-check could not run, so rounding cannot be ruled out" in text


def test_the_notes_of_a_ddp_run() -> None:
    run = DDPRun(
        world_size=5,
        backend="gloo",
        shards=((0, 1), (2, 3), (4, 5), (6, 7), (8, 0)),
        shard_source="sampler",
        micro_batches=2,
        batch_size=9,
        inferred_reduction="sum",
        repeated=(0,),
        init_differs=(1, 3),
        reference_from_rank0=True,
        no_gradient=("a", "b"),
        dropout=("model.1",),
        spread=RankSpread(2, "fc.bias", 1e-9),
    )
    assert run_notes(run) == [
        "the loss is a sum over the batch (inferred: doubling the batch doubles it).",
        "DDP step on 5 ranks (gloo), shards of 2, 2, 2, 2 and 2 samples (DistributedSampler(shuffle=False, "
        "drop_last=False): [0, 1]; [2, 3]; [4, 5]; [6, 7]; ...), 2 micro-batches per rank accumulated under "
        "no_sync() (the last one synchronised), each loss back-propagated as is.",
        "DistributedSampler repeated samples [0] to even out the shards (9 samples padded to 10).",
        "the ranks built different initial parameters (ranks 1 and 3 differ from rank 0 after "
        "torch.manual_seed(0); make_model() is not deterministic): DDP broadcast rank 0's at construction.",
        "make_model() built different initial parameters here than in rank 0; the reference starts from "
        "rank 0's, which DDP broadcast to every rank.",
        "parameters with no gradient after the step (counted as zero): a, b",
        "dropout was switched off in every rank and in the reference (random masks differ between processes): model.1.",
        "the ranks' gradients are not bitwise identical after the all-reduce: rank 2's gradient of 'fc.bias' "
        "differs from rank 0's (max abs diff 1.00e-09).",
    ]
    one = DDPRun(
        world_size=1, backend="gloo", shards=((0, 1),), shard_source="contiguous", micro_batches=1, batch_size=2
    )
    assert run_notes(one) == ["DDP step on 1 rank (gloo), shards of 2 samples (contiguous split: [0, 1])."]


# --------------------------------------------------------------------------- inside pytest


PYTESTER_FILE = """
import torch, torch.nn.functional as F
from torch import nn
from pytest_gradcheck import assert_ddp_equiv

def make_model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

def test_ddp_step():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 1, generator=g)
    report = assert_ddp_equiv(make_model, F.mse_loss, x, y, world_size=1, start_method="spawn")
    assert report.passed
"""


def test_factories_from_a_module_not_importable_by_name(tmp_path: Any) -> None:
    """As pytest's importlib mode imports test files: the ranks load the module from its file."""
    path = tmp_path / "gradcheck_user_models.py"
    path.write_text(
        "from torch import nn\n\n\ndef make_model():\n"
        "    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))\n"
    )
    spec = importlib.util.spec_from_file_location("gradcheck_user_models", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradcheck_user_models"] = module
    try:
        spec.loader.exec_module(module)
        assert ddp.launch.modules_to_ship({"gradcheck_user_models"}) == [("gradcheck_user_models", str(path))]
        assert assert_ddp_equiv(module.make_model, F.mse_loss, X, Y).passed
    finally:
        del sys.modules["gradcheck_user_models"]


def _plugin_args() -> list[str]:
    # Until the pytest plugin module exists, the entry point cannot load: leave it out.
    return [] if importlib.util.find_spec("pytest_gradcheck.plugin") else ["-p", "no:gradcheck"]


def test_test_module_factories_under_xdist_importlib_mode_and_spawn(pytester: pytest.Pytester) -> None:
    """Spawned ranks import the user's test module by file when it is not importable by name.

    One rank only: a spawned rank imports torch itself (benchmarks/README.md has the cost); the
    forkserver path is the one every other test here takes.
    """
    pytester.makepyfile(test_user_ddp=PYTESTER_FILE)
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "-p", "no:benchmark", "-n", "1", "--import-mode=importlib", *_plugin_args()
    )
    result.assert_outcomes(passed=1)


def test_docstrings() -> None:
    for module in (ddp, ddp.check, report_ddp):
        failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert failures == 0
