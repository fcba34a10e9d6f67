"""How much does a passing ``assert_gradequiv`` cost, next to one training step?

Run from the repository root::

    python benchmarks/bench_gradequiv.py                 # full run, < 10 min on 2 CPU cores
    python benchmarks/bench_gradequiv.py --quick         # smoke mode, tiny sizes, < 30 s
    python benchmarks/bench_gradequiv.py --json out.json --models mlp,cnn --batch-sizes 64,256
    python benchmarks/bench_gradequiv.py --device cuda
    python benchmarks/bench_gradequiv.py --profile mlp:256   # cProfile of the check, then exit

Opacus is optional. It is used when ``import opacus`` works, or when ``--opacus-path DIR``
(or ``$GRADEQUIV_BENCH_OPACUS_PATH``) names a directory holding it. A side install that
leaves the system torch alone::

    pip download opacus --no-deps -d /tmp/opacus_dl
    pip install --no-deps --target /tmp/opacus_target /tmp/opacus_dl/opacus-*.whl
    python benchmarks/bench_gradequiv.py --opacus-path /tmp/opacus_target

Models: the seed-003 MLP (784-45-16, sigmoid, MSE on one-hot targets), a small CNN (two
strided 5x5 convs on 1x28x28, cross-entropy), a ``TransformerEncoderLayer`` (d_model 64, 4
heads, 32 tokens, padding mask, mean-pooled over valid tokens, cross-entropy), an
embedding + GRU (vocab 1000, emb 32, hidden 64, 20 tokens, cross-entropy), and a model of
real size: ``gpt2``, a GPT-2-shaped causal LM from torch.nn (embedding 50257 x 768, 4
decoder layers of width 768, tied head, 67 M parameters) on B=4 x 64 tokens, next-token
cross-entropy, timed for the unit, the check and the floor only (``--models gpt2``).

Everything is timed in one process, with ``time.perf_counter``, after warm-up calls; the
methods of one (model, batch size) are interleaved round-robin, so that a slow spell of the
shared machine hits them all alike. A sample loops a fast method until it lasts >= 50 ms;
slow methods get fewer repeats (at most ~6 s each). Times are medians over the repeats;
a ratio is the median of the per-repeat ratios to the unit.

Columns of the main table
-------------------------
``unit ms``
    One batch forward + backward: ``model.zero_grad(set_to_none=True)`` then
    ``loss_fn(model(*inputs), targets).backward()``, in milliseconds. Every ratio is
    relative to it.
``check x``
    A passing ``assert_gradequiv(model, loss_fn, inputs, targets)`` with its defaults.
``(best)``
    The check's ratio from the fastest sample of each (``min check / min unit``): less
    sensitive to other processes on a shared machine than the median.
``floor x``
    The two passes no check can skip, alone: one batch forward + backward and one
    per-sample reference (vmap over batch-of-one calls, one backward), without saving
    state, converting or comparing gradients. ``check x - floor x`` is the check's own
    bookkeeping.
``naive x``
    The naive reference: B separate forward + backward passes on batches of one,
    gradients accumulated in ``.grad``.
``vmap x``
    ``torch.func.vmap(torch.func.grad(per_sample_loss))`` over ``functional_call``:
    the B per-sample gradients, materialised (not summed).
``opacus x``
    Opacus ``GradSampleModule`` (hooks): one forward + backward that fills ``p.grad_sample``.
``mem unit`` / ``mem check``
    Peak memory the call adds (MiB). On CPU: each model runs in a fresh subprocess with
    glibc's mmap threshold pinned at 64 KiB (so freed tensors go back to the OS); per
    method, after 2 warm-up calls, ``.grad`` is set to None (the state a step starts in:
    model and batch resident), the peak-RSS mark is reset (``/proc/self/clear_refs``), and
    the figure is ``VmHWM - VmRSS`` around one call, median of 3 calls. It counts every
    page the call adds (gradients, activations, copies, NumPy arrays, allocator slack);
    small allocations served from heap freed by earlier calls are not seen, so figures
    under ~1 MiB are coarse. On CUDA it is ``torch.cuda.max_memory_allocated()`` minus
    the allocation before the call. Quick mode probes only the largest MLP.
``mem x``
    ``mem check / mem unit``.
``mem/P``
    ``mem check`` over the model's parameter bytes: what the check holds above the resident
    model, in units of the model (its two gradients alone are 2x, its runs' activations the rest).
``(c-u)/P``
    ``(mem check - mem unit)`` over the parameter bytes: the check's peak beyond the peak of the
    warm training step (which holds one gradient and the activations itself).

Other sections
--------------
``guard``
    ``no_implicit_broadcast("record")`` around N small ``a - b`` ops against the same loop
    unguarded: extra ns per op, for same-shape operands and for operands that broadcast.
``start-up``
    ``pytest --collect-only -q`` of a one-test temporary project with the plugin against
    ``-p no:gradcheck``, interleaved, median difference in ms, of wall time and of the
    child's CPU time (user + sys), the difference of the best (minimum) CPU times, and
    the median of the paired CPU differences (each round runs without, then with, the
    plugin), which the target uses: it cancels load changes between rounds, where a
    single lucky minimum on either side swings the best-of figure by 20 ms. Other
    third-party pytest plugins are disabled in both runs, to cut the noise; bytecode
    caching is on (in a temporary ``PYTHONPYCACHEPREFIX``) as in a normal install, even
    where ``PYTHONDONTWRITEBYTECODE`` is set.
``import``
    Whether ``import pytest_gradcheck.plugin`` puts ``torch`` or ``numpy`` in ``sys.modules``,
    and its ``-X importtime`` cost after pytest (bytecode cached), in ms.

Targets are printed with PASS / MISS markers; they are reported, never asserted.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

METHODS: tuple[str, ...] = ("unit", "check", "floor", "naive", "vmap", "opacus")
MODELS: tuple[str, ...] = ("mlp", "cnn", "transformer", "gru", "gpt2")
FULL_BATCH_SIZES: dict[str, tuple[int, ...]] = {
    "mlp": (64, 256, 1024),
    "cnn": (64, 256),
    "transformer": (64, 256),
    "gru": (64, 256),
    "gpt2": (4,),
}
#: methods that make sense on a model of real size (B per-sample gradients of 67 M parameters
#: would be the vmap and Opacus columns: 1 GB each, and no one checks a 67 M model that way)
MODEL_METHODS: dict[str, tuple[str, ...]] = {"gpt2": ("unit", "check", "floor")}
GPT2_TOKENS = 64
QUICK_BATCH_SIZES: dict[str, tuple[int, ...]] = {"mlp": (16, 64), "cnn": (16,)}
OPACUS_ENV = "GRADEQUIV_BENCH_OPACUS_PATH"
MIB = 1024.0 * 1024.0


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Seed 003: 784-45-16, sigmoid activations, MSE against one-hot targets."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 45)
        self.fc2 = nn.Linear(45, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.fc2(torch.sigmoid(self.fc1(x))))


class SmallCNN(nn.Module):
    """Two strided 5x5 convolutions on 1x28x28, then a linear head (10 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 5, stride=2)  # -> 16x12x12
        self.conv2 = nn.Conv2d(16, 32, 5, stride=2)  # -> 32x4x4
        self.head = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(h.flatten(1))


