"""assert_batch_independent: no sample's output depends on another sample's input."""

from __future__ import annotations

import doctest
import random
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn

from pytest_gradcheck import (
    GradEquivError,
    InvalidArgument,
    UnsupportedModelError,
    assert_batch_independent,
    independence,
)
from pytest_gradcheck.independence import BatchIndependenceReport, BatchLeakError

PAD = 0


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- models


class TimePool(nn.Module):
    """(B, T, E) -> (B, E): a linear layer, then the mean over time."""

    def __init__(self, e: int = 5, buggy: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(e, e)
        self.buggy = buggy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, e = x.shape
        h = self.lin(x)
        # The bug: .view regroups memory; (T, B, E) was meant as a transpose.
        h = h.view(t, b, e) if self.buggy else h.permute(1, 0, 2)
        return h.mean(0)


class Attention(nn.Module):
    """Self-attention over (B, T, E) with a (B, T) key padding mask."""

    def __init__(self, e: int = 8, batch_first: bool = True, stale_mask: bool = False) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.stale_mask = stale_mask
        self.attn = nn.MultiheadAttention(e, 2, batch_first=batch_first)
        self.norm = nn.LayerNorm(e)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            # The bug: (B, T, E) fed to a (T, B, E) layer, the mask transposed until the shapes fit:
            # every position now attends across the samples of the batch.
            out = self.attn(x, x, x, key_padding_mask=pad.T, need_weights=False)[0]
        elif self.stale_mask:
            # The bug: the batch is sorted by length (as for packing) but the mask is not:
            # sample i is attended with the mask of whichever sample sorted into its place.
            order = (~pad).sum(1).argsort(descending=True, stable=True)
            xs = x[order]
            out = self.attn(xs, xs, xs, key_padding_mask=pad, need_weights=False)[0]  # pad[order] was meant
            out = out[order.argsort()]
        else:
            out = self.attn(x, x, x, key_padding_mask=pad, need_weights=False)[0]
        return self.norm(out + x)


class TokenModel(nn.Module):
    """Token ids (B, T) -> (B, 4)."""

    def __init__(self, vocab: int = 20, leak: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 6, padding_idx=PAD)
        self.head = nn.Linear(6, 4)
        self.leak = leak

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)  # (B, T, 6)
        if self.leak:
            h = h - h.mean(dim=0, keepdim=True)  # centred over the batch: a batch statistic
        keep = (ids != PAD).unsqueeze(-1).to(h.dtype)
        return self.head((h * keep).sum(1) / keep.sum(1).clamp(min=1))


def padded_batch(b: int = 6, t: int = 5, e: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([t, 2, 4, 1, t, 3][:b])
    pad = torch.arange(t)[None, :] >= lengths[:, None]
    x = torch.randn(b, t, e)
    return x, pad


def token_batch(b: int = 5, t: int = 6, vocab: int = 20) -> torch.Tensor:
    ids = torch.randint(1, vocab, (b, t))
    for i, n in enumerate([6, 3, 1, 4, 6][:b]):
        ids[i, n:] = PAD
    return ids


# --------------------------------------------------------------------------- correct models pass


def test_layernorm_gelu_model_passes() -> None:
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 3))
    report = assert_batch_independent(model, torch.randn(8, 4))
    assert isinstance(report, BatchIndependenceReport)
    assert report.passed and report.leaks == () and report.alone == ()
    assert report.checked == tuple(range(8)) and not report.subset
    assert ("inputs", "gradient") in report.methods and ("inputs", "perturbation") in report.methods
    assert report.dropout_disabled == ("model.3",)
    text = str(report)
    assert text.startswith("Samples are independent: no output depends on another sample's input (8 of 8")
    assert "dropout was switched off" in text


