"""transformers + peft: LoRA adapters on a frozen GPT-2 / BERT base, in train mode.

Dropout (GPT-2's and LoRA's modules, and the probability sdpa attention applies
functionally) is neutralised for the check; the token-level weighting of a
causal LM with padded labels is named when it is not declared; the frozen base,
every parameter and every mode are left as found, and the next optimizer step
is bit-identical to the one without the check.
"""

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

from pytest_gradcheck import GradEquivError, assert_gradequiv_step

pytestmark = [
    # the tiny vocabulary does not hold GPT-2's default bos/eos ids: transformers says so
    pytest.mark.filterwarnings("ignore::UserWarning:transformers.*"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
]


def _train_lora_b(model):
    """A fresh LoRA adapter has B = 0, so A's gradient is exactly zero: give B values, as after training."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)


def make_gpt2(attn_implementation, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=100, n_positions=64, attn_implementation=attn_implementation
    )
    base = GPT2LMHeadModel(config)  # default config: every dropout at 0.1
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["c_attn"], lora_dropout=0.1, fan_in_fan_out=True))
    _train_lora_b(model)
    return model.train()


def make_bert(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, num_labels=3
    )
    base = BertForSequenceClassification(config)
    model = get_peft_model(
        base, LoraConfig(r=4, target_modules=["query", "value"], lora_dropout=0.1, task_type="SEQ_CLS")
    )
    _train_lora_b(model)
    return model.train()


def lm_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (4, 12), generator=g)
    labels = ids.clone()
    labels[1, 7:] = -100  # padded rows: different numbers of real tokens per sample
    labels[2, 10:] = -100
    labels[3, 3:] = -100
    return {"ids": ids, "labels": labels}


def cls_batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (4, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    return {"ids": ids, "mask": mask, "y": torch.randint(0, 3, (4,), generator=g)}


def lm_step(m, b):
    return m(input_ids=b["ids"], labels=b["labels"]).loss


def cls_step(m, b):
    return m(input_ids=b["ids"], attention_mask=b["mask"], labels=b["y"]).loss


def token_weights(b):
    return (b["labels"][:, 1:] != -100).sum()


def snapshot(model):
    return {
        "params": {n: (p, p.detach().clone(), p.requires_grad, p.grad) for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def assert_as_found(model, before):
    after = snapshot(model)
    assert after["params"].keys() == before["params"].keys()
    for name, (p, value, requires_grad, grad) in before["params"].items():
        p_now, value_now, requires_grad_now, grad_now = after["params"][name]
        assert p_now is p, name
        assert torch.equal(value_now, value), name
        assert requires_grad_now == requires_grad, name
        assert grad_now is grad, name
    assert after["modes"] == before["modes"]
    frozen = [n for n, (_, _, rg, _) in before["params"].items() if not rg]
    assert frozen and all("lora_" not in n for n in frozen)  # the base really is frozen


def optimizer_step(model, step_fn, batch):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    opt.zero_grad()
    step_fn(model, batch).backward()  # train mode: dropout draws from the global RNG
    opt.step()


def assert_same_next_step(make, check, step_fn, batch):
    """The optimizer step after ``check(model)`` equals the same step on a twin that was never checked."""
    model, twin = make(), make()
    torch.manual_seed(5)
    check(model)
    optimizer_step(model, step_fn, batch)
    torch.manual_seed(5)
    optimizer_step(twin, step_fn, batch)
    twin_params = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, twin_params[name]), name


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_gpt2_lora_token_weighted_loss(attn_implementation):
    model = make_gpt2(attn_implementation)
    batch = lm_batch()
    before = snapshot(model)

    report = assert_gradequiv_step(lm_step, model, batch, weights=token_weights)

    assert report.passed
    assert report.weighted
    assert any("lora_dropout" in name for name in report.dropout_disabled)
    assert any(name.endswith("attn.attn_dropout") for name in report.dropout_disabled)
    if attn_implementation == "sdpa":
        assert any("scaled_dot_product_attention" in name for name in report.dropout_disabled)
    assert_as_found(model, before)

    assert_same_next_step(
        lambda: make_gpt2(attn_implementation),
        lambda m: assert_gradequiv_step(lm_step, m, batch, weights=token_weights),
        lm_step,
        batch,
    )


def test_gpt2_lora_undeclared_token_weighting_is_named():
    model = make_gpt2("sdpa")
    batch = lm_batch()
    before = snapshot(model)

    with pytest.raises(GradEquivError) as info:
        assert_gradequiv_step(lm_step, model, batch)

    text = str(info.value)
    assert "labels[:, 1:] != -100" in text
    assert "11, 6, 9, 2" in text  # the real tokens each sample's loss counts after the shift
    assert info.value.report.passed is False
    assert_as_found(model, before)

    def failing_check(m):
        with pytest.raises(GradEquivError):
            assert_gradequiv_step(lm_step, m, batch)

    assert_same_next_step(lambda: make_gpt2("sdpa"), failing_check, lm_step, batch)


def test_bert_lora_sequence_classification():
    model = make_bert()
    batch = cls_batch()
    before = snapshot(model)
    problem_type = model.config.problem_type  # transformers sets it on the first forward with labels

    report = assert_gradequiv_step(cls_step, model, batch)

    assert report.passed
    assert any("lora_dropout" in name for name in report.dropout_disabled)
    assert model.config.problem_type == problem_type
    assert_as_found(model, before)

    assert_same_next_step(make_bert, lambda m: assert_gradequiv_step(cls_step, m, batch), cls_step, batch)