class EncoderClassifier(nn.Module):
    """One TransformerEncoderLayer (d_model 64, 4 heads, batch_first) with a padding mask,
    mean-pooled over the valid tokens, then a linear head (10 classes). Dropout 0 so that
    every method computes the same function."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.TransformerEncoderLayer(
            d_model=64, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x, src_key_padding_mask=pad)
        valid = (~pad).unsqueeze(-1).to(h.dtype)
        pooled = (h * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)
        return self.head(pooled)


class GRUClassifier(nn.Module):
    """Embedding(1000, 32) -> GRU(32, 64) over 20 tokens -> last hidden -> 10 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(1000, 32)
        self.gru = nn.GRU(32, 64, batch_first=True)
        self.head = nn.Linear(64, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, h = self.gru(self.embed(tokens))
        return self.head(h[-1])


class GPT2Like(nn.Module):
    """A GPT-2-shaped causal language model from torch.nn: token embedding 50257 x 768, learned
    positions, 4 pre-norm decoder layers of width 768 (12 heads, MLP 3072, GELU, causal mask),
    a final LayerNorm and a head tied to the token embedding (67.0 M parameters, 268 MB in
    float32). Dropout 0.1 as GPT-2 has; the check switches it off, the unit step does not."""

    def __init__(self, vocab: int = 50257, width: int = 768, layers: int = 4, tokens: int = GPT2_TOKENS) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(tokens, width)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, 12, 4 * width, dropout=0.1, activation="gelu", batch_first=True, norm_first=True
            )
            for _ in range(layers)
        )
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(tokens), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        h = self.wte(ids) + self.wpe(torch.arange(t, device=ids.device))
        for block in self.blocks:
            h = block(h, src_mask=self.causal[:t, :t], is_causal=True)
        return self.head(self.ln_f(h))


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Causal LM loss: the logits at t predict the token at t + 1 (mean over all predictions)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@dataclass
class Case:
    """One model with a batch: what every method is run on."""

    name: str
    batch_size: int
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    inputs: tuple[torch.Tensor, ...]
    targets: torch.Tensor

    @property
    def check_inputs(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self.inputs[0] if len(self.inputs) == 1 else self.inputs


def build_case(name: str, batch_size: int, device: torch.device, seed: int = 0) -> Case:
    """Build model ``name`` and a batch of ``batch_size`` samples, seeded."""
    torch.manual_seed(seed)
    b = batch_size
    if name == "mlp":
        model: nn.Module = MLP()
        inputs: tuple[torch.Tensor, ...] = (torch.rand(b, 784),)
        targets = F.one_hot(torch.randint(0, 16, (b,)), 16).float()
        loss_fn: Callable[..., torch.Tensor] = F.mse_loss
    elif name == "cnn":
        model = SmallCNN()
        inputs = (torch.randn(b, 1, 28, 28),)
        targets = torch.randint(0, 10, (b,))
        loss_fn = F.cross_entropy
    elif name == "transformer":
        model = EncoderClassifier()
        lengths = torch.randint(8, 33, (b,))
        pad = torch.arange(32).unsqueeze(0) >= lengths.unsqueeze(1)  # True = padding
        inputs = (torch.randn(b, 32, 64), pad)
        targets = torch.randint(0, 10, (b,))
        loss_fn = F.cross_entropy
    elif name == "gru":
        model = GRUClassifier()
        inputs = (torch.randint(0, 1000, (b, 20)),)
        targets = torch.randint(0, 10, (b,))
        loss_fn = F.cross_entropy
    elif name == "gpt2":
        model = GPT2Like()
        ids = torch.randint(0, 50257, (b, GPT2_TOKENS))
        inputs, targets, loss_fn = (ids,), ids, next_token_loss
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    model = model.to(device).train()
    return Case(
        name=name,
        batch_size=b,
        model=model,
        loss_fn=loss_fn,
        inputs=tuple(t.to(device) for t in inputs),
        targets=targets.to(device),
    )


# --------------------------------------------------------------------------- optional parts


def load_assert_gradequiv() -> tuple[Callable[..., Any] | None, str]:
    """The check, imported lazily; ``(None, why)`` while it does not exist yet."""
    try:
        from pytest_gradcheck import assert_gradequiv
    except Exception as exc:  # noqa: BLE001 - absent or half-written module
        return None, f"not available ({type(exc).__name__}: {exc})"
    return assert_gradequiv, "ok"


def load_guard() -> tuple[Callable[..., Any] | None, str]:
    """``pytest_gradcheck.broadcast.no_implicit_broadcast``, or ``(None, why)``."""
    try:
        from pytest_gradcheck.broadcast import no_implicit_broadcast
    except Exception as exc:  # noqa: BLE001
        return None, f"not available ({type(exc).__name__}: {exc})"
    return no_implicit_broadcast, "ok"


def load_opacus(path: str | None) -> tuple[Any, str]:
    """Opacus's ``GradSampleModule`` and ``ModuleValidator``, or ``(None, why)``."""
    if path and path not in sys.path:
        sys.path.append(path)  # appended: the system torch keeps precedence
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import opacus
            from opacus import GradSampleModule
            from opacus.validators import ModuleValidator
    except Exception as exc:  # noqa: BLE001
        return None, f"skipped: opacus not importable ({type(exc).__name__}: {exc})"
    return (GradSampleModule, ModuleValidator), f"ok (opacus {getattr(opacus, '__version__', '?')})"


# --------------------------------------------------------------------------- measured callables


def make_unit(case: Case) -> Callable[[], None]:
    model, loss_fn, inputs, targets = case.model, case.loss_fn, case.inputs, case.targets

    def unit() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(*inputs), targets).backward()

    return unit


