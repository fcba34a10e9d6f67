"""Scale: the comparison on the gradients' own device, bounded memory, the ``chunk_size`` option.

The comparison reads torch gradients as autograd returns them (no flat or float64
copies, float64 accumulation in chunks); the parameters are not copied for the
check (only one the model writes into, just before the write); ``chunk_size=n``
runs the per-sample reference n samples at a time. Each is tested as users meet
it: through the checks and the plugin (``pytester``), on CPU, and on CUDA when a
GPU is present.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_gradcheck import GradEquivError, InvalidArgument, assert_gradequiv, assert_gradequiv_step
from pytest_gradcheck.compare import Pair, reductions_for

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))


def sum_mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, y, reduction="sum")


# --------------------------------------------------------------------------- the torch reductions


def test_torch_reductions_match_numpy_across_chunks() -> None:
    """A parameter larger than a chunk is reduced chunk by chunk, the chunks summed in float64:
    its figures are those of NumPy in float64 to float32's resolution of each chunk."""
    from pytest_gradcheck._torch.reductions import TorchReductions

    torch.manual_seed(0)
    b = {"big": torch.randn(1000, 70), "small": torch.randn(5), "empty": torch.zeros(0, 3)}
    r = {n: t * 0.5 + 1e-3 * torch.randn_like(t) for n, t in b.items()}
    ops = TorchReductions(chunk=4096)  # "big" is 17+ chunks
    names = list(b)
    db, dr = ops.prepare([b[n] for n in names], names), ops.prepare([r[n] for n in names], names)
    joint = ops.joint(db, dr, (1.0, 2.0))
    for i, n in enumerate(names):
        x, y = b[n].double().numpy().ravel(), r[n].double().numpy().ravel()
        assert joint.sq_b[i] == pytest.approx(float(x @ x), rel=1e-7, abs=0)
        assert joint.dot[i] == pytest.approx(float(x @ y), rel=1e-7, abs=0)
        for k in (1.0, 2.0):
            want = float(np.abs(x - k * y).max()) if x.size else 0.0
            assert joint.diff[k][i] == pytest.approx(want, rel=1e-6, abs=0)
        assert ops.amax(db)[i] == (float(np.abs(x).max()) if x.size else 0.0)
    over = (b["big"].double() - 2 * r["big"].double()).abs() > 1e-3
    assert ops.count_over(db, dr, 0, 2.0, 1e-3) == int(over.sum())


def test_a_float32_dot_product_over_millions_of_entries_is_summed_in_float64_across_chunks() -> None:
    # the reason the reductions run in chunks: one torch.dot in float32 over 8 M entries of the
    # same sign is off in the 5th digit; chunked, summed in float64, it is exact to 1e-8
    torch.manual_seed(0)
    g = {"w": torch.rand(8_000_000) + 3.0}
    exact = float(g["w"].double().pow(2).sum())
    whole = float(torch.dot(g["w"], g["w"]))
    pair = Pair(g, {"w": g["w"].clone()})
    assert abs(pair.dot["w"] - exact) <= 1e-8 * exact < abs(whole - exact)
    assert pair.compare(1.0, 1e-4, 0.0, "mean", "float32").params[0].cosine == 1.0


def test_nan_and_inf_gradients_are_found_by_the_torch_reductions() -> None:
    g = {"w": torch.tensor([1.0, float("nan"), 2.0]), "v": torch.tensor([float("inf"), 1.0])}
    pair = Pair(g, {"w": torch.ones(3), "v": torch.ones(2)})
    assert not pair.b.finite("w") and not pair.b.finite("v")
    assert pair.b.non_finite("w") == 1 and pair.b.non_finite("v") == 1
    cmp = pair.compare(1.0, 1e-4, 0.0, "mean", "float32")
    assert [p.passed for p in cmp.params] == [False, False]


def test_torch_gradients_use_torch_and_numpy_arrays_stay_in_numpy() -> None:
    t = reductions_for([torch.ones(2)])
    n = reductions_for([np.ones(2)])
    assert type(t).__name__ == "TorchReductions" and type(n).__name__ == "NumpyReductions"
    assert reductions_for([torch.ones(2), np.ones(2)]) is n  # mixed (a diagnosis): on the host


