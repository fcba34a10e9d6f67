"""The torch problem: one check on a torch model, as :func:`pytest_gradcheck.verdict.run_check`
drives it (batch gradient, per-sample reference by vmap or loop, per-sample gradients)."""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils import _pytree as pytree

from ..compare import host64
from ..errors import GradEquivError, InvalidArgument, UnsupportedModelError, first_line
from .inputs import NamedModules, batch_size_of
from .loss import (
    GENERATORS,
    StepModule,
    as_scalar_loss,
    default_dtype,
    dtype_name,
    is_randomness_error,
    raise_clear_error,
    run_watching_sample,
    writes_into_input,
)
from .randomness import DropoutOff, NeutralDropout, Watch
from .state import SavedState, disable_dropout_modules, parameters_written_message
from .vmap import vmap_friendly_attention, vmap_friendly_rnn

WeightsArg = Union[None, torch.Tensor, Sequence[float], np.ndarray, Callable[[Any], Any]]


_LOOP_CHUNK = 32


class TorchProblem:
    """One check on a torch model, as :func:`pytest_gradcheck.verdict.run_check` drives it."""

    backend = "torch"

    def __init__(
        self,
        model: torch.nn.Module,
        build_step: Callable[[Optional[list[Any]], bool], Callable[[torch.nn.Module, Any], Any]],
        batch: Any,
        *,
        reference: str = "auto",
        chunk_size: Optional[int] = None,
        watch_broadcast: bool = True,
        allow_non_tensor: bool = False,
        extra_modules: Sequence[torch.nn.Module] = (),
        weight_candidates: Optional[Callable[[], list[tuple[str, np.ndarray]]]] = None,
        broadcast_scope: str = "the loss",
    ) -> None:
        self.model = model
        self.broadcast_scope = broadcast_scope
        self.build_step = build_step
        self.batch = batch
        self._leaves, self._spec = pytree.tree_flatten(batch)
        self.n_samples = batch_size_of(batch, allow_non_tensor, self._leaves)
        self.batch_size = self._unit_count()  # the units the reference runs alone: samples here
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not trainable:
            raise InvalidArgument("the model has no parameter that requires grad: there is no gradient to check")
        self.names = [n for n, _ in trainable]
        self.params = [p for _, p in trainable]
        first = self.params[0]
        self.dtype = dtype_name(first.dtype)
        self.device = str(first.device)
        self.method = reference
        self.reference_method = "loop" if reference == "loop" else "vmap"
        #: samples per chunk of the per-sample reference (None: the whole batch in one vmap call)
        self.chunk_size = chunk_size if chunk_size is not None and chunk_size < self.batch_size else None
        self.fallback_reason: Optional[str] = None
        self._dropout_modules: tuple[str, ...] = ()
        self._neutralised: list[str] = []  # dropout ops neutralised, e.g. "F.dropout(p=0.1)"
        self._saved: Optional[SavedState] = None  # while prepared()
        self._passes = 0
        self._touched: Optional[tuple[str, ...]] = None  # state the model writes in forward, once known
        self._vmap_randomness = "error"
        self._draws: list[Any] = []

        self.random_note: Optional[str] = None
        self.broadcasts: tuple[Any, ...] = ()
        self.watch_broadcast = watch_broadcast
        self.extra_modules = list(extra_modules)
        self._weight_candidates = weight_candidates
        self._copy_inputs = False
        self._modules = list(model.named_modules())  # walked once, for the checks below and dropout
        self._watch_ops = False  # every op watched (random ops named): once a check has failed
        self._off: Optional[DropoutOff] = None
        self.has_rnn = any(isinstance(m, torch.nn.RNNBase) for _, m in self._modules)
        # kept as tensors, read only by a diagnosis (loss_values): no device sync on a passing check
        self._batch_loss: dict[bool, torch.Tensor] = {}
        self._sample_losses: dict[bool, torch.Tensor] = {}
        check_sample_mixing(model, self._modules)

    def _unit_count(self) -> int:
        """How many units the reference runs alone (samples; micro-batches in a subclass)."""
        return self.n_samples

    # -- set-up and tear-down -------------------------------------------------------------
    @contextlib.contextmanager
    def prepared(self) -> Iterator[None]:
        """Dropout off for the check; everything the check could disturb restored after.

        The first run is watched for writes into the parameters (copied just before
        the first write, see :class:`SavedState`); later runs are not, at no cost.
        """
        saved = SavedState(self.model, self.extra_modules)
        self._saved = saved
        self._passes = 0
        self._touched = None
        off = self._off = DropoutOff().__enter__()  # dropout functions neutral for the whole check
        failed = True
        try:
            saved.set_aside_grads()
            saved.set_aside_accumulators()
            self._dropout_modules = disable_dropout_modules(self.model, self._modules)
            yield
            failed = False
        finally:
            off.__exit__(None, None, None)
            self._saved = None
            saved.restore()
        if saved.lost and not failed:
            raise UnsupportedModelError(parameters_written_message(saved.lost))

    def _first_run_watched(self) -> Any:
        """The write watch (see :class:`SavedState`) around the check's first run, nothing after it:
        what a forward writes into, it writes on every run."""
        if self._passes == 1 and self._saved is not None:
            return self._saved.watching_writes()
        return contextlib.nullcontext()

    @property
    def dropout_disabled(self) -> tuple[str, ...]:
        """Dropout modules, and dropout ops applied functionally, that the check switched off."""
        from torch.nn.modules.dropout import _DropoutNd

        # an nn.Dropout module's own F.dropout calls are named by the module's path
        rates = {f"(p={m.p:g})" for _, m in self._modules if isinstance(m, _DropoutNd) and m.training}
        seen = dict.fromkeys([*self._neutralised, *(self._off.neutralised if self._off is not None else ())])
        ops = [x for x in seen if not (x.startswith("F.") and x[x.index("(") :] in rates)]
        if not ops:
            return tuple(self._dropout_modules)
        return (*self._dropout_modules, f"{', '.join(ops)} (applied functionally, neutralised at the op)")

    def _begin_pass(self) -> None:
        """Start a run of the model from the state saved before the check.

        After the first run, the state is inspected once: a model that writes into it
        in forward (a running average, a counter, a metric, a cached tensor) is put back
        before every later run, and before every sample of a loop reference.
        """
        saved = self._saved
        if saved is None:
            return
        self._passes += 1
        if self._touched is None:
            if self._passes == 1:
                return  # the first run starts from the saved state itself
            self._touched = tuple(saved.touched())
        if self._touched:
            saved.reset()

    def _begin_unit(self) -> None:
        """Before each sample (micro-batch) of a loop: the saved state, if the model writes into it."""
        if self._touched and self._saved is not None:
            self._saved.reset()

    # -- inputs -----------------------------------------------------------------------------
    def _batch_leaves(self, float64: bool) -> list[Any]:
        """The batch's leaves as the model sees them, without letting it write into the user's tensors.

        Floating tensors are passed as detached aliases that require grad: an
        in-place write to one raises before it changes any data (the autograd
        leaf rule), and the check then retries with copies (``_copy_inputs``).
        ``autograd.grad`` w.r.t. the parameters does no work for these inputs.
        Other tensors (token ids, masks) are small and are copied.
        """

        def conv(x: Any) -> Any:
            if not isinstance(x, torch.Tensor):
                return x
            y = x.detach()
            if float64 and y.is_floating_point():
                return y.to(torch.float64)
            if y.is_floating_point() and not self._copy_inputs:
                return y.requires_grad_(True)
            return y.clone()

        return [conv(x) for x in self._leaves]

    def _tree(self, leaves: Sequence[Any]) -> Any:
        """``leaves`` (in ``tree_flatten`` order) put back into the batch's structure."""
        return pytree.tree_unflatten(list(leaves), self._spec)

    def _slice(self, leaves: Sequence[Any], start: int, stop: int) -> Any:
        """Samples ``start:stop`` of ``leaves``, in the batch's structure."""
        return self._tree([x[start:stop] if isinstance(x, torch.Tensor) else x for x in leaves])

    def _one(self, leaves: Sequence[Any], i: int) -> Any:
        """Sample ``i`` of ``leaves`` as a batch of one, in the batch's structure (its own copy once the
        model is known to write into its inputs: slices of one tensor share its version counter)."""
        one = self._slice(leaves, i, i + 1)
        if self._copy_inputs:
            one = pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, one)
        return one

    def _loss_of(
        self, state: Optional[dict[str, Any]], step: Callable[..., Any], float64: bool
    ) -> Callable[[int], torch.Tensor]:
        """``i -> the scalar loss of unit i run alone`` (a unit is a sample here, a micro-batch
        in the accumulation check, which overrides this)."""
        leaves = self._batch_leaves(float64)
        return lambda i: as_scalar_loss(self._call(state, self._one(leaves, i), step), where="per-sample")

    def _retrying_with_copies(self, run: Callable[[], Any]) -> Any:
        # The first run is the working-dtype batch run: only a failure there can be the
        # user's inputs against the model's parameters (a later float64 run casts both).
        first = not self.__dict__.get("_has_run", False)
        try:
            with self._first_run_watched():
                out = run()
        except Exception as exc:
            if self._copy_inputs or not writes_into_input(exc):
                raise_clear_error(exc, self._leaves, self.params, self._modules, first)
                raise
        else:
            self._has_run = True
            return out
        self._copy_inputs = True  # the model writes into its inputs: give it copies
        try:
            with self._first_run_watched():
                out = run()
        except Exception as exc:
            raise_clear_error(exc, self._leaves, self.params, self._modules, first)
            raise
        self._has_run = True
        return out

    def sample(self, i: int) -> Any:
        """Sample ``i`` as a batch of one."""
        return self._one(self._leaves, i)

    # -- state: None (the module's own tensors) or a float64 copy -------------------------------
    def _state(self, float64: bool) -> tuple[Optional[dict[str, torch.Tensor]], list[torch.Tensor]]:
        if not float64:
            return None, list(self.params)
        state: dict[str, torch.Tensor] = {}
        trainable = set(self.names)
        by_name: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            t = p.detach().to(torch.float64) if p.is_floating_point() else p.detach()
            if name in trainable:
                t = t.clone().requires_grad_(True)
                by_name[name] = t
            state["model." + name] = t
        for name, buf in self.model.named_buffers():
            state["model." + name] = buf.detach().to(torch.float64) if buf.is_floating_point() else buf
        grads = [by_name[n] for n in self.names]
        return state, grads

    @contextlib.contextmanager
    def _precision(self, float64: bool, internal: bool = True) -> Iterator[None]:
        """Run in ``float64`` (default dtype too) or the working dtype.

        ``internal`` runs (the per-sample reference, the float64 re-check) do not
        repeat torch's own "Using a target size ..." warning: the user saw it once
        from the batch run, and the broadcast guard names the op and line better.
        """
        with warnings.catch_warnings():
            # vmap's "performance drop ... batching rule" notice is about our reference, not the user's code
            warnings.filterwarnings("ignore", message="There is a performance drop", category=UserWarning)
            if internal:
                warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
            with default_dtype(float64), self._neutral_dropout():
                yield

    @contextlib.contextmanager
    def _neutral_dropout(self) -> Iterator[None]:
        """Dropout ops neutralised and random draws recorded (see pytest_gradcheck._torch.randomness).

        On the passing path the dropout functions are swapped for neutral ones
        (:class:`DropoutOff`, no cost per op); once a check fails, every op is watched
        (:class:`NeutralDropout`, a Python call per op) so that random ops are named.
        """
        if not self._watch_ops:
            yield  # DropoutOff is on for the whole check (prepared())
            return
        with NeutralDropout() as nd:
            yield
        self._draws = nd.draws or []
        self._note_neutralised(nd.neutralised)

    def _note_neutralised(self, labels: Sequence[str]) -> None:
        for label in labels:
            if label not in self._neutralised:
                self._neutralised.append(label)

    def _call(self, state: Optional[dict[str, Any]], batch: Any, step: Callable[..., Any]) -> Any:
        if state is None:
            return step(self.model, batch)
        return torch.func.functional_call(StepModule(self.model, step), state, (batch,))

    # -- GradientProblem ------------------------------------------------------------------------
    def batch_gradient(self, float64: bool) -> dict[str, torch.Tensor]:
        self._begin_pass()
        out: dict[str, torch.Tensor] = self._retrying_with_copies(lambda: self._batch_gradient(float64))
        return out

    def confirm_deterministic(self, g: Optional[Mapping[str, torch.Tensor]] = None) -> bool:
        """Before a mismatch is diagnosed (or when vmap meets a random op): is the step random?

        The batch gradient is computed again, twice, with the random ops recorded and the
        global generators watched. If it changes from run to run, the step is random
        (dropout is already neutralised at the ops): a clear error naming the op and the
        user's line, never "samples interact". If it does not, any draws are harmless
        (LayerDrop at rate 0) and vmap may run them. Nothing of this runs on a passing check.

        Returns True when the runs so far were not all from the state before the check (the
        forward writes into it in a way only a comparison by value shows): compare again.
        """
        from ..verdict import compare_gradients, default_tolerances

        self._watch_ops = True  # record the random ops by name from now on
        self._draws = []
        runs = [] if g is None else [g]
        if self._saved is not None:
            # a forward that writes into its state, even its own weights through .data, is not
            # random: from now on every run starts from the state before the check
            written = self._saved.touched()
            lost = self._saved.unrestorable()
            if lost:  # not randomness: parameters changed under the check's feet
                raise UnsupportedModelError(parameters_written_message(lost))
            stale = bool(written) and not self._touched
            if written:
                self._touched = tuple(written)
        else:
            stale = False
        with Watch() as watch:
            while len(runs) < 2 or (g is not None and len(runs) < 3):
                self._begin_pass()
                runs.append(self._retrying_with_copies(lambda: self._batch_gradient(False)))
        draws = list(self._draws)
        rtol, atol = default_tolerances(self.dtype)
        same = all(
            compare_gradients(runs[0], r, rtol=rtol, atol=atol, reduction="mean", precision=self.dtype).passed
            for r in runs[1:]
        )
        names = [str(d) for d in draws] or [GENERATORS.get(m, m) for m in watch.moved]
        what = ", ".join(dict.fromkeys(names))
        if same:
            if draws or watch.moved:
                self._vmap_randomness = "different"
                self.random_note = (
                    f"the step draws random numbers ({what}) that do not change its gradient (repeated "
                    "batch runs agree), so they were left alone."
                )
            return stale
        raise UnsupportedModelError(
            f"the training step is random: it draws random numbers ({what or 'from an unknown source'}) "
            "that change its gradient from one run to the next (batch runs with the same parameters and "
            "batch disagree), so the batch run and the per-sample runs cannot be compared. Dropout is "
            "already switched off at the ops; this is other randomness (noise, random masks, sampled "
            "timesteps). Make the step deterministic for the check: pass the random tensors in as part "
            "of the batch, or draw them from a generator you re-seed for each call."
        )

    def _batch_gradient(self, float64: bool) -> dict[str, torch.Tensor]:
        record: Optional[list[Any]] = [] if (self.watch_broadcast and not float64) else None
        step = self.build_step(record, float64)
        with self._precision(float64, internal=float64 or self.watch_broadcast):
            state, params = self._state(float64)
            batch = self._tree(self._batch_leaves(float64))
            loss = as_scalar_loss(self._call(state, batch, step), where="batch")
            grads = torch.autograd.grad(loss, params, allow_unused=True) if loss.requires_grad else ()
            if all(g is None for g in grads):
                raise InvalidArgument(
                    "the loss does not depend on any parameter that requires grad: is it computed "
                    "under torch.no_grad(), or from detached outputs?"
                )
        self._batch_loss[float64] = loss.detach()
        if record is not None:
            self.broadcasts = tuple(record)
        return self._named(grads, params)

    def reference_gradient(self, coeffs: np.ndarray, float64: bool) -> dict[str, torch.Tensor]:
        self._begin_pass()
        out: dict[str, torch.Tensor] = self._retrying_with_copies(lambda: self._reference_gradient(coeffs, float64))
        return out

    def _reference_gradient(self, coeffs: np.ndarray, float64: bool) -> dict[str, torch.Tensor]:
        step = self.build_step(None, float64)
        with self._precision(float64):
            state, params = self._state(float64)
            leaves = self._batch_leaves(float64)
            ref_dtype = torch.float64 if float64 else self.params[0].dtype
            c = torch.as_tensor(coeffs, dtype=ref_dtype, device=self.params[0].device)
            if self.reference_method == "vmap":
                try:
                    grads = self._reference_vmap(state, params, leaves, step, c)
                except (InvalidArgument, GradEquivError):
                    raise
                except Exception as exc:
                    if writes_into_input(exc) and not self._copy_inputs:
                        raise
                    if is_randomness_error(exc) and self._vmap_randomness == "error":
                        # a random op under vmap: refused if it changes the gradient, else allowed
                        self.confirm_deterministic()
                        return self._reference_gradient(coeffs, float64)
                    if self.method == "vmap":
                        raise InvalidArgument(
                            f"torch.func.vmap could not run the model on single samples: {first_line(exc)}; "
                            "use reference='auto' or 'loop' to fall back to a per-sample loop"
                        ) from exc
                    self._begin_unit()
                    self._check_single_sample_runs(state, step)
                    self.reference_method = "loop"
                    self.fallback_reason = first_line(exc)
                    if self._touched:
                        self.fallback_reason = (
                            f"the model writes into its own state during forward ({', '.join(self._touched[:4])}"
                            f"{', ...' if len(self._touched) > 4 else ''}), which vmap cannot batch; every "
                            f"sample ran alone from the state before the check ({self.fallback_reason})"
                        )
                    grads = self._reference_loop(state, params, leaves, step, c)
            else:
                self._check_single_sample_runs(state, step)
                grads = self._reference_loop(state, params, leaves, step, c)
        return self._named(grads, params)

    def per_sample_gradients(self, float64: bool) -> Optional[dict[str, np.ndarray]]:
        """Each unit's gradient, run alone, as float64 NumPy arrays ``(B, *shape)`` (diagnosis only)."""
        step = self.build_step(None, float64)
        out: dict[str, list[np.ndarray]] = {n: [] for n in self.names}
        self._begin_pass()
        with self._precision(float64):
            state, params = self._state(float64)
            loss_of = self._loss_of(state, step, float64)
            for i in range(self.batch_size):
                self._begin_unit()
                grads = torch.autograd.grad(loss_of(i), params, allow_unused=True)
                for n, g in self._named(grads, params).items():
                    out[n].append(host64(g))
        return {n: np.stack(v) for n, v in out.items()}

    def per_sample_tensors(self, float64: bool = False) -> dict[str, torch.Tensor]:
        """The gradient of each sample's loss, the sample run alone: ``{name: (B, *shape)}``.

        ``torch.func.vmap`` of ``torch.func.grad`` over single-sample calls (B gradients
        in one batched backward), or a loop where vmap cannot run the model. On the
        parameters' device and in the working dtype (float64 if ``float64``).
        """
        step = self.build_step(None, float64)
        self._begin_pass()
        with self._precision(float64), self._first_run_watched():
            state, params = self._state(float64)
            leaves = self._batch_leaves(float64)
            if self.reference_method == "vmap":
                try:
                    return self._per_sample_vmap(state, params, leaves, step)
                except (InvalidArgument, GradEquivError, UnsupportedModelError):
                    raise
                except Exception:  # noqa: BLE001 - the loop below computes the same gradients
                    self._begin_unit()
            loss_of = self._loss_of(state, step, float64)
            rows: list[list[torch.Tensor]] = [[] for _ in params]
            for i in range(self.batch_size):
                self._begin_unit()
                grads = torch.autograd.grad(loss_of(i), params, allow_unused=True)
                for k, (g, p) in enumerate(zip(grads, params)):
                    rows[k].append(torch.zeros_like(p) if g is None else g)
        return {n: torch.stack(r) for n, r in zip(self.names, rows)}

    def _per_sample_vmap(
        self, state: Optional[dict[str, Any]], params: list[torch.Tensor], leaves: list[Any], step: Callable[..., Any]
    ) -> dict[str, torch.Tensor]:
        in_dims = tuple(0 if isinstance(x, torch.Tensor) else None for x in leaves)
        shaped = [x.unsqueeze(1) if isinstance(x, torch.Tensor) else x for x in leaves]
        base = dict(state) if state is not None else {}
        keys = ["model." + n for n in self.names]
        wrapper = StepModule(self.model, step)

        def one(values: tuple[torch.Tensor, ...], *sample: Any) -> torch.Tensor:
            full = {**base, **dict(zip(keys, values))}
            out = torch.func.functional_call(wrapper, full, (self._tree(sample),))
            return as_scalar_loss(out, where="per-sample")

        detached = tuple(p.detach() for p in params)
        with vmap_friendly_attention(self.params[0].device), vmap_friendly_rnn(self.has_rnn):
            grads = torch.func.vmap(
                torch.func.grad(one),
                in_dims=(None, *in_dims),
                randomness=self._vmap_randomness,
                chunk_size=self.chunk_size,
            )(detached, *shaped)
        return dict(zip(self.names, grads))

    def float64_shortfall(self) -> Optional[str]:
        """Why the float64 re-check would not fit in memory, or None (then it runs).

        It holds float64 copies of the parameters and of both gradients (3 x 8 bytes per
        parameter) besides its own activations; on the CPU an allocation beyond the
        machine's memory may be answered by the OOM killer rather than an exception, so
        the estimate is checked first against what the device has free.
        """
        need = 3 * 8 * sum(p.numel() for p in self.params)
        free = _free_bytes(self.params[0].device)
        if free is None or need <= free:
            return None
        gib = 1024.0**3
        return (
            f"not enough memory: it needs float64 copies of the parameters and of both gradients, about "
            f"{need / gib:.1f} GiB, and {self.device} has {free / gib:.1f} GiB free"
        )

    def run_notes(self, passed: bool) -> list[str]:
        """Notes on the runs for the report (harmless random draws left alone)."""
        return [self.random_note] if self.random_note else []

    def weight_candidates(self) -> list[tuple[str, np.ndarray]]:
        return self._weight_candidates() if self._weight_candidates else []

    def loss_values(self, float64: bool) -> Optional[tuple[float, np.ndarray]]:
        if float64 in self._batch_loss and float64 in self._sample_losses:
            losses = self._sample_losses[float64].to("cpu", torch.float64).numpy()
            return float(self._batch_loss[float64]), losses
        return None

    def _keep_losses(self, losses: torch.Tensor) -> None:
        self._sample_losses[losses.dtype == torch.float64] = losses.detach()

    # -- reference computations ------------------------------------------------------------------
    def _reference_vmap(
        self,
        state: Optional[dict[str, Any]],
        params: list[torch.Tensor],
        leaves: list[Any],
        step: Callable[..., Any],
        c: torch.Tensor,
    ) -> Sequence[Optional[torch.Tensor]]:
        # Each tensor is viewed as (B, 1, ...) before vmap, so every sample arrives as a batch
        # of one without a batched unsqueeze per input (every op under vmap has a cost).
        in_dims: Any = tuple(0 if isinstance(x, torch.Tensor) else None for x in leaves)
        if all(d == 0 for d in in_dims):
            in_dims = 0  # vmap broadcasts a plain 0 to the leaves faster than it matches a tuple
        shaped = [x.unsqueeze(1) if isinstance(x, torch.Tensor) else x for x in leaves]

        def one(*sample: Any) -> torch.Tensor:  # flat positional leaves: vmap's cheapest calling form
            return as_scalar_loss(self._call(state, self._tree(sample), step), where="per-sample")

        chunk = self.chunk_size or self.batch_size
        acc: list[Optional[torch.Tensor]] = [None] * len(params)
        values: list[torch.Tensor] = []
        with vmap_friendly_attention(self.params[0].device), vmap_friendly_rnn(self.has_rnn):
            for start in range(0, self.batch_size, chunk):
                stop = min(self.batch_size, start + chunk)
                part = shaped if chunk == self.batch_size else [self._rows(x, start, stop) for x in shaped]
                losses = torch.func.vmap(one, in_dims=in_dims, randomness=self._vmap_randomness)(*part)
                values.append(losses.detach())
                weights = c[start:stop]
                total = torch.dot(losses, weights if weights.dtype == losses.dtype else weights.to(losses.dtype))
                grads = torch.autograd.grad(total, params, allow_unused=True)
                del losses, total  # this chunk's graph is freed before the next chunk runs
                acc = _accumulate(acc, grads)
        self._keep_losses(values[0] if len(values) == 1 else torch.cat(values))
        return acc

    def _reference_loop(
        self,
        state: Optional[dict[str, Any]],
        params: list[torch.Tensor],
        leaves: list[Any],
        step: Callable[..., Any],
        c: torch.Tensor,
    ) -> Sequence[Optional[torch.Tensor]]:
        acc: list[Optional[torch.Tensor]] = [None] * len(params)
        values: list[torch.Tensor] = []
        # a model that writes into its state runs every sample from the saved state, one
        # backward each (resetting a tensor that a pending graph saved would break it)
        chunk = 1 if self._touched else (self.chunk_size or _LOOP_CHUNK)
        for start in range(0, self.batch_size, chunk):
            total: Optional[torch.Tensor] = None
            for i in range(start, min(self.batch_size, start + chunk)):
                self._begin_unit()
                loss_i = as_scalar_loss(self._call(state, self._one(leaves, i), step), where="per-sample")
                values.append(loss_i.detach())
                term = loss_i * c[i]
                total = term if total is None else total + term
            if total is None:
                continue
            acc = _accumulate(acc, torch.autograd.grad(total, params, allow_unused=True))
        if values:
            self._keep_losses(torch.stack(values))
        return acc

    @staticmethod
    def _rows(x: Any, start: int, stop: int) -> Any:
        return x[start:stop] if isinstance(x, torch.Tensor) else x

    def _check_single_sample_runs(self, state: Optional[dict[str, Any]], step: Callable[..., Any]) -> None:
        one = self._one(self._batch_leaves(state is not None), 0)
        try:
            as_scalar_loss(run_watching_sample(lambda: self._call(state, one, step), one), where="per-sample")
        except (InvalidArgument, GradEquivError):
            raise
        except Exception as exc:
            if writes_into_input(exc) and not self._copy_inputs:
                raise
            raise InvalidArgument(
                "the model cannot run on a single sample (a batch of one), which the per-sample "
                f"reference needs: {type(exc).__name__}: {first_line(exc)}. A model that squeezes "
                "the batch dimension away, or needs several samples (BatchNorm in train mode), "
                "cannot be checked per sample."
            ) from exc

    def _named(
        self, grads: Sequence[Optional[torch.Tensor]], params: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """The gradients by parameter name, as autograd returned them: on the parameters' device, in
        their dtype, no copy (a parameter the loss does not reach has a zero gradient)."""
        out = {}
        for n, g, p in zip(self.names, grads, params):
            if g is None:
                g = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif g.layout != torch.strided:  # raise_clear_error names the module and the fix
                raise RuntimeError(f"the gradient of {n} is sparse (layout {g.layout})")
            out[n] = g.detach()
        return out


def _free_bytes(device: torch.device) -> Optional[int]:
    """Memory free for new tensors on ``device`` (None where it cannot be read)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def _accumulate(
    acc: list[Optional[torch.Tensor]], grads: Sequence[Optional[torch.Tensor]]
) -> list[Optional[torch.Tensor]]:
    """``acc + grads`` per parameter (None: nothing yet), in place where ``acc`` holds autograd's own
    buffer: a chunk's gradients are added and dropped, no third copy of the gradient is kept. The
    vmap reference's chunks and the loop reference's share it."""
    out = []
    for a, g in zip(acc, grads):
        if g is None:
            out.append(a)
        elif a is None:
            out.append(g)
        elif a.is_contiguous() and a._base is None:  # autograd's own buffer: add into it
            out.append(a.add_(g))
        else:  # an expanded or strided view autograd returned: not writable in place
            out.append(a + g)
    return out


def check_sample_mixing(model: torch.nn.Module, modules: Optional[NamedModules] = None) -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    for name, module in model.named_modules() if modules is None else modules:
        if isinstance(module, _BatchNorm):
            uses_batch_stats = module.training or module.running_mean is None
            if uses_batch_stats:
                path = "model" + (f".{name}" if name else "")
                why = "is in train mode" if module.training else "has no running statistics"
                raise UnsupportedModelError(
                    f"{path} ({type(module).__name__}) {why}: BatchNorm normalises each sample with "
                    "the mean and variance of the whole batch, so one sample's gradient depends on "
                    "the other samples and per-sample gradients do not exist. Check the model in "
                    "eval mode (model.eval(); the check switches dropout off by itself), or use "
                    "GroupNorm/LayerNorm, which normalise each sample alone."
                )
