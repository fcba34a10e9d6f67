"""Tests of the NumPy backend's per-sample check: the verdict, the caller's arrays, bad input.

Broadcast detection is tested in test_numpy_tracking.py, the finite-difference check in
test_finite_differences.py.
"""

from __future__ import annotations

import ast
import doctest
import pathlib
import subprocess
import sys
import warnings
from typing import Any

import numpy as np
import pytest
from numpy_nets import make_net, net_grad, net_loss, summed_grad

from pytest_gradcheck import (
    GradEquivError,
    InvalidArgument,
    _tracking,
    assert_grad_numpy,
    assert_gradequiv,
    assert_gradequiv_numpy,
)

# --------------------------------------------------------------------------- the verdict


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("b", [2, 7, 64])
def test_correct_backprop_passes(b: int, dtype: Any) -> None:
    params, x, y = make_net(b, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = assert_gradequiv_numpy(net_grad, params, x, y, loss_fn=net_loss)
    assert report.passed and report.matched == "mean"
    assert report.backend == "numpy" and report.batch_size == b and report.dtype == np.dtype(dtype).name
    assert report.reference_method == "per-sample calls" and report.broadcasts == ()
    assert [p.name for p in report.parameters] == ["W1", "b1", "W2", "b2"]
    assert "Gradients are equivalent" in str(report)


@pytest.mark.parametrize("b", [2, 7, 64])
def test_summed_gradient_fails_naming_the_sum(b: int) -> None:
    params, x, y = make_net(b, np.float32)
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_numpy(summed_grad, params, x, y)
    msg = str(info.value)
    assert "the batch gradient is the SUM of per-sample gradients" in msg
    assert f"{b} times too large" in msg
    assert "np.mean over the batch axis" in msg  # the NumPy advice
    report = info.value.report
    assert report.would_match == "sum" and report.float64 is not None and not report.float64.passed


def test_summed_gradient_passes_as_declared_sum_and_auto() -> None:
    params, x, y = make_net(9, np.float32)
    assert assert_gradequiv_numpy(summed_grad, params, x, y, reduction="sum").matched == "sum"
    assert assert_gradequiv_numpy(summed_grad, params, x, y, reduction="auto").matched == "sum"
    assert assert_gradequiv_numpy(net_grad, params, x, y, reduction="auto").matched == "mean"


def test_mean_declared_as_sum_fails() -> None:
    params, x, y = make_net(6)
    with pytest.raises(GradEquivError, match="MEAN of per-sample gradients"):
        assert_gradequiv_numpy(net_grad, params, x, y, reduction="sum")


def test_sequence_params_are_named_by_index_and_results_keep_structure() -> None:
    params, x, y = make_net(5)
    order = ["W1", "b1", "W2", "b2"]

    def grad_list(p: list, x: np.ndarray, y: np.ndarray) -> tuple:
        assert isinstance(p, list)
        g = net_grad(dict(zip(order, p)), x, y)
        return tuple(g[k] for k in order)

    report = assert_gradequiv_numpy(grad_list, [params[k] for k in order], x, y)
    assert [p.name for p in report.parameters] == ["params[0]", "params[1]", "params[2]", "params[3]"]


def test_single_array_params_and_tuple_inputs() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 1))
    u, v, y = rng.normal(size=(6, 2)), rng.normal(size=(6, 1)), rng.normal(size=(6, 1))

    def grad(w: np.ndarray, inputs: tuple, y: np.ndarray) -> np.ndarray:
        u, v = inputs
        x = np.concatenate([u, v], axis=1)
        return x.T @ (2 * (x @ w - y) / len(x))

    report = assert_gradequiv_numpy(grad, w, (u, v), y)
    assert report.passed and [p.name for p in report.parameters] == ["params"]


def test_no_targets() -> None:
    rng = np.random.default_rng(2)
    w, x = rng.normal(size=3), rng.normal(size=(5, 3))

    def grad(w: np.ndarray, x: np.ndarray, y: None) -> np.ndarray:
        assert y is None
        return x.T @ np.tanh(x @ w) / len(x)

    assert assert_gradequiv_numpy(grad, w, x).passed


