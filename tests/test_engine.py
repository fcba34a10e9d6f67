"""Unit tests of the torch engine: verdicts, diagnoses, state restoration, bad input."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_gradcheck import (
    BroadcastError,
    BroadcastWarning,
    GradEquivError,
    InvalidArgument,
    UnsupportedModelError,
    allow_broadcast,
    assert_gradequiv,
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def mlp(d_in: int = 4, hidden: int = 8, d_out: int = 1, depth: int = 2, act: type = nn.Tanh) -> nn.Module:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), act()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


def sum_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).sum()


# --------------------------------------------------------------------------- correct code passes


@pytest.mark.parametrize("b", [2, 7, 64])
def test_mean_mse_passes(b: int) -> None:
    report = assert_gradequiv(mlp(), F.mse_loss, torch.randn(b, 4), torch.randn(b, 1))
    assert report.passed and report.matched == "mean"
    assert report.reference_method == "vmap" and report.fallback_reason is None
    assert {p.name for p in report.parameters} == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert "Gradients are equivalent" in str(report)


def test_sum_loss_passes_with_sum_reduction() -> None:
    report = assert_gradequiv(mlp(), sum_mse, torch.randn(6, 4), torch.randn(6, 1), reduction="sum")
    assert report.matched == "sum"


@pytest.mark.parametrize("loss, expected", [(F.mse_loss, "mean"), (sum_mse, "sum")])
def test_auto_reports_the_reduction_that_holds(loss, expected: str) -> None:
    report = assert_gradequiv(mlp(), loss, torch.randn(5, 4), torch.randn(5, 1), reduction="auto")
    assert report.matched == expected


def test_deep_tanh_mlp_float32_large_batch_no_false_positive() -> None:
    model = mlp(d_in=32, hidden=64, depth=6)
    x, y = torch.randn(512, 32), torch.randn(512, 1)
    report = assert_gradequiv(model, F.mse_loss, x, y)
    assert report.passed


def test_float64_model_passes() -> None:
    model = mlp().double()
    report = assert_gradequiv(
        model, F.mse_loss, torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 1, dtype=torch.float64)
    )
    assert report.passed and report.dtype == "float64" and report.float64 is None


def test_conv_net_with_class_targets_passes() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)
    )
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 5, (8,))
    assert assert_gradequiv(model, F.cross_entropy, x, y).passed


def test_embedding_with_class_targets_and_label_smoothing_passes() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(self.emb(ids).mean(dim=1))

    ids, y = torch.randint(0, 50, (10, 6)), torch.randint(0, 3, (10,))
    weight = torch.tensor([1.0, 2.0, 0.5])
    # Per-class weights make cross_entropy a *weighted* mean over the batch, so
    # the plain mean holds only without them.
    assert assert_gradequiv(Bag(), lambda o, t: F.cross_entropy(o, t, label_smoothing=0.1), ids, y).passed
    report = assert_gradequiv(
        Bag(), lambda o, t: F.cross_entropy(o, t, weight=weight), ids, y, weights=lambda t: weight[t].sum()
    )
    assert report.passed and report.matched == "weighted mean"


def test_layernorm_and_gelu_pass() -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 2))
    assert assert_gradequiv(model, F.mse_loss, torch.randn(12, 6), torch.randn(12, 2)).passed


def test_attention_with_padding_mask_as_second_input_passes() -> None:
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.1, batch_first=True)
            self.head = nn.Linear(16, 1)

        def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
            h = self.layer(x, src_key_padding_mask=pad)
            keep = (~pad).unsqueeze(-1).to(h.dtype)
            return self.head((h * keep).sum(1) / keep.sum(1))

    b, t = 6, 5
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[0, 3:] = True
    pad[4, 1:] = True
    report = assert_gradequiv(Encoder(), F.mse_loss, (torch.randn(b, t, 16), pad), torch.randn(b, 1))
    assert report.passed
    assert any("dropout" in name or "layer" in name for name in report.dropout_disabled)


def test_dropout_is_switched_off_and_said() -> None:
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 1))
    model.train()
    report = assert_gradequiv(model, F.mse_loss, torch.randn(16, 4), torch.randn(16, 1))
    assert report.dropout_disabled == ("model.2",)
    assert "dropout was switched off" in str(report)
    assert model[2].training  # restored


def test_tuple_inputs_and_tuple_targets() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return self.a(u) * self.b(v)

    def loss(out: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (w * (out - y) ** 2).mean()

    u, v, y, w = torch.randn(7, 3), torch.randn(7, 5), torch.randn(7, 2), torch.rand(7, 1)
    assert assert_gradequiv(Two(), loss, (u, v), (y, w)).passed


def test_targets_none_calls_loss_on_output_only() -> None:
    assert assert_gradequiv(mlp(), lambda out: (out**2).mean(), torch.randn(5, 4)).passed


def test_frozen_parameters_are_skipped() -> None:
    model = mlp()
    model[0].weight.requires_grad_(False)
    report = assert_gradequiv(model, F.mse_loss, torch.randn(5, 4), torch.randn(5, 1))
    assert "0.weight" not in {p.name for p in report.parameters}


def test_loss_module_is_accepted_and_restored() -> None:
    loss = nn.MSELoss()
    loss.train()
    assert assert_gradequiv(mlp(), loss, torch.randn(5, 4), torch.randn(5, 1)).passed
    assert loss.training


# --------------------------------------------------------------------------- the seeds' bugs are caught


def xor_data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float32)
    return x, torch.tensor([0, 1, 1, 0], dtype=torch.float32)


def xor_net() -> nn.Module:
    return nn.Sequential(nn.Linear(2, 3), nn.Sigmoid(), nn.Linear(3, 1))


def test_seed000_label_shape_broadcast_is_caught_and_explained() -> None:
    x, labels = xor_data()
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(xor_net(), lambda out, y: (out - y).pow(2).mean(), x, labels)
    text = str(info.value)
    assert "not the mean of per-sample gradients" in text
    assert "implicit broadcast in the loss at tests/test_engine.py:" in text
    assert "sub((4, 1), (4,)) -> (4, 4)" in text
    assert "survives a float64 re-check" in text
    kinds = [f.kind for f in info.value.report.findings]
    assert kinds[0] == "broadcast" and "coupled" in kinds


def test_seed000_fixed_labels_pass_without_warning() -> None:
    x, labels = xor_data()
    with warnings.catch_warnings():
        warnings.simplefilter("error", BroadcastWarning)
        assert assert_gradequiv(xor_net(), lambda out, y: (out - y).pow(2).mean(), x, labels[:, None]).passed


@pytest.mark.parametrize("b", [2, 10, 100])
def test_seed002_mse_loss_with_extra_dim_is_caught(b: int) -> None:
    x = torch.linspace(0, 1, b).unsqueeze(1)
    y = (-4 * x).unsqueeze(1)  # (B, 1, 1): the noise tensor's extra dim
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(nn.Linear(1, 1), F.mse_loss, x, y)
    assert f"mse_loss(({b}, 1), ({b}, 1, 1)) -> ({b}, {b}, 1)" in str(info.value)


@pytest.mark.parametrize("b", [2, 20])
def test_seed003_sum_instead_of_mean_names_the_factor(b: int) -> None:
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(mlp(), sum_mse, torch.randn(b, 4), torch.randn(b, 1))
    text = str(info.value)
    assert "the batch gradient is the SUM of per-sample gradients" in text
    assert f"B={b} times the mean" in text
    report = info.value.report
    assert report.would_match == "sum"
    assert report.findings[0].kind == "factor" and report.findings[0].factor == pytest.approx(b, rel=1e-4)
    assert all(p.ratio == pytest.approx(b, rel=1e-3) for p in report.parameters)


def test_seed004_mean_where_sum_declared() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(mlp(), F.mse_loss, torch.randn(8, 4), torch.randn(8, 1), reduction="sum")
    assert "the batch gradient is the MEAN of per-sample gradients, not their sum" in str(info.value)
    assert info.value.report.would_match == "mean"


def test_double_division_names_one_over_b() -> None:
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(mlp(), lambda o, y: F.mse_loss(o, y) / o.shape[0], torch.randn(8, 4), torch.randn(8, 1))
    assert "1/B" in str(info.value)


def test_token_level_padding_loss_names_the_weighting_and_passes_when_declared() -> None:
    vocab, t = 11, 6

    class LM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, 8)
            self.out = nn.Linear(8, vocab)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.out(torch.tanh(self.emb(ids)))

    def token_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1), ignore_index=-100)

    ids = torch.randint(0, vocab, (5, t))
    y = torch.randint(0, vocab, (5, t))
    for i, n in enumerate([6, 2, 4, 1, 3]):
        y[i, n:] = -100
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(LM(), token_loss, ids, y)
    assert "weighted by their number of non-ignored targets" in str(info.value)
    report = assert_gradequiv(LM(), token_loss, ids, y, weights=lambda t: (t != -100).sum())
    assert report.matched == "weighted mean"


def test_cross_sample_leak_in_model_is_not_a_combination() -> None:
    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x - x.mean(dim=0, keepdim=True) ** 2)

    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(Leaky(), F.mse_loss, torch.randn(3, 4), torch.randn(3, 1))
    assert info.value.report.findings  # a cause is always stated
    assert "Cause:" in str(info.value)


# --------------------------------------------------------------------------- rounding is not a bug


def test_rounding_is_told_apart_by_the_float64_recheck() -> None:
    # B=300 (not a power of two): dividing by B rounds differently in the batch
    # mean and in the accumulated reference, as in seed 000's answer.
    model = mlp(d_in=16, hidden=64, depth=4)
    x, y = torch.randn(300, 16), torch.randn(300, 1)
    report = assert_gradequiv(model, F.mse_loss, x, y, rtol=1e-9)
    assert report.passed and report.rounding
    assert report.float64 is not None and report.float64.passed
    assert not report.working.passed
    assert "they were float32 rounding, not a bug" in str(report)


def test_without_recheck_a_too_tight_tolerance_fails() -> None:
    model = mlp(d_in=16, hidden=64, depth=4)
    x, y = torch.randn(300, 16), torch.randn(300, 1)
    with pytest.raises(GradEquivError):
        assert_gradequiv(model, F.mse_loss, x, y, rtol=1e-9, float64_recheck=False)


# --------------------------------------------------------------------------- the broadcast policy


def weighted_broadcast_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # (B, 1) * (1, B) pairs every sample with every other, yet each sample's loss is its own.
    return ((out - y) * torch.ones(1, len(y))).pow(2).mean()


def test_broadcast_that_does_not_change_gradients_warns() -> None:
    with pytest.warns(BroadcastWarning, match=r"mul\(\(5, 1\), \(1, 5\)\) -> \(5, 5\)"):
        report = assert_gradequiv(mlp(), weighted_broadcast_loss, torch.randn(5, 4), torch.randn(5, 1))
    assert report.passed and report.broadcasts


def test_broadcast_error_mode_fails_even_if_gradients_agree() -> None:
    with pytest.raises(BroadcastError, match="expanded both operands"):
        assert_gradequiv(mlp(), weighted_broadcast_loss, torch.randn(5, 4), torch.randn(5, 1), broadcast="error")


def test_broadcast_off_and_allow_broadcast_are_silent() -> None:
    def allowed(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with allow_broadcast():
            return weighted_broadcast_loss(out, y)

    with warnings.catch_warnings():
        warnings.simplefilter("error", BroadcastWarning)
        assert_gradequiv(mlp(), weighted_broadcast_loss, torch.randn(5, 4), torch.randn(5, 1), broadcast="off")
        report = assert_gradequiv(mlp(), allowed, torch.randn(5, 4), torch.randn(5, 1), broadcast="error")
    assert report.broadcasts == ()


def test_broadcasts_inside_the_model_are_not_flagged() -> None:
    class Masked(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores = self.q(x) @ x.transpose(1, 2)  # (B, T, T)
            causal = torch.triu(torch.ones(x.shape[1], x.shape[1]), 1).bool()
            scores = scores.masked_fill(causal, float("-inf")) + torch.zeros(x.shape[0], 1, x.shape[1])
            return (scores.softmax(-1) @ x).mean(1)

    report = assert_gradequiv(Masked(), F.mse_loss, torch.randn(4, 5, 8), torch.randn(4, 8), broadcast="error")
    assert report.passed and not report.broadcasts


# --------------------------------------------------------------------------- models that mix samples


def test_batchnorm_in_train_mode_is_refused_with_its_path() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))
    with pytest.raises(UnsupportedModelError) as info:
        assert_gradequiv(model, F.mse_loss, torch.randn(6, 4), torch.randn(6, 1))
    text = str(info.value)
    assert "model.1 (BatchNorm1d) is in train mode" in text
    assert "model.eval()" in text and "GroupNorm/LayerNorm" in text
    model.eval()
    assert assert_gradequiv(model, F.mse_loss, torch.randn(6, 4), torch.randn(6, 1)).passed


def test_functional_dropout_is_neutralised_at_the_op_and_said() -> None:
    # F.dropout(training=True) called directly, in train and in eval mode: dropout is
    # switched off where it is applied, not only in nn.Dropout modules
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.dropout(x, 0.5, training=True))

    for model in (Noisy(), Noisy().eval()):
        report = assert_gradequiv(model, F.mse_loss, torch.randn(6, 4), torch.randn(6, 1))
        assert report.passed
        assert any("F.dropout(p=0.5)" in d for d in report.dropout_disabled)
        assert "F.dropout(p=0.5)" in str(report)


def test_randomness_other_than_dropout_is_refused_clearly() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x + 0.1 * torch.randn_like(x))

    x, y = torch.randn(6, 4), torch.randn(6, 1)
    with pytest.raises(
        UnsupportedModelError, match=r"training step is random.*torch\.randn_like at .*test_engine\.py:\d+"
    ):
        assert_gradequiv(Noisy(), F.mse_loss, x, y)


def test_vmap_incompatible_model_falls_back_to_a_loop_and_says_so() -> None:
    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = 2.0 if x.abs().max().item() > 100 else 1.0
            return self.fc(x) * scale

    report = assert_gradequiv(DataDependent(), F.mse_loss, torch.randn(40, 4), torch.randn(40, 1))
    assert report.passed and report.reference_method == "loop"
    assert report.fallback_reason and "per-sample loop" in str(report)
    with pytest.raises(InvalidArgument, match="vmap could not run"):
        assert_gradequiv(DataDependent(), F.mse_loss, torch.randn(4, 4), torch.randn(4, 1), reference="vmap")
    assert (
        assert_gradequiv(mlp(), F.mse_loss, torch.randn(4, 4), torch.randn(4, 1), reference="loop").reference_method
        == "loop"
    )


def test_loop_fallback_still_catches_the_sum_bug() -> None:
    with pytest.raises(GradEquivError, match="SUM"):
        assert_gradequiv(mlp(), sum_mse, torch.randn(5, 4), torch.randn(5, 1), reference="loop")


# --------------------------------------------------------------------------- state is left as found


def _snapshot(model: nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
        "py": random.getstate(),
        "np": np.random.get_state()[1].copy(),
        "dtype": torch.get_default_dtype(),
    }


def _assert_same(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    for k, v in before["state"].items():
        assert torch.equal(after["state"][k], v), k
    for n, g in before["grads"].items():
        assert (g is None and after["grads"][n] is None) or torch.equal(after["grads"][n], g), n
    assert after["modes"] == before["modes"]
    assert torch.equal(after["rng"], before["rng"])
    assert after["py"] == before["py"]
    assert np.array_equal(after["np"], before["np"])
    assert after["dtype"] == before["dtype"]


class Counting(nn.Module):
    """Has a buffer it updates in forward, dropout, and a submodule in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(8, 1)
        self.head.eval()
        self.register_buffer("calls", torch.zeros(()))
        self.bn = nn.BatchNorm1d(8).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.calls += 1
        return self.head(self.drop(self.bn(torch.tanh(self.fc(x)))))


