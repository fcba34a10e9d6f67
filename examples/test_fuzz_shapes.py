"""Finding a target-shape bug that batch size 1 hides, and shrinking it to b=2.

Run with ``pytest examples/test_fuzz_shapes.py``. The model is a toy
regression net whose outputs are ``(b, 1)``; the targets come as ``(b,)``, as
they do from most data loaders. ``(out - y)`` then broadcasts to ``(b, b)``:
every prediction is compared with every target. At b=1 that is ``(1, 1)`` and
harmless, so a test with one sample (or a lucky shape) passes and the model
silently trains on the wrong loss. Hypothesis draws batch sizes and feature
counts and shrinks the failure to the smallest case: b=2, one feature.

For reproducible CI runs, register the profile in ``conftest.py``::

    from pytest_gradcheck import strategies as gst
    gst.register_profiles()

and run ``pytest --hypothesis-profile=gradequiv-ci``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from torch import nn

from pytest_gradcheck import GradEquivError, fuzz_gradequiv
from pytest_gradcheck import strategies as gst


class Regressor(nn.Module):
    """A small MLP: ``(b, features) -> (b, 1)``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def buggy_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE with the bug: ``(b, 1) - (b,)`` broadcasts to ``(b, b)``."""
    return (out - target).pow(2).mean()


def fixed_mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The fix: give predictions and targets the same shape."""
    return (out.squeeze(-1) - target).pow(2).mean()


# Per-sample features are a named free dimension, "features"; the targets are
# one value per sample, target_shape=() -> (b,). batch.dims["features"] is the
# drawn size, used to build a model of the right width.
regression_batches = gst.batches(input_shape=("features",), target_shape=())

# After a failure, Hypothesis's explain phase re-runs the failing check ~100
# times; for gradient checks that is most of the run time, so skip it (the
# "gradequiv-ci" profile of gst.register_profiles() does the same).
fuzz_settings = settings(max_examples=20, deadline=None, phases=[p for p in Phase if p is not Phase.explain])


def test_batch_size_one_hides_the_bug() -> None:
    # At b=1 the buggy loss equals the fixed one: this is why gst.batch_sizes()
    # (and so gst.batches and fuzz_gradequiv) starts at b=2.
    torch.manual_seed(0)
    out, target = Regressor(3)(torch.randn(1, 3)), torch.randn(1)
    torch.testing.assert_close(buggy_mse(out, target), fixed_mse(out, target))


@pytest.mark.xfail(strict=True, raises=GradEquivError, reason="(b, 1) - (b,) broadcasts to (b, b)")
@pytest.mark.gradequiv
@fuzz_settings
@given(batch=regression_batches)
def test_buggy_loss_is_caught_and_shrunk_to_b2(gradequiv, batch: gst.Batch) -> None:
    # Hypothesis reports ("Falsifying example" or, in newer releases, "Failing test case"): ... batch_size=2, dims={'features': 1}
    torch.manual_seed(0)
    model = Regressor(**batch.dims)
    gradequiv(model, buggy_mse, batch.inputs, batch.targets)


@pytest.mark.gradequiv
@fuzz_settings
@given(batch=regression_batches)
def test_fixed_loss_passes_for_every_shape(gradequiv, batch: gst.Batch) -> None:
    torch.manual_seed(0)
    model = Regressor(**batch.dims)
    gradequiv(model, fixed_mse, batch.inputs, batch.targets)


# The same without writing Hypothesis code: fuzz_gradequiv draws the batch size
# (2 to 64) and every named free dimension, builds the model with
# Regressor(features=...), and reports the smallest failing shapes first:
#   smallest failing example: batch_size=2, features=1, input (2, 1), target (2,)


@pytest.mark.xfail(strict=True, raises=GradEquivError, reason="(b, 1) - (b,) broadcasts to (b, b)")
def test_buggy_loss_with_fuzz_gradequiv() -> None:
    fuzz_gradequiv(Regressor, buggy_mse, input_shape=("features",), target_shape=(), max_examples=15)


def test_fixed_loss_with_fuzz_gradequiv(gradequiv) -> None:
    # check=gradequiv: each example is checked by the fixture, so the tolerances
    # and broadcast mode from the marker, ini file and command line apply.
    fuzz_gradequiv(Regressor, fixed_mse, input_shape=("features",), target_shape=(), max_examples=15, check=gradequiv)
