"""Everything a check could disturb, saved before it and put back after it, pass or fail.

A check runs the user's model several times (the batch, every sample alone, a
float64 re-run). Whatever those runs change must be as it was afterwards, and
every run must start from the state the user's own training step would start
from. :class:`SavedState` covers:

- parameters and buffers (by value: a write through ``.data`` does not bump the
  version counter), ``.grad``, train/eval modes, the default dtype;
- the global random generators (torch CPU and CUDA, Python's ``random``, NumPy's
  legacy ``np.random``);
- the state that lives outside the parameters: every attribute of every module
  (a tensor cached in forward, a step counter, a metric's accumulators, what a
  forward hook stores on its module), every attribute of every parameter
  (``p.grad_sample``, counters a library keeps there), and the containers that
  the model's hooks reach through their closures or their bound objects (a dict
  of activations a user's hook fills). Containers are restored in place, so
  references the user holds stay valid.

Between the runs of one check, :meth:`SavedState.touched` tells whether a run
wrote into that state (a running average updated in forward, a counter); then
:meth:`SavedState.reset` puts it back before the next run, so that every sample
of the reference runs from the same state as the batch.
"""

from __future__ import annotations

import collections
import functools
import random
import types
from typing import Any, Iterable, Optional, Sequence

import numpy as np
import torch

__all__ = ["SavedState", "NumpyGlobalRNG", "disable_dropout_modules"]

#: tensors stored as plain attributes (not parameters or buffers) up to this many
#: elements are copied, so that an in-place update (``self.total += n``) can be undone;
#: larger ones are restored by reference and watched through their version counter.
_CLONE_LIMIT = 1 << 22

#: nn.Module internals that hold no user state, or that the check restores on its own
_MODULE_SKIP = frozenset({"training", "_parameters", "_buffers", "_modules"})

_CONTAINERS = (list, dict, set, collections.deque)

#: values that hold no state of their own (restoring the attribute restores them)
_ATOMS = frozenset({int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device})

#: the registries every nn.Module carries (hooks, state-dict hooks, buffer bookkeeping)
_NN_INTERNALS = frozenset(vars(torch.nn.Module())) - {"training"}


class _Entry:
    """One object's saved contents: a container's items or an object's ``__dict__``."""

    __slots__ = ("obj", "kind", "saved", "path", "skip")

    def __init__(self, obj: Any, kind: str, path: str, skip: frozenset[str] = frozenset()) -> None:
        self.obj = obj
        self.kind = kind
        self.path = path
        self.skip = skip  # attributes left alone (nn.Module internals restored elsewhere)
        if kind == "attrs":
            d = vars(obj)
            self.saved: Any = {k: v for k, v in d.items() if k not in skip} if skip else dict(d)
        elif kind == "dict":
            self.saved = dict(obj)
        elif kind == "set":
            self.saved = set(obj)
        else:  # list, deque
            self.saved = list(obj)

    def changed(self) -> bool:
        cur = vars(self.obj) if self.kind == "attrs" else self.obj
        saved = self.saved
        if len(cur) != len(saved) + (sum(k in cur for k in self.skip) if self.skip else 0):
            return True
        if self.kind == "set":
            return bool(cur != saved)
        if self.kind in ("attrs", "dict"):
            for k, v in saved.items():
                if k not in cur or cur[k] is not v:
                    return True
            return False
        return any(a is not b for a, b in zip(cur, saved))

    def restore(self) -> None:
        obj, saved = self.obj, self.saved
        if self.kind == "attrs":
            d = vars(obj)
            for k in [k for k in d if k not in saved and k not in self.skip]:
                del d[k]
            for k, v in saved.items():
                if d.get(k, _MISSING) is not v:
                    d[k] = v
        elif self.kind == "dict":
            obj.clear()
            obj.update(saved)
        elif self.kind == "set":
            obj.clear()
            obj.update(saved)
        elif self.kind == "deque":
            obj.clear()
            obj.extend(saved)
        else:
            obj[:] = saved


_MISSING = object()


def _per_sample_shaped(value: Any, p: torch.Tensor) -> bool:
    """A tensor of shape ``(N, *p.shape)``, or a non-empty list of them."""
    if isinstance(value, list):
        return bool(value) and all(_per_sample_shaped(v, p) for v in value)
    return isinstance(value, torch.Tensor) and value.dim() == p.dim() + 1 and tuple(value.shape[1:]) == tuple(p.shape)


def _kind(value: Any) -> Optional[str]:
    if isinstance(value, dict):
        return "dict"
    if isinstance(value, list):
        return "list"
    if isinstance(value, set):
        return "set"
    if isinstance(value, collections.deque):
        return "deque"
    return None


