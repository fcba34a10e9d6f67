"""The check options, declared once, and their validation (marker, command line, ini, calls).

Pure Python: importing it imports neither torch nor numpy. Each option is one
:class:`Option` in :data:`OPTIONS` (name, type, default, the checks that take
it, help, and whether it is also a session setting with a command-line flag and
an ini key); the ``gradequiv`` marker's signature and help line, the fixture's
accepted keys per check, the command-line and ini options and the validation
all derive from that table. Every value is checked once where it enters, with a
message that says where it came from (``from the gradequiv marker on ...``,
``from --gradequiv-rtol``, ``from ini option gradequiv_rtol``).

Adding an option is one entry: a tolerance taken by the checks that re-run in
float64, also settable as ``--gradequiv-rtol-float64`` / ``gradequiv_rtol_float64``;
a session-only setting (no check takes it, so the marker does not either)::

    Option("rtol_float64", TOLERANCE, None, RECHECKING, "rtol of the float64 re-check", session=True),
    Option("json", TEXT, None, frozenset(), "write the session's checks to this JSON file", session=True),
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import threading
import types
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, TypeVar

from ._tracking import record_error
from .errors import InvalidArgument

REDUCTIONS = ("mean", "sum", "auto")
BROADCAST_MODES = ("off", "warn", "error")
REFERENCE_METHODS = ("auto", "vmap", "loop")


# --------------------------------------------------------------------------- validators


def check_tolerance(value: Any, name: str, source: str = "argument") -> float | None:
    """Return ``value`` as a non-negative finite float (``None`` passes through).

    >>> check_tolerance("1e-4", "rtol")
    0.0001
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected a number >= 0")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected a number >= 0") from None
    if not math.isfinite(number) or number < 0:
        raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected a finite number >= 0")
    return number


def check_choice(value: Any, name: str, choices: tuple[str, ...], source: str = "argument") -> str:
    """Return ``value`` if it is one of ``choices``, else raise naming them.

    >>> check_choice("sum", "reduction", REDUCTIONS)
    'sum'
    """
    if not isinstance(value, str) or value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected one of {allowed}")
    return value


def check_bool(value: Any, name: str, source: str = "argument") -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not merely truthy)."""
    if isinstance(value, bool):
        return value
    raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected True or False")


def check_chunk_size(value: Any, name: str, source: str = "argument") -> int | None:
    """Return ``value`` as an int >= 1 (``None`` passes through: the whole batch at once).

    >>> check_chunk_size("16", "chunk_size")
    16
    """
    if value is None:
        return None
    bad = InvalidArgument(f"Invalid {name}={value!r} from {source}: expected an int >= 1 (samples per chunk)")
    if isinstance(value, str):
        value = value.strip()
        if not value.isdigit():
            raise bad
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad
    return value


def check_text(value: Any, name: str, source: str = "argument") -> str | None:
    """Return ``value`` if it is a non-empty string (``None`` passes through)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value
    raise InvalidArgument(f"Invalid {name}={value!r} from {source}: expected a non-empty string")


def check_batch_sizes(sizes: "list[tuple[str, int]]", *, axis: str = "dim 0", min_size: int = 2) -> int:
    """The common batch size of ``sizes`` (``[(description, size), ...]``), or a clear error.

    Shared by every backend: sizes that disagree, an empty batch, and a batch
    smaller than ``min_size`` (a batch of one hides every cross-sample bug) are
    refused, naming the tensors.

    >>> check_batch_sizes([("inputs (shape (4, 2))", 4), ("targets (shape (4,))", 4)])
    4
    """
    if not sizes:
        raise InvalidArgument("the batch holds no tensor or array: nothing to split into samples")
    first, b = sizes[0]
    for desc, n in sizes[1:]:
        if n != b:
            raise InvalidArgument(
                f"batch sizes disagree: {first} has {b} samples but {desc} has {n}; "
                f"every tensor must carry the same batch on {axis}"
            )
    if b == 0:
        raise InvalidArgument(f"empty batch: {first} has no samples")
    if b < min_size:
        raise InvalidArgument(
            f"batch size {b} ({first}): a batch of one hides every cross-sample bug "
            "(a (1, 1) - (1,) broadcast is harmless and the mean equals the sum); "
            f"use at least {min_size} samples"
        )
    return b


