"""The NumPy backend: checks for hand-written gradient functions.

Two checks, for the two classic bugs of hand-written backprop:

- :func:`assert_gradequiv_numpy`: the batch gradient returned by
  ``grad_fn(params, inputs, targets)`` must equal the accumulation (mean, sum or
  weighted) of the gradients ``grad_fn`` returns for each sample run alone (a
  batch of one). It catches a gradient that is *summed* over the batch where the
  loss averages (the step grows with the batch size) and samples paired with
  other samples by broadcasting. The comparison, the float64 re-check, the
  diagnosis and the report are the ones the torch check uses
  (:func:`pytest_gradcheck.verdict.run_check`).
- :func:`assert_grad_numpy`: the gradient returned by ``grad_fn`` must equal
  central finite differences of ``loss_fn`` in float64. It catches a wrong
  derivative formula, which the first check cannot see (a formula that is wrong
  for every sample is wrong the same way in the batch).

Broadcast detection (``broadcast=`` of :func:`assert_gradequiv_numpy`)
-----------------------------------------------------------------------
During the batch call (working dtype only) the copies of ``inputs`` and
``targets`` handed to ``grad_fn`` are :class:`TrackedArray` views that know
which of their axes is the **batch axis** (axis 0 to start with). The batch axis
is followed through ufuncs and operators, reductions, indexing (``x[:, None]``,
``x[i]``, slices, one index array), ``reshape``/``ravel``/``squeeze``/
``expand_dims``, ``transpose``/``.T``/``swapaxes``/``moveaxis``, ``@``/
``np.matmul``, ``np.dot``, ``np.tensordot``, ``np.einsum``, ``np.where``,
``np.concatenate``/``np.hstack``/``np.stack``. Any other op (or
``np.asarray``) loses the batch axis, and an operand without a known batch axis
never triggers a flag: where the tracking cannot follow, it stays silent.

An elementwise op (a ufunc such as ``-`` or ``*``, or ``np.where``) is flagged
when both hold:

1. the shared rule :func:`pytest_gradcheck.broadcast.is_implicit_broadcast`:
   no operand already had the result's shape (every operand was expanded); and
2. two operands carry a batch axis and broadcasting puts those batch axes on
   *different* axes of the result: the op pairs every sample with every other
   sample, as ``(N, 1) - (N,) -> (N, N)`` does.

So the predictions-vs-targets bug is caught wherever it sits in ``grad_fn``,
while the broadcasting hand-written backprop relies on is not: a bias ``(H,)``
over ``(B, H)`` (rule 1: one operand has the result's shape), per-sample outer
products ``d[:, :, None] * a[:, None, :]`` (rule 2: both batch axes stay on
axis 0), one-hot encodings ``y[:, None] == np.arange(C)`` (``np.arange`` has no
batch axis). Intended pairwise terms (contrastive losses) can be wrapped in
:func:`pytest_gradcheck.allow_broadcast`. Records use the torch guard's record
type, user file:line and message (:func:`pytest_gradcheck.broadcast.report_broadcast`),
with NumPy spellings in the suggestion (``y[..., None]``, ``.reshape(...)``).

This module imports numpy (it is only imported when a NumPy check is used) and
never imports torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from . import _tracking
from . import broadcast as _bc
from ._options import check_batch_sizes, check_tolerance, validate_options
from .diagnosis import MAX_PER_SAMPLE_ENTRIES
from .errors import BroadcastError, GradCheckError, GradEquivError, InvalidArgument
from .report import GradEquivReport
from .verdict import run_check

__all__ = [
    "assert_gradequiv_numpy",
    "assert_grad_numpy",
    "FiniteDifferenceReport",
    "FDParam",
    "FDEntry",
    "TrackedArray",
]

GradFn = Callable[[Any, Any, Any], Any]
LossFn = Callable[[Any, Any, Any], Any]
WeightsArg = Union[None, np.ndarray, Sequence[float], Callable[[Any], Any]]

#: Per-sample gradients are kept in memory (instead of recomputed for the
#: diagnosis) when the batch holds at most this many gradient entries.
_CACHE_ENTRIES = 4_000_000

#: Batch-axis marker of a tracked array whose batch axis was lost (merged by a
#: reshape, moved by an op we do not follow). Such arrays are never flagged.
_LOST = -1


# =========================================================================== public API


def assert_gradequiv_numpy(
    grad_fn: GradFn,
    params: Any,
    inputs: Any,
    targets: Any = None,
    *,
    reduction: str = "mean",
    weights: WeightsArg = None,
    rtol: Optional[float] = None,
    atol: Optional[float] = None,
    broadcast: str = "warn",
    float64_recheck: bool = True,
    loss_fn: Optional[LossFn] = None,
    reference: str = "auto",
) -> GradEquivReport:
    """Assert that a hand-written batch gradient equals the accumulation of per-sample gradients.

    ``grad_fn(params, inputs, targets)`` returns the gradient of the batch loss
    in the structure of ``params``: a dict with the same keys, a list/tuple of
    the same length, or one array when ``params`` is one array. ``inputs`` is an
    array or a tuple/list of arrays with the batch on axis 0 (``grad_fn``
    receives the same structure); ``targets`` likewise, or None.

    The reference calls ``grad_fn`` on each sample alone (``x[i:i+1]``) and
    accumulates the B gradients by ``reduction``: ``"mean"`` (default),
    ``"sum"``, or ``"auto"`` (whichever holds, reported in ``report.matched``).
    ``weights`` declares a weighted accumulation: B per-sample weights, or a
    callable on one sample's targets (a batch of one). A mismatch in float32/16
    is re-run with float64 copies of params, inputs and targets before it is
    called a bug. ``loss_fn(params, inputs, targets) -> float`` is optional; it
    lets the diagnosis tell a reweighting of samples from samples that interact.

    Every call gets fresh copies: ``params``, ``inputs`` and ``targets`` are
    left as found. A ``grad_fn`` that writes into the caller's own arrays (via a
    closure or a global) has them restored and gets an
    :class:`~pytest_gradcheck.errors.InvalidArgument`.

    ``broadcast``: ``"warn"`` (default) warns when ``grad_fn`` pairs samples by
    broadcasting (see the module docstring for the rule) and the gradients agree
    anyway, ``"error"`` raises :class:`~pytest_gradcheck.errors.BroadcastError`,
    ``"off"`` does not watch. ``reference`` is accepted for parity with the
    torch check; the NumPy reference is always a per-sample loop.

    Returns a :class:`~pytest_gradcheck.report.GradEquivReport`; raises
    :class:`~pytest_gradcheck.errors.GradEquivError` on mismatch and
    :class:`~pytest_gradcheck.errors.InvalidArgument` on input it cannot check.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> params = {"w": rng.normal(size=(3, 1)), "b": np.zeros(1)}
    >>> x, y = rng.normal(size=(8, 3)), rng.normal(size=(8, 1))
    >>> def grad_mse(p, x, y):              # loss = mean over the batch of (x @ w + b - y)**2
    ...     d = 2 * (x @ p["w"] + p["b"] - y) / len(x)
    ...     return {"w": x.T @ d, "b": d.sum(axis=0)}
    >>> assert_gradequiv_numpy(grad_mse, params, x, y).matched
    'mean'
    >>> def grad_summed(p, x, y):           # forgot to divide by the batch size
    ...     d = 2 * (x @ p["w"] + p["b"] - y)
    ...     return {"w": x.T @ d, "b": d.sum(axis=0)}
    >>> assert_gradequiv_numpy(grad_summed, params, x, y, reduction="auto").matched
    'sum'
    """
    __tracebackhide__ = True
    opts = validate_options(
        {
            "reduction": reduction,
            "rtol": rtol,
            "atol": atol,
            "broadcast": broadcast,
            "reference": reference,
            "float64_recheck": float64_recheck,
        }
    )
    if not callable(grad_fn):
        raise InvalidArgument(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise InvalidArgument(f"loss_fn must be callable or None, got {type(loss_fn).__name__}")
    p = _Params.from_user(params)
    xs = _Arrays.from_user(inputs, "inputs")
    ys = _Arrays.from_user(targets, "targets") if targets is not None else None
    b = _batch_size(xs, ys)
    w = _resolve_weights(weights, b, ys)
    problem = _NumpyProblem(grad_fn, p, xs, ys, b, loss_fn=loss_fn, watch_broadcast=opts["broadcast"] != "off")
    with _left_as_found(p, xs, ys, "grad_fn"):
        try:
            report = run_check(
                problem,
                reduction=opts["reduction"],
                weights=w,
                rtol=opts["rtol"],
                atol=opts["atol"],
                float64_recheck=opts["float64_recheck"],
            )
        except GradEquivError as err:
            report = err.report
            if problem.add_notes(report):
                err = GradEquivError(report)
            raise err from None
    problem.add_notes(report)
    if report.broadcasts:
        _bc.emit_after_check(report, opts["broadcast"], where="grad_fn")
    return report


def assert_grad_numpy(
    loss_fn: LossFn,
    grad_fn: GradFn,
    params: Any,
    inputs: Any,
    targets: Any = None,
    *,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    atol: float = 1e-8,
    max_coords: int = 128,
    seed: int = 0,
) -> "FiniteDifferenceReport":
    """Assert that ``grad_fn`` is the gradient of ``loss_fn``, by central finite differences.

    Everything runs in float64, on copies: ``grad_fn(params, inputs, targets)``
    gives the analytic gradient (in the structure of ``params``, as for
    :func:`assert_gradequiv_numpy`); each checked coordinate ``j`` of each
    parameter gets ``(loss_fn(p + eps e_j) - loss_fn(p - eps e_j)) / (2 eps)``.

    A parameter passes when ``max|analytic - numeric| <= atol + rtol * scale +
    noise`` over its checked coordinates, with ``scale`` the largest magnitude of
    either gradient there and ``noise = 64 * 2**-52 * max|loss| / eps`` the
    rounding of the difference quotient. Parameters with more than
    ``max_coords`` entries are sampled: the entry with the largest analytic
    gradient plus ``max_coords - 1`` others drawn with ``numpy.random.default_rng(seed)``
    (the global RNG is not touched). Kinks (ReLU at 0, ``abs``) can make
    finite differences disagree with a correct gradient; keep inputs away from them.

    Returns a :class:`FiniteDifferenceReport`; raises
    :class:`~pytest_gradcheck.errors.GradEquivError` (its ``.report``) naming the
    parameters, indices, analytic and numeric values of the worst entries.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> params = {"w": rng.normal(size=(3, 1))}
    >>> x, y = rng.normal(size=(5, 3)), rng.normal(size=(5, 1))
    >>> def loss(p, x, y):
    ...     return float(np.mean((x @ p["w"] - y) ** 2))
    >>> def grad(p, x, y):
    ...     return {"w": x.T @ (2 * (x @ p["w"] - y) / len(x))}
    >>> assert_grad_numpy(loss, grad, params, x, y).passed
    True
    """
    __tracebackhide__ = True
    if not callable(loss_fn):
        raise InvalidArgument(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if not callable(grad_fn):
        raise InvalidArgument(f"grad_fn must be callable, got {type(grad_fn).__name__}")
    eps_v = check_tolerance(eps, "eps")
    if eps_v is None or eps_v <= 0:
        raise InvalidArgument(f"Invalid eps={eps!r} from argument: expected a number > 0")
    rtol_v = check_tolerance(rtol, "rtol")
    atol_v = check_tolerance(atol, "atol")
    if isinstance(max_coords, bool) or not isinstance(max_coords, (int, np.integer)) or max_coords < 1:
        raise InvalidArgument(f"Invalid max_coords={max_coords!r} from argument: expected an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise InvalidArgument(f"Invalid seed={seed!r} from argument: expected an integer")
    p = _Params.from_user(params)
    xs = _Arrays.from_user(inputs, "inputs")
    ys = _Arrays.from_user(targets, "targets") if targets is not None else None
    with _left_as_found(p, xs, ys, "grad_fn or loss_fn"):
        report = _finite_differences(
            loss_fn,
            grad_fn,
            p,
            xs,
            ys,
            float(eps_v),
            float(rtol_v or 0.0),
            float(atol_v or 0.0),
            int(max_coords),
            int(seed),
        )
    _tracking.record(report)
    if not report.passed:
        raise GradEquivError(report)
    return report


# =========================================================================== arguments


def _label_key(key: Any) -> str:
    return f"params[{key!r}]"


class _Params:
    """The user's parameters: names for the report, labels for errors, the arrays."""

    def __init__(self, kind: str, keys: list[Any], arrays: list[np.ndarray], container: type) -> None:
        self.kind = kind  # "dict" | "seq" | "array"
        self.keys = keys
        self.arrays = arrays
        self.container = container
        if kind == "dict":
            self.names = [k if isinstance(k, str) else repr(k) for k in keys]
            self.labels = [_label_key(k) for k in keys]
        elif kind == "seq":
            self.names = [f"params[{i}]" for i in range(len(keys))]
            self.labels = list(self.names)
        else:
            self.names = ["params"]
            self.labels = ["params"]
        if len(set(self.names)) != len(self.names):
            raise InvalidArgument(f"params has keys that print the same ({self.names}): use distinct string keys")

    @classmethod
    def from_user(cls, params: Any) -> "_Params":
        if isinstance(params, np.ndarray):
            _check_param(params, "params")
            return cls("array", [None], [params], np.ndarray)
        if isinstance(params, Mapping):
            if not params:
                raise InvalidArgument("params is an empty dict: there is no gradient to check")
            keys = list(params)
            arrays = []
            for k in keys:
                arrays.append(_check_param(params[k], _label_key(k)))
            return cls("dict", keys, arrays, dict)
        if isinstance(params, (list, tuple)):
            if not params:
                raise InvalidArgument(f"params is an empty {type(params).__name__}: there is no gradient to check")
            arrays = [_check_param(a, f"params[{i}]") for i, a in enumerate(params)]
            return cls("seq", list(range(len(params))), arrays, type(params) if type(params) in (list, tuple) else list)
        raise InvalidArgument(
            f"params is a {type(params).__name__}: pass a dict of NumPy arrays ({{'W1': W1, 'b1': b1}}), "
            "a list/tuple of arrays, or one array"
        )

    def build(self, arrays: Sequence[np.ndarray]) -> Any:
        if self.kind == "array":
            return arrays[0]
        if self.kind == "dict":
            return dict(zip(self.keys, arrays))
        return self.container(arrays)

    def copies(self, float64: bool) -> list[np.ndarray]:
        return [_copy(a, float64) for a in self.arrays]

    def collect(self, grads: Any, where: str) -> dict[str, np.ndarray]:
        """Validate what ``grad_fn`` returned against ``params``; float64 copies by name."""
        if self.kind == "dict":
            if not isinstance(grads, Mapping):
                raise InvalidArgument(
                    f"grad_fn returned a {type(grads).__name__} ({where}): params is a dict, so grad_fn "
                    f"must return a dict with the same keys ({', '.join(map(repr, self.keys))})"
                )
            missing = [k for k in self.keys if k not in grads]
            extra = [k for k in grads if k not in self.params_keyset()]
            if missing or extra:
                parts = []
                if missing:
                    parts.append("no gradient for " + ", ".join(_label_key(k) for k in missing))
                if extra:
                    parts.append("gradients for keys params does not have: " + ", ".join(map(repr, extra)))
                raise InvalidArgument(f"grad_fn returned keys that do not match params ({where}): {'; '.join(parts)}")
            values = [grads[k] for k in self.keys]
        elif self.kind == "seq":
            if not isinstance(grads, (list, tuple)):
                raise InvalidArgument(
                    f"grad_fn returned a {type(grads).__name__} ({where}): params is a "
                    f"{self.container.__name__} of {len(self.keys)} arrays, so grad_fn must return a "
                    f"list or tuple of {len(self.keys)} gradients in the same order"
                )
            if len(grads) != len(self.keys):
                raise InvalidArgument(
                    f"grad_fn returned {len(grads)} gradients for {len(self.keys)} parameters ({where}): "
                    "return one gradient per entry of params, in the same order"
                )
            values = list(grads)
        else:
            if isinstance(grads, (list, tuple)) and len(grads) == 1:
                grads = grads[0]
            values = [grads]
        out: dict[str, np.ndarray] = {}
        for name, label, param, g in zip(self.names, self.labels, self.arrays, values):
            out[name] = _as_gradient(g, label, param, where)
        return out

    def params_keyset(self) -> set:
        return set(self.keys)


