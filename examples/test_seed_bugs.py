"""The users' real bugs (shared/seeds), each reproduced next to its fixed version.

Run ``pytest examples -rx``: the buggy versions are ``xfail(strict=True,
raises=GradEquivError)``, so the suite passes and ``-rx`` prints each report;
``pytest examples --runxfail`` shows the full failure reports.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_gradcheck import GradEquivError

bug = pytest.mark.xfail(strict=True, raises=GradEquivError, reason="the seed's bug: the check must catch it")


# --- seed 000: XOR net, labels (4,) against outputs (4, 1) --------------------------------------


class XorNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 3, True)
        self.fc1 = nn.Linear(3, 1, True)

    def forward(self, x):
        return self.fc1(torch.sigmoid(self.fc(x)))


def xor_batch(labels_shape):
    inputs = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.float32)
    labels = torch.tensor([0, 1, 1, 0], dtype=torch.float32).reshape(labels_shape)
    return inputs, labels


def squared_error(outputs, labels):
    return (outputs - labels).pow(2).mean()


@bug
@pytest.mark.gradequiv
def test_seed000_xor_labels_of_shape_4(gradequiv):
    torch.manual_seed(0)
    inputs, labels = xor_batch((4,))  # (4,) against outputs (4, 1): broadcasts to (4, 4)
    gradequiv(XorNet(), squared_error, inputs, labels)


@pytest.mark.gradequiv
def test_seed000_fixed_labels_of_shape_4x1(gradequiv):
    torch.manual_seed(0)
    inputs, labels = xor_batch((4, 1))
    gradequiv(XorNet(), squared_error, inputs, labels)


# --- seed 002: linear regression, noise built as (n, 1, 1) -----------------------------------------


def line_data(n, extra_dim):
    """y = -4x + noise. The seed's dataset built its noise as (n, 1, 1), so each
    target came out (1, 1) and a batch of targets (n, 1, 1) against predictions (n, 1)."""
    x = torch.linspace(0, 1, n).unsqueeze(1)  # (n, 1)
    y = -4 * x + 0.05 * torch.randn(n, 1)  # (n, 1)
    return x, (y.unsqueeze(1) if extra_dim else y)


@bug
def test_seed002_mse_loss_with_targets_of_shape_n_1_1(gradequiv):
    torch.manual_seed(0)
    x, y = line_data(32, extra_dim=True)
    gradequiv(nn.Linear(1, 1), F.mse_loss, x, y)  # mse_loss((32, 1), (32, 1, 1)) -> (32, 32, 1)


def test_seed002_fixed_targets_of_shape_n_1(gradequiv):
    torch.manual_seed(0)
    x, y = line_data(32, extra_dim=False)
    gradequiv(nn.Linear(1, 1), F.mse_loss, x, y)


# --- seed 003: the update sums per-sample gradients over the batch ---------------------------------


def mlp_784_45_16():
    return nn.Sequential(nn.Linear(784, 45), nn.Sigmoid(), nn.Linear(45, 16), nn.Sigmoid())


def summed_squared_error(out, target):
    return 0.5 * ((out - target) ** 2).sum()  # summed over the batch: the step grows with B


def averaged_squared_error(out, target):
    return 0.5 * ((out - target) ** 2).sum(dim=1).mean()  # averaged over the batch


@bug
def test_seed003_gradient_summed_over_the_batch(gradequiv):
    torch.manual_seed(0)
    x, t = torch.rand(20, 784), F.one_hot(torch.randint(0, 16, (20,)), 16).float()
    gradequiv(mlp_784_45_16(), summed_squared_error, x, t)


def test_seed003_fixed_gradient_averaged_over_the_batch(gradequiv):
    torch.manual_seed(0)
    x, t = torch.rand(20, 784), F.one_hot(torch.randint(0, 16, (20,)), 16).float()
    gradequiv(mlp_784_45_16(), averaged_squared_error, x, t)


# --- seed 004: "is the minibatch gradient the mean or the sum?" -------------------------------------


def test_seed004_the_check_says_which_reduction_holds(gradequiv):
    torch.manual_seed(0)
    x, t = torch.rand(8, 784), F.one_hot(torch.randint(0, 16, (8,)), 16).float()
    assert gradequiv(mlp_784_45_16(), averaged_squared_error, x, t, reduction="auto").matched == "mean"
    assert gradequiv(mlp_784_45_16(), summed_squared_error, x, t, reduction="auto").matched == "sum"


# --- seed 000's answer: sum-then-divide vs divide-then-sum drift is rounding, not a bug ---------------


def test_seed000_rounding_is_not_a_bug(gradequiv):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
    x, y = torch.rand(300, 2), torch.rand(300, 1)
    # An absurdly tight float32 tolerance: the float32 differences exceed it, the
    # float64 re-check shows they are rounding, and the check passes.
    report = gradequiv(model, F.mse_loss, x, y, rtol=1e-9)
    assert report.rounding
