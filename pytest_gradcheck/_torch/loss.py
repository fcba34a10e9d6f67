"""Running the user's step: the loss call, its scalar, and the errors it can raise, translated."""

from __future__ import annotations

import contextlib
import copy
import re
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import torch
from torch.utils import _pytree as pytree

from ..errors import GradCheckError, InvalidArgument, first_line
from .inputs import NamedModules


def loss_step_builder(
    loss_fn: Callable[..., Any], *, has_targets: bool, targets_is_tuple: bool
) -> Callable[[Optional[list[Any]], bool], Callable[[torch.nn.Module, Any], Any]]:
    """The step ``loss_fn(model(*inputs), targets)`` over a batch ``(inputs, targets)``.

    ``build(record, float64)`` returns the step; with ``record`` (a list) the
    broadcast guard records around the loss call only, never the model's
    forward; with ``float64`` a loss module is run on a float64 copy.
    """

    def build(record: Optional[list[Any]], float64: bool) -> Callable[[torch.nn.Module, Any], Any]:
        fn = loss_fn
        if float64 and isinstance(loss_fn, torch.nn.Module):
            fn = copy.deepcopy(loss_fn).to(torch.float64)

        def step(m: torch.nn.Module, batch: Any) -> Any:
            xs, ys = batch
            out = m(*xs)
            with loss_guard(record, xs[0].shape[0]):
                if not has_targets:
                    return fn(out)
                if targets_is_tuple:
                    return fn(out, *ys)
                return fn(out, ys[0])

        return step

    return build


@contextlib.contextmanager
def loss_guard(record: Optional[list[Any]], batch_size: Optional[int] = None) -> Iterator[None]:
    if record is None:
        yield
        return
    from ..broadcast import recording

    with recording(True, batch_size=batch_size) as records:
        yield
    record.extend(records)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class StepModule(torch.nn.Module):
    """Wraps the user's model so that ``functional_call`` can run any step function."""

    def __init__(self, model: torch.nn.Module, step: Callable[[torch.nn.Module, Any], Any]) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_step", step)

    _step: Callable[[torch.nn.Module, Any], Any]

    def forward(self, batch: Any) -> Any:  # noqa: D401
        return self._step(self.model, batch)


@contextlib.contextmanager
def default_dtype(float64: bool) -> Iterator[None]:
    """float64 as torch's default dtype inside, if ``float64``; otherwise the default is left alone
    (setting it, even to its own value, has a cost on every check)."""
    if not float64:
        yield
        return
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


GENERATORS = {
    "torch": "torch's global generator",
    "torch.cuda": "torch's CUDA generator",
    "random": "Python's random module",
    "numpy": "NumPy's global np.random",
}


def writes_into_input(exc: BaseException) -> bool:
    """Errors a model raises only because its inputs came as grad-requiring aliases.

    Writing into one in place (the autograd leaf rule), or calling ``.numpy()`` on
    it: the check then retries with plain copies of the inputs.
    """
    text = str(exc)
    return isinstance(exc, RuntimeError) and (
        "leaf Variable that requires grad" in text
        or "Can't call numpy() on Tensor that requires grad" in text
        # a sample that writes into its slice bumps the version counter its neighbours
        # (slices of the same tensor) share: each sample then needs its own copy
        or "modified by an inplace operation" in text
    )


# torch's words for a dtype mismatch between tensors (matmul, conv, norms, bilinear, RNNs, generic)
_DTYPE_MISMATCH = re.compile(
    r"same dtype|same datatype|should be the same|does not match weight dtype|expected scalar type"
    r"|found dtype \w+ but expected|must have the same type",
    re.IGNORECASE,
)