def _check_param(a: Any, label: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise InvalidArgument(
            f"{label} is a {type(a).__name__}, not a NumPy array: every parameter must be an "
            "np.ndarray with a floating dtype (np.asarray(value, dtype=np.float32))"
        )
    if not np.issubdtype(a.dtype, np.floating):
        raise InvalidArgument(
            f"{label} has dtype {a.dtype}: parameters need a floating dtype (float16, float32 or float64) "
            "to have a gradient"
        )
    return a


def _as_gradient(g: Any, label: str, param: np.ndarray, where: str) -> np.ndarray:
    if g is None:
        raise InvalidArgument(
            f"grad_fn returned None as the gradient of {label} ({where}): return an array of zeros "
            "if the loss does not depend on it"
        )
    try:
        arr = np.asarray(g)
    except Exception as exc:  # a ragged list
        raise InvalidArgument(f"the gradient of {label} ({where}) is not an array: {exc}") from None
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise InvalidArgument(f"the gradient of {label} ({where}) has dtype {arr.dtype}: expected a floating array")
    if arr.shape != param.shape:
        raise InvalidArgument(
            f"shape mismatch: the gradient of {label} has shape {tuple(arr.shape)} but the parameter "
            f"has shape {tuple(param.shape)} ({where}); grad_fn must return each gradient in its "
            "parameter's shape"
        )
    return np.array(arr, dtype=np.float64)


class _Arrays:
    """``inputs`` or ``targets``: one array or a tuple/list of arrays, batch on axis 0."""

    def __init__(self, what: str, arrays: list[np.ndarray], container: Optional[type]) -> None:
        self.what = what
        self.arrays = arrays
        self.container = container  # None: a single array

    @classmethod
    def from_user(cls, value: Any, what: str) -> "_Arrays":
        if isinstance(value, np.ndarray):
            return cls(what, [value], None)
        if isinstance(value, (tuple, list)):
            if not value:
                raise InvalidArgument(f"{what} is empty: pass an array or a tuple of arrays with the batch on axis 0")
            for i, a in enumerate(value):
                if not isinstance(a, np.ndarray):
                    raise InvalidArgument(
                        f"{what}[{i}] is a {type(a).__name__}, not a NumPy array: every entry of {what} "
                        "must be an array with the batch on axis 0"
                    )
            return cls(what, list(value), type(value) if type(value) in (tuple, list) else tuple)
        raise InvalidArgument(
            f"{what} is a {type(value).__name__}, not a NumPy array: pass an array or a tuple of arrays "
            "with the batch on axis 0"
        )

    def label(self, i: int) -> str:
        return self.what if self.container is None else f"{self.what}[{i}]"

    def build(self, arrays: Sequence[np.ndarray]) -> Any:
        return arrays[0] if self.container is None else self.container(arrays)


def _batch_size(xs: _Arrays, ys: Optional[_Arrays]) -> int:
    sizes: list[tuple[str, int]] = []
    for group in (xs, ys):
        if group is None:
            continue
        for i, a in enumerate(group.arrays):
            if a.ndim == 0:
                raise InvalidArgument(f"{group.label(i)} is a 0-d array: every array needs the batch on axis 0")
            sizes.append((f"{group.label(i)} (shape {tuple(a.shape)})", int(a.shape[0])))
    return check_batch_sizes(sizes, axis="axis 0")


def _copy(a: np.ndarray, float64: bool) -> np.ndarray:
    if float64 and np.issubdtype(a.dtype, np.floating):
        return np.array(a, dtype=np.float64)
    return np.array(a, copy=True)


def _resolve_weights(weights: WeightsArg, b: int, ys: Optional[_Arrays]) -> Optional[np.ndarray]:
    if weights is None:
        return None
    if callable(weights) and not isinstance(weights, np.ndarray):
        values = []
        for i in range(b):
            one = None if ys is None else ys.build([a[i : i + 1] for a in ys.arrays])
            try:
                values.append(float(np.asarray(weights(one), dtype=np.float64)))
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"weights(targets of sample {i}) did not return one number: {exc}") from None
        w = np.asarray(values, dtype=np.float64)
    else:
        try:
            w = np.asarray(weights, dtype=np.float64)
        except (TypeError, ValueError):
            raise InvalidArgument(f"weights must be B numbers or a callable, got {type(weights).__name__}") from None
        w = w.reshape(-1) if w.ndim > 1 and w.size == b else w
    if w.shape != (b,):
        raise InvalidArgument(f"weights has shape {tuple(w.shape)}: expected one weight per sample, ({b},)")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise InvalidArgument(f"weights must be finite and >= 0, got {w.tolist()[:8]}")
    if w.sum() <= 0:
        raise InvalidArgument("weights sum to 0: at least one sample must count")
    return w