def make_check(case: Case, assert_gradequiv: Callable[..., Any]) -> Callable[[], None]:
    model, loss_fn, x, targets = case.model, case.loss_fn, case.check_inputs, case.targets

    def check() -> None:
        assert_gradequiv(model, loss_fn, x, targets)

    return check


def make_floor(case: Case) -> Callable[[], None]:
    """The two passes no check can skip, and nothing else of the check.

    One batch forward+backward (``autograd.grad``) and one per-sample reference: vmap over
    batch-of-one calls of the model and the loss, with one backward of the summed losses.
    Dropout is off in both, as in the check (the transformer block has some), and the
    engine's vmap helpers for attention and RNNs are on, so the figure is this design's
    floor; no state is saved, nothing is compared or converted.
    """
    from pytest_gradcheck._torch.state import disable_dropout_modules
    from pytest_gradcheck._torch.vmap import vmap_friendly_attention, vmap_friendly_rnn

    model, loss_fn, inputs, targets = case.model, case.loss_fn, case.inputs, case.targets
    params = [p for p in model.parameters() if p.requires_grad]
    shaped = (*(t.unsqueeze(1) for t in inputs), targets.unsqueeze(1))  # each sample a batch of one
    n_in = len(inputs)
    has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
    device = params[0].device

    def one(*sample: torch.Tensor) -> torch.Tensor:
        return loss_fn(model(*sample[:n_in]), sample[n_in])

    def floor() -> None:
        modes = [(m, m.training) for m in model.modules()]
        disable_dropout_modules(model)
        try:
            torch.autograd.grad(loss_fn(model(*inputs), targets), params)
            with vmap_friendly_attention(device), vmap_friendly_rnn(has_rnn):
                losses = torch.func.vmap(one, randomness="error")(*shaped)
            torch.autograd.grad(losses.sum(), params)
        finally:
            for m, mode in modes:
                m.training = mode

    return floor


def make_naive(case: Case) -> Callable[[], None]:
    model, loss_fn, inputs, targets = case.model, case.loss_fn, case.inputs, case.targets

    def naive() -> None:
        model.zero_grad(set_to_none=True)
        for i in range(case.batch_size):
            sample = tuple(t[i : i + 1] for t in inputs)
            loss_fn(model(*sample), targets[i : i + 1]).backward()

    return naive


def make_vmap(case: Case) -> Callable[[], None]:
    from torch.func import functional_call, grad, vmap

    model, loss_fn = case.model, case.loss_fn
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    n_in = len(case.inputs)

    def per_sample_loss(
        p: dict[str, torch.Tensor], bufs: dict[str, torch.Tensor], *sample: torch.Tensor
    ) -> torch.Tensor:
        xs, y = sample[:n_in], sample[n_in]
        out = functional_call(model, (p, bufs), tuple(t.unsqueeze(0) for t in xs))
        return loss_fn(out, y.unsqueeze(0))

    per_sample_grads = vmap(grad(per_sample_loss), in_dims=(None, None) + (0,) * (n_in + 1), randomness="different")

    def vmapped() -> None:
        per_sample_grads(params, buffers, *case.inputs, case.targets)

    return vmapped


def make_opacus(case: Case, opacus_parts: Any) -> tuple[Callable[[], None], str]:
    """Opacus on a deep copy (its hooks must not touch the model the others time)."""
    grad_sample_module, module_validator = opacus_parts
    model = copy.deepcopy(case.model)
    note = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if module_validator.validate(model, strict=False):
            model = module_validator.fix(model)  # e.g. GRU -> DPGRU, MHA -> DPMultiheadAttention
            note = "ModuleValidator.fix applied"
        gsm = grad_sample_module(model)
    loss_fn, inputs, targets = case.loss_fn, case.inputs, case.targets

    def opacus_step() -> None:
        gsm.zero_grad(set_to_none=True)  # also drops p.grad_sample
        loss_fn(gsm(*inputs), targets).backward()

    opacus_step.module = gsm  # type: ignore[attr-defined]  # whose grads the memory probe clears
    return opacus_step, note


