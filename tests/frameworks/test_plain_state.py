"""A model that rescales its own weights in place when its mode changes.

The check must leave such a model exactly as found (weights, the Python flag,
the mode, the number of mode switches it saw), so that the next training step
is bit-identical to the one without the check.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_gradcheck import assert_gradequiv


class SelfScaling(nn.Module):
    """Doubles ``fc2.weight`` in place when switched to eval, halves it back for train."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)
        self.scaled = False
        self.mode_changes = 0

    def train(self, mode=True):
        with torch.no_grad():
            if mode and self.scaled:
                self.fc2.weight.div_(2)
                self.scaled = False
            elif not mode and not self.scaled:
                self.fc2.weight.mul_(2)
                self.scaled = True
        self.mode_changes += 1
        return super().train(mode)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def _state(model):
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "scaled": model.scaled,
        "mode_changes": model.mode_changes,
        "training": [m.training for m in model.modules()],
        "keys": sorted(vars(model)),
    }


def _assert_same_state(a, b):
    assert a["params"].keys() == b["params"].keys()
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k]), k
    assert a["scaled"] == b["scaled"]
    assert a["mode_changes"] == b["mode_changes"]
    assert a["training"] == b["training"]
    assert a["keys"] == b["keys"]


def _sgd_step(model, x, y):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_self_rescaling_model_is_left_as_found(mode):
    torch.manual_seed(0)
    model = SelfScaling()
    x = torch.randn(6, 4)
    y = torch.randint(0, 3, (6,))
    if mode == "eval":
        model.eval()
    twin = copy.deepcopy(model)
    weight = model.fc2.weight
    before = _state(model)

    report = assert_gradequiv(model, F.cross_entropy, x, y)

    assert report.passed
    _assert_same_state(_state(model), before)
    assert model.fc2.weight is weight  # restored in place: the optimizer's reference stays valid
    assert model.fc2.weight.grad is None

    # the next training step is the one the model would have taken without the check
    _sgd_step(model, x, y)
    _sgd_step(twin, x, y)
    _assert_same_state(_state(model), _state(twin))