def test_weighted_mean() -> None:
    rng = np.random.default_rng(3)
    w, x, y = rng.normal(size=(3, 1)), rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    sw = np.array([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])

    def grad(w: np.ndarray, x: np.ndarray, targets: tuple) -> np.ndarray:
        y, s = targets
        return x.T @ (s[:, None] * (x @ w - y)) / s.sum()

    report = assert_gradequiv_numpy(grad, w, x, (y, sw), weights=sw)
    assert report.matched == "weighted mean" and report.weights == tuple(sw)
    report = assert_gradequiv_numpy(grad, w, x, (y, sw), weights=lambda t: t[1][0])
    assert report.matched == "weighted mean"
    with pytest.raises(GradEquivError):
        assert_gradequiv_numpy(grad, w, x, (y, sw))


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        (np.ones((6, 1)), "weights has shape (6, 1): expected one weight per sample, (6,)"),
        (np.ones((3, 2)), "weights has shape (3, 2): expected one weight per sample, (6,)"),
        ([1.0, 2.0], "weights has shape (2,): expected one weight per sample, (6,)"),
        ("abc", "weights is a str: pass one number per sample"),
        ({"a": 1.0}, "weights is a dict: pass one number per sample"),
        ([1.0, "x", 1, 1, 1, 1], "weights cannot be read as numbers (ValueError"),
        ([1.0, -1.0, 1, 1, 1, 1], "weights must be finite and >= 0"),
        ([0.0] * 6, "weights sum to 0"),
        (lambda y: np.ones(3), "weights(sample 0) returned an array of shape (3,): the weights callable must return"),
        (lambda y: None, "weights(sample 0) returned a NoneType"),
        (lambda y: "2", "weights(sample 0) returned a str"),
    ],
)
def test_weights_are_refused_as_the_torch_check_refuses_them(weights: Any, message: str) -> None:
    # one rule for both backends (_torch.inputs.resolve_weights): a (B, 1) column is no longer
    # flattened by the NumPy check, and a callable must return one number
    rng = np.random.default_rng(3)
    w, x, y = rng.normal(size=(3, 1)), rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    with pytest.raises(InvalidArgument) as info:
        assert_gradequiv_numpy(lambda w, x, y: x.T @ (x @ w - y) / len(x), w, x, y, weights=weights)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "weights",
    [np.ones((6, 1)), [1.0, 2.0], "abc", [1.0, -1.0, 1, 1, 1, 1], [0.0] * 6, lambda y: np.ones(3), lambda y: None],
)
def test_weights_errors_read_the_same_in_both_backends(weights: Any) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    w, x, y = rng.normal(size=(3, 1)), rng.normal(size=(6, 3)), rng.normal(size=(6, 1))
    with pytest.raises(InvalidArgument) as from_numpy:
        assert_gradequiv_numpy(lambda w, x, y: x.T @ (x @ w - y) / len(x), w, x, y, weights=weights)
    model = torch.nn.Linear(3, 1)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    with pytest.raises(InvalidArgument) as from_torch:
        assert_gradequiv(model, torch.nn.functional.mse_loss, xt, yt, weights=weights)

    # the same rule and words; only the nouns differ (torch also accepts tensors)
    expected = str(from_torch.value)
    for torch_words, numpy_words in [
        ("a tensor of shape", "an array of shape"),
        ("a 1-d tensor, array or", "a 1-d array or"),
        ("(a tensor, array or", "(an array or"),
    ]:
        expected = expected.replace(torch_words, numpy_words)
    assert str(from_numpy.value) == expected


def test_checks_are_recorded_pass_or_fail() -> None:
    params, x, y = make_net(4)
    with _tracking.collecting() as reports:
        assert_gradequiv_numpy(net_grad, params, x, y)
        with pytest.raises(GradEquivError):
            assert_gradequiv_numpy(summed_grad, params, x, y)
        assert_grad_numpy(net_loss, net_grad, params, x, y, max_coords=4)
    assert [r.passed for r in reports] == [True, False, True]
    assert [r.backend for r in reports] == ["numpy"] * 3


def test_float32_rounding_is_not_a_bug() -> None:
    # divide-then-sum (reference) vs sum-then-divide (batch) in float32 at a large batch
    rng = np.random.default_rng(4)
    w = rng.normal(size=(16, 1)).astype(np.float32)
    x = (rng.normal(size=(512, 16)) * 100).astype(np.float32)
    y = rng.normal(size=(512, 1)).astype(np.float32)

    def grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (x.T @ (x @ w - y)) / np.float32(len(x))

    report = assert_gradequiv_numpy(grad, w, x, y)
    assert report.passed


