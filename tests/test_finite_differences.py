"""Tests of the finite-difference check (assert_grad_numpy) and its report's renderer."""

from __future__ import annotations

import numpy as np
import pytest
from numpy_nets import make_net, net_grad, net_loss, summed_grad

from pytest_gradcheck import GradEquivError, InvalidArgument, assert_grad_numpy
from pytest_gradcheck.numpy_backend import FDEntry, FDParam, FiniteDifferenceReport
from pytest_gradcheck.report.finite_differences import CAUSE_DERIVATIVE, CAUSE_LOSS_IGNORES_PARAMS, CAUSE_SCALE

# --------------------------------------------------------------------------- finite differences


def test_finite_differences_pass_on_a_correct_gradient() -> None:
    params, x, y = make_net(8)
    report = assert_grad_numpy(net_loss, net_grad, params, x, y)
    assert isinstance(report, FiniteDifferenceReport) and report.passed
    assert {p.name for p in report.params} == {"W1", "b1", "W2", "b2"}
    assert all(p.checked == p.numel for p in report.params)
    assert "match central finite differences" in str(report)


def test_finite_differences_catch_a_wrong_sigmoid_derivative() -> None:
    params, x, y = make_net(8)

    def bad(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        return net_grad(p, x, y, bad_sigmoid=True)  # s * (1 + s)

    with pytest.raises(GradEquivError) as info:
        assert_grad_numpy(net_loss, bad, params, x, y)
    report = info.value.report
    assert {p.name for p in report.failing} == {"W1", "b1"}
    msg = str(info.value)
    first, verdict = msg.splitlines()[:2]
    assert first.startswith("the analytic gradient of W1, b1 does not follow loss_fn: a derivative")  # the cause
    assert verdict == "Analytic gradients do NOT match central finite differences: 2 of 4 parameters differ (W1, b1)."
    assert "Worst entries:" in msg and "W2, b2 match" in msg
    worst = next(p for p in report.failing if p.name == "W1").worst[0]
    assert abs(worst.analytic - worst.numeric) > 1e-3
    assert str(worst.index) in msg and f"{worst.analytic:.6g}" in msg and f"{worst.numeric:.6g}" in msg


def test_finite_differences_name_a_batch_size_factor() -> None:
    params, x, y = make_net(8)
    with pytest.raises(GradEquivError, match=r"8 times the numerical one \(B=8"):
        assert_grad_numpy(net_loss, summed_grad, params, x, y)


def test_finite_differences_notice_a_loss_that_ignores_its_params() -> None:
    params, x, y = make_net(4)

    def frozen_loss(p: dict, x: np.ndarray, y: np.ndarray) -> float:
        return net_loss(params, x, y)  # the captured params, not p

    with pytest.raises(GradEquivError, match="loss_fn does not change when W1, b1, W2, b2 change"):
        assert_grad_numpy(frozen_loss, net_grad, params, x, y)


def test_finite_differences_sample_large_parameters_reproducibly() -> None:
    rng = np.random.default_rng(11)
    w, x = rng.normal(size=(40, 30)), rng.normal(size=(3, 40))

    def loss(w: np.ndarray, x: np.ndarray, y: None) -> float:
        return float(np.sum(np.tanh(x @ w)))

    def grad(w: np.ndarray, x: np.ndarray, y: None) -> np.ndarray:
        return x.T @ (1 - np.tanh(x @ w) ** 2)

    r1 = assert_grad_numpy(loss, grad, w, x, max_coords=10, seed=3)
    r2 = assert_grad_numpy(loss, grad, w, x, max_coords=10, seed=3)
    assert r1.params[0].checked == 10 and r1.params[0].numel == 1200
    assert r1.params == r2.params
    assert "10 of 1200 entries sampled" in str(r1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0}, "eps"),
        ({"rtol": -1}, "rtol"),
        ({"max_coords": 0}, "max_coords"),
        ({"seed": "a"}, "seed"),
    ],
)
def test_finite_differences_bad_options(kwargs: dict, match: str) -> None:
    params, x, y = make_net(3)
    with pytest.raises(InvalidArgument, match=match):
        assert_grad_numpy(net_loss, net_grad, params, x, y, **kwargs)


