"""One record per check, for CI: the session summary, ``--gradequiv-json``, JUnit properties, annotations.

Torch-free: records are built from the report objects the checks leave (read
through ``getattr``, so every kind of report works) into plain dicts of strings,
numbers and ``None``, which travel from pytest-xdist workers to the controller
and are written as JSON unchanged. The words live here too: the summary line,
the ``-v`` table, the GitHub Actions ``::error`` line.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

__all__ = [
    "VERSION",
    "annotation",
    "junit_properties",
    "make_record",
    "summary_line",
    "table",
    "worst_record",
    "write_json",
]

from .report import CAUSE_KEYS

VERSION = 1

Record = dict[str, Any]


def _number(value: Any) -> Optional[float]:
    """``value`` as a finite float, else ``None`` (JSON has no inf or NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def check_kind(report: Any) -> str:
    """The kind of check: per-sample, step, accumulation, numpy, ddp, independence, fuzz, grad-sample, ..."""
    if getattr(report, "example", None) is not None:
        return "fuzz"
    check = getattr(report, "check", None)
    if check is None:
        return "finite-differences" if hasattr(report, "eps") else type(report).__name__
    if check == "per-sample" and getattr(report, "backend", None) == "numpy":
        return "numpy"
    return str(check)


def _params(report: Any) -> Sequence[Any]:
    """The per-parameter figures the verdict rests on (``name``, ``max_abs_err``, ``rel_err``, ``allowed``)."""
    final = getattr(report, "final", None)
    if final is not None:
        return tuple(final.params)
    params = getattr(report, "params", None)  # finite differences
    if params is not None:
        return tuple(params)
    return tuple(getattr(report, "alone", ()))  # independence: the samples that differ alone


def _ratio(p: Any) -> float:
    err, allowed = float(p.max_abs_err), float(p.allowed)
    if allowed > 0:
        return err / allowed
    return 0.0 if err == 0 else math.inf


def worst_of(report: Any) -> tuple[Optional[dict[str, Any]], Optional[float]]:
    """The parameter using most of its tolerance, and that share (the **margin**: error / allowed)."""
    params = [p for p in _params(report) if hasattr(p, "max_abs_err") and hasattr(p, "allowed")]
    if getattr(report, "passed", False):  # a parameter passed as rounding (it shrank in float64) is not near a miss
        params = [p for p in params if not getattr(p, "rounding", False)]
    if not params:
        return None, None
    worst = max(params, key=_ratio)
    name = getattr(worst, "name", None)
    if name is None and hasattr(worst, "sample"):
        name = f"sample {worst.sample}"
    figures = {
        "parameter": name,
        "max_abs_err": _number(worst.max_abs_err),
        "rel_err": _number(getattr(worst, "rel_err", None)),
        "allowed": _number(worst.allowed),
    }
    return figures, _number(_ratio(worst))


def _broadcast_site(report: Any) -> Any:
    """The first broadcast record behind a failure (the findings first, then what the guard saw)."""
    for finding in getattr(report, "findings", ()):
        for rec in getattr(finding, "records", ()):
            if hasattr(rec, "filename"):
                return rec
    for rec in getattr(report, "broadcasts", ()):
        if hasattr(rec, "filename") and getattr(rec, "loss_inputs", True):
            return rec
    return None


def cause_of(report: Any) -> Optional[str]:
    """A stable key for why a check failed (``report.cause`` when the report names it), ``None`` for a pass."""
    if getattr(report, "passed", False):
        return None
    cause = getattr(report, "cause", None)
    if isinstance(cause, str):
        return cause
    for finding in getattr(report, "findings", ()):
        key = CAUSE_KEYS.get(getattr(finding, "kind", ""))
        if key is not None:
            return key
    causes = getattr(report, "causes", ())  # independence
    if causes:
        return str(causes[0])
    if getattr(report, "leaks", ()):
        return "coupling"
    return "mismatch"


def _relative(path: str, root: str) -> str:
    """``path`` relative to ``root`` when it lies under it, else as given."""
    if not os.path.isabs(path):
        return path.replace(os.sep, "/")
    rel = os.path.relpath(path, root)
    return path if rel.startswith("..") else rel.replace(os.sep, "/")


def location_of(report: Any, rootdir: str) -> Optional[str]:
    """``path:line`` of the user's statement behind a failure, relative to ``rootdir`` (``None`` if none)."""
    if getattr(report, "passed", False):
        return None
    location = getattr(report, "location", None)
    if isinstance(location, str) and location:
        return location
    site = _broadcast_site(report)
    if site is None:
        return None
    return f"{_relative(str(site.filename), rootdir)}:{int(site.lineno)}"


def _float64(report: Any) -> str:
    if getattr(report, "rounding", False):
        return "rounding"
    if getattr(report, "float64", None) is not None:
        return "survives"
    return "not-run"


def _first_line(report: Any) -> Optional[str]:
    if getattr(report, "passed", False):
        return None
    try:
        text = str(report)
    except Exception:  # a report that cannot render must not break the session
        return None
    return next((line.strip() for line in text.splitlines() if line.strip()), None)


def make_record(report: Any, nodeid: str, seconds: float, rootdir: str, kind: Optional[str] = None) -> Record:
    """The record of one check (plain JSON types only); ``kind`` names the check where its report cannot."""
    final = getattr(report, "final", report)
    worst, margin = worst_of(report)
    passed = bool(getattr(report, "passed", False))
    failed_recheck = getattr(report, "float64_error", None) is not None and not passed
    return {
        "nodeid": nodeid,
        "check": kind or check_kind(report),
        "status": "passed" if passed else ("error" if failed_recheck or getattr(report, "error", False) else "failed"),
        "cause": cause_of(report),
        "location": location_of(report, rootdir),
        "message": _first_line(report),
        "batch_size": getattr(report, "batch_size", None),
        "dtype": getattr(report, "dtype", None),
        "device": getattr(report, "device", None),
        "reference": getattr(report, "reference_method", None),
        "chunk_size": getattr(report, "chunk_size", None),
        "reference_reason": getattr(report, "reference_reason", None) or getattr(report, "fallback_reason", None),
        "rtol": _number(getattr(final, "rtol", None)),
        "atol": _number(getattr(final, "atol", None)),
        "float64": _float64(report),
        "worst": worst,
        "margin": margin,
        "seconds": round(float(seconds), 6),
    }


def over_margin(record: Record, limit: float) -> bool:
    """Whether a passing check uses more than ``limit`` of its tolerance."""
    margin = record.get("margin")
    return record["status"] == "passed" and margin is not None and margin > limit


def fail_near_miss(record: Record, limit: float) -> str:
    """Turn a passing record over ``limit`` into a failure (cause ``near-miss``); return its message."""
    worst = record.get("worst") or {}
    message = (
        f"near miss: {worst.get('parameter')} uses {record['margin']:.2f} of its tolerance "
        f"(max abs err {worst.get('max_abs_err'):.3g}, allowed {worst.get('allowed'):.3g}), "
        f"over --gradequiv-max-margin={limit:g}"
    )
    record.update(status="failed", cause="near-miss", message=message)
    return message


def worst_record(records: Sequence[Record]) -> Record:
    """The record that speaks for a test: the first failure, else the largest margin."""
    failed = [r for r in records if r["status"] != "passed"]
    if failed:
        return failed[0]
    return max(records, key=lambda r: -1.0 if r.get("margin") is None else float(r["margin"]))


def junit_properties(records: Sequence[Record]) -> list[tuple[str, Any]]:
    """Flat ``gradequiv.*`` JUnit properties of one test (its worst check speaks for it)."""
    worst = worst_record(records)
    margin = worst.get("margin")
    return [
        ("gradequiv.checks", len(records)),
        ("gradequiv.failed", sum(r["status"] != "passed" for r in records)),
        ("gradequiv.cause", worst.get("cause") or ""),
        ("gradequiv.location", worst.get("location") or ""),
        ("gradequiv.margin", "" if margin is None else f"{margin:.4g}"),
        ("gradequiv.seconds", f"{worst['seconds']:.3f}"),
    ]


def summary_line(records: Sequence[Record]) -> str:
    """``"5 gradient checks in 4 tests: 3 passed, 2 failed, 1 passed only after the float64 re-check"``."""
    n, tests = len(records), len({r["nodeid"] for r in records})
    passed = sum(r["status"] == "passed" for r in records)
    errors = sum(r["status"] == "error" for r in records)
    rescued = sum(r["status"] == "passed" and r["float64"] == "rounding" for r in records)
    line = (
        f"{n} gradient check{'s' if n != 1 else ''} in {tests} test{'s' if tests != 1 else ''}: "
        f"{passed} passed, {n - passed - errors} failed"
    )
    if errors:  # checks that could not run (a random step, a bad argument): counted apart
        line += f", {errors} could not run"
    return line + f", {rescued} passed only after the float64 re-check"


def rescued(records: Sequence[Record]) -> list[str]:
    """One line per check that passed only after the float64 re-check (listed without ``-v`` too)."""
    return [
        f"passed only after the float64 re-check: {r['nodeid']} ({r['check']})"
        for r in records
        if r["status"] == "passed" and r["float64"] == "rounding"
    ]


_COLUMNS = ("test", "check", "result", "cause", "worst parameter", "error/allowed", "reference", "time")


def _row(r: Record) -> tuple[str, ...]:
    result = r["status"] + (" (float64)" if r["float64"] == "rounding" else "")
    margin = r.get("margin")
    return (
        r["nodeid"],
        r["check"],
        result,
        r.get("cause") or "-",
        (r.get("worst") or {}).get("parameter") or "-",
        "-" if margin is None else f"{margin:.3g}",
        r.get("reference") or "-",
        f"{r['seconds']:.2f}s",
    )


def table(records: Sequence[Record]) -> list[str]:
    """The ``-v`` table of checks, one line each, columns aligned."""
    rows = [_COLUMNS, *(_row(r) for r in records)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]


def annotation(record: Record, rootdir: str, workspace: Optional[str]) -> Optional[str]:
    """The GitHub Actions ``::error`` line of a failed check with a location, else ``None``."""
    location = record.get("location")
    if record["status"] == "passed" or not location:
        return None
    path, _, line = str(location).rpartition(":")
    if not path or not line.isdigit():
        return None
    absolute = path if os.path.isabs(path) else os.path.join(rootdir, path)
    file = _relative(os.path.abspath(absolute), workspace or rootdir)
    text = record.get("message") or record.get("cause") or "gradient check failed"
    # the escapes GitHub's workflow commands read: % CR LF in data, and also : , in properties
    text = text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
    file = file.replace("%", "%25").replace(":", "%3A").replace(",", "%2C")
    return f"::error file={file},line={line},title=gradequiv::{text}"


def document(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The ``--gradequiv-json`` document."""
    return {"version": VERSION, "checks": [dict(r) for r in records]}


def write_json(path: str, records: Iterable[Mapping[str, Any]]) -> None:
    """Write the session's records to ``path`` (folders created as needed)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(document(records), fh, indent=2, allow_nan=False)
        fh.write("\n")
