"""The report renderers and their formatting vocabulary, from figures alone (no model runs)."""

from __future__ import annotations

import math

import pytest

from pytest_gradcheck.report import Comparison, Finding, GradEquivReport, ParamComparison, render
from pytest_gradcheck.report.format import close_to, columns, fmt_counts, fmt_factor, fmt_number, fmt_shape


def param(name: str, err: float, allowed: float, ratio: float = 1.0, rounding: bool = False) -> ParamComparison:
    return ParamComparison(name, (3,), err, err / 2.0, allowed, 1.0, ratio, int(err > allowed), 3, rounding)


def report(
    *, passed: bool, findings: tuple[Finding, ...] = (), check: str = "per-sample", **kw: object
) -> GradEquivReport:
    params = (param("fc.weight", 0.0 if passed else 1.0, 0.1), param("fc.bias", 0.0, 0.1))
    working = Comparison("mean", "float32", 1e-4, 0.0, params, 2.0)
    r = GradEquivReport(
        passed=passed,
        check=check,
        backend="torch",
        batch_size=8,
        dtype="float32",
        device="cpu",
        reduction="mean",
        weighted=False,
        matched="mean" if passed else None,
        working=working,
        **kw,  # type: ignore[arg-type]
    )
    r.findings = findings
    return r


def test_format_vocabulary() -> None:
    assert fmt_number(0.0) == "0" and fmt_number(float("nan")) == "—" and fmt_number(math.inf) == "inf"
    assert fmt_number(1.5e-3) == "1.50e-03"
    assert fmt_shape((3,)) == "(3,)" and fmt_shape((2, 3)) == "(2, 3)"
    assert fmt_factor(8.0) == "8" and fmt_factor(1.3333333) == "1.333"
    assert fmt_counts([9, 2, 6, 4]) == "9, 2, 6, 4"
    assert close_to(0.125, 1 / 8) and not close_to(0.13, 1 / 8)
    assert columns([("a", "bb"), ("ccc", "d")]) == ["  a    bb", "  ccc  d"]


def test_a_passing_report_says_what_held() -> None:
    text = render(report(passed=True))
    assert (
        text.splitlines()[0] == "Gradients are equivalent: the batch gradient equals the mean of per-sample gradients."
    )
    assert "MISMATCH" not in text


def test_a_vacuous_pass_says_the_check_saw_nothing() -> None:
    r = report(passed=True, vacuous=True)
    assert "could see nothing" in r.summary() and "every gradient is zero" in str(r)


@pytest.mark.parametrize(
    ("scales", "expected"),
    [
        ((("fc.weight", 8.0),), "fc.weight: B times the reference (B=8); every other parameter matches."),
        ((("fc.weight", 0.125),), "fc.weight: 1/B of the reference (B=8); every other parameter matches."),
        ((("fc.weight", -1.0),), "fc.weight: the reference with the opposite sign; every other parameter matches."),
        ((("fc.weight", 1.5), ("fc.bias", 1.5)), "fc.weight, fc.bias: 1.5 times the reference."),
    ],
)
def test_a_scale_confined_to_parameters_names_them(scales: tuple, expected: str) -> None:
    text = render(report(passed=False, findings=(Finding("parameter-scale", scales=scales),)))
    cause = next(line for line in text.splitlines() if line.startswith("Cause:"))
    assert cause.endswith(expected)


def test_known_weights_print_counts_and_weights_print_integers() -> None:
    known = Finding(
        "known-weights",
        label="their tokens",
        matched="mean weighted by their tokens",
        weights=(1.7, 0.4, 1.1, 0.8),
        counts=(9, 2, 6, 4),
    )
    assert "weighted by their tokens: 9, 2, 6, 4." in render(report(passed=False, findings=(known,)))
    found = Finding("weights", weights=(1.7, 0.4, 1.1, 0.8), counts=(9, 2, 6, 4))
    assert "in proportion to 9, 2, 6, 4: a count per sample" in render(report(passed=False, findings=(found,)))


def test_float64_rounding_rows_are_marked_and_said() -> None:
    r = report(passed=True, rounding=True)
    r.float64 = Comparison("mean", "float64", 1e-7, 0.0, (param("k.bias", 1e-9, 1e-10, rounding=True),), 2.0)
    text = render(r)
    assert "rounding" in text.split("float64 re-check")[1]
    assert "shrink in float64 as rounding error does" in text and "k.bias" in text


def test_the_fuzz_example_comes_right_below_the_cause() -> None:
    r = report(passed=False, example="smallest failing example: batch_size=2")
    lines = render(r).splitlines()
    assert lines[0] == "the batch gradient is not the mean of per-sample gradients (1 of 2 parameters differ)"
    assert lines[2] == "smallest failing example: batch_size=2"
