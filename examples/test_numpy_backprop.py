"""Checking hand-written NumPy backprop: a correct layer net, and a step that grows with the batch.

Run with ``pytest examples/test_numpy_backprop.py``.

1. A layer network in the style of seed 001 (``MatMul``, ``Sigmoid``, ``MSE``
   layers, each with ``forward`` and ``backward``): its gradient is the mean of
   per-sample gradients, and it is the derivative of the loss it prints. Both
   checks pass.
2. Batched backprop in the style of seed 003: per-sample gradients are stacked
   on axis 0 (``(B, n_out, n_in)``, per-sample outer products with
   ``np.einsum``) and ``update()`` *sums* them over the batch. The loss is a
   mean, so the step is B times too large and grows with the batch size (at
   B=2000 the weights barely move only because the learning rate was tuned
   down). The check fails and says "the batch gradient is the SUM of
   per-sample gradients"; the fixed version averages and passes.
3. A finite-difference check of the same per-sample gradients: it catches a
   wrong derivative formula, which the per-sample check cannot see.
"""

from __future__ import annotations

import numpy as np
import pytest

from pytest_gradcheck import GradEquivError, assert_grad_numpy, assert_gradequiv_numpy

# --------------------------------------------------------------------------- seed 001: layers


class MatMul:
    def __init__(self, W: np.ndarray) -> None:
        self.params = [W]
        self.grads = [np.zeros_like(W)]
        self.x: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        (W,) = self.params
        self.x = x
        return x @ W

    def backward(self, dout: np.ndarray) -> np.ndarray:
        (W,) = self.params
        self.grads[0][...] = self.x.T @ dout
        return dout @ W.T


class Sigmoid:
    def __init__(self) -> None:
        self.params: list[np.ndarray] = []
        self.grads: list[np.ndarray] = []
        self.out: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        self.out = 1 / (1 + np.exp(-x))
        return self.out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        return dout * self.out * (1.0 - self.out)


class MSE:
    """Mean over the batch of 0.5 * ||y - t||^2 (the loss printed per batch)."""

    def forward(self, y: np.ndarray, t: np.ndarray) -> float:
        self.diff = y - t
        self.batch_size = len(y)
        return float(0.5 * np.sum(self.diff**2) / self.batch_size)

    def backward(self, dout: float = 1.0) -> np.ndarray:
        return dout * self.diff / self.batch_size


class Net:
    def __init__(self, W1: np.ndarray, W2: np.ndarray) -> None:
        self.layers = [MatMul(W1), Sigmoid(), MatMul(W2), Sigmoid()]
        self.loss_layer = MSE()

    def forward(self, x: np.ndarray, t: np.ndarray) -> float:
        for layer in self.layers:
            x = layer.forward(x)
        return self.loss_layer.forward(x, t)

    def backward(self) -> list[np.ndarray]:
        dout = self.loss_layer.backward()
        for layer in reversed(self.layers):
            dout = layer.backward(dout)
        return [g for layer in self.layers for g in layer.grads]


def net_grads(params: list[np.ndarray], x: np.ndarray, t: np.ndarray) -> list[np.ndarray]:
    net = Net(*params)
    net.forward(x, t)
    return net.backward()


def net_loss(params: list[np.ndarray], x: np.ndarray, t: np.ndarray) -> float:
    return Net(*params).forward(x, t)


@pytest.fixture
def seed001() -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    rn = np.random.default_rng(1).standard_normal
    W1 = rn((10, 100)).astype(np.float32)
    W2 = rn((100, 10)).astype(np.float32) * 0.1
    x = rn((100, 10)).astype(np.float32)  # one batch of batch_size = 100
    t = x**2
    return [W1, W2], x, t


def test_layer_net_gradient_is_the_mean_of_per_sample_gradients(seed001) -> None:
    params, x, t = seed001
    report = assert_gradequiv_numpy(net_grads, params, x, t, loss_fn=net_loss)
    assert report.matched == "mean"


