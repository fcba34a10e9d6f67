"""Whose broadcast is it? Library code, the user's loss, or a term that pairs no samples (issue 15, class 7).

The broadcast guard watches whole training steps (``assert_gradequiv_step``), so it sees what
libraries do on purpose: transformers builds causal and padding masks and rotary angles by
broadcasting. Those must not be reported as the user's broadcast, nor described as predictions
against targets. A library is simulated here by a module in a ``site-packages`` directory put on
``sys.path``, which is how installed libraries are found.
"""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_gradcheck import GradEquivError, assert_gradequiv, assert_gradequiv_step
from pytest_gradcheck import broadcast as bc
from pytest_gradcheck.broadcast import no_implicit_broadcast, pairs_samples, recording
from pytest_gradcheck.errors import BroadcastError

# A stand-in for transformers.masking_utils and a rotary embedding: deliberate broadcasts.
MASKLIB = '''
"""Mask and position helpers, broadcasting on purpose (like transformers.masking_utils)."""
import torch


def padding_mask(lengths, T):
    positions = torch.arange(T, device=lengths.device)
    return positions.view(1, T) < lengths.view(-1, 1)  # (1, T) vs (B, 1) -> (B, T)


def rotary_angles(T, dim):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))  # (dim / 2,)
    positions = torch.arange(T).float().view(1, T, 1)
    return positions * inv_freq  # (1, T, 1) * (dim / 2,) -> (1, T, dim / 2)


def in_batch_distances(emb):
    return (emb.unsqueeze(1) - emb.unsqueeze(0)).pow(2).sum(-1)  # (B, 1, D) - (1, B, D): on purpose


def call(fn, *args):
    return fn(*args)


def where_am_i():
    from pytest_gradcheck.broadcast import user_frame
    return user_frame()
'''

USER_MODEL = """
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import masklib
from pytest_gradcheck import GradEquivError, assert_gradequiv_step, no_implicit_broadcast
from pytest_gradcheck.errors import BroadcastError


class Tagger(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.out = nn.Linear(d, 1)

    def forward(self, x, lengths):
        B, T, D = x.shape
        mask = masklib.padding_mask(lengths, T).unsqueeze(-1)  # (B, T, 1)
        angles = masklib.rotary_angles(T, D)  # (1, T, D / 2)
        h = torch.tanh(self.inp(x) + torch.cat([angles.sin(), angles.cos()], -1)) * mask
        return self.out(h.sum(1)) / lengths.unsqueeze(-1)  # (B, 1)


def batch():
    torch.manual_seed(0)
    return {"x": torch.randn(4, 6, 8), "lengths": torch.tensor([6, 3, 5, 1]), "y": torch.randn(4)}


def line_of(marker):
    with open(__file__) as f:
        return next(i for i, text in enumerate(f, 1) if text.rstrip().endswith(marker))
"""


@pytest.fixture
def library(pytester: pytest.Pytester) -> pytest.Pytester:
    """A ``site-packages`` directory on ``sys.path`` holding ``masklib``."""
    site = pytester.mkdir("site-packages")
    (site / "masklib.py").write_text(textwrap.dedent(MASKLIB))
    pytester.syspathinsert(site)
    return pytester


def write_user_tests(pytester: pytest.Pytester, body: str) -> None:
    pytester.makepyfile(test_user=USER_MODEL + textwrap.dedent(body))


# --------------------------------------------------------------------------- library code


def test_library_broadcasts_are_not_recorded_in_a_passing_step_check(library: pytest.Pytester) -> None:
    write_user_tests(
        library,
        """
        def test_step():
            def step(model, b):
                return F.mse_loss(model(b["x"], b["lengths"]).squeeze(-1), b["y"])

            report = assert_gradequiv_step(step, Tagger(), batch())
            assert report.passed
            assert report.broadcasts == ()
            assert "broadcast" not in str(report)
        """,
    )
    result = library.runpytest("-p", "no:cacheprovider", "-W", "error::pytest_gradcheck.BroadcastWarning")
    result.assert_outcomes(passed=1)


