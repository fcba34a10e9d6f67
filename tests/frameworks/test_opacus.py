"""opacus: the check inside a differentially private training loop.

Opacus keeps its per-sample machinery outside the parameters: ``activations``
on modules, ``grad_sample``, ``summed_grad`` and ``_forward_counter`` on
parameters, all written by hooks. A check, passing or failing, must leave every
one of them as found (same objects, same values), and the DP run (Poisson
sampling, clipping, noise from the global RNG) must end bit-identical to the
run without the check.
"""

import warnings

import pytest

pytest.importorskip("opacus")

import torch
import torch.nn.functional as F
from opacus import GradSampleModule, PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytest_gradcheck import GradEquivError, assert_gradequiv

pytestmark = [
    # opacus warns about secure RNG and about its accountant: not ours
    pytest.mark.filterwarnings("ignore::UserWarning:opacus.*"),
    pytest.mark.filterwarnings("ignore:.*secure_mode.*"),
    # torch, about opacus' full backward hooks on a model whose input needs no grad
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]


def summed_cross_entropy(out, y):
    return F.cross_entropy(out, y, reduction="sum")  # checked as a mean: a factor-B bug


def make_mlp():
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))


def _freeze(value):
    """What an attribute holds now: the object itself, and a copy of its contents."""
    if isinstance(value, torch.Tensor):
        return (value, value.detach().clone())
    if isinstance(value, list):
        return (value, list(value))
    if isinstance(value, dict):
        return (value, dict(value))
    return (value, value)


def snapshot(model):
    objects = {f"module {n or '<root>'}": m for n, m in model.named_modules()}
    objects.update({f"parameter {n}": p for n, p in model.named_parameters()})
    return {name: (obj, {k: _freeze(v) for k, v in vars(obj).items()}) for name, obj in objects.items()}


def assert_as_found(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (obj, attrs) in before.items():
        obj_now, attrs_now = after[name]
        assert obj_now is obj, name
        assert attrs_now.keys() == attrs.keys(), f"{name}: attributes {sorted(attrs)} -> {sorted(attrs_now)}"
        for key, (value, contents) in attrs.items():
            value_now, contents_now = attrs_now[key]
            assert value_now is value or (type(value) in (int, float, bool, str) and value_now == value), (
                f"{name}.{key} was replaced"
            )
            if isinstance(value, torch.Tensor):
                assert torch.equal(contents_now, contents), f"{name}.{key} changed"
            elif isinstance(value, list):
                assert len(contents_now) == len(contents), f"{name}.{key} changed length"
                assert all(a is b for a, b in zip(contents_now, contents)), f"{name}.{key} changed"
            elif isinstance(value, dict):
                assert contents_now.keys() == contents.keys(), f"{name}.{key} changed"
                assert all(contents_now[k] is contents[k] for k in contents), f"{name}.{key} changed"


def checks(model, xb, yb, reports):
    """A passing and a failing check, each leaving every opacus attribute as found."""
    before = snapshot(model)
    reports.append(assert_gradequiv(model, F.cross_entropy, xb, yb))
    assert_as_found(model, before)
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(model, summed_cross_entropy, xb, yb)
    reports.append(info.value.report)
    assert_as_found(model, before)


def dp_run(check_at):
    torch.manual_seed(0)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 10, generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = DataLoader(data, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
        )
    reports = []
    for i, (xb, yb) in enumerate(loader):
        if i == 3:
            break
        if (i, "before zero_grad") in check_at:
            assert len(xb) >= 2  # Poisson sampling, seeded: batches of 9 and 7
            checks(model, xb, yb, reports)
        optimizer.zero_grad()
        if (i, "after zero_grad") in check_at:
            checks(model, xb, yb, reports)
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    return model, reports


def assert_same_run(checked, plain):
    plain_params = dict(plain.named_parameters())
    for name, p in checked.named_parameters():
        assert torch.equal(p, plain_params[name]), name
    for name, m in checked.named_modules():
        assert sorted(vars(m)) == sorted(vars(plain.get_submodule(name))), name


def test_check_inside_dp_training_loop_changes_nothing():
    # batch 0: before any backward; batch 1, after zero_grad: activations lists and counters are set
    checked, reports = dp_run(check_at={(0, "before zero_grad"), (1, "after zero_grad")})
    plain, _ = dp_run(check_at=set())

    assert [r.passed for r in reports] == [True, False, True, False]
    assert reports[1].would_match == "sum"
    assert_same_run(checked, plain)


def test_check_before_zero_grad_mid_dp_loop():
    # batch 1, before zero_grad: grad_sample and summed_grad still hold batch 0's values
    checked, reports = dp_run(check_at={(1, "before zero_grad")})
    plain, _ = dp_run(check_at=set())

    assert [r.passed for r in reports] == [True, False]
    assert_same_run(checked, plain)


def test_grad_sample_module_keeps_its_grad_sample():
    torch.manual_seed(0)
    model = GradSampleModule(make_mlp())
    x = torch.randn(6, 10)
    y = torch.randint(0, 3, (6,))
    F.cross_entropy(model(x), y).backward()
    grad_samples = {
        n: (p.grad_sample, p.grad_sample.clone(), p.grad, p.grad.clone()) for n, p in model.named_parameters()
    }
    assert all(gs is not None and gs.shape[0] == 6 for gs, _, _, _ in grad_samples.values())
    before = snapshot(model)

    report = assert_gradequiv(model, F.cross_entropy, x[:4], y[:4])

    assert report.passed
    assert_as_found(model, before)
    for name, p in model.named_parameters():
        grad_sample, grad_sample_value, grad, grad_value = grad_samples[name]
        assert p.grad_sample is grad_sample, name
        assert torch.equal(p.grad_sample, grad_sample_value), name
        assert p.grad is grad and torch.equal(p.grad, grad_value), name

    with pytest.raises(GradEquivError):
        assert_gradequiv(model, summed_cross_entropy, x[:4], y[:4])
    assert_as_found(model, before)