def _same_bytes(a: np.ndarray, saved: np.ndarray) -> bool:
    if a.shape != saved.shape or a.dtype != saved.dtype:
        return False
    return bool(
        np.array_equal(
            np.ascontiguousarray(a).reshape(-1).view(np.uint8),
            np.ascontiguousarray(saved).reshape(-1).view(np.uint8),
        )
    )


@contextlib.contextmanager
def _left_as_found(p: _Params, xs: _Arrays, ys: Optional[_Arrays], who: str) -> Iterator[None]:
    """Snapshot the caller's arrays and the global RNGs; on exit (pass or fail) restore them.

    Arrays that changed are named in an :class:`InvalidArgument`.
    """
    __tracebackhide__ = True
    watched: list[tuple[str, np.ndarray, np.ndarray]] = [(label, a, a.copy()) for label, a in zip(p.labels, p.arrays)]
    for group in (xs, ys):
        if group is not None:
            watched += [(group.label(i), a, a.copy()) for i, a in enumerate(group.arrays)]
    np_rng, py_rng = np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        np.random.set_state(np_rng)
        random.setstate(py_rng)
        changed = []
        for label, a, saved in watched:
            if not _same_bytes(a, saved):
                changed.append(label)
                if a.shape == saved.shape and a.flags.writeable:
                    np.copyto(a, saved, casting="unsafe")
        if changed:
            raise InvalidArgument(
                f"{who} modified the caller's arrays in place: {', '.join(changed)}. They have been "
                "restored, but the check cannot trust gradients computed while the parameters change "
                "between calls. Read the arrays grad_fn is given (every call gets fresh copies), not "
                "global or captured ones, and keep the optimizer update outside grad_fn."
            )


# =========================================================================== the problem


