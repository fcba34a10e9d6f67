"""A small hand-written network and its backprop, shared by the NumPy backend's tests.

``net_grad`` is correct (the mean over the batch); ``summed_grad`` forgets to divide by the
batch size; ``net_grad(..., bad_sigmoid=True)`` has a wrong activation derivative.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
