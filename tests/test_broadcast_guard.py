"""Tests of the implicit-broadcast guard (pytest_gradcheck.broadcast)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.overrides import _get_current_function_mode_stack

from pytest_gradcheck.broadcast import (
    BroadcastRecord,
    allow_broadcast,
    broadcast_shape,
    is_implicit_broadcast,
    make_record,
    no_implicit_broadcast,
    recording,
    report_broadcast,
    suggest_fix,
    user_frame,
)
from pytest_gradcheck.errors import BroadcastError, BroadcastWarning, InvalidArgument

THIS_FILE = os.path.abspath(__file__)
BASENAME = os.path.basename(__file__)
ROOT = os.path.dirname(os.path.dirname(THIS_FILE))


def _line_of(marker: str) -> int:
    """Line number of the (only) line of this file that ends with ``marker``."""
    with open(THIS_FILE, encoding="utf-8") as f:
        hits = [i for i, line in enumerate(f, 1) if line.rstrip().endswith(marker)]
    if len(hits) != 1:
        raise LookupError(f"marker {marker!r} found {len(hits)} times")
    return hits[0]


@pytest.fixture(autouse=True)
def _no_mode_left_behind() -> Any:
    yield
    assert _get_current_function_mode_stack() == []


# --------------------------------------------------------------------------- the seeds


def test_seed000_xor_labels_error_names_op_shapes_file_and_line() -> None:
    out = torch.rand(4, 1, requires_grad=True)
    labels = torch.tensor([0.0, 1.0, 1.0, 0.0])
    with pytest.raises(BroadcastError) as info:
        with no_implicit_broadcast("error"):
            loss = (out - labels).pow(2).mean()  # <- seed000
            del loss
    msg = str(info.value)
    line = _line_of("# <- seed000")
    for part in ("sub", "(4, 1)", "(4,)", "(4, 4)", f"{BASENAME}:{line}"):
        assert part in msg
    # the path is relative to pytest's rootdir (the repository), not a bare file name
    assert msg.startswith(f"tests/{BASENAME}:{line}: sub((4, 1), (4,)) -> (4, 4): both operands were expanded")
    assert "labels" in msg  # the suggestion names the variable
    (record,) = info.value.records
    assert record.op == "sub"
    assert record.shapes == ((4, 1), (4,))
    assert record.result == (4, 4)
    assert record.filename == THIS_FILE
    assert record.lineno == line
    assert record.code == "loss = (out - labels).pow(2).mean()  # <- seed000"
    assert record.suggestion == "did you mean labels.unsqueeze(-1)?"


def test_seed002_mse_loss_with_extra_noise_dim_is_one_record() -> None:
    B = 8
    y_hat = torch.randn(B, 1, requires_grad=True)
    y = torch.randn(B, 1, 1)  # noise built as (n, 1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's own target-size warning is silenced
        with no_implicit_broadcast("record") as records:
            loss = F.mse_loss(y_hat, y)  # <- seed002
    loss.backward()
    assert len(records) == 1  # the inner ops of mse_loss are not seen again
    (r,) = records
    assert r.op == "mse_loss"
    assert r.shapes == ((B, 1), (B, 1, 1))
    assert r.result == (B, B, 1)
    assert r.lineno == _line_of("# <- seed002")
    assert r.suggestion == "did you mean y.squeeze(-1)?"
    assert "mse_loss((8, 1), (8, 1, 1)) -> (8, 8, 1)" in r.message()

    with pytest.raises(BroadcastError, match=r"mse_loss\(\(8, 1\), \(8, 1, 1\)\) -> \(8, 8, 1\)"):
        with no_implicit_broadcast():
            F.mse_loss(y_hat, y)


# --------------------------------------------------------------------------- flagged forms

N = 4
A = torch.randn(N, 1)
Bv = torch.randn(N)


def _flagged(fn: Callable[[], Any]) -> BroadcastRecord:
    with no_implicit_broadcast("record") as records:
        try:
            fn()
        except RuntimeError:
            pass  # e.g. an in-place op torch itself refuses after we recorded it
    assert len(records) == 1, records
    return records[0]


@pytest.mark.parametrize(
    ("name", "fn", "op", "shapes", "result"),
    [
        ("same-rank", lambda: torch.ones(N, 1) - torch.ones(1, N), "sub", ((N, 1), (1, N)), (N, N)),
        ("promote-right", lambda: A - Bv, "sub", ((N, 1), (N,)), (N, N)),
        ("promote-left", lambda: Bv - A, "sub", ((N,), (N, 1)), (N, N)),
        ("method", lambda: A.sub(Bv), "sub", ((N, 1), (N,)), (N, N)),
        ("torch.sub", lambda: torch.sub(A, Bv), "sub", ((N, 1), (N,)), (N, N)),
        ("torch.subtract", lambda: torch.subtract(A, Bv), "subtract", ((N, 1), (N,)), (N, N)),
        ("rsub-dunder", lambda: Bv.__rsub__(A), "sub", ((N, 1), (N,)), (N, N)),
        ("add", lambda: A + Bv, "add", ((N, 1), (N,)), (N, N)),
        ("mul", lambda: A * Bv, "mul", ((N, 1), (N,)), (N, N)),
        ("div", lambda: A / Bv, "div", ((N, 1), (N,)), (N, N)),
        ("pow", lambda: A.abs() ** Bv, "pow", ((N, 1), (N,)), (N, N)),
        ("atan2", lambda: torch.atan2(A, Bv), "atan2", ((N, 1), (N,)), (N, N)),
        ("maximum", lambda: torch.maximum(A, Bv), "maximum", ((N, 1), (N,)), (N, N)),
        ("fmod", lambda: torch.fmod(A, Bv), "fmod", ((N, 1), (N,)), (N, N)),
        ("eq", lambda: A == Bv, "eq", ((N, 1), (N,)), (N, N)),
        ("lt", lambda: A < Bv, "lt", ((N, 1), (N,)), (N, N)),
        ("logical_and", lambda: torch.logical_and(A > 0, Bv > 0), "logical_and", ((N, 1), (N,)), (N, N)),
        ("bitwise &", lambda: (A > 0) & (Bv > 0), "bitwise_and", ((N, 1), (N,)), (N, N)),
        ("lerp", lambda: torch.lerp(A, Bv, 0.5), "lerp", ((N, 1), (N,)), (N, N)),
        ("addcmul", lambda: torch.addcmul(A, A, Bv), "addcmul", ((N, 1), (N, 1), (N,)), (N, N)),
        ("where", lambda: torch.where(A > 0, A, Bv), "where", ((N, 1), (N, 1), (N,)), (N, N)),
        ("where-mask-scalar", lambda: torch.where(A > 0, Bv, 0.0), "where", ((N, 1), (N,)), (N, N)),
        ("l1_loss", lambda: F.l1_loss(A, Bv), "l1_loss", ((N, 1), (N,)), (N, N)),
        ("mse_loss-kw", lambda: F.mse_loss(input=A, target=Bv), "mse_loss", ((N, 1), (N,)), (N, N)),
        ("smooth_l1", lambda: F.smooth_l1_loss(A, Bv), "smooth_l1_loss", ((N, 1), (N,)), (N, N)),
        ("huber", lambda: F.huber_loss(A, Bv), "huber_loss", ((N, 1), (N,)), (N, N)),
        ("kl_div", lambda: F.kl_div(A, Bv, reduction="sum"), "kl_div", ((N, 1), (N,)), (N, N)),
        ("nn.MSELoss", lambda: nn.MSELoss()(A, Bv), "mse_loss", ((N, 1), (N,)), (N, N)),
        (
            "margin_ranking",
            lambda: F.margin_ranking_loss(A, Bv.view(1, N), torch.ones(N, 1)),
            "margin_ranking_loss",
            ((N, 1), (1, N), (N, 1)),
            (N, N),
        ),
        ("sub_", lambda: A.clone().sub_(Bv), "sub_", ((N, 1), (N,)), (N, N)),
    ],
)
def test_flagged_forms(name: str, fn: Callable[[], Any], op: str, shapes: tuple, result: tuple) -> None:
    r = _flagged(fn)
    assert (r.op, r.shapes, r.result) == (op, shapes, result)
    assert r.filename == THIS_FILE


def test_inplace_forms_raise_broadcast_error_before_torch_refuses() -> None:
    a = torch.randn(N, 1)
    with pytest.raises(BroadcastError, match=r"sub_\(\(4, 1\), \(4,\)\) -> \(4, 4\)"):
        with no_implicit_broadcast():
            a.sub_(Bv)
    with pytest.raises(BroadcastError, match=r"sub_\(\(4, 1\), \(4,\)\)") as info:
        with no_implicit_broadcast():
            a -= Bv  # <- isub
    assert info.value.records[0].lineno == _line_of("# <- isub")
    assert torch.equal(a, a)  # left as found: the op never ran


def test_bce_with_mismatched_target_reports_broadcast_first() -> None:
    p = torch.rand(N, 1)
    with pytest.raises(BroadcastError, match="binary_cross_entropy"):
        with no_implicit_broadcast():
            F.binary_cross_entropy(p, torch.rand(N))


def test_vector_gaussian_nll_var_is_compared_like_torch_does() -> None:
    x, y = torch.randn(N, 3), torch.randn(N, 3)
    with no_implicit_broadcast():
        F.gaussian_nll_loss(x, y, torch.ones(N))  # homoscedastic: torch unsqueezes var
        F.gaussian_nll_loss(x, y, torch.ones(N, 1))
        F.gaussian_nll_loss(x, y, torch.ones(N, 3))
    r = _flagged(lambda: F.gaussian_nll_loss(torch.randn(N, 1), torch.randn(N), torch.ones(N, 1)))
    assert (r.op, r.shapes, r.result) == ("gaussian_nll_loss", ((N, 1), (N,), (N, 1)), (N, N))


# --------------------------------------------------------------------------- modes


def test_warn_mode_points_at_the_users_line() -> None:
    out, labels = torch.randn(3, 1), torch.randn(3)
    with pytest.warns(BroadcastWarning, match=r"sub\(\(3, 1\), \(3,\)\) -> \(3, 3\)") as rec:
        with no_implicit_broadcast("warn") as records:
            diff = out - labels  # <- warn
    assert diff.shape == (3, 3)  # the op ran
    (w,) = [w for w in rec if issubclass(w.category, BroadcastWarning)]
    assert w.filename == THIS_FILE
    assert w.lineno == _line_of("# <- warn")
    assert BASENAME in str(w.message)
    assert len(records) == 1


def test_record_mode_returns_records_and_does_not_raise() -> None:
    guard = no_implicit_broadcast("record")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with guard as records:
            a = torch.ones(2, 1) * torch.ones(2)
            b = torch.ones(3, 1) + torch.ones(1, 3)
    assert a.shape == (2, 2) and b.shape == (3, 3)
    assert records is guard.records
    assert [(r.op, r.result) for r in records] == [("mul", (2, 2)), ("add", (3, 3))]


def test_off_mode_installs_nothing() -> None:
    with no_implicit_broadcast("off") as records:
        assert _get_current_function_mode_stack() == []
        _ = A - Bv
    assert records == []


def test_decorator_form() -> None:
    @no_implicit_broadcast()
    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out - y).pow(2).mean()

    assert loss_fn(torch.ones(3, 1), torch.ones(3, 1)).item() == 0.0
    with pytest.raises(BroadcastError, match="sub"):
        loss_fn(torch.ones(3, 1), torch.ones(3))
    assert _get_current_function_mode_stack() == []

    recorder = no_implicit_broadcast("record")

    @recorder
    def recurse(k: int) -> torch.Tensor:
        value = A * Bv
        return recurse(k - 1) if k else value

    recurse(2)
    assert len(recorder.records) == 3  # one per call, shared list


@pytest.mark.parametrize("bad", ["raise", "ERROR", "", None, 1])
def test_bad_mode_is_invalid_argument(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match=repr(bad)):
        no_implicit_broadcast(bad)
    with pytest.raises(ValueError):
        no_implicit_broadcast(bad)


# --------------------------------------------------------------------------- allow_broadcast


def test_allow_broadcast_suppresses_enclosing_guards() -> None:
    a, b = torch.randn(5, 1), torch.randn(1, 5)
    with no_implicit_broadcast("error") as records:
        with allow_broadcast():
            sim = a - b  # intended pairwise
            labels = torch.arange(5)
            same = labels[:, None] == labels[None, :]
        assert sim.shape == (5, 5) and same.shape == (5, 5)
        with pytest.raises(BroadcastError):
            a - b  # the guard is back after the block
    assert len(records) == 1


def test_guard_inside_allow_broadcast_is_active() -> None:
    with no_implicit_broadcast("record") as outer:
        with allow_broadcast():
            with no_implicit_broadcast("record") as inner:
                _ = A - Bv
    assert len(inner) == 1
    assert outer == []


def test_recording_honours_allow_broadcast() -> None:
    with recording() as records:
        with allow_broadcast():
            _ = A - Bv
        _ = A * Bv
    assert [r.op for r in records] == ["mul"]


# --------------------------------------------------------------------------- no false positives


def test_class_index_cross_entropy_is_never_flagged() -> None:
    B, C = 8, 5
    logits = torch.randn(B, C, requires_grad=True)
    targets = torch.randint(0, C, (B,))
    weight = torch.rand(C)
    with no_implicit_broadcast("error") as records:
        losses = [
            F.cross_entropy(logits, targets),
            F.cross_entropy(logits, targets, weight=weight),
            F.cross_entropy(logits, targets, label_smoothing=0.1),
            F.cross_entropy(logits, targets, weight=weight, label_smoothing=0.1, reduction="sum"),
            F.nll_loss(F.log_softmax(logits, dim=1), targets),
            nn.CrossEntropyLoss(weight=weight, ignore_index=0)(logits, targets),
            F.cross_entropy(logits.view(2, 4, C).transpose(1, 2), targets.view(2, 4)),  # (N, C, T)
            F.multi_margin_loss(logits, targets),
            F.binary_cross_entropy_with_logits(logits, torch.rand(B, C), pos_weight=torch.rand(C)),
        ]
        sum(losses).backward()
    assert records == []


def test_intentional_broadcasts_are_not_flagged() -> None:
    B, T, D, C = 4, 6, 8, 3
    x = torch.randn(B, T, D)
    with no_implicit_broadcast("error") as records:
        _ = x * 2.0
        _ = 1 - x
        _ = x + torch.tensor(3.0)  # 0-d
        _ = x - x.mean()
        _ = torch.randn(B, C) + torch.randn(C)  # bias
        _ = torch.randn(B, C) * torch.rand(1, C)
        _ = x * (torch.rand(B, T, 1) > 0.5)  # mask over features
        _ = torch.where(torch.rand(B, T, 1) > 0.5, x, 0.0)
        _ = torch.where(torch.rand(B, T, 1) > 0.5, x, torch.zeros(()))
        _ = x / x.norm(dim=-1, keepdim=True)
        _ = torch.ones(1) - torch.ones(1, 1)  # size-1 everywhere
        _ = torch.ones(1, 1) - torch.ones(1)  # batch of one: (1, 1) - (1,)
        _ = torch.ones(5) - torch.ones(1, 5)  # rank promotion only
        _ = torch.ones(0, 1) - torch.ones(0)  # empty
        _ = F.mse_loss(torch.randn(B, 1), torch.randn(B, 1))
        _ = F.l1_loss(torch.randn(B), torch.randn(B))
        _ = torch.clamp(x, min=torch.zeros(D))
    assert records == []


class _TinyAttention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(0.1)
        self.scale = nn.Parameter(torch.ones(d))  # (D,) over (B, T, D)
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor, pad: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        H = self.heads
        q, k, v = self.qkv(self.norm(x)).view(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5  # (B, H, T, T)
        causal = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
        scores = scores + causal  # (T, T) over (B, H, T, T)
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))  # (B, 1, 1, T)
        scores = scores + bias[:, None]  # (B, 1, T) -> (B, 1, 1, T) attention bias
        attn = self.drop(scores.softmax(-1))
        y = (attn @ v).transpose(1, 2).reshape(B, T, D)
        y = x + self.proj(y) * self.scale
        single = y @ y.transpose(1, 2) + bias  # (B, T, T) + (B, 1, T)
        y = y + single.softmax(-1) @ y
        gate = torch.sigmoid(y.mean(-1, keepdim=True))  # (B, T, 1) over (B, T, D)
        y = torch.where(pad[..., None], 0.0, y * gate)
        return self.head(y).squeeze(-1)  # (B, T)


def test_small_model_full_of_intentional_broadcasts_raises_nothing() -> None:
    torch.manual_seed(0)
    B, T, D = 3, 5, 8
    model = _TinyAttention(D)
    x = torch.randn(B, T, D)
    pad = torch.zeros(B, T, dtype=torch.bool)
    pad[0, -1] = True
    bias = torch.randn(B, 1, T)
    target = torch.randn(B, T)
    with no_implicit_broadcast("error") as records:
        out = model(x, pad, bias)
        mask = (~pad).float()
        loss = ((out - target) ** 2 * mask).sum() / mask.sum() + F.mse_loss(out, target)
        loss.backward()
    assert records == []
    assert all(p.grad is not None for p in model.parameters())


# --------------------------------------------------------------------------- nesting, errors, threads


def test_nested_guards_each_act_per_own_mode() -> None:
    with no_implicit_broadcast("record") as outer:
        with no_implicit_broadcast("record") as inner:
            _ = A - Bv
    assert len(inner) == 1 and len(outer) == 1

    with pytest.raises(BroadcastError):
        with no_implicit_broadcast("error"):
            with no_implicit_broadcast("record") as inner:
                _ = A - Bv
    assert len(inner) == 1

    with no_implicit_broadcast("record") as outer:
        with pytest.raises(BroadcastError):
            with no_implicit_broadcast("error") as inner:
                _ = A - Bv
    assert len(inner) == 1 and len(outer) == 1  # outer still records the refused op
    assert outer[0] is inner[0]

    with recording() as engine_records:
        with pytest.warns(BroadcastWarning):
            with no_implicit_broadcast("warn"):
                _ = A - Bv
    assert len(engine_records) == 1


def test_exception_inside_leaves_no_mode_active() -> None:
    with pytest.raises(BroadcastError):
        with no_implicit_broadcast("record"):
            with no_implicit_broadcast("error"):
                _ = A - Bv
    assert _get_current_function_mode_stack() == []
    with pytest.raises(ZeroDivisionError):
        with recording():
            _ = 1 / 0
    assert _get_current_function_mode_stack() == []
    # nothing left behind: a plain broadcast outside any guard just runs
    assert (A - Bv).shape == (N, N)


def test_guards_are_per_thread() -> None:
    started, release = threading.Event(), threading.Event()
    results: dict[str, Any] = {}

    def worker() -> None:
        with no_implicit_broadcast("record") as records:
            started.set()
            release.wait(5)
            _ = A - Bv
        results["worker"] = records
        results["stack"] = _get_current_function_mode_stack()

    with no_implicit_broadcast("error") as main_records:
        t = threading.Thread(target=worker)
        t.start()
        started.wait(5)
        # the worker's guard does not see the main thread's ops and vice versa
        results["other"] = threading.Thread(target=lambda: results.setdefault("plain", (A - Bv).shape))
        results["other"].start()
        results["other"].join(5)
        release.set()
        t.join(5)
    assert results["plain"] == (N, N)  # an unguarded thread is not flagged
    assert len(results["worker"]) == 1
    assert results["stack"] == []
    assert main_records == []


def test_under_vmap_shapes_are_per_sample() -> None:
    x, y = torch.randn(5, 3, 1), torch.randn(5, 3)
    with no_implicit_broadcast("record") as records:
        out = torch.func.vmap(lambda a, b: (a - b).pow(2).mean())(x, y)
    assert out.shape == (5,)
    assert len(records) == 1
    assert (records[0].shapes, records[0].result) == (((3, 1), (3,)), (3, 3))

    # seed 000 per sample is (1,) vs (): nothing broadcasts, and BatchedTensors do not crash the guard
    w = torch.randn(1, 2)

    def per_sample(xi: torch.Tensor, yi: torch.Tensor) -> torch.Tensor:
        return ((xi @ w.T) - yi).pow(2).mean()

    with no_implicit_broadcast("error") as records:
        losses = torch.func.vmap(per_sample)(torch.randn(4, 2), torch.randn(4))
    assert losses.shape == (4,)
    assert records == []


# --------------------------------------------------------------------------- recording()


def test_recording_records_and_never_raises_or_warns() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with recording() as records:
            loss = F.mse_loss(torch.randn(4, 1), torch.randn(4, 1, 1)) + (A - Bv).sum()
    assert loss.ndim == 0
    assert [r.op for r in records] == ["mse_loss", "sub"]


def test_recording_disabled_installs_nothing() -> None:
    with recording(enabled=False) as records:
        assert _get_current_function_mode_stack() == []
        _ = A - Bv
    assert records == []


# --------------------------------------------------------------------------- pure-python helpers


@pytest.mark.parametrize(
    ("shapes", "result", "flagged"),
    [
        ([(4, 1), (4,)], (4, 4), True),
        ([(4,), (4, 1)], (4, 4), True),
        ([(4, 1), (1, 4)], (4, 4), True),
        ([(8, 1), (8, 1, 1)], (8, 8, 1), True),
        ([(4, 1), (4, 1), (4,)], (4, 4), True),
        ([(4, 1), (1, 3), ()], (4, 3), True),
        ([(4, 3), (3,)], (4, 3), False),
        ([(2, 5, 1), (2, 5, 7)], (2, 5, 7), False),
        ([(6, 6), (2, 3, 6, 6)], (2, 3, 6, 6), False),
        ([(4, 1), ()], (4, 1), False),
        ([(1,), (1, 1)], (1, 1), False),
        ([(1, 1), (1,)], (1, 1), False),
        ([(5,), (1, 5)], (1, 5), False),
        ([(0, 1), (0,)], (0, 0), False),
        ([(4, 1)], (4, 1), False),
        ([], (), False),
    ],
)
def test_is_implicit_broadcast_table(shapes: list, result: tuple, flagged: bool) -> None:
    assert broadcast_shape(shapes) == result
    assert is_implicit_broadcast(shapes, result) is flagged


def test_broadcast_shape_rejects_incompatible() -> None:
    assert broadcast_shape([(3,), (4,)]) is None
    assert broadcast_shape([(2, 3), (3, 2)]) is None
    assert broadcast_shape([(0,), (1,)]) == (0,)


_shapes = st.lists(st.lists(st.integers(1, 4), max_size=3).map(tuple), min_size=1, max_size=3)


@settings(max_examples=60, deadline=None)
@given(_shapes)
def test_rule_agrees_with_torch_broadcasting(shapes: list[tuple[int, ...]]) -> None:
    try:
        expected: tuple[int, ...] | None = tuple(torch.broadcast_shapes(*shapes))
    except RuntimeError:
        expected = None
    result = broadcast_shape(shapes)
    assert result == expected
    if result is not None:
        has_full = any((1,) * (len(result) - len(s)) + s == result for s in shapes)
        big = [s for s in shapes if torch.Size(s).numel() != 1]
        assert is_implicit_broadcast(shapes, result) == (len(big) >= 2 and not has_full)


def test_suggest_fix() -> None:
    assert suggest_fix([(4, 1), (4,)], (4, 4), "loss = (out - labels).pow(2).mean()", op="sub") == (
        "did you mean labels.unsqueeze(-1)?"
    )
    assert suggest_fix([(4, 1), (4,)], (4, 4), "loss = (out - labels).pow(2).mean()") == (
        "did you mean labels.unsqueeze(-1)?"
    )
    assert suggest_fix([(4, 1), (4, 1, 1)], (4, 4, 1), "return F.mse_loss(preds, y)", op="mse_loss") == (
        "did you mean y.squeeze(-1)?"
    )
    assert suggest_fix([(4, 1), (4, 1, 1)], (4, 4, 1), "loss = self.criterion(y_hat, y)", op="mse_loss") == (
        "did you mean y.squeeze(-1)?"
    )
    assert suggest_fix([(4, 1), (1, 4)], (4, 4), "d = a.sub(b)", op="sub") == "did you mean b.view_as(a)?"
    assert suggest_fix([(4, 1), (4,)], (4, 4)) == (
        "reshape the (4,) operand to (4, 1), e.g. .unsqueeze(-1) or .view_as(other)"
    )
    assert suggest_fix([(4, 1), (1, 4)], (4, 4)) == (
        "reshape the (1, 4) operand to (4, 1), e.g. .view(4, 1) or .view_as(other)"
    )
    # ambiguous or unparsable lines fall back to the generic hint
    assert suggest_fix([(4, 1), (4,)], (4, 4), "z = (a - b) + (c - d)", op="sub").startswith("reshape")
    assert suggest_fix([(4, 1), (4,)], (4, 4), "if (a - b", op="sub").startswith("reshape")
    assert "allow_broadcast()" in (suggest_fix([(4, 1), (3,)], (4, 3)) or "")
    assert "allow_broadcast()" in (suggest_fix([(4, 1), (4, 1), (4,)], (4, 4)) or "")
    assert suggest_fix([(4, 3), (3,)], (4, 3)) is None


def test_multiline_call_uses_the_exact_expression() -> None:
    preds, y = torch.randn(4, 1), torch.randn(4, 1, 1)
    with no_implicit_broadcast("record") as records:
        loss = F.mse_loss(  # <- multiline
            preds,
            y,
        ) + F.l1_loss(preds, preds)
    (r,) = records
    assert r.lineno == _line_of("# <- multiline")
    assert r.suggestion == "did you mean y.squeeze(-1)?"
    assert loss.ndim == 0


def test_record_formatting_and_make_record() -> None:
    r = BroadcastRecord(
        "sub", ((4, 1), (4,)), (4, 4), "/somewhere/test_xor.py", 21, "x", "did you mean labels.view(4, 1)?"
    )
    assert r.location() == "/somewhere/test_xor.py:21"  # outside the rootdir: the full path, never a bare name
    assert r.describe() == "sub((4, 1), (4,)) -> (4, 4): both operands were expanded"
    assert r.message() == (
        "/somewhere/test_xor.py:21: sub((4, 1), (4,)) -> (4, 4): both operands were expanded; "
        "did you mean labels.view(4, 1)?"
    )
    assert (
        BroadcastRecord("where", ((4, 1), (4, 1), (4,)), (4, 4), "f.py", 1)
        .describe()
        .endswith("all 3 operands were expanded")
    )
    with pytest.raises(AttributeError):
        r.op = "add"  # type: ignore[misc]

    out, labels = [0], [0]
    rec = make_record("subtract", [(4, 1), (4,)], (4, 4))  # <- make_record
    assert (rec.filename, rec.lineno) == (THIS_FILE, _line_of("# <- make_record"))
    assert rec.suggestion is not None and rec.suggestion.startswith("reshape")
    del out, labels

    filename, lineno, code = user_frame()  # <- user_frame
    assert (filename, lineno) == (THIS_FILE, _line_of("# <- user_frame"))
    assert code is not None and code.startswith("filename, lineno, code = user_frame()")


def test_report_broadcast_for_other_backends() -> None:
    assert report_broadcast("subtract", [(4, 1), (4,)], (4, 4)) is None  # no guard active
    with no_implicit_broadcast("record") as records:
        assert report_broadcast("subtract", [(4, 3), (3,)], (4, 3)) is None  # not implicit
        rec = report_broadcast("subtract", [(4, 1), (4,)], (4, 4))
    assert records == [rec]
    with pytest.raises(BroadcastError, match="subtract"):
        with no_implicit_broadcast("error"):
            report_broadcast("subtract", [(4, 1), (4,)], (4, 4))
    with pytest.warns(BroadcastWarning, match="subtract"):
        with no_implicit_broadcast("warn"):
            report_broadcast("subtract", [(4, 1), (4,)], (4, 4))


# --------------------------------------------------------------------------- import hygiene


def test_importing_the_module_does_not_import_torch_or_numpy() -> None:
    code = (
        "import sys, pytest_gradcheck.broadcast as b; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'numpy' not in sys.modules, 'numpy imported'; "
        "b.is_implicit_broadcast([(4, 1), (4,)], (4, 4)) or sys.exit(3)"
    )
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