def _is_plain_object(value: Any) -> bool:
    """An instance whose ``__dict__`` is user state (not a module, class, function or tensor)."""
    if isinstance(value, (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, torch.Tensor)):
        return False
    if isinstance(value, (str, bytes, int, float, complex, bool, type(None), *_CONTAINERS)):
        return False
    try:
        d = vars(value)
    except TypeError:
        return False
    return isinstance(d, dict)


def _hook_targets(fn: Any) -> Iterable[Any]:
    """The objects a hook can write into: its closure cells, defaults, bound object, partial args."""
    seen = 0
    while seen < 4:  # unwrap partials and bound methods a few levels deep
        seen += 1
        if isinstance(fn, functools.partial):
            yield from fn.args
            yield from fn.keywords.values()
            fn = fn.func
            continue
        if isinstance(fn, types.MethodType):
            yield fn.__self__
            fn = fn.__func__
            continue
        break
    if isinstance(fn, types.FunctionType):
        for cell in fn.__closure__ or ():
            try:
                yield cell.cell_contents
            except ValueError:  # an empty cell
                continue
        yield from fn.__defaults__ or ()
        yield from (fn.__kwdefaults__ or {}).values()
    elif _is_plain_object(fn):  # a callable object
        yield fn


_MODULE_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def _global_hooks() -> list[Any]:
    from torch.nn.modules import module as nn_module

    out: list[Any] = []
    for name in (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    ):
        out.extend(getattr(nn_module, name, {}).values())
    return out


class _AttrState:
    """Attributes of modules and parameters, and what hooks reach, saved and restorable."""

    def __init__(self, roots: Sequence[torch.nn.Module]) -> None:
        self.entries: list[_Entry] = []
        self.empty: list[Any] = []  # nn.Module registries that were empty
        self.tensors: list[tuple[torch.Tensor, int, Optional[torch.Tensor], str]] = []
        self._seen: set[int] = set()
        params: list[tuple[str, torch.Tensor]] = []
        hooks: list[Any] = []
        for root in roots:
            for mpath, module in root.named_modules(remove_duplicate=True):
                path = "model" + (f".{mpath}" if mpath else "")
                self._object(module, path, skip=_MODULE_SKIP, depth=1)
                for hname in _MODULE_HOOK_DICTS:
                    hooks.extend(getattr(module, hname, {}).values())
                for pname, p in module._parameters.items():
                    if p is not None:
                        params.append((f"{path}.{pname}", p))
        for path, p in params:
            if id(p) in self._seen:
                continue
            self._seen.add(id(p))
            if vars(p):  # most parameters carry no attributes: nothing to save
                self._object(p, path, skip=frozenset(), depth=1)
            backward = getattr(p, "_backward_hooks", None)
            hooks.extend(backward.values() if backward else ())
            post = getattr(p, "_post_accumulate_grad_hooks", None)
            hooks.extend(post.values() if post else ())
        hooks.extend(_global_hooks())
        for fn in hooks:
            for target in _hook_targets(fn):
                self._value(target, "a hook's state", depth=1)

    def _object(self, obj: Any, path: str, skip: frozenset[str], depth: int = 1) -> None:
        """Save ``obj.__dict__``; its values are saved ``depth`` levels deep (see :meth:`_value`)."""
        if id(obj) in self._seen and not isinstance(obj, torch.Tensor):
            return
        self._seen.add(id(obj))
        entry = _Entry(obj, "attrs", path, skip)
        self.entries.append(entry)
        internal = isinstance(obj, torch.nn.Module)
        for k, v in entry.saved.items():
            if type(v) in _ATOMS:
                continue  # numbers, strings, flags: restored by the attribute itself
            if internal and k in _NN_INTERNALS:
                # nn.Module's own hook and state-dict registries, nearly always empty: an
                # empty one is only emptied again on restore, a full one is saved like any dict
                if not v:
                    if isinstance(v, (dict, set)):
                        self.empty.append(v)
                    continue
            self._value(v, f"{path}.{k}", depth)

    def _value(self, v: Any, path: str, depth: int) -> None:
        """Save what ``v`` holds: a container's items (restored in place); at ``depth`` >= 1 a
        tensor's values (undoing in-place updates), the items of nested containers and the
        attributes of a plain object one level further."""
        if isinstance(v, torch.Tensor):
            if depth < 1 or isinstance(v, torch.nn.Parameter) or id(v) in self._seen:
                return
            self._seen.add(id(v))
            if v.layout != torch.strided:
                return
            try:
                version = v._version
            except RuntimeError:  # inference tensors and other exotic tensors have none
                return
            copy = v.detach().clone() if v.numel() <= _CLONE_LIMIT else None
            self.tensors.append((v, version, copy, path))
            return
        kind = _kind(v)
        if kind is not None:
            if id(v) in self._seen:
                return
            self._seen.add(id(v))
            self.entries.append(_Entry(v, kind, path))
            if depth > 0:
                items = v.values() if isinstance(v, dict) else v
                for item in list(items)[:256]:
                    if _kind(item) is not None:
                        self._value(item, path, depth - 1)
            return
        if depth > 0 and not isinstance(v, torch.nn.Module) and _is_plain_object(v):
            self._object(v, path, skip=frozenset(), depth=depth - 1)

    def changed(self) -> list[str]:
        """Paths of the state that differs from the saved one."""
        out = [e.path for e in self.entries if e.changed()]
        if any(self.empty):
            out.append("a module's hook registry")
        for t, version, _copy, path in self.tensors:
            if t._version != version and path not in out:
                out.append(path)
        return out

    def restore(self) -> None:
        for e in self.entries:
            if e.changed():
                e.restore()
        for registry in self.empty:
            if registry:
                registry.clear()
        changed = [(t, copy) for t, version, copy, _ in self.tensors if t._version != version and copy is not None]
        if changed:
            with torch.no_grad():
                for t, copy in changed:
                    t.copy_(copy)