def _centred_targets() -> tuple:
    rng = np.random.default_rng(0)
    w, x, y = rng.normal(size=(6, 1)), rng.normal(size=(3, 6)), rng.normal(size=(3, 1))

    def grad(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x.T @ (x @ w - (y - y.mean())) / len(x)  # targets centred by the batch mean

    def loss(w: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
        return float(0.5 * np.mean((x @ w - (y - y.mean())) ** 2))

    return grad, loss, w, x, y


def test_loss_fn_tells_coupled_samples_from_a_reweighting() -> None:
    grad, loss, w, x, y = _centred_targets()
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_numpy(grad, w, x, y)
    assert [f.kind for f in info.value.report.findings] == ["weights"]
    with pytest.raises(GradEquivError, match="the loss couples samples") as info:
        assert_gradequiv_numpy(grad, w, x, y, loss_fn=loss)
    assert [f.kind for f in info.value.report.findings] == ["coupled"]
    with pytest.raises(InvalidArgument, match=r"loss_fn returned shape \(3, 1\) for the batch, not a scalar"):
        assert_gradequiv_numpy(grad, w, x, y, loss_fn=lambda w, x, y: x @ w)


# --------------------------------------------------------------------------- the user's arrays


def _snapshot(*arrays: np.ndarray) -> list[np.ndarray]:
    return [a.copy() for a in arrays]


def _unchanged(arrays: Any, saved: Any) -> bool:
    return all(a.tobytes() == s.tobytes() and a.dtype == s.dtype for a, s in zip(arrays, saved))


@pytest.mark.parametrize("fn", [net_grad, summed_grad])
def test_params_and_inputs_unchanged_pass_or_fail(fn: Any) -> None:
    params, x, y = make_net(5, np.float32)
    arrays = [*params.values(), x, y]
    saved = _snapshot(*arrays)
    for check in (
        lambda: assert_gradequiv_numpy(fn, params, x, y, loss_fn=net_loss),
        lambda: assert_grad_numpy(net_loss, fn, params, x, y, max_coords=3),
    ):
        try:
            check()
        except GradEquivError:
            assert fn is summed_grad
        assert _unchanged(arrays, saved)
    assert list(params) == ["W1", "b1", "W2", "b2"]


def test_grad_fn_writing_into_its_params_is_harmless_and_noted() -> None:
    params, x, y = make_net(5)
    saved = _snapshot(*params.values(), x)

    def sgd_inside(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        g = net_grad(p, x, y)
        for k in p:
            p[k] -= 0.1 * g[k]  # the update, inside grad_fn
        x *= 2  # and the inputs scaled in place
        return g

    report = assert_gradequiv_numpy(sgd_inside, params, x, y)
    assert _unchanged([*params.values(), x], saved)
    assert any("grad_fn wrote into the params it was given" in n for n in report.notes)
    assert "params['W1']" in str(report)

    def sgd_summed(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        g = summed_grad(p, x, y)
        p["W1"] -= g["W1"]
        return g

    with pytest.raises(GradEquivError, match="grad_fn wrote into the params it was given"):
        assert_gradequiv_numpy(sgd_summed, params, x, y)
    assert _unchanged([*params.values(), x], saved)


def test_grad_fn_writing_into_the_callers_arrays_is_restored_and_refused() -> None:
    params, x, y = make_net(5)
    saved = _snapshot(*params.values())

    def uses_globals(p: dict, xb: np.ndarray, yb: np.ndarray) -> dict:
        g = net_grad(params, xb, yb)
        params["W2"] -= 0.01 * g["W2"]  # the caller's own array, through the closure
        return g

    with pytest.raises(InvalidArgument, match=r"modified the caller's arrays in place: params\['W2'\]"):
        assert_gradequiv_numpy(uses_globals, params, x, y)
    assert _unchanged(params.values(), saved)


def test_random_draws_in_grad_fn_are_explained_and_the_global_rng_is_restored() -> None:
    params, x, y = make_net(6)

    def with_dropout(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        mask = np.random.rand(*x.shape) > 0.5
        return net_grad(p, x * mask * 2, y)

    np.random.seed(123)
    state = np.random.get_state()
    with pytest.raises(GradEquivError, match="grad_fn draws from NumPy's global random generator"):
        assert_gradequiv_numpy(with_dropout, params, x, y)
    after = np.random.get_state()
    assert after[2] == state[2] and np.array_equal(after[1], state[1])


def test_notes_are_in_the_report_before_it_is_raised() -> None:
    # the notes are the report's own (one renderer, no message patched after raising)
    params, x, y = make_net(6)

    def noisy_summed(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        np.random.rand(1)
        g = summed_grad(p, x, y)
        p["W1"] -= g["W1"]
        return g

    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_numpy(noisy_summed, params, x, y)
    report = info.value.report
    assert str(info.value) == str(report)
    assert [n.split(" ")[1] for n in report.notes] == ["draws", "wrote"]
    assert "grad_fn draws from NumPy's global random generator" in report.notes[0]


def test_random_draws_on_a_passing_check_are_not_blamed() -> None:
    params, x, y = make_net(4)

    def draws(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
        np.random.rand(3)  # drawn, never used
        return net_grad(p, x, y)

    assert assert_gradequiv_numpy(draws, params, x, y).notes == []


# --------------------------------------------------------------------------- bad input


def _ok(p: dict, x: np.ndarray, y: np.ndarray) -> dict:
    return net_grad(p, x, y)


def _bad_call(case: str) -> None:
    params, x, y = make_net(4)
    if case == "missing key":
        assert_gradequiv_numpy(lambda p, x, y: {k: v for k, v in _ok(p, x, y).items() if k != "b2"}, params, x, y)
    elif case == "extra key":
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "W3": np.zeros(1)}, params, x, y)
    elif case == "not a dict":
        assert_gradequiv_numpy(lambda p, x, y: list(_ok(p, x, y).values()), params, x, y)
    elif case == "list length":
        assert_gradequiv_numpy(lambda p, x, y: [p[0] * 0], [params["W1"], params["b1"]], x, y)
    elif case == "shape":
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "W2": _ok(p, x, y)["W2"].T}, params, x, y)
    elif case == "None gradient":
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "b1": None}, params, x, y)
    elif case == "non-finite":
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "b1": np.full(7, np.nan)}, params, x, y)
    elif case == "batch sizes":
        assert_gradequiv_numpy(_ok, params, x, y[:3])
    elif case == "batch of one":
        assert_gradequiv_numpy(_ok, params, x[:1], y[:1])
    elif case == "empty batch":
        assert_gradequiv_numpy(_ok, params, x[:0], y[:0])
    elif case == "list params entry":
        assert_gradequiv_numpy(_ok, {**params, "b2": [0.0, 0.0, 0.0]}, x, y)
    elif case == "int params":
        assert_gradequiv_numpy(_ok, {**params, "b2": np.zeros(3, dtype=int)}, x, y)
    elif case == "params type":
        assert_gradequiv_numpy(_ok, 3.0, x, y)
    elif case == "empty params":
        assert_gradequiv_numpy(_ok, {}, x, y)
    elif case == "inputs type":
        assert_gradequiv_numpy(_ok, params, [[1.0, 2.0]], y)
    elif case == "0-d input":
        assert_gradequiv_numpy(_ok, params, np.array(1.0), y)
    elif case == "grad_fn":
        assert_gradequiv_numpy("grad", params, x, y)  # type: ignore[arg-type]
    elif case == "reduction":
        assert_gradequiv_numpy(_ok, params, x, y, reduction="avg")
    elif case == "broadcast":
        assert_gradequiv_numpy(_ok, params, x, y, broadcast="loud")
    elif case == "weights":
        assert_gradequiv_numpy(_ok, params, x, y, weights=[1.0, 2.0])
    elif case == "single sample":
        assert_gradequiv_numpy(lambda p, x, y: _ok(p, x, y) if len(x) > 1 else 1 / 0, params, x, y)
    elif case == "loss_fn":
        assert_gradequiv_numpy(_ok, params, x, y, loss_fn="mse")  # type: ignore[arg-type]
    else:  # pragma: no cover
        raise LookupError(case)


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("missing key", r"no gradient for params\['b2'\]"),
        ("extra key", r"keys params does not have: 'W3'"),
        ("not a dict", r"params is a dict, so grad_fn must return a dict with the same keys"),
        ("list length", r"returned 1 gradients for 2 parameters"),
        ("shape", r"gradient of params\['W2'\] has shape \(3, 7\) but the parameter has shape \(7, 3\)"),
        ("None gradient", r"None as the gradient of params\['b1'\]"),
        ("non-finite", r"parameter 'b1' has 7 non-finite entries"),
        (
            "batch sizes",
            r"batch sizes disagree: inputs \(shape \(4, 5\)\) has 4 samples but targets \(shape \(3, 3\)\) has 3",
        ),
        ("batch of one", r"batch size 1 .* hides every cross-sample bug"),
        ("empty batch", r"empty batch"),
        ("list params entry", r"params\['b2'\] is a list, not a NumPy array"),
        ("int params", r"params\['b2'\] has dtype int64"),
        ("params type", r"params is a float"),
        ("empty params", r"params is an empty dict"),
        ("inputs type", r"inputs\[0\] is a list, not a NumPy array"),
        ("0-d input", r"inputs is a 0-d array"),
        ("grad_fn", r"grad_fn must be callable"),
        ("reduction", r"Invalid reduction='avg'"),
        ("broadcast", r"Invalid broadcast='loud'"),
        ("weights", r"weights has shape \(2,\): expected one weight per sample, \(4,\)"),
        ("single sample", r"grad_fn failed on sample 0 alone .*ZeroDivisionError"),
        ("loss_fn", r"loss_fn must be callable"),
    ],
)
def test_bad_input_is_a_clear_invalid_argument(case: str, match: str) -> None:
    with pytest.raises(InvalidArgument, match=match):
        _bad_call(case)


