"""Batch independence: no output of sample ``i`` depends on the input of another sample.

This is Karpathy's "backprop to the input" test, made exact and explained:

1. **gradient** (floating inputs): for each checked sample ``i``, one backward of
   ``<v, out[i]>`` with a random cotangent ``v`` gives ``d out[i] / d inputs``;
   every row ``j != i`` of that gradient must be *exactly* zero. Where the graph
   has no path from ``inputs[j]`` to ``out[i]`` autograd gives exact zeros, so
   the test has no rounding to tolerate.
2. **perturbation** (every input, and the only evidence for integer token ids
   and boolean masks, which have no gradient): the other samples' inputs are
   replaced with values drawn at random from the same tensor (valid token ids
   stay valid ids) and ``out[i]`` must not change. It also catches paths that
   carry no gradient, such as a padding mask computed along the batch axis.
3. **batch of one**: ``out[i]`` in the batch must equal ``out[i]`` with the
   sample run alone, within the tolerance of the dtype (a mismatch is re-run in
   float64 before it is called a bug).

The gradient test is exact: no rounding, no chance. The perturbation test is
seeded (``seed``) and deterministic, but a dependence that shows only for
special values of the other samples (say, only when all of them are padding)
can escape it; the batch-of-one comparison is the second net for those. A model
whose output changes between two identical runs (random numbers outside
``nn.Dropout``) is refused rather than reported as leaking.

A leak names the pairs ("output of sample 0 depends on input of sample 2") and
the likely cause. Importing this module imports torch.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch.utils import _pytree as pytree

from ._options import check_batch_sizes, check_tolerance, takes_test_defaults
from ._torch.inputs import check_model
from ._torch.problem import check_sample_mixing
from ._torch.randomness import NeutralDropout
from ._torch.state import SavedState, disable_dropout_modules
from ._tracking import record as record_check
from .compare import default_tolerances
from .errors import BatchLeakError, GradEquivError, InvalidArgument, UnsupportedModelError, first_line
from .report.independence import (
    CAUSE_BATCH_SIZE,
    CAUSE_MASK,
    CAUSE_POOL,
    CAUSE_VIEW,
    AloneMismatch,
    BatchIndependenceReport,
    Leak,
)

__all__ = [
    "assert_batch_independent",
    "BatchLeakError",
    "BatchIndependenceReport",
    "Leak",
    "AloneMismatch",
]

TensorOrTuple = Union[torch.Tensor, Sequence[torch.Tensor]]

#: Forward passes the failure path may spend on naming the pairs behind a leak
#: that only the perturbation test saw (one forward per candidate pair).
_PAIR_SEARCH_BUDGET = 256
_MAX_PAIR_LINES = 20

_PERTURBED = "a perturbed batch (other samples' inputs replaced by values drawn from the same tensors)"


# --------------------------------------------------------------------------- report objects


# --------------------------------------------------------------------------- public API


@takes_test_defaults("independent")
def assert_batch_independent(
    model: torch.nn.Module,
    inputs: TensorOrTuple,
    *,
    samples: Optional[Iterable[int]] = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    max_samples: int = 16,
    seed: int = 0,
) -> BatchIndependenceReport:
    """Assert that no output of sample ``i`` depends on the input of another sample.

    ``model(*inputs)`` is run on ``inputs`` (a tensor or a tuple of tensors, the
    batch on dim 0); its output (a tensor, or tuples/dicts of tensors) must
    carry the batch on dim 0 too. For every checked sample ``i``:

    - floating inputs: the gradient of ``out[i]`` (with a random cotangent) with
      respect to each floating input must be exactly zero in every row ``j != i``;
    - every input (token ids and masks included): replacing the other samples'
      inputs with random values drawn from the same tensor must leave ``out[i]``
      unchanged (within ``rtol``/``atol``);
    - ``out[i]`` must equal the output of sample ``i`` run alone (a batch of one),
      within ``rtol``/``atol``; a difference in float32 is re-run in float64
      and ignored when it vanishes there (rounding).

    Every sample is checked when the batch has at most ``max_samples`` samples;
    otherwise ``max_samples`` outputs drawn at random with ``seed`` (the global
    RNG is not used), each against *all* other samples' inputs. ``samples``
    names the outputs to check instead. The default tolerance is the one of
    the gradient checks (``rtol=1e-4`` in float32, ``1e-7`` in float64), normwise
    over each sample's output. Dropout is switched off during the check; the
    model's parameters, ``.grad``, buffers, modes and the RNG are left as found.

    Returns a :class:`BatchIndependenceReport`; raises :class:`BatchLeakError`
    (a :class:`~pytest_gradcheck.errors.GradEquivError`) naming the leaking pairs,
    :class:`~pytest_gradcheck.errors.UnsupportedModelError` for BatchNorm in
    train mode and :class:`~pytest_gradcheck.errors.InvalidArgument` on bad input.

    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.GELU())
    >>> assert_batch_independent(model, torch.randn(6, 4)).passed
    True
    >>> class Leaky(torch.nn.Module):
    ...     def forward(self, x):  # centres over the batch: every sample sees the others
    ...         return x - x.mean(dim=0)
    >>> try:
    ...     assert_batch_independent(Leaky(), torch.randn(3, 2))
    ... except BatchLeakError as err:
    ...     print(err.report.pairs[:2])
    ((0, 1), (0, 2))
    """
    __tracebackhide__ = True
    check_model(model)
    rtol_v = check_tolerance(rtol, "rtol")
    atol_v = check_tolerance(atol, "atol")
    if isinstance(max_samples, bool) or not isinstance(max_samples, int) or max_samples < 1:
        raise InvalidArgument(f"max_samples={max_samples!r}: expected an int >= 1 (how many outputs to check)")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InvalidArgument(f"seed={seed!r}: expected an int")
    is_tuple = isinstance(inputs, (tuple, list))
    xs = _as_inputs(inputs)
    names = tuple(f"inputs[{k}]" if is_tuple else "inputs" for k in range(len(xs)))
    b = _common_batch_size(xs, names)
    check_sample_mixing(model)
    checked, subset = _choose_samples(samples, b, max_samples, seed)

    saved = SavedState(model, ())
    try:
        saved.set_aside_grads()
        dropout = disable_dropout_modules(model)
        checker = _Checker(model, xs, names, checked, seed, rtol_v, atol_v)
        # dropout applied functionally (attention dropout_p, F.dropout with a rate read from
        # a module or a float attribute) is switched off at the op
        with saved.watching_writes(), NeutralDropout() as neutral:
            report = checker.run()
        report.subset = subset
        functional = tuple(f"{op} (applied functionally, neutralised at the op)" for op in neutral.neutralised)
        report.dropout_disabled = tuple(dropout) + functional
    finally:
        saved.restore()
    record_check(report)
    if not report.passed:
        raise BatchLeakError(report)
    return report


# --------------------------------------------------------------------------- validation


def _as_inputs(inputs: Any) -> tuple[torch.Tensor, ...]:
    items = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not items:
        raise InvalidArgument("inputs is empty: pass a tensor or a tuple of tensors with the batch on dim 0")
    for k, t in enumerate(items):
        label = f"inputs[{k}]" if isinstance(inputs, (tuple, list)) else "inputs"
        if not isinstance(t, torch.Tensor):
            raise InvalidArgument(
                f"{label} is a {type(t).__name__}, not a tensor: every entry of inputs must be a tensor "
                "with the batch on dim 0 (wrap other arguments in the model, e.g. with a lambda module)"
            )
        if t.dim() == 0:
            raise InvalidArgument(f"{label} is a 0-d tensor: every input needs the batch on dim 0")
    return items


def _common_batch_size(xs: Sequence[torch.Tensor], names: Sequence[str]) -> int:
    return check_batch_sizes([(f"{name} (shape {tuple(t.shape)})", int(t.shape[0])) for t, name in zip(xs, names)])


def _choose_samples(
    samples: Optional[Iterable[int]], b: int, max_samples: int, seed: int
) -> tuple[tuple[int, ...], bool]:
    if samples is not None:
        if isinstance(samples, (int, torch.Tensor)) and not isinstance(samples, bool):
            samples = [int(samples)] if isinstance(samples, int) else [int(s) for s in samples.reshape(-1)]
        chosen = []
        for s in samples:
            if isinstance(s, bool) or not isinstance(s, int):
                raise InvalidArgument(f"samples must be sample indices (ints), got {s!r}")
            if not -b <= s < b:
                raise InvalidArgument(f"samples contains {s}, outside the batch of {b} samples (0..{b - 1})")
            chosen.append(s % b)
        if not chosen:
            raise InvalidArgument("samples is empty: name at least one sample to check")
        return tuple(sorted(set(chosen))), False
    if b <= max_samples:
        return tuple(range(b)), False
    gen = torch.Generator().manual_seed(seed)
    picked = torch.randperm(b, generator=gen)[:max_samples]
    return tuple(sorted(int(i) for i in picked)), True


# --------------------------------------------------------------------------- the check


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _Checker:
    def __init__(
        self,
        model: torch.nn.Module,
        xs: tuple[torch.Tensor, ...],
        names: tuple[str, ...],
        checked: tuple[int, ...],
        seed: int,
        rtol: Optional[float],
        atol: Optional[float],
    ) -> None:
        self.model = model
        self.xs = tuple(x.detach() for x in xs)
        self.names = names
        self.checked = checked
        self.seed = seed
        self.b = int(xs[0].shape[0])
        self.gen = torch.Generator().manual_seed(seed)
        self.user_rtol, self.user_atol = rtol, atol
        ref_dtype = next((x.dtype for x in xs if x.is_floating_point()), None)
        if ref_dtype is None:
            ref_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        self.dtype = _dtype_name(ref_dtype)
        self.device = str(xs[0].device)
        self.rtol, self.atol = default_tolerances(self.dtype, rtol, atol)
        self.notes: list[str] = []
        self.out_names: list[str] = []
        self.not_own: list[int] = []
        self._incomplete = False

    # -- running the model ------------------------------------------------------------------
    def _forward(
        self,
        xs: Sequence[torch.Tensor],
        *,
        grad: bool = False,
        model: Optional[torch.nn.Module] = None,
        where: str = "the batch",
    ) -> Any:
        m = self.model if model is None else model
        try:
            with torch.set_grad_enabled(grad):
                return m(*xs)
        except (InvalidArgument, GradEquivError):
            raise
        except Exception as exc:
            raise InvalidArgument(f"the model raised {type(exc).__name__} on {where}: {first_line(exc)}") from exc

    def _leaves(self, out: Any, b: int, *, first: bool = False) -> list[torch.Tensor]:
        """The output tensors that carry the batch on dim 0, in a fixed order."""
        leaves, _ = pytree.tree_flatten(out)
        picked: list[torch.Tensor] = []
        names: list[str] = []
        skipped: list[str] = []
        for n, leaf in enumerate(leaves):
            label = "output" if len(leaves) == 1 else f"output leaf {n}"
            if not isinstance(leaf, torch.Tensor):
                continue
            if leaf.dim() >= 1 and int(leaf.shape[0]) == b:
                picked.append(leaf)
                names.append(label)
            else:
                skipped.append(f"{label} (shape {tuple(leaf.shape)})")
        if first:
            if not picked:
                raise InvalidArgument(
                    f"the model's output has no tensor with the batch ({self.b} samples) on dim 0 "
                    f"(got {', '.join(skipped) or type(out).__name__}): return per-sample outputs, "
                    "batch first"
                )
            if skipped:
                self.notes.append("output tensors without the batch on dim 0 were not compared: " + ", ".join(skipped))
            self.out_names = names
        return picked

    def _fresh(self) -> list[torch.Tensor]:
        return [x.clone() for x in self.xs]

    def _perturbed(self, rows: Sequence[int], which: Optional[Sequence[int]] = None) -> list[torch.Tensor]:
        """The inputs with ``rows`` replaced by values drawn from the same tensor."""
        out = self._fresh()
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        for k, x in enumerate(self.xs):
            if which is not None and k not in which:
                continue
            pool = x.reshape(-1)
            draw = torch.randint(0, pool.numel(), (len(rows), *x.shape[1:]), generator=self.gen)
            out[k][idx.to(x.device)] = pool[draw.to(x.device)]
        return out

    def _compare(self, a: torch.Tensor, b: torch.Tensor, rtol: float, atol: float) -> tuple[float, float, float]:
        """``(max abs err, rel err, allowed)``, normwise over one sample's output."""
        if a.is_floating_point() or a.is_complex():
            a64, b64 = (
                a.detach().to(torch.complex128 if a.is_complex() else torch.float64),
                b.detach().to(torch.complex128 if b.is_complex() else torch.float64),
            )
        else:
            a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
            rtol, atol = 0.0, 0.0
        if a64.numel() == 0:
            return 0.0, 0.0, atol
        diff = float((a64 - b64).abs().max())
        scale = float(torch.maximum(a64.abs().max(), b64.abs().max()))
        both_nan = bool(torch.equal(torch.isnan(a64), torch.isnan(b64)))
        if math.isnan(diff) and both_nan:
            finite = ~torch.isnan(a64)
            diff = float((a64[finite] - b64[finite]).abs().max()) if bool(finite.any()) else 0.0
        allowed = atol + rtol * scale
        rel = diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
        return diff, rel, allowed

    def _differs(self, base: Sequence[torch.Tensor], other: Sequence[torch.Tensor], i: int) -> tuple[bool, float]:
        worst = 0.0
        for a, b in zip(base, other):
            if a[i].shape != b[i].shape:
                return True, math.inf
            diff, rel, allowed = self._compare(a[i], b[i], self.rtol, self.atol)
            if not diff <= allowed:
                return True, rel
            worst = max(worst, rel)
        return False, worst

    # -- the three tests --------------------------------------------------------------------
    def run(self) -> BatchIndependenceReport:
        base = self._leaves(self._forward(self._fresh()), self.b, first=True)
        self._check_finite(base)
        self._check_deterministic(base)
        methods: list[tuple[str, str]] = []
        leaks: list[Leak] = []
        float_idx = [k for k, x in enumerate(self.xs) if x.is_floating_point()]
        if float_idx:
            grad_leaks, used = self._gradient_test(float_idx)
            leaks.extend(grad_leaks)
            methods.extend((self.names[k], "gradient") for k in used)
        pert_leaks, pert_methods = self._perturbation_test(base, {lk.output_sample for lk in leaks})
        leaks.extend(pert_leaks)
        methods.extend(pert_methods)
        alone, rounding, alone_ok = self._alone_test(base)
        leaks.sort(key=lambda lk: (lk.output_sample, lk.input_sample, lk.input, lk.evidence))
        not_own = tuple(self.not_own)
        causes = _classify(
            leaks,
            alone,
            self.b,
            float_names={self.names[k] for k in float_idx},
            mask_names={self.names[k] for k, x in enumerate(self.xs) if x.dtype == torch.bool},
            not_own=not_own,
        )
        return BatchIndependenceReport(
            passed=not leaks and not alone,
            batch_size=self.b,
            dtype=self.dtype,
            device=self.device,
            checked=self.checked,
            subset=False,
            seed=self.seed,
            methods=tuple(methods),
            rtol=self.rtol,
            atol=self.atol,
            leaks=tuple(leaks),
            alone=tuple(alone),
            alone_checked=alone_ok,
            causes=causes,
            not_own=not_own,
            incomplete_pairs=self._incomplete,
            rounding=rounding,
            notes=self.notes,
        )

    def _check_finite(self, base: Sequence[torch.Tensor]) -> None:
        bad: set[int] = set()
        for leaf in base:
            if leaf.is_floating_point() or leaf.is_complex():
                rows = ~torch.isfinite(leaf.detach()).reshape(self.b, -1).all(dim=1)
                bad.update(int(i) for i in torch.nonzero(rows).reshape(-1))
        if bad:
            shown = sorted(bad)[:8]
            raise InvalidArgument(
                f"the model's output is NaN or inf for sample(s) {shown}{' ...' if len(bad) > 8 else ''}: "
                "non-finite outputs make every comparison meaningless (NaN * 0 is NaN in the backward "
                "pass). Check the inputs (e.g. a sequence that is all padding masks every key)."
            )

    def _check_deterministic(self, base: Sequence[torch.Tensor]) -> None:
        again = self._leaves(self._forward(self._fresh(), where="the batch, run a second time"), self.b)
        changed = len(again) != len(base) or any(self._differs(base, again, i)[0] for i in range(self.b))
        if changed:
            raise UnsupportedModelError(
                "the model gives a different output when run twice on the same batch: it draws "
                "random numbers other than dropout (which the check switches off at the ops), e.g. "
                "torch.randn_like noise, or keeps state between calls, so a changed output cannot be "
                "told from a leak. Make the forward deterministic for the check: pass the noise in as "
                "an input, or put the module in eval mode."
            )

    def _gradient_test(self, float_idx: list[int]) -> tuple[list[Leak], list[int]]:
        xs = self._fresh()
        for k in float_idx:
            xs[k] = xs[k].requires_grad_(True)
        outs = [o for o in self._leaves(self._forward(xs, grad=True), self.b) if o.requires_grad]
        targets = [xs[k] for k in float_idx]
        if not outs:
            self.notes.append(
                "the output does not depend on the floating inputs through autograd (no grad_fn): "
                "only the perturbation and batch-of-one tests ran"
            )
            return [], []
        used: set[int] = set()
        leaks: list[Leak] = []
        for i in self.checked:
            own_any = False
            others_any = False
            cots = []
            for o in outs:
                c = torch.zeros_like(o)
                noise = torch.randn(o[i].shape, generator=self.gen, dtype=torch.float64)
                c[i] = (
                    noise.to(device=o.device, dtype=o.dtype) if not o.is_complex() else noise.to(o.device).to(o.dtype)
                )
                cots.append(c)
            grads = torch.autograd.grad(outs, targets, grad_outputs=cots, retain_graph=True, allow_unused=True)
            for k, g in zip(float_idx, grads):
                if g is None:
                    continue
                used.add(k)
                rows = g.detach().reshape(self.b, -1)
                nonzero = rows.ne(0).any(dim=1)
                if not bool(nonzero.any()):
                    continue
                norms = rows.to(torch.float64).norm(dim=1)
                own = float(norms[i])
                own_any = own_any or bool(nonzero[i])
                others_any = others_any or bool(nonzero.sum() > int(nonzero[i]))
                for j in torch.nonzero(nonzero).reshape(-1).tolist():
                    if j == i:
                        continue
                    strength = float(norms[j]) / own if own > 0 else math.inf
                    leaks.append(Leak(i, j, self.names[k], "gradient", strength))
            if others_any and not own_any:
                self.not_own.append(i)
        if not used:
            self.notes.append("no output depends on the floating inputs through autograd")
        return leaks, sorted(used)

    def _perturbation_test(
        self, base: Sequence[torch.Tensor], explained: set[int]
    ) -> tuple[list[Leak], list[tuple[str, str]]]:
        movable = []
        for k, x in enumerate(self.xs):
            if x.numel() and bool((x.reshape(-1) != x.reshape(-1)[0]).any()):
                movable.append(k)
            else:
                self.notes.append(f"{self.names[k]} holds a single value: it could not be perturbed")
        if not movable:
            return [], []
        methods = [(self.names[k], "perturbation") for k in movable]
        flagged: list[int] = []
        for i in self.checked:
            others = [j for j in range(self.b) if j != i]
            out = self._leaves(self._forward(self._perturbed(others, movable), where=_PERTURBED), self.b)
            differs, _ = self._differs(base, out, i)
            if differs:
                flagged.append(i)
        leaks: list[Leak] = []
        budget = _PAIR_SEARCH_BUDGET
        for i in flagged:
            if i in explained:
                continue  # the gradient test already named the pairs
            found = False
            for j in range(self.b):
                if j == i:
                    continue
                for k in movable:
                    if budget <= 0:
                        self._incomplete = True
                        break
                    budget -= 1
                    out = self._leaves(self._forward(self._perturbed([j], [k]), where=_PERTURBED), self.b)
                    differs, rel = self._differs(base, out, i)
                    if differs:
                        found = True
                        leaks.append(Leak(i, j, self.names[k], "perturbation", rel))
            if not found:
                # Only the joint perturbation showed it (e.g. the leak needs several samples to change).
                self._incomplete = True
                leaks.extend(
                    Leak(i, j, "inputs" if len(self.xs) > 1 else self.names[0], "perturbation", math.nan)
                    for j in range(self.b)
                    if j != i
                )
        return leaks, methods

    def _alone_test(self, base: Sequence[torch.Tensor]) -> tuple[list[AloneMismatch], bool, bool]:
        mismatches: list[AloneMismatch] = []
        rounding = False
        m64: Optional[torch.nn.Module] = None
        base64: Optional[list[torch.Tensor]] = None
        for i in self.checked:
            one = [x[i : i + 1].clone() for x in self.xs]
            try:
                alone = self._leaves(self._forward(one, where=f"sample {i} alone (a batch of one)"), 1)
            except InvalidArgument as exc:
                self.notes.append(
                    "the batch-of-one comparison was skipped: the model cannot run on a single sample "
                    f"({first_line(exc)})"
                )
                return mismatches, rounding, False
            if len(alone) != len(base):
                self.notes.append("the batch-of-one comparison was skipped: a batch of one returns other outputs")
                return mismatches, rounding, False
            for n, (a, s) in enumerate(zip(base, alone)):
                name = self.out_names[n] if n < len(self.out_names) else f"output leaf {n}"
                if a[i].shape != s[0].shape:
                    mismatches.append(
                        AloneMismatch(i, math.inf, math.inf, 0.0, name, True, (tuple(a[i].shape), tuple(s[0].shape)))
                    )
                    break
                diff, rel, allowed = self._compare(a[i], s[0], self.rtol, self.atol)
                if diff <= allowed:
                    continue
                survives: Optional[bool] = None
                if self.dtype != "float64":
                    try:
                        if m64 is None:
                            m64 = copy.deepcopy(self.model).to(torch.float64)
                            xs64 = [x.to(torch.float64) if x.is_floating_point() else x for x in self._fresh()]
                            base64 = self._leaves(self._forward(xs64, model=m64), self.b)
                        one64 = [x.to(torch.float64) if x.is_floating_point() else x for x in one]
                        alone64 = self._leaves(self._forward(one64, model=m64), 1)
                        r64, a64 = default_tolerances("float64", self.user_rtol, self.user_atol)
                        d64, _, allowed64 = self._compare(base64[n][i], alone64[n][0], r64, a64)  # type: ignore[index]
                        survives = not d64 <= allowed64
                    except Exception as exc:  # best effort: say why
                        self.notes.append(
                            f"the float64 re-check of the batch-of-one runs could not run: {first_line(exc)}"
                        )
                        survives = None
                else:
                    survives = True
                if survives is False:
                    rounding = True
                    continue
                mismatches.append(AloneMismatch(i, diff, rel, allowed, name, survives))
                break
        return mismatches, rounding, True


