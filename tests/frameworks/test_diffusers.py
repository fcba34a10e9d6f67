"""diffusers: a UNet noise-prediction training step.

With the noise and the timesteps in the batch, the step is deterministic and
the check passes; a step that draws its noise inside is refused as random,
naming the op and the line, never called a cross-sample bug.
"""

import inspect
import re

import pytest

pytest.importorskip("diffusers")

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel

from pytest_gradcheck import UnsupportedModelError, assert_gradequiv_step

B = 4
SCHEDULER = DDPMScheduler(num_train_timesteps=1000)


def make_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).train()


def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, 16, 16, generator=g), torch.randint(0, 1000, (B,), generator=g)


def noise_prediction_step(model, batch):
    noisy = SCHEDULER.add_noise(batch["x"], batch["noise"], batch["t"])
    return F.mse_loss(model(noisy, batch["t"]).sample, batch["noise"])


def noise_drawn_inside_step(model, batch):
    noise = torch.randn_like(batch["x"])
    noisy = SCHEDULER.add_noise(batch["x"], noise, batch["t"])
    return F.mse_loss(model(noisy, batch["t"]).sample, noise)


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}, [m.training for m in model.modules()]


def _assert_as_found(model, before):
    params, modes = _snapshot(model)
    assert params.keys() == before[0].keys()
    for name, value in before[0].items():
        assert torch.equal(params[name], value), name
        assert model.get_parameter(name).grad is None, name
    assert modes == before[1]


def test_noise_prediction_step_with_noise_in_the_batch():
    model = make_unet()
    x, t = images()
    noise = torch.randn(B, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    before = _snapshot(model)
    rng = torch.get_rng_state()

    report = assert_gradequiv_step(noise_prediction_step, model, {"x": x, "noise": noise, "t": t})

    assert report.passed
    assert report.batch_size == B
    _assert_as_found(model, before)
    assert torch.equal(torch.get_rng_state(), rng)


def test_noise_drawn_inside_the_step_is_refused_as_randomness():
    model = make_unet()
    x, t = images()
    before = _snapshot(model)
    rng = torch.get_rng_state()

    with pytest.raises(UnsupportedModelError) as info:
        assert_gradequiv_step(noise_drawn_inside_step, model, {"x": x, "t": t})

    message = str(info.value)
    assert "training step is random" in message
    assert "samples interact" not in message
    lines, first = inspect.getsourcelines(noise_drawn_inside_step)
    line = first + next(i for i, text in enumerate(lines) if "randn_like" in text)
    where = re.search(r"torch\.randn_like at (\S+):(\d+)", message)
    assert where, message
    assert where.group(1).endswith("test_diffusers.py")
    assert int(where.group(2)) == line
    _assert_as_found(model, before)
    assert torch.equal(torch.get_rng_state(), rng)  # the draws the check provoked are undone
