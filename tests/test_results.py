"""Results CI reads (issue 18): the session summary, --gradequiv-json, JUnit properties, GitHub
annotations and the near-miss gate, through real pytest runs, in one process and under xdist."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from typing import Any

import pytest

from pytest_gradcheck import results

MODELS = """
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.manual_seed(0)


def mlp():
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))


def wide():
    return nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))
"""

BODY = """
@pytest.mark.gradequiv
def test_ok(gradequiv):
    gradequiv(mlp(), F.mse_loss, torch.randn(8, 3), torch.randn(8, 1))
    gradequiv(mlp(), F.mse_loss, torch.randn(4, 3), torch.randn(4, 1))

def test_broadcast(gradequiv):
    out, labels = mlp(), torch.randn(8)
    gradequiv(out, lambda o, y: (o - y).pow(2).mean(), torch.randn(8, 3), labels)

def test_sum(gradequiv):
    gradequiv(mlp(), lambda o, y: ((o - y) ** 2).sum(), torch.randn(6, 3), torch.randn(6, 1))

def test_plain():
    assert True
"""

KEYS = {
    "nodeid",
    "check",
    "status",
    "cause",
    "location",
    "message",
    "batch_size",
    "dtype",
    "device",
    "reference",
    "chunk_size",
    "reference_reason",
    "rtol",
    "atol",
    "float64",
    "worst",
    "margin",
    "seconds",
}

XDIST = [pytest.param(False, id="one-process"), pytest.param(True, id="xdist")]


def run(pytester: pytest.Pytester, xdist: bool, *args: str) -> pytest.RunResult:
    if xdist:
        pytest.importorskip("xdist")
        return pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider", *args)
    return pytester.runpytest("-p", "no:cacheprovider", *args)


def write(pytester: pytest.Pytester, body: str = BODY) -> None:
    pytester.makepyfile(test_user=MODELS + textwrap.dedent(body))


def load(pytester: pytest.Pytester, name: str = "out.json") -> dict[str, Any]:
    with open(pytester.path / name, encoding="utf-8") as fh:
        data: dict[str, Any] = json.load(fh)
    return data


def by_test(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for record in doc["checks"]:
        out.setdefault(record["nodeid"].split("::")[-1], []).append(record)
    return out


@pytest.mark.parametrize("xdist", XDIST)
def test_json_document_one_record_per_check(pytester: pytest.Pytester, xdist: bool) -> None:
    write(pytester)
    result = run(pytester, xdist, "--gradequiv-json=out.json")
    result.assert_outcomes(passed=2, failed=2)
    doc = load(pytester)
    assert doc["version"] == 1 and set(doc) == {"version", "checks"}
    assert all(set(r) == KEYS for r in doc["checks"])
    tests = by_test(doc)
    assert sorted(tests) == ["test_broadcast", "test_ok", "test_sum"]
    ok = tests["test_ok"]
    assert [r["status"] for r in ok] == ["passed", "passed"]
    for r in ok:
        assert r["check"] == "per-sample" and r["cause"] is None and r["location"] is None
        assert r["dtype"] == "float32" and r["device"] == "cpu" and r["reference"] == "vmap"
        assert r["chunk_size"] is None  # the whole batch in one vmap call
        assert r["float64"] == "not-run" and r["seconds"] >= 0
        assert set(r["worst"]) == {"parameter", "max_abs_err", "rel_err", "allowed"}
        assert 0 <= r["margin"] <= 1
    [bc] = tests["test_broadcast"]
    assert bc["status"] == "failed" and bc["cause"] == "broadcast" and bc["float64"] == "survives"
    assert bc["location"] == "test_user.py:23"  # the lambda's line in the user's file, relative to rootdir
    assert bc["batch_size"] == 8 and bc["margin"] > 1
    [sm] = tests["test_sum"]
    assert sm["status"] == "failed" and sm["cause"] == "reduction-factor" and sm["location"] is None


def test_json_from_ini_and_a_folder_that_does_not_exist(pytester: pytest.Pytester) -> None:
    write(pytester)
    pytester.makeini("[pytest]\ngradequiv_json = reports/gradequiv.json\n")
    run(pytester, False).assert_outcomes(passed=2, failed=2)
    assert len(load(pytester, "reports/gradequiv.json")["checks"]) == 4


def test_no_json_without_the_option(pytester: pytest.Pytester) -> None:
    write(pytester)
    run(pytester, False).assert_outcomes(passed=2, failed=2)
    assert not list(pytester.path.glob("*.json"))


@pytest.mark.parametrize("xdist", XDIST)
def test_junit_flat_properties(pytester: pytest.Pytester, xdist: bool) -> None:
    write(pytester)
    run(pytester, xdist, "--junitxml=junit.xml").assert_outcomes(passed=2, failed=2)
    root = ET.parse(pytester.path / "junit.xml").getroot()
    props: dict[str, dict[str, str]] = {}
    for case in root.iter("testcase"):
        props[case.attrib["name"]] = {p.attrib["name"]: p.attrib["value"] for p in case.iter("property")}
    assert props["test_plain"] == {}
    names = ["checks", "failed", "cause", "location", "margin", "seconds"]
    for name in ("test_ok", "test_broadcast", "test_sum"):
        assert list(props[name]) == [f"gradequiv.{n}" for n in names]  # no printed dict any more
    assert props["test_ok"]["gradequiv.checks"] == "2" and props["test_ok"]["gradequiv.failed"] == "0"
    assert props["test_ok"]["gradequiv.cause"] == "" and 0 <= float(props["test_ok"]["gradequiv.margin"]) <= 1
    assert props["test_broadcast"]["gradequiv.cause"] == "broadcast"
    assert props["test_broadcast"]["gradequiv.location"] == "test_user.py:23"
    assert props["test_sum"]["gradequiv.failed"] == "1"
    assert props["test_sum"]["gradequiv.cause"] == "reduction-factor"
    assert float(props["test_sum"]["gradequiv.seconds"]) >= 0


@pytest.mark.parametrize("xdist", XDIST)
def test_summary_line_by_default_and_table_with_v(pytester: pytest.Pytester, xdist: bool) -> None:
    write(pytester)
    quiet = run(pytester, xdist)
    quiet.stdout.fnmatch_lines(
        [
            "*- gradequiv -*",
            "4 gradient checks in 3 tests: 2 passed, 2 failed, 0 passed only after the float64 re-check",
        ]
    )
    quiet.stdout.no_fnmatch_line("test*check*result*cause*")
    verbose = run(pytester, xdist, "-v")
    verbose.stdout.fnmatch_lines(
        [
            "test * check * result * cause * worst parameter * error/allowed * reference * time",
            "test_user.py::test_ok * per-sample * passed * - * vmap *s",
        ]
    )
    verbose.stdout.fnmatch_lines(["test_user.py::test_broadcast * per-sample * failed * broadcast * vmap *s"])
    verbose.stdout.fnmatch_lines(["test_user.py::test_sum * per-sample * failed * reduction-factor * vmap *s"])


def test_no_summary_when_no_check_ran(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_plain="def test_plain():\n    assert True\n")
    result = run(pytester, False)
    result.assert_outcomes(passed=1)
    result.stdout.no_fnmatch_line("*gradient check*")


@pytest.mark.parametrize("xdist", XDIST)
def test_github_annotations(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, xdist: bool) -> None:
    write(pytester)
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    monkeypatch.delenv("GITHUB_WORKSPACE", raising=False)
    result = run(pytester, xdist)
    result.stdout.fnmatch_lines(["::error file=test_user.py,line=23,title=gradequiv::*"])
    assert sum(line.startswith("::error") for line in result.outlines) == 1  # test_sum has no location


def test_annotations_by_option_and_paths_from_the_workspace(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(pytester)
    monkeypatch.delenv("GITHUB_ACTIONS", raising=False)
    assert not any(line.startswith("::error") for line in run(pytester, False).outlines)
    monkeypatch.setenv("GITHUB_WORKSPACE", str(pytester.path.parent))
    result = run(pytester, False, "--gradequiv-annotations")
    result.stdout.fnmatch_lines([f"::error file={pytester.path.name}/test_user.py,line=23,title=gradequiv::*"])


WIDE = """
def test_wide(gradequiv):
    gradequiv(wide(), F.mse_loss, torch.randn(63, 64), torch.randn(63, 1))
