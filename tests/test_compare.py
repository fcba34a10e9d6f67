"""The shared comparison: its figures against a plain float64 computation, per parameter."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from pytest_gradcheck.compare import FlatGrads, Pair, compare_gradients

finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def gradient_pairs(draw: st.DrawFn) -> tuple[dict, dict]:
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    shapes = draw(st.lists(hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4), min_size=1, max_size=5))
    b, r = {}, {}
    for i, shape in enumerate(shapes):
        b[f"p{i}"] = draw(hnp.arrays(dtype, shape, elements=finite))
        # a reference that is equal, slightly off, or unrelated
        kind = draw(st.sampled_from(["same", "near", "other"]))
        if kind == "same":
            r[f"p{i}"] = b[f"p{i}"].copy()
        elif kind == "near":
            r[f"p{i}"] = (b[f"p{i}"] * (1 + 1e-6)).astype(dtype)
        else:
            r[f"p{i}"] = draw(hnp.arrays(dtype, shape, elements=finite))
    return b, r


def plain(b: np.ndarray, r: np.ndarray, k: float, rtol: float, atol: float, problem: float) -> tuple[float, float, int]:
    """The documented rule: ``max|b - k r| <= atol + rtol * max(own scale, 1e-3 * problem scale)``."""
    b, r = np.asarray(b, np.float64).ravel(), k * np.asarray(r, np.float64).ravel()
    if b.size == 0:
        return 0.0, atol, 0
    diff = np.abs(b - r)
    allowed = atol + rtol * max(np.abs(b).max(), np.abs(r).max(), 1e-3 * problem)
    return float(diff.max()), allowed, int((diff > allowed).sum()) if diff.max() > allowed else 0


@settings(max_examples=150, deadline=None)
@given(gradient_pairs(), st.sampled_from([1.0, 0.25, 1 / 3]), st.booleans())
def test_figures_match_a_plain_float64_computation(pair: tuple[dict, dict], k: float, flat: bool) -> None:
    b, r = pair
    if flat:  # the layout the torch backend hands over: views into one buffer
        b, r = FlatGrads.of(b), FlatGrads.of(r)
    comp = Pair(b, r).compare(k, 1e-4, 1e-6, "mean", "float32")
    problem = max(
        [float(np.abs(np.asarray(v, np.float64)).max()) for v in b.values() if np.size(v)]
        + [abs(k) * float(np.abs(np.asarray(v, np.float64)).max()) for v in r.values() if np.size(v)],
        default=0.0,
    )
    assert math.isclose(comp.scale, problem, rel_tol=1e-6)
    for pc in comp.params:
        max_abs, allowed, over = plain(b[pc.name], r[pc.name], k, 1e-4, 1e-6, problem)
        assert pc.shape == np.shape(r[pc.name])
        assert pc.numel == np.size(r[pc.name])
        # float32 inputs: b - k*r is formed in float32, within a few ulps of the scale
        assert math.isclose(pc.max_abs_err, max_abs, rel_tol=1e-5, abs_tol=1e-6 * max(1.0, allowed / 1e-4))
        assert math.isclose(pc.allowed, allowed, rel_tol=1e-6)
        if abs(max_abs - allowed) > 1e-5 * max(allowed, 1e-12) + 1e-6:  # off the decision edge
            assert pc.passed == (max_abs <= allowed)
            assert (pc.mismatched > 0) == (max_abs > allowed)


def test_cosine_and_ratio() -> None:
    b = {"w": np.array([1.0, 0.0], np.float32), "v": np.array([2.0, 2.0])}
    r = {"w": np.array([0.0, 1.0], np.float32), "v": np.array([1.0, 1.0])}
    c = compare_gradients(b, r, rtol=1e-4, atol=0.0, reduction="mean", precision="float32")
    w, v = c.params
    assert w.cosine == pytest.approx(0.0) and w.ratio == pytest.approx(1.0) and not w.passed
    assert v.cosine == pytest.approx(1.0) and v.ratio == pytest.approx(2.0) and v.mismatched == 2


def test_empty_and_non_finite_parameters() -> None:
    b = {"e": np.zeros((0, 3)), "w": np.array([1.0, np.nan, np.inf])}
    r = {"e": np.zeros((0, 3)), "w": np.array([1.0, 1.0, 1.0])}
    e, w = compare_gradients(b, r, rtol=1e-4, atol=0.0, reduction="sum", precision="float64").params
    assert e.passed and e.numel == 0
    assert not w.passed and w.max_abs_err == math.inf and w.mismatched == 2


def test_flat_layout_is_checked() -> None:
    with pytest.raises(ValueError, match="flat buffer"):
        FlatGrads.from_flat(np.zeros(5), ["a"], [(2, 2)])
    g = FlatGrads.from_flat(np.arange(6.0), ["a", "b", "c"], [(2, 2), (0,), (2,)])
    assert g["a"].tolist() == [[0.0, 1.0], [2.0, 3.0]] and g["c"].tolist() == [4.0, 5.0]
    assert np.shares_memory(g["a"], g.flat) and g.nonempty == ["a", "c"]
