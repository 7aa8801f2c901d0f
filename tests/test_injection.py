"""Injection into transformers models, freezing, exact accounting from config alone, save/load."""

from __future__ import annotations

import pytest
import torch

from helpers import tiny_bert_config, tiny_llama_config
from melora_tune.adapters import AdapterConfig, AdapterLinear
from melora_tune.adapters.accounting import ModelSpec, account, adapter_params
from melora_tune.adapters.inject import adapter_layers, inject_adapters, load_adapter, save_adapter
from melora_tune.errors import UsageError

BERT_CFGS = [
    AdapterConfig(method="lora", r=4, target_modules=["query", "value"], modules_to_save=["classifier"]),
    AdapterConfig(method="melora", n=4, r=2, target_modules=["query", "value"], modules_to_save=["classifier"]),
    AdapterConfig(method="melora", n=16, r=1, target_modules=["query", "key", "value", "dense"], modules_to_save=["classifier"]),
    AdapterConfig(method="prolora", r=4, u=1, m=3, m_b=5, target_modules=["query", "value"], modules_to_save=["classifier"]),
]
# GQA: q_proj 64->64, v_proj/k_proj 64->32, up 64->96, down 96->64
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_CFGS = [
    AdapterConfig(method="lora", r=4, target_modules=["q_proj", "v_proj"]),
    AdapterConfig(method="melora", n=8, r=2, target_modules=["q_proj", "v_proj"]),
    AdapterConfig(method="melora", n=32, r=1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]),
    AdapterConfig(method="prolora", r=6, u=2, m=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    # all seven Llama projections, as PRoLoRA's official (QLoRA) setup adapts them
    AdapterConfig(method="prolora", r=4, u=1, m=2, target_modules=LLAMA_ALL),
    AdapterConfig(method="melora", n=32, r=1, target_modules=LLAMA_ALL),
]


def requires_grad_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("cfg", BERT_CFGS, ids=lambda c: f"{c.method}-{c.n}-{c.r}")
def test_bert_counts_from_config_equal_requires_grad_after_injection(tiny_bert, cfg):
    spec = ModelSpec.from_config(tiny_bert_config())  # meta device: no weights
    predicted = account(spec, cfg)
    report = inject_adapters(tiny_bert, cfg)
    adapter = sum(p.numel() for layer in adapter_layers(tiny_bert).values() for p in layer.trainable_parameters().values())
    head = sum(p.numel() for p in tiny_bert.classifier.parameters())
    assert predicted["adapter_params"] == report.adapter_params == adapter
    assert predicted["head_params"] == report.head_params == head == 48 * 3 + 3
    assert requires_grad_count(tiny_bert) == adapter + head
    assert predicted["equivalent_rank"] == cfg.equivalent_rank


@pytest.mark.parametrize("cfg", LLAMA_CFGS, ids=lambda c: f"{c.method}-{c.n}-{c.r}")
def test_gqa_llama_counts_from_config_equal_requires_grad(tiny_llama, cfg):
    spec = ModelSpec.from_config(tiny_llama_config(), task="causal_lm")
    shapes = {s.name.rsplit(".", 1)[-1]: (s.d_in, s.d_out) for s in spec.targets(cfg.target_modules)}
    if "v_proj" in shapes:
        assert shapes["v_proj"] == (64, 32)  # grouped-query attention: not square
    report = inject_adapters(tiny_llama, cfg)
    assert adapter_params(spec.targets(cfg.target_modules), cfg) == report.adapter_params == requires_grad_count(tiny_llama)
    assert report.head_params == 0


def test_llama_melora_rejects_n_that_does_not_divide_kv_projection(tiny_llama):
    cfg = AdapterConfig(method="melora", n=64, r=1, target_modules=["q_proj", "v_proj"])  # 64 | 64 but not | 32
    with pytest.raises(UsageError, match="n=64 must divide both d_in=64 and d_out=32"):
        inject_adapters(tiny_llama, cfg)
    with pytest.raises(UsageError, match="n=64"):
        adapter_params(ModelSpec.from_config(tiny_llama_config(), task="causal_lm").targets(cfg.target_modules), cfg)


