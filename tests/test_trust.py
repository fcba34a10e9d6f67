"""Trust on real-shaped models: no false alarm on correct code, and the right cause.

One section per class of failure found on third-party-style models (issue 15):
zero-gradient parameters, randomness no module switch reaches, state written in
forward, scale errors confined to some parameters, weightings to name, wrong
declared weights, and tensors the model keeps. The models live in
``realistic_models.py`` and are also written into pytester files, so the plugin is
tried as users run it.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from realistic_models import (
    SOURCE,
    CachingNet,
    ConvGroupNorm,
    CustomOpNet,
    QKVAttention,
    RunningCentering,
    TinyCausalLM,
)
from torch import nn

from pytest_gradcheck import (
    GradEquivError,
    UnsupportedModelError,
    assert_accumulation_equiv_step,
    assert_batch_independent,
    assert_gradequiv,
    assert_gradequiv_numpy,
    assert_gradequiv_step,
)
from pytest_gradcheck.compare import rounding_shrink_limit
from pytest_gradcheck.report import Comparison, ParamComparison
from pytest_gradcheck.verdict import run_check


def lm_batch(seed: int = 0, b: int = 4, t: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (b, t), generator=g)
    labels = ids.clone()
    for i, keep in enumerate([8, 3, 10, 12][:b]):
        labels[i, keep:] = -100  # padding: 7, 2, 9, 11 counted tokens after the shift
    return {"input_ids": ids, "labels": labels}


def lm_step(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["input_ids"], batch["labels"])


def shifted_tokens(batch: dict) -> torch.Tensor:
    return (batch["labels"][:, 1:] != -100).sum()


# --------------------------------------------------------------------------- 1. zero true gradients


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_attention_key_bias_is_rounding_noise_not_a_bug(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = QKVAttention().to(dtype)
    x, y = torch.randn(64, 10, 32, dtype=dtype), torch.randn(64, 32, dtype=dtype)
    report = assert_gradequiv(model, F.mse_loss, x, y)
    assert report.passed and not report.vacuous
    kbias = next(p for p in report.parameters if p.name == "k.bias")
    # its gradient is pure noise, far below the scale of the problem it is judged against
    assert kbias.max_abs_err < 1e-6 * report.final.scale


def test_a_conv_bias_before_groupnorm_passes_at_large_batch() -> None:
    torch.manual_seed(1)
    report = assert_gradequiv(ConvGroupNorm(), F.cross_entropy, torch.randn(128, 3, 8, 8), torch.randint(0, 4, (128,)))
    assert report.passed


def test_a_model_whose_gradients_are_all_zero_passes_with_a_flag_and_a_note() -> None:
    class Ignores(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(1) + 0.0 * self.w.sum()

    report = assert_gradequiv(Ignores(), F.mse_loss, torch.randn(8, 3), torch.randn(8))
    assert report.passed and report.vacuous
    assert "could see nothing" in str(report) and "zero" in report.summary()


def test_the_seed_000_bug_is_still_caught_beside_zero_gradient_rules() -> None:
    torch.manual_seed(0)
    xor = nn.Sequential(nn.Linear(2, 4), nn.Sigmoid(), nn.Linear(4, 1), nn.Sigmoid())
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(xor, lambda out, t: (out - t).pow(2).mean(), x, y, broadcast="off")
    assert not info.value.report.passed and info.value.report.float64 is not None


class _Problem:
    """A GradientProblem whose float32 error is noise and whose float64 error shrank, but
    not below the float64 tolerance: the shrink tells rounding from a bug."""

    backend, batch_size, dtype, device = "numpy", 4, "float32", "cpu"
    reference_method, fallback_reason = "vmap", None
    dropout_disabled: tuple = ()
    broadcasts: tuple = ()

    def __init__(self, shrink: float) -> None:
        self.shrink = shrink

    def batch_gradient(self, float64: bool) -> dict:
        noise = 1e-3 * (self.shrink if float64 else 1.0)
        return {"w": np.array([1.0, 2.0]), "bias": np.array([noise, -noise])}

    def reference_gradient(self, coeffs: np.ndarray, float64: bool) -> dict:
        return {"w": np.array([1.0, 2.0]), "bias": np.zeros(2)}  # reduction="sum": coefficients are 1

    def per_sample_gradients(self, float64: bool) -> None:
        return None

    def weight_candidates(self) -> list:
        return []

    def loss_values(self, float64: bool) -> None:
        return None


def test_an_error_that_shrinks_like_rounding_in_float64_is_rounding() -> None:
    limit = rounding_shrink_limit("float32")
    report = run_check(_Problem(shrink=limit / 10), reduction="sum")
    assert report.passed and report.rounding
    bias = next(p for p in report.float64.params if p.name == "bias")
    assert bias.rounding and bias.max_abs_err > bias.allowed
    assert "shrink in float64 as rounding error does" in str(report)


def test_an_error_that_does_not_shrink_in_float64_is_a_bug() -> None:
    with pytest.raises(GradEquivError) as info:
        run_check(_Problem(shrink=0.5), reduction="sum")
    bias = next(p for p in info.value.report.float64.params if p.name == "bias")
    assert not bias.rounding and not bias.passed


# --------------------------------------------------------------------------- 2. randomness


def test_a_causal_lm_with_functional_attention_dropout_passes_in_train_mode() -> None:
    torch.manual_seed(0)
    model = TinyCausalLM().train()
    batch = lm_batch()
    report = assert_gradequiv_step(lm_step, model, batch, weights=shifted_tokens)
    assert report.passed and model.training
    said = " ".join(report.dropout_disabled)
    assert "scaled_dot_product_attention(p=0.1)" in said and "model.drop" in said
    # nothing the user can see was changed: rates, flags and modes are as they were
    assert model.blocks[0].attn_dropout == 0.1 and model.blocks[0].resid_dropout.p == 0.1
    assert all(m.training for m in model.modules())


def test_batch_independence_of_a_causal_lm_in_train_mode() -> None:
    torch.manual_seed(0)
    report = assert_batch_independent(TinyCausalLM().train(), lm_batch()["input_ids"])
    assert report.passed
    assert any("scaled_dot_product_attention" in d for d in report.dropout_disabled)


def test_noise_in_the_step_is_named_as_randomness_with_its_line() -> None:
    class Noisy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x + 0.1 * torch.randn_like(x))

    with pytest.raises(UnsupportedModelError) as info:
        assert_gradequiv(Noisy(), F.mse_loss, torch.randn(8, 4), torch.randn(8, 2))
    text = str(info.value)
    assert "training step is random" in text and "torch.randn_like at " in text and "test_trust.py:" in text
    assert "interact" not in text


@pytest.mark.parametrize("generator", ["numpy", "random"])
def test_noise_from_numpy_or_python_generators_is_named(generator: str) -> None:
    class Jitter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            import random

            scale = float(np.random.rand()) if generator == "numpy" else random.random()
            return self.fc(x) * (1.0 + scale)

    name = "NumPy's global np.random" if generator == "numpy" else "Python's random module"
    with pytest.raises(UnsupportedModelError, match=f"training step is random.*{name}"):
        assert_gradequiv(Jitter(), F.mse_loss, torch.randn(8, 4), torch.randn(8, 2), reference="loop")


def test_random_draws_that_do_not_change_the_gradient_are_left_alone() -> None:
    class LayerDrop(nn.Module):  # draws every step in train mode, drops nothing at rate 0
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.layerdrop = 0.0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                if self.training and torch.rand([]) < self.layerdrop:
                    continue
                x = torch.tanh(layer(x))
            return x

    report = assert_gradequiv(LayerDrop(), F.mse_loss, torch.randn(8, 4), torch.randn(8, 4))
    assert report.passed


# --------------------------------------------------------------------------- 3. state written in forward


def test_a_running_average_updated_in_forward_is_not_called_sample_mixing() -> None:
    torch.manual_seed(0)
    model = RunningCentering()
    model.running_mean.normal_()
    before = model.running_mean.clone(), model.steps.clone()
    report = assert_gradequiv(model, F.mse_loss, torch.randn(16, 6), torch.randn(16, 6))
    assert report.passed
    assert "writes into its own state" in (report.fallback_reason or "")
    assert torch.equal(model.running_mean, before[0]) and torch.equal(model.steps, before[1])


# --------------------------------------------------------------------------- 4. scale confined to some parameters


def test_a_custom_backward_scaling_one_weight_names_it() -> None:
    torch.manual_seed(0)
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(CustomOpNet(), F.mse_loss, torch.randn(8, 6), torch.randn(8, 1))
    text = str(info.value)
    assert "fc1.weight: B times the reference (B=8); every other parameter matches" in text
    assert "interact" not in text and "assert_batch_independent" not in text
    assert "custom torch.autograd.Function" in text


def test_numpy_backprop_dividing_biases_twice_names_them_and_gives_numpy_advice() -> None:
    rng = np.random.default_rng(0)
    params = {"W1": rng.normal(size=(3, 5)), "b1": rng.normal(size=5), "W2": rng.normal(size=(5, 1)), "b2": np.zeros(1)}
    x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 1))

    def grad_fn(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        b = x.shape[0]
        h = np.tanh(x @ p["W1"] + p["b1"])
        d = 2 * (h @ p["W2"] + p["b2"] - y) / b
        dh = (d @ p["W2"].T) * (1 - h**2)
        return {"W1": x.T @ dh, "b1": dh.sum(0) / b, "W2": h.T @ d, "b2": d.sum(0) / b}  # biases: /B twice

    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_numpy(grad_fn, params, x, y)
    text = str(info.value)
    assert "b1, b2: 1/B of the reference (B=5); every other parameter matches" in text
    assert "grad_fn" in text and "assert_batch_independent" not in text


# --------------------------------------------------------------------------- 5. weightings named


def test_token_weighting_of_a_causal_lm_with_shifted_labels_is_named_with_counts() -> None:
    torch.manual_seed(0)
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_step(lm_step, TinyCausalLM().eval(), lm_batch())
    text = str(info.value)
    assert "labels[:, 1:] != -100" in text and ": 7, 2, 9, 11." in text
    assert info.value.report.would_match and "labels[:, 1:]" in info.value.report.would_match


def test_ignore_index_with_class_targets_is_named_not_a_bare_factor() -> None:
    torch.manual_seed(0)
    targets = torch.tensor([1, -100, 2, 3, -100, 4, 0, 1])
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(nn.Linear(6, 5), F.cross_entropy, torch.randn(8, 6), targets)
    text = str(info.value)
    assert "6 of 8 samples whose target is not ignore_index=-100" in text
    assert "1.333 times" not in text
    assert assert_gradequiv(
        nn.Linear(6, 5), F.cross_entropy, torch.randn(8, 6), targets, weights=lambda t: (t != -100).sum()
    ).passed


def test_accumulating_micro_batch_means_names_the_token_weighting_per_micro_batch() -> None:
    torch.manual_seed(0)
    batch = lm_batch(b=4)
    with pytest.raises(GradEquivError) as info:
        assert_accumulation_equiv_step(lm_step, TinyCausalLM().eval(), batch, micro_batches=2)
    text = str(info.value)
    assert "micro-batches are weighted by" in text and "labels[:, 1:] != -100" in text
    assert ": 9, 20." in text  # 7 + 2 and 9 + 11 tokens
    assert "per-sample" not in text.split("Cause:")[1]


def test_unnamed_weights_proportional_to_small_integers_are_printed_as_integers() -> None:
    counts = torch.tensor([9.0, 2.0, 6.0, 4.0])

    def weighted(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # a hidden per-sample count
        return ((out - y).pow(2).mean(1) * counts).sum() / counts.sum()

    torch.manual_seed(0)
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(nn.Linear(5, 3), weighted, torch.randn(4, 5), torch.randn(4, 3))
    assert "in proportion to 9, 2, 6, 4: a count per sample" in str(info.value)


# --------------------------------------------------------------------------- 6. wrong declared weights


def test_wrong_declared_weights_say_the_plain_mean_matches() -> None:
    torch.manual_seed(0)
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(
            nn.Linear(6, 5),
            F.mse_loss,
            torch.randn(4, 6),
            torch.randn(4, 5),
            weights=torch.tensor([1.0, 2.0, 3.0, 4.0]),
        )
    report = info.value.report
    assert report.would_match == "mean (unweighted)"
    assert "plain (unweighted) mean" in str(info.value) and "neither mean nor sum" not in str(info.value)


# --------------------------------------------------------------------------- 8. tensors the model keeps


def test_tensors_a_model_or_its_hooks_keep_are_left_as_found_and_usable() -> None:
    torch.manual_seed(0)
    model = CachingNet()
    acts: dict[str, torch.Tensor] = {}
    log: list[torch.Tensor] = []
    model.fc.register_forward_hook(lambda m, i, o: acts.__setitem__("fc", o))
    model.register_forward_hook(lambda m, i, o: log.append(o.detach()))
    model(torch.randn(2, 5))  # the user's own forward: what it stored must survive the check
    last, act, logged, calls = model.last, acts["fc"], list(log), model.calls
    report = assert_gradequiv(model, F.mse_loss, torch.randn(8, 5), torch.randn(8, 3))
    assert report.passed
    assert model.last is last and acts["fc"] is act and log == logged and model.calls == calls
    assert float(model.last.sum()) == float(last.sum())  # usable: no vmap-internal tensor
    fresh = CachingNet()
    assert_gradequiv(fresh, F.mse_loss, torch.randn(8, 5), torch.randn(8, 3))
    assert not hasattr(fresh, "last") and fresh.calls == 0


# --------------------------------------------------------------------------- as users run it


def test_real_shaped_models_through_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        realistic_models=SOURCE,
        test_user=textwrap.dedent(
            """
            import pytest, torch
            import torch.nn.functional as F
            from realistic_models import CustomOpNet, QKVAttention, TinyCausalLM

            @pytest.mark.gradequiv
            def test_attention(gradequiv):
                torch.manual_seed(0)
                gradequiv(QKVAttention(), F.mse_loss, torch.randn(64, 10, 32), torch.randn(64, 32))

            @pytest.mark.gradequiv
            def test_lm_in_train_mode(gradequiv):
                torch.manual_seed(0)
                ids = torch.randint(0, 64, (4, 12))
                labels = ids.clone(); labels[1, 4:] = -100
                gradequiv.step(lambda m, b: m(*b), TinyCausalLM().train(), (ids, labels),
                               weights=lambda b: (b[1][:, 1:] != -100).sum())

            @pytest.mark.gradequiv
            def test_custom_op(gradequiv):
                torch.manual_seed(0)
                gradequiv(CustomOpNet(), F.mse_loss, torch.randn(8, 6), torch.randn(8, 1))
            """
        ),
    )
    result = pytester.runpytest("-p", "no:cacheprovider", "--strict-markers")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*Cause: the mismatch is confined to some parameters*fc1.weight: B times*"])
    result.stdout.no_fnmatch_line("*interact*")


def test_comparison_figures_carry_the_problem_scale() -> None:
    cmp = Comparison("mean", "float32", 1e-4, 0.0, (ParamComparison("w", (2,), 0.0, 0.0, 0.0, 1.0, 1.0, 0, 2),), 3.0)
    assert cmp.scale == 3.0 and cmp.passed
