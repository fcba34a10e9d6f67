"""Bad input gets a clear error that names the argument and says what to do (issue 15, class 9).

Never a traceback from deep inside torch, never a failed check: every error here is an
``InvalidArgument`` (a ``ValueError`` and a ``TypeError``).
"""

from __future__ import annotations

import contextlib
import multiprocessing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_gradcheck import InvalidArgument, assert_gradequiv, assert_gradequiv_step


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


def batch(b: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, generator=g), torch.randn(b, 1, generator=g)


# --------------------------------------------------------------------------- a class instead of an object


def test_a_loss_class_instead_of_an_instance_says_how_to_make_one() -> None:
    x, y = batch()
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv(mlp(), nn.MSELoss, x, y)
    assert str(info.value).startswith("loss_fn is the class nn.MSELoss; pass an instance: nn.MSELoss()")


def test_a_model_class_instead_of_an_instance_says_how_to_make_one() -> None:
    x, y = batch()
    with pytest.raises(
        InvalidArgument, match=r"^model is the class nn\.Linear; pass an instance: nn\.Linear\(\.\.\.\)"
    ):
        assert_gradequiv(nn.Linear, F.mse_loss, x, y)


def test_a_user_loss_class_is_named_by_its_own_name() -> None:
    class MyLoss(nn.Module):
        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(out, y)

    x, y = batch()
    with pytest.raises(InvalidArgument, match=r"^loss_fn is the class MyLoss; pass an instance: MyLoss\(\)"):
        assert_gradequiv(mlp(), MyLoss, x, y)
    assert assert_gradequiv(mlp(), MyLoss(), x, y).passed


# --------------------------------------------------------------------------- dtypes that torch cannot mix


@pytest.mark.parametrize("direction", ["float64 inputs, float32 model", "float32 inputs, float64 model"])
def test_model_and_inputs_of_different_dtypes_name_both_and_the_fix(direction: str) -> None:
    x, y = batch()
    model = mlp()
    if direction.startswith("float64 inputs"):
        x, y = x.double(), y.double()
        inputs, params = "float64", "float32"
    else:
        model = model.double()
        inputs, params = "float32", "float64"
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv(model, F.mse_loss, x, y)
    text = str(info.value)
    assert text.startswith(f"dtype mismatch: the inputs are {inputs} but the model's parameters are {params}")
    assert f"inputs.to(torch.{params})" in text and f"model.to(torch.{inputs})" in text
    assert "mat1 and mat2" in text  # torch's own words, as the evidence


def test_a_conv_net_dtype_mismatch_is_translated_too() -> None:
    model = nn.Sequential(nn.Conv1d(3, 2, 1), nn.Flatten(), nn.Linear(2, 1))
    with pytest.raises(InvalidArgument, match="dtype mismatch: the inputs are float64"):
        assert_gradequiv(model, F.mse_loss, torch.randn(4, 3, 1, dtype=torch.float64), torch.randn(4, 1))


def test_integer_inputs_and_a_model_that_casts_its_inputs_are_not_dtype_errors() -> None:
    class Casts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.to(self.fc.weight.dtype))

    x, y = batch()
    assert assert_gradequiv(Casts(), F.mse_loss, x.double(), y).passed
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 1))
    assert assert_gradequiv(emb, F.mse_loss, torch.randint(0, 10, (6, 2)), y).passed


