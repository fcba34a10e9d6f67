"""``fuzz_gradequiv``: fuzz batch size and free dimensions without writing Hypothesis code.

Importing this module imports neither torch nor Hypothesis; both are imported
when :func:`fuzz_gradequiv` is called.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._tracking import as_one_check
from .errors import BroadcastError, GradEquivError, InvalidArgument

if TYPE_CHECKING:
    import torch
    from hypothesis.strategies import SearchStrategy

    from .strategies import Batch

__all__ = ["fuzz_gradequiv"]


def fuzz_gradequiv(
    make_model: Callable[..., Any],
    loss_fn: Callable[..., Any],
    *,
    input_shape: Sequence[Any],
    target_shape: Sequence[Any] | None = None,
    batch_size: int | tuple[int, int] | SearchStrategy[int] = (2, 64),
    max_examples: int = 25,
    reduction: str = "mean",
    dtype: str | torch.dtype = "float32",
    target_dtype: str | torch.dtype | None = None,
    num_classes: int | str | None = None,
    dims: Mapping[str, int | SearchStrategy[int]] | None = None,
    min_side: int = 1,
    max_side: int = 8,
    seed: int | None = None,
    check: Callable[..., Any] | None = None,
    **check_options: Any,
) -> None:
    """Run :func:`~pytest_gradcheck.assert_gradequiv` on fuzzed batch sizes and shapes.

    Hypothesis draws up to ``max_examples`` batches of the declared layout
    (see :func:`pytest_gradcheck.strategies.batches` for the shape syntax:
    shapes are per sample, ``int`` fixed, ``"name"`` a named free dimension,
    ``None`` an anonymous one), builds a model for each, and checks that the
    batch gradient equals the accumulated per-sample gradients. On a failure
    it shrinks to the smallest failing case and raises
    :class:`~pytest_gradcheck.GradEquivError`, whose message starts with the cause
    (CI logs show the first line), then names the example (``err.report.example``)::

        smallest failing example: batch_size=2, input (2, 1), target (2,)

    followed by the gradient report for that example. Bad input found on the
    way (a shape the loss rejects) raises the check's ``InvalidArgument`` with
    the same first line.

    ``make_model`` builds a fresh model: it is called with the drawn *named*
    free dimensions it accepts as keyword arguments (all of them if it takes
    ``**kwargs``), and with none if it takes none, so ``lambda: net``,
    ``lambda features: nn.Linear(features, 1)`` and a class whose
    ``__init__`` takes ``features`` all work. Its parameters are initialised
    under a fixed torch seed (the global RNG is restored afterwards), so a
    failure reproduces. A model instance may be passed instead of a factory
    when the layout has no named dimensions.

    ``batch_size`` is an int, a ``(min, max)`` tuple (default 2 to 64) or a
    strategy; it shrinks towards its minimum. Free dimensions are drawn from
    ``min_side..max_side`` unless ``dims`` fixes them and shrink towards
    ``min_side``. ``reduction`` and ``**check_options`` (``rtol``, ``atol``,
    ``broadcast``, ...) are passed to ``assert_gradequiv``, or to ``check``
    when given: pass ``check=gradequiv`` in a test to use the ``gradequiv``
    fixture, configured by the marker, ini file and command line.

    The run is deterministic: with ``seed=None`` Hypothesis is derandomized
    (the same examples every run, CI included); an int ``seed`` explores
    other examples, also reproducibly. No example database is read or
    written, and there is no deadline.

    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> fuzz_gradequiv(
    ...     lambda features: nn.Linear(features, 1),
    ...     F.mse_loss,
    ...     input_shape=("features",),
    ...     target_shape=(1,),
    ...     max_examples=5,
    ... )
    >>> def buggy_loss(out, y):  # (B, 1) - (B,) broadcasts to (B, B)
    ...     return (out - y).pow(2).mean()
    >>> try:
    ...     fuzz_gradequiv(
    ...         lambda features: nn.Linear(features, 1),
    ...         buggy_loss,
    ...         input_shape=("features",),
    ...         target_shape=(),
    ...         max_examples=10,
    ...     )
    ... except AssertionError as err:
    ...     print(err.report.example)
    smallest failing example: batch_size=2, features=1, input (2, 1), target (2,)
    """
    __tracebackhide__ = True
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hypothesis_seed
    from hypothesis.errors import InvalidArgument as HypothesisInvalidArgument

    from .strategies import batches, named_dims

    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
        raise InvalidArgument(f"max_examples={max_examples!r} must be an int >= 1")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise InvalidArgument(f"seed={seed!r} must be an int or None")
    if not callable(loss_fn):
        raise InvalidArgument(f"loss_fn={loss_fn!r} must be callable")

    try:
        strategy = batches(
            input_shape=input_shape,
            target_shape=target_shape,
            batch_size=batch_size,
            dtype=dtype,
            target_dtype=target_dtype,
            num_classes=num_classes,
            dims=dims,
            min_side=min_side,
            max_side=max_side,
        )
        names = named_dims(input_shape, target_shape, num_classes)
    except HypothesisInvalidArgument as err:  # one error type for users of this module
        raise InvalidArgument(str(err)) from None
    build = _model_builder(make_model, names)

    run_check: Callable[..., Any]
    if check is None:
        from .engine import assert_gradequiv

        run_check = assert_gradequiv
    elif callable(check):
        run_check = check
    else:
        raise InvalidArgument(f"check={check!r} must be callable like assert_gradequiv")

    def fuzz_example(batch: Batch) -> None:
        __tracebackhide__ = True
        model = build(batch.dims)
        try:
            run_check(
                model,
                loss_fn,
                batch.inputs,
                batch.targets,
                reduction=reduction,
                **check_options,
            )
        except GradEquivError as err:
            err.report.example = _describe(batch)  # the renderer prints the shrunk example first
            raise GradEquivError(err.report).with_traceback(err.__traceback__) from None
        except BroadcastError as err:
            raise BroadcastError(f"{_describe(batch)}\n\n{err}", err.records).with_traceback(
                err.__traceback__
            ) from None
        except InvalidArgument as err:
            try:
                wrapped = type(err)(f"{_describe(batch)}\n\n{err}")
            except Exception:  # an InvalidArgument subclass with another signature
                raise err from None
            raise wrapped.with_traceback(err.__traceback__) from None

    run = settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=seed is None,
        database=None,
        report_multiple_bugs=False,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )(given(batch=strategy)(fuzz_example))
    if seed is not None:
        run = hypothesis_seed(seed)(run)
    with as_one_check("fuzz"):  # one fuzz run is one check for the session's records, however many examples
        run()


def _describe(batch: Batch) -> str:
    """``smallest failing example: batch_size=2, features=1, input (2, 1), target (2,)``."""
    parts = [f"batch_size={batch.batch_size}"]
    parts += [f"{name}={size}" for name, size in batch.dims.items()]
    for label, value in (("input", batch.inputs), ("target", batch.targets)):
        if value is None:
            continue
        if isinstance(value, tuple):
            shapes = ", ".join(str(tuple(t.shape)) for t in value)
            parts.append(f"{label}s {shapes}")
        else:
            parts.append(f"{label} {tuple(value.shape)}")
    return "smallest failing example: " + ", ".join(parts)


def _model_builder(make_model: Callable[..., Any], names: list[str]) -> Callable[[dict[str, int]], Any]:
    """Check ``make_model`` against the named dims now; return ``dims -> model``."""
    if _is_module(make_model):
        if names:
            raise InvalidArgument(
                f"make_model is a model, but the shapes name free dimensions {names}: "
                "pass a factory such as `lambda " + ", ".join(names) + ": ...` instead"
            )
        return lambda dims: make_model
    if not callable(make_model):
        raise InvalidArgument(f"make_model={make_model!r} must be a callable returning a model")
    try:
        params = list(inspect.signature(make_model).parameters.values())
    except (TypeError, ValueError):  # no signature (some builtins): pass every name
        accepted = set(names)
    else:
        if any(p.kind is p.VAR_KEYWORD for p in params):
            accepted = set(names)
        else:
            accepted = {
                p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name in names
            }
        missing = [
            p.name
            for p in params
            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in accepted
        ]
        if missing:
            raise InvalidArgument(
                f"make_model requires {', '.join(map(repr, missing))}, but the shapes name "
                f"only the free dimensions {names}; make_model is called with those "
                "it accepts, as keyword arguments"
            )

    def build(dims: dict[str, int]) -> Any:
        import torch

        kwargs = {name: size for name, size in dims.items() if name in accepted}
        # Seed only the CPU generator (where parameters are initialised), and
        # restore it: the user's global RNG state is left as found.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(0)
            return make_model(**kwargs)

    return build


def _is_module(obj: object) -> bool:
    torch = sys.modules.get("torch")  # no torch imported: cannot be a torch module
    return torch is not None and isinstance(obj, torch.nn.Module)