def test_permute_passes_and_view_across_the_batch_is_flagged_with_pairs() -> None:
    x = torch.randn(8, 4, 5)
    fixed = TimePool()
    assert assert_batch_independent(fixed, x).passed

    buggy = TimePool(buggy=True)
    buggy.load_state_dict(fixed.state_dict())
    with pytest.raises(BatchLeakError) as info:
        assert_batch_independent(buggy, x)
    err = info.value
    assert isinstance(err, GradEquivError) and isinstance(err, AssertionError)
    report = err.report
    assert not report.passed
    # h.view(T=4, B=8, E)[t, b] is row t*8 + b of the (B*T) rows, i.e. sample (t*8 + b) // 4:
    # output 0 reads samples 0, 2, 4, 6; output 1 reads samples 0, 2, 4, 6 and not itself.
    deps = {i: {j for (o, j) in report.pairs if o == i} for i in range(8)}
    assert deps[0] == {2, 4, 6}
    assert deps[1] == {0, 2, 4, 6}
    assert all(lk.evidence == "gradient" for lk in report.leaks if lk.output_sample in (0, 1))
    assert 1 in report.not_own and 0 not in report.not_own
    assert report.causes[0] == "view"
    text = str(err)
    first, verdict = text.splitlines()[:2]
    assert first.startswith("output of sample 0 depends on input of sample 2 (and ")
    assert first.endswith("more pairs): likely a view/reshape across the batch dimension")
    assert verdict.startswith("Samples are NOT independent: the output of 8 of 8 checked samples depends")
    assert err.report.cause == "view"
    assert "output of sample 0 depends on input of sample 2; also on samples 4, 6" in text
    assert "Cause: likely a view/reshape across the batch dimension" in text
    assert "do not depend on their own input" in text
    assert "What to do: reorder axes with .permute()/.transpose()" in text


def test_attention_with_a_key_padding_mask_passes() -> None:
    x, pad = padded_batch()
    model = Attention()
    report = assert_batch_independent(model, (x, pad))
    assert report.passed
    assert ("inputs[0]", "gradient") in report.methods
    assert ("inputs[1]", "perturbation") in report.methods  # the mask has no gradient
    model.eval()  # eval mode (the fused attention path) too
    assert assert_batch_independent(model, (x, pad)).passed


def test_attention_along_the_batch_axis_fails() -> None:
    x, pad = padded_batch()
    with pytest.raises(BatchLeakError) as info:
        assert_batch_independent(Attention(batch_first=False), (x, pad))
    report = info.value.report
    assert report.causes[0] == "pool"
    assert (0, 1) in report.pairs
    assert any(lk.evidence == "gradient" and lk.input == "inputs[0]" for lk in report.leaks)
    assert "attention along the batch axis" in str(info.value)


def test_mask_taken_from_another_sample_fails_without_any_gradient() -> None:
    x, pad = padded_batch()
    fixed = assert_batch_independent(Attention(), (x, pad))
    assert fixed.passed
    with pytest.raises(BatchLeakError) as info:
        assert_batch_independent(Attention(stale_mask=True), (x, pad))
    report = info.value.report
    # Only changing another sample's *mask* changes the output: no gradient shows it.
    assert report.leaks and all(lk.input == "inputs[1]" for lk in report.leaks)
    assert all(lk.evidence == "perturbation" for lk in report.leaks)
    assert report.causes[0] == "mask"
    text = str(info.value)
    assert "changing inputs[1][" in text
    assert "Cause: likely a mask, index or length built along the batch axis" in text


def test_token_ids_model_passes_and_a_batch_statistic_fails() -> None:
    ids = token_batch()
    report = assert_batch_independent(TokenModel(), ids)
    assert report.passed and report.methods == (("inputs", "perturbation"),)

    with pytest.raises(BatchLeakError) as info:
        assert_batch_independent(TokenModel(leak=True), ids)
    report = info.value.report
    assert set(report.pairs) == {(i, j) for i in range(5) for j in range(5) if i != j}
    assert all(lk.evidence == "perturbation" for lk in report.leaks)
    assert report.causes[0] == "pool"
    assert "output of sample 0 depends on input of sample 1; also on samples 2, 3, 4" in str(info.value)