"""


@pytest.mark.parametrize("xdist", XDIST)
def test_near_miss_gate(pytester: pytest.Pytester, xdist: bool) -> None:
    write(pytester, WIDE)
    run(pytester, xdist, "--gradequiv-json=out.json").assert_outcomes(passed=1)
    [record] = load(pytester)["checks"]
    margin, parameter = record["margin"], record["worst"]["parameter"]
    if not margin:
        pytest.skip("this torch build computes the batch gradient exactly: no margin to gate on")
    gated = run(pytester, xdist, f"--gradequiv-max-margin={margin / 2}", "--gradequiv-json=gated.json")
    gated.assert_outcomes(failed=1)
    gated.stdout.fnmatch_lines([f"*near miss: {parameter} uses * of its tolerance*over --gradequiv-max-margin=*"])
    [failed] = load(pytester, "gated.json")["checks"]
    assert failed["status"] == "failed" and failed["cause"] == "near-miss"
    run(pytester, xdist, f"--gradequiv-max-margin={margin * 2}").assert_outcomes(passed=1)


def test_near_miss_gate_from_ini_is_off_by_default(pytester: pytest.Pytester) -> None:
    write(pytester, WIDE)
    run(pytester, False).assert_outcomes(passed=1)
    pytester.makeini("[pytest]\ngradequiv_max_margin = 0\n")
    result = run(pytester, False, "--gradequiv-json=out.json")
    [record] = load(pytester)["checks"]
    if record["cause"] is None:
        pytest.skip("this torch build computes the batch gradient exactly: no margin to gate on")
    result.assert_outcomes(failed=1)


def test_bad_max_margin_is_a_usage_error(pytester: pytest.Pytester) -> None:
    write(pytester)
    result = run(pytester, False, "--gradequiv-max-margin=-1")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gradequiv-max-margin*"])


def test_records_are_plain_json_and_annotations_escape() -> None:
    record = {
        "nodeid": "t.py::t",
        "check": "per-sample",
        "status": "failed",
        "cause": "broadcast",
        "location": "a,b.py:3",
        "message": "50% off\nsecond",
        "float64": "survives",
        "margin": None,
        "worst": None,
        "seconds": 0.5,
    }
    assert results.annotation(record, "/r", None) == "::error file=a%2Cb.py,line=3,title=gradequiv::50%25 off%0Asecond"
    assert results.annotation({**record, "status": "passed"}, "/r", None) is None
    assert results.annotation({**record, "location": None}, "/r", None) is None
    assert results.junit_properties([record])[4] == ("gradequiv.margin", "")
    json.dumps(results.document([record]), allow_nan=False)


ROUNDING = """
import numpy as np

