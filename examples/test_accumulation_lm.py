"""Gradient accumulation for a token-level language-model loss, and why "divide by k" is wrong.

Run with ``pytest examples/test_accumulation_lm.py``. A language-model loss is the
mean over the batch's *non-padding tokens* (``ignore_index=-100``). Split the
batch into k micro-batches and the usual accumulation loop,

    for micro in micro_batches:
        (loss_fn(model(micro.ids), micro.labels) / k).backward()

averages the micro-batch means: a micro-batch with few tokens counts as much as
one with many, and the accumulated gradient is not the full-batch gradient.
:func:`pytest_gradcheck.assert_accumulation_equiv` runs the full batch and each
micro-batch alone and says which weighting matches: here each micro-batch's
number of non-ignored tokens. Scaling micro-batch k's loss by
``tokens_k / tokens_total`` instead of ``1 / k`` fixes the loop.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pytest_gradcheck import GradEquivError, assert_accumulation_equiv, assert_batch_independent
from pytest_gradcheck.accumulation import assert_accumulation_equiv_step

VOCAB, PAD, IGNORE = 32, 0, -100


class TinyLM(nn.Module):
    """Embedding, a causal 1-D convolution (each position sees itself and the one before), a head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.mix = nn.Conv1d(dim, dim, kernel_size=2, padding=1)
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)  # (B, dim, T)
        h = torch.tanh(self.mix(h)[..., : ids.shape[1]]).transpose(1, 2)  # causal: drop the look-ahead
        return self.head(h)  # (B, T, VOCAB)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=IGNORE)


def padded_batch(lengths: list[int], t: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (len(lengths), t), generator=g)
    labels = torch.roll(ids, -1, dims=1)  # next-token targets
    for i, n in enumerate(lengths):
        ids[i, n:] = PAD
        labels[i, n - 1 :] = IGNORE  # nothing to predict after the last token
    return ids, labels


LENGTHS = [12, 3, 9, 2, 12, 5, 7, 4]  # 4 micro-batches of 2: 13, 9, 15 and 9 counted tokens


def n_tokens(labels: torch.Tensor) -> torch.Tensor:
    return (labels != IGNORE).sum()


@pytest.mark.xfail(strict=True, raises=GradEquivError, reason="a plain mean of micro-batch means")
def test_dividing_by_k_is_not_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    ids, labels = padded_batch(LENGTHS)
    # weights=lambda t: 1: each micro-batch counts once, as with (loss / k).backward().
    # The failure reads: "the batch gradient matches when ... weighted by their number of
    # non-ignored targets (targets != -100): [...]".
    assert_accumulation_equiv(TinyLM(), lm_loss, ids, labels, micro_batches=4, weights=lambda t: 1)


@pytest.mark.gradequiv
def test_token_weighted_accumulation_matches() -> None:
    torch.manual_seed(0)
    ids, labels = padded_batch(LENGTHS)
    report = assert_accumulation_equiv(TinyLM(), lm_loss, ids, labels, micro_batches=4, weights=n_tokens)
    assert report.weights == (13.0, 9.0, 15.0, 9.0)


@pytest.mark.gradequiv
def test_hugging_face_style_step_with_an_uneven_last_micro_batch() -> None:
    torch.manual_seed(0)
    ids, labels = padded_batch(LENGTHS[:7])  # 7 sequences: micro-batches of 3, 3 and 1

    def training_step(model: nn.Module, batch: dict) -> dict:
        return {"loss": lm_loss(model(batch["input_ids"]), batch["labels"])}

    assert_accumulation_equiv_step(
        training_step,
        TinyLM(),
        {"input_ids": ids, "labels": labels},
        micro_batches=[3, 3, 1],
        weights=lambda micro: n_tokens(micro["labels"]),
    )


def accumulate(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor, k: int) -> None:
    """The fixed loop: scale each micro-batch's loss by its share of the batch's tokens."""
    total = n_tokens(labels)
    for micro_ids, micro_labels in zip(torch.tensor_split(ids, k), torch.tensor_split(labels, k)):
        loss = lm_loss(model(micro_ids), micro_labels)
        (loss * n_tokens(micro_labels) / total).backward()


def test_the_fixed_loop_gives_the_full_batch_gradient() -> None:
    torch.manual_seed(0)
    ids, labels = padded_batch(LENGTHS)
    model = TinyLM()
    lm_loss(model(ids), labels).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    accumulate(model, ids, labels, k=4)
    for p, g in zip(model.parameters(), full):
        torch.testing.assert_close(p.grad, g)


@pytest.mark.gradequiv
def test_the_model_keeps_samples_apart() -> None:
    # Accumulation can only be exact if no sample's output depends on another sample:
    # the token ids get no gradient, so the check perturbs the other sequences instead.
    torch.manual_seed(0)
    ids, _ = padded_batch(LENGTHS)
    assert_batch_independent(TinyLM(), ids)
