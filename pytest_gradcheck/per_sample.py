"""Per-sample gradients that users compute themselves, checked against the tool's.

Opacus grad samplers for custom layers, BackPACK extensions and hand-written
``torch.func`` code all produce per-sample gradients: ``{name: (B, *shape)}``, the
gradient of each sample's loss with the sample run alone. :func:`assert_per_sample_gradients`
compares them, parameter by parameter and sample by sample, with the tool's own
(each sample run alone through the whole model and the loss), through the shared
verdict path: the same tolerances, the same float64 re-check, the same report.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ._options import takes_test_defaults, validate_options
from ._torch.inputs import TensorOrTuple, loss_call_arguments
from ._torch.loss import loss_step_builder
from ._torch.problem import TorchProblem
from .compare import FlatGrads, Pair
from .errors import InvalidArgument
from .report import Finding, GradEquivReport
from .verdict import run_check, verdict_options

__all__ = ["assert_per_sample_gradients"]


@takes_test_defaults("per_sample_gradients")
def assert_per_sample_gradients(
    model: torch.nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    inputs: TensorOrTuple,
    targets: Optional[TensorOrTuple] = None,
    *,
    grads: Optional[Mapping[str, torch.Tensor]] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    rtol_float64: Optional[float] = None,
    atol_float64: Optional[float] = None,
    reference: str = "auto",
    float64_recheck: bool = True,
    chunk_size: Optional[int] = None,
) -> GradEquivReport:
    """Assert that supplied per-sample gradients equal each sample's gradient, run alone.

    ``grads`` maps parameter names (as in ``model.named_parameters()``) to tensors of
    shape ``(B, *param.shape)``: row ``i`` is the gradient of
    ``loss_fn(model(*inputs[i:i+1]), targets[i:i+1])``. Without ``grads``, each
    trainable parameter's ``p.grad_sample`` is read (what opacus's
    ``GradSampleModule`` leaves after a backward pass).

    Each parameter of each sample is compared on its own (rows named
    ``"fc.weight[3]"`` in the report); a mismatch in float32/16 is re-checked
    against a float64 reference before it is called a bug (your gradients keep
    their own dtype's tolerance there). A failure names the parameters, the
    samples and the factor: ``fc.weight: B times the reference (B=8), in all 8
    samples``, or that every row holds the sum over the batch (a grad sampler that
    sums over the batch dimension it must keep). ``chunk_size=n`` computes the
    reference gradients n samples per vmap call (``torch.func.vmap``'s own
    ``chunk_size``), bounding the memory of that call.

    >>> import torch, torch.nn.functional as F
    >>> model = torch.nn.Linear(3, 2)
    >>> x, y = torch.randn(4, 3), torch.randn(4, 2)
    >>> def per_sample(i):
    ...     return torch.autograd.grad(F.mse_loss(model(x[i:i+1]), y[i:i+1]), list(model.parameters()))
    >>> rows = [per_sample(i) for i in range(4)]
    >>> grads = {"weight": torch.stack([r[0] for r in rows]), "bias": torch.stack([r[1] for r in rows])}
    >>> assert_per_sample_gradients(model, F.mse_loss, x, y, grads=grads).passed
    True
    """
    __tracebackhide__ = True
    opts = validate_options(
        {
            "rtol": rtol,
            "atol": atol,
            "rtol_float64": rtol_float64,
            "atol_float64": atol_float64,
            "reference": reference,
            "float64_recheck": float64_recheck,
            "chunk_size": chunk_size,
        }
    )
    inputs_t, targets_t, targets_is_tuple = loss_call_arguments(model, loss_fn, inputs, targets)
    build = loss_step_builder(loss_fn, has_targets=bool(targets_t), targets_is_tuple=targets_is_tuple)
    inner = TorchProblem(
        model,
        build,
        (inputs_t, targets_t),
        reference=opts["reference"],
        chunk_size=opts["chunk_size"],
        watch_broadcast=False,
        extra_modules=[loss_fn] if isinstance(loss_fn, torch.nn.Module) else [],
    )
    supplied = _supplied(model, inner, grads)
    problem = _PerSampleProblem(inner, supplied)
    with inner.prepared():
        return run_check(
            problem,
            reduction="sum",
            **verdict_options(opts),
            check="grad-sample",
        )


def _supplied(
    model: torch.nn.Module, inner: TorchProblem, grads: Optional[Mapping[str, Any]]
) -> dict[str, torch.Tensor]:
    """The user's per-sample gradients, validated: every trainable parameter, shape (B, *shape)."""
    b = inner.batch_size
    params = dict(zip(inner.names, inner.params))
    if grads is None:
        out = {}
        for name, p in params.items():
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                raise InvalidArgument(
                    f"parameter {name!r} has no grad_sample: pass grads={{name: (B, *shape) tensor}}, or run a "
                    "forward and backward pass through the GradSampleModule on this batch first"
                )
            out[name] = gs
        grads = out
    if not isinstance(grads, Mapping):
        raise InvalidArgument(f"grads must be a mapping of parameter names to tensors, got {type(grads).__name__}")
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise InvalidArgument(
            f"grads has entries for {', '.join(map(repr, unknown))}, which are not trainable parameters of the "
            f"model (its names: {', '.join(list(params)[:8])}{', ...' if len(params) > 8 else ''})"
        )
    missing = [n for n in params if n not in grads]
    if missing:
        raise InvalidArgument(
            f"grads has no entry for {', '.join(map(repr, missing[:8]))}: give every trainable parameter its "
            "per-sample gradients, or freeze the others (requires_grad_(False)) for the check"
        )
    checked: dict[str, torch.Tensor] = {}
    for name, p in params.items():
        g = grads[name]
        if not isinstance(g, torch.Tensor):
            raise InvalidArgument(f"grads[{name!r}] is a {type(g).__name__}, not a tensor of shape (B, *shape)")
        want = (b, *p.shape)
        if tuple(g.shape) != want:
            raise InvalidArgument(
                f"grads[{name!r}] has shape {tuple(g.shape)}, expected (B, *param.shape) = {want}: one gradient "
                "per sample, with the parameter's own shape (a grad sampler that sums over a dimension it must "
                "keep, or over the batch, changes the shape)"
            )
        checked[name] = g.detach()
    return checked


def _rows(grads: Mapping[str, Any], names: Sequence[str], b: int, float64: bool) -> FlatGrads:
    """``{"name[i]": row i}`` in one flat float buffer (one host copy per parameter)."""
    dtype = torch.float64 if float64 else None
    arrays: list[np.ndarray] = []
    row_names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    for n in names:
        g = grads[n]
        t = g.detach().to(
            "cpu", dtype if dtype is not None else (g.dtype if g.dtype == torch.float64 else torch.float32)
        )
        arrays.append(t.reshape(-1).numpy())
        row_names.extend(f"{n}[{i}]" for i in range(b))
        shapes.extend([tuple(g.shape[1:])] * b)
    flat = np.concatenate(arrays) if arrays else np.zeros(0)
    return FlatGrads.from_flat(flat, row_names, shapes)


class _PerSampleProblem:
    """Supplied per-sample gradients (the "batch" side) against the tool's, row by row."""

    backend = "torch"
    fixed_batch_precision = True  # the supplied gradients stay in their dtype in the float64 re-check

    def __init__(self, inner: TorchProblem, supplied: dict[str, torch.Tensor]) -> None:
        self.inner = inner
        self.supplied = supplied
        self.batch_size = inner.batch_size
        self.dtype = inner.dtype
        self.device = inner.device
        self.broadcasts: tuple[Any, ...] = ()

    @property
    def reference_method(self) -> str:
        return self.inner.reference_method

    @property
    def fallback_reason(self) -> Optional[str]:
        return self.inner.fallback_reason

    @property
    def chunk_size(self) -> Optional[int]:
        return self.inner.chunk_size

    @property
    def dropout_disabled(self) -> tuple[str, ...]:
        return self.inner.dropout_disabled

    def batch_gradient(self, float64: bool) -> FlatGrads:
        return _rows(self.supplied, self.inner.names, self.batch_size, float64)

    def reference_gradient(self, coeffs: np.ndarray, float64: bool) -> FlatGrads:
        return _rows(self.inner.per_sample_tensors(float64), self.inner.names, self.batch_size, float64)

    def per_sample_gradients(self, float64: bool) -> None:
        return None

    def weight_candidates(self) -> list[tuple[str, np.ndarray]]:
        return []

    def loss_values(self, float64: bool) -> None:
        return None

    def diagnose_mismatch(
        self, g: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray], rtol: float, atol: float, precision: str
    ) -> list[Finding]:
        """Per parameter: which samples differ, and whether by one factor or by the batch sum."""
        pair = Pair(g, ref)
        scale = pair.problem_scale(1.0)
        failing = {p.name for p in pair.compare(1.0, rtol, atol, "sum", precision, scale).params if not p.passed}
        b = self.batch_size
        findings = []
        for name in self.inner.names:
            rows = [f"{name}[{i}]" for i in range(b)]
            bad = [i for i, r in enumerate(rows) if r in failing]
            if not bad:
                continue
            factors = []
            for i in bad:
                rr = pair.r.sq[rows[i]]
                k = pair.dot[rows[i]] / rr if rr > 0 else math.nan
                sub = Pair({rows[i]: pair.b.g[rows[i]]}, {rows[i]: pair.r.g[rows[i]]})
                fits = math.isfinite(k) and k != 0 and sub.compare(k, rtol, atol, "sum", precision, scale).passed
                factors.append(k if fits else math.nan)
            common = factors[0]
            if all(math.isfinite(k) for k in factors) and all(abs(k - common) <= 1e-3 * abs(common) for k in factors):
                findings.append(Finding("grad-sample", label=name, factor=common, counts=tuple(bad)))
                continue
            summed = np.sum([np.asarray(ref[r], dtype=np.float64) for r in rows], axis=0)
            total = {rows[0]: summed}
            mean = {rows[0]: summed / b}
            for label, agg in (("sum", total), ("mean", mean)):
                if all(
                    Pair({rows[0]: g[rows[i]]}, agg).compare(1.0, rtol, atol, "sum", precision, scale).passed
                    for i in bad
                ):
                    findings.append(Finding("grad-sample", label=name, matched=label, counts=tuple(bad)))
                    break
            else:
                findings.append(Finding("grad-sample", label=name, counts=tuple(bad)))
        return findings
