"""The check options: one declaration, and what derives from it (marker, fixture, command line, ini).

Precedence (call > marker > command line > ini > default), validation messages
that name their source, the marker's help line and ``--strict-markers``, run as
a user runs them (pytester); and the declaration checked against the signatures
of the checks it describes.
"""

from __future__ import annotations

import argparse
import inspect
import textwrap
from typing import Any, Callable

import pytest

import pytest_gradcheck
from pytest_gradcheck import InvalidArgument
from pytest_gradcheck._options import (
    BOOL,
    CHECKS,
    MARKER_HELP,
    MARKER_OPTIONS,
    OPTIONS,
    RECHECKING,
    SESSION_OPTIONS,
    TEXT,
    TOLERANCE,
    Option,
    accepted,
    validate_options,
)

HEADER = """
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)


def mlp():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
"""


def write_tests(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_user=HEADER + textwrap.dedent(body))


@pytest.fixture(params=["in-process", "xdist"])
def run_mode(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "xdist":
        pytest.importorskip("xdist")
        return ["-n", "2"]
    return []


# --------------------------------------------------------------------------- precedence


def test_marker_overrides_cli_overrides_ini(pytester: pytest.Pytester) -> None:
    pytester.makeini(
        """
        [pytest]
        gradequiv_rtol = 1e-2
        gradequiv_atol = 1e-9
        gradequiv_broadcast = error
        """
    )
    write_tests(
        pytester,
        """
        def test_cli_and_ini(gradequiv):
            opts = gradequiv.options()
            assert opts["rtol"] == 1e-3          # --gradequiv-rtol beats the ini file
            assert opts["atol"] == 1e-9          # ini
            assert opts["broadcast"] == "error"  # ini

        @pytest.mark.gradequiv(rtol=1e-5, broadcast="off")
        def test_marker(gradequiv):
            opts = gradequiv.options()
            assert opts["rtol"] == 1e-5 and opts["broadcast"] == "off"
            assert gradequiv.options(rtol=0.5)["rtol"] == 0.5  # the call beats the marker
            gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1))
        """,
    )
    result = pytester.runpytest("--gradequiv-rtol=1e-3", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


@pytest.mark.parametrize(
    "ini, args, marker, call, expected",
    [
        ([], [], "", "", None),  # default: by dtype
        (["gradequiv_rtol = 0.25"], [], "", "", 0.25),
        (["gradequiv_rtol = 0.25"], ["--gradequiv-rtol=0.125"], "", "", 0.125),
        (["gradequiv_rtol = 0.25"], ["--gradequiv-rtol=0.125"], "rtol=0.0625", "", 0.0625),
        (["gradequiv_rtol = 0.25"], ["--gradequiv-rtol=0.125"], "rtol=0.0625", "rtol=0.03125", 0.03125),
        ([], [], "", "rtol=0.03125", 0.03125),
        (["gradequiv_rtol = 0.25"], [], "rtol=0.0625", "", 0.0625),
    ],
)
def test_each_level_of_precedence_reaches_the_check(
    pytester: pytest.Pytester, ini: list[str], args: list[str], marker: str, call: str, expected: float | None
) -> None:
    """call > marker > command line > ini > default, read from the report of a check that ran."""
    if ini:
        pytester.makeini("[pytest]\n" + "\n".join(ini) + "\n")
    write_tests(
        pytester,
        f"""
        @pytest.mark.gradequiv({marker})
        def test_level(gradequiv):
            report = gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1), {call})
            expected = {expected!r}
            assert report.working.rtol == (1e-4 if expected is None else expected)
        """,
    )
    pytester.runpytest(*args, "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_precedence_holds_under_xdist(pytester: pytest.Pytester, run_mode: list[str]) -> None:
    pytester.makeini("[pytest]\ngradequiv_atol = 1e-9\ngradequiv_broadcast = off\n")
    write_tests(
        pytester,
        """
        def test_session(gradequiv):
            assert gradequiv.options() == {"rtol": 0.5, "atol": 1e-9, "broadcast": "off"}

        @pytest.mark.gradequiv(atol=0.0, broadcast="error")
        def test_marker(gradequiv):
            assert gradequiv.options() == {"rtol": 0.5, "atol": 0.0, "broadcast": "error"}
            gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1))
        """,
    )
    result = pytester.runpytest("--gradequiv-rtol=0.5", "-p", "no:cacheprovider", *run_mode)
    result.assert_outcomes(passed=2)


def test_defaults_without_any_setting(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        def test_defaults(gradequiv):
            assert gradequiv.options() == {"broadcast": "warn"}
        """,
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_a_marker_option_reaches_only_the_checks_that_take_it(pytester: pytest.Pytester) -> None:
    """One rule drops what a check does not take: ``reduction`` for ``independent``, ``per_sample``
    and ``reference`` for ``accumulation``, ``broadcast`` for ``step``."""
    write_tests(
        pytester,
        """
        import numpy as np

        MARK = pytest.mark.gradequiv(rtol=1e-3, reduction="mean", broadcast="error", reference="loop", per_sample=True)

        @MARK
        def test_independent(gradequiv):
            assert gradequiv.independent(mlp(), torch.randn(5, 3)).passed

        @MARK
        def test_accumulation(gradequiv):
            report = gradequiv.accumulation(mlp(), F.mse_loss, torch.randn(8, 3), torch.randn(8, 1), micro_batches=2)
            assert report.working.rtol == 1e-3

        @MARK
        def test_step(gradequiv):
            step = lambda m, b: F.mse_loss(m(b[0]), b[1])
            report = gradequiv.step(step, mlp(), (torch.randn(4, 3), torch.randn(4, 1)))
            assert report.working.rtol == 1e-3 and report.per_sample_gradients is not None

        @MARK
        def test_numpy(gradequiv):
            def grad_fn(params, x, y):
                return {"w": x.T @ (x @ params["w"] - y) / len(x)}
            gradequiv.numpy(grad_fn, {"w": np.ones((3, 1))}, np.random.rand(6, 3), np.random.rand(6, 1))

        @MARK
        def test_per_sample_gradients(gradequiv):
            model = nn.Linear(3, 1)
            x, y = torch.randn(4, 3), torch.randn(4, 1)
            rows = gradequiv(model, F.mse_loss, x, y).per_sample_gradients
            gradequiv.per_sample_gradients(model, F.mse_loss, x, y, grads=rows)
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)


def test_a_call_keyword_is_passed_as_given(pytester: pytest.Pytester) -> None:
    """Only the defaults are filtered: a keyword the check does not take is the check's error, not ignored."""
    write_tests(
        pytester,
        """
        @pytest.mark.gradequiv
        def test_wrong_keyword(gradequiv):
            with pytest.raises(TypeError, match="reduction"):
                gradequiv.independent(mlp(), torch.randn(5, 3), reduction="sum")
            gradequiv.independent(mlp(), torch.randn(5, 3), max_samples=2, seed=1)
        """,
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


# --------------------------------------------------------------------------- validation, with its source


def test_bad_marker_option_is_reported(pytester: pytest.Pytester) -> None:
    write_tests(
        pytester,
        """
        @pytest.mark.gradequiv(rtl=1e-3)
        def test_typo(gradequiv):
            gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1))

        @pytest.mark.gradequiv(reduction="avg")
        def test_bad_value(gradequiv):
            gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1))

        @pytest.mark.gradequiv(1e-3)
        def test_positional(gradequiv):
            gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1))

        @pytest.mark.gradequiv(float64_recheck="no")
        def test_not_a_bool(gradequiv):
            gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1))
        """,
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(errors=4)
    result.stdout.fnmatch_lines(
        [
            "*Unknown gradequiv option(s) 'rtl' from the gradequiv marker on test_user.py::test_typo*",
            "*Invalid reduction='avg' from the gradequiv marker on test_user.py::test_bad_value*",
            "*the gradequiv marker takes keyword options only*got positional (0.001,) on test_user.py::test_positional*",
            "*Invalid float64_recheck='no' from the gradequiv marker on test_user.py::test_not_a_bool*",
        ],
        consecutive=False,
    )


@pytest.mark.parametrize(
    "args, ini, message",
    [
        (["--gradequiv-rtol=abc"], None, "*Invalid gradequiv_rtol='abc' from --gradequiv-rtol*"),
        (["--gradequiv-atol=-1"], None, "*Invalid gradequiv_atol='-1' from --gradequiv-atol*"),
        (["--gradequiv-rtol=inf"], None, "*Invalid gradequiv_rtol='inf' from --gradequiv-rtol: expected a finite*"),
        (["--gradequiv-broadcast=loud"], None, "*invalid choice: 'loud'*"),
        ([], "gradequiv_rtol = lots", "*Invalid rtol='lots' from ini option gradequiv_rtol*"),
        ([], "gradequiv_atol = -1e-3", "*Invalid atol='-1e-3' from ini option gradequiv_atol*"),
        ([], "gradequiv_broadcast = loud", "*Invalid broadcast='loud' from ini option gradequiv_broadcast*"),
    ],
)
def test_bad_option_values_fail_at_startup(
    pytester: pytest.Pytester, args: list[str], ini: str | None, message: str
) -> None:
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest(*args, "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_a_bad_ini_value_is_not_reported_when_the_command_line_overrides_it(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ngradequiv_rtol = lots\n")
    pytester.makepyfile(test_x="def test_x(gradequiv):\n    assert gradequiv.options()['rtol'] == 0.5\n")
    pytester.runpytest("--gradequiv-rtol=0.5", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_ini_values_are_read_from_pyproject(pytester: pytest.Pytester) -> None:
    pytester.makepyprojecttoml(
        """
        [tool.pytest.ini_options]
        gradequiv_rtol = 1e-2
        gradequiv_broadcast = " error "
        """
    )
    pytester.makepyfile(
        test_x="def test_x(gradequiv):\n    assert gradequiv.options() == {'rtol': 0.01, 'broadcast': 'error'}\n"
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_validate_options_names_the_option_and_the_source() -> None:
    assert validate_options({"rtol": "1e-3", "reference": "loop"}) == {"rtol": 1e-3, "reference": "loop"}
    with pytest.raises(InvalidArgument, match=r"Invalid atol=-1 from the call: expected a finite number >= 0"):
        validate_options({"atol": -1}, source="the call")
    with pytest.raises(InvalidArgument, match=r"Invalid rtol=True from argument"):
        validate_options({"rtol": True})
    with pytest.raises(InvalidArgument, match=r"Invalid per_sample=1 from argument: expected True or False"):
        validate_options({"per_sample": 1})
    with pytest.raises(InvalidArgument, match=r"Unknown gradequiv option\(s\) 'rtl' from x; known options: rtol, "):
        validate_options({"rtl": 1}, source="x")
    weights = object()  # checked by the check itself
    assert validate_options({"weights": weights})["weights"] is weights


# --------------------------------------------------------------------------- what derives from the declaration


def test_marker_help_is_the_full_signature(pytester: pytest.Pytester) -> None:
    assert MARKER_HELP.startswith(
        "gradequiv(*, rtol=None, atol=None, rtol_float64=None, atol_float64=None, reduction='mean', weights=None, "
        "broadcast='warn', "
        "reference='auto', float64_recheck=True, per_sample=False, chunk_size=None): "
    )
    result = pytester.runpytest("--markers", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "@pytest.mark.gradequiv(*, rtol=None, atol=None, rtol_float64=None, atol_float64=None, reduction='mean', *): *"
        ]
    )


def test_strict_markers_pass(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nstrict_markers = true\n")
    write_tests(
        pytester,
        """
        @pytest.mark.gradequiv(rtol=1e-4)
        def test_marked(gradequiv):
            assert gradequiv(mlp(), F.mse_loss, torch.randn(6, 3), torch.randn(6, 1)).working.rtol == 1e-4

        @pytest.mark.gradequiv
        def test_bare(gradequiv):
            gradequiv(mlp(), F.mse_loss, torch.randn(6, 3), torch.randn(6, 1))
        """,
    )
    pytester.runpytest("--strict-markers", "-p", "no:cacheprovider").assert_outcomes(passed=2)


def test_every_session_option_has_a_flag_and_an_ini_key(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest("--help", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "  --gradequiv-rtol=RTOL",
            "*relative tolerance in the working dtype (default: by*",
            "  --gradequiv-atol=ATOL",
            "*absolute tolerance in the working dtype (default: 0)",
            "  --gradequiv-rtol-float64=RTOL_FLOAT64",
            "*relative tolerance of the float64 re-check (default:*",
            "  --gradequiv-broadcast={off,warn,error}",
            "*implicit broadcasts in loss terms: off, warn or error*",
        ]
    )
    for opt in SESSION_OPTIONS:
        result.stdout.fnmatch_lines([f"  {opt.ini} (string):", f"*{opt.help}*"])


def test_header_shows_the_session_settings(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ngradequiv_atol = 1e-9\n")
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest("--gradequiv-broadcast=error", "-p", "no:cacheprovider")
    result.stdout.fnmatch_lines(
        [
            "gradcheck: rtol=by dtype, atol=1e-09, rtol_float64=1e-07, atol_float64=0, broadcast=error, "
            "chunk_size=the whole batch"
        ]
    )
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.stdout.no_fnmatch_line("gradcheck:*")


CHECK_FUNCTIONS: dict[str, Callable[..., Any]] = {
    "gradequiv": pytest_gradcheck.assert_gradequiv,
    "step": pytest_gradcheck.assert_gradequiv_step,
    "numpy": pytest_gradcheck.assert_gradequiv_numpy,
    "accumulation": pytest_gradcheck.assert_accumulation_equiv,
    "per_sample_gradients": pytest_gradcheck.assert_per_sample_gradients,
    "independent": pytest_gradcheck.assert_batch_independent,
}


@pytest.mark.parametrize("check", CHECKS)
def test_the_declaration_matches_each_checks_signature(check: str) -> None:
    """An option is declared for a check exactly when the check takes it, with the same default."""
    params = inspect.signature(CHECK_FUNCTIONS[check]).parameters
    for opt in OPTIONS:
        if check in opt.checks:
            assert opt.name in params, f"{opt.name} is declared for {check}, which does not take it"
            assert params[opt.name].kind is inspect.Parameter.KEYWORD_ONLY
            assert params[opt.name].default == opt.default, f"{check}'s default for {opt.name}"
        else:
            assert opt.name not in params, f"{check} takes {opt.name}, which is not declared for it"


def test_accepted_is_the_one_rule() -> None:
    everything = {name: object() for name in MARKER_OPTIONS}
    assert set(accepted("independent", everything)) == {"rtol", "atol"}
    assert set(accepted("accumulation", everything)) == {
        "rtol",
        "atol",
        "rtol_float64",
        "atol_float64",
        "reduction",
        "weights",
        "broadcast",
        "float64_recheck",
    }
    assert set(accepted("gradequiv", everything)) == set(MARKER_OPTIONS)
    with pytest.raises(ValueError, match="unknown check 'ddp'"):
        accepted("ddp", everything)


def test_a_new_option_is_one_declaration() -> None:
    """What issue 18 adds, declared as one entry each: the flag, the ini key and the checks follow."""
    rtol64 = Option("rtol_float64", TOLERANCE, None, RECHECKING, "rtol of the float64 re-check", session=True)
    json = Option("json", TEXT, None, frozenset(), "write the session's checks to this JSON file", session=True)
    notes = Option("annotations", BOOL, False, frozenset(), "GitHub annotations for failed checks", session=True)
    assert (rtol64.flag, rtol64.ini) == ("--gradequiv-rtol-float64", "gradequiv_rtol_float64")
    assert (json.flag, notes.flag) == ("--gradequiv-json", "--gradequiv-annotations")
    parser = argparse.ArgumentParser(exit_on_error=False)
    for opt in (rtol64, json, notes):
        parser.add_argument(opt.flag, **opt.argparse_kwargs())
    ns = parser.parse_args(["--gradequiv-rtol-float64=1e-9", "--gradequiv-json=out.json", "--gradequiv-annotations"])
    assert (ns.gradequiv_rtol_float64, ns.gradequiv_json, ns.gradequiv_annotations) == (1e-9, "out.json", True)
    assert parser.parse_args([]).gradequiv_annotations is None  # unset: the ini file or the default decides
    with pytest.raises(
        argparse.ArgumentError, match="Invalid gradequiv_rtol_float64='x' from --gradequiv-rtol-float64"
    ):
        parser.parse_args(["--gradequiv-rtol-float64=x"])
    assert notes.from_ini(" yes ") is True and json.from_ini("a.json") == "a.json"
    with pytest.raises(InvalidArgument, match="Invalid annotations='maybe' from ini option gradequiv_annotations"):
        notes.from_ini("maybe")


# --------------------------------------------------------------------------- tolerances per dtype


@pytest.mark.parametrize(
    "ini, args, marker, call, working, recheck",
    [
        (["gradequiv_rtol = 2e-4"], [], "", "", 2e-4, 1e-7),  # the ini rtol does not loosen float64
        ([], ["--gradequiv-rtol=3e-4"], "", "", 3e-4, 1e-7),
        ([], [], "rtol=4e-4", "", 4e-4, 1e-7),
        ([], [], "", "rtol=5e-4", 5e-4, 1e-7),
        (["gradequiv_rtol_float64 = 1e-6"], [], "", "", 1e-4, 1e-6),
        ([], ["--gradequiv-rtol-float64=2e-6"], "", "", 1e-4, 2e-6),
        ([], [], "rtol_float64=3e-6", "", 1e-4, 3e-6),
        (["gradequiv_rtol_float64 = 1e-6"], [], "rtol=2e-4", "rtol_float64=4e-6", 2e-4, 4e-6),
    ],
)
def test_a_user_rtol_loosens_the_working_dtype_only(
    pytester: pytest.Pytester,
    ini: list[str],
    args: list[str],
    marker: str,
    call: str,
    working: float,
    recheck: float,
) -> None:
    """``rtol`` is the working dtype's tolerance; the float64 re-check keeps its own unless ``rtol_float64`` is set."""
    if ini:
        pytester.makeini("[pytest]\n" + "\n".join(ini) + "\n")
    write_tests(
        pytester,
        f"""
        from pytest_gradcheck import GradEquivError

        def summed(out, y):
            return ((out - y) ** 2).sum()  # declared mean: a factor-B bug, re-checked in float64

        @pytest.mark.gradequiv({marker})
        def test_level(gradequiv):
            with pytest.raises(GradEquivError) as info:
                gradequiv(mlp(), summed, torch.randn(4, 3), torch.randn(4, 1), {call})
            report = info.value.report
            assert report.working.rtol == {working!r}
            assert report.float64 is not None and report.float64.rtol == {recheck!r}
            assert "(rtol={recheck:g})" in str(report)
        """,
    )
    pytester.runpytest(*args, "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_rtol_float64_on_a_direct_call() -> None:
    import torch
    import torch.nn.functional as F

    from pytest_gradcheck import GradEquivError, assert_gradequiv

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))

    def summed(out: Any, y: Any) -> Any:
        return F.mse_loss(out, y, reduction="sum")

    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(model, summed, torch.randn(4, 3), torch.randn(4, 1), rtol=1e-3, atol_float64=1e-12)
    report = info.value.report
    assert (report.working.rtol, report.working.atol) == (1e-3, 0.0)
    assert report.float64 is not None and (report.float64.rtol, report.float64.atol) == (1e-7, 1e-12)
    with pytest.raises(InvalidArgument, match="rtol_float64"):
        assert_gradequiv(model, summed, torch.randn(4, 3), torch.randn(4, 1), rtol_float64=-1.0)


# --------------------------------------------------------------------------- direct calls follow the session


@pytest.mark.parametrize(
    "ini, args, marker, call, expected",
    [
        ([], [], "", "", 1e-4),  # default: by dtype
        (["gradequiv_rtol = 0.25"], [], "", "", 0.25),
        (["gradequiv_rtol = 0.25"], ["--gradequiv-rtol=0.125"], "", "", 0.125),
        (["gradequiv_rtol = 0.25"], ["--gradequiv-rtol=0.125"], "rtol=0.0625", "", 0.0625),
        (["gradequiv_rtol = 0.25"], ["--gradequiv-rtol=0.125"], "rtol=0.0625", "rtol=0.03125", 0.03125),
    ],
)
def test_each_level_of_precedence_reaches_a_direct_call(
    pytester: pytest.Pytester, ini: list[str], args: list[str], marker: str, call: str, expected: float
) -> None:
    """call > marker > command line > ini > default for ``assert_gradequiv`` called directly, not via the fixture."""
    if ini:
        pytester.makeini("[pytest]\n" + "\n".join(ini) + "\n")
    write_tests(
        pytester,
        f"""
        from pytest_gradcheck import assert_gradequiv, assert_batch_independent

        @pytest.mark.gradequiv({marker})
        def test_level():
            report = assert_gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1), {call})
            assert report.working.rtol == {expected!r}
            assert assert_batch_independent(mlp(), torch.randn(4, 3), {call}).rtol == {expected!r}
        """,
    )
    pytester.runpytest(*args, "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_session_broadcast_error_reaches_direct_calls_in_threads(
    pytester: pytest.Pytester, run_mode: list[str]
) -> None:
    write_tests(
        pytester,
        """
        from concurrent.futures import ThreadPoolExecutor

        from pytest_gradcheck import BroadcastError, assert_gradequiv, assert_accumulation_equiv

        def paired(out, y):  # a (4, 1) - (4,) broadcast in the loss that leaves the gradient right
            return F.mse_loss(out, y.unsqueeze(-1)) + 0.0 * (out - y).sum()

        def test_direct_call_in_a_worker_thread():
            x, y = torch.randn(4, 3), torch.randn(4)
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(assert_gradequiv, mlp(), paired, x, y)
                with pytest.raises(BroadcastError):
                    future.result()

        def test_the_call_keyword_wins():
            x, y = torch.randn(4, 3), torch.randn(4, 1)
            report = assert_accumulation_equiv(mlp(), F.mse_loss, x, y, micro_batches=2, broadcast="off")
            assert report.passed and report.working.rtol == 0.5

        def test_no_session_after_the_test():
            from pytest_gradcheck._options import current_test_defaults
            assert current_test_defaults() == {"rtol": 0.5, "broadcast": "error"}
        """,
    )
    result = pytester.runpytest(
        "--gradequiv-broadcast=error", "--gradequiv-rtol=0.5", "-p", "no:cacheprovider", *run_mode
    )
    result.assert_outcomes(passed=3)


def test_the_defaults_are_cleared_after_a_test() -> None:
    from pytest_gradcheck._options import current_test_defaults, set_test_defaults

    previous = set_test_defaults({"rtol": 0.5})
    try:
        assert current_test_defaults() == {"rtol": 0.5}
    finally:
        set_test_defaults(previous)
    assert current_test_defaults() == previous
