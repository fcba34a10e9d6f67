"""assert_accumulation_equiv: k accumulated micro-batches give the full-batch gradient."""

from __future__ import annotations

import doctest
import random
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_gradcheck import (
    GradEquivError,
    InvalidArgument,
    UnsupportedModelError,
    accumulation,
    assert_accumulation_equiv,
)
from pytest_gradcheck.accumulation import assert_accumulation_equiv_step, split_sizes

VOCAB, T = 11, 6
LENGTHS = [6, 1, 2, 6, 5, 3]  # uneven padding: micro-batches hold different token counts


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8, padding_idx=0)
        self.out = nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(ids)))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the non-ignored tokens of the whole (micro-)batch."""
    return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-100)


def lm_batch(lengths: list[int] = LENGTHS) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, VOCAB, (len(lengths), T))
    targets = torch.randint(0, VOCAB, (len(lengths), T))
    for i, n in enumerate(lengths):
        ids[i, n:] = 0
        targets[i, n:] = -100
    return ids, targets


def tokens(t: torch.Tensor) -> torch.Tensor:
    return (t != -100).sum()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


# --------------------------------------------------------------------------- language-model losses


def test_mean_of_micro_batch_means_fails_and_names_the_token_weighting() -> None:
    ids, targets = lm_batch()
    with pytest.raises(GradEquivError) as info:
        assert_accumulation_equiv(TinyLM(), lm_loss, ids, targets, micro_batches=3)
    report = info.value.report
    assert report.check == "accumulation" and report.batch_size == 3
    assert report.reference_method == "micro-batches"
    assert report.float64 is not None and not report.float64.passed  # a bug, not rounding
    assert report.would_match == "mean weighted by their number of non-ignored targets (targets != -100)"
    finding = next(f for f in report.findings if f.kind == "known-weights")
    assert finding.weights is not None
    np.testing.assert_allclose(finding.weights, np.array([7.0, 8.0, 8.0]) / (23 / 3))
    text = str(info.value)
    first, verdict = text.splitlines()[:2]
    assert first == (
        "the batch gradient weights the micro-batches by their number of non-ignored targets (targets != -100), "
        "not the mean of micro-batch gradients"
    )
    assert verdict.startswith(
        "Gradients are NOT equivalent: the batch gradient is not the mean of micro-batch gradients"
    )
    assert "3 micro-batches · float32" in text
    assert "weighted by their number of non-ignored targets (targets != -100)" in text
    assert "6 samples split into 3 micro-batches of sizes [2, 2, 2]" in text
    assert "scale micro-batch k's loss by w_k / sum(w) before .backward()" in text


def test_token_count_weights_pass() -> None:
    ids, targets = lm_batch()
    report = assert_accumulation_equiv(TinyLM(), lm_loss, ids, targets, micro_batches=3, weights=tokens)
    assert report.passed and report.matched == "weighted mean"
    assert report.weights == (7.0, 8.0, 8.0)
    text = str(report)
    assert "Gradients are equivalent: the batch gradient equals the weighted mean of micro-batch gradients." in text
    assert "micro-batch weights: [7.0, 8.0, 8.0]" in text


def test_explicit_equal_weights_are_the_mean_of_means() -> None:
    ids, targets = lm_batch()
    with pytest.raises(GradEquivError, match="non-ignored targets"):
        assert_accumulation_equiv(TinyLM(), lm_loss, ids, targets, micro_batches=3, weights=[1, 1, 1])
    counts = torch.tensor([7, 8, 8])
    assert assert_accumulation_equiv(TinyLM(), lm_loss, ids, targets, micro_batches=3, weights=counts).passed


def test_one_micro_batch_is_the_full_batch() -> None:
    ids, targets = lm_batch()
    report = assert_accumulation_equiv(TinyLM(), lm_loss, ids, targets, micro_batches=1)
    assert report.passed and report.batch_size == 1 and report.matched == "mean"


def test_one_sample_per_micro_batch() -> None:
    ids, targets = lm_batch()
    report = assert_accumulation_equiv(TinyLM(), lm_loss, ids, targets, micro_batches=6, weights=tokens)
    assert report.passed and report.weights == tuple(float(n) for n in LENGTHS)
    with pytest.raises(GradEquivError) as info:
        assert_accumulation_equiv(TinyLM(), lm_loss, ids, targets, micro_batches=6)
    assert "non-ignored targets" in (info.value.report.would_match or "")


def test_micro_batch_with_only_ignored_targets_is_explained() -> None:
    ids, targets = lm_batch([6, 0, 3, 2])
    with pytest.raises(InvalidArgument, match=r"loss of micro-batch 1 \(samples 1:2\) is nan"):
        assert_accumulation_equiv(TinyLM(), lm_loss, ids, targets, micro_batches=4, weights=tokens)


# --------------------------------------------------------------------------- splits and reductions


def test_uneven_final_micro_batch() -> None:
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    model = mlp()
    # A loader-style split, the last micro-batch short: the default weighs by sample count.
    report = assert_accumulation_equiv(model, F.mse_loss, x, y, micro_batches=[4, 4, 2])
    assert report.passed and report.weights == (4.0, 4.0, 2.0)
    assert "micro-batches are weighted by their number of samples [4, 4, 2] (the default)" in str(report)
    # torch.tensor_split order for an int: 10 samples in 4 micro-batches -> 3, 3, 2, 2.
    report = assert_accumulation_equiv(model, F.mse_loss, x, y, micro_batches=4)
    assert report.passed and report.weights == (3.0, 3.0, 2.0, 2.0)
    assert "samples 0:3, 3:6, 6:8, 8:10" in str(report)
    # Dividing each micro-batch loss by k (equal weights) is wrong when the last one is short.
    with pytest.raises(GradEquivError) as info:
        assert_accumulation_equiv(model, F.mse_loss, x, y, micro_batches=[4, 4, 2], weights=[1, 1, 1])
    assert info.value.report.would_match == "mean weighted by their number of samples"


def test_even_split_matches_the_plain_mean() -> None:
    report = assert_accumulation_equiv(mlp(), F.mse_loss, torch.randn(8, 3), torch.randn(8, 1), micro_batches=4)
    assert report.passed and report.matched == "mean" and report.weights is None


def test_summed_loss_is_diagnosed_as_a_factor_k() -> None:
    def sum_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return ((out - y) ** 2).sum()

    x, y = torch.randn(8, 3), torch.randn(8, 1)
    with pytest.raises(GradEquivError) as info:
        assert_accumulation_equiv(mlp(), sum_mse, x, y, micro_batches=4)
    assert info.value.report.would_match == "sum"
    text = str(info.value)
    assert "the batch gradient is the SUM of micro-batch gradients, not their mean" in text
    assert "with k=4 micro-batches the full-batch gradient is their sum" in text
    report = assert_accumulation_equiv(mlp(), sum_mse, x, torch.randn(8, 1), micro_batches=[5, 3], reduction="sum")
    assert report.matched == "sum" and report.weights is None


def test_broadcast_in_the_loss_breaks_accumulation() -> None:
    def buggy_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out - y).pow(2).mean()  # (B, 1) - (B,) -> (B, B)

    with pytest.raises(GradEquivError) as info:
        assert_accumulation_equiv(mlp(), buggy_mse, torch.randn(8, 3), torch.randn(8), micro_batches=2)
    assert any(f.kind == "broadcast" for f in info.value.report.findings)
    assert "implicit broadcast in the loss" in str(info.value)


def test_tuple_inputs_and_a_loss_module() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
            return self.a(x) + self.b(z)

    ids = torch.randint(0, 2, (7,))
    ids[2] = -100
    loss = nn.CrossEntropyLoss()
    report = assert_accumulation_equiv(
        Two(), loss, (torch.randn(7, 3), torch.randn(7, 2)), ids, micro_batches=3, weights=tokens
    )
    assert report.passed and report.weights == (2.0, 2.0, 2.0)


# --------------------------------------------------------------------------- the step form


def lm_step(model: nn.Module, batch: dict) -> dict:
    logits = model(batch["input_ids"])
    loss = lm_loss(logits, batch["labels"])
    return {"loss": loss, "log": {"tokens": int((batch["labels"] != -100).sum()), "tag": batch["tag"]}}


def test_step_form_with_a_dict_batch() -> None:
    ids, targets = lm_batch()
    batch = {"input_ids": ids, "labels": targets, "tag": "train"}
    with pytest.raises(GradEquivError) as info:
        assert_accumulation_equiv_step(lm_step, TinyLM(), batch, micro_batches=2)
    assert "entries != -100 in batch['labels']" in str(info.value)
    report = assert_accumulation_equiv_step(
        lm_step, TinyLM(), batch, micro_batches=2, weights=lambda mb: tokens(mb["labels"])
    )
    assert report.passed and report.weights == (9.0, 14.0)


# --------------------------------------------------------------------------- state and bad input


def test_state_is_left_as_found() -> None:
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 1))
    model.train()
    model[2].eval()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    grads = [p.grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(6, 3), torch.randn(6, 1)
    rng, py_rng = torch.get_rng_state(), random.getstate()

    report = assert_accumulation_equiv(model, F.mse_loss, x, y, micro_batches=3)
    assert report.passed and report.dropout_disabled == ("model.1",)
    with pytest.raises(GradEquivError):
        assert_accumulation_equiv(model, F.mse_loss, x, y, micro_batches=[5, 1], weights=[1, 1])

    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert model.training and model[1].training and not model[2].training
    assert all(p.grad is g and torch.equal(g, torch.ones_like(g)) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_batchnorm_in_train_mode_is_explained() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    with pytest.raises(UnsupportedModelError, match=r"model\.1 \(BatchNorm1d\) is in train mode"):
        assert_accumulation_equiv(model, F.mse_loss, torch.randn(4, 3), torch.randn(4, 1), micro_batches=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"micro_batches": 0}, r"micro_batches=0: expected at least 1 micro-batch"),
        ({"micro_batches": 7}, r"micro_batches=7 is more than the batch has samples \(6\)"),
        ({"micro_batches": True}, r"micro_batches=True"),
        ({"micro_batches": [3, 2]}, r"adds up to 5 samples but the batch has 6"),
        ({"micro_batches": [3, 0, 3]}, r"every micro-batch size must be an int >= 1, got 0"),
        ({"micro_batches": "2"}, r"expected an int \(the number of micro-batches\)"),
        (
            {"micro_batches": 2, "weights": [1, 2, 3]},
            r"weights has 3 entries: expected one weight per micro-batch \(2\)",
        ),
        ({"micro_batches": 2, "weights": [1, -1]}, r"must be finite and >= 0"),
        ({"micro_batches": 2, "weights": [0, 0]}, r"weights sum to 0"),
        (
            {"micro_batches": 2, "weights": lambda t: t.foo},
            r"weights\(micro_targets\) raised AttributeError on micro-batch 0",
        ),
        ({"micro_batches": 2, "rtol": "x"}, r"Invalid rtol='x'"),
    ],
)
def test_bad_arguments_get_a_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        assert_accumulation_equiv(mlp(), F.mse_loss, torch.randn(6, 3), torch.randn(6, 1), **kwargs)


def test_bad_batches_get_a_clear_error() -> None:
    with pytest.raises(
        InvalidArgument, match=r"batch sizes disagree: inputs \(shape \(6, 3\)\) has 6 samples but targets"
    ):
        assert_accumulation_equiv(mlp(), F.mse_loss, torch.randn(6, 3), torch.randn(5, 1), micro_batches=2)
    with pytest.raises(InvalidArgument, match="batch size 1"):
        assert_accumulation_equiv(mlp(), F.mse_loss, torch.randn(1, 3), torch.randn(1, 1), micro_batches=1)
    with pytest.raises(InvalidArgument, match="empty batch"):
        assert_accumulation_equiv(mlp(), F.mse_loss, torch.randn(0, 3), torch.randn(0, 1), micro_batches=1)
    with pytest.raises(InvalidArgument, match="targets is None"):
        assert_accumulation_equiv(
            mlp(), lambda out: out.pow(2).mean(), torch.randn(4, 3), None, micro_batches=2, weights=lambda t: 1
        )
    with pytest.raises(InvalidArgument, match=r"the loss \(batch\) has shape \(4, 1\), not a scalar"):
        assert_accumulation_equiv(mlp(), lambda o, y: o - y, torch.randn(4, 3), torch.randn(4, 1), micro_batches=2)


def test_split_sizes_follows_tensor_split() -> None:
    for b in range(1, 12):
        for k in range(1, b + 1):
            assert split_sizes(k, b) == [len(c) for c in torch.tensor_split(torch.arange(b), k)]


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(accumulation, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


# --------------------------------------------------------------------------- as a user runs it


def test_user_test_file_shows_the_weighting_that_matches(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user=textwrap.dedent(
            """
            import pytest
            import torch
            import torch.nn as nn
            import torch.nn.functional as F
            from pytest_gradcheck import assert_accumulation_equiv

            def lm_batch():
                torch.manual_seed(0)
                ids = torch.randint(1, 11, (4, 5))
                labels = torch.randint(0, 11, (4, 5))
                labels[1, 1:] = -100
                labels[3, 3:] = -100
                return ids, labels

            def loss_fn(logits, labels):
                return F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), ignore_index=-100)

            model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 11))

            @pytest.mark.gradequiv
            def test_mean_of_micro_batch_means():
                assert_accumulation_equiv(model, loss_fn, *lm_batch(), micro_batches=2)

            @pytest.mark.gradequiv
            def test_token_weighted():
                assert_accumulation_equiv(model, loss_fn, *lm_batch(), micro_batches=2,
                                          weights=lambda t: (t != -100).sum())
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*GradEquivError: the batch gradient weights the micro-batches by their number of non-ignored targets*",
            "*Gradients are NOT equivalent: the batch gradient is not the mean of micro-batch gradients*",
            "*2 micro-batches · float32 · cpu · reference: micro-batches run one by one*",
            "*would have matched: mean weighted by their number of non-ignored targets (targets != -100)*",
            "*Accumulation: to reproduce the full-batch gradient, scale micro-batch k's loss*",
        ]
    )
    result.stdout.no_fnmatch_line("*ran no gradient check*")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_are_checked_on_their_device() -> None:
    ids, targets = lm_batch()
    model = TinyLM().cuda()
    report = assert_accumulation_equiv(model, lm_loss, ids.cuda(), targets.cuda(), micro_batches=3, weights=tokens)
    assert report.device.startswith("cuda")
    with pytest.raises(GradEquivError, match="non-ignored targets"):
        assert_accumulation_equiv(model, lm_loss, ids.cuda(), targets.cuda(), micro_batches=3)


@pytest.mark.parametrize("float64", [False, True])
def test_micro_batch_units_are_the_micro_batches_for_every_pass(float64: bool) -> None:
    """The per-unit gradients a diagnosis reads are those of each micro-batch run alone."""
    from pytest_gradcheck._torch.loss import loss_step_builder
    from pytest_gradcheck.accumulation import MicroBatchProblem

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(10, 3), torch.randn(10, 1)
    build = loss_step_builder(F.mse_loss, has_targets=True, targets_is_tuple=False)
    problem = MicroBatchProblem(model, build, ((x,), (y,)), [4, 3, 3], watch_broadcast=False, allow_non_tensor=False)
    per_unit = problem.per_sample_gradients(float64)
    for k, (a, b) in enumerate([(0, 4), (4, 7), (7, 10)]):
        assert problem.sample(k)[0][0].shape == (b - a, 3)
        expected = torch.autograd.grad(F.mse_loss(model(x[a:b]), y[a:b]), list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), expected):
            np.testing.assert_allclose(per_unit[name][k], g.numpy(), rtol=1e-5, atol=1e-7)