#: in-place dunder methods of a tensor (``p += x``, ``p[i] = v``)
_INPLACE_DUNDERS = frozenset(
    {
        "__setitem__",
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
        "__ifloordiv__",
        "__imod__",
        "__ipow__",
        "__imatmul__",
        "__iand__",
        "__ior__",
        "__ixor__",
        "__ilshift__",
        "__irshift__",
    }
)


class _Slot:
    """One parameter: its version counter at the start, and a copy once something may write into it."""

    __slots__ = ("param", "version", "copy")

    def __init__(self, param: torch.Tensor) -> None:
        self.param = param
        self.version = param._version
        self.copy: Optional[torch.Tensor] = None

    def keep(self) -> None:
        """Copy the parameter's values now, before a write (once)."""
        if self.copy is None:
            with torch._C.DisableTorchFunction():
                self.copy = self.param.detach().clone()

    def written(self) -> bool:
        """Whether the parameter's values may differ from the start (a write the version counter
        saw, or one through ``.data``, compared by value)."""
        if self.copy is not None:
            return not torch.equal(self.param, self.copy)
        return self.param._version != self.version

    def restorable(self) -> bool:
        return self.copy is not None or self.param._version == self.version


class _WriteWatch:
    """A torch-function mode that copies a parameter just before the first write into it.

    Seen: in-place methods (``p.mul_``, ``p.copy_``, ``torch.nn.init`` functions), in-place
    operators and item assignment, ``out=`` arguments, ``foreach`` ops on lists of
    parameters, and ``p.data`` read or set (a write through ``.data`` bumps no version
    counter). Only the model's parameters are copied, and only those written to.
    """

    def __init__(self, slots: dict[int, _Slot]) -> None:
        from torch.overrides import TorchFunctionMode

        data = torch._C.TensorBase.__dict__["data"]
        pending = [s for s in slots.values() if s.copy is None]

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
                kwargs = kwargs or {}
                if pending:
                    name = getattr(func, "__name__", "")
                    if (
                        (name.endswith("_") and not name.startswith("_"))
                        or name in _INPLACE_DUNDERS
                        or getattr(func, "__self__", None) is data
                    ):
                        _keep(args[0] if args else None)
                    if "out" in kwargs:
                        _keep(kwargs["out"])
                return func(*args, **kwargs)

        def _keep(target: Any) -> None:
            for t in target if isinstance(target, (list, tuple)) else (target,):
                slot = slots.get(id(t)) if isinstance(t, torch.Tensor) else None
                if slot is not None and slot.param is t and slot.copy is None:
                    slot.keep()
                    pending.remove(slot)

        self.mode = Mode()