def _classify(
    leaks: Sequence[Leak],
    alone: Sequence[AloneMismatch],
    b: int,
    *,
    float_names: set[str],
    mask_names: set[str],
    not_own: Sequence[int],
) -> tuple[str, ...]:
    """The likely causes, most likely first (keys of :data:`_CAUSE_TEXT`).

    - outputs that ignore their own input, or that depend on only some other
      samples, point to a view/reshape that moved rows between samples;
    - leaks through a boolean input, or through a floating input that autograd
      does not see (a non-differentiable path), point to a mask built along the
      batch axis;
    - outputs that depend on (nearly) every other sample point to a layer that
      pools, normalises or attends over the batch axis.
    """
    if not leaks:
        return (CAUSE_BATCH_SIZE,) if alone else ()
    deps: dict[int, set[int]] = {}
    for lk in leaks:
        deps.setdefault(lk.output_sample, set()).add(lk.input_sample)
    density = sum(len(v) for v in deps.values()) / (len(deps) * max(b - 1, 1))
    has_gradient = any(lk.evidence == "gradient" for lk in leaks)
    silent_float = any(lk.evidence == "perturbation" and lk.input in float_names for lk in leaks)
    via_mask = any(lk.input in mask_names for lk in leaks)
    first: str
    if not_own:
        first = CAUSE_VIEW
    elif via_mask or (silent_float and not has_gradient):
        first = CAUSE_MASK
    elif density >= 0.75:
        first = CAUSE_POOL
    else:
        first = CAUSE_VIEW
    rest = [c for c in (CAUSE_POOL, CAUSE_VIEW, CAUSE_MASK) if c != first]
    return (first, *rest)


# --------------------------------------------------------------------------- rendering