@pytest.mark.parametrize("loss", [F.mse_loss, sum_mse], ids=["pass", "fail"])
def test_user_objects_are_left_as_found(loss) -> None:
    model = Counting()
    model.fc.weight.grad = torch.full_like(model.fc.weight, 3.0)
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    before = _snapshot(model)
    try:
        assert_gradequiv(model, loss, x, y)
    except GradEquivError:
        pass
    _assert_same(model, before)


class WritesThroughData(nn.Module):
    """Clips its weight and counts calls through ``.data``: writes that do not bump ``_version``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.fc.weight.data.mul_(0.5)
        self.calls.data.add_(1)
        return self.fc(x)


@pytest.mark.parametrize("loss", [F.mse_loss, sum_mse], ids=["pass", "fail"])
def test_writes_through_data_are_undone(loss) -> None:
    # regression: restore trusted the version counter, which `.data` writes do not bump
    model = WritesThroughData()
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    before = _snapshot(model)
    try:
        assert_gradequiv(model, loss, x, y, reference="loop")
    except GradEquivError:
        pass
    _assert_same(model, before)


class DrawsNumpyNormals(nn.Module):
    """Draws one legacy Gaussian on its first call: it moves the key, or only uses the cached one."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)
        self.drawn = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.drawn:
            self.drawn = True
            np.random.randn()
        return self.fc(x)


