"""pytest-gradcheck: prove a training step computes the gradient its author thinks it does.

The public names are exported lazily (PEP 562), so ``import pytest_gradcheck``
(which pytest does at start-up through the ``pytest11`` entry point) imports
neither torch nor numpy; they are imported on first use of a name that needs them.

>>> from pytest_gradcheck import assert_gradequiv, GradEquivError  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    "assert_gradequiv": "engine",
    "assert_gradequiv_step": "engine",
    "GradEquivReport": "report",
    "GradEquivError": "errors",
    "GradCheckError": "errors",
    "InvalidArgument": "errors",
    "UnsupportedModelError": "errors",
    "BroadcastError": "errors",
    "BroadcastWarning": "errors",
    "DDPTimeoutError": "errors",
    "DDPWorkerError": "errors",
    "no_implicit_broadcast": "broadcast",
    "allow_broadcast": "broadcast",
    "assert_gradequiv_numpy": "numpy_backend",
    "assert_grad_numpy": "numpy_backend",
    "assert_batch_independent": "independence",
    "BatchLeakError": "errors",
    "BatchIndependenceReport": "report.independence",
    "assert_accumulation_equiv": "accumulation",
    "assert_accumulation_equiv_step": "accumulation",
    "fuzz_gradequiv": "fuzz",
    "assert_ddp_equiv": "ddp",
    "assert_fsdp_equiv": "ddp",
    "assert_per_sample_gradients": "per_sample",
}
_SUBMODULES = frozenset({"strategies"})

__all__ = sorted([*_EXPORTS, *_SUBMODULES])

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from . import strategies
    from .accumulation import assert_accumulation_equiv, assert_accumulation_equiv_step
    from .broadcast import allow_broadcast, no_implicit_broadcast
    from .ddp import assert_ddp_equiv, assert_fsdp_equiv
    from .engine import assert_gradequiv, assert_gradequiv_step
    from .errors import (
        BatchLeakError,
        BroadcastError,
        BroadcastWarning,
        DDPTimeoutError,
        DDPWorkerError,
        GradCheckError,
        GradEquivError,
        InvalidArgument,
        UnsupportedModelError,
    )
    from .fuzz import fuzz_gradequiv
    from .independence import assert_batch_independent
    from .numpy_backend import assert_grad_numpy, assert_gradequiv_numpy
    from .per_sample import assert_per_sample_gradients
    from .report import GradEquivReport
    from .report.independence import BatchIndependenceReport


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value  # cache: the next access skips __getattr__
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
