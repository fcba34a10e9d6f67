"""Tests of the NumPy backend: per-sample equivalence, broadcast tracking, finite differences."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest

from pytest_gradcheck import (
    BroadcastError,
    BroadcastWarning,
    GradEquivError,
    InvalidArgument,
    _tracking,
    allow_broadcast,
    assert_grad_numpy,
    assert_gradequiv_numpy,
)
from pytest_gradcheck.numpy_backend import FiniteDifferenceReport, TrackedArray

THIS_FILE = os.path.abspath(__file__)
BASENAME = os.path.basename(__file__)


def _line_of(marker: str) -> int:
    """Line number of the (only) line of this file that ends with ``marker``."""
    with open(THIS_FILE, encoding="utf-8") as f:
        hits = [i for i, line in enumerate(f, 1) if line.rstrip().endswith(marker)]
    if len(hits) != 1:
        raise LookupError(f"marker {marker!r} found {len(hits)} times")
    return hits[0]


# --------------------------------------------------------------------------- a hand-written net


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def make_net(b: int, dtype: Any = np.float64, d: int = 5, h: int = 7, o: int = 3, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    params = {
        "W1": rng.normal(size=(d, h)).astype(dtype),
        "b1": (rng.normal(size=h) * 0.1).astype(dtype),
        "W2": rng.normal(size=(h, o)).astype(dtype),
        "b2": (rng.normal(size=o) * 0.1).astype(dtype),
    }
    return params, rng.normal(size=(b, d)).astype(dtype), rng.normal(size=(b, o)).astype(dtype)


def net_loss(p: dict, x: np.ndarray, y: np.ndarray) -> float:
    """Mean over the batch of 0.5 * ||sigmoid(sigmoid(x W1 + b1) W2 + b2) - y||^2."""
    out = sigmoid(sigmoid(x @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"])
    return float(0.5 * np.sum((out - y) ** 2) / len(x))


def net_grad(p: dict, x: np.ndarray, y: np.ndarray, *, summed: bool = False, bad_sigmoid: bool = False) -> dict:
    h = sigmoid(x @ p["W1"] + p["b1"])
    out = sigmoid(h @ p["W2"] + p["b2"])
    d_out = out - y if summed else (out - y) / len(x)
    d_z2 = d_out * out * (1 - out)
    d_h = d_z2 @ p["W2"].T
    d_z1 = d_h * h * (1 + h) if bad_sigmoid else d_h * h * (1 - h)
    return {"W1": x.T @ d_z1, "b1": d_z1.sum(axis=0), "W2": h.T @ d_z2, "b2": d_z2.sum(axis=0)}


def summed_grad(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
    return net_grad(p, x, y, summed=True)


# --------------------------------------------------------------------------- the verdict


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b", [2, 7, 64])
def test_correct_backprop_passes(b: int, dtype: Any) -> None:
    params, x, y = make_net(b, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = assert_gradequiv_numpy(net_grad, params, x, y, loss_fn=net_loss)
    assert report.passed and report.matched == "mean"
    assert report.backend == "numpy" and report.batch_size == b and report.dtype == np.dtype(dtype).name
    assert report.reference_method == "per-sample calls" and report.broadcasts == ()
    assert [p.name for p in report.parameters] == ["W1", "b1", "W2", "b2"]
    assert "Gradients are equivalent" in str(report)


@pytest.mark.parametrize("b", [2, 7, 64])
def test_summed_gradient_fails_naming_the_sum(b: int) -> None:
    params, x, y = make_net(b, np.float32)
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_numpy(summed_grad, params, x, y)
    msg = str(info.value)
    assert "the batch gradient is the SUM of per-sample gradients" in msg
    assert f"{b} times too large" in msg
    assert "np.mean over the batch axis" in msg  # the NumPy advice
    report = info.value.report
    assert report.would_match == "sum" and report.float64 is not None and not report.float64.passed


def test_summed_gradient_passes_as_declared_sum_and_auto() -> None:
    params, x, y = make_net(9, np.float32)
    assert assert_gradequiv_numpy(summed_grad, params, x, y, reduction="sum").matched == "sum"
    assert assert_gradequiv_numpy(summed_grad, params, x, y, reduction="auto").matched == "sum"
    assert assert_gradequiv_numpy(net_grad, params, x, y, reduction="auto").matched == "mean"


def test_mean_declared_as_sum_fails() -> None:
    params, x, y = make_net(6)
    with pytest.raises(GradEquivError, match="MEAN of per-sample gradients"):
        assert_gradequiv_numpy(net_grad, params, x, y, reduction="sum")


def test_sequence_params_are_named_by_index_and_results_keep_structure() -> None:
    params, x, y = make_net(5)
    order = ["W1", "b1", "W2", "b2"]

    def grad_list(p: list, x: np.ndarray, y: np.ndarray) -> tuple:
        assert isinstance(p, list)
        g = net_grad(dict(zip(order, p)), x, y)
        return tuple(g[k] for k in order)

    report = assert_gradequiv_numpy(grad_list, [params[k] for k in order], x, y)
    assert [p.name for p in report.parameters] == ["params[0]", "params[1]", "params[2]", "params[3]"]


def test_single_array_params_and_tuple_inputs() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 1))
    u, v, y = rng.normal(size=(6, 2)), rng.normal(size=(6, 1)), rng.normal(size=(6, 1))

    def grad(w: np.ndarray, inputs: tuple, y: np.ndarray) -> np.ndarray:
        u, v = inputs
        x = np.concatenate([u, v], axis=1)
        return x.T @ (2 * (x @ w - y) / len(x))

    report = assert_gradequiv_numpy(grad, w, (u, v), y)
    assert report.passed and [p.name for p in report.parameters] == ["params"]


def test_no_targets() -> None:
    rng = np.random.default_rng(2)
    w, x = rng.normal(size=3), rng.normal(size=(5, 3))

    def grad(w: np.ndarray, x: np.ndarray, y: None) -> np.ndarray:
        assert y is None
        return x.T @ np.tanh(x @ w) / len(x)

    assert assert_gradequiv_numpy(grad, w, x).passed


def test_weighted_mean() -> None:
    rng = np.random.default_rng(3)
    w, x, y = rng.normal(size=(3, 1)), rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    sw = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])

    def grad(w: np.ndarray, x: np.ndarray, targets: tuple) -> np.ndarray:
        y, s = targets
        return x.T @ (s[:, None] * (x @ w - y)) / s.sum()

    report = assert_gradequiv_numpy(grad, w, x, (y, sw), weights=sw)
    assert report.matched == "weighted mean" and report.weights == tuple(sw)
    report = assert_gradequiv_numpy(grad, w, x, (y, sw), weights=lambda t: t[1][0])
    assert report.matched == "weighted mean"
    with pytest.raises(GradEquivError):
        assert_gradequiv_numpy(grad, w, x, (y, sw))


def test_checks_are_recorded_pass_or_fail() -> None:
    params, x, y = make_net(4)
    with _tracking.collecting() as reports:
        assert_gradequiv_numpy(net_grad, params, x, y)
        with pytest.raises(GradEquivError):
            assert_gradequiv_numpy(summed_grad, params, x, y)
        assert_grad_numpy(net_loss, net_grad, params, x, y, max_coords=4)
    assert [r.passed for r in reports] == [True, False, True]
    assert [r.backend for r in reports] == ["numpy"] * 3


def test_float32_rounding_is_not_a_bug() -> None:
    # divide-then-sum (reference) vs sum-then-divide (batch) in float32 at a large batch
    rng = np.random.default_rng(4)
    w = rng.normal(size=(16, 1)).astype(np.float32)
    x = (rng.normal(size=(512, 16)) * 100).astype(np.float32)
    y = rng.normal(size=(512, 1)).astype(np.float32)

    def grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x.T @ (x @ w - y)) / np.float32(len(x))

    report = assert_gradequiv_numpy(grad, w, x, y)
    assert report.passed


def _centred_targets() -> tuple:
    rng = np.random.default_rng(0)
    w, x, y = rng.normal(size=(6, 1)), rng.normal(size=(3, 6)), rng.normal(size=(3, 1))

    def grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x.T @ (x @ w - (y - y.mean())) / len(x)  # targets centred by the batch mean

    def loss(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float(0.5 * np.mean((x @ w - (y - y.mean())) ** 2))

    return grad, loss, w, x, y


def test_loss_fn_tells_coupled_samples_from_a_reweighting() -> None:
    grad, loss, w, x, y = _centred_targets()
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_numpy(grad, w, x, y)
    assert [f.kind for f in info.value.report.findings] == ["weights"]
    with pytest.raises(GradEquivError, match="the loss couples samples") as info:
        assert_gradequiv_numpy(grad, w, x, y, loss_fn=loss)
    assert [f.kind for f in info.value.report.findings] == ["coupled"]
    with pytest.raises(InvalidArgument, match=r"loss_fn returned shape \(3, 1\) for the batch, not a scalar"):
        assert_gradequiv_numpy(grad, w, x, y, loss_fn=lambda w, x, y: x @ w)


# --------------------------------------------------------------------------- broadcasts


def test_pairwise_broadcast_in_the_loss_gradient_is_caught_and_located() -> None:
    rng = np.random.default_rng(5)
    params = {"w": rng.normal(size=(3, 1)), "b": np.zeros(1)}
    x, labels = rng.normal(size=(6, 3)), rng.normal(size=6)  # labels (N,), outputs (N, 1)

    def grad(p: dict, x: np.ndarray, labels: np.ndarray) -> dict:
        out = x @ p["w"] + p["b"]
        d_out = 2 * (out - labels).mean(axis=1, keepdims=True) / len(x)  # <- pairwise
        return {"w": x.T @ d_out, "b": d_out.sum(axis=0)}

    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_numpy(grad, params, x, labels)
    msg = str(info.value)
    line = _line_of("# <- pairwise")
    for part in ("subtract((6, 1), (6,)) -> (6, 6)", f"{BASENAME}:{line}", "did you mean labels[..., None]?"):
        assert part in msg
    (record,) = info.value.report.broadcasts
    assert record.shapes == ((6, 1), (6,)) and record.filename == THIS_FILE and record.lineno == line


def test_pairwise_broadcast_that_breaks_gradient_shapes_names_the_broadcast() -> None:
    rng = np.random.default_rng(6)
    params = {"w": rng.normal(size=(3, 1))}
    x, labels = rng.normal(size=(5, 3)), rng.normal(size=5)

    def grad(p: dict, x: np.ndarray, labels: np.ndarray) -> dict:
        err = x @ p["w"] - labels  # <- breaks shapes
        return {"w": x.T @ err / len(x)}

    with pytest.raises(BroadcastError) as info:
        assert_gradequiv_numpy(grad, params, x, labels)
    msg = str(info.value)
    assert "shape (3, 5)" in msg and "params['w']" in msg
    assert f"{BASENAME}:{_line_of('# <- breaks shapes')}: subtract((5, 1), (5,)) -> (5, 5)" in msg
    assert isinstance(info.value.__cause__, InvalidArgument)


def test_pairwise_broadcast_that_crashes_grad_fn_names_the_broadcast() -> None:
    rng = np.random.default_rng(7)
    params = {"W1": rng.normal(size=(3, 4)), "W2": rng.normal(size=(4, 1))}
    x, labels = rng.normal(size=(5, 3)), rng.normal(size=5)

    def grad(p: dict, x: np.ndarray, labels: np.ndarray) -> dict:
        h = np.tanh(x @ p["W1"])
        d_out = (h @ p["W2"] - labels) / len(x)  # (5, 5)
        d_h = (d_out @ p["W2"].T) * (1 - h**2)  # matmul shape error here
        return {"W1": x.T @ d_h, "W2": h.T @ d_out}

    with pytest.raises(BroadcastError) as info:
        assert_gradequiv_numpy(grad, params, x, labels)
    assert "subtract((5, 1), (5,)) -> (5, 5)" in str(info.value)
    assert "grad_fn then raised ValueError" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)


def _harmless_pairing(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
    pairwise = x[:, :1] - y[:, 0]  # <- harmless pairing
    del pairwise
    return net_grad(p, x, y)


def test_broadcast_modes_when_gradients_agree() -> None:
    params, x, y = make_net(4)
    line = _line_of("# <- harmless pairing")
    with pytest.warns(BroadcastWarning, match=r"subtract\(\(4, 1\), \(4,\)\) -> \(4, 4\)") as rec:
        report = assert_gradequiv_numpy(_harmless_pairing, params, x, y)
    assert report.passed and len(report.broadcasts) == 1
    assert rec[0].filename == THIS_FILE and rec[0].lineno == line
    with pytest.raises(BroadcastError, match="broadcast='error'") as info:
        assert_gradequiv_numpy(_harmless_pairing, params, x, y, broadcast="error")
    assert info.value.records[0].lineno == line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert assert_gradequiv_numpy(_harmless_pairing, params, x, y, broadcast="off").broadcasts == ()


def test_allow_broadcast_silences_an_intended_pairwise_term() -> None:
    params, x, y = make_net(4)

    def grad(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        with allow_broadcast():
            pairwise = x[:, :1] - y[:, 0]
        del pairwise
        return net_grad(p, x, y)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert assert_gradequiv_numpy(grad, params, x, y).broadcasts == ()


def test_per_sample_outer_products_biases_and_one_hot_are_not_flagged() -> None:
    rng = np.random.default_rng(8)
    b, n0, n1, n2 = 6, 5, 4, 3
    params = {
        "W1": rng.normal(size=(n1, n0)), "b1": np.zeros((n1, 1)),
        "W2": rng.normal(size=(n2, n1)), "b2": np.zeros(n2),
    }  # fmt: skip
    x = rng.normal(size=(b, n0))
    labels = rng.integers(0, n2, size=b)

    def grad(p: dict, x: np.ndarray, labels: np.ndarray) -> dict:
        a0 = x[:, :, None]  # (B, n0, 1)
        a1 = sigmoid(p["W1"] @ a0 + p["b1"])  # (B, n1, 1), bias (n1, 1)
        logits = a1[:, :, 0] @ p["W2"].T + p["b2"]  # (B, n2), bias (n2,)
        onehot = labels[:, None] == np.arange(n2)  # (B, 1) == (n2,) -> (B, n2)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        d_logits = (probs - onehot) / len(x)
        d_a1 = (d_logits @ p["W2"])[:, :, None] * a1 * (1 - a1)  # (B, n1, 1)
        gW2 = d_logits[:, :, None] * a1[:, None, :, 0]  # per-sample outer products (B, n2, n1)
        gW1 = d_a1 * a0.transpose(0, 2, 1)  # (B, n1, 1) * (B, 1, n0)
        gW1_einsum = np.einsum("bij,bkj->bik", d_a1, a0)
        np.testing.assert_allclose(gW1, gW1_einsum)
        return {"W1": gW1.sum(axis=0), "b1": d_a1.sum(axis=0), "W2": gW2.sum(axis=0), "b2": d_logits.sum(axis=0)}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = assert_gradequiv_numpy(grad, params, x, labels)
    assert report.passed and report.broadcasts == ()


def test_column_major_layout_pairing_is_flagged() -> None:
    rng = np.random.default_rng(9)
    w = rng.normal(size=(1, 3))
    x, y = rng.normal(size=(6, 3)), rng.normal(size=(6, 1))

    def grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = w @ x.T  # (1, B): samples in columns
        d = (out - y).mean(axis=0, keepdims=True)  # (1, B) - (B, 1) -> (B, B)
        return d @ x / len(x)

    with pytest.raises(GradEquivError, match=r"subtract\(\(1, 6\), \(6, 1\)\) -> \(6, 6\)"):
        assert_gradequiv_numpy(grad, w, x, y)


def _tracked(shape: tuple, axis: int = 0) -> TrackedArray:
    return TrackedArray.of_batch(np.ones(shape), axis)


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (lambda x: x[:, :, None] * x[:, None, :], 0),
        (lambda x: x.T, 1),
        (lambda x: x.sum(axis=0), None),
        (lambda x: np.mean(x, axis=1), 0),
        (lambda x: x.mean(axis=1, keepdims=True), 0),
        (lambda x: x[2], None),
        (lambda x: x[1:3, None], 0),
        (lambda x: x[..., None], 0),
        (lambda x: x[[0, 2]], 0),
        (lambda x: x.reshape(4, 3, 1), 0),
        (lambda x: x.reshape(-1), -1),
        (lambda x: x[:, :1].ravel(), 0),
        (lambda x: np.expand_dims(x, 0), 1),
        (lambda x: np.moveaxis(x[:, :, None], 0, -1), 2),
        (lambda x: x.swapaxes(0, 1), 1),
        (lambda x: x[:, None].squeeze(), 0),
        (lambda x: x @ np.ones((3, 2)), 0),
        (lambda x: np.ones((2, 3)) @ x.T, 1),
        (lambda x: x.T @ x, None),
        (lambda x: np.dot(x, np.ones(3)), 0),
        (lambda x: x.dot(np.ones((3, 2))), 0),
        (lambda x: np.tensordot(np.ones((5, 3)), x, axes=((1,), (1,))), 1),
        (lambda x: np.einsum("bi,bj->bij", x, x), 0),
        (lambda x: np.einsum("bi,ij", x, np.ones((3, 2))), 0),
        (lambda x: np.einsum("...i->...", x), 0),
        (lambda x: np.where(x > 0, x, 0.0), 0),
        (lambda x: np.clip(x, 0, 1), 0),
        (lambda x: x.astype(np.float32), 0),
        (lambda x: x @ x.T, -1),
        (lambda x: np.concatenate([x, np.ones((4, 1))], axis=1), 0),
        (lambda x: np.hstack([x, np.ones((4, 1))]), 0),
        (lambda x: np.concatenate([x, x]), -1),
        (lambda x: np.stack([x, x], axis=0), 1),
    ],
)
def test_batch_axis_is_followed(expr: Any, expected: Any) -> None:
    out = expr(_tracked((4, 3)))
    assert isinstance(out, TrackedArray)
    assert out.batch_axis == expected


def test_tracked_results_equal_plain_results() -> None:
    rng = np.random.default_rng(10)
    a = rng.normal(size=(5, 3))
    t = TrackedArray.of_batch(a)
    for f in (
        lambda x: np.exp(x) @ x.T + x.sum(),
        lambda x: np.einsum("bi,bj->bij", x, x).mean(axis=0),
        lambda x: np.tensordot(x, x, axes=((0,), (0,))),
        lambda x: np.std(x, axis=0) + np.var(x),
    ):
        np.testing.assert_array_equal(np.asarray(f(t)), f(a))


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
    assert msg.startswith(
        "Analytic gradients do NOT match central finite differences: 2 of 4 parameters differ (W1, b1)."
    )
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


# --------------------------------------------------------------------------- the user's arrays


def _snapshot(*arrays: np.ndarray) -> list[np.ndarray]:
    return [a.copy() for a in arrays]


def _unchanged(arrays: Any, saved: Any) -> bool:
    return all(a.tobytes() == s.tobytes() and a.dtype == s.dtype for a, s in zip(arrays, saved))


@pytest.mark.parametrize("fn", [net_grad, summed_grad])
def test_params_and_inputs_unchanged_pass_or_fail(fn: Any) -> None:
    params, x, y = make_net(5, np.float32)
    arrays = [*params.values(), x, y]
    saved = _snapshot(*arrays)
    for check in (
        lambda: assert_gradequiv_numpy(fn, params, x, y, loss_fn=net_loss),
        lambda: assert_grad_numpy(net_loss, fn, params, x, y, max_coords=3),
    ):
        try:
            check()
        except GradEquivError:
            assert fn is summed_grad
        assert _unchanged(arrays, saved)
    assert list(params) == ["W1", "b1", "W2", "b2"]


def test_grad_fn_writing_into_its_params_is_harmless_and_noted() -> None:
    params, x, y = make_net(5)
    saved = _snapshot(*params.values(), x)

    def sgd_inside(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        g = net_grad(p, x, y)
        for k in p:
            p[k] -= 0.1 * g[k]  # the update, inside grad_fn
        x *= 2  # and the inputs scaled in place
        return g

    report = assert_gradequiv_numpy(sgd_inside, params, x, y)
    assert _unchanged([*params.values(), x], saved)
    assert any("grad_fn wrote into the params it was given" in n for n in report.notes)
    assert "params['W1']" in str(report)

    def sgd_summed(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        g = summed_grad(p, x, y)
        p["W1"] -= g["W1"]
        return g

    with pytest.raises(GradEquivError, match="grad_fn wrote into the params it was given"):
        assert_gradequiv_numpy(sgd_summed, params, x, y)
    assert _unchanged([*params.values(), x], saved)


def test_grad_fn_writing_into_the_callers_arrays_is_restored_and_refused() -> None:
    params, x, y = make_net(5)
    saved = _snapshot(*params.values())

    def uses_globals(p: dict, xb: np.ndarray, yb: np.ndarray) -> dict:
        g = net_grad(params, xb, yb)
        params["W2"] -= 0.01 * g["W2"]  # the caller's own array, through the closure
        return g

    with pytest.raises(InvalidArgument, match=r"modified the caller's arrays in place: params\['W2'\]"):
        assert_gradequiv_numpy(uses_globals, params, x, y)
    assert _unchanged(params.values(), saved)


def test_random_draws_in_grad_fn_are_explained_and_the_global_rng_is_restored() -> None:
    params, x, y = make_net(6)

    def with_dropout(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        mask = np.random.rand(*x.shape) > 0.5
        return net_grad(p, x * mask * 2, y)

    np.random.seed(123)
    state = np.random.get_state()
    with pytest.raises(GradEquivError, match="grad_fn draws from NumPy's global random generator"):
        assert_gradequiv_numpy(with_dropout, params, x, y)
    after = np.random.get_state()
    assert after[2] == state[2] and np.array_equal(after[1], state[1])


# --------------------------------------------------------------------------- bad input


def _ok(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
    return net_grad(p, x, y)


def _bad_call(case: str) -> None:
    params, x, y = make_net(4)
    if case == "missing key":
        assert_gradequiv_numpy(lambda p, x, y: {k: v for k, v in _ok(p, x, y).items() if k != "b2"}, params, x, y)
    elif case == "extra key":
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "W3": np.zeros(1)}, params, x, y)
    elif case == "not a dict":
        assert_gradequiv_numpy(lambda p, x, y: list(_ok(p, x, y).values()), params, x, y)
    elif case == "list length":
        assert_gradequiv_numpy(lambda p, x, y: [p[0] * 0], [params["W1"], params["b1"]], x, y)
    elif case == "shape":
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "W2": _ok(p, x, y)["W2"].T}, params, x, y)
    elif case == "None gradient":
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "b1": None}, params, x, y)
    elif case == "non-finite":
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "b1": np.full(7, np.nan)}, params, x, y)
    elif case == "batch sizes":
        assert_gradequiv_numpy(_ok, params, x, y[:3])
    elif case == "batch of one":
        assert_gradequiv_numpy(_ok, params, x[:1], y[:1])
    elif case == "empty batch":
        assert_gradequiv_numpy(_ok, params, x[:0], y[:0])
    elif case == "list params entry":
        assert_gradequiv_numpy(_ok, {**params, "b2": [0.0, 0.0, 0.0]}, x, y)
    elif case == "int params":
        assert_gradequiv_numpy(_ok, {**params, "b2": np.zeros(3, dtype=int)}, x, y)
    elif case == "params type":
        assert_gradequiv_numpy(_ok, 3.0, x, y)
    elif case == "empty params":
        assert_gradequiv_numpy(_ok, {}, x, y)
    elif case == "inputs type":
        assert_gradequiv_numpy(_ok, params, [[1.0, 2.0]], y)
    elif case == "0-d input":
        assert_gradequiv_numpy(_ok, params, np.array(1.0), y)
    elif case == "grad_fn":
        assert_gradequiv_numpy("grad", params, x, y)  # type: ignore[arg-type]
    elif case == "reduction":
        assert_gradequiv_numpy(_ok, params, x, y, reduction="avg")
    elif case == "broadcast":
        assert_gradequiv_numpy(_ok, params, x, y, broadcast="loud")
    elif case == "weights":
        assert_gradequiv_numpy(_ok, params, x, y, weights=[1.0, 2.0])
    elif case == "single sample":
        assert_gradequiv_numpy(lambda p, x, y: _ok(p, x, y) if len(x) > 1 else 1 / 0, params, x, y)
    elif case == "loss_fn":
        assert_gradequiv_numpy(_ok, params, x, y, loss_fn="mse")  # type: ignore[arg-type]
    else:  # pragma: no cover
        raise LookupError(case)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing key", r"no gradient for params\['b2'\]"),
        ("extra key", r"keys params does not have: 'W3'"),
        ("not a dict", r"params is a dict, so grad_fn must return a dict with the same keys"),
        ("list length", r"returned 1 gradients for 2 parameters"),
        ("shape", r"gradient of params\['W2'\] has shape \(3, 7\) but the parameter has shape \(7, 3\)"),
        ("None gradient", r"None as the gradient of params\['b1'\]"),
        ("non-finite", r"parameter 'b1' has 7 non-finite entries"),
        (
            "batch sizes",
            r"batch sizes disagree: inputs \(shape \(4, 5\)\) has 4 samples but targets \(shape \(3, 3\)\) has 3",
        ),
        ("batch of one", r"batch size 1 .* hides every cross-sample bug"),
        ("empty batch", r"empty batch"),
        ("list params entry", r"params\['b2'\] is a list, not a NumPy array"),
        ("int params", r"params\['b2'\] has dtype int64"),
        ("params type", r"params is a float"),
        ("empty params", r"params is an empty dict"),
        ("inputs type", r"inputs\[0\] is a list, not a NumPy array"),
        ("0-d input", r"inputs is a 0-d array"),
        ("grad_fn", r"grad_fn must be callable"),
        ("reduction", r"Invalid reduction='avg'"),
        ("broadcast", r"Invalid broadcast='loud'"),
        ("weights", r"weights has shape \(2,\): expected one weight per sample, \(4,\)"),
        ("single sample", r"grad_fn failed on sample 0 alone .*ZeroDivisionError"),
        ("loss_fn", r"loss_fn must be callable"),
    ],
)
def test_bad_input_is_a_clear_invalid_argument(case: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        _bad_call(case)


def test_bad_input_leaves_arrays_unchanged() -> None:
    params, x, y = make_net(4)
    saved = _snapshot(*params.values(), x, y)
    with pytest.raises(InvalidArgument):
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "W2": _ok(p, x, y)["W2"].T}, params, x, y)
    assert _unchanged([*params.values(), x, y], saved)


def test_the_numpy_check_never_imports_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from pytest_gradcheck import assert_gradequiv_numpy, assert_grad_numpy\n"
        "w, x, y = np.ones((2, 1)), np.arange(8.0).reshape(4, 2), np.ones((4, 1))\n"
        "g = lambda w, x, y: x.T @ (x @ w - y) / len(x)\n"
        "assert_gradequiv_numpy(g, w, x, y)\n"
        "assert_grad_numpy(lambda w, x, y: float(np.mean((x @ w - y) ** 2) / 2), g, w, x, y)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- as a user runs it


SEED003 = """
import numpy as np
from pytest_gradcheck import assert_gradequiv_numpy


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def batch_backprop(params, x, t):
    a1 = sigmoid(params["W1"] @ x + params["b1"])
    a2 = sigmoid(params["W2"] @ a1 + params["b2"])
    gb2 = (a2 - t) * (a2 - np.square(a2))
    gb1 = np.tensordot(gb2, params["W2"], axes=((1), (0))).transpose(0, 2, 1) * (a1 - np.square(a1))
    return {
        "W1": np.einsum("ijk,ilm->ijl", gb1, x), "b1": gb1,
        "W2": np.einsum("ijk,ilm->ijl", gb2, a1), "b2": gb2,
    }