def test_batch_size_dependence_is_found_by_the_batch_of_one_run() -> None:
    class PerBatch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) / x.shape[0]

    with pytest.raises(BatchLeakError) as info:
        assert_batch_independent(PerBatch(), torch.randn(4, 3))
    report = info.value.report
    assert report.leaks == ()
    assert [a.sample for a in report.alone] == [0, 1, 2, 3]
    assert all(a.survives_float64 for a in report.alone)
    assert report.causes == ("batch-size",)
    text = str(info.value)
    assert "give a different output alone (a batch of one) than in the batch" in text
    assert "sample 0: output differs" in text and "survives float64" in text


# --------------------------------------------------------------------------- options


def test_large_batches_check_a_seeded_subset_against_every_sample() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    x = torch.randn(40, 3)
    r1 = assert_batch_independent(model, x, max_samples=5, seed=3)
    r2 = assert_batch_independent(model, x, max_samples=5, seed=3)
    assert r1.subset and len(r1.checked) == 5 and r1.checked == r2.checked
    assert "drawn with seed=3" in str(r1) and "raise max_samples" in str(r1)

    class Shift(nn.Module):  # output i reads sample i + 1: every output leaks
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.roll(x, 1, dims=0) * 2.0

    with pytest.raises(BatchLeakError) as info:
        assert_batch_independent(Shift(), x, max_samples=3, seed=0)
    report = info.value.report
    assert len(report.checked) == 3
    assert set(report.pairs) == {(i, (i - 1) % 40) for i in report.checked}
    assert set(report.not_own) == set(report.checked)


def test_samples_selects_outputs() -> None:
    class FirstLeaks(nn.Module):  # only output 0 reads another sample
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = x * 1.0
            return torch.cat([y[:1] + y[2:3], y[1:]])

    x = torch.randn(4, 2)
    assert assert_batch_independent(FirstLeaks(), x, samples=[1, 2, 3]).checked == (1, 2, 3)
    with pytest.raises(BatchLeakError) as info:
        assert_batch_independent(FirstLeaks(), x, samples=[0, -1])
    assert info.value.report.checked == (0, 3)
    assert info.value.report.pairs == ((0, 2),)


def test_dict_and_tuple_outputs_are_compared_leaf_by_leaf() -> None:
    class Two(nn.Module):
        def __init__(self, leak: bool) -> None:
            super().__init__()
            self.lin, self.leak = nn.Linear(3, 3), leak

        def forward(self, x: torch.Tensor) -> dict:
            h = self.lin(x)
            aux = h.sum(0, keepdim=True).expand_as(h) if self.leak else h * 2
            return {"main": h, "aux": (aux, "meta"), "scalar": h.sum()}

    x = torch.randn(3, 3)
    report = assert_batch_independent(Two(False), x)
    assert any("output tensors without the batch on dim 0" in n for n in report.notes)
    with pytest.raises(BatchLeakError):
        assert_batch_independent(Two(True), x)


# --------------------------------------------------------------------------- state and bad input


