"""``assert_fsdp_equiv``: one ``fully_shard`` (FSDP2) step against the single-process full-batch gradient.

Every check starts real processes (gloo over 127.0.0.1), forked from the forkserver the DDP
checks share (torch imported once). The factories and losses are module-level functions of
this file or of ``parallel_steps``: the ranks import them to unpickle them.
"""

from __future__ import annotations

import doctest
import importlib.util
import multiprocessing
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

import pytest_gradcheck
from pytest_gradcheck import (
    GradEquivError,
    InvalidArgument,
    UnsupportedModelError,
    assert_fsdp_equiv,
    ddp,
)
from pytest_gradcheck.ddp.config import check_mp_policy, lowest_precision
from pytest_gradcheck.ddp.fsdp import fully_shard_available, select_units
from pytest_gradcheck.report import Comparison, Finding, GradEquivReport, ParamComparison
from pytest_gradcheck.report import ddp as report_ddp
from pytest_gradcheck.report.ddp import (
    DDPRun,
    InitDiffers,
    OwnCountPerRank,
    ScaledGradient,
    ShardSizeWeighting,
    run_notes,
)

pytestmark = pytest.mark.skipif(
    not fully_shard_available(), reason="torch.distributed.fsdp.fully_shard (FSDP2) is not available"
)

_g = torch.Generator().manual_seed(1)
X = torch.randn(8, 3, generator=_g)
Y = torch.randn(8, 1, generator=_g)
UNEVEN = [[0, 1, 2, 3, 4], [5, 6, 7]]
BF16_REDUCE = {"reduce_dtype": torch.bfloat16}


# --------------------------------------------------------------------------- factories and losses


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def make_deep_mlp() -> nn.Module:
    """Nested blocks: wrap may select the inner Linears, which are sharded before their parents."""
    return nn.Sequential(
        nn.Sequential(nn.Linear(3, 8), nn.Tanh()),
        nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh()),
        nn.Linear(8, 1),
    )


class Stack(nn.Module):
    """Blocks in a ModuleList, as transformers hold their layers."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])
        self.head = nn.Linear(3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.head(x)


def make_rank_seeded_mlp() -> nn.Module:
    """The FSDP bug DDP hides: the model is built after seeding by rank (for data augmentation)."""
    torch.manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    return make_mlp()


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def constant_count_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sum over the micro-batch / the global batch size, times world_size (FSDP averages the ranks)."""
    return ((out - y) ** 2).sum() / 8 * world()


def step_with_logs(model: nn.Module, batch: dict[str, Any]) -> dict[str, Any]:
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