def test_a_failing_step_check_blames_the_users_line_not_the_library(library: pytest.Pytester) -> None:
    write_user_tests(
        library,
        """
        def test_step():
            def step(model, b):
                out = model(b["x"], b["lengths"])  # (4, 1)
                return (out - b["y"]).pow(2).mean()  # <- seed000

            with pytest.raises(GradEquivError) as info:
                assert_gradequiv_step(step, Tagger(), batch())
            report = info.value.report
            line = line_of("# <- seed000")
            assert [r.location() for r in report.broadcasts] == [f"test_user.py:{line}"]
            (r,) = report.broadcasts
            assert (r.op, r.shapes, r.result) == ("sub", ((4, 1), (4,)), (4, 4))
            assert r.suggestion == "did you mean b['y'].unsqueeze(-1)?"
            text = str(info.value)
            assert f"implicit broadcast in the training step at test_user.py:{line}:" in text
            assert "masklib" not in text
        """,
    )
    result = library.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_standalone_guard_lets_libraries_broadcast_and_points_at_the_user(library: pytest.Pytester) -> None:
    write_user_tests(
        library,
        """
        def test_guard():
            b = batch()
            with no_implicit_broadcast("error") as records:
                out = Tagger()(b["x"], b["lengths"])
            assert records == []
            with pytest.raises(BroadcastError) as info:
                with no_implicit_broadcast("error"):
                    loss = (out - b["y"]).pow(2).mean()  # <- user op
            (r,) = info.value.records
            assert r.location() == f"test_user.py:{line_of('# <- user op')}"

        def test_library_calling_back_into_user_code():
            b = batch()
            out = Tagger()(b["x"], b["lengths"])
            with no_implicit_broadcast("record") as records:
                masklib.call(lambda o, y: (o - y).abs().mean(), out, b["y"])  # <- callback
            assert [r.location() for r in records] == [f"test_user.py:{line_of('# <- callback')}"]

        def test_user_frame_skips_library_frames():
            filename, lineno, code = masklib.where_am_i()  # <- asked from a library
            assert (filename, lineno) == (__file__, line_of("# <- asked from a library"))
        """,
    )
    result = library.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_library_roots_cover_site_packages_and_the_stdlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sysconfig

    roots = bc.library_roots()
    assert any(sysconfig.get_paths()["purelib"].startswith(r.rstrip(os.sep)) for r in roots)
    assert bc.frame_kind(torch.__file__) == bc.MACHINERY  # torch: machinery, like today
    assert bc.frame_kind(bc.__file__) == bc.MACHINERY
    assert bc.frame_kind(os.__file__) == bc.MACHINERY  # the stdlib is transparent
    assert bc.frame_kind(pytest.__file__) == bc.LIBRARY  # installed third-party code
    assert bc.frame_kind(__file__) == bc.USER  # this repository
    assert bc.frame_kind("<frozen importlib._bootstrap>") == bc.MACHINERY
    site = os.path.join(str(tmp_path), "lib", "site-packages")
    os.makedirs(site)
    mod = os.path.join(site, "thing.py")
    assert bc.frame_kind(mod) == bc.USER
    monkeypatch.syspath_prepend(site)
    assert bc.frame_kind(mod) == bc.LIBRARY  # a site-packages directory on sys.path
    monkeypatch.setattr(bc.frames, "extra_library_roots", (str(tmp_path),))
    assert bc.frame_kind(os.path.join(str(tmp_path), "vendored.py")) == bc.LIBRARY


# --------------------------------------------------------------------------- within-sample pairing