def test_a_passing_check_copies_no_gradient_to_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the passing path the gradients never become NumPy arrays: no host copy (on a GPU)."""
    calls = []
    original = torch.Tensor.numpy

    def counting(self: torch.Tensor, *args: object, **kwargs: object) -> np.ndarray:
        calls.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "numpy", counting)
    model = mlp()
    assert_gradequiv(model, F.mse_loss, torch.randn(8, 4), torch.randn(8, 3))
    n_params = sum(p.numel() for p in model.parameters())
    assert all(math.prod(s) < n_params // 4 for s in calls), calls  # at most the per-sample weights, never a gradient


# --------------------------------------------------------------------------- state without copies


def test_parameters_are_not_copied_for_a_model_that_does_not_write_them(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_gradcheck._torch import state

    copied = []
    original = state._Slot.keep

    def keep(self: state._Slot) -> None:
        copied.append(self)
        original(self)

    monkeypatch.setattr(state._Slot, "keep", keep)
    model = mlp()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    grad = model[0].weight.grad
    assert_gradequiv(model, F.mse_loss, torch.randn(8, 4), torch.randn(8, 3))
    assert copied == []
    assert model[0].weight.grad is grad and torch.equal(grad, torch.ones_like(grad))  # set aside, untouched


class WritesInPlace(nn.Module):
    """Scales its weight in place under no_grad on every forward: a version-counted write."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.fc.weight.mul_(0.5)
        return self.fc(x)


@pytest.mark.parametrize("loss", [F.mse_loss, sum_mse], ids=["pass", "fail"])
def test_a_parameter_written_in_place_in_forward_is_put_back(loss) -> None:
    model = WritesInPlace()
    before = model.fc.weight.detach().clone()
    x, y = torch.randn(6, 4), torch.randn(6, 1)
    try:
        assert_gradequiv(model, loss, x, y)
    except GradEquivError:
        pass
    assert torch.equal(model.fc.weight, before)


def test_a_parameter_written_only_after_the_first_run_is_refused_in_words() -> None:
    calls = []  # outside the model: the check does not put it back between runs

    class LateWriter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            if len(calls) == 2:  # the second run: the first sample of the per-sample reference
                with torch.no_grad():
                    self.fc.weight.add_(1.0)
            return self.fc(x)

    model = LateWriter()
    with pytest.raises(
        Exception, match=r"wrote into its parameters \(model\.fc\.weight\) during a run after the first"
    ):
        assert_gradequiv(model, F.mse_loss, torch.randn(6, 4), torch.randn(6, 1), reference="loop")


# --------------------------------------------------------------------------- chunk_size


FORWARD_CALLS: list[int] = []  # not reachable from the model: the check puts the model's own state back


class CountsCalls(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        FORWARD_CALLS.append(1)
        return self.net(x)


@pytest.mark.parametrize("chunk, calls", [(None, 2), (4, 4), (3, 5), (10, 2), (64, 2)])
def test_chunk_size_runs_the_reference_in_chunks_and_says_so(chunk: int | None, calls: int) -> None:
    FORWARD_CALLS.clear()
    report = assert_gradequiv(CountsCalls(), F.mse_loss, torch.randn(10, 4), torch.randn(10, 3), chunk_size=chunk)
    # one batch run, then one vmap call per chunk (a chunk as large as the batch is no chunking)
    assert len(FORWARD_CALLS) == calls
    assert report.chunk_size == (chunk if chunk is not None and chunk < 10 else None)
    context = str(report).splitlines()[2]
    assert (f"in chunks of {chunk} samples (chunk_size={chunk})" in context) == (report.chunk_size is not None)


def test_chunked_reference_catches_the_same_bugs_and_weights() -> None:
    x, y = torch.randn(10, 4), torch.randn(10, 3)
    w = torch.arange(1.0, 11.0)
    for chunk in (1, 3, 7):
        with pytest.raises(GradEquivError) as info:
            assert_gradequiv(mlp(), sum_mse, x, y, chunk_size=chunk)
        assert info.value.report.would_match == "sum"

        def weighted(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            per = F.mse_loss(out, t, reduction="none").mean(1)
            return (per * w[: len(per)]).sum() / w[: len(per)].sum()

        assert_gradequiv(mlp(), weighted, x, y, weights=w, chunk_size=chunk)


def test_chunk_size_in_the_step_form_and_the_loop_reference() -> None:
    model = mlp()
    batch = {"x": torch.randn(9, 4), "y": torch.randn(9, 3)}
    report = assert_gradequiv_step(lambda m, b: F.mse_loss(m(b["x"]), b["y"]), model, batch, chunk_size=2)
    assert report.chunk_size == 2
    report = assert_gradequiv(model, F.mse_loss, batch["x"], batch["y"], reference="loop", chunk_size=4)
    assert report.reference_method == "loop" and report.chunk_size == 4


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "four"])
def test_a_bad_chunk_size_is_refused(bad: object) -> None:
    with pytest.raises(InvalidArgument, match=r"Invalid chunk_size=.* expected an int >= 1 \(samples per chunk\)"):
        assert_gradequiv(mlp(), F.mse_loss, torch.randn(6, 4), torch.randn(6, 3), chunk_size=bad)