def update(params, x, t):
    return {k: np.sum(g, axis=0) for k, g in batch_backprop(params, x, t).items()}


def test_update_step():
    rng = np.random.default_rng(0)
    params = {"W1": rng.normal(size=(6, 8)), "b1": np.zeros((6, 1)),
              "W2": rng.normal(size=(3, 6)), "b2": np.zeros((3, 1))}
    x = rng.normal(size=(16, 8, 1))
    t = np.eye(3)[rng.integers(0, 3, size=16)][:, :, None]
    assert_gradequiv_numpy(update, params, x, t)


def test_update_step_with_the_fixture(gradequiv):
    rng = np.random.default_rng(0)
    params = {"W1": rng.normal(size=(6, 8)), "b1": np.zeros((6, 1)),
              "W2": rng.normal(size=(3, 6)), "b2": np.zeros((3, 1))}
    x = rng.normal(size=(16, 8, 1))
    t = np.eye(3)[rng.integers(0, 3, size=16)][:, :, None]
    gradequiv.numpy(update, params, x, t, reduction="sum")
"""


def test_seed003_as_a_user_runs_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_seed003=SEED003)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Gradients are NOT equivalent*",
            "*the batch gradient is the SUM of per-sample gradients, not their mean: 16 times too large*",
            "*np.mean over the batch axis*",
        ]
    )