WITHIN = """
import inspect

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pytest_gradcheck import GradEquivError, no_implicit_broadcast

P = 5


def point_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, P * 3), nn.Unflatten(1, (P, 3)))


def chamfer(pred, target):  # (B, P, 3) point sets, matched within each sample
    d = (pred.unsqueeze(2) - target.unsqueeze(1)).pow(2).sum(-1)  # (B, P, 1, 3) - (B, 1, P, 3)
    return d.min(2).values.mean() + d.min(1).values.mean()


def seed000_loss(out, labels):
    return (out - labels).pow(2).mean()


def test_chamfer_loss_pairs_points_within_each_sample(gradequiv):
    torch.manual_seed(0)
    report = gradequiv(point_net(), chamfer, torch.randn(8, 6), torch.randn(8, P, 3))
    assert report.passed and report.broadcasts == ()


def test_within_sample_outer_difference_standalone():
    with no_implicit_broadcast("error") as records:
        a, b = torch.randn(8, 5, 1), torch.randn(8, 1, 5)
        _ = a - b  # (B, D, 1) - (B, 1, D)
        _ = torch.randn(8, 4, 4, 1) * torch.randn(8, 4, 1, 4)
    assert records == []


def test_seed000_is_still_caught(gradequiv):
    torch.manual_seed(0)
    with pytest.raises(GradEquivError) as info:
        gradequiv(nn.Linear(2, 1), seed000_loss, torch.rand(4, 2), torch.rand(4))
    line = seed000_loss.__code__.co_firstlineno + 1
    text = str(info.value)
    assert f"implicit broadcast in the loss at test_user.py:{line}:" in text
    assert "sub((4, 1), (4,)) -> (4, 4)" in text
    assert "did you mean labels.unsqueeze(-1)?" in text


def test_seed002_is_still_caught(gradequiv):
    torch.manual_seed(0)
    x = torch.linspace(0, 1, 16).unsqueeze(1)
    y = (-4 * x + 0.05 * torch.randn(16, 1)).unsqueeze(1)  # (16, 1, 1)
    with pytest.raises(GradEquivError) as info:
        gradequiv(nn.Linear(1, 1), F.mse_loss, x, y)  # <- seed002
    line = inspect.currentframe().f_lineno - 1
    text = str(info.value)
    assert f"implicit broadcast in the loss at test_user.py:{line}:" in text
    assert "mse_loss((16, 1), (16, 1, 1)) -> (16, 16, 1)" in text
"""


def test_within_sample_pairwise_terms_are_not_broadcast_bugs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user=WITHIN)
    result = pytester.runpytest(
        "-p", "no:cacheprovider", "--gradequiv-broadcast=error", "-W", "ignore:Using a target size:UserWarning"
    )
    result.assert_outcomes(passed=4)


@pytest.mark.parametrize(
    ("shapes", "result", "batch_size", "pairs"),
    [
        # the seeds: caught whether or not the batch size is known
        ([(4, 1), (4,)], (4, 4), None, True),
        ([(4, 1), (4,)], (4, 4), 4, True),
        ([(8, 1), (8, 1, 1)], (8, 8, 1), None, True),
        ([(8, 1), (8, 1, 1)], (8, 8, 1), 8, True),
        ([(4, 1), (1, 4)], (4, 4), None, True),
        ([(4, 1), (1, 4)], (4, 4), 4, True),  # transposed targets
        ([(6, 1), (6,), (6, 1)], (6, 6), 6, True),
        # within one sample: the batch dims line up
        ([(8, 5, 1), (8, 1, 5)], (8, 5, 5), None, False),
        ([(8, 5, 1), (8, 1, 5)], (8, 5, 5), 8, False),
        ([(8, 8, 1), (8, 1, 8)], (8, 8, 8), 8, False),  # batch aligned on dim 0
        ([(1, 1, 1, 16), (1, 1, 16, 1)], (1, 1, 16, 16), None, False),  # a causal mask
        ([(4, 2, 1), (4, 1, 3), ()], (4, 2, 3), None, False),
        # known batch size: nothing of one sample meets another
        ([(1, 7), (5, 1)], (5, 7), 5, False),  # a length mask
        ([(5, 1), (1, 3)], (5, 3), 5, False),
        ([(1, 16, 1), (4,)], (1, 16, 4), 4, False),  # rotary angles
        ([(8, 5, 1), (1, 1, 5)], (8, 5, 5), 8, False),  # prototypes without a batch
        ([(4, 1), (4,)], (4, 4), 1, False),  # a batch of one pairs nothing
        # unknown batch size: ambiguous, flagged as before
        ([(1, 7), (5, 1)], (5, 7), None, True),
        ([(5, 1), (1, 3)], (5, 3), None, True),
        # not an implicit broadcast at all
        ([(8, 3), (3,)], (8, 3), None, False),
        ([(8, 3), (3,)], (8, 3), 8, False),
    ],
)
def test_pairs_samples_table(shapes: list, result: tuple, batch_size: int | None, pairs: bool) -> None:
    assert pairs_samples(shapes, result, batch_size=batch_size) is pairs


