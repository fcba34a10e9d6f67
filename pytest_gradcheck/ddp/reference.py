"""The single-process side: the model built in this process and the gradients the verdict needs.

:class:`Reference` computes the full-batch gradient (what a data-parallel step
must reproduce), the weighted accumulation of per-sample gradients when weights
are declared (each sample run alone, as :func:`~pytest_gradcheck.assert_gradequiv`
does), and, for the diagnosis, the gradient of any subset of the batch alone
(one rank's micro-batch), each in the working dtype or in float64.
"""

from __future__ import annotations

import copy
import io
import math
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from .._torch.loss import default_dtype
from .._torch.state import disable_dropout_modules
from ..errors import InvalidArgument
from .config import Workload
from .step import LossCall, build_model, convert, seeded, state_hash, take, trainable

if TYPE_CHECKING:  # pragma: no cover
    from .._torch.problem import TorchProblem

__all__ = ["Reference", "batchnorm_modules"]


def batchnorm_modules(model: torch.nn.Module) -> list[tuple[str, str]]:
    """``(path, class name)`` of the BatchNorm modules that normalise with batch statistics
    (in train mode, or without running statistics; SyncBatchNorm excepted)."""
    from torch.nn.modules.batchnorm import _BatchNorm

    out = []
    for name, module in model.named_modules():
        if isinstance(module, _BatchNorm) and not isinstance(module, torch.nn.SyncBatchNorm):
            if module.training or module.running_mean is None:
                out.append((f"model{'.' + name if name else ''}", type(module).__name__))
    return out


def _host64(x: object) -> np.ndarray:
    """A gradient as a float64 NumPy array, whichever form the per-sample problem returns."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy().copy()
    return np.array(x, dtype=np.float64)


class Reference:
    """The model built here (``torch.manual_seed(0); make_model()``, dropout off) and its gradients."""

    def __init__(self, work: Workload) -> None:
        self.work = work
        with seeded():
            self.model = build_model(work.make_model, "in the parent process")
        self.dropout = tuple(disable_dropout_modules(self.model))
        self.batchnorms = batchnorm_modules(self.model)
        self.names = [n for n, _ in trainable(self.model)]
        first = trainable(self.model)[0][1]
        self.dtype = str(first.dtype).replace("torch.", "")
        self.device = first.device
        self.hash = state_hash(self.model)
        self.from_rank0 = False  # whose initial parameters: this process's, or rank 0's
        self._models: dict[bool, torch.nn.Module] = {False: self.model}
        self._steps: dict[bool, LossCall] = {}
        self._full: dict[bool, dict[str, np.ndarray]] = {}
        self._local: dict[tuple[bool, bytes], dict[str, np.ndarray]] = {}
        self._weighted: dict[tuple[bool, bytes], dict[str, np.ndarray]] = {}
        self._per_sample: Optional[TorchProblem] = None

    def adopt(self, state: bytes) -> None:
        """Start from rank 0's initial parameters (DDP broadcast them to every rank)."""
        loaded = torch.load(io.BytesIO(state), map_location=self.device, weights_only=True)
        self.model.load_state_dict(loaded)
        self.from_rank0 = True
        self._models = {False: self.model}
        self._full.clear()
        self._local.clear()
        self._weighted.clear()

    def _model(self, float64: bool) -> torch.nn.Module:
        if float64 not in self._models:
            self._models[float64] = copy.deepcopy(self.model).to(torch.float64)
        return self._models[float64]

    def _step(self, float64: bool) -> LossCall:
        if float64 not in self._steps:
            self._steps[float64] = self.work.step.build(float64)
        return self._steps[float64]

    def _grad(self, idx: np.ndarray | None, float64: bool) -> dict[str, np.ndarray]:
        model = self._model(float64)
        batch = self.work.batch if idx is None else take(self.work.batch, idx)
        saved = {n: b.detach().clone() for n, b in model.named_buffers()}
        params = [p for _, p in trainable(model)]
        with default_dtype(float64), seeded():
            loss = self._step(float64)(model, convert(batch, float64, self.device), "batch")
            if not loss.requires_grad:
                raise InvalidArgument(
                    "the loss does not depend on any parameter that requires grad (it has no grad_fn): "
                    "is it computed under torch.no_grad(), or from detached outputs?"
                )
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
        return {
            n: (np.zeros(tuple(p.shape)) if g is None else g.detach().to("cpu", torch.float64).numpy())
            for n, g, p in zip(self.names, grads, params)
        }

    def gradient(self, float64: bool) -> dict[str, np.ndarray]:
        """The full-batch gradient, as is."""
        if float64 not in self._full:
            self._full[float64] = self._grad(None, float64)
        return self._full[float64]

    def local(self, idx: np.ndarray, float64: bool) -> dict[str, np.ndarray]:
        """The gradient of the loss on the samples ``idx`` alone (one rank's micro-batch)."""
        key = (float64, np.asarray(idx, dtype=np.int64).tobytes())
        if key not in self._local:
            self._local[key] = self._grad(idx, float64)
        return self._local[key]

    def weighted(self, coeffs: np.ndarray, float64: bool) -> dict[str, np.ndarray]:
        """``sum_i coeffs[i] * grad(loss of sample i alone)``: the reference of a check with declared
        weights, each sample run alone (``torch.func.vmap``, or a loop where vmap cannot run the model)."""
        c = np.asarray(coeffs, dtype=np.float64)
        key = (float64, c.tobytes())
        if key not in self._weighted:
            problem = self.per_sample_problem()
            with problem.prepared(), seeded():
                g = problem.reference_gradient(c, float64)
            self._weighted[key] = {n: _host64(g[n]) for n in self.names}
        return self._weighted[key]

    def per_sample_problem(self) -> TorchProblem:
        """The package's per-sample problem on this model and batch (built once)."""
        if self._per_sample is None:
            from .._torch.problem import TorchProblem

            self._per_sample = TorchProblem(
                self.model,
                self.work.step.builder(),
                self.work.batch,
                watch_broadcast=False,
                allow_non_tensor=self.work.step.step_fn is not None,
            )
        return self._per_sample

    def infer_reduction(self) -> str:
        """``"mean"`` if doubling the batch leaves the loss unchanged, ``"sum"`` if it doubles it."""
        idx = np.arange(self.work.batch_size)
        values = []
        for sel in (idx, np.concatenate([idx, idx])):
            with torch.no_grad(), seeded():
                batch = convert(take(self.work.batch, sel), False, self.device)
                values.append(float(self._step(False)(self.model, batch, "reduction probe")))
        one, two = values
        if math.isclose(two, one, rel_tol=1e-3, abs_tol=1e-12):
            return "mean"
        if math.isclose(two, 2 * one, rel_tol=1e-3, abs_tol=1e-12):
            return "sum"
        raise InvalidArgument(
            f"reduction='auto' could not tell how the loss reduces over the batch (loss {one:.6g} on the "
            f"batch, {two:.6g} on the batch twice over); pass reduction='mean' or 'sum'"
        )