def build_methods(
    case: Case,
    methods: Sequence[str],
    assert_gradequiv: Callable[..., Any] | None,
    opacus_parts: Any,
    avail: dict[str, str],
) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """The callables that can run on ``case``, and a note for each one that cannot."""
    fns: dict[str, Callable[[], None]] = {}
    notes: dict[str, str] = {}
    for m in methods:
        if m not in MODEL_METHODS.get(case.name, METHODS):
            continue
        try:
            if m == "unit":
                fns[m] = make_unit(case)
            elif m == "check":
                if assert_gradequiv is None:
                    notes[m] = avail["assert_gradequiv"]
                    continue
                fns[m] = make_check(case, assert_gradequiv)
            elif m == "floor":
                if assert_gradequiv is None:
                    notes[m] = avail["assert_gradequiv"]
                    continue
                fns[m] = make_floor(case)
            elif m == "naive":
                fns[m] = make_naive(case)
            elif m == "vmap":
                fns[m] = make_vmap(case)
            elif m == "opacus":
                if opacus_parts is None:
                    notes[m] = avail["opacus"]
                    continue
                fns[m], note = make_opacus(case, opacus_parts)
                if note:
                    notes[m] = note
        except Exception as exc:  # noqa: BLE001 - a method that cannot be set up is reported
            notes[m] = f"n/a: {type(exc).__name__}: {_short(exc)}"
    return fns, notes


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(fn: Callable[[], None], inner: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / inner


def time_methods(
    fns: dict[str, Callable[[], None]],
    *,
    repeats: int,
    warmup: int,
    min_sample_s: float,
    method_budget_s: float,
    device: torch.device,
    notes: dict[str, str],
) -> dict[str, list[float]]:
    """Seconds per call of each method, one sample per repeat, interleaved round-robin.

    A method whose warm-up call raises is dropped (with a note). Fast methods are
    looped ``inner`` times per sample (so a sample lasts >= ``min_sample_s``); slow
    ones get fewer repeats, so that no method spends more than ``method_budget_s``.
    """
    inner: dict[str, int] = {}
    reps: dict[str, int] = {}
    for name in list(fns):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fns[name]()  # first call: lazy set-up, warnings
            if caught:
                msgs = sorted({f"{w.category.__name__}: {_short(w.message, 100)}" for w in caught})  # type: ignore[arg-type]
                notes[name] = (notes.get(name, "") + " warns " + "; ".join(msgs[:2])).strip()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(max(1, warmup)):
                    t1 = _time_once(fns[name], 1, device)  # the last warm-up call sizes the loops
        except Exception as exc:  # noqa: BLE001
            notes[name] = f"n/a: {type(exc).__name__}: {_short(exc)}"
            del fns[name]
            continue
        inner[name] = max(1, min(1000, math.ceil(min_sample_s / max(t1, 1e-9))))
        reps[name] = max(1, min(repeats, int(method_budget_s / max(t1 * inner[name], 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for r in range(repeats):
            rotated = order[r % len(order) :] + order[: r % len(order)] if order else []
            for name in rotated:
                if len(samples[name]) < reps[name]:
                    samples[name].append(_time_once(fns[name], inner[name], device))
    return samples


def paired_ratio(samples: dict[str, list[float]], name: str) -> float | None:
    """Median of (method / unit) over repeats that have both; else ratio of medians."""
    if name not in samples or "unit" not in samples or not samples[name]:
        return None
    a, u = samples[name], samples["unit"]
    if len(a) == len(u):
        return statistics.median(x / y for x, y in zip(a, u))
    return statistics.median(a) / statistics.median(u)


# --------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _peak_of_one_call(fn: Callable[[], None], module: nn.Module, device: torch.device) -> int | None:
    """Bytes one call of ``fn`` adds at its peak, from a state with ``.grad`` set to None."""
    module.zero_grad(set_to_none=True)  # the state a step starts in: model and batch resident
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    if not _reset_peak_rss():
        return None
    base = _proc_status_kib("VmRSS")
    fn()
    return (_proc_status_kib("VmHWM") - base) * 1024


MEMORY_METHODS: tuple[str, ...] = ("unit", "check", "vmap", "opacus")  # naive: one sample at a time


def memory_worker(
    model: str, batch_sizes: Sequence[int], device_name: str, opacus_path: str | None, threads: int
) -> dict[str, Any]:
    """Run in a fresh subprocess: per batch size, the peak memory each method adds, in bytes."""
    torch.set_num_threads(threads)
    device = torch.device(device_name)
    agq, agq_status = load_assert_gradequiv()
    opacus_parts, opacus_status = load_opacus(opacus_path)
    avail = {"assert_gradequiv": agq_status, "opacus": opacus_status}
    if device.type == "cpu":
        how = (
            "median of 3 calls of VmHWM - VmRSS around the call, after 2 warm-up calls, "
            "from .grad set to None (MALLOC_MMAP_THRESHOLD_=65536)"
        )
    else:
        how = "median of 3 calls of max_memory_allocated() - memory_allocated() around the call"
    result: dict[str, Any] = {}
    for b in batch_sizes:
        case = build_case(model, b, device)
        fns, notes = build_methods(case, MEMORY_METHODS, agq, opacus_parts, avail)
        out: dict[str, Any] = {
            "how": how,
            "peak_bytes": {},
            "notes": notes,
            "param_bytes": sum(p.numel() * p.element_size() for p in case.model.parameters()),
        }
        for name, fn in fns.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    for _ in range(2):
                        fn()  # warm-up: lazy imports, first-call caches, the heap's steady state
                    peaks = [_peak_of_one_call(fn, getattr(fn, "module", case.model), device) for _ in range(3)]
            except Exception as exc:  # noqa: BLE001
                notes[name] = f"n/a: {type(exc).__name__}: {_short(exc)}"
                continue
            if None in peaks:
                notes[name] = "n/a: cannot reset peak RSS (/proc/self/clear_refs)"
                continue
            peak = statistics.median(peaks)  # type: ignore[type-var]
            out["peak_bytes"][name] = max(int(peak), 0)
        result[str(b)] = out
        del case, fns
        gc.collect()
    return result


def measure_memory(
    model: str, batch_sizes: Sequence[int], device: torch.device, opacus_path: str | None, threads: int
) -> dict[int, dict[str, Any]]:
    """One fresh subprocess per model (torch imported once), all its batch sizes."""
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # fixed threshold: freed big blocks leave RSS
    env["PYTHONWARNINGS"] = "ignore"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_memory-worker",
        f"{model}:{','.join(map(str, batch_sizes))}",
        "--device",
        device.type,
        "--threads",
        str(threads),
    ]
    if opacus_path:
        cmd += ["--opacus-path", opacus_path]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=False)
    if proc.returncode != 0:
        failed = {"peak_bytes": {}, "notes": {"all": f"worker failed: {proc.stderr.strip()[-300:]}"}}
        return {b: failed for b in batch_sizes}
    raw = json.loads(proc.stdout.strip().splitlines()[-1])
    return {int(b): v for b, v in raw.items()}


# --------------------------------------------------------------------------- guard, start-up, import


def measure_guard(n_ops: int, repeats: int) -> dict[str, Any]:
    """Extra ns per op of ``no_implicit_broadcast("record")`` around small ``a - b`` ops."""
    guard, status = load_guard()
    if guard is None:
        return {"status": status}

    def open_guard() -> Any:
        try:
            return guard("record")
        except TypeError:
            return guard(mode="record")

    cases = {
        "same_shape": (torch.randn(8, 8), torch.randn(8, 8)),
        "broadcasting": (torch.randn(8, 1), torch.randn(8)),
    }
    out: dict[str, Any] = {"status": "ok", "n_ops": n_ops}
    for label, (a, b) in cases.items():

        def plain(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            for _ in range(n_ops):
                a - b

        def guarded(a: torch.Tensor = a, b: torch.Tensor = b) -> None:
            with open_guard():
                for _ in range(n_ops):
                    a - b

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                plain()
                guarded()
                t_plain: list[float] = []
                t_guard: list[float] = []
                for _ in range(repeats):
                    for fn, acc in ((plain, t_plain), (guarded, t_guard)):
                        t0 = time.perf_counter()
                        fn()
                        acc.append(time.perf_counter() - t0)
        except Exception as exc:  # noqa: BLE001
            out[label] = {"status": f"n/a: {type(exc).__name__}: {_short(exc)}"}
            continue
        p, g = statistics.median(t_plain), statistics.median(t_guard)
        out[label] = {
            "plain_ns_per_op": p / n_ops * 1e9,
            "guarded_ns_per_op": g / n_ops * 1e9,
            "overhead_ns_per_op": (g - p) / n_ops * 1e9,
        }
    return out


def measure_ddp(world_sizes: Sequence[int] = (2, 4), batch_size: int = 64, repeats: int = 3) -> dict[str, Any]:
    """Seconds per ``assert_ddp_equiv``, and per ``assert_fsdp_equiv`` (``fully_shard``), at each
    world size against the single-process check.

    The model factory is a ``functools.partial`` of ``nn.Sequential`` over layers
    built here, so it pickles (the ranks get the same weights) even though this
    script runs as ``__main__``. The first DDP call also starts the forkserver
    the ranks are forked from; it is reported apart. The FSDP figures
    (``fsdp_world_size_N``) come after DDP's, from the same forkserver, with
    ``ratio_to_ddp`` their median over DDP's at the same world size.
    """
    import functools

    try:
        from pytest_gradcheck import assert_ddp_equiv, assert_gradequiv
    except Exception as exc:  # pragma: no cover - reported, not fatal
        return {"status": f"not available ({_short(exc)})"}
    torch.manual_seed(0)
    make_model = functools.partial(nn.Sequential, nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
    x, y = torch.randn(batch_size, 32), torch.randn(batch_size, 1)

    def median_s(fn: Callable[[], Any], n: int) -> float:
        times = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    out: dict[str, Any] = {"status": "ok", "model": "MLP 32-64-1, MSE", "batch_size": batch_size}
    out["single_s"] = median_s(lambda: assert_gradequiv(make_model(), F.mse_loss, x, y), 5)
    for ws in world_sizes:
        try:
            first = median_s(lambda ws=ws: assert_ddp_equiv(make_model, F.mse_loss, x, y, world_size=ws), 1)
            later = median_s(lambda ws=ws: assert_ddp_equiv(make_model, F.mse_loss, x, y, world_size=ws), repeats)
        except Exception as exc:
            out[f"world_size_{ws}"] = {"status": f"failed ({_short(exc)})"}
            continue
        out[f"world_size_{ws}"] = {
            "status": "ok",
            "first_s": first,
            "median_s": later,
            "ratio": later / out["single_s"],
        }
    try:
        from pytest_gradcheck import assert_fsdp_equiv
        from pytest_gradcheck.ddp.fsdp import fully_shard_available
    except Exception as exc:  # pragma: no cover - reported, not fatal
        out["fsdp_status"] = f"not available ({_short(exc)})"
        return out
    if not fully_shard_available():
        out["fsdp_status"] = "not available (no torch.distributed.fsdp.fully_shard)"
        return out
    out["fsdp_status"] = "ok"
    for ws in world_sizes:
        try:
            first = median_s(lambda ws=ws: assert_fsdp_equiv(make_model, F.mse_loss, x, y, world_size=ws), 1)
            later = median_s(lambda ws=ws: assert_fsdp_equiv(make_model, F.mse_loss, x, y, world_size=ws), repeats)
        except Exception as exc:
            out[f"fsdp_world_size_{ws}"] = {"status": f"failed ({_short(exc)})"}
            continue
        ddp_s = out.get(f"world_size_{ws}", {}).get("median_s")
        out[f"fsdp_world_size_{ws}"] = {
            "status": "ok",
            "first_s": first,
            "median_s": later,
            "ratio": later / out["single_s"],
            "ratio_to_ddp": later / ddp_s if ddp_s else None,
        }
    return out


def _plugin_is_entry_point() -> bool:
    from importlib.metadata import entry_points

    return any(ep.name == "gradcheck" for ep in entry_points(group="pytest11"))


def _subprocess_env(pycache: str | None = None) -> dict[str, str]:
    """Environment for the start-up probes.

    With ``pycache``, bytecode caching is on (``PYTHONDONTWRITEBYTECODE`` dropped) with the
    cache under that directory, so nothing is written into the source tree: a user's normal
    install caches bytecode, and pytest caches its assertion-rewritten plugin modules.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("PYTEST_ADDOPTS", None)
    env.pop("PYTEST_PLUGINS", None)
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = pycache
    return env


def _run_timed(cmd: list[str], cwd: str, env: dict[str, str]) -> tuple[int, float, float, str]:
    """Run ``cmd``; return (exit code, wall s, CPU s of the child (user + sys), output tail)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, wall, usage.ru_utime + usage.ru_stime, output.decode(errors="replace")[-400:]


def measure_startup(runs: int, pycache: str) -> dict[str, Any]:
    """Wall and CPU time of ``pytest --collect-only -q`` with and without the plugin.

    Runs alternate (without, with) so that load changes hit both alike; the first round
    (which fills the bytecode cache) is not counted. Medians and minima of wall time and
    of the child's CPU time (user + sys) are reported, and the median of the per-round
    CPU differences, on which the target is judged.
    """
    import importlib.util

    if importlib.util.find_spec("pytest_gradcheck.plugin") is None:
        return {"status": "not available (pytest_gradcheck.plugin missing)"}
    from importlib.metadata import entry_points

    via_entry_point = _plugin_is_entry_point()
    env = _subprocess_env(pycache)
    # Other third-party plugins (hypothesis, xdist, benchmark...) are off in both runs: their
    # start-up (about 1.5 s for hypothesis here) is noise that would bury a 20 ms difference.
    others = sorted({ep.name for ep in entry_points(group="pytest11")} - {"gradcheck"})
    base = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
    for name in others:
        base += ["-p", f"no:{name}"]
    variants = {
        "without": base + ["-p", "no:gradcheck"],
        "with": base + ([] if via_entry_point else ["-p", "pytest_gradcheck.plugin"]),
    }
    wall: dict[str, list[float]] = {k: [] for k in variants}
    cpu: dict[str, list[float]] = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "pytest.ini").write_text("[pytest]\n")
        Path(tmp, "test_tiny.py").write_text("def test_tiny():\n    assert True\n")
        for i in range(runs + 1):  # the first round warms the OS caches, not counted
            for name, cmd in variants.items():
                rc, w, c, tail = _run_timed(cmd, tmp, env)
                if rc != 0:
                    return {"status": f"pytest {name} plugin failed (rc {rc}): {tail}"}
                if i:
                    wall[name].append(w)
                    cpu[name].append(c)
    out: dict[str, Any] = {
        "status": "ok",
        "loaded_via": "entry point" if via_entry_point else "-p pytest_gradcheck.plugin",
        "other_plugins_disabled": others,
        "bytecode_cache": True,
        "runs": runs,
    }
    for label, data in (("", wall), ("cpu_", cpu)):
        for stat, fn in (("", statistics.median), ("min_", min)):
            w, wo = fn(data["with"]) * 1e3, fn(data["without"]) * 1e3
            out[f"{stat}with_{label}ms"] = w
            out[f"{stat}without_{label}ms"] = wo
            out[f"{stat}overhead_{label}ms"] = w - wo
    paired = [(a - b) * 1e3 for a, b in zip(cpu["with"], cpu["without"])]
    out["paired_overhead_cpu_ms"] = statistics.median(paired)
    return out


def check_plugin_imports(pycache: str, runs: int = 3) -> dict[str, Any]:
    """Does ``import pytest_gradcheck.plugin`` import torch or numpy, and how long does it take?

    ``import_ms`` is the median over ``runs`` fresh interpreters of the cumulative
    ``-X importtime`` of the top-level ``pytest_gradcheck*`` imports, pytest imported first.
    """
    code = (
        "import json, sys, pytest\n"
        "try:\n"
        "    import pytest_gradcheck.plugin\n"
        "except Exception as e:\n"
        "    print(json.dumps({'status': 'not available (%s: %s)' % (type(e).__name__, e)})); raise SystemExit\n"
        "print(json.dumps({'status': 'ok', 'torch': 'torch' in sys.modules, 'numpy': 'numpy' in sys.modules}))\n"
    )
    out: dict[str, Any] = {}
    import_us: list[int] = []
    for _ in range(runs + 1):  # the first run may compile .pyc files: not counted
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code],
            env=_subprocess_env(pycache),
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            out = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            return {"status": f"n/a: {proc.stderr.strip()[-300:]}"}
        if out.get("status") != "ok":
            return out
        total = 0
        for line in proc.stderr.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[2].startswith(" pytest_gradcheck") and not parts[2].startswith("  "):
                total += int(parts[1])
        import_us.append(total)
    out["import_ms"] = statistics.median(import_us[1:]) / 1e3
    return out


# --------------------------------------------------------------------------- targets and report


def evaluate_targets(
    results: list[dict[str, Any]], startup: dict[str, Any], imports: dict[str, Any]
) -> list[dict[str, str]]:
    """PASS / MISS / N/A against the issue's targets (reported, never asserted)."""
    targets: list[dict[str, str]] = []

    def add(name: str, ok: bool | None, detail: str) -> None:
        targets.append(
            {"target": name, "status": "N/A" if ok is None else ("PASS" if ok else "MISS"), "detail": detail}
        )

    def ratio(model: str, b: int, method: str = "check") -> float | None:
        for r in results:
            if r["model"] == model and r["batch_size"] == b:
                return r["methods"].get(method, {}).get("ratio")
        return None

    for b in (256, 1024):
        x, fl = ratio("mlp", b), ratio("mlp", b, "floor")
        detail = (
            "n/a" if x is None else f"{x:.2f}x" + ("" if fl is None else f" (floor: the two passes alone {fl:.2f}x)")
        )
        add(f"check <= 2.5x unit, MLP B={b}", None if x is None else x <= 2.5, detail)
    mlp = sorted((r["batch_size"], r["methods"].get("check", {}).get("ratio")) for r in results if r["model"] == "mlp")
    mlp = [(b, x) for b, x in mlp if x is not None]
    if len(mlp) >= 2:
        flat = all(x2 <= x1 * 1.15 for (_, x1), (_, x2) in zip(mlp, mlp[1:]))
        add(
            "MLP check ratio flat or falling with B (15% noise allowance)",
            flat,
            " -> ".join(f"B={b}: {x:.2f}x" for b, x in mlp),
        )
    else:
        add("MLP check ratio flat or falling with B (15% noise allowance)", None, "needs two MLP batch sizes")
    at256 = [(r["model"], r["methods"].get("check", {}).get("ratio")) for r in results if r["batch_size"] == 256]
    at256 = [(m, x) for m, x in at256 if x is not None]
    if at256:
        worst = max(at256, key=lambda t: t[1])
        add("no model above 4x at B=256", worst[1] <= 4.0, ", ".join(f"{m} {x:.2f}x" for m, x in at256))
    else:
        add("no model above 4x at B=256", None, "no check figure at B=256")
    for r in results:
        if r["model"] != "gpt2":
            continue
        x, fl = ratio("gpt2", r["batch_size"]), ratio("gpt2", r["batch_size"], "floor")
        detail = (
            "n/a" if x is None else f"{x:.2f}x" + ("" if fl is None else f" (floor: the two passes alone {fl:.2f}x)")
        )
        add(f"check <= 2.5x warm step, GPT-2-like B={r['batch_size']}", None if x is None else x <= 2.5, detail)
        m = r.get("memory", {})
        pr, over, pbytes = m.get("param_ratio"), m.get("beyond_step_ratio"), m.get("param_bytes")
        add(
            f"check's peak beyond the warm step's <= 2.5x parameter bytes, GPT-2-like B={r['batch_size']}",
            None if over is None else over <= 2.5,
            "n/a"
            if over is None or pr is None
            else f"{over:.2f}x of {pbytes / MIB:.0f} MiB beyond the step; {pr:.2f}x above the resident model "
            "(its two gradients are 2x, the step's activations the rest)",
        )
    mem = [(r["model"], r["batch_size"], r.get("memory", {}).get("ratio")) for r in results]
    mem = [(m, b, x) for m, b, x in mem if x is not None]
    if mem:
        worst_m = max(mem, key=lambda t: t[2])
        add(
            "check peak memory <= 3x batch step",
            worst_m[2] <= 3.0,
            f"worst {worst_m[0]} B={worst_m[1]}: {worst_m[2]:.2f}x",
        )
    else:
        add("check peak memory <= 3x batch step", None, "no memory figures for the check")
    if startup.get("status") == "ok":
        add(
            "plugin start-up <= 20 ms (median paired CPU difference)",
            startup["paired_overhead_cpu_ms"] <= 20.0,
            f"{startup['paired_overhead_cpu_ms']:+.1f} ms paired CPU; best-of CPU {startup['min_overhead_cpu_ms']:+.1f} ms; "
            f"medians {startup['overhead_cpu_ms']:+.1f} ms CPU, {startup['overhead_ms']:+.1f} ms wall",
        )
    else:
        add("plugin start-up <= 20 ms (median paired CPU difference)", None, str(startup.get("status")))
    if imports.get("status") == "ok":
        add(
            "import pytest_gradcheck.plugin imports neither torch nor numpy",
            not (imports["torch"] or imports["numpy"]),
            f"torch={imports['torch']} numpy={imports['numpy']}",
        )
    else:
        add("import pytest_gradcheck.plugin imports neither torch nor numpy", None, str(imports.get("status")))
    return targets


def _fmt_x(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}x"


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    meta = report["meta"]
    lines.append(
        f"torch {meta['torch']} | python {meta['python']} | {meta['device']} | threads {meta['threads']} | "
        f"repeats {meta['repeats']} | {'quick' if meta['quick'] else 'full'}"
        + "".join(f" | {k}={v}" for k, v in meta.get("thread_env", {}).items())
    )
    load = meta["load_avg_1min"]
    busy = max(load["start"], load["end"]) > (meta["cpu_count"] or 1)
    lines.append(
        f"load average (1 min) {load['start']:.1f} at start, {load['end']:.1f} at end, {meta['cpu_count']} CPUs"
        + (": the machine is oversubscribed, multi-threaded timings stall; read with care" if busy else "")
    )
    lines.append("available: " + ", ".join(f"{k}: {v}" for k, v in report["availability"].items()))
    lines.append("")
    head = f"{'model':<12}{'B':>6}{'unit ms':>10}{'check x':>9}{'(best)':>8}{'floor x':>9}{'naive x':>9}{'vmap x':>9}{'opacus x':>10}{'mem unit':>10}{'mem check':>11}{'mem x':>7}{'mem/P':>7}{'(c-u)/P':>8}"
    lines.append(head)
    lines.append("-" * len(head))
    notes: list[str] = []
    for r in report["results"]:
        ms = r["methods"]
        unit_ms = ms.get("unit", {}).get("median_ms")
        mem = r.get("memory", {})
        pb = mem.get("peak_bytes", {})
        mu, mc = pb.get("unit"), pb.get("check")
        lines.append(
            f"{r['model']:<12}{r['batch_size']:>6}"
            f"{'-' if unit_ms is None else f'{unit_ms:.3f}':>10}"
            f"{_fmt_x(ms.get('check', {}).get('ratio')):>9}"
            f"{_fmt_x(ms.get('check', {}).get('ratio_best')):>8}"
            f"{_fmt_x(ms.get('floor', {}).get('ratio')):>9}"
            f"{_fmt_x(ms.get('naive', {}).get('ratio')):>9}"
            f"{_fmt_x(ms.get('vmap', {}).get('ratio')):>9}"
            f"{_fmt_x(ms.get('opacus', {}).get('ratio')):>10}"
            f"{'-' if mu is None else f'{mu / MIB:.2f}M':>10}"
            f"{'-' if mc is None else f'{mc / MIB:.2f}M':>11}"
            f"{_fmt_x(mem.get('ratio')):>7}"
            f"{_fmt_x(mem.get('param_ratio')):>7}"
            f"{_fmt_x(mem.get('beyond_step_ratio')):>8}"
        )
        for m, info in ms.items():
            if info.get("note"):
                notes.append(f"  {r['model']} B={r['batch_size']} {m}: {info['note']}")
    if notes:
        lines.append("notes:")
        lines.extend(sorted(set(notes), key=notes.index))
    g = report["guard"]
    lines.append("")
    if g.get("status") == "ok":
        for label in ("same_shape", "broadcasting"):
            d = g.get(label, {})
            if "overhead_ns_per_op" in d:
                lines.append(
                    f"guard ({label}, {g['n_ops']} ops): {d['plain_ns_per_op']:.0f} ns/op plain, "
                    f"{d['guarded_ns_per_op']:.0f} ns/op guarded -> {d['overhead_ns_per_op']:+.0f} ns/op"
                )
            else:
                lines.append(f"guard ({label}): {d.get('status')}")
    else:
        lines.append(f"guard: {g.get('status')}")
    d = report.get("ddp", {})
    if d.get("status") == "ok":
        parts = [f"single-process check {d['single_s'] * 1e3:.0f} ms"]
        for key, v in d.items():
            if key.startswith("world_size_"):
                ws = key.rsplit("_", 1)[1]
                if v.get("status") == "ok":
                    parts.append(
                        f"world_size {ws}: {v['median_s']:.2f} s ({v['ratio']:.0f}x; first call {v['first_s']:.1f} s)"
                    )
                else:
                    parts.append(f"world_size {ws}: {v.get('status')}")
        lines.append(f"ddp ({d['model']}, B={d['batch_size']}, gloo on 127.0.0.1): " + "; ".join(parts))
        fsdp_parts = []
        for key, v in d.items():
            if key.startswith("fsdp_world_size_"):
                ws = key.rsplit("_", 1)[1]
                if v.get("status") == "ok":
                    vs_ddp = f", {v['ratio_to_ddp']:.1f}x DDP" if v.get("ratio_to_ddp") else ""
                    fsdp_parts.append(
                        f"world_size {ws}: {v['median_s']:.2f} s ({v['ratio']:.0f}x{vs_ddp}; "
                        f"first call {v['first_s']:.1f} s)"
                    )
                else:
                    fsdp_parts.append(f"world_size {ws}: {v.get('status')}")
        if fsdp_parts:
            lines.append("fsdp (fully_shard, same model and batch): " + "; ".join(fsdp_parts))
        elif d.get("fsdp_status"):
            lines.append(f"fsdp: {d['fsdp_status']}")
    else:
        lines.append(f"ddp: {d.get('status')}")
    s = report["startup"]
    if s.get("status") == "ok":
        lines.append(
            f"start-up (pytest --collect-only, {s['runs']} runs each, plugin via {s['loaded_via']}, "
            f"other plugins off, bytecode cached): median wall {s['with_ms']:.0f} vs {s['without_ms']:.0f} ms "
            f"-> {s['overhead_ms']:+.1f} ms; median CPU {s['with_cpu_ms']:.0f} vs {s['without_cpu_ms']:.0f} ms "
            f"-> {s['overhead_cpu_ms']:+.1f} ms; best-of CPU {s['min_with_cpu_ms']:.0f} vs "
            f"{s['min_without_cpu_ms']:.0f} ms -> {s['min_overhead_cpu_ms']:+.1f} ms; "
            f"median paired CPU difference {s['paired_overhead_cpu_ms']:+.1f} ms"
        )
    else:
        lines.append(f"start-up: {s.get('status')}")
    i = report["plugin_imports"]
    lines.append(
        f"import pytest_gradcheck.plugin: torch={i.get('torch')} numpy={i.get('numpy')}, "
        f"{i.get('import_ms', float('nan')):.1f} ms (-X importtime, after pytest)"
        if i.get("status") == "ok"
        else f"import pytest_gradcheck.plugin: {i.get('status')}"
    )
    lines.append("")
    lines.append("targets (reported, not asserted):")
    for t in report["targets"]:
        lines.append(f"  [{t['status']:<4}] {t['target']}: {t['detail']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smoke mode: MLP at B=16/64 and a CNN at B=16, 2 repeats")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--models", type=_csv, help=f"comma list from {','.join(MODELS)}")
    p.add_argument(
        "--batch-sizes", type=lambda s: [int(v) for v in _csv(s)], help="comma list; overrides each model's sizes"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--repeats", type=int, help="timing repeats (default 7, quick 2)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--no-memory", action="store_true", help="skip the per-(model, B) memory subprocesses")
    p.add_argument("--no-ddp", action="store_true", help="skip assert_ddp_equiv at world_size 2 and 4 (full runs)")
    p.add_argument(
        "--opacus-path", default=os.environ.get(OPACUS_ENV), help=f"directory holding opacus (or ${OPACUS_ENV})"
    )
    p.add_argument(
        "--profile", metavar="MODEL:B", help="cProfile a passing assert_gradequiv on MODEL at B, print, exit"
    )
    p.add_argument("--_memory-worker", dest="memory_worker", metavar="MODEL:B", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_profile(spec: str, device: torch.device, calls: int = 5) -> str:
    model, b = spec.split(":")
    case = build_case(model, int(b), device)
    agq, status = load_assert_gradequiv()
    if agq is None:
        return f"assert_gradequiv {status}"
    check = make_check(case, agq)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls):
            check()
        prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    buf.write(f"cProfile of {calls} passing assert_gradequiv calls, {model} B={b}\n")
    stats.sort_stats("cumulative").print_stats(30)
    stats.sort_stats("tottime").print_stats(20)
    return buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    if args.memory_worker:
        model, bs = args.memory_worker.split(":")
        sizes_ = [int(v) for v in _csv(bs)]
        print(json.dumps(memory_worker(model, sizes_, args.device, args.opacus_path, args.threads)))
        return 0
    if args.profile:
        print(run_profile(args.profile, device))
        return 0

    quick = args.quick
    sizes = QUICK_BATCH_SIZES if quick else FULL_BATCH_SIZES
    models = args.models or list(sizes)
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"unknown model(s) {unknown}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    repeats = args.repeats or (2 if quick else 7)
    timing = {
        "warmup": 1,  # calls after the first, untimed one
        "min_sample_s": 0.005 if quick else 0.05,
        "method_budget_s": 1.5 if quick else 6.0,
    }

    load_start = os.getloadavg()[0]
    agq, agq_status = load_assert_gradequiv()
    opacus_parts, opacus_status = load_opacus(args.opacus_path)
    _, guard_status = load_guard()
    avail = {"assert_gradequiv": agq_status, "no_implicit_broadcast": guard_status, "opacus": opacus_status}
    t_start = time.perf_counter()

    results: list[dict[str, Any]] = []
    for model in models:
        rows: list[dict[str, Any]] = []
        for b in args.batch_sizes or sizes.get(model, FULL_BATCH_SIZES[model]):
            t_row = time.perf_counter()
            case = build_case(model, b, device)
            fns, notes = build_methods(case, METHODS, agq, opacus_parts, avail)
            samples = time_methods(fns, repeats=repeats, device=device, notes=notes, **timing)
            methods: dict[str, Any] = {}
            for m in METHODS:
                info: dict[str, Any] = {}
                if samples.get(m):
                    info["median_ms"] = statistics.median(samples[m]) * 1e3
                    info["min_ms"] = min(samples[m]) * 1e3
                    info["samples"] = len(samples[m])
                    info["ratio"] = 1.0 if m == "unit" else paired_ratio(samples, m)
                    if samples.get("unit"):
                        info["ratio_best"] = min(samples[m]) / min(samples["unit"])
                if m in notes:
                    info["note"] = notes[m]
                methods[m] = info
            rows.append({"model": model, "batch_size": b, "methods": methods})
            print(f"  timed {model} B={b} in {time.perf_counter() - t_row:.0f} s", file=sys.stderr, flush=True)
            del case, fns
            gc.collect()
        # quick: one memory probe (the largest MLP), without Opacus, to stay under 30 s
        if quick:
            probe = [max(r["batch_size"] for r in rows)] if model == "mlp" and rows else []
        else:
            probe = [r["batch_size"] for r in rows]
        if probe and not args.no_memory:
            t_mem = time.perf_counter()
            mems = measure_memory(model, probe, device, None if quick else args.opacus_path, args.threads)
            for r in rows:
                mem = mems.get(r["batch_size"])
                if mem is None:
                    continue
                pb = mem.get("peak_bytes", {})
                if pb.get("unit") and pb.get("check") is not None:
                    mem["ratio"] = pb["check"] / pb["unit"]
                if mem.get("param_bytes") and pb.get("check") is not None:
                    mem["param_ratio"] = pb["check"] / mem["param_bytes"]
                    if pb.get("unit") is not None:
                        mem["beyond_step_ratio"] = (pb["check"] - pb["unit"]) / mem["param_bytes"]
                r["memory"] = mem
            print(f"  memory {model} in {time.perf_counter() - t_mem:.0f} s", file=sys.stderr, flush=True)
        results.extend(rows)

    n_ops = 2_000 if quick else 10_000
    guard = measure_guard(n_ops, repeats=3 if quick else 9)
    ddp = {"status": "skipped"} if (quick or args.no_ddp or device.type != "cpu") else measure_ddp()
    with tempfile.TemporaryDirectory() as pycache:
        startup = measure_startup(3 if quick else 15, pycache)
        imports = check_plugin_imports(pycache)
    report: dict[str, Any] = {
        "meta": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "quick": quick,
            "timing": timing,
            "cpu_count": os.cpu_count(),
            "thread_env": {
                k: os.environ.get(k)
                for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
                if os.environ.get(k)
            },
            "load_avg_1min": {"start": load_start, "end": os.getloadavg()[0]},
            "elapsed_s": 0.0,
        },
        "availability": avail,
        "results": results,
        "guard": guard,
        "ddp": ddp,
        "startup": startup,
        "plugin_imports": imports,
    }
    report["targets"] = evaluate_targets(results, startup, imports)
    report["meta"]["elapsed_s"] = time.perf_counter() - t_start
    print(render(report))
    print(f"\n(total {report['meta']['elapsed_s']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