def test_recording_with_a_known_batch_size_keeps_only_pairings() -> None:
    B, T = 5, 7
    out, y, lengths = torch.randn(B, 1), torch.randn(B), torch.randint(1, T, (B,))
    with recording(batch_size=B) as records:
        mask = torch.arange(T)[None, :] < lengths[:, None]  # (1, T) vs (B, 1): a length mask
        weighted = (out - y[:, None]) * torch.ones(1, 3)
        seed = out - y  # (B, 1) - (B,)
    assert mask.shape == (B, T) and weighted.shape == (B, 3) and seed.shape == (B, B)
    assert [(r.op, r.shapes) for r in records] == [("sub", ((B, 1), (B,)))]
    with recording() as ambiguous:
        _ = torch.arange(T)[None, :] < lengths[:, None]
    assert len(ambiguous) == 1  # without the batch size the guard cannot tell: as before
    with no_implicit_broadcast("error", batch_size=B):
        _ = torch.arange(T)[None, :] < lengths[:, None]
    with (
        pytest.raises(BroadcastError, match=r"sub\(\(5, 1\), \(5,\)\) -> \(5, 5\)"),
        no_implicit_broadcast("error", batch_size=B),
    ):
        _ = out - y


def test_a_record_belongs_to_its_own_call_site_even_when_the_code_is_identical(tmp_path: Path) -> None:
    # Records are built once per call site and reused; the same code in two files (only a
    # comment differs) gives equal code objects, which must still be told apart.
    steps = []
    for name in ("first", "second"):
        path = tmp_path / f"{name}_test.py"
        path.write_text(f"def step(out, y):\n    return (out - y).pow(2).mean()  # {name}\n")
        namespace: dict = {}
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        steps.append(namespace["step"])
    assert steps[0].__code__ == steps[1].__code__
    out, y = torch.randn(4, 1), torch.randn(4)
    pred = nn.Linear(1, 1)(out)
    with recording() as records:
        for step in steps * 2:
            step(out, y)
        pairs = steps[0](pred, pred.view(1, 4))  # the same site, between predictions only
    assert pairs.shape == ()
    assert [(os.path.basename(r.filename), r.lineno, r.code) for r in records] == [
        ("first_test.py", 2, "return (out - y).pow(2).mean()  # first"),
        ("second_test.py", 2, "return (out - y).pow(2).mean()  # second"),
        ("first_test.py", 2, "return (out - y).pow(2).mean()  # first"),
        ("second_test.py", 2, "return (out - y).pow(2).mean()  # second"),
        ("first_test.py", 2, "return (out - y).pow(2).mean()  # first"),
    ]
    assert [r.loss_inputs for r in records] == [True, True, True, True, False]
    assert records[0].suggestion == "did you mean y.unsqueeze(-1)?"
    assert records[4].suggestion is not None and "allow_broadcast()" in records[4].suggestion
    assert records[0] == records[2] and records[1] == records[3] and records[0] != records[1]