def test_finite_differences_bad_loss() -> None:
    params, x, y = make_net(3)
    with pytest.raises(InvalidArgument, match="not a scalar"):
        assert_grad_numpy(lambda p, x, y: np.ones(2), net_grad, params, x, y)


# --------------------------------------------------------------------------- the report and its renderer


def _figures(name: str, ratio: float, *, passed: bool, fits: bool = True, flat: bool = False) -> FDParam:
    err = 0.0 if passed else 1.0
    worst = () if passed else (FDEntry((0, 1), 2.0 * ratio, 2.0),)
    return FDParam(name, (2, 3), 6, 6, err, err, 1e-6, ratio, worst, scale_fits=fits, loss_flat=flat)


def _report(*params: FDParam, cause: str | None = None, factor: float | None = None) -> FiniteDifferenceReport:
    return FiniteDifferenceReport(
        passed=all(p.passed for p in params), params=params, eps=1e-6, rtol=1e-5, atol=1e-8, noise=1e-9,
        loss=0.5, seed=0, max_coords=128, batch_size=4, cause=cause, factor=factor,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("factor", "words"),
    [
        (4.0, "4 times the numerical one (B=4: the gradient is summed over the batch where the loss averages)"),
        (0.25, "0.25 times the numerical one (1/B, B=4: the gradient is averaged where the loss sums)"),
        (-1.0, "-1 times the numerical one (the sign is flipped: descent would climb)"),
        (2.0, "2 times the numerical one (a factor 2: the derivative of x**2 is 2*x"),
        (3.5, "3.5 times the numerical one; the directions agree"),
    ],
)
def test_the_renderer_words_a_scale_factor(factor: float, words: str) -> None:
    report = _report(_figures("W", factor, passed=False), cause=CAUSE_SCALE, factor=factor)
    text = str(report)
    assert f"Cause: the analytic gradient of W is {words}" in text
    assert "What to do: make grad_fn and loss_fn agree on the scale of the loss" in text


def test_the_renderer_words_the_cause_the_check_decided() -> None:
    bad, ok = _figures("W1", 0.3, passed=False, fits=False), _figures("W2", 1.0, passed=True)
    text = str(_report(bad, ok, cause=CAUSE_DERIVATIVE))
    first, verdict = text.splitlines()[:2]
    assert first.startswith("the analytic gradient of W1 does not follow loss_fn")
    assert verdict == "Analytic gradients do NOT match central finite differences: 1 of 2 parameters differ (W1)."
    assert "Cause: the analytic gradient of W1 does not follow loss_fn" in text
    assert "  W2 matches: backprop carries an error backwards" in text
    assert "Worst entries:" in text and "(0, 1)" in text
    flat = _figures("b", 0.0, passed=False, fits=False, flat=True)
    assert "Cause: loss_fn does not change when b changes" in str(_report(flat, cause=CAUSE_LOSS_IGNORES_PARAMS))


def test_a_passing_report_has_no_cause_and_renders_its_notes() -> None:
    report = _report(_figures("W", 1.0, passed=True))
    report.notes.append("a note")
    text = str(report)
    assert text.startswith("Analytic gradients match central finite differences (1 parameter, float64).")
    assert "Cause:" not in text and "Worst entries:" not in text
    assert text.endswith("Notes:\n  - a note")


def test_the_check_decides_the_cause_and_raises_the_report_as_rendered() -> None:
    params, x, y = make_net(8)
    with pytest.raises(GradEquivError) as info:
        assert_grad_numpy(net_loss, summed_grad, params, x, y)
    report = info.value.report
    assert report.cause == CAUSE_SCALE and report.factor == pytest.approx(8)
    assert str(info.value) == str(report)
    assert assert_grad_numpy(net_loss, net_grad, params, x, y).cause is None
