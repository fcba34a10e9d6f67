"""Randomness in a training step: dropout neutralised where it is applied, other draws found.

The batch run and the per-sample runs of a check must compute the same function,
so nothing random may differ between them. Dropout is switched off **at the ops**
(``F.dropout`` and its variants, ``scaled_dot_product_attention``'s ``dropout_p``,
``torch.dropout``...), not only where a module holds it: libraries apply dropout
functionally with a rate read from a module (``self.attn_dropout.p if
self.training else 0.0``) or kept in a plain float attribute, and no module switch
reaches those. Nothing the user can observe is changed: modules, flags and rates
stay as they are; only the ops see ``training=False`` / ``dropout_p=0``.

Any other random draw (``torch.randn_like``, ``torch.rand``, a ``bernoulli_``
mask, NumPy's or Python's global generator) is recorded with the user's
``file:line``; see :class:`Watch`.
"""

from __future__ import annotations

import random
import sys
import threading
from typing import Any, Optional

import torch

__all__ = ["DropoutOff", "NeutralDropout", "Watch", "RandomDraw"]


def _rate(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return 0.0


def _dropout_table() -> dict[Any, tuple[str, int, str, int, str]]:
    """func -> (name, index of p, keyword of p, index of the training flag, its keyword).

    The training flag index -1 means the op has none: its rate is set to 0 instead.
    """
    F = torch.nn.functional
    table: dict[Any, tuple[str, int, str, int, str]] = {}
    for fn in (F.dropout, F.alpha_dropout, F.feature_alpha_dropout, F.dropout1d, F.dropout2d, F.dropout3d):
        table[fn] = (f"F.{fn.__name__}", 1, "p", 2, "training")
    variants: tuple[tuple[Any, str], ...] = (
        (torch.dropout, "torch.dropout"),
        (torch.alpha_dropout, "torch.alpha_dropout"),
        (torch.feature_dropout, "torch.feature_dropout"),
        (torch.feature_alpha_dropout, "torch.feature_alpha_dropout"),
        (torch.native_dropout, "torch.native_dropout"),
    )
    for fn, name in variants:
        table[fn] = (name, 1, "p", 2, "train")
    table[F.scaled_dot_product_attention] = ("scaled_dot_product_attention", 4, "dropout_p", -1, "")
    return table


def _random_ops() -> dict[Any, str]:
    ops: dict[Any, str] = {}
    for name in (
        "rand",
        "randn",
        "randint",
        "randperm",
        "rand_like",
        "randn_like",
        "randint_like",
        "bernoulli",
        "normal",
        "poisson",
        "multinomial",
        "binomial",
    ):
        fn = getattr(torch, name, None)
        if fn is not None:
            ops[fn] = f"torch.{name}"
    for name in (
        "uniform_",
        "normal_",
        "bernoulli_",
        "bernoulli",
        "random_",
        "exponential_",
        "geometric_",
        "log_normal_",
        "cauchy_",
        "multinomial",
    ):
        fn = getattr(torch.Tensor, name, None)
        if fn is not None:
            ops[fn] = f"Tensor.{name}"
    F = torch.nn.functional
    for name in ("rrelu", "gumbel_softmax"):
        fn = getattr(F, name, None)
        if fn is not None:
            ops[fn] = f"F.{name}"
    return ops


_TABLES: dict[str, Any] = {}


def _tables() -> tuple[dict[Any, tuple[str, int, str, int, str]], dict[Any, str]]:
    if not _TABLES:
        _TABLES["dropout"] = _dropout_table()
        _TABLES["random"] = _random_ops()
    return _TABLES["dropout"], _TABLES["random"]


class RandomDraw:
    """A random op the step called, and where in the user's code."""

    def __init__(self, op: str, where: Optional[str]) -> None:
        self.op = op
        self.where = where

    def __str__(self) -> str:
        return f"{self.op} at {self.where}" if self.where else self.op


def _where() -> Optional[str]:
    from ..broadcast import user_frame

    try:
        path, line, _ = user_frame()
    except Exception:  # noqa: BLE001 - a location is a nicety
        return None
    return f"{path}:{line}" if path else None


def _mode_class() -> type:
    from torch.overrides import TorchFunctionMode

    class _Mode(TorchFunctionMode):
        def __init__(self, owner: "NeutralDropout") -> None:
            super().__init__()
            self.owner = owner
            self.dropout, self.random = _tables()

        def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            spec = self.dropout.get(func)
            if spec is not None:
                args, kwargs = self.owner._neutralise(spec, args, kwargs)
                return func(*args, **kwargs)
            name = self.random.get(func)
            if name is not None and self.owner.draws is not None and len(self.owner.draws) < 8:
                self.owner.draws.append(RandomDraw(name, _where()))
            return func(*args, **kwargs)

    return _Mode


_MODE: list[type] = []


class NeutralDropout:
    """A context manager: inside it, every dropout op runs as in eval mode, and random ops are recorded.

    ``neutralised`` collects ``"name(p=...)"`` for each distinct dropout op that
    would have dropped something; ``draws`` (when ``record_draws``) the other random
    ops called, with their user ``file:line``.

    >>> import torch
    >>> x = torch.ones(4)
    >>> with NeutralDropout() as nd:
    ...     y = torch.nn.functional.dropout(x, p=0.5, training=True)
    >>> bool((y == x).all()), nd.neutralised
    (True, ['F.dropout(p=0.5)'])
    """

    def __init__(self, record_draws: bool = True) -> None:
        self.neutralised: list[str] = []
        self.draws: Optional[list[RandomDraw]] = [] if record_draws else None
        self._mode: Any = None

    def _neutralise(
        self, spec: tuple[str, int, str, int, str], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        name, p_i, p_kw, t_i, t_kw = spec
        args_l = list(args)
        p = args_l[p_i] if len(args_l) > p_i else kwargs.get(p_kw, 0.5 if t_i >= 0 else 0.0)
        if t_i >= 0:
            training = args_l[t_i] if len(args_l) > t_i else kwargs.get(t_kw, True)
            active = bool(training) and _rate(p) > 0
            if active:
                if len(args_l) > t_i:
                    args_l[t_i] = False
                else:
                    kwargs = {**kwargs, t_kw: False}
        else:
            active = _rate(p) > 0
            if active:
                if len(args_l) > p_i:
                    args_l[p_i] = 0.0
                else:
                    kwargs = {**kwargs, p_kw: 0.0}
        if active:
            label = f"{name}(p={_rate(p):g})"
            if label not in self.neutralised:
                self.neutralised.append(label)
        return tuple(args_l), kwargs

    def __enter__(self) -> "NeutralDropout":
        if not _MODE:
            _MODE.append(_mode_class())
        self._mode = _MODE[0](self)
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._mode.__exit__(*exc)
        self._mode = None


# --------------------------------------------------------------------------- the passing path

_PATCH_LOCK = threading.Lock()
_PATCHED: dict[tuple[Any, str], Any] = {}  # (namespace, name) -> the original function
_PATCH_USERS = [0]
_WRAPPERS: dict[tuple[Any, str], tuple[Any, Any]] = {}  # built once: (original, neutral wrapper)
_local = threading.local()


def _namespaces() -> list[tuple[Any, str]]:
    F = torch.nn.functional
    names = [
        (F, n)
        for n in (
            "dropout",
            "alpha_dropout",
            "feature_alpha_dropout",
            "dropout1d",
            "dropout2d",
            "dropout3d",
            "scaled_dot_product_attention",
        )
    ]
    names += [
        (torch, n) for n in ("dropout", "alpha_dropout", "feature_dropout", "feature_alpha_dropout", "native_dropout")
    ]
    return [(ns, n) for ns, n in names if hasattr(ns, n)]


def _wrapper(original: Any, spec: tuple[str, int, str, int, str]) -> Any:
    def neutral(*args: Any, **kwargs: Any) -> Any:
        stack = getattr(_local, "stack", None)
        if stack:  # this thread is inside a check: run the op as in eval mode
            args, kwargs = stack[-1]._neutralise(spec, args, kwargs)
        return original(*args, **kwargs)

    neutral.__wrapped__ = original  # type: ignore[attr-defined]
    neutral.__name__ = getattr(original, "__name__", "dropout")
    neutral.__doc__ = getattr(original, "__doc__", None)
    return neutral


class DropoutOff:
    """Dropout ops neutralised for the current thread, at no cost per op (the passing path).

    The dropout functions of ``torch.nn.functional`` and ``torch`` (``F.dropout`` and its
    variants, ``scaled_dot_product_attention``'s ``dropout_p``, ``torch.dropout``) are
    replaced, while any check runs, by wrappers that pass ``training=False`` /
    ``dropout_p=0`` when the calling thread is inside a check, and call through
    unchanged otherwise. Code looks these functions up on the module at call time
    (``F.dropout``, ``nn.functional.dropout``, ``torch.nn.functional.scaled_dot_product_attention``),
    as torch.nn and transformers do. Dropout reached another way (a name bound by
    ``from ... import``, a ``bernoulli_`` mask) is not neutralised: it shows as
    randomness when a check fails (:class:`NeutralDropout` records it by name).

    >>> import torch
    >>> with DropoutOff() as off:
    ...     y = torch.nn.functional.dropout(torch.ones(4), p=0.5, training=True)
    >>> bool((y == 1).all()), off.neutralised
    (True, ['F.dropout(p=0.5)'])
    """

    def __init__(self) -> None:
        self.neutralised: list[str] = []

    _neutralise = None  # set below: shared with NeutralDropout

    def __enter__(self) -> "DropoutOff":
        with _PATCH_LOCK:
            if _PATCH_USERS[0] == 0:
                if not _WRAPPERS:
                    table, _ = _tables()
                    for ns, name in _namespaces():
                        original = getattr(ns, name)
                        if original in table:
                            _WRAPPERS[(ns, name)] = (original, _wrapper(original, table[original]))
                for (ns, name), (original, neutral) in _WRAPPERS.items():
                    if getattr(ns, name) is original:  # leave alone what someone else replaced
                        _PATCHED[(ns, name)] = original
                        setattr(ns, name, neutral)
            _PATCH_USERS[0] += 1
        stack = getattr(_local, "stack", None)
        if stack is None:
            stack = _local.stack = []
        stack.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _local.stack.pop()
        with _PATCH_LOCK:
            _PATCH_USERS[0] -= 1
            if _PATCH_USERS[0] == 0:
                for (ns, name), original in _PATCHED.items():
                    setattr(ns, name, original)
                _PATCHED.clear()


DropoutOff._neutralise = NeutralDropout._neutralise  # type: ignore[assignment]


class Watch:
    """Whether the global generators moved during a block (torch CPU/CUDA, NumPy, Python).

    >>> import torch
    >>> with Watch() as w:
    ...     _ = torch.rand(1)
    >>> w.moved
    ['torch']
    """

    def __init__(self) -> None:
        self.moved: list[str] = []

    def __enter__(self) -> "Watch":
        from .state import NumpyGlobalRNG

        self._torch = torch.get_rng_state()
        initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
        self._cuda = torch.cuda.get_rng_state_all() if initialized else None
        self._py = random.getstate()
        self._np = NumpyGlobalRNG.watch() if "numpy" in sys.modules else None
        return self

    def __exit__(self, *exc: Any) -> None:
        if not torch.equal(torch.get_rng_state(), self._torch):
            self.moved.append("torch")
        if self._cuda is not None:
            now = torch.cuda.get_rng_state_all()
            if any(not torch.equal(a, b) for a, b in zip(now, self._cuda)):
                self.moved.append("torch.cuda")
        if random.getstate() != self._py:
            self.moved.append("random")
        if self._np is not None and self._np.moved():
            self.moved.append("numpy")
