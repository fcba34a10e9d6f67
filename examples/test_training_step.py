"""Checking a Lightning-style ``training_step``: seed 002, linear regression that only converges for small batches.

Run with ``pytest examples/test_training_step.py``. No Lightning needed: the
model below is a plain ``nn.Module`` with the ``training_step(self, batch,
batch_idx)`` method a ``LightningModule`` has, and ``gradequiv.step`` (or
:func:`pytest_gradcheck.assert_gradequiv_step`) calls it as
``step_fn(model, batch)``. Each sample is run alone through the same step, so
whatever the step does (unpack the batch, call ``forward``, log, return a
mapping with a ``"loss"`` entry) is checked as written.

The bug, from the user's report: the noise of the dataset is built as
``(n, 1)`` and then ``unsqueeze(1)``-ed to ``(n, 1, 1)``, so the targets of a
batch are ``(B, 1, 1)`` while the predictions are ``(B, 1)``.
``F.mse_loss(preds, y)`` broadcasts them to ``(B, B, 1)``: every prediction is
regressed onto every target of the batch, and the slope is pulled towards the
batch mean. With a batch of one the two shapes agree, which is why only small
batches converged.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pytest_gradcheck import GradEquivError


class LineFunction(Dataset):
    """Points of ``y = a x + b`` with Gaussian noise, as in the user's report."""

    def __init__(self, a: float, b: float, n: int, noise: float = 0.05, *, buggy: bool) -> None:
        self._a, self._b = a, b
        self._x = torch.linspace(0, 1, n).unsqueeze(1)  # (n, 1)
        g = torch.Generator().manual_seed(0)
        eps = torch.randn(n, 1, generator=g) * noise  # (n, 1)
        # The user's code: Normal(tensor([0.]), tensor([1.])).sample((n,)) is already (n, 1),
        # and .unsqueeze(1) makes it (n, 1, 1). The fix is not to unsqueeze.
        self._noise = eps.unsqueeze(1) if buggy else eps

    def __len__(self) -> int:
        return len(self._x)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._x[idx]  # (1,)
        y = self._a * x + self._b + self._noise[idx]  # buggy: (1, 1); fixed: (1,)
        return x, y


class LinReg(nn.Module):
    """A LightningModule without Lightning: one neuron, ``training_step`` returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.layer_1 = nn.Linear(1, 1)
        self.logged: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_1(x)

    def log(self, name: str, value: torch.Tensor) -> None:
        """Stand-in for ``LightningModule.log``."""
        self.logged[name] = value.detach()

    def training_step(self, train_batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = train_batch
        preds = self.forward(x)
        loss = F.mse_loss(preds, y)
        self.log("train_loss", loss)
        return {"loss": loss}


def first_batch(*, buggy: bool, batch_size: int = 32) -> Any:
    loader = DataLoader(LineFunction(-4, 0, 1000, buggy=buggy), batch_size=batch_size, shuffle=False)
    return next(iter(loader))


def run_step(model: LinReg, batch: Any) -> Any:
    return model.training_step(batch, batch_idx=0)


def test_the_batches_have_the_shapes_of_the_report() -> None:
    x, y = first_batch(buggy=True)
    assert x.shape == (32, 1) and y.shape == (32, 1, 1)  # preds (32, 1) vs targets (32, 1, 1)
    x, y = first_batch(buggy=False)
    assert y.shape == (32, 1)


@pytest.mark.xfail(strict=True, raises=GradEquivError, reason="seed 002: (B, 1) vs (B, 1, 1) broadcasts to (B, B, 1)")
@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")  # torch's hint, easy to miss in a log
@pytest.mark.gradequiv
def test_buggy_noise_shape_is_caught(gradequiv: Any) -> None:
    torch.manual_seed(0)
    # The per-sample reference runs the same training_step on each sample alone, where
    # (1, 1) vs (1, 1, 1) is harmless: the batch gradient differs in float64 too, so it
    # is a bug, not rounding.
    gradequiv.step(run_step, LinReg(), first_batch(buggy=True))


@pytest.mark.gradequiv
def test_fixed_noise_shape_passes(gradequiv: Any) -> None:
    torch.manual_seed(0)
    report = gradequiv.step(run_step, LinReg(), first_batch(buggy=False))
    assert report.matched == "mean"


@pytest.mark.filterwarnings("ignore:Using a target size:UserWarning")
def test_batch_of_one_hides_the_bug() -> None:
    # Why small batches converged: with B=1 the broadcast is (1, 1) vs (1, 1, 1) -> (1, 1, 1),
    # the same numbers as the fixed loss. The check refuses B < 2 for this reason.
    torch.manual_seed(0)
    model = LinReg()
    (x, y_bad), (_, y_ok) = first_batch(buggy=True, batch_size=1), first_batch(buggy=False, batch_size=1)
    torch.testing.assert_close(run_step(model, (x, y_bad))["loss"], run_step(model, (x, y_ok))["loss"])
