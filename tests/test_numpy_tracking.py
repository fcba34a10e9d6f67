"""Tests of the NumPy backend's broadcast detection: pairing ops caught in grad_fn, located at the
user's line, and the batch axis followed through NumPy operations (numpy_backend/tracking.py)."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import pytest
from numpy_nets import make_net, net_grad, sigmoid

from pytest_gradcheck import (
    BroadcastError,
    BroadcastWarning,
    GradEquivError,
    InvalidArgument,
    allow_broadcast,
    assert_gradequiv_numpy,
)
from pytest_gradcheck.numpy_backend import TrackedArray

THIS_FILE = os.path.abspath(__file__)
BASENAME = os.path.basename(__file__)


def _line_of(marker: str) -> int:
    """Line number of the (only) line of this file that ends with ``marker``."""
    with open(THIS_FILE, encoding="utf-8") as f:
        hits = [i for i, line in enumerate(f, 1) if line.rstrip().endswith(marker)]
    if len(hits) != 1:
        raise LookupError(f"marker {marker!r} found {len(hits)} times")
    return hits[0]


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