from pytest_gradcheck.compare import rounding_shrink_limit
from pytest_gradcheck.verdict import run_check


class Problem:
    '''float32 noise in a zero-gradient bias that shrinks like rounding in float64.'''

    backend, batch_size, dtype, device = "numpy", 4, "float32", "cpu"
    reference_method, fallback_reason = "vmap", None
    dropout_disabled = ()
    broadcasts = ()

    def batch_gradient(self, float64):
        noise = 1e-3 * (rounding_shrink_limit("float32") / 10 if float64 else 1.0)
        return {"w": np.array([1.0, 2.0]), "bias": np.array([noise, -noise])}

    def reference_gradient(self, coeffs, float64):
        return {"w": np.array([1.0, 2.0]), "bias": np.zeros(2)}

    def per_sample_gradients(self, float64):
        return None

    def weight_candidates(self):
        return []

    def loss_values(self, float64):
        return None


def test_rescued():
    assert run_check(Problem(), reduction="sum").rounding
"""


@pytest.mark.parametrize("xdist", XDIST)
def test_checks_rescued_by_the_float64_recheck_are_counted_and_listed(pytester: pytest.Pytester, xdist: bool) -> None:
    pytester.makepyfile(test_user=ROUNDING)
    result = run(pytester, xdist, "--gradequiv-json=out.json", "--gradequiv-max-margin=0.5")
    result.assert_outcomes(passed=1)  # the bias's error is rounding, not a near miss
    result.stdout.fnmatch_lines(
        [
            "1 gradient check in 1 test: 1 passed, 0 failed, 1 passed only after the float64 re-check",
            "passed only after the float64 re-check: test_user.py::test_rescued (numpy)",
        ]
    )
    [record] = load(pytester)["checks"]
    assert record["float64"] == "rounding" and record["worst"]["parameter"] == "w" and record["margin"] == 0
    run(pytester, xdist, "-v").stdout.fnmatch_lines(["test_user.py::test_rescued * numpy * passed (float64) *"])


FUZZ = """
import torch.nn.functional as F
from torch import nn

