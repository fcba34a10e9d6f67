"""Lightning + torchmetrics: a training step that updates and logs a metric.

The metric's in-place update cannot be batched by vmap, so the check falls back
to a loop and says why; the metric, Lightning's logged values and the rest of
the training run are left exactly as they would have been without the check.
"""

import copy

import pytest

L = pytest.importorskip("lightning")
torchmetrics = pytest.importorskip("torchmetrics")

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pytest_gradcheck import assert_gradequiv_step

pytestmark = [
    # self.log() outside a Trainer, and Lightning's own deprecation notices, are not ours
    pytest.mark.filterwarnings(r"ignore:You are trying to `self\.log\(\)`"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec"),
]


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        self.acc(logits.argmax(-1), y)
        self.log("train_acc", self.acc, on_step=True, on_epoch=True)
        self.log("loss", loss, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def _metric_snapshot(metric):
    return {
        "state": {k: v.clone() for k, v in metric.metric_state.items()},
        "update_count": metric._update_count,
        "computed": metric._computed,
        "forward_cache": metric._forward_cache,
        "keys": sorted(vars(metric)),
    }


def test_training_step_with_metric_outside_trainer():
    torch.manual_seed(0)
    model = Classifier()
    x = torch.randn(8, 6)
    y = torch.randint(0, 3, (8,))
    # a non-trivial metric state before the check
    model.acc.update(torch.tensor([0, 1, 2, 0, 1]), torch.tensor([0, 1, 1, 2, 1]))
    value_before = model.acc.compute()  # also caches the value in model.acc._computed
    state_tensors = dict(model.acc.metric_state)
    before = _metric_snapshot(model.acc)
    params_before = copy.deepcopy(model.state_dict())

    report = assert_gradequiv_step(lambda m, b: m.training_step(b, 0), model, (x, y))

    assert report.passed
    assert report.reference_method == "loop"
    assert "model.acc" in report.fallback_reason
    after = _metric_snapshot(model.acc)
    assert after["keys"] == before["keys"]
    assert after["state"].keys() == before["state"].keys()
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), name
        assert getattr(model.acc, name) is state_tensors[name], f"{name} was replaced, not restored in place"
    assert after["update_count"] == before["update_count"] == 1
    assert after["computed"] is before["computed"]
    assert after["forward_cache"] is before["forward_cache"]
    assert torch.equal(model.acc.compute(), value_before)
    model.acc._computed = None  # recompute from the restored state, not the cache
    assert torch.equal(model.acc.compute(), value_before)
    for name, value in params_before.items():
        assert torch.equal(model.state_dict()[name], value), name


class CheckFirstBatch(L.Callback):
    def __init__(self):
        self.reports = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 0:
            report = assert_gradequiv_step(lambda m, b: m.training_step(b, batch_idx), pl_module, batch)
            self.reports.append(report)


def _fit(tmp_path, callbacks):
    torch.manual_seed(0)
    model = Classifier()
    g = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
    loader = DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(2))
    trainer = L.Trainer(
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        callbacks=callbacks,
    )
    trainer.fit(model, loader)
    return model, trainer, torch.get_rng_state()


def test_check_inside_a_running_trainer_changes_nothing(tmp_path):
    callback = CheckFirstBatch()
    checked, checked_trainer, checked_rng = _fit(tmp_path / "checked", [callback])
    plain, plain_trainer, plain_rng = _fit(tmp_path / "plain", [])

    assert len(callback.reports) == 1
    assert callback.reports[0].passed

    plain_params = dict(plain.named_parameters())
    for name, p in checked.named_parameters():
        assert torch.equal(p, plain_params[name]), name
    assert checked_trainer.callback_metrics.keys() == plain_trainer.callback_metrics.keys()
    for name, value in plain_trainer.callback_metrics.items():
        assert torch.equal(checked_trainer.callback_metrics[name], value), name
    assert checked_trainer.global_step == plain_trainer.global_step
    assert torch.equal(checked_rng, plain_rng)