def test_a_dtype_error_that_is_not_about_the_inputs_is_left_alone() -> None:
    class MixesItself(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.double())  # the model's own bug: inputs and parameters agree

    x, y = batch()
    with pytest.raises(RuntimeError) as info:
        assert_gradequiv(MixesItself(), F.mse_loss, x, y)
    assert not isinstance(info.value, InvalidArgument)


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ("abc", "weights is a str: pass one number per sample (a tensor, array or sequence of 6), or a callable"),
        ({"a": 1.0}, "weights is a dict: pass one number per sample"),
        ([1.0, "x", 1.0, 1.0, 1.0, 1.0], "weights cannot be read as numbers"),
        (torch.ones(2, 3), "weights has shape (2, 3): expected one weight per sample, (6,): a 1-d tensor"),
        (torch.ones(6, 1), "weights has shape (6, 1): expected one weight per sample, (6,): a 1-d tensor"),
        (np.ones((3, 2)), "weights has shape (3, 2): expected one weight per sample, (6,): a 1-d tensor"),
        (torch.ones(5), "weights has shape (5,): expected one weight per sample, (6,): a 1-d tensor"),
        (torch.tensor(1.0), "weights has shape (): expected one weight per sample, (6,): a 1-d tensor"),
    ],
    ids=["str", "dict", "non-number", "2x3", "6x1", "array-3x2", "short", "0-d"],
)
def test_weights_of_a_wrong_type_or_shape_are_refused(weights: object, message: str) -> None:
    x, y = batch()
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv(mlp(), F.mse_loss, x, y, weights=weights)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (
            lambda t: torch.ones(3),
            "weights(sample 0) returned a tensor of shape (3,): the weights callable must return one number per sample",
        ),
        (lambda t: "a", "weights(sample 0) returned a str: the weights callable must return one number per sample"),
        (lambda t: None, "weights(sample 0) returned a NoneType"),
    ],
    ids=["non-scalar", "str", "none"],
)
def test_a_weights_callable_that_does_not_return_a_number(weights: object, message: str) -> None:
    x, y = batch()
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv(mlp(), F.mse_loss, x, y, weights=weights)
    assert str(info.value).startswith(message)


def test_good_weights_still_pass() -> None:
    x, y = batch()
    for w in (
        torch.full((6,), 2.0),
        np.full(6, 2.0),
        [2] * 6,
        (2.0,) * 6,
        lambda t: 2.0,
        lambda t: torch.tensor(2.0),
        lambda t: (t > -100).sum(),  # 0-d integer tensor
        lambda t: torch.ones(1),  # one number, shape (1,)
    ):
        assert assert_gradequiv(mlp(), F.mse_loss, x, y, weights=w).matched == "weighted mean"


# --------------------------------------------------------------------------- batch sizes, named as the user passed them


@pytest.mark.parametrize(
    ("inputs", "targets", "message"),
    [
        (
            torch.randn(6, 3),
            torch.randn(5, 1),
            "batch sizes disagree: inputs (shape (6, 3)) has 6 samples but targets (shape (5, 1)) has 5",
        ),
        (
            torch.randn(6, 3),
            (torch.randn(6, 1), torch.randn(4)),
            "batch sizes disagree: inputs (shape (6, 3)) has 6 samples but targets[1] (shape (4,)) has 4",
        ),
        (
            (torch.randn(6, 3), torch.randn(4, 3)),
            torch.randn(6, 1),
            "batch sizes disagree: inputs[0] (shape (6, 3)) has 6 samples but inputs[1] (shape (4, 3)) has 4",
        ),
        (torch.randn(6, 3), torch.tensor(1.0), "targets is a 0-d tensor (a single number)"),
        (torch.randn(6, 3), (torch.randn(6, 1), torch.tensor(2.0)), "targets[1] is a 0-d tensor"),
        (torch.tensor(1.0), torch.randn(6, 1), "inputs is a 0-d tensor"),
        (torch.randn(1, 3), torch.randn(1, 1), "batch size 1 (inputs (shape (1, 3)))"),
    ],
    ids=["targets", "targets-tuple", "inputs-tuple", "targets-0d", "targets-tuple-0d", "inputs-0d", "b1"],
)
def test_batch_size_errors_name_inputs_and_targets(inputs: object, targets: object, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv(nn.Linear(3, 1), lambda o, *t: F.mse_loss(o, t[0]), inputs, targets)
    text = str(info.value)
    assert text.startswith(message)
    assert "batch[" not in text


def test_a_0d_tensor_error_says_what_to_do() -> None:
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv(nn.Linear(3, 1), F.mse_loss, torch.randn(6, 3), torch.tensor(1.0))
    assert "every tensor needs the batch on dim 0" in str(info.value)
    assert "one value per sample" in str(info.value)


def test_step_form_batch_errors_name_the_path_in_the_batch() -> None:
    def step(m: nn.Module, b: dict) -> torch.Tensor:
        return F.mse_loss(m(b["x"]), b["y"])

    with pytest.raises(
        InvalidArgument, match=r"^batch sizes disagree: batch\['x'\] \(shape \(6, 3\)\) has 6 samples but batch\['y'\]"
    ):
        assert_gradequiv_step(step, nn.Linear(3, 1), {"x": torch.randn(6, 3), "y": torch.randn(5, 1)})


# --------------------------------------------------------------------------- sparse gradients and sparse inputs


def test_a_sparse_embedding_is_refused_with_the_fix() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 1))
    ids, y = torch.randint(0, 10, (6, 2)), torch.randn(6, 1)
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv(model, F.mse_loss, ids, y)
    text = str(info.value)
    assert text.startswith("model.0 (Embedding) has sparse=True: its weight gets a sparse gradient")
    assert "sparse=False" in text
    with pytest.raises(InvalidArgument, match=r"^model\.bag \(EmbeddingBag\) has sparse=True"):

        class Bag(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.bag = nn.EmbeddingBag(10, 4, sparse=True)
                self.fc = nn.Linear(4, 1)

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                return self.fc(self.bag(ids))

        assert_gradequiv_step(lambda m, b: F.mse_loss(m(b[0]), b[1]), Bag(), (ids, y))
    # the same model built with sparse=False is checked
    dense = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(8, 1))
    assert assert_gradequiv(dense, F.mse_loss, ids, y).passed