class _NumpyProblem:
    """One check of a NumPy gradient function, as :func:`~pytest_gradcheck.verdict.run_check` drives it."""

    backend = "numpy"
    broadcast_scope = "grad_fn"
    device = "cpu"
    reference_method = "per-sample calls"
    fallback_reason: Optional[str] = None
    dropout_disabled: tuple[str, ...] = ()

    def __init__(
        self,
        grad_fn: GradFn,
        params: _Params,
        inputs: _Arrays,
        targets: Optional[_Arrays],
        batch_size: int,
        *,
        loss_fn: Optional[LossFn] = None,
        watch_broadcast: bool = True,
    ) -> None:
        self.grad_fn = grad_fn
        self.params = params
        self.inputs = inputs
        self.targets = targets
        self.batch_size = batch_size
        self.loss_fn = loss_fn
        self.watch_broadcast = watch_broadcast
        self.dtype = min((a.dtype for a in params.arrays), key=lambda d: d.itemsize).name
        self.broadcasts: tuple[Any, ...] = ()
        self.n_entries = sum(int(a.size) for a in params.arrays)
        self._samples: dict[bool, list[dict[str, np.ndarray]]] = {}
        self._losses: dict[bool, tuple[float, np.ndarray]] = {}
        self.modified: dict[str, None] = {}  # labels of the copies grad_fn wrote into (ordered set)
        self.random_draws = False  # grad_fn drew from np.random's global generator

    # -- calls ---------------------------------------------------------------------------------
    def _arguments(self, float64: bool, index: Optional[int], track: bool) -> tuple[list[np.ndarray], Any, Any, Any]:
        p_arrays = self.params.copies(float64)

        def batch_arrays(group: Optional[_Arrays]) -> Any:
            if group is None:
                return None
            arrays = []
            for a in group.arrays:
                c = _copy(a if index is None else a[index : index + 1], float64)
                if track:
                    c = _track(c, 0)
                arrays.append(c)
            return group.build(arrays)

        return p_arrays, self.params.build(p_arrays), batch_arrays(self.inputs), batch_arrays(self.targets)

    def _note_modified(self, p_arrays: Sequence[np.ndarray], float64: bool) -> None:
        for label, mine, theirs in zip(self.params.labels, p_arrays, self.params.arrays):
            if float64 and theirs.dtype != np.float64:
                same = np.array_equal(mine, theirs.astype(np.float64), equal_nan=True)
            else:
                same = _same_bytes(mine, theirs)
            if not same:
                self.modified[label] = None

    def _call(self, float64: bool, index: Optional[int]) -> dict[str, np.ndarray]:
        __tracebackhide__ = True
        where = (
            ("the float64 batch call" if float64 else "the batch call")
            if index is None
            else (f"the call on sample {index} alone" + (" in float64" if float64 else ""))
        )
        track = index is None and not float64 and self.watch_broadcast
        p_arrays, p, x, y = self._arguments(float64, index, track)
        rng_before = _rng_fingerprint()
        try:
            return self._call_checked(float64, index, track, where, p_arrays, p, x, y)
        finally:
            if _rng_fingerprint() != rng_before:
                self.random_draws = True

    def _call_checked(
        self,
        float64: bool,
        index: Optional[int],
        track: bool,
        where: str,
        p_arrays: list[np.ndarray],
        p: Any,
        x: Any,
        y: Any,
    ) -> dict[str, np.ndarray]:
        __tracebackhide__ = True
        if not track:
            if index is None:
                out = self.grad_fn(p, x, y)
            else:
                try:
                    out = self.grad_fn(p, x, y)
                except GradCheckError:
                    raise
                except Exception as exc:
                    raise InvalidArgument(
                        f"grad_fn failed on sample {index} alone (a batch of one), which the per-sample "
                        f"reference needs: {type(exc).__name__}: {_first_line(exc)}. A gradient function "
                        "that squeezes the batch axis away or needs several samples cannot be checked "
                        "per sample."
                    ) from exc
            self._note_modified(p_arrays, float64)
            return self.params.collect(out, where)
        try:
            with _bc.recording(torch_ops=False) as records:
                out = self.grad_fn(p, x, y)
        except GradCheckError:
            raise
        except Exception as exc:
            recs = _numpy_records(records)
            if recs:
                raise BroadcastError(
                    _broken_by_broadcast(recs, f"grad_fn then raised {type(exc).__name__}: {_first_line(exc)}"),
                    recs,
                ) from exc
            raise
        recs = _numpy_records(records)
        self.broadcasts = tuple(recs)
        self._note_modified(p_arrays, float64)
        try:
            return self.params.collect(out, where)
        except InvalidArgument as exc:
            if recs:
                raise BroadcastError(_broken_by_broadcast(recs, str(exc)), recs) from exc
            raise

    def _per_sample(self, float64: bool) -> Iterable[dict[str, np.ndarray]]:
        """The B per-sample gradients: kept in memory when small, else recomputed on demand."""
        cached = self._samples.get(float64)
        if cached is not None:
            return cached
        if self.batch_size * self.n_entries > _CACHE_ENTRIES:
            return (self._call(float64, i) for i in range(self.batch_size))
        kept = [self._call(float64, i) for i in range(self.batch_size)]
        self._samples[float64] = kept
        return kept

    # -- GradientProblem -------------------------------------------------------------------------
    def batch_gradient(self, float64: bool) -> dict[str, np.ndarray]:
        __tracebackhide__ = True
        return self._call(float64, None)

    def reference_gradient(self, coeffs: np.ndarray, float64: bool) -> dict[str, np.ndarray]:
        acc = {n: np.zeros(a.shape, dtype=np.float64) for n, a in zip(self.params.names, self.params.arrays)}
        for c, g in zip(coeffs, self._per_sample(float64)):
            for n in acc:
                acc[n] += float(c) * g[n]
        return acc

    def per_sample_gradients(self, float64: bool) -> Optional[dict[str, np.ndarray]]:
        if self.batch_size * self.n_entries > MAX_PER_SAMPLE_ENTRIES:
            return None
        samples = list(self._per_sample(float64))
        return {n: np.stack([g[n] for g in samples]) for n in self.params.names}

    def weight_candidates(self) -> list[tuple[str, np.ndarray]]:
        out: list[tuple[str, np.ndarray]] = []
        if self.targets is None:
            return out
        for a in self.targets.arrays:
            if np.issubdtype(a.dtype, np.integer) and a.ndim >= 2:
                valid = (a != -100).reshape(a.shape[0], -1).sum(axis=1).astype(np.float64)
                out.append(("their number of non-ignored targets (targets != -100)", valid))
        return out

    def loss_values(self, float64: bool) -> Optional[tuple[float, np.ndarray]]:
        if self.loss_fn is None:
            return None
        if float64 not in self._losses:
            _, p, x, y = self._arguments(float64, None, False)
            batch = _as_loss(self.loss_fn(p, x, y), "the batch")
            losses = []
            for i in range(self.batch_size):
                _, p, x, y = self._arguments(float64, i, False)
                losses.append(_as_loss(self.loss_fn(p, x, y), f"sample {i}"))
            self._losses[float64] = (batch, np.asarray(losses, dtype=np.float64))
        return self._losses[float64]

    # -- report ----------------------------------------------------------------------------------
    def add_notes(self, report: GradEquivReport) -> bool:
        """Add what the report should say about this run; True when something was added."""
        notes = []
        if self.random_draws and not report.passed:
            notes.append(
                "grad_fn draws from NumPy's global random generator (dropout? noise?): the batch "
                "call and the per-sample calls drew different numbers, which alone makes their "
                "gradients differ. Make grad_fn deterministic for the check (pass the dropout mask "
                "or the noise in as an input, or switch dropout off)."
            )
        if self.modified:
            notes.append(
                f"grad_fn wrote into the params it was given ({', '.join(self.modified)}); every call "
                "got fresh copies, so the check is unaffected and your arrays are as they were. If "
                "grad_fn also applies the update, move the update out of it."
            )
        added = False
        for note in notes:
            if note not in report.notes:
                report.notes.append(note)
                added = True
        return added


def _rng_fingerprint() -> tuple[Any, ...]:
    _, key, pos, has_gauss, gauss = np.random.get_state()
    return (int(pos), int(has_gauss), float(gauss), key.tobytes())


def _as_loss(value: Any, where: str) -> float:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise InvalidArgument(f"loss_fn returned a {type(value).__name__} for {where}: expected a float") from None
    if arr.size != 1:
        raise InvalidArgument(
            f"loss_fn returned shape {tuple(arr.shape)} for {where}, not a scalar: reduce it to one number"
        )
    v = float(arr.reshape(()))
    if not math.isfinite(v):
        raise InvalidArgument(f"loss_fn returned {v} for {where}: the loss must be finite")
    return v


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line if len(line) <= 240 else line[:237] + "..."


# =========================================================================== broadcasts


_VIEW_AS = re.compile(r"\.view_as\(([^()]*)\)")


def _numpy_spelling(suggestion: Optional[str]) -> Optional[str]:
    """Translate a torch-flavoured fix (``.unsqueeze(-1)``, ``.view_as(x)``) into NumPy.

    >>> _numpy_spelling("did you mean labels.unsqueeze(-1)?")
    'did you mean labels[..., None]?'
    >>> _numpy_spelling("did you mean y.view_as(out)?")
    'did you mean y.reshape(out.shape)?'
    """
    if not suggestion:
        return suggestion
    s = suggestion.replace(".unsqueeze(-1)", "[..., None]")
    s = s.replace(".view_as(other)", ".reshape(other.shape)")
    s = _VIEW_AS.sub(lambda m: f".reshape({m.group(1)}.shape)", s)
    return s.replace(".view(", ".reshape(")


def _numpy_records(records: Sequence[Any]) -> list[Any]:
    out = []
    for r in records:
        fixed = _numpy_spelling(r.suggestion)
        out.append(dataclasses.replace(r, suggestion=fixed) if fixed != r.suggestion else r)
    return out