class SavedState:
    """Snapshot of everything a check could disturb, restored on exit, pass or fail.

    Buffers are copied and compared by value on restore, not by version counter: a
    write through ``.data`` (a counter, a running statistic) does not bump
    ``_version``. Parameters are not copied (on a large model that copy would be the
    largest thing the check holds): their version counters are recorded, and
    :meth:`watching_writes` copies a parameter just before the first write into it
    (in place, or through ``.data``) during the runs it covers. ``.grad`` is set
    aside for the check, not copied: the user's gradient tensors are put back as they
    were, untouched. Between the runs of a check, :meth:`touched` and :meth:`reset`
    keep every run starting from the saved state.
    """

    def __init__(self, model: torch.nn.Module, extra: Sequence[torch.nn.Module]) -> None:
        modules = [model, *extra]
        self.training = [(m, m.training) for root in modules for m in root.modules()]
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []  # buffers and their copies
        self.slots: dict[int, _Slot] = {}  # parameters, by id
        self.names: dict[int, str] = {}
        self.grads: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        for root in modules:
            named = [*root.named_parameters(), *root.named_buffers()]
            for name, t in named:
                if id(t) in self.names:
                    continue
                self.names[id(t)] = f"model.{name}"
                if isinstance(t, torch.nn.Parameter):
                    self.slots[id(t)] = _Slot(t)
                    self.grads.append((t, t.grad))
                else:
                    self.tensors.append((t, t.detach().clone()))  # detached: no autograd graph
        self.attrs = _AttrState(modules)
        self.default_dtype = torch.get_default_dtype()
        self.rng = torch.get_rng_state()
        self.cuda_rng = (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_initialized()  # type: ignore[no-untyped-call]  # initialized implies available
            else None
        )
        self.py_rng = random.getstate()
        self.np_rng = NumpyGlobalRNG()
        #: parameters written in a way the check could not undo (see :meth:`restore`)
        self.lost: list[str] = []

    def set_aside_grads(self) -> None:
        """``.grad`` of every parameter set to None for the check (the user's tensors are put
        back by :meth:`restore`, never written: the check's backward passes use
        ``torch.autograd.grad``, and a step that calls ``backward()`` itself fills new ones)."""
        for p, g in self.grads:
            if g is not None:
                p.grad = None

    def watching_writes(self) -> Any:
        """A context in which a parameter is copied just before the first write into it."""
        return _WriteWatch(self.slots).mode

    def set_aside_accumulators(self) -> list[str]:
        """Empty the per-sample gradient buffers that libraries keep on parameters, for the check.

        An attribute of a parameter that holds a tensor of shape ``(N, *param.shape)`` (or a
        list of them) is a buffer a backward hook accumulates into (opacus' ``grad_sample``,
        BackPACK's ``grad_batch``). Left in place, the check's own backward passes would add
        to what the user's last step stored (opacus refuses that under Poisson sampling).
        They are set to None for the check's runs (and again by every :meth:`reset`), and
        the user's buffers are put back by :meth:`restore`. Returns their paths.
        """
        aside: list[tuple[Any, str]] = []
        for slot in self.slots.values():
            t = slot.param
            for key, value in list(vars(t).items()):
                if _per_sample_shaped(value, t):
                    aside.append((t, key))
        self._aside = aside
        self._clear_aside()
        return [f"{self.names[id(t)]}.{key}" for t, key in aside]

    def _clear_aside(self) -> None:
        for t, key in getattr(self, "_aside", ()):
            vars(t)[key] = None

    def touched(self) -> list[str]:
        """What the runs so far wrote into the model's state, by path: buffers (compared by value,
        so a write through ``.data`` counts), parameters (by version counter, or by value once
        copied), attributes and hook state."""
        out = [self.names[id(t)] for t, saved in self.tensors if not torch.equal(t, saved)]
        out += [self.names[i] for i, slot in self.slots.items() if slot.written()]
        return out + self.attrs.changed()

    def unrestorable(self) -> list[str]:
        """Parameters written without a copy to put back (see :func:`parameters_written_message`)."""
        return [self.names[i] for i, s in self.slots.items() if not s.restorable()]

    def reset(self) -> None:
        """Put the model's state (tensors, attributes, hook state) back as saved; modes and RNGs stay."""
        self._restore_tensors()
        self.attrs.restore()
        self._clear_aside()

    def _restore_tensors(self) -> None:
        undo = [(t, saved) for t, saved in self.tensors if not torch.equal(t, saved)]  # NaN != NaN: copied, harmless
        undo += [(s.param, s.copy) for s in self.slots.values() if s.copy is not None and s.written()]
        if undo:
            with torch.no_grad():  # parameters are leaves that require grad
                for t, saved in undo:
                    t.copy_(saved)
        self.lost.extend(n for n in self.unrestorable() if n not in self.lost)

    def restore(self) -> None:
        self._restore_tensors()
        for p, grad in self.grads:
            if p.grad is not grad:
                p.grad = grad
        self.attrs.restore()
        for m, mode in self.training:
            if m.training != mode:  # nn.Module.__setattr__ is slow; most modes did not change
                m.training = mode
        torch.set_default_dtype(self.default_dtype)
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        random.setstate(self.py_rng)
        self.np_rng.restore()