def test_bad_input_leaves_arrays_unchanged() -> None:
    params, x, y = make_net(4)
    saved = _snapshot(*params.values(), x, y)
    with pytest.raises(InvalidArgument):
        assert_gradequiv_numpy(lambda p, x, y: {**_ok(p, x, y), "W2": _ok(p, x, y)["W2"].T}, params, x, y)
    assert _unchanged([*params.values(), x, y], saved)


def test_the_numpy_check_never_imports_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from pytest_gradcheck import assert_gradequiv_numpy, assert_grad_numpy\n"
        "w, x, y = np.ones((2, 1)), np.arange(8.0).reshape(4, 2), np.ones((4, 1))\n"
        "g = lambda w, x, y: x.T @ (x @ w - y) / len(x)\n"
        "assert_gradequiv_numpy(g, w, x, y)\n"
        "assert_grad_numpy(lambda w, x, y: float(np.mean((x @ w - y) ** 2) / 2), g, w, x, y)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- as a user runs it


SEED003 = """
import numpy as np
from pytest_gradcheck import assert_gradequiv_numpy


def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def batch_backprop(params, x, t):
    a1 = sigmoid(params["W1"] @ x + params["b1"])
    a2 = sigmoid(params["W2"] @ a1 + params["b2"])
    gb2 = (a2 - t) * (a2 - np.square(a2))
    gb1 = np.tensordot(gb2, params["W2"], axes=((1), (0))).transpose(0, 2, 1) * (a1 - np.square(a1))
    return {
        "W1": np.einsum("ijk,ilm->ijl", gb1, x), "b1": gb1,
        "W2": np.einsum("ijk,ilm->ijl", gb2, a1), "b2": gb2,
    }


def update(params, x, t):
    return {k: np.sum(g, axis=0) for k, g in batch_backprop(params, x, t).items()}


def test_update_step():
    rng = np.random.default_rng(0)
    params = {"W1": rng.normal(size=(6, 8)), "b1": np.zeros((6, 1)),
              "W2": rng.normal(size=(3, 6)), "b2": np.zeros((3, 1))}
    x = rng.normal(size=(16, 8, 1))
    t = np.eye(3)[rng.integers(0, 3, size=16)][:, :, None]
    assert_gradequiv_numpy(update, params, x, t)


def test_update_step_with_the_fixture(gradequiv):
    rng = np.random.default_rng(0)
    params = {"W1": rng.normal(size=(6, 8)), "b1": np.zeros((6, 1)),
              "W2": rng.normal(size=(3, 6)), "b2": np.zeros((3, 1))}
    x = rng.normal(size=(16, 8, 1))
    t = np.eye(3)[rng.integers(0, 3, size=16)][:, :, None]
    gradequiv.numpy(update, params, x, t, reduction="sum")
"""


def test_seed003_as_a_user_runs_it(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_seed003=SEED003)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Gradients are NOT equivalent*",
            "*the batch gradient is the SUM of per-sample gradients, not their mean: 16 times too large*",
            "*np.mean over the batch axis*",
        ]
    )


# --------------------------------------------------------------------------- the package


def test_doctests() -> None:
    from pytest_gradcheck.numpy_backend import check, finite_differences, tracking
    from pytest_gradcheck.report import finite_differences as fd_report

    for module in (check, finite_differences, tracking, fd_report):
        failures, tried = doctest.testmod(module)
        assert tried > 0 and failures == 0, module.__name__


def test_no_private_name_is_imported_from_outside_the_package() -> None:
    # private modules (_options, _tracking) may be imported; private names of other modules may not
    root = pathlib.Path(__file__).resolve().parent.parent / "pytest_gradcheck"
    files = [*(root / "numpy_backend").glob("*.py"), root / "report" / "finite_differences.py"]
    bad = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not (node.level == 1 and path.parent.name == "numpy_backend"):
                bad += [
                    f"{path.name}: {a.name}" for a in node.names if a.name.startswith("_") and a.name != "_tracking"
                ]
    assert bad == []