@pytest.fixture
def used_ports(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    return record_ports(monkeypatch)


# --------------------------------------------------------------------------- passing steps


def test_a_correct_step_passes_and_leaves_the_caller_as_found(used_ports: list[int]) -> None:
    x, y = X.clone(), Y.clone()
    rng = torch.get_rng_state()
    report = assert_fsdp_equiv(make_mlp, F.mse_loss, x, y)
    assert report.passed and report.check == "fsdp" and report.matched == "mean"
    assert report.dtype == "float32" and report.working.rtol == pytest.approx(1e-4)
    text = str(report)
    assert text.startswith("Gradients are equivalent: the FSDP gradient equals the single-process full-batch gradient.")
    assert (
        "FSDP step on 2 ranks (gloo), fully_shard on model.0, model.2 and the root, shards of 4 and 4 samples "
        "(contiguous split: [0..3]; [4..7])." in text
    )
    assert torch.equal(x, X) and torch.equal(y, Y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert_no_ranks_left()
    assert_port_free(used_ports[-1])


def test_four_ranks_with_a_wrap_that_selects_nested_modules() -> None:
    report = assert_fsdp_equiv(
        make_deep_mlp, F.mse_loss, X, Y, world_size=4, wrap=lambda m: isinstance(m, nn.Linear), timeout=120
    )
    assert report.passed
    assert "FSDP step on 4 ranks (gloo), fully_shard on model.0.0, model.1.0, model.1.2, model.2 and the root" in str(
        report
    )


def test_accumulation_with_the_sync_off_and_global_normalisation_passes() -> None:
    report = assert_fsdp_equiv(make_mlp, constant_count_mse, X, Y, shards=UNEVEN, micro_batches=2)
    assert report.passed
    assert (
        "2 micro-batches per rank accumulated with set_requires_gradient_sync(False) (the last one synchronised)"
        in str(report)
    )


def test_step_fn_form_with_weights_called_on_a_batch_of_one() -> None:
    batch = {"x": X, "y": Y, "tag": "not a tensor"}
    seen: list[int] = []

    def weight(one: dict[str, Any]) -> float:
        seen.append(int(one["x"].shape[0]))
        return 1.0

    report = assert_fsdp_equiv(make_mlp, None, batch, step_fn=step_with_logs, weights=weight)
    assert report.passed and report.matched == "weighted mean"
    assert seen == [1] * 8


# --------------------------------------------------------------------------- precision


def test_a_bfloat16_gradient_reduction_passes_with_bfloat16_tolerance() -> None:
    report = assert_fsdp_equiv(make_mlp, F.mse_loss, X, Y, mp_policy=BF16_REDUCE)
    assert report.passed and report.float64 is None  # no re-check was needed
    assert report.dtype == "bfloat16" and report.working.rtol == pytest.approx(4e-2)
    assert report.working.max_rel_err > 1e-4  # bfloat16 rounding that float32's tolerance would call a bug
    assert (
        "mixed precision: MixedPrecisionPolicy(reduce_dtype=torch.bfloat16); the gradient reduction ran in "
        "bfloat16, so the comparison uses bfloat16's tolerance (rtol=0.04); the float64 re-check runs the step "
        "without the policy." in str(report)
    )


def test_bfloat16_parameters_set_the_tolerance_even_with_a_float32_reduction() -> None:
    policy = {"param_dtype": torch.bfloat16, "reduce_dtype": torch.float32, "output_dtype": torch.float32}
    report = assert_fsdp_equiv(make_mlp, F.mse_loss, X, Y, mp_policy=policy)
    assert report.passed and report.dtype == "bfloat16"
    assert "the gradient reduction ran in float32, so the comparison uses bfloat16's tolerance" in str(report)


def test_a_real_bug_under_a_bfloat16_reduction_fails_and_survives_float64() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_fsdp_equiv(TinyLM, per_rank_token_mean, IDS, LABELS, weights=token_count, mp_policy=BF16_REDUCE)
    report = info.value.report
    assert report.dtype == "bfloat16" and report.float64 is not None and not report.float64.passed
    assert [type(f) for f in report.findings] == [OwnCountPerRank]
    assert "float64 re-check: the mismatch survives" in str(info.value)


def test_tolerance_follows_the_lowest_precision_of_the_step() -> None:
    assert lowest_precision("float32", "bfloat16") == "bfloat16"
    assert lowest_precision("float32", "float16", "bfloat16") == "bfloat16"
    assert lowest_precision("float64", "float32") == "float32"
    assert lowest_precision("float32") == "float32"
    assert check_mp_policy({"reduce_dtype": torch.bfloat16, "cast_forward_inputs": False}) == (
        ("reduce_dtype", torch.bfloat16),
        ("cast_forward_inputs", False),
    )


# --------------------------------------------------------------------------- token weighting across ranks


def test_each_ranks_own_token_count_is_named_and_the_all_reduced_count_passes() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_fsdp_equiv(TinyLM, per_rank_token_mean, IDS, LABELS, weights=token_count)
    text = str(info.value)
    assert text.splitlines()[0] == "each rank divided its loss by its own token count (ranks: 21 and 17 tokens)"
    assert (
        "each rank divided its loss by its own token count (ranks: 21 and 17 tokens); divide by the token count "
        "over all ranks (all-reduce it) instead. FSDP averages the ranks' gradients" in text
    )
    assert "Gradients are NOT equivalent: the FSDP gradient differs from the single-process weighted" in text
    # the tied embedding/head is left to the root; the block is its own unit
    assert "fully_shard on model.block and the root" in text

    report = assert_fsdp_equiv(TinyLM, all_reduced_token_mean, IDS, LABELS, weights=token_count)
    assert report.passed and report.matched == "weighted mean"


def test_each_micro_batchs_own_token_count_is_named() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_fsdp_equiv(TinyLM, per_rank_token_mean, IDS, LABELS, weights=token_count, micro_batches=2)
    (finding,) = info.value.report.findings
    assert isinstance(finding, OwnCountPerRank) and finding.level == "micro-batch"
    assert finding.totals == ((10.0, 11.0), (9.0, 8.0))
    assert str(info.value).splitlines()[0] == (
        "each micro-batch divided its loss by its own token count (rank 0: 10+11, rank 1: 9+8 tokens)"
    )


# --------------------------------------------------------------------------- diagnoses shared with DDP


def test_a_per_rank_mean_over_uneven_shards_is_named() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_fsdp_equiv(make_mlp, F.mse_loss, X, Y, shards=UNEVEN)
    text = str(info.value)
    assert (
        "ranks weight samples by 1/shard size: with shards of 5 and 3 samples the FSDP gradient is a "
        "shard-size-weighted mean (FSDP averages the ranks' means" in text
    )
    assert [type(f) for f in info.value.report.findings] == [ShardSizeWeighting]


def test_accumulation_missing_1_over_k_names_the_factor() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_fsdp_equiv(make_mlp, F.mse_loss, X, Y, micro_batches=2)
    assert str(info.value).splitlines()[0] == (
        "set_requires_gradient_sync(False) accumulation over 2 micro-batches sums their gradients: the FSDP "
        "gradient is 2 times the full-batch gradient (the 1/2 is missing)"
    )
    (finding,) = info.value.report.findings
    assert isinstance(finding, ScaledGradient) and finding.cause == "no-sync-sum"


def test_ranks_that_build_different_models_disagree() -> None:
    """DDP broadcasts rank 0's parameters and hides this; fully_shard keeps each rank's own shard."""
    with pytest.raises(GradEquivError) as info:
        assert_fsdp_equiv(make_rank_seeded_mlp, F.mse_loss, X, Y)
    text = str(info.value)
    assert text.splitlines()[0].startswith("ranks disagree on the model: rank 1 built other initial parameters")
    assert "FSDP does not broadcast rank 0's parameters, it shards each rank's own" in text
    assert [type(f) for f in info.value.report.findings] == [InitDiffers]


# --------------------------------------------------------------------------- refusals (no process started)


def test_select_units_by_default_and_by_wrap() -> None:
    assert select_units(make_mlp(), None) == ("0", "2")
    assert select_units(Stack(), None) == ("layers.0", "layers.1", "head")  # a ModuleList stands for its items
    assert select_units(TinyLM(), None) == ("block",)  # tied embedding and head stay with the root
    assert select_units(nn.Linear(3, 1), None) == ()  # the root alone
    assert select_units(make_deep_mlp(), lambda m: isinstance(m, nn.Linear)) == ("0.0", "1.0", "1.2", "2")
    assert select_units(make_deep_mlp(), lambda m: isinstance(m, nn.Sequential)) == ("0", "1")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_torchscript_module_is_refused_by_default_too() -> None:
    scripted = nn.Sequential(torch.jit.script(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModelError, match=r"fully_shard cannot wrap model\.0 \(RecursiveScriptModule\)"):
        select_units(scripted, None)
    with pytest.raises(UnsupportedModelError, match="fully_shard cannot wrap a TorchScript module"):
        select_units(torch.jit.script(make_mlp()), None)


@pytest.mark.parametrize(
    ("factory", "kwargs", "error", "message"),
    [
        (
            make_mlp,
            {"wrap": lambda m: isinstance(m, nn.Conv2d)},
            InvalidArgument,
            "wrap selects no submodule of the model: it returned False for all 3 submodules (Linear, Tanh)",
        ),
        (
            Stack,
            {"wrap": lambda m: isinstance(m, nn.ModuleList)},
            UnsupportedModelError,
            "fully_shard cannot wrap model.layers (ModuleList): it is a container without forward()",
        ),
        (
            TinyLM,
            {"wrap": lambda m: isinstance(m, (nn.Embedding, nn.Linear))},
            UnsupportedModelError,
            "parameter 'embed.weight' is shared by model.embed and model.head (tied weights)",
        ),
        (make_mlp, {"wrap": "0"}, InvalidArgument, "wrap must be a callable module -> bool"),
        (make_mlp, {"wrap": lambda m: m.missing}, InvalidArgument, "wrap(model.0) raised AttributeError"),
        (make_mlp, {"mp_policy": {"reduce": torch.bfloat16}}, InvalidArgument, "mp_policy has unknown argument(s)"),
        (make_mlp, {"mp_policy": {"reduce_dtype": torch.int8}}, InvalidArgument, "expected a floating torch.dtype"),
        (make_mlp, {"mp_policy": torch.bfloat16}, InvalidArgument, "mp_policy must be a mapping"),
        (make_mlp, {"shards": [[0, 1, 2]]}, InvalidArgument, "shards has 1 index list(s) but world_size=2"),
        (make_mlp, {"micro_batches": 5}, InvalidArgument, "rank 0 has 4 sample(s), fewer than micro_batches=5"),
        (make_mlp, {"weights": [1.0]}, InvalidArgument, "weights has shape (1,)"),
        (lambda: make_mlp(), {}, InvalidArgument, "make_model must be importable by the child processes"),
    ],
)
def test_bad_arguments_and_unshardable_modules_are_refused_before_any_process_starts(
    factory: Any, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error) as info:
        assert_fsdp_equiv(factory, F.mse_loss, X, Y, **kwargs)
    assert message in str(info.value)
    assert multiprocessing.active_children() == []


# --------------------------------------------------------------------------- failures, time-outs, clean-up


def make_model_unsupported_in_ranks() -> nn.Module:
    if dist.is_initialized():
        raise UnsupportedModelError("this model cannot be sharded here")
    return make_mlp()


def test_a_refusal_in_a_rank_keeps_its_type() -> None:
    """A rank's UnsupportedModelError (fully_shard refusing a module at run time) reaches the caller as one."""
    with pytest.raises(UnsupportedModelError, match=r"rank [01] of 2: this model cannot be sharded here"):
        assert_fsdp_equiv(make_model_unsupported_in_ranks, F.mse_loss, X, Y, timeout=30)
    assert_no_ranks_left()


def test_an_exception_in_a_rank_is_reported_with_its_traceback() -> None:
    with pytest.raises(ddp.DDPWorkerError) as info:
        assert_fsdp_equiv(make_mlp, fails_on_rank_1, X, Y, timeout=30)
    assert info.value.rank == 1
    assert "rank 1 of 2 failed: ValueError: labels out of range on rank 1" in str(info.value)
    assert "fails_on_rank_1" in info.value.remote_traceback
    assert_no_ranks_left()


def test_a_rank_that_never_finishes_times_out_and_nothing_is_left_behind(used_ports: list[int]) -> None:
    start = time.monotonic()
    with pytest.raises(ddp.DDPTimeoutError) as info:
        assert_fsdp_equiv(make_mlp, hangs_on_rank_1, X, Y, timeout=5)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "assert_fsdp_equiv ran out of time (timeout=5 s) before every rank finished the step" in text
    assert "rank 1 was in the forward pass and the loss (micro-batch 1 of 1)" in text
    assert "FSDP's parameter all-gathers and gradient reduce-scatters" in text
    assert 1 in info.value.ranks_pending
    assert elapsed < 5 + ddp.launch.TERM_GRACE + 5
    assert_no_ranks_left()
    assert_port_free(used_ports[-1])
    assert assert_fsdp_equiv(make_mlp, F.mse_loss, X, Y).passed  # and the next check runs as usual


# --------------------------------------------------------------------------- the words, from figures alone


def fsdp_report(*findings: Finding) -> GradEquivReport:
    params = (ParamComparison("0.weight", (4, 3), 1.0, 0.5, 1e-4, 0.9, 1.2, 12, 12),)
    report = GradEquivReport(
        passed=False,
        check="fsdp",
        backend="torch",
        batch_size=4,
        dtype="float32",
        device="cpu",
        reduction="mean",
        weighted=True,
        matched=None,
        working=Comparison("weighted mean", "float32", 1e-4, 0.0, params, 1.0),
    )
    report.findings = findings
    return report


@pytest.mark.parametrize(
    ("finding", "words"),
    [
        (
            OwnCountPerRank(totals=((21.0,), (17.0,), (30.0,)), world_size=3),
            "each rank divided its loss by its own token count (ranks: 21, 17 and 30 tokens); divide by the token "
            "count over all ranks (all-reduce it) instead. FSDP averages the ranks' gradients, so a token counts "
            "1/63 on rank 0, 1/51 on rank 1, 1/90 on rank 2 instead of 1/68: loss = sum over the rank's tokens / "
            "all-reduced token count * 3 (world_size).",
        ),
        (
            OwnCountPerRank(totals=((1.5,), (2.5,)), integral=False, world_size=2),
            "each rank divided its loss by its own total weight (ranks: 1.5 and 2.5 weight)",
        ),
        (
            OwnCountPerRank(level="micro-batch", totals=((4.0, 5.0), (6.0, 7.0)), world_size=2),
            "each micro-batch divided its loss by its own token count (rank 0: 4+5, rank 1: 6+7 tokens)",
        ),
        (InitDiffers(ranks=(1, 3)), "ranks disagree on the model: ranks 1 and 3 built other initial parameters"),
        (
            ScaledGradient(factor=0.5, world_size=2, micro_batches=1, cause="sum-over-ranks"),
            "FSDP averages the ranks' gradients (it divides by world_size=2), but the loss is a sum",
        ),
    ],
)
def test_each_cause_is_said_from_its_figures_in_fsdp_words(finding: Finding, words: str) -> None:
    text = str(fsdp_report(finding))
    cause = next(line for line in text.splitlines() if line.startswith("Cause: "))
    assert words in cause
    assert "DDP" not in text


def test_the_matched_label_of_a_token_count_finding() -> None:
    assert OwnCountPerRank().matched == "each rank's loss divided by its own token count"
    assert OwnCountPerRank(integral=False).matched == "each rank's loss divided by its own total weight"
    assert OwnCountPerRank(level="micro-batch").matched == "each micro-batch's loss divided by its own token count"
    assert OwnCountPerRank().kind == "known-weights"


def test_the_notes_of_an_fsdp_run() -> None:
    run = DDPRun(
        world_size=2,
        backend="gloo",
        shards=((0, 1), (2, 3)),
        shard_source="contiguous",
        micro_batches=2,
        batch_size=4,
        check="fsdp",
        units=("block",),
        mixed_precision=(("param_dtype", "bfloat16"), ("reduce_dtype", "bfloat16")),
        precision=("bfloat16", 0.04),
        rank_weights=(21.0, 17.0),
        weights_integral=True,
    )
    assert run_notes(run) == [
        "FSDP step on 2 ranks (gloo), fully_shard on model.block and the root, shards of 2 and 2 samples "
        "(contiguous split: [0, 1]; [2, 3]), 2 micro-batches per rank accumulated with "
        "set_requires_gradient_sync(False) (the last one synchronised), each loss back-propagated as is.",
        "mixed precision: MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16); the "
        "gradient reduction ran in bfloat16, so the comparison uses bfloat16's tolerance (rtol=0.04); the "
        "float64 re-check runs the step without the policy.",
        "the reference weights each sample by its declared weight (38 tokens in all; per rank: 21 and 17).",
    ]


# --------------------------------------------------------------------------- inside pytest


PYTESTER_FILE = """
import pytest, torch, torch.distributed as dist, torch.nn.functional as F
from torch import nn
from pytest_gradcheck import GradEquivError, assert_fsdp_equiv

def make_model():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))

def per_rank_mean(out, y):
    return F.mse_loss(out, y)

def test_fsdp_step():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    assert assert_fsdp_equiv(make_model, F.mse_loss, x, y).passed

@pytest.mark.xfail(strict=True, raises=GradEquivError)
def test_fsdp_uneven_shards():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)
    assert_fsdp_equiv(make_model, per_rank_mean, x, y, shards=[range(5), range(5, 8)])
"""


def _plugin_args() -> list[str]:
    return [] if importlib.util.find_spec("pytest_gradcheck.plugin") else ["-p", "no:gradcheck"]


def test_test_module_factories_under_xdist_and_importlib_mode(pytester: pytest.Pytester) -> None:
    """Two xdist workers, each with its own forkserver and ranks; the ranks load the test module by
    file (importlib mode: it is not importable by name)."""
    pytester.makepyfile(test_user_fsdp=PYTESTER_FILE)
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "-p", "no:benchmark", "-n", "2", "--import-mode=importlib", *_plugin_args()
    )
    result.assert_outcomes(passed=1, xfailed=1)


def test_exported_lazily_and_documented() -> None:
    assert "assert_fsdp_equiv" in pytest_gradcheck.__all__
    assert pytest_gradcheck.assert_fsdp_equiv is ddp.fsdp.assert_fsdp_equiv is ddp.assert_fsdp_equiv
    for module in (ddp.fsdp, ddp.config, report_ddp):
        failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert failures == 0