def test_injection_replaces_exactly_the_suffix_matches(tiny_bert):
    report = inject_adapters(tiny_bert, AdapterConfig(method="lora", r=2, target_modules=["query", "value"]))
    names = sorted(adapter_layers(tiny_bert))
    assert names == sorted(report.adapted)
    assert names == [f"bert.encoder.layer.{i}.attention.self.{t}" for i in range(2) for t in ("query", "value")]
    assert not isinstance(tiny_bert.bert.encoder.layer[0].attention.self.key, AdapterLinear)


def test_gradients_reach_only_adapter_and_head(tiny_bert):
    cfg = BERT_CFGS[1]
    inject_adapters(tiny_bert, cfg)
    tiny_bert.train()
    ids = torch.randint(0, 120, (4, 9))
    out = tiny_bert(input_ids=ids, labels=torch.tensor([0, 1, 2, 1]))
    out.loss.backward()
    with_grad = {n for n, p in tiny_bert.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    allowed = {n for n, p in tiny_bert.named_parameters() if ("melora_" in n or n.startswith("classifier."))}
    assert with_grad and with_grad <= allowed
    # B starts at zero, so at step 0 only B (and the head) get a non-zero gradient.
    assert any("melora_B" in n for n in with_grad) and "classifier.weight" in with_grad
    assert all(p.grad is None for n, p in tiny_bert.named_parameters() if n not in allowed)
    frozen = [n for n, p in tiny_bert.named_parameters() if n not in allowed and p.requires_grad]
    assert frozen == []


def test_target_that_matches_nothing_lists_the_linear_modules(tiny_bert):
    with pytest.raises(UsageError) as err:
        inject_adapters(tiny_bert, AdapterConfig(method="lora", r=2, target_modules=["q_proj"]))
    msg = str(err.value)
    assert "q_proj" in msg and "query" in msg and "value" in msg and "dense" in msg and "\n" not in msg


def test_a_typo_among_good_targets_is_an_error(tiny_bert):
    with pytest.raises(UsageError, match="valu"):
        inject_adapters(tiny_bert, AdapterConfig(method="lora", r=2, target_modules=["query", "valu"]))


def test_unknown_module_to_save_is_an_error(tiny_bert):
    with pytest.raises(UsageError, match="score"):
        inject_adapters(tiny_bert, AdapterConfig(method="lora", r=2, modules_to_save=["score"]))


@pytest.mark.parametrize("cfg", BERT_CFGS[1:], ids=lambda c: c.method)
def test_save_and_load_round_trip(tiny_bert, tmp_path, cfg):
    from transformers import BertForSequenceClassification

    inject_adapters(tiny_bert, cfg)
    with torch.no_grad():
        for p in tiny_bert.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)
    ids = torch.randint(0, 120, (3, 6))
    expected = tiny_bert(input_ids=ids).logits
    save_adapter(tiny_bert, cfg, tmp_path / "adapter", base_model="tiny")
    files = sorted(f.name for f in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]

    torch.manual_seed(0)
    fresh = BertForSequenceClassification(tiny_bert_config()).eval()  # same seed: same frozen base
    loaded_cfg, report = load_adapter(fresh, tmp_path / "adapter")
    assert loaded_cfg == cfg
    torch.testing.assert_close(fresh(input_ids=ids).logits, expected)


def test_loading_into_a_different_model_fails_clearly(tiny_bert, tmp_path):
    from transformers import BertForSequenceClassification

    cfg = BERT_CFGS[0]
    inject_adapters(tiny_bert, cfg)
    save_adapter(tiny_bert, cfg, tmp_path / "a")
    other = BertForSequenceClassification(tiny_bert_config(num_labels=5))
    with pytest.raises(UsageError, match="classifier.weight has shape"):
        load_adapter(other, tmp_path / "a")


def test_bundled_minilm_accounting_without_loading_weights():
    spec = ModelSpec.from_pretrained("minilm", num_labels=2)
    assert all(p.is_meta for p in spec.model.parameters())
    row = account(spec, AdapterConfig(method="melora", n=8, r=1, target_modules=["query", "value"]))
    # 6 layers x (query, value), each 384 -> 384: r (d_in + d_out) = 768 per layer
    assert row["adapter_params"] == 12 * 768 and row["equivalent_rank"] == 8
    assert 22_000_000 < row["base_params"] < 23_000_000
