"""Real-shaped models built from torch.nn, the way third-party libraries write them.

Shared by the trust tests, directly and as source written into pytester files
(``SOURCE``), so that a user's run of pytest sees the very same models.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn


class QKVAttention(nn.Module):
    """Textbook multi-head self-attention with q/k/v biases: the key bias has a zero true
    gradient (softmax ignores a shift applied to every logit of a row)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.heads

        def split(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-1, -2) / math.sqrt(d // h)).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, d)).mean(1)


class ConvGroupNorm(nn.Module):
    """A conv whose bias is cancelled by the GroupNorm after it (zero true gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.norm(self.conv(x))).mean((2, 3)))


class CausalBlock(nn.Module):
    """A GPT-2-style block: attention dropout passed to the kernel from a plain float
    attribute, residual dropout read from a module's ``.p`` and applied functionally."""

    def __init__(self, d: int, heads: int, p: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.attn_dropout = p  # a plain float, as several transformers models keep it
        self.resid_dropout = nn.Dropout(p)  # read for its .p, never called
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.attn_dropout if self.training else 0.0
        )
        y = self.c_proj(y.transpose(1, 2).reshape(b, t, d))
        x = x + F.dropout(y, p=self.resid_dropout.p, training=self.training)
        return x + self.mlp(self.ln2(x))


class TinyCausalLM(nn.Module):
    """A causal LM that shifts its labels inside (``labels[:, 1:]``), like transformers' models."""

    def __init__(self, vocab: int = 64, d: int = 32, heads: int = 4, layers: int = 2, p: float = 0.1) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(64, d)
        self.drop = nn.Dropout(p)
        self.blocks = nn.ModuleList(CausalBlock(d, heads, p) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        t = input_ids.shape[1]
        x = self.drop(self.wte(input_ids) + self.wpe(torch.arange(t, device=input_ids.device)))
        for block in self.blocks:
            x = block(x)
        logits = self.ln_f(x) @ self.wte.weight.t()  # tied head
        if labels is None:
            return logits
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
        )


class ScaledWeightGrad(torch.autograd.Function):
    """``x @ w.T + b`` whose backward returns B times the weight gradient (a custom-op bug)."""

    @staticmethod
    def forward(ctx, x, w, b):  # type: ignore[no-untyped-def, override]
        ctx.save_for_backward(x, w)
        return x @ w.t() + b

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def, override]
        x, w = ctx.saved_tensors
        return g @ w, (g.t() @ x) * x.shape[0], g.sum(0)


class CustomOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(ScaledWeightGrad.apply(x, self.fc1.weight, self.fc1.bias)))


class RunningCentering(nn.Module):
    """Uses a running mean, then updates it in forward (a buffer written in forward)."""

    def __init__(self, d: int = 6) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.register_buffer("running_mean", torch.zeros(d))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x) - self.running_mean
        if self.training:
            with torch.no_grad():
                self.running_mean.mul_(0.9).add_(0.1 * out.mean(0))
                self.steps += 1
        return out


class CachingNet(nn.Module):
    """Keeps its last activation on itself, as models that cache for visualisation do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last = self.fc(x)
        self.calls += 1
        return self.last


SOURCE = "\n\n".join(
    [
        "from __future__ import annotations",
        "import math",
        "import torch",
        "import torch.nn.functional as F",
        "from torch import nn",
    ]
    + [
        inspect.getsource(obj)
        for obj in (
            QKVAttention,
            ConvGroupNorm,
            CausalBlock,
            TinyCausalLM,
            ScaledWeightGrad,
            CustomOpNet,
            RunningCentering,
            CachingNet,
        )
    ]
)
