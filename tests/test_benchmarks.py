"""Smoke test of ``benchmarks/bench_gradequiv.py``: it runs end to end and writes sane JSON.

No timing thresholds here: the figures depend on the machine. Only shape and sign.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "benchmarks" / "bench_gradequiv.py"


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "unit ms" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and value > 0


def test_quick_benchmark_writes_expected_json(quick_report: dict[str, Any]) -> None:
    report = quick_report
    assert {"meta", "availability", "results", "guard", "startup", "plugin_imports", "targets"} <= set(report)
    assert report["meta"]["quick"] is True
    assert {"assert_gradequiv", "no_implicit_broadcast", "opacus"} <= set(report["availability"])

    rows = {(r["model"], r["batch_size"]): r for r in report["results"]}
    assert {("mlp", 16), ("mlp", 64), ("cnn", 16)} <= set(rows)
    check_available = report["availability"]["assert_gradequiv"] == "ok"
    for key, row in rows.items():
        methods = row["methods"]
        assert {"unit", "check", "floor", "naive", "vmap", "opacus"} <= set(methods), key
        assert _positive(methods["unit"]["median_ms"]), key
        assert methods["unit"]["ratio"] == 1.0
        for name in ("naive", "vmap"):
            assert _positive(methods[name]["ratio"]), (key, name, methods[name])
            assert _positive(methods[name]["median_ms"]), (key, name, methods[name])
        if check_available:
            # A passing check on a correct model: a figure, not a note saying it failed;
            # and the two passes it cannot skip, timed alone (the floor) beside it.
            assert _positive(methods["check"].get("ratio")), (key, methods["check"])
            assert _positive(methods["floor"].get("ratio")), (key, methods["floor"])
        else:
            assert "not available" in methods["check"]["note"]
            assert "not available" in methods["floor"]["note"]

    memory = rows[("mlp", 64)]["memory"]
    assert "how" in memory or "notes" in memory
    if "unit" in memory.get("peak_bytes", {}):
        # Peak RSS rises in whole pages: a tiny training step can be served from
        # memory already mapped and measure 0 bytes. Then there is no ratio to take.
        unit_peak = memory["peak_bytes"]["unit"]
        assert isinstance(unit_peak, int) and unit_peak >= 0
        if check_available:
            assert memory["peak_bytes"].get("check", -1) >= 0
            if unit_peak > 0:
                assert _positive(memory["ratio"]) or memory["peak_bytes"]["check"] == 0
            else:
                assert "ratio" not in memory

    for section in ("guard", "startup", "plugin_imports"):
        assert "status" in report[section], section
    if report["startup"]["status"] == "ok":
        assert _positive(report["startup"]["with_ms"]) and _positive(report["startup"]["without_ms"])
        assert isinstance(report["startup"]["paired_overhead_cpu_ms"], float)
        target = next(t for t in report["targets"] if t["target"].startswith("plugin start-up"))
        assert target["status"] == ("PASS" if report["startup"]["paired_overhead_cpu_ms"] <= 20.0 else "MISS")
    if report["plugin_imports"]["status"] == "ok":
        assert isinstance(report["plugin_imports"]["torch"], bool)
        assert isinstance(report["plugin_imports"]["numpy"], bool)
    if report["guard"]["status"] == "ok":
        assert _positive(report["guard"]["same_shape"]["plain_ns_per_op"])

    assert report["targets"], "targets are listed"
    for target in report["targets"]:
        assert target["status"] in {"PASS", "MISS", "N/A"}, target