# --------------------------------------------------------------------------- option types

Validator = Callable[[Any, str, str], Any]  # (value, name, source) -> the checked value


def _as_is(value: Any, name: str, source: str) -> Any:
    return value  # checked by the check itself (weights: a tensor, a sequence or a callable)


def _bool_from_text(text: str, name: str, source: str) -> bool:
    word = text.strip().lower()
    if word in ("true", "yes", "on", "1"):
        return True
    if word in ("false", "no", "off", "0"):
        return False
    raise InvalidArgument(f"Invalid {name}={text!r} from {source}: expected true or false")


@dataclass(frozen=True)
class OptionType:
    """How an option's values are checked (``check``) and read from text (command line, ini)."""

    check: Validator
    choices: tuple[str, ...] = ()
    parse_text: Validator | None = None  # default: ``check`` on the stripped text

    def from_text(self, text: str, name: str, source: str) -> Any:
        if self.parse_text is not None:
            return self.parse_text(text, name, source)
        return self.check(text.strip(), name, source)


def choice(*choices: str) -> OptionType:
    """The type of an option whose value is one of ``choices``."""
    return OptionType(lambda v, n, s: check_choice(v, n, choices, s), choices)


TOLERANCE = OptionType(check_tolerance)
CHUNK = OptionType(check_chunk_size)
BOOL = OptionType(check_bool, parse_text=_bool_from_text)  # on the command line: a flag that sets True
TEXT = OptionType(check_text)
ANY = OptionType(_as_is)


# --------------------------------------------------------------------------- the declaration

#: The checks the ``gradequiv`` fixture runs, by method name (``gradequiv(...)`` itself is "gradequiv").
CHECKS = ("gradequiv", "step", "numpy", "accumulation", "per_sample_gradients", "independent")
EVERY_CHECK = frozenset(CHECKS)
#: compare the batch gradient with an accumulation (mean, sum, weighted) of references
ACCUMULATING = frozenset({"gradequiv", "step", "numpy", "accumulation"})
#: watch the loss terms for implicit broadcasts
WATCHING = frozenset({"gradequiv", "numpy", "accumulation"})
#: compute per-sample references by a method the user may choose (vmap, loop)
PER_SAMPLE = frozenset({"gradequiv", "step", "numpy", "per_sample_gradients"})
#: re-run a mismatch in float64
RECHECKING = EVERY_CHECK - {"independent"}
#: compute the per-sample reference with torch.func.vmap, which can run in chunks of samples
CHUNKING = frozenset({"gradequiv", "step", "per_sample_gradients"})