@pytest.mark.parametrize("cached_gaussian", [False, True])
def test_numpy_global_rng_is_restored_exactly(cached_gaussian: bool) -> None:
    np.random.seed(7)
    if cached_gaussian:
        np.random.randn()  # leaves has_gauss = 1: the next draw does not touch the key
    before = np.random.get_state()
    try:
        assert_gradequiv(DrawsNumpyNormals(), F.mse_loss, torch.randn(5, 4), torch.randn(5, 1), reference="loop")
    except GradEquivError:
        pass
    after = np.random.get_state()
    assert np.array_equal(after[1], before[1]) and after[2:] == before[2:]


def test_inputs_modified_in_place_by_the_model_are_not_the_users() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x.mul_(2)
            return self.fc(x)

    x = torch.randn(4, 3)
    x0 = x.clone()
    assert_gradequiv(InPlace(), F.mse_loss, x, torch.randn(4, 1))
    assert torch.equal(x, x0)


# --------------------------------------------------------------------------- bad input gets a clear error


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: assert_gradequiv(m, F.mse_loss, torch.randn(4, 4), torch.randn(3, 1)), "batch sizes disagree"),
        (lambda m: assert_gradequiv(m, F.mse_loss, torch.randn(1, 4), torch.randn(1, 1)), "batch size 1"),
        (lambda m: assert_gradequiv(m, F.mse_loss, torch.randn(0, 4), torch.randn(0, 1)), "empty batch"),
        (
            lambda m: assert_gradequiv(m, lambda o, y: (o - y) ** 2, torch.randn(4, 4), torch.randn(4, 1)),
            "not a scalar",
        ),
        (lambda m: assert_gradequiv(m, F.mse_loss, [[1.0] * 4] * 4, torch.randn(4, 1)), "not a tensor"),
        (lambda m: assert_gradequiv(m, F.mse_loss, (torch.randn(4, 4), 3), torch.randn(4, 1)), r"inputs\[1\] is a int"),
        (lambda m: assert_gradequiv(m, F.mse_loss, torch.randn(4, 4), torch.tensor(1.0)), "0-d tensor"),
        (
            lambda m: assert_gradequiv(m, lambda o, y: F.mse_loss(o, y).item(), torch.randn(4, 4), torch.randn(4, 1)),
            "not a tensor",
        ),
        (
            lambda m: assert_gradequiv(m, lambda o, y: F.mse_loss(o.detach(), y), torch.randn(4, 4), torch.randn(4, 1)),
            "does not depend",
        ),
        (lambda m: assert_gradequiv("model", F.mse_loss, torch.randn(4, 4), torch.randn(4, 1)), "torch.nn.Module"),
        (lambda m: assert_gradequiv(m, F.mse_loss, torch.randn(4, 4), torch.randn(4, 1), reduction="avg"), "reduction"),
        (lambda m: assert_gradequiv(m, F.mse_loss, torch.randn(4, 4), torch.randn(4, 1), rtol=-1), "rtol"),
        (
            lambda m: assert_gradequiv(m, F.mse_loss, torch.randn(4, 4), torch.randn(4, 1), weights=[1, 2]),
            "one weight per sample",
        ),
        (
            lambda m: assert_gradequiv(m, F.mse_loss, torch.randn(4, 4), torch.randn(4, 1), weights=[0, 0, 0, 0]),
            "sum to 0",
        ),
    ],
    ids=[
        "batch-disagree",
        "b1",
        "empty",
        "non-scalar",
        "non-tensor",
        "non-tensor-in-tuple",
        "0-d",
        "item",
        "detached",
        "not-module",
        "bad-reduction",
        "bad-rtol",
        "bad-weights",
        "zero-weights",
    ],
)
def test_bad_input_gets_a_clear_error(call, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        call(mlp())


def test_no_parameter_requiring_grad() -> None:
    model = mlp().requires_grad_(False)
    with pytest.raises(InvalidArgument, match="no parameter that requires grad"):
        assert_gradequiv(model, F.mse_loss, torch.randn(4, 4), torch.randn(4, 1))


def test_model_that_cannot_run_on_one_sample() -> None:
    class NeedsPairs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.shape[0] < 2:
                raise RuntimeError("need at least two rows")
            return self.fc(x)

    with pytest.raises(InvalidArgument, match="cannot run on a single sample"):
        assert_gradequiv(NeedsPairs(), F.mse_loss, torch.randn(4, 4), torch.randn(4, 1))


def test_error_types() -> None:
    assert issubclass(GradEquivError, AssertionError)
    assert issubclass(InvalidArgument, ValueError) and issubclass(InvalidArgument, TypeError)
    assert issubclass(UnsupportedModelError, InvalidArgument)


# --------------------------------------------------------------------------- any device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_model_passes_and_catches_the_sum_bug() -> None:
    model = mlp(d_in=16, hidden=64, depth=4).cuda()
    x, y = torch.randn(256, 16, device="cuda"), torch.randn(256, 1, device="cuda")
    report = assert_gradequiv(model, F.mse_loss, x, y)
    assert report.passed and report.device.startswith("cuda")
    with pytest.raises(GradEquivError, match="SUM"):
        assert_gradequiv(model, sum_mse, x, y)


def test_unidentifiable_weights_never_ask_for_an_impossible_batch() -> None:
    # Regression: with 2 gradient entries and B=2 the report asked for "a batch smaller than 2".
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * (1.0 + x.sum() - x)  # sample i's output depends on sample j

    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(Scaled(), F.mse_loss, torch.randn(2, 1), torch.randn(2, 1), broadcast="off")
    text = str(info.value)
    assert "smaller than 2" not in text and "smaller than 1" not in text
    assert "too few" in text


def test_model_that_reads_its_inputs_as_numpy_still_runs() -> None:
    # Inputs are handed to the model as grad-requiring aliases (no copy); a model
    # that calls .numpy() on them must get plain copies instead.
    class Numpyish(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scale = float(np.abs(x.numpy()).max() > -1)
            return self.fc(x) * scale

    report = assert_gradequiv(Numpyish(), F.mse_loss, torch.randn(5, 3), torch.randn(5, 1))
    assert report.passed and report.reference_method == "loop"


@pytest.mark.parametrize("rnn", ["gru", "lstm", "rnn"])
def test_recurrent_models_run_under_vmap(rnn: str) -> None:
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(30, 8)
            cls = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[rnn]
            self.rnn = cls(8, 12, num_layers=2, batch_first=True, bidirectional=(rnn == "lstm"), dropout=0.2)
            self.head = nn.Linear(12 * (2 if rnn == "lstm" else 1), 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out, _ = self.rnn(self.emb(ids))
            return self.head(out[:, -1])

    ids, y = torch.randint(0, 30, (16, 7)), torch.randint(0, 3, (16,))
    report = assert_gradequiv(Seq(), F.cross_entropy, ids, y)
    assert report.passed and report.reference_method == "vmap", report.fallback_reason
    assert report.dropout_disabled == ("model.rnn",)
    assert torch.backends.mkldnn.enabled  # switched off for the reference only
    with pytest.raises(GradEquivError, match="SUM"):
        assert_gradequiv(Seq(), lambda o, t: F.cross_entropy(o, t, reduction="sum"), ids, y)


def test_packed_sequences_still_fall_back_to_the_loop() -> None:
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(4, 6, batch_first=True)
            self.head = nn.Linear(6, 1)

        def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
            _, h = self.rnn(packed)
            return self.head(h[-1])

    x, lengths = torch.randn(5, 6, 4), torch.tensor([6, 3, 5, 1, 2])
    report = assert_gradequiv(Packed(), F.mse_loss, (x, lengths), torch.randn(5, 1))
    assert report.passed and report.reference_method == "loop"


def test_gradient_figures_match_numpy_for_strided_missing_and_half_gradients() -> None:
    """Torch gradients are compared as autograd returns them (no flat copy): expanded (stride 0),
    transposed, missing (None) and float16 gradients give NumPy's figures, in float64."""
    from pytest_gradcheck._torch.loss import loss_step_builder
    from pytest_gradcheck._torch.problem import TorchProblem
    from pytest_gradcheck.compare import Pair

    model = nn.Linear(3, 2)
    problem = TorchProblem(
        model,
        loss_step_builder(F.mse_loss, has_targets=True, targets_is_tuple=False),
        ((torch.randn(4, 3),), (torch.randn(4, 2),)),
    )
    w, b = problem.params
    expanded = torch.ones(()).expand(2, 3)  # stride 0, as autograd returns for sum()
    transposed = torch.arange(6.0).reshape(3, 2).t()  # non-contiguous
    other = {"weight": torch.full((2, 3), 0.5), "bias": torch.tensor([0.25, -1.0])}
    for grads in [(expanded, None), (transposed, torch.tensor([1.0, -2.0])), (transposed.half(), b.detach().half())]:
        named = problem._named(grads, [w, b])
        assert named["weight"].shape == (2, 3) and named["bias"].shape == (2,)
        as_numpy = {n: t.double().numpy() for n, t in named.items()}
        ref_numpy = {n: t.double().numpy() for n, t in other.items()}
        for k in (1.0, 0.25):
            torch_pair = Pair(named, other, ks=(k,))
            numpy_pair = Pair(as_numpy, ref_numpy, ks=(k,))
            assert torch_pair.ops is not numpy_pair.ops
            for n in ("weight", "bias"):  # float32 products either way: to float32's resolution
                assert torch_pair.b.amax[n] == numpy_pair.b.amax[n]
                assert torch_pair.b.sq[n] == pytest.approx(numpy_pair.b.sq[n], rel=1e-6)
                assert torch_pair.dot[n] == pytest.approx(numpy_pair.dot[n], rel=1e-6, abs=1e-300)
                assert torch_pair.max_diff(k)[n] == pytest.approx(numpy_pair.max_diff(k)[n], rel=1e-6)
            t_cmp = torch_pair.compare(k, 1e-4, 0.0, "mean", "float32")
            n_cmp = numpy_pair.compare(k, 1e-4, 0.0, "mean", "float32")
            for tp, np_ in zip(t_cmp.params, n_cmp.params):
                assert tp.mismatched == np_.mismatched and tp.passed == np_.passed
                assert [tp.max_abs_err, tp.cosine, tp.ratio] == pytest.approx(
                    [np_.max_abs_err, np_.cosine, np_.ratio], rel=1e-6, nan_ok=True
                )