@pytest.mark.parametrize("bad", [0, -1, 2.5, "4", True])
def test_bad_batch_size_is_invalid_argument(bad: object) -> None:
    from pytest_gradcheck.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="batch_size"):
        no_implicit_broadcast("record", batch_size=bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="batch_size"):
        pairs_samples([(4, 1), (4,)], (4, 4), batch_size=bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- predictions and targets


def test_only_a_broadcast_between_the_loss_inputs_gets_a_reshape_suggestion() -> None:
    torch.manual_seed(0)
    x, labels = torch.randn(4, 2), torch.rand(4)
    out = nn.Linear(2, 1)(x)  # predictions: computed from parameters
    emb = nn.Linear(2, 3)(x)
    target = labels.view(4, 1, 1)
    with no_implicit_broadcast("record") as records:
        _ = (out - labels).pow(2).mean()  # prediction against target
        _ = F.mse_loss(out, target)  # a loss's input and target
        _ = (emb.unsqueeze(1) - emb.unsqueeze(0)).pow(2)  # in-batch pairs of predictions
    seed000, seed002, pairwise = records
    assert seed000.loss_inputs and seed000.suggestion == "did you mean labels.unsqueeze(-1)?"
    assert seed002.loss_inputs and seed002.suggestion == "did you mean target.squeeze(-1)?"
    assert not pairwise.loss_inputs
    assert pairwise.suggestion is not None
    assert "did you mean" not in pairwise.suggestion and "view" not in pairwise.suggestion
    assert "allow_broadcast()" in pairwise.suggestion
    assert pairwise.describe() == "sub((4, 1, 3), (1, 4, 3)) -> (4, 4, 3): both operands were expanded"


def test_a_pairwise_term_of_predictions_is_not_called_predictions_against_targets() -> None:
    torch.manual_seed(0)

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        spread = (out.unsqueeze(1) - out.unsqueeze(0)).pow(2).mean()  # (B, 1, 1) - (1, B, 1)
        return F.mse_loss(out, y) + 0.0 * spread

    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    with pytest.warns(bc.BroadcastWarning) as caught:
        report = assert_gradequiv(model, loss, torch.randn(6, 3), torch.randn(6, 1))
    assert report.passed
    (r,) = report.broadcasts
    assert not r.loss_inputs
    (w,) = [w for w in caught if issubclass(w.category, bc.BroadcastWarning)]
    assert "predictions against targets" not in str(w.message)
    assert "sub((6, 1, 1), (1, 6, 1)) -> (6, 6, 1)" in str(w.message)


def test_in_batch_pairs_in_a_users_step_are_named_without_a_reshape_hint() -> None:
    torch.manual_seed(0)

    def step(model: nn.Module, batch: tuple) -> torch.Tensor:
        emb = model(batch[0])
        d = (emb.unsqueeze(1) - emb.unsqueeze(0)).pow(2).sum(-1)  # (B, 1, D) - (1, B, D): couples samples
        return F.cross_entropy(-d, torch.arange(len(emb)))

    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_step(step, nn.Linear(5, 4), (torch.randn(6, 5),))
    (r,) = info.value.report.broadcasts
    assert not r.loss_inputs
    assert "did you mean" not in str(info.value) and "view_as" not in str(info.value)


# --------------------------------------------------------------------------- real models


def _lm_step(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(input_ids=batch["ids"], attention_mask=batch["mask"], labels=batch["ids"]).loss


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_transformers_masks_and_rotary_embeddings_are_the_librarys(arch: str) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64)
        model = transformers.GPT2LMHeadModel(cfg).eval()
    else:
        cfg = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (4, 16))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 12:] = 0  # padding: the library's padding-mask broadcast runs
    with no_implicit_broadcast("record") as seen:
        _lm_step(model, {"ids": ids, "mask": mask})
    assert seen == []  # the standalone guard leaves the library alone too
    try:
        report = assert_gradequiv_step(_lm_step, model, {"ids": ids, "mask": mask})
    except GradEquivError as exc:  # other causes are other issues' business; not the broadcasts
        report = exc.report
    assert report.broadcasts == ()
    assert "masking_utils" not in str(report) and "modeling_" not in str(report)
    assert "broadcast" not in str(report) or not report.passed


def test_user_module_inside_a_library_model_is_still_watched() -> None:
    """A user module's op is the user's, whoever calls the module."""
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (self.fc(x) - y).pow(2).mean()  # <- user head

    with no_implicit_broadcast("record") as records:
        nn.Sequential(Head())[0](torch.randn(4, 3), torch.randn(4))  # torch frames in between
    (r,) = records
    with open(__file__, encoding="utf-8") as f:
        line = next(i for i, text in enumerate(f, 1) if text.rstrip().endswith("# <- user head"))
    assert (r.filename, r.lineno) == (os.path.abspath(__file__), line)
