"""Per-sample gradients: the tool's on request, and the user's checked against them (issue 21, item 4)."""

from __future__ import annotations

import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from pytest_gradcheck import (
    GradEquivError,
    InvalidArgument,
    assert_gradequiv,
    assert_gradequiv_step,
    assert_per_sample_gradients,
)


def mlp_case(b: int = 6) -> tuple[nn.Module, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    x, y = torch.randn(b, 5), torch.randn(b, 2)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict, xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(functional_call(model, p, (xi[None],)), yi[None])

    return model, x, y, vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def test_correct_per_sample_gradients_pass() -> None:
    model, x, y, ps = mlp_case()
    report = assert_per_sample_gradients(model, F.mse_loss, x, y, grads=ps)
    assert report.passed and report.check == "grad-sample"
    assert len(report.parameters) == 4 * 6  # one row per (parameter, sample)
    assert report.parameters[0].name == "0.weight[0]"


def test_a_grad_sampler_off_by_b_names_parameter_samples_and_factor() -> None:
    model, x, y, ps = mlp_case()
    bad = {**ps, "0.weight": ps["0.weight"] * 6}
    with pytest.raises(GradEquivError) as info:
        assert_per_sample_gradients(model, F.mse_loss, x, y, grads=bad)
    text = str(info.value)
    first, verdict = text.splitlines()[:2]
    assert first == "per-sample gradient rows of 0.weight: B times the reference (B=6), in all 6 samples"
    assert verdict.startswith("Per-sample gradients are NOT equivalent: 6 of 24")
    assert "0.weight: B times the reference (B=6), in all 6 samples." in text
    assert "2.bias" not in text.split("Cause:")[1]


def test_a_grad_sampler_summing_over_the_batch_is_named() -> None:
    model, x, y, ps = mlp_case()
    bad = {**ps, "2.bias": ps["2.bias"].sum(0, keepdim=True).expand(6, 2)}
    with pytest.raises(GradEquivError, match=r"2\.bias: every differing row holds the SUM of the batch"):
        assert_per_sample_gradients(model, F.mse_loss, x, y, grads=bad)


def test_one_wrong_sample_is_named() -> None:
    model, x, y, ps = mlp_case()
    w = ps["2.weight"].clone()
    w[3] = torch.randn_like(w[3])
    with pytest.raises(GradEquivError, match=r"2\.weight: the rows differ in sample 3 of 6"):
        assert_per_sample_gradients(model, F.mse_loss, x, y, grads={**ps, "2.weight": w})


def test_supplied_float32_gradients_are_not_held_to_float64_tolerance() -> None:
    # rows computed in float32 by a different route (a loop, not vmap) pass
    model, x, y, _ = mlp_case(b=64)
    rows = [
        torch.autograd.grad(F.mse_loss(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())) for i in range(64)
    ]
    names = [n for n, _ in model.named_parameters()]
    grads = {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}
    assert assert_per_sample_gradients(model, F.mse_loss, x, y, grads=grads).passed


def test_bad_per_sample_arguments_get_clear_errors() -> None:
    model, x, y, ps = mlp_case()
    with pytest.raises(
        InvalidArgument, match=r"grads\['0.weight'\] has shape \(4, 5\), expected \(B, \*param.shape\) = \(6, 4, 5\)"
    ):
        assert_per_sample_gradients(model, F.mse_loss, x, y, grads={**ps, "0.weight": ps["0.weight"].sum(0)})
    with pytest.raises(InvalidArgument, match="no entry for '2.bias'"):
        assert_per_sample_gradients(model, F.mse_loss, x, y, grads={k: v for k, v in ps.items() if k != "2.bias"})
    with pytest.raises(InvalidArgument, match="'fc.weight'.*not trainable parameters"):
        assert_per_sample_gradients(model, F.mse_loss, x, y, grads={**ps, "fc.weight": ps["0.weight"]})
    with pytest.raises(InvalidArgument, match="has no grad_sample"):
        assert_per_sample_gradients(model, F.mse_loss, x, y)


def test_grad_sample_read_from_the_model() -> None:
    model, x, y, ps = mlp_case()
    for name, p in model.named_parameters():
        p.grad_sample = ps[name].clone()
    kept = {n: p.grad_sample for n, p in model.named_parameters()}
    assert assert_per_sample_gradients(model, F.mse_loss, x, y).passed
    assert all(p.grad_sample is kept[n] for n, p in model.named_parameters())


def test_opacus_grad_sample_module() -> None:
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(0)
    gsm = opacus.GradSampleModule(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)))
    x, y = torch.randn(6, 5), torch.randn(6, 2)
    F.mse_loss(gsm(x), y).backward()
    assert assert_per_sample_gradients(gsm, F.mse_loss, x, y).passed


@pytest.mark.parametrize("form", ["loss", "step"])
def test_the_tools_per_sample_gradients_on_request(form: str) -> None:
    model, x, y, ps = mlp_case()
    if form == "loss":
        report = assert_gradequiv(model, F.mse_loss, x, y, per_sample=True)
    else:
        report = assert_gradequiv_step(lambda m, b: F.mse_loss(m(b[0]), b[1]), model, (x, y), per_sample=True)
    got = report.per_sample_gradients
    assert set(got) == set(ps)
    for name in ps:
        torch.testing.assert_close(got[name], ps[name])
    assert assert_gradequiv(model, F.mse_loss, x, y).per_sample_gradients is None


def test_per_sample_gradients_on_a_failing_check_and_through_the_fixture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user=textwrap.dedent(
            """
            import pytest, torch
            import torch.nn.functional as F
            from pytest_gradcheck import GradEquivError

            @pytest.mark.gradequiv
            def test_rows(gradequiv):
                torch.manual_seed(0)
                model = torch.nn.Linear(3, 2)
                x, y = torch.randn(4, 3), torch.randn(4, 2)
                with pytest.raises(GradEquivError) as info:
                    gradequiv(model, lambda o, t: ((o - t) ** 2).sum(), x, y, per_sample=True)
                rows = info.value.report.per_sample_gradients
                assert rows["weight"].shape == (4, 2, 3)
                gradequiv.per_sample_gradients(model, lambda o, t: ((o - t) ** 2).sum(), x, y,
                                               grads=rows)
            """
        )
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