def _broken_by_broadcast(records: Sequence[Any], what: str) -> str:
    lines = [f"grad_fn broadcast samples against each other in the batch call, and it broke the gradient: {what}"]
    lines += ["  " + r.message() for r in records[:3]]
    lines.append(
        "Each sample was paired with every other sample (harmless with a batch of one, which is why "
        "it hides). Give predictions and targets the same shape (e.g. y[..., None] or "
        "y.reshape(out.shape)), or wrap an intended pairwise term in pytest_gradcheck.allow_broadcast()."
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------- batch-axis tracking


def _safe(fn: Callable[..., Optional[int]], *args: Any) -> Optional[int]:
    """``fn(*args)``, or "lost" if the bookkeeping fails on a form it does not know."""
    try:
        return fn(*args)
    except Exception:
        return _LOST


def _track(a: np.ndarray, batch: Optional[int]) -> "TrackedArray":
    t = a.view(TrackedArray)
    t._gc_batch = batch
    return t


def _batch(x: Any) -> Optional[int]:
    return x._gc_batch if isinstance(x, TrackedArray) else None


def _wrap(result: Any, batch: Optional[int]) -> Any:
    if type(result) is np.ndarray or isinstance(result, TrackedArray):
        if batch is not None and batch != _LOST and not 0 <= batch < result.ndim:
            batch = _LOST
        if isinstance(result, TrackedArray):
            result._gc_batch = batch
            return result
        return _track(result, batch)
    return result


def _unwrap(x: Any) -> Any:
    if isinstance(x, TrackedArray):
        return x.view(np.ndarray)
    if type(x) in (list, tuple):
        return type(x)(_unwrap(v) for v in x)
    if type(x) is dict:
        return {k: _unwrap(v) for k, v in x.items()}
    return x


def _norm_axis(axis: int, ndim: int) -> int:
    return axis + ndim if axis < 0 else axis


def _combine(placed: Sequence[tuple[int, int]], lost: bool) -> Optional[int]:
    """The result's batch axis from ``(result axis, size)`` of each operand's batch axis."""
    big = {pos for pos, size in placed if size > 1}
    if len(big) == 1:
        return big.pop()
    if len(big) > 1:
        return _LOST  # an explicit pairing (outer, gram matrix): no single batch axis
    every = {pos for pos, _ in placed}
    if len(every) == 1 and not lost:
        return every.pop()
    return _LOST if (every or lost) else None


def _elementwise(operands: Sequence[Any], out_ndim: int) -> tuple[list[tuple[int, int]], bool]:
    """Where each operand's batch axis lands in a broadcast result (right-aligned)."""
    placed: list[tuple[int, int]] = []
    lost = False
    for x in operands:
        b = _batch(x)
        if b is None:
            continue
        if b == _LOST:
            lost = True
            continue
        placed.append((b + out_ndim - x.ndim, int(x.shape[b])))
    return placed, lost


def _check_pairing(op: str, operands: Sequence[Any], placed: Sequence[tuple[int, int]]) -> None:
    """Report ``op`` when it expands every operand and puts two batch axes on different axes."""
    __tracebackhide__ = True
    if len({pos for pos, size in placed if size > 1}) < 2:
        return
    shapes = [tuple(int(d) for d in np.shape(x)) for x in operands]
    result = _bc.broadcast_shape(shapes)
    if result is None or not _bc.is_implicit_broadcast(shapes, result):
        return
    _bc.report_broadcast(op, shapes, result)


def _matmul_batch(a: Any, b: Any, out_ndim: int) -> Optional[int]:
    na, nb = np.ndim(a), np.ndim(b)
    placed: list[tuple[int, int]] = []
    lost = False
    lead = out_ndim - (2 if na >= 2 and nb >= 2 else 1 if max(na, nb) >= 2 else 0)
    for which, x, n in (("a", a, na), ("b", b, nb)):
        ba = _batch(x)
        if ba is None:
            continue
        if ba == _LOST:
            lost = True
            continue
        size = int(np.shape(x)[ba])
        if n == 1:
            continue  # contracted
        if which == "a":
            if ba == n - 1:
                continue  # contracted
            if ba == n - 2:
                placed.append((out_ndim - 2 if nb >= 2 else out_ndim - 1, size))
            else:
                placed.append((ba + lead - (n - 2), size))
        else:
            if ba == n - 2:
                continue  # contracted
            if ba == n - 1:
                placed.append((out_ndim - 1, size))
            else:
                placed.append((ba + lead - (n - 2), size))
    return _combine(placed, lost)


def _dot_batch(a: Any, b: Any, out_ndim: int) -> Optional[int]:
    na, nb = np.ndim(a), np.ndim(b)
    if na == 0 or nb == 0:
        placed, lost = _elementwise([a, b], out_ndim)
        return _combine(placed, lost)
    if na <= 2 and nb <= 2:
        return _matmul_batch(a, b, out_ndim)
    placed: list[tuple[int, int]] = []
    lost = False
    ba, bb = _batch(a), _batch(b)
    if ba == _LOST or bb == _LOST:
        lost = True
    if ba is not None and ba != _LOST and ba != na - 1:
        placed.append((ba, int(np.shape(a)[ba])))
    if bb is not None and bb != _LOST and nb >= 2 and bb != nb - 2:
        pos = na - 1 + (bb if bb < nb - 2 else nb - 2)
        placed.append((pos, int(np.shape(b)[bb])))
    return _combine(placed, lost)


def _tensordot_batch(a: Any, b: Any, axes: Any) -> Optional[int]:
    na, nb = np.ndim(a), np.ndim(b)
    try:
        if isinstance(axes, (int, np.integer)):
            ax_a = list(range(na - int(axes), na))
            ax_b = list(range(int(axes)))
        else:
            ax_a, ax_b = axes
            ax_a = [int(ax_a)] if isinstance(ax_a, (int, np.integer)) else [int(v) for v in ax_a]
            ax_b = [int(ax_b)] if isinstance(ax_b, (int, np.integer)) else [int(v) for v in ax_b]
    except (TypeError, ValueError):
        return _LOST
    ax_a = [_norm_axis(v, na) for v in ax_a]
    ax_b = [_norm_axis(v, nb) for v in ax_b]
    free_a = [i for i in range(na) if i not in ax_a]
    free_b = [i for i in range(nb) if i not in ax_b]
    placed: list[tuple[int, int]] = []
    lost = False
    for x, free, offset in ((a, free_a, 0), (b, free_b, len(free_a))):
        bx = _batch(x)
        if bx is None:
            continue
        if bx == _LOST:
            lost = True
        elif bx in free:
            placed.append((offset + free.index(bx), int(np.shape(x)[bx])))
    return _combine(placed, lost)


def _einsum_batch(subscripts: str, operands: Sequence[Any], out_ndim: int) -> Optional[int]:
    s = subscripts.replace(" ", "")
    ins, out = s.split("->") if "->" in s else (s, None)
    specs = ins.split(",")
    if len(specs) != len(operands):
        return _LOST
    labels: list[list[Any]] = []
    max_ell = 0
    for spec, x in zip(specs, operands):
        n = np.ndim(x)
        if "..." in spec:
            pre, post = spec.split("...")
            ell = n - len(pre) - len(post)
            max_ell = max(max_ell, ell)
            labels.append(list(pre) + [("...", k, ell) for k in range(ell)] + list(post))
        else:
            labels.append(list(spec))
    if out is None:
        counts = Counter(c for spec in specs for c in spec.replace("...", ""))
        out = ("..." if "..." in ins else "") + "".join(sorted(c for c, k in counts.items() if k == 1))
    opre, opost = out.split("...") if "..." in out else (out, None)
    if len(opre) + (max_ell + len(opost) if opost is not None else 0) != out_ndim:
        return _LOST

    def position(label: Any) -> Optional[int]:
        if isinstance(label, tuple):
            if opost is None:
                return None
            _, k, ell = label
            return len(opre) + (max_ell - ell) + k
        if label in opre:
            return opre.index(label)
        if opost is not None and label in opost:
            return len(opre) + max_ell + opost.index(label)
        return None

    placed: list[tuple[int, int]] = []
    lost = False
    for x, lab in zip(operands, labels):
        bx = _batch(x)
        if bx is None:
            continue
        if bx == _LOST or len(lab) != np.ndim(x):
            lost = True
            continue
        pos = position(lab[bx])
        if pos is not None:
            placed.append((pos, int(np.shape(x)[bx])))
    return _combine(placed, lost)


def _index_batch(b: int, ndim: int, index: Any) -> Optional[int]:
    """Where batch axis ``b`` goes under ``x[index]`` (None: one sample was picked)."""
    idx = index if isinstance(index, tuple) else (index,)
    advanced = [
        i for i in idx
        if isinstance(i, (list, np.ndarray)) and not (isinstance(i, np.ndarray) and i.ndim == 0)
    ]  # fmt: skip
    if advanced:
        if len(advanced) > 1 or np.ndim(advanced[0]) != 1:
            return _LOST
    consumed = sum(1 for i in idx if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in idx:
        if i is Ellipsis:
            expanded += [slice(None)] * (ndim - consumed)
        else:
            expanded.append(i)
    if Ellipsis not in idx:
        expanded += [slice(None)] * (ndim - consumed)
    in_dim = out_dim = 0
    for i in expanded:
        if i is None:
            out_dim += 1
            continue
        is_int = isinstance(i, (int, np.integer)) or (isinstance(i, np.ndarray) and i.ndim == 0)
        if is_int and not isinstance(i, bool):
            if in_dim == b:
                return None
            in_dim += 1
            continue
        if in_dim == b:
            return out_dim
        in_dim += 1
        out_dim += 1
    return _LOST


def _transposed_batch(b: Optional[int], ndim: int, axes: tuple[Any, ...]) -> Optional[int]:
    if b is None or b == _LOST:
        return b
    if not axes or axes == (None,):
        perm = tuple(range(ndim))[::-1]
    elif len(axes) == 1 and not isinstance(axes[0], (int, np.integer)):
        perm = tuple(int(a) for a in axes[0])
    else:
        perm = tuple(int(a) for a in axes)
    return tuple(_norm_axis(a, ndim) for a in perm).index(b)


def _swapped_batch(b: Optional[int], ndim: int, axis1: Any, axis2: Any) -> Optional[int]:
    if b is None or b == _LOST:
        return b
    a1, a2 = _norm_axis(int(axis1), ndim), _norm_axis(int(axis2), ndim)
    return a2 if b == a1 else a1 if b == a2 else b


def _squeezed_batch(b: Optional[int], shape: tuple[int, ...], axis: Any) -> Optional[int]:
    if b is None or b == _LOST:
        return b
    if axis is None:
        removed = [i for i, d in enumerate(shape) if d == 1]
    else:
        removed = [_norm_axis(int(a), len(shape)) for a in (axis if np.ndim(axis) else (axis,))]
    return None if b in removed else b - sum(1 for a in removed if a < b)


def _reshape_batch(src: "TrackedArray", shape: Sequence[int], order: str = "C") -> Optional[int]:
    b = src._gc_batch
    if b is None or b == _LOST:
        return b
    if order not in ("C", "A") or (order == "A" and not src.flags.c_contiguous):
        return _LOST
    before = math.prod(src.shape[:b])
    size = src.shape[b]
    prefix = 1
    for k, d in enumerate(shape):
        if prefix == before and d == size:
            return k
        prefix *= d
    return _LOST


class TrackedArray(np.ndarray):
    """An ``np.ndarray`` that knows which of its axes is the batch axis.

    ``grad_fn`` receives its inputs and targets as tracked views during the batch
    call of :func:`assert_gradequiv_numpy` (never otherwise). Values, dtypes and
    results are exactly those of plain arrays: every operation runs on plain
    views; the wrapper only follows the batch axis and reports elementwise ops
    that pair samples with each other (the rule is in the module docstring).

    >>> x = TrackedArray.of_batch(np.zeros((4, 3)))
    >>> (x[:, None, :] * x[:, :, None]).batch_axis      # per-sample outer product
    0
    >>> x.T.batch_axis, x.sum(axis=0).batch_axis
    (1, None)
    """

    _gc_batch: Optional[int] = None

    @classmethod
    def of_batch(cls, a: np.ndarray, axis: int = 0) -> "TrackedArray":
        """A tracked view of ``a`` whose batch axis is ``axis``."""
        return _track(np.asarray(a), _norm_axis(axis, np.ndim(a)))

    @property
    def batch_axis(self) -> Optional[int]:
        """The batch axis, ``None`` if there is none, ``-1`` if it was lost."""
        return self._gc_batch

    def __array_finalize__(self, obj: Any) -> None:
        b = getattr(obj, "_gc_batch", None)
        if b is None:
            self._gc_batch = None
        elif getattr(obj, "shape", None) == self.shape:
            self._gc_batch = b
        else:
            self._gc_batch = _LOST

    # -- ufuncs -------------------------------------------------------------------------------
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True
        out = kwargs.get("out")
        if out is not None:
            kwargs["out"] = tuple(_unwrap(o) for o in out)
        if "where" in kwargs:
            kwargs["where"] = _unwrap(kwargs["where"])
        raw = [_unwrap(x) for x in inputs]
        batch: Optional[int] = None
        if method == "__call__" and ufunc.signature is None:
            try:
                out_ndim = max((np.ndim(x) for x in inputs), default=0)
                placed, lost = _elementwise(inputs, out_ndim)
            except Exception:  # bookkeeping must never break the user's computation
                placed, lost = [], True
            if len(inputs) >= 2:
                _check_pairing(ufunc.__name__, inputs, placed)
            batch = _combine(placed, lost)
            result = ufunc(*raw, **kwargs)
        else:
            result = getattr(ufunc, method)(*raw, **kwargs)
            batch = _safe(self._other_batch, ufunc, method, inputs, kwargs, result)
        if out is not None and all(o is not None for o in out):
            return out[0] if len(out) == 1 else tuple(out)
        if isinstance(result, tuple):
            return tuple(_wrap(r, batch) for r in result)
        return _wrap(result, batch)

    @staticmethod
    def _other_batch(
        ufunc: np.ufunc, method: str, inputs: Sequence[Any], kwargs: Mapping[str, Any], result: Any
    ) -> Optional[int]:
        if method == "__call__" and ufunc is np.matmul and len(inputs) == 2:
            return _matmul_batch(inputs[0], inputs[1], np.ndim(result))
        if method in ("reduce", "accumulate"):
            return TrackedArray._reduced_batch(inputs[0], method, kwargs)
        # other gufuncs, reduceat, outer, at
        return _LOST if any(_batch(x) is not None for x in inputs) else None

    @staticmethod
    def _reduced_batch(x: Any, method: str, kwargs: Mapping[str, Any]) -> Optional[int]:
        b = _batch(x)
        if b is None or b == _LOST:
            return b
        n = np.ndim(x)
        axis = kwargs.get("axis", 0)
        axes = tuple(range(n)) if axis is None else (axis,) if np.ndim(axis) == 0 else tuple(axis)
        axes = tuple(_norm_axis(int(a), n) for a in axes)
        if method == "accumulate":
            return _LOST if b in axes else b
        if b in axes:
            return None  # summed over the samples
        if kwargs.get("keepdims", False):
            return b
        return b - sum(1 for a in axes if a < b)

    # -- numpy functions ----------------------------------------------------------------------
    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        __tracebackhide__ = True
        handler = _FUNCTIONS.get(func)
        if handler is not None:
            return handler(*args, **kwargs)
        if func in _THROUGH_METHODS:
            return super().__array_function__(func, types, args, kwargs)
        return func(*_unwrap(args), **_unwrap(kwargs))

    # -- methods that move axes -----------------------------------------------------------------
    def __getitem__(self, index: Any) -> Any:
        result = super().__getitem__(index)
        if isinstance(result, TrackedArray):
            b = self._gc_batch
            if b is not None and b != _LOST:
                try:
                    b = _index_batch(b, self.ndim, index)
                except Exception:  # an index form we do not follow
                    b = _LOST
            result._gc_batch = b if b is None or b == _LOST or b < result.ndim else _LOST
        return result

    def reshape(self, *shape: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        result = super().reshape(*shape, **kwargs)
        return _wrap(result, _safe(_reshape_batch, self, result.shape, kwargs.get("order", "C")))

    def ravel(self, order: Any = "C") -> Any:  # type: ignore[override]
        result = super().ravel(order)
        return _wrap(result, _safe(_reshape_batch, self, result.shape, order or "C"))

    def flatten(self, order: Any = "C") -> Any:  # type: ignore[override]
        result = super().flatten(order)
        return _wrap(result, _safe(_reshape_batch, self, result.shape, order or "C"))

    def transpose(self, *axes: Any) -> Any:  # type: ignore[override]
        result = super().transpose(*axes)
        return _wrap(result, _safe(_transposed_batch, self._gc_batch, self.ndim, axes))

    @property
    def T(self) -> Any:  # type: ignore[override]
        return self.transpose()

    @property
    def mT(self) -> Any:  # type: ignore[override]
        if self.ndim < 2:
            return super().mT
        return self.swapaxes(-1, -2)

    def swapaxes(self, axis1: Any, axis2: Any) -> Any:  # type: ignore[override]
        result = super().swapaxes(axis1, axis2)
        return _wrap(result, _safe(_swapped_batch, self._gc_batch, self.ndim, axis1, axis2))

    def squeeze(self, axis: Any = None) -> Any:  # type: ignore[override]
        result = super().squeeze(axis)
        return _wrap(result, _safe(_squeezed_batch, self._gc_batch, self.shape, axis))

    def dot(self, b: Any, out: Any = None) -> Any:  # type: ignore[override]
        return _dot(self, b, out=out)


def _dot(a: Any, b: Any, out: Any = None) -> Any:
    result = np.dot(_unwrap(a), _unwrap(b), out=_unwrap(out))
    if out is not None:
        return out
    return _wrap(result, _safe(_dot_batch, a, b, np.ndim(result)))


def _tensordot(a: Any, b: Any, axes: Any = 2) -> Any:
    result = np.tensordot(_unwrap(a), _unwrap(b), axes=_unwrap(axes))
    return _wrap(result, _safe(_tensordot_batch, a, b, axes))


def _einsum(*operands: Any, **kwargs: Any) -> Any:
    out = kwargs.get("out")
    result = np.einsum(*_unwrap(operands), **_unwrap(kwargs))
    if out is not None:
        return out
    if operands and isinstance(operands[0], str):
        return _wrap(result, _safe(_einsum_batch, operands[0], operands[1:], np.ndim(result)))
    return _wrap(result, _LOST if any(_batch(x) is not None for x in operands) else None)


def _where(condition: Any, *xy: Any) -> Any:
    __tracebackhide__ = True
    if len(xy) != 2:
        return np.where(_unwrap(condition), *_unwrap(xy))
    operands = (condition, *xy)
    try:
        placed, lost = _elementwise(operands, max(np.ndim(x) for x in operands))
    except Exception:  # bookkeeping must never break the user's computation
        placed, lost = [], True
    _check_pairing("where", operands, placed)
    return _wrap(np.where(*_unwrap(operands)), _combine(placed, lost))


def _joined_batch(arrays: Sequence[Any], axis: Optional[int], new_axis: bool) -> Optional[int]:
    """The batch axis of ``concatenate``/``stack`` of ``arrays`` along ``axis``."""
    batches = [_batch(a) for a in arrays]
    known = {b for b in batches if b is not None}
    if not known:
        return None
    if _LOST in known or len(known) > 1 or axis is None:
        return _LOST
    b = known.pop()
    ndim = np.ndim(arrays[0]) + (1 if new_axis else 0)
    ax = _norm_axis(int(axis), ndim)
    if new_axis:
        return b if b < ax else b + 1
    return _LOST if ax == b else b  # joining along the batch axis mixes samples


def _concatenate(arrays: Sequence[Any], axis: Optional[int] = 0, **kwargs: Any) -> Any:
    result = np.concatenate(_unwrap(list(arrays)), axis, **_unwrap(kwargs))
    if kwargs.get("out") is not None:
        return kwargs["out"]
    return _wrap(result, _safe(_joined_batch, list(arrays), axis, False))


def _hstack(arrays: Sequence[Any], **kwargs: Any) -> Any:
    arrays = list(arrays)
    result = np.hstack(_unwrap(arrays), **kwargs)
    return _wrap(result, _safe(_joined_batch, arrays, 0 if np.ndim(arrays[0]) == 1 else 1, False))


def _stack(arrays: Sequence[Any], axis: int = 0, **kwargs: Any) -> Any:
    arrays = list(arrays)
    result = np.stack(_unwrap(arrays), axis, **_unwrap(kwargs))
    if kwargs.get("out") is not None:
        return kwargs["out"]
    return _wrap(result, _safe(_joined_batch, arrays, axis, True))


_FUNCTIONS: dict[Any, Callable[..., Any]] = {
    np.dot: _dot,
    np.tensordot: _tensordot,
    np.einsum: _einsum,
    np.where: _where,
    np.concatenate: _concatenate,
    np.hstack: _hstack,
    np.stack: _stack,
}

# Functions whose NumPy implementation calls the array's own methods and ufuncs,
# which the tracked array follows: let them run on the tracked array.
_THROUGH_METHODS = frozenset(
    f
    for f in (
        np.sum, np.mean, np.prod, np.max, np.min, np.amax, np.amin, np.std, np.var,
        np.reshape, np.ravel, np.transpose, np.squeeze, np.expand_dims, np.moveaxis,
        np.swapaxes, np.clip, np.zeros_like, np.ones_like, np.empty_like, np.full_like,
        np.copy, np.shape, np.ndim, np.size,
    )
    if f is not None
)  # fmt: skip


# =========================================================================== finite differences


@dataclass(frozen=True)
class FDEntry:
    """One checked coordinate: its index, the analytic and the numerical derivative."""

    index: tuple[int, ...]
    analytic: float
    numeric: float


@dataclass(frozen=True)
class FDParam:
    """Figures of one parameter in :func:`assert_grad_numpy`.

    ``rel_err`` is ``max_abs_err`` over the parameter's gradient scale (the largest
    magnitude of either gradient at the checked coordinates); ``allowed`` is
    ``atol + rtol * scale + noise``; ``ratio`` is the least-squares factor
    analytic/numeric over the checked coordinates (``scale_fits`` when that factor
    explains the whole difference); ``worst`` holds the entries with the largest
    errors, worst first.
    """

    name: str
    shape: tuple[int, ...]
    checked: int
    numel: int
    max_abs_err: float
    rel_err: float
    allowed: float
    ratio: float
    worst: tuple[FDEntry, ...]
    scale_fits: bool = False  # analytic == ratio * numeric within the tolerance
    loss_flat: bool = False  # the loss did not move at any checked coordinate

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.allowed


@dataclass
class FiniteDifferenceReport:
    """The figures of a finite-difference check. ``str(report)`` renders it.

    >>> import numpy as np
    >>> def loss(p, x, y): return float(np.sum(p["w"] ** 2))
    >>> def grad(p, x, y): return {"w": 2 * p["w"]}
    >>> report = assert_grad_numpy(loss, grad, {"w": np.arange(3.0)}, np.zeros((2, 1)))
    >>> print(report.summary())
    Analytic gradients match central finite differences (1 parameter, float64).
    """

    passed: bool
    params: tuple[FDParam, ...]
    eps: float
    rtol: float
    atol: float
    noise: float
    loss: float
    seed: int
    max_coords: int
    batch_size: Optional[int] = None
    check: str = "finite-difference"
    backend: str = "numpy"
    dtype: str = "float64"
    device: str = "cpu"
    reference_method: str = "central differences"
    rounding: bool = False
    broadcasts: tuple[Any, ...] = ()
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def failing(self) -> tuple[FDParam, ...]:
        return tuple(p for p in self.params if not p.passed)

    @property
    def parameters(self) -> tuple[FDParam, ...]:
        return self.params

    def summary(self) -> str:
        """The one-line verdict."""
        n = len(self.params)
        if self.passed:
            plural = "s" if n != 1 else ""
            return f"Analytic gradients match central finite differences ({n} parameter{plural}, float64)."
        bad = self.failing
        names = ", ".join(p.name for p in bad[:4]) + (", ..." if len(bad) > 4 else "")
        return (
            f"Analytic gradients do NOT match central finite differences: {len(bad)} of {n} "
            f"parameter{'s' if n != 1 else ''} differ ({names})."
        )

    def __str__(self) -> str:
        return _render_fd(self)


def _fmt(x: float) -> str:
    if x is None or math.isnan(x):
        return "—"
    if math.isinf(x):
        return "inf"
    return "0" if x == 0 else f"{x:.2e}"


def _fmt_shape(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def _columns(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _fd_causes(report: FiniteDifferenceReport) -> tuple[list[str], list[str]]:
    bad = report.failing
    ok = [p for p in report.params if p.passed]
    causes: list[str] = []
    advice: list[str] = []
    factors = [p.ratio for p in bad]
    scaled = (
        bool(bad)
        and all(p.scale_fits for p in bad)
        and all(abs(f - factors[0]) <= 1e-3 * abs(factors[0]) for f in factors)
    )
    if scaled:
        f = factors[0]
        txt = f"{f:.4g}" if abs(f - round(f)) > 1e-3 * max(1.0, abs(f)) else str(int(round(f)))
        names = ", ".join(p.name for p in bad)
        extra = ""
        b = report.batch_size
        if b and abs(f - b) <= 1e-3 * b:
            extra = f" (B={b}: the gradient is summed over the batch where the loss averages)"
        elif b and abs(f * b - 1) <= 1e-3:
            extra = f" (1/B, B={b}: the gradient is averaged where the loss sums)"
        elif abs(f + 1) <= 1e-3:
            extra = " (the sign is flipped: descent would climb)"
        elif abs(f - 2) <= 2e-3 or abs(f - 0.5) <= 1e-3:
            extra = " (a factor 2: the derivative of x**2 is 2*x; check the 0.5 in the loss)"
        causes.append(
            f"the analytic gradient of {names} is {txt} times the numerical one{extra}; "
            "the directions agree, only the scale is off."
        )
        advice.append(
            "make grad_fn and loss_fn agree on the scale of the loss (mean or sum over the batch, constant factors)."
        )
    elif bad and all(p.loss_flat for p in bad):
        names = ", ".join(p.name for p in bad)
        causes.append(
            f"loss_fn does not change when {names} change{'s' if len(bad) == 1 else ''}: it ignores "
            "the params it is given (does it read a global or captured array?), or the parameter "
            "does not enter the loss."
        )
        advice.append("compute the loss from the params argument, as grad_fn does.")
    elif bad:
        names = ", ".join(p.name for p in bad)
        causes.append(
            f"the analytic gradient of {names} does not follow loss_fn: a derivative in the backward "
            "pass is wrong (an activation's derivative, a missing or extra transpose, a wrong index)."
        )
        if ok:
            causes.append(
                f"{', '.join(p.name for p in ok)} match{'es' if len(ok) == 1 else ''}: backprop carries an "
                "error backwards, so the faulty step sits after the mismatching parameters and before "
                "the matching ones in the forward pass."
            )
        advice.append(
            "re-derive the backward step of the layer that owns the first mismatching parameter "
            "(e.g. sigmoid'(z) = s * (1 - s) with s = sigmoid(z)), and check each layer's backward on "
            "its own with assert_grad_numpy."
        )
    return causes, advice


def _render_fd(report: FiniteDifferenceReport) -> str:
    lines = [report.summary(), ""]
    checked = []
    for p in report.params:
        if p.checked < p.numel:
            checked.append(f"{p.name}: {p.checked} of {p.numel} entries sampled")
    ctx = f"float64 · central differences, eps={report.eps:g} · loss {report.loss:.6g}"
    if report.batch_size:
        ctx = f"batch of {report.batch_size} · " + ctx
    lines.append(ctx)
    if checked:
        lines.append(f"Coordinates (seed={report.seed}, max_coords={report.max_coords}): " + "; ".join(checked))
    lines.append(
        f"Compared with (loss(p + eps) - loss(p - eps)) / (2 eps) (rtol={report.rtol:g}, atol={report.atol:g}, "
        f"finite-difference noise {_fmt(report.noise)}; a parameter matches when "
        "max|analytic - numeric| <= atol + rtol * max|gradient| + noise):"
    )
    lines.append("")
    params = sorted(report.params, key=lambda p: (p.passed, -p.rel_err))
    rows = [("parameter", "shape", "checked", "max abs err", "rel err", "allowed", "ratio", "")]
    for p in params:
        rows.append(
            (
                p.name, _fmt_shape(p.shape), f"{p.checked}/{p.numel}", _fmt(p.max_abs_err), _fmt(p.rel_err),
                _fmt(p.allowed), "—" if not math.isfinite(p.ratio) else f"{p.ratio:.4g}",
                "ok" if p.passed else "MISMATCH",
            )
        )  # fmt: skip
    lines.extend(_columns(rows))
    if not report.passed:
        lines.append("")
        lines.append("Worst entries:")
        rows = [("parameter", "index", "analytic", "numeric", "abs err")]
        for p in report.failing:
            for e in p.worst:
                rows.append(
                    (
                        p.name, str(e.index), f"{e.analytic:.6g}", f"{e.numeric:.6g}",
                        _fmt(abs(e.analytic - e.numeric)),
                    )
                )  # fmt: skip
        lines.extend(_columns(rows))
        causes, advice = _fd_causes(report)
        if causes:
            lines.append("")
            lines.append("Cause: " + causes[0])
            lines.extend("  " + c for c in causes[1:])
        if advice:
            lines.append("")
            lines.append("What to do: " + advice[0])
            lines.extend("  " + a for a in advice[1:])
    if report.notes:
        lines.append("")
        lines.append("Notes:")
        lines.extend(f"  - {n}" for n in report.notes)
    return "\n".join(lines)


def _coordinates(analytic: np.ndarray, max_coords: int, rng: np.random.Generator) -> np.ndarray:
    """Flat indices to check: all, or the largest analytic entry plus a seeded sample."""
    n = analytic.size
    if n <= max_coords:
        return np.arange(n)
    top = int(np.argmax(np.abs(analytic).reshape(-1)))
    others = np.delete(np.arange(n), top)
    picked = rng.choice(others, size=max_coords - 1, replace=False)
    return np.concatenate([[top], np.sort(picked)])


def _finite_differences(
    loss_fn: LossFn,
    grad_fn: GradFn,
    p: _Params,
    xs: _Arrays,
    ys: Optional[_Arrays],
    eps: float,
    rtol: float,
    atol: float,
    max_coords: int,
    seed: int,
) -> FiniteDifferenceReport:
    __tracebackhide__ = True

    def args() -> tuple[Any, Any]:
        x = xs.build([_copy(a, True) for a in xs.arrays])
        y = None if ys is None else ys.build([_copy(a, True) for a in ys.arrays])
        return x, y

    base = [_copy(a, True) for a in p.arrays]
    x, y = args()
    analytic = p.collect(grad_fn(p.build([a.copy() for a in base]), x, y), "the float64 call")
    for name, label in zip(p.names, p.labels):
        g = analytic[name]
        if not np.all(np.isfinite(g)):
            raise InvalidArgument(
                f"the gradient of {label} returned by grad_fn has non-finite entries (NaN or inf): "
                "it cannot be compared with finite differences"
            )

    def loss_at(k: int, flat: int, value: float) -> float:
        arrays = [a.copy() for a in base]
        arrays[k].reshape(-1)[flat] = value
        x, y = args()
        return _as_loss(loss_fn(p.build(arrays), x, y), f"{p.labels[k]} perturbed at entry {flat}")

    x, y = args()
    loss0 = _as_loss(loss_fn(p.build([a.copy() for a in base]), x, y), "the unperturbed params")
    rng = np.random.default_rng(seed)
    rows: list[FDParam] = []
    max_loss = abs(loss0)
    numerics: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for k, name in enumerate(p.names):
        a = analytic[name].reshape(-1)
        coords = _coordinates(a, max_coords, rng)
        num = np.empty(coords.size, dtype=np.float64)
        flat_base = base[k].reshape(-1)
        for j, c in enumerate(coords):
            v = float(flat_base[c])
            lp = loss_at(k, int(c), v + eps)
            lm = loss_at(k, int(c), v - eps)
            max_loss = max(max_loss, abs(lp), abs(lm))
            num[j] = (lp - lm) / (2 * eps)
        numerics.append((coords, a[coords], num))
    noise = 64 * np.finfo(np.float64).eps * max_loss / eps
    for (coords, a_c, num), name, arr in zip(numerics, p.names, p.arrays):
        if coords.size == 0:
            rows.append(FDParam(name, tuple(arr.shape), 0, int(arr.size), 0.0, 0.0, atol, float("nan"), ()))
            continue
        diff = np.abs(a_c - num)
        scale = float(max(np.abs(a_c).max(), np.abs(num).max()))
        allowed = atol + rtol * scale + noise
        max_abs = float(diff.max())
        nn = float(np.dot(num, num))
        ratio = float(np.dot(a_c, num) / nn) if nn > 0 else float("nan")
        fits = (
            math.isfinite(ratio)
            and ratio != 0
            and float(np.abs(a_c - ratio * num).max()) <= (atol + rtol * scale + noise * max(1.0, abs(ratio)))
        )
        order = np.argsort(-diff, kind="stable")[:3]
        worst = tuple(
            FDEntry(tuple(int(i) for i in np.unravel_index(int(coords[o]), arr.shape)), float(a_c[o]), float(num[o]))
            for o in order
        )
        rows.append(
            FDParam(
                name, tuple(arr.shape), int(coords.size), int(arr.size), max_abs,
                max_abs / scale if scale > 0 else 0.0, allowed, ratio, worst, fits, not np.any(num),
            )
        )  # fmt: skip
    b = int(xs.arrays[0].shape[0]) if xs.arrays[0].ndim else None
    return FiniteDifferenceReport(
        passed=all(r.passed for r in rows), params=tuple(rows), eps=eps, rtol=rtol, atol=atol,
        noise=float(noise), loss=loss0, seed=seed, max_coords=max_coords, batch_size=b,
    )  # fmt: skip