def test_layer_net_gradient_is_the_derivative_of_its_loss(seed001) -> None:
    params, x, t = seed001
    assert_grad_numpy(net_loss, net_grads, params, x[:16], t[:16])


# --------------------------------------------------------------------------- seed 003: batched backprop


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-z))


def batch_backprop(params: dict, x: np.ndarray, t: np.ndarray) -> dict:
    """Per-sample gradients stacked on axis 0, as seed 003 computes them.

    ``x`` is ``(B, n0, 1)``, ``t`` is ``(B, n2, 1)``; weights are ``(n_out, n_in)``
    and biases ``(n_out, 1)``. The loss of one sample is ``0.5 * ||a2 - t||^2``.
    """
    W1, b1, W2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    a0 = x
    a1 = sigmoid(W1 @ a0 + b1)  # (B, n1, 1)
    a2 = sigmoid(W2 @ a1 + b2)  # (B, n2, 1)
    gb2 = (a2 - t) * (a2 - np.square(a2))
    gb1 = np.tensordot(gb2, W2, axes=((1), (0))).transpose(0, 2, 1) * (a1 - np.square(a1))
    return {
        "W1": np.einsum("ijk,ilm->ijl", gb1, a0),  # per-sample outer products, (B, n1, n0)
        "b1": gb1,
        "W2": np.einsum("ijk,ilm->ijl", gb2, a1),
        "b2": gb2,
    }


def update_direction_summed(params: dict, x: np.ndarray, t: np.ndarray) -> dict:
    """Seed 003's ``update()``: the per-sample gradients are summed over the batch."""
    per_sample = batch_backprop(params, x, t)
    return {k: np.sum(g, axis=0) for k, g in per_sample.items()}


def update_direction(params: dict, x: np.ndarray, t: np.ndarray) -> dict:
    """The fix: average over the batch, so the step does not grow with it."""
    per_sample = batch_backprop(params, x, t)
    return {k: np.mean(g, axis=0) for k, g in per_sample.items()}


def mse_loss(params: dict, x: np.ndarray, t: np.ndarray) -> float:
    a1 = sigmoid(params["W1"] @ x + params["b1"])
    a2 = sigmoid(params["W2"] @ a1 + params["b2"])
    return float(np.mean(0.5 * np.sum((a2 - t) ** 2, axis=(1, 2))))


@pytest.fixture
def seed003() -> tuple[dict, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    params = {
        "W1": rng.normal(size=(12, 20)) * 0.3,
        "b1": np.zeros((12, 1)),
        "W2": rng.normal(size=(4, 12)) * 0.3,
        "b2": np.zeros((4, 1)),
    }
    x = rng.normal(size=(20, 20, 1))  # a mini-batch of 20 samples
    t = np.eye(4)[rng.integers(0, 4, size=20)][:, :, None]  # one-hot targets, (20, 4, 1)
    return params, x, t


@pytest.mark.xfail(strict=True, raises=GradEquivError, reason="seed 003: update() sums over the batch")
def test_seed003_update_sums_per_sample_gradients(seed003) -> None:
    params, x, t = seed003
    assert_gradequiv_numpy(update_direction_summed, params, x, t, loss_fn=mse_loss)


def test_seed003_fixed_update_averages(seed003) -> None:
    params, x, t = seed003
    report = assert_gradequiv_numpy(update_direction, params, x, t, loss_fn=mse_loss)
    assert report.matched == "mean"


def test_seed003_summed_update_is_what_it_says_with_reduction_sum(seed003) -> None:
    params, x, t = seed003
    assert_gradequiv_numpy(update_direction_summed, params, x, t, reduction="sum")


def test_seed003_gradient_is_the_derivative_of_the_mean_loss(seed003) -> None:
    params, x, t = seed003
    assert_grad_numpy(mse_loss, update_direction, params, x, t)