def test_state_is_left_as_found_pass_or_fail() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.Linear(4, 2))
    model.train()
    model[2].eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    grads = [p.grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3)
    rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()

    assert assert_batch_independent(model, x).passed

    assert torch.equal(torch.get_rng_state(), rng) and random.getstate() == py_rng
    assert np.array_equal(np.random.get_state()[1], np_rng[1])
    assert model.training and model[1].training and not model[2].training
    assert all(p.grad is g and torch.equal(g, torch.full_like(g, 0.5)) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert x.grad is None and not x.requires_grad

    leaky, x = TimePool(buggy=True).train(), torch.randn(4, 2, 5)
    rng = torch.get_rng_state()
    with pytest.raises(BatchLeakError):
        assert_batch_independent(leaky, x)
    assert leaky.training and all(p.grad is None for p in leaky.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


def test_batchnorm_in_train_mode_is_explained() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedModelError, match=r"model\.1 \(BatchNorm1d\) is in train mode"):
        assert_batch_independent(model, torch.randn(4, 3))
    assert model.training
    assert assert_batch_independent(model.eval(), torch.randn(4, 3)).passed


@pytest.mark.parametrize(
    ("inputs", "kwargs", "message"),
    [
        (torch.randn(1, 3), {}, "batch size 1"),
        (torch.randn(0, 3), {}, "empty batch"),
        ((torch.randn(4, 3), torch.randn(5, 3)), {}, r"batch sizes disagree: inputs\[0\] \(shape \(4, 3\)\) has 4"),
        ((torch.randn(4, 3), 3), {}, r"inputs\[1\] is a int, not a tensor"),
        ((), {}, "inputs is empty"),
        (torch.tensor(1.0), {}, "0-d tensor"),
        (torch.randn(4, 3), {"max_samples": 0}, "max_samples=0"),
        (torch.randn(4, 3), {"samples": [4]}, "outside the batch of 4 samples"),
        (torch.randn(4, 3), {"samples": []}, "samples is empty"),
        (torch.randn(4, 3), {"rtol": -1}, "Invalid rtol=-1"),
    ],
)
def test_bad_input_gets_a_clear_error(inputs: object, kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        assert_batch_independent(nn.Linear(3, 2), inputs, **kwargs)  # type: ignore[arg-type]


def test_models_that_cannot_be_checked_get_a_clear_error() -> None:
    class Pooled(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum()

    with pytest.raises(InvalidArgument, match=r"no tensor with the batch \(4 samples\) on dim 0"):
        assert_batch_independent(Pooled(), torch.randn(4, 3))

    class Nan(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.log()

    with pytest.raises(InvalidArgument, match="NaN or inf for sample"):
        assert_batch_independent(Nan(), -torch.ones(3, 2))

    class Noisy(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x + torch.randn_like(x)  # noise (dropout would be switched off at the op)

    with pytest.raises(UnsupportedModelError, match="different output when run twice"):
        assert_batch_independent(Noisy(), torch.randn(4, 3))
    with pytest.raises(InvalidArgument, match="model must be a torch.nn.Module"):
        assert_batch_independent(lambda x: x, torch.randn(3, 2))  # type: ignore[arg-type]


def test_docstring_examples() -> None:
    failures, tried = doctest.testmod(independence, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


# --------------------------------------------------------------------------- as a user runs it


def test_user_test_file_reports_the_leaking_pairs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_user=textwrap.dedent(
            """
            import pytest
            import torch
            import torch.nn as nn
            from pytest_gradcheck import assert_batch_independent

            class Encoder(nn.Module):
                def __init__(self):
                    super().__init__()
                    self.lin = nn.Linear(5, 5)

                def forward(self, x):
                    b, t, e = x.shape
                    return self.lin(x).view(t, b, e).mean(0)  # meant .permute(1, 0, 2)

            @pytest.mark.gradequiv
            def test_encoder_is_batch_independent():
                torch.manual_seed(0)
                assert_batch_independent(Encoder(), torch.randn(6, 3, 5))

            @pytest.mark.gradequiv
            def test_mlp_is_batch_independent():
                assert_batch_independent(nn.Sequential(nn.Linear(3, 4), nn.GELU()), torch.randn(6, 3))
            """
        )
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*BatchLeakError: output of sample 0 depends on input of sample 2 (and * more pairs): likely a view*",
            "*Samples are NOT independent: the output of 6 of 6 checked samples*",
            "*output of sample 0 depends on input of sample 2*",
            "*Cause: likely a view/reshape across the batch dimension*",
            "*What to do: reorder axes with .permute()/.transpose()*",
        ]
    )
    result.stdout.no_fnmatch_line("*ran no gradient check*")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_are_checked_on_their_device() -> None:
    x, pad = padded_batch()
    assert assert_batch_independent(Attention().cuda(), (x.cuda(), pad.cuda())).device.startswith("cuda")
    with pytest.raises(BatchLeakError):
        assert_batch_independent(TimePool(buggy=True).cuda(), torch.randn(4, 3, 5, device="cuda"))