def parameters_written_message(names: Sequence[str]) -> str:
    """Why a check cannot go on (or left parameters changed): the model wrote into them unseen."""
    return (
        f"the model wrote into its parameters ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''}) "
        "during a run after the first one, in place, where the check could not copy them first, so "
        "they could not be put back: they now hold what the extra runs wrote. A forward that updates "
        "its own weights in place (under torch.no_grad()) on some calls only is not a training step "
        "the check can compare; move the update out of forward, or make it write through .data."
    )


class NumpyGlobalRNG:
    """NumPy's legacy global generator (``np.random.*``), saved and restored exactly.

    ``np.random.get_state()`` copies the Mersenne Twister key element by element;
    restoring unconditionally would double that on every check. The raw key and
    position are read through the bit generator's documented ``ctypes`` interface
    to tell whether anything drew from it; the state is put back only then, or
    when a cached Gaussian (legacy ``randn``) could have been consumed without
    moving the key.
    """

    _RAW_BYTES = 624 * 4 + 4  # mt19937_state: uint32 key[624]; int pos
    _raw_ok: Optional[bool] = None

    def __init__(self, full: bool = True) -> None:
        self.raw = self._raw()
        # the full state (a copy of the whole key: slow) is needed to restore; to watch for
        # draws the raw key and position suffice where the ctypes interface is usable
        self.state: Optional[tuple[Any, ...]] = (
            tuple(np.random.get_state(legacy=True)) if full or self.raw is None else None
        )

    @classmethod
    def watch(cls) -> "NumpyGlobalRNG":
        """A cheap snapshot that can tell whether anything drew (see :meth:`moved`), not restore."""
        return cls(full=False)

    @classmethod
    def _raw_usable(cls) -> bool:
        if cls._raw_ok is None:
            try:
                probe = np.random.RandomState(12345)
                probe.random_sample(3)
                _, key, pos, _, _ = probe.get_state(legacy=True)
                import ctypes

                raw = ctypes.string_at(probe._bit_generator.ctypes.state_address, cls._RAW_BYTES)
                key_bytes = np.asarray(key).astype("<u4").tobytes()
                cls._raw_ok = raw == key_bytes + int(pos).to_bytes(4, "little", signed=True)
            except Exception:  # noqa: BLE001 - no ctypes interface: always restore
                cls._raw_ok = False
        return cls._raw_ok

    def _raw(self) -> Optional[bytes]:
        if not self._raw_usable():
            return None
        import ctypes

        return ctypes.string_at(np.random.mtrand._rand._bit_generator.ctypes.state_address, self._RAW_BYTES)

    def moved(self) -> bool:
        """Whether anything drew from the generator since the snapshot."""
        if self.raw is not None and (self.state is None or not self.state[3]):
            return self._raw() != self.raw
        if self.state is None:  # pragma: no cover - state is kept whenever raw is None
            return False
        now = tuple(np.random.get_state(legacy=True))
        return bool(
            now[2] != self.state[2]
            or now[3] != self.state[3]
            or not np.array_equal(np.asarray(now[1]), np.asarray(self.state[1]))
        )

    def restore(self) -> None:
        if self.state is None:  # a watch-only snapshot (see watch()) cannot restore
            return
        has_gauss = self.state[3]
        if self.raw is not None and not has_gauss and self._raw() == self.raw:
            return  # nothing drew from it
        np.random.set_state(self.state)


def disable_dropout_modules(
    model: torch.nn.Module, modules: Optional[Sequence[tuple[str, torch.nn.Module]]] = None
) -> tuple[str, ...]:
    """Switch off torch.nn's dropout-applying modules; return the paths of those active in train mode.

    ``nn.Dropout*``, ``nn.RNN``/``LSTM``/``GRU`` (dropout between layers, inside the
    fused kernel) and ``nn.MultiheadAttention`` are put in eval mode; dropout applied
    anywhere else (functionally, by a library) is neutralised at the op, see
    :mod:`pytest_gradcheck._torch.randomness`. Modes are restored after the check.
    """
    from torch.nn.modules.dropout import _DropoutNd

    names = []
    for name, module in model.named_modules() if modules is None else modules:
        if not module.training:
            continue
        if isinstance(module, _DropoutNd):
            rate = module.p
            switch = True  # its F.dropout call is also neutralised at the op where ops are watched
        elif isinstance(module, (torch.nn.MultiheadAttention, torch.nn.RNNBase)):
            rate = float(getattr(module, "dropout", 0.0) or 0.0)
            switch = True
        else:
            continue
        if rate > 0:
            if switch:
                module.training = False
            names.append(f"model.{name}" if name else "model")
    return tuple(names)