def test_a_frozen_sparse_embedding_is_fine() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 1))
    model[0].weight.requires_grad_(False)
    assert assert_gradequiv(model, F.mse_loss, torch.randint(0, 10, (6, 2)), torch.randn(6, 1)).passed


def test_sparse_inputs_are_refused_with_the_fix() -> None:
    x, y = batch()
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv(nn.Linear(3, 1), F.mse_loss, x.to_sparse(), y)
    assert str(info.value).startswith("inputs is a sparse tensor (layout torch.sparse_coo)")
    assert "to_dense()" in str(info.value)
    with pytest.raises(InvalidArgument, match=r"^batch\['x'\] is a sparse tensor \(layout torch.sparse_csr\)"):
        assert_gradequiv_step(
            lambda m, b: F.mse_loss(m(b["x"].to_dense()), b["y"]), nn.Linear(3, 1), {"x": x.to_sparse_csr(), "y": y}
        )


# --------------------------------------------------------------------------- models that write into their inputs


class _WritesIds(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.how = how
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(8, 1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.how == "mask":
            ids[ids == 0] = 1
        else:
            ids.add_(1)
        return self.fc(self.emb(ids).flatten(1))


def _ids() -> torch.Tensor:
    ids = torch.zeros(6, 2, dtype=torch.long)
    ids[:, 1] = torch.arange(6) % 4
    ids[::2, 0] = 5
    return ids


def test_a_model_that_adds_to_its_integer_inputs_under_vmap_runs_on_copies() -> None:
    ids, y = _ids(), torch.randn(6, 1)
    before = ids.clone()
    report = assert_gradequiv(_WritesIds("add"), F.mse_loss, ids, y)
    assert report.passed and report.reference_method == "vmap"
    assert torch.equal(ids, before)


@pytest.mark.parametrize(
    ("how", "reference"),
    [("add", "loop"), ("mask", "auto")],  # vmap cannot batch a boolean mask: "auto" falls back to the loop
)
def test_a_model_that_writes_into_its_integer_inputs_in_the_loop_runs_on_copies_and_passes(
    how: str, reference: str
) -> None:
    ids, y = _ids(), torch.randn(6, 1)
    before = ids.clone()
    report = assert_gradequiv(_WritesIds(how), F.mse_loss, ids, y, reference=reference)
    assert report.passed and report.reference_method == "loop"
    assert torch.equal(ids, before)


def test_a_model_that_masks_its_integer_inputs_leaves_them_unchanged_whatever_happens() -> None:
    ids, y = _ids(), torch.randn(6, 1)
    before = ids.clone()
    with contextlib.suppress(Exception):  # the verdict is the test above; here only the user's tensor matters
        assert_gradequiv(_WritesIds("mask"), F.mse_loss, ids, y)
    assert torch.equal(ids, before)


# --------------------------------------------------------------------------- losses that need the whole batch


def test_a_loss_normalised_by_a_batch_statistic_is_named_as_such() -> None:
    x, y = batch()
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv(mlp(), lambda o, t: ((o - t) / o.std(0)).pow(2).mean(), x, y)
    text = str(info.value)
    assert "non-finite entries (NaN or inf) but the batch gradient is finite" in text
    assert "per-sample gradients do not exist" in text
    assert "std(0)" in text and "overflow" not in text


# --------------------------------------------------------------------------- steps that ignore their batch


def test_a_training_step_that_ignores_its_batch_is_refused() -> None:
    x, y = batch()
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv_step(lambda m, b: m(torch.ones(1, 3)).sum(), nn.Linear(3, 1), (x, y))
    assert str(info.value).startswith("the loss does not depend on the batch")
    assert "nothing would be checked" in str(info.value)


def test_a_training_step_that_ignores_its_batch_is_refused_by_the_loop_reference_too() -> None:
    x, y = batch()
    with pytest.raises(InvalidArgument, match="^the loss does not depend on the batch"):
        assert_gradequiv_step(lambda m, b: m(torch.ones(1, 3)).sum(), nn.Linear(3, 1), (x, y), reference="loop")


def test_the_sample_use_probe_sees_integer_ids_and_refuses_a_fixed_tensor() -> None:
    from pytest_gradcheck._torch.loss import run_watching_sample

    torch.manual_seed(0)
    emb = nn.Embedding(10, 2)
    ids = torch.randint(0, 10, (1, 2))
    assert run_watching_sample(lambda: emb(ids).sum(), {"ids": ids, "n": 3}).shape == ()
    with pytest.raises(InvalidArgument, match="^the loss does not depend on the batch"):
        run_watching_sample(lambda: emb(torch.zeros(1, 2, dtype=torch.long)).sum(), {"ids": ids})


def test_a_loss_that_ignores_outputs_and_targets_is_refused() -> None:
    x, y = batch()
    model = mlp()
    with pytest.raises(InvalidArgument, match="^the loss does not depend on the batch"):
        assert_gradequiv(model, lambda o, t: sum(p.pow(2).sum() for p in model.parameters()), x, y)


def test_a_step_using_only_integer_ids_or_targets_depends_on_the_batch() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 1)
    ids = torch.randint(0, 10, (6,))
    assert assert_gradequiv_step(lambda m, b: m(b).sum(), emb, ids, reduction="sum").passed
    # a bias-only model: the output ignores the inputs but the loss reads the targets
    bias = nn.Linear(3, 1)
    x, y = batch()
    assert assert_gradequiv(bias, lambda o, t: F.mse_loss(o * 0 + bias.bias, t), x, y).passed


# --------------------------------------------------------------------------- DDP refuses a batch of one


def test_ddp_refuses_a_batch_of_one_like_every_other_check() -> None:
    from pytest_gradcheck import assert_ddp_equiv

    make_mlp = mlp  # module-level: picklable for the child processes (none is started here)
    with pytest.raises(InvalidArgument) as info:
        assert_ddp_equiv(make_mlp, F.mse_loss, torch.randn(1, 3), torch.randn(1, 1), world_size=1)
    assert str(info.value).startswith(
        "batch size 1 (inputs (shape (1, 3))): a batch of one hides every cross-sample bug"
    )
    with pytest.raises(
        InvalidArgument, match=r"^batch sizes disagree: inputs \(shape \(8, 3\)\) has 8 samples but targets"
    ):
        assert_ddp_equiv(make_mlp, F.mse_loss, torch.randn(8, 3), torch.randn(7, 1))
    with pytest.raises(InvalidArgument, match=r"^targets is a 0-d tensor"):
        assert_ddp_equiv(make_mlp, F.mse_loss, torch.randn(8, 3), torch.tensor(1.0))
    with pytest.raises(InvalidArgument, match=r"^loss_fn is the class nn\.MSELoss; pass an instance: nn\.MSELoss\(\)"):
        assert_ddp_equiv(make_mlp, nn.MSELoss, torch.randn(8, 3), torch.randn(8, 1))
    assert multiprocessing.active_children() == []
