"""The comparison's reductions for torch gradients: on their own device, chunk by chunk, no copies.

:class:`pytest_gradcheck.compare.Pair` asks for a few figures per parameter: the
largest magnitude of each side, the squared norms and the dot product (for the
cosine, the norm ratio and the factor fit of a diagnosis) and the largest error
``max |b - k * r|`` under the scales ``k`` it compares with. They are computed
here from the gradients as autograd returned them: no flat buffer of all
parameters, no float64 copy of any gradient. Each parameter is read in chunks
(64 Ki entries on the CPU, so that a chunk stays in cache between the reductions
that read it; 4 Mi entries on an accelerator). A chunk's dot products are short
BLAS reductions in the gradients' dtype; they are summed across chunks in
float64. One float32 dot product over 38.6 M entries is wrong in its fourth digit
(measured, 1e-4 relative); chunked this way the error is 4e-9 over 67 M entries,
so the cosine and the fitted factors are exact to the digits the report shows.
Gradients in float16/bfloat16, or of two dtypes, are copied chunk by chunk into a
float32 (float64) work buffer first.

Nothing is copied to the host but the figures themselves, one transfer per call
(``tolist`` of a stacked tensor): on a GPU, a passing check synchronises a few
times and copies a few scalars per parameter.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..compare import Joint

#: entries per chunk on the CPU: a chunk of both gradients stays in the L2 cache while it is reduced
CPU_CHUNK = 1 << 16
#: entries per chunk on an accelerator: few kernel launches, bounded work buffers
DEVICE_CHUNK = 1 << 22


def _floats(values: Sequence[torch.Tensor]) -> list[float]:
    """0-d tensors as floats: one stack and one transfer when they share a device and a dtype."""
    if not values:
        return []
    first = values[0]
    if all(v.device == first.device and v.dtype == first.dtype for v in values):
        return [float(x) for x in torch.stack(list(values)).tolist()]
    return [float(v) for v in values]  # a model spread over devices or dtypes: one transfer each


class _Work:
    """Chunks of two gradients in one dtype that ``torch.dot`` reduces: their own when both are
    float32 or both float64, else copied into reused float32 (float64) work buffers."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}

    def _buffer(self, device: torch.device, dtype: torch.dtype, row: int, size: int) -> torch.Tensor:
        key = (device, dtype, row)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < size:
            buf = self.buffers[key] = torch.empty(size, dtype=dtype, device=device)
        return buf[:size]

    def chunks(self, x: torch.Tensor, y: torch.Tensor, start: int, step: int) -> tuple[torch.Tensor, ...]:
        """Entries ``start:start+step`` of ``x`` and ``y`` in a common dtype, and a scratch row."""
        m = min(step, y.numel() - start)
        dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
        if dtype not in (torch.float32, torch.float64) or y.device.type == "mps":  # MPS: no float64
            dtype = torch.float32 if y.device.type == "mps" else torch.float64
        xc, yc = x[start : start + m], y[start : start + m]
        if xc.dtype != dtype:
            xc = self._buffer(x.device, dtype, 0, m).copy_(xc)
        if yc.dtype != dtype:
            yc = self._buffer(y.device, dtype, 1, m).copy_(yc)
        return xc, yc, self._buffer(y.device, dtype, 2, m)


class TorchReductions:
    """:class:`pytest_gradcheck.compare.Reductions` for torch tensors (see the module docstring)."""

    def __init__(self, chunk: Optional[int] = None) -> None:
        self.chunk = chunk  # None: by device

    def prepare(self, arrays: Sequence[torch.Tensor], names: Sequence[str]) -> list[torch.Tensor]:
        return [a.detach().reshape(-1) for a in arrays]  # views of contiguous gradients

    def _step(self, device: torch.device) -> int:
        if self.chunk is not None:
            return self.chunk
        return CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK

    def _starts(self, x: torch.Tensor) -> range:
        return range(0, x.numel(), self._step(x.device))

    def amax(self, data: list[torch.Tensor]) -> list[float]:
        out = []
        for x in data:
            if x.numel() == 0:
                out.append(torch.zeros((), dtype=x.dtype, device=x.device))
                continue
            lo, hi = torch.aminmax(x)  # one pass, no temporary; NaN propagates through both
            out.append(torch.maximum(hi, lo.neg()))
        return _floats(out)

    def sq(self, data: list[torch.Tensor]) -> list[float]:
        return self.joint(data, data, ()).sq_b

    def joint(self, b: list[torch.Tensor], r: list[torch.Tensor], ks: Sequence[float]) -> Joint:
        grams: list[torch.Tensor] = []  # (3,) per parameter: b.b, r.r, b.r, in float64
        diffs: list[torch.Tensor] = []  # (len(ks),) per parameter
        work = _Work()
        for x, y in zip(b, r):
            step = self._step(y.device)
            g_parts, d_parts = [], []
            for s in self._starts(y):
                xc, yc, scratch = work.chunks(x, y, s, step)
                g_parts.append(torch.stack([torch.dot(xc, xc), torch.dot(yc, yc), torch.dot(xc, yc)]))
                if ks:
                    d_parts.append(torch.stack([self._max_err(xc, yc, scratch, k) for k in ks]))
            if not g_parts:  # an empty parameter
                grams.append(torch.zeros(3, dtype=torch.float64, device=y.device))
                diffs.append(torch.zeros(len(ks), dtype=torch.float64, device=y.device))
                continue
            # each chunk's products come from a short BLAS reduction; across chunks, float64
            grams.append(g_parts[0].double() if len(g_parts) == 1 else torch.stack(g_parts).double().sum(0))
            if ks:
                diffs.append((d_parts[0] if len(d_parts) == 1 else torch.stack(d_parts).amax(0)).double())
        if not grams:
            return Joint([], [], [], {k: [] for k in ks})
        n = len(ks)
        if len({g.device for g in grams}) == 1:  # one transfer: (p, 3) products, then (p, n) errors
            parts = [torch.stack(grams)] + ([torch.stack(diffs)] if n else [])
            table = torch.cat(parts, dim=1).tolist()
        else:  # a model spread over devices: one transfer per parameter
            table = [g.tolist() + (d.tolist() if n else []) for g, d in zip(grams, diffs or grams)]
        return Joint(
            [row[0] for row in table],
            [row[1] for row in table],
            [row[2] for row in table],
            {k: [row[3 + j] for row in table] for j, k in enumerate(ks)},
        )

    @staticmethod
    def _max_err(x: torch.Tensor, y: torch.Tensor, scratch: torch.Tensor, k: float) -> torch.Tensor:
        """``max |x - k * y|`` (NaN if either holds a NaN), through ``scratch``: one subtraction
        and one min/max pass (no ``abs`` written back)."""
        lo, hi = torch.aminmax(torch.sub(x, y, alpha=k, out=scratch))
        return torch.maximum(hi, lo.neg_())

    def max_diff(self, b: list[torch.Tensor], r: list[torch.Tensor], k: float) -> list[float]:
        return self.joint(b, r, (k,)).diff[k]

    def count_over(self, b: list[torch.Tensor], r: list[torch.Tensor], i: int, k: float, allowed: float) -> int:
        x, y = b[i], r[i]
        work, step, total = _Work(), self._step(y.device), 0
        for s in self._starts(y):
            xc, yc, scratch = work.chunks(x, y, s, step)
            total += int((torch.sub(xc, yc, alpha=k, out=scratch).abs_() > allowed).sum())
        return total

    def non_finite(self, data: list[torch.Tensor], i: int) -> int:
        return int((~torch.isfinite(data[i])).sum())


TORCH = TorchReductions()
