"""What the NumPy checks are given, validated: params, inputs and targets, batch size, weights,
what ``grad_fn`` and ``loss_fn`` return; and the guard that leaves the caller's arrays as found."""

from __future__ import annotations

import contextlib
import math
import random
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt

from .._options import check_batch_sizes
from .._weights import read_weights
from ..errors import InvalidArgument

__all__ = [
    "Array",
    "ParamsArg",
    "BatchArg",
    "GradFn",
    "LossFn",
    "WeightsArg",
    "Params",
    "Arrays",
    "batch_size_of",
    "copy_array",
    "resolve_weights",
    "as_loss",
    "same_bytes",
    "rng_fingerprint",
    "left_as_found",
]

Array = npt.NDArray[Any]
#: ``params``: a dict of arrays, a list/tuple of arrays, or one array (floating dtypes).
ParamsArg = Union[Array, Mapping[Any, Array], Sequence[Array]]
#: ``inputs``/``targets``: one array or a tuple/list of arrays, the batch on axis 0.
BatchArg = Union[Array, Sequence[Array]]
#: ``grad_fn(params, inputs, targets)``, called with copies in the structures the caller passed;
#: it returns the gradient in the structure of ``params``.
GradFn = Callable[[Any, Any, Any], object]
#: ``loss_fn(params, inputs, targets)``, called as ``grad_fn`` is; it returns one number.
LossFn = Callable[[Any, Any, Any], object]
#: B per-sample weights, or a callable on one sample's targets (a batch of one).
WeightsArg = Union[None, Array, Sequence[float], Callable[[Any], object]]


def _label_key(key: Any) -> str:
    return f"params[{key!r}]"


class Params:
    """The user's parameters: names for the report, labels for errors, the arrays."""

    def __init__(self, kind: str, keys: list[Any], arrays: list[Array], container: type) -> None:
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
    def from_user(cls, params: object) -> "Params":
        if isinstance(params, np.ndarray):
            _check_param(params, "params")
            return cls("array", [None], [params], np.ndarray)
        if isinstance(params, Mapping):
            if not params:
                raise InvalidArgument("params is an empty dict: there is no gradient to check")
            keys = list(params)
            return cls("dict", keys, [_check_param(params[k], _label_key(k)) for k in keys], dict)
        if isinstance(params, (list, tuple)):
            if not params:
                raise InvalidArgument(f"params is an empty {type(params).__name__}: there is no gradient to check")
            arrays = [_check_param(a, f"params[{i}]") for i, a in enumerate(params)]
            return cls("seq", list(range(len(params))), arrays, type(params) if type(params) in (list, tuple) else list)
        raise InvalidArgument(
            f"params is a {type(params).__name__}: pass a dict of NumPy arrays ({{'W1': W1, 'b1': b1}}), "
            "a list/tuple of arrays, or one array"
        )

    def build(self, arrays: Sequence[Array]) -> Any:
        """``arrays`` in the structure the caller passed ``params`` in."""
        if self.kind == "array":
            return arrays[0]
        if self.kind == "dict":
            return dict(zip(self.keys, arrays))
        return self.container(arrays)

    def copies(self, float64: bool) -> list[Array]:
        return [copy_array(a, float64) for a in self.arrays]

    def collect(self, grads: object, where: str) -> dict[str, Array]:
        """Validate what ``grad_fn`` returned against ``params``; float64 copies by name."""
        if self.kind == "dict":
            if not isinstance(grads, Mapping):
                raise InvalidArgument(
                    f"grad_fn returned a {type(grads).__name__} ({where}): params is a dict, so grad_fn "
                    f"must return a dict with the same keys ({', '.join(map(repr, self.keys))})"
                )
            keyset = set(self.keys)
            missing = [k for k in self.keys if k not in grads]
            extra = [k for k in grads if k not in keyset]
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
        return {
            name: _as_gradient(g, label, param, where)
            for name, label, param, g in zip(self.names, self.labels, self.arrays, values)
        }


def _check_param(a: object, label: str) -> Array:
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


