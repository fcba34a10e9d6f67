"""Workarounds that let torch.func.vmap batch what it has no batching rule for (still one sample
per call): the math attention kernel on CPU, RNNs through their decompositions."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch


@contextlib.contextmanager
def vmap_friendly_attention(device: torch.device) -> Iterator[None]:
    """On CPU, run scaled_dot_product_attention with the MATH kernel inside vmap.

    vmap has no batching rule for the CPU flash-attention kernel and silently
    falls back to a loop over samples (see benchmarks/README.md); the math kernel is plain matmul/softmax,
    which vmap batches. Each sample is still run alone. (CUDA kernels have
    batching rules and are left alone.)
    """
    if device.type != "cpu":
        yield
        return
    # On CPU the choice is flash or math, so only the flash switch is flipped
    # (torch.nn.attention.sdpa_kernel flips every backend, at a cost on every call).
    enabled = torch.backends.cuda.flash_sdp_enabled()  # type: ignore[no-untyped-call]
    torch.backends.cuda.enable_flash_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(enabled)


_RNN_OPS: dict[Any, Any] = {}


def _rnn_decompositions() -> dict[Any, Any]:
    """``torch._VF`` RNN entry points -> torch's own decompositions into plain aten ops."""
    if not _RNN_OPS:
        try:
            from torch._decomp import decomposition_table
        except ImportError:  # pragma: no cover - very old torch
            return _RNN_OPS
        aten = torch.ops.aten
        for vf, op in (
            (torch._VF.gru, aten.gru.input),
            (torch._VF.lstm, aten.lstm.input),
            (torch._VF.rnn_tanh, aten.rnn_tanh.input),
            (torch._VF.rnn_relu, aten.rnn_relu.input),
        ):
            if op in decomposition_table:
                _RNN_OPS[vf] = decomposition_table[op]
    return _RNN_OPS


@contextlib.contextmanager
def vmap_friendly_rnn(enabled: bool) -> Iterator[None]:
    """Run nn.RNN/LSTM/GRU through torch's decompositions inside vmap.

    vmap has no batching rule for the fused RNN kernels (``aten::gru.input``...),
    so without this a model with a GRU falls back to the per-sample loop (about
    as slow as B training steps). torch's decompositions of those ops are plain
    matmuls and pointwise ops, which vmap batches; each sample is still run alone
    (see benchmarks/README.md for the figures). oneDNN is
    switched off meanwhile: on CPU the LSTM decomposition would otherwise call
    ``mkldnn_rnn_layer``, which has no batching rule either. Packed sequences
    (the ``.data`` overloads) are passed through unchanged.
    """
    table = _rnn_decompositions() if enabled else {}
    if not table:
        yield
        return
    from torch.overrides import TorchFunctionMode

    class _RNNDecompositions(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            decomposed = table.get(func)
            # the ``.input`` overloads take has_biases (a bool) 4th; ``.data`` (packed) does not
            if decomposed is not None and len(args) > 3 and isinstance(args[3], bool):
                return decomposed(*args, **kwargs)
            return func(*args, **kwargs)

    mkldnn = torch.backends.mkldnn
    was_enabled = mkldnn.enabled
    mkldnn.enabled = False  # type: ignore[assignment]  # only this flag: mkldnn.flags() would also reset its TF32 setting
    try:
        with _RNNDecompositions():
            yield
    finally:
        mkldnn.enabled = was_enabled