def raise_clear_error(
    exc: BaseException,
    leaves: Sequence[Any],
    params: Sequence[torch.Tensor],
    modules: NamedModules,
    first_run: bool,
) -> None:
    """Raise an :class:`InvalidArgument` in place of ``exc`` where its cause is certain
    (a dtype mismatch of inputs and parameters, a sparse gradient); otherwise return."""
    if isinstance(exc, GradCheckError) or not isinstance(
        exc, (RuntimeError, ValueError, TypeError, NotImplementedError)
    ):
        return
    text = str(exc)
    if "sparse" in text.lower():
        for name, module in modules:
            weight = getattr(module, "weight", None)
            if (
                isinstance(module, (torch.nn.Embedding, torch.nn.EmbeddingBag))
                and module.sparse
                and isinstance(weight, torch.Tensor)
                and weight.requires_grad
            ):
                path = "model" + (f".{name}" if name else "")
                raise InvalidArgument(
                    f"{path} ({type(module).__name__}) has sparse=True: its weight gets a sparse gradient, "
                    "which the check cannot compare (the per-sample reference and the comparison work on "
                    "dense gradients). Build it with sparse=False for the check: the gradient values are "
                    f"the same, only their layout differs. ({type(exc).__name__}: {first_line(exc)})"
                ) from exc
    if first_run and _DTYPE_MISMATCH.search(text):
        param_dtypes = sorted({p.dtype for p in params if p.is_floating_point()}, key=str)
        input_dtypes = sorted(
            {x.dtype for x in leaves if isinstance(x, torch.Tensor) and x.is_floating_point()}, key=str
        )
        odd = [d for d in input_dtypes if d not in param_dtypes]
        if len(param_dtypes) == 1 and odd:
            want, have = dtype_name(param_dtypes[0]), " and ".join(dtype_name(d) for d in odd)
            raise InvalidArgument(
                f"dtype mismatch: the inputs are {have} but the model's parameters are {want}, and torch "
                f"does not mix them ({type(exc).__name__}: {first_line(exc)}). Convert one to the other "
                f"before the check: inputs.to(torch.{want}), or model.to(torch.{dtype_name(odd[0])})"
            ) from exc


def is_randomness_error(exc: BaseException) -> bool:
    text = str(exc)
    return "randomness" in text and "vmap" in text


def as_scalar_loss(out: Any, where: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor) and out.dim() == 0 and out.is_floating_point():
        if where == "per-sample":
            _check_depends_on_its_sample(out)
        return out  # the common case, in two queries (each costs more on a vmap-batched tensor)
    loss = out
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise InvalidArgument(f"the step returned a mapping without a 'loss' entry (keys: {sorted(map(str, out))})")
        loss = out["loss"]
    if not isinstance(loss, torch.Tensor):
        raise InvalidArgument(
            f"the loss ({where}) is a {type(loss).__name__}, not a tensor: return the loss tensor (not loss.item())"
        )
    if loss.numel() != 1:
        raise InvalidArgument(
            f"the loss ({where}) has shape {tuple(loss.shape)}, not a scalar: reduce it to one "
            "number (e.g. .mean() or .sum()); with reduction='none' losses, reduce them yourself"
        )
    if not loss.is_floating_point():
        raise InvalidArgument(f"the loss ({where}) has dtype {loss.dtype}: a floating-point scalar is needed")
    if where == "per-sample":
        _check_depends_on_its_sample(loss)
    return loss if loss.dim() == 0 else loss.reshape(())


def _check_depends_on_its_sample(loss: torch.Tensor) -> None:
    """Inside the per-sample ``vmap``, a loss that is not batched was computed from none of
    the sample's tensors: the step ignores its batch, and the check would compare nothing."""
    try:
        from torch._C import _functorch

        top = _functorch.peek_interpreter_stack()
        if top is None or top.key() != _functorch.TransformType.Vmap:
            return  # not under vmap (the loop reference, a single-sample run)
        batched = _functorch.is_batchedtensor(loss) and _functorch.maybe_get_level(loss) == top.level()
    except (ImportError, AttributeError, RuntimeError):  # pragma: no cover - private API moved
        return
    if not batched:
        raise InvalidArgument(_IGNORES_BATCH)


_IGNORES_BATCH = (
    "the loss does not depend on the batch: run on a single sample, the step computed its loss "
    "from none of that sample's tensors (e.g. it calls the model on a fixed tensor, not on the "
    "batch it is given), so every per-sample gradient is the same and nothing would be checked. "
    "Compute the loss from the batch: loss_fn(model(*inputs), targets) must use the outputs or "
    "the targets; step_fn(model, batch) must use batch."
)


def run_watching_sample(run: Callable[[], Any], sample: Any) -> Any:
    """``run()`` (one sample's step, outside vmap), refused if no torch op received any of
    ``sample``'s tensors: the loop reference's counterpart of :func:`_check_depends_on_its_sample`.

    Costs one Python call per op of that one run; the reference loop itself is not watched.
    """
    ids = {id(t) for t in pytree.tree_leaves(sample) if isinstance(t, torch.Tensor)}
    if not ids:
        return run()
    from torch.overrides import TorchFunctionMode

    seen = [False]

    class _SampleUse(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if not seen[0] and any(id(x) in ids for x in pytree.tree_leaves((args, kwargs))):
                seen[0] = True
            return func(*args, **kwargs)

    with _SampleUse():
        out = run()
    if not seen[0]:
        raise InvalidArgument(_IGNORES_BATCH)
    return out