def _as_gradient(g: object, label: str, param: Array, where: str) -> Array:
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


class Arrays:
    """``inputs`` or ``targets``: one array or a tuple/list of arrays, batch on axis 0."""

    def __init__(self, what: str, arrays: list[Array], container: Optional[type]) -> None:
        self.what = what
        self.arrays = arrays
        self.container = container  # None: a single array

    @classmethod
    def from_user(cls, value: object, what: str) -> "Arrays":
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

    def build(self, arrays: Sequence[Array]) -> Any:
        """``arrays`` in the structure the caller passed."""
        return arrays[0] if self.container is None else self.container(arrays)

    def sample(self, i: int) -> Any:
        """Sample ``i`` alone (a batch of one, views), in the structure the caller passed."""
        return self.build([a[i : i + 1] for a in self.arrays])


def batch_size_of(xs: Arrays, ys: Optional[Arrays]) -> int:
    """The common batch size (axis 0) of ``inputs`` and ``targets``, checked as every backend does."""
    sizes: list[tuple[str, int]] = []
    for group in (xs, ys):
        if group is None:
            continue
        for i, a in enumerate(group.arrays):
            if a.ndim == 0:
                raise InvalidArgument(f"{group.label(i)} is a 0-d array: every array needs the batch on axis 0")
            sizes.append((f"{group.label(i)} (shape {tuple(a.shape)})", int(a.shape[0])))
    return check_batch_sizes(sizes, axis="axis 0")


def copy_array(a: Array, float64: bool) -> Array:
    """A fresh copy of ``a``; floating arrays in float64 if ``float64``."""
    if float64 and np.issubdtype(a.dtype, np.floating):
        return np.array(a, dtype=np.float64)
    return np.array(a, copy=True)


def resolve_weights(weights: WeightsArg, b: int, sample_of: Callable[[int], Any]) -> Optional[Array]:
    """The declared per-sample weights as a float64 ``(b,)`` array, or None; refused as the torch check refuses.

    The torch-free twin of :func:`pytest_gradcheck._torch.inputs.resolve_weights`: the same
    forms are accepted (an array, list, tuple or range of ``b`` numbers; a callable called on
    ``sample_of(i)``, one sample's targets, that returns one number) and the same values
    refused (another shape, negative or non-finite weights, a zero sum).
    """
    return read_weights(weights, b, sample_of, forms="an array or sequence")


def as_loss(value: object, where: str) -> float:
    """What ``loss_fn`` returned for ``where``, as one finite float, or a clear error."""
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


def same_bytes(a: Array, saved: Array) -> bool:
    """``a`` holds exactly ``saved``: shape, dtype and every byte (NaNs included)."""
    if a.shape != saved.shape or a.dtype != saved.dtype:
        return False
    return bool(
        np.array_equal(
            np.ascontiguousarray(a).reshape(-1).view(np.uint8),
            np.ascontiguousarray(saved).reshape(-1).view(np.uint8),
        )
    )


def rng_fingerprint() -> tuple[object, ...]:
    """Where NumPy's global random generator stands: it changes with every draw."""
    state = np.random.get_state(legacy=True)
    if isinstance(state, dict):  # pragma: no cover - legacy=True gives the tuple
        raise TypeError("np.random.get_state(legacy=True) returned a dict")
    _, key, pos, has_gauss, gauss = state
    return (int(pos), int(has_gauss), float(gauss), key.tobytes())


@contextlib.contextmanager
def left_as_found(p: Params, xs: Arrays, ys: Optional[Arrays], who: str) -> Iterator[None]:
    """Snapshot the caller's arrays and the global RNGs; on exit (pass or fail) restore them.

    Arrays that changed are named in an :class:`~pytest_gradcheck.errors.InvalidArgument`.
    """
    __tracebackhide__ = True
    watched: list[tuple[str, Array, Array]] = [(label, a, a.copy()) for label, a in zip(p.labels, p.arrays)]
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
            if not same_bytes(a, saved):
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