@dataclass(frozen=True)
class Option:
    """One check option: everything the plugin knows about it.

    ``checks`` are the checks that take it as a keyword (a marker value is
    passed to those only); none makes it a session-only setting, which the
    marker does not take. ``session=True`` adds the command-line flag
    ``--gradequiv-<name>`` and the ini key ``gradequiv_<name>``. ``unset`` says
    in words what a ``None`` value means (``"by dtype"``).
    """

    name: str
    type: OptionType
    default: Any
    checks: frozenset[str]
    help: str
    session: bool = False
    unset: str = "None"

    @property
    def dest(self) -> str:
        """The session setting's name in ``config.getoption`` (also its ini key)."""
        return f"gradequiv_{self.name}"

    @property
    def flag(self) -> str:
        return "--gradequiv-" + self.name.replace("_", "-")

    @property
    def ini(self) -> str:
        return self.dest

    def show(self, value: Any) -> str:
        """``value`` in words, for help and the report header (``None`` as ``unset``, floats as ``%g``)."""
        if value is None:
            return self.unset
        return f"{value:g}" if isinstance(value, float) else str(value)

    def describe(self) -> str:
        """The help text: what it does, its choices, its default."""
        words = self.help
        if self.type.choices:
            words += ": " + ", ".join(self.type.choices[:-1]) + " or " + self.type.choices[-1]
        return f"{words} (default: {self.show(self.default)})"

    def check(self, value: Any, source: str = "argument") -> Any:
        return self.type.check(value, self.name, source)

    def from_ini(self, value: Any) -> Any:
        """The ini value checked (text as written in an ini file; a TOML table may hold numbers)."""
        source = f"ini option {self.ini}"
        if isinstance(value, str):
            return self.type.from_text(value, self.name, source)
        return self.type.check(value, self.name, source)

    def from_command_line(self, text: str) -> Any:
        """argparse ``type=``: a bad value fails while the command line is parsed, naming the flag."""
        try:
            return self.type.from_text(text, self.dest, self.flag)
        except InvalidArgument as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    def argparse_kwargs(self) -> dict[str, Any]:
        """The keywords of ``parser.addoption`` for ``self.flag`` (unset: ``None``)."""
        kwargs: dict[str, Any] = {
            "dest": self.dest,
            "default": None,
            "help": self.describe(),
        }
        if self.type is BOOL:
            kwargs.update(action="store_const", const=True)
        elif self.type.choices:
            kwargs["choices"] = self.type.choices  # argparse names the choices itself
        else:
            kwargs.update(type=self.from_command_line, metavar=self.name.upper())
        return kwargs


OPTIONS: tuple[Option, ...] = (
    Option(
        "rtol", TOLERANCE, None, EVERY_CHECK, "relative tolerance in the working dtype", session=True, unset="by dtype"
    ),
    Option("atol", TOLERANCE, None, EVERY_CHECK, "absolute tolerance in the working dtype", session=True, unset="0"),
    Option(
        "rtol_float64",
        TOLERANCE,
        None,
        RECHECKING,
        "relative tolerance of the float64 re-check",
        session=True,
        unset="1e-07",
    ),
    Option(
        "atol_float64",
        TOLERANCE,
        None,
        RECHECKING,
        "absolute tolerance of the float64 re-check",
        session=True,
        unset="0",
    ),
    Option("reduction", choice(*REDUCTIONS), "mean", ACCUMULATING, "how per-sample gradients accumulate"),
    Option("weights", ANY, None, ACCUMULATING, "a tensor, sequence or callable weighting each sample"),
    Option("broadcast", choice(*BROADCAST_MODES), "warn", WATCHING, "implicit broadcasts in loss terms", session=True),
    Option("reference", choice(*REFERENCE_METHODS), "auto", PER_SAMPLE, "how per-sample gradients are computed"),
    Option("float64_recheck", BOOL, True, RECHECKING, "re-run a mismatch in float64 before calling it a bug"),
    Option("per_sample", BOOL, False, frozenset({"gradequiv", "step"}), "put per-sample gradients on the report"),
    Option(
        "chunk_size",
        CHUNK,
        None,
        CHUNKING,
        "samples per call of the per-sample reference",
        session=True,
        unset="the whole batch",
    ),
    Option("json", TEXT, None, frozenset(), "write the session's checks to this JSON file", session=True),
    Option("annotations", BOOL, False, frozenset(), "print GitHub Actions ::error lines for failures", session=True),
    Option(
        "max_margin", TOLERANCE, None, frozenset(), "fail a passing check using more of its tolerance", session=True
    ),
)

BY_NAME: Mapping[str, Option] = {opt.name: opt for opt in OPTIONS}
#: Options the ``gradequiv`` marker accepts (they become the fixture's defaults): those some check takes.
MARKER_OPTIONS = tuple(opt.name for opt in OPTIONS if opt.checks)
#: Options also set for the whole session, from the command line and the ini file.
SESSION_OPTIONS = tuple(opt for opt in OPTIONS if opt.session)