USER_TESTS = """
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from pytest_gradcheck import assert_gradequiv

def run():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return assert_gradequiv(model, F.mse_loss, torch.randn(10, 4), torch.randn(10, 2))

def test_session():
    assert run().chunk_size == {session}

@pytest.mark.gradequiv(chunk_size=4)
def test_marker(gradequiv):
    report = gradequiv(nn.Linear(4, 2), F.mse_loss, torch.randn(10, 4), torch.randn(10, 2))
    assert report.chunk_size == 4 and run().chunk_size == 4

def test_sum_bug_still_caught():
    torch.manual_seed(0)
    assert_gradequiv(nn.Linear(4, 2), lambda o, t: F.mse_loss(o, t, reduction="sum"),
                     torch.randn(10, 4), torch.randn(10, 2))
"""


@pytest.mark.parametrize("flags, session", [([], 3), (["--gradequiv-chunk-size=5"], 5)], ids=["ini", "command-line"])
def test_chunk_size_from_marker_command_line_and_ini(pytester: pytest.Pytester, flags: list[str], session: int) -> None:
    pytester.makeini("[pytest]\ngradequiv_chunk_size = 3\n")
    pytester.makepyfile(test_user=USER_TESTS.format(session=session))
    json_path = pytester.path / "checks.json"
    result = pytester.runpytest(*flags, f"--gradequiv-json={json_path}", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(
        [f"*reference: each sample run alone, via torch.func.vmap, in chunks of {session} samples*"]
    )
    records = json.loads(json_path.read_text())["checks"]
    assert sorted(r["chunk_size"] for r in records) == sorted([session, 4, 4, session])


def test_a_bad_chunk_size_on_the_command_line_fails_at_startup(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    result = pytester.runpytest("--gradequiv-chunk-size=0", "-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*Invalid gradequiv_chunk_size='0' from --gradequiv-chunk-size*"])


# --------------------------------------------------------------------------- CUDA (skipped without a GPU)


@CUDA
def test_cuda_check_passes_and_fails_on_the_device_without_host_copies(monkeypatch: pytest.MonkeyPatch) -> None:
    device = torch.device("cuda")
    model = mlp().to(device)
    x, y = torch.randn(16, 4, device=device), torch.randn(16, 3, device=device)
    copies = []
    original = torch.Tensor.cpu

    def counting(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        copies.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "cpu", counting)
    report = assert_gradequiv(model, F.mse_loss, x, y)
    assert report.device.startswith("cuda") and copies == []
    monkeypatch.undo()
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(model, sum_mse, x, y)
    assert info.value.report.would_match == "sum" and info.value.report.float64 is not None


@CUDA
def test_cuda_reductions_match_the_cpu_ones() -> None:
    torch.manual_seed(0)
    b = {"w": torch.randn(3000, 500), "v": torch.randn(7)}
    r = {n: t + 1e-4 * torch.randn_like(t) for n, t in b.items()}
    cpu = Pair(b, r, ks=(1.0, 0.5))
    gpu = Pair({n: t.cuda() for n, t in b.items()}, {n: t.cuda() for n, t in r.items()}, ks=(1.0, 0.5))
    for n in b:
        assert gpu.dot[n] == pytest.approx(cpu.dot[n], rel=1e-12)
        assert gpu.max_diff(0.5)[n] == pytest.approx(cpu.max_diff(0.5)[n], rel=1e-12)
        assert gpu.b.amax[n] == cpu.b.amax[n]


# --------------------------------------------------------------------------- the float64 re-check and memory


def test_a_recheck_that_would_not_fit_in_memory_is_skipped_and_said(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_gradcheck._torch import problem

    monkeypatch.setattr(problem, "_free_bytes", lambda device: 1000)  # 1 kB free: nothing fits
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(mlp(), sum_mse, torch.randn(8, 4), torch.randn(8, 3))
    report = info.value.report
    assert report.float64 is None
    assert report.float64_error.startswith("not enough memory: it needs float64 copies of the parameters")
    assert "float64 re-check could not run: not enough memory" in str(info.value)
    assert report.would_match == "sum"  # the diagnosis still runs, in the working dtype


def test_an_out_of_memory_error_in_the_recheck_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_gradcheck._torch.problem import TorchProblem

    real = TorchProblem.batch_gradient

    def short_of_memory(self: TorchProblem, float64: bool) -> dict[str, torch.Tensor]:
        if float64:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1099511627776 bytes.")
        return real(self, float64)

    monkeypatch.setattr(TorchProblem, "batch_gradient", short_of_memory)
    with pytest.raises(GradEquivError) as info:
        assert_gradequiv(mlp(), sum_mse, torch.randn(8, 4), torch.randn(8, 3))
    assert info.value.report.float64_error.startswith("not enough memory (it holds float64 copies")