from pytest_gradcheck import fuzz_gradequiv


def test_fuzz_passes():
    fuzz_gradequiv(lambda features: nn.Linear(features, 1), F.mse_loss,
                   input_shape=("features",), target_shape=(1,), max_examples=5)


def test_fuzz_finds_the_broadcast():
    fuzz_gradequiv(lambda features: nn.Linear(features, 1), lambda out, y: (out - y).pow(2).mean(),
                   input_shape=("features",), target_shape=(), max_examples=10)
"""


@pytest.mark.parametrize("xdist", XDIST)
def test_a_fuzz_run_is_one_check(pytester: pytest.Pytester, xdist: bool) -> None:
    """Each example (and each shrinking step) runs a check; the session counts the run once."""
    pytester.makepyfile(test_user=FUZZ)
    run(pytester, xdist, "--gradequiv-json=out.json").assert_outcomes(passed=1, failed=1)
    tests = by_test(load(pytester))
    [passed] = tests["test_fuzz_passes"]
    [failed] = tests["test_fuzz_finds_the_broadcast"]
    assert passed["check"] == failed["check"] == "fuzz"
    assert passed["status"] == "passed" and failed["status"] == "failed" and failed["cause"] == "broadcast"


@pytest.mark.parametrize("xdist", XDIST)
def test_checks_that_could_not_run_are_recorded_as_errors_with_their_cause(
    pytester: pytest.Pytester, xdist: bool
) -> None:
    write(
        pytester,
        """
        class Noisy(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(4, 1)

            def forward(self, x):
                return self.fc(x + torch.randn_like(x))

        def test_random_step(gradequiv):
            gradequiv(Noisy(), F.mse_loss, torch.randn(8, 4), torch.randn(8, 1))

        def test_batchnorm(gradequiv):
            gradequiv(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)), F.mse_loss, torch.randn(8, 4), torch.randn(8, 3))
        """,
    )
    result = run(pytester, xdist, "--gradequiv-json=out.json")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*2 gradient checks in 2 tests: 0 passed, 0 failed, 2 could not run*"])
    records = by_test(load(pytester))
    (random,) = records["test_random_step"]
    assert random["status"] == "error" and random["cause"] == "randomness"
    assert random["message"].startswith("the training step is random")
    (bn,) = records["test_batchnorm"]
    assert bn["status"] == "error" and bn["cause"] == "unsupported-model" and bn["check"] == "per-sample"