MARKER_SIGNATURE = inspect.Signature(
    [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=BY_NAME[name].default) for name in MARKER_OPTIONS]
)
MARKER_HELP = (
    f"gradequiv{MARKER_SIGNATURE}: the test checks gradients with the gradequiv fixture or "
    "assert_gradequiv; the options become the fixture's defaults (over the command line and ini), "
    "and the test fails if it runs no check. "
    + "; ".join(f"{name}: {BY_NAME[name].describe()}" for name in MARKER_OPTIONS)
    + "."
)


def accepted(check: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that ``check`` takes (the one rule that drops the others).

    >>> accepted("independent", {"rtol": 1e-3, "reduction": "sum"})
    {'rtol': 0.001}
    """
    if check not in EVERY_CHECK:
        raise ValueError(f"unknown check {check!r}; known checks: {', '.join(CHECKS)}")
    return {k: v for k, v in options.items() if check in BY_NAME[k].checks}


def validate_options(options: Mapping[str, Any], source: str = "argument") -> dict[str, Any]:
    """Validate a mapping of check options; unknown names are rejected.

    >>> validate_options({"rtol": 1e-3, "reduction": "sum"}, source="marker")
    {'rtol': 0.001, 'reduction': 'sum'}
    """
    unknown = sorted(set(options) - set(MARKER_OPTIONS))
    if unknown:
        known = ", ".join(MARKER_OPTIONS)
        raise InvalidArgument(
            f"Unknown gradequiv option(s) {', '.join(map(repr, unknown))} from {source}; known options: {known}"
        )
    return {key: BY_NAME[key].check(value, source) for key, value in options.items()}


# --------------------------------------------------------------------------- the current test's defaults

_defaults_lock = threading.Lock()
_test_defaults: dict[str, Any] = {}  # the running test's session settings + marker, process-wide


def set_test_defaults(options: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """Make ``options`` the defaults of every check run from now on (``None``: none); returns the previous ones.

    The plugin sets the running test's session settings and marker options here
    around the test, so that a direct ``assert_gradequiv`` call follows them as
    the fixture does. Process-wide, not per thread: a check run in a worker
    thread belongs to the test that is running (pytest runs one test at a time
    per process).
    """
    global _test_defaults
    with _defaults_lock:
        previous, _test_defaults = _test_defaults, dict(options or {})
    return previous


def current_test_defaults() -> dict[str, Any]:
    """The current test's defaults for the checks (``{}`` outside a test)."""
    with _defaults_lock:
        return dict(_test_defaults)


Check = TypeVar("Check", bound=Callable[..., Any])


def takes_test_defaults(check: str) -> Callable[[Check], Check]:
    """Decorate a public check: each option of ``check`` that the caller did not pass comes from
    :func:`current_test_defaults` when set there (call keyword > marker > command line > ini > default).

    The options are keyword-only, so "not passed" is "not in the keywords". The wrapper is
    given the wrapped function's module globals, so it stays that module's function (doctest
    finds its examples) and keeps its signature (``__wrapped__``).
    """

    def decorate(fn: Check) -> Check:
        names = tuple(
            name
            for name, param in inspect.signature(fn).parameters.items()
            if param.kind is inspect.Parameter.KEYWORD_ONLY and name in BY_NAME and check in BY_NAME[name].checks
        )
        read = current_test_defaults
        failed_to_run, on_failure = InvalidArgument, record_error  # closure cells: the wrapper runs in fn's globals

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            defaults = read()
            for name in names:
                if name in defaults and name not in kwargs:
                    kwargs[name] = defaults[name]
            try:
                return fn(*args, **kwargs)
            except failed_to_run as exc:  # a check that could not run is a result too (status "error")
                on_failure(check, exc)
                raise

        rebound = types.FunctionType(
            wrapper.__code__, fn.__globals__, fn.__name__, wrapper.__defaults__, wrapper.__closure__
        )
        return functools.update_wrapper(rebound, fn)  # type: ignore[return-value]

    return decorate
