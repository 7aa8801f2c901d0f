"""Lossless export to a standard PEFT LoRA adapter, loaded back by PEFT alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from melora_tune.adapters import AdapterConfig
from melora_tune.adapters.export import export_peft_lora
from melora_tune.adapters.inject import inject_adapters

BERT = [
    AdapterConfig(method="lora", r=4, modules_to_save=["classifier"]),
    AdapterConfig(method="melora", n=4, r=2, alpha=8, modules_to_save=["classifier"]),
    AdapterConfig(method="prolora", r=4, u=1, m=5, m_b=3, alpha=8, modules_to_save=["classifier"]),
]
LLAMA = [
    AdapterConfig(method="melora", n=8, r=2, target_modules=["q_proj", "v_proj"]),
    AdapterConfig(method="prolora", r=6, u=2, m=3, target_modules=["q_proj", "v_proj", "down_proj"]),
]


def train_like(model):
    """Give adapter and head tensors non-trivial values, as training would."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


@pytest.mark.parametrize("cfg", BERT, ids=lambda c: c.method)
def test_bert_export_reproduces_logits_with_peft(saved_tiny_bert, tmp_path, cfg):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    ours = BertForSequenceClassification.from_pretrained(saved_tiny_bert).eval()
    inject_adapters(ours, cfg)
    train_like(ours)
    ids = torch.randint(0, 120, (3, 11))
    expected = ours(input_ids=ids).logits
    base_only = BertForSequenceClassification.from_pretrained(saved_tiny_bert).eval()(input_ids=ids).logits
    assert (expected - base_only).abs().max() > 1e-2  # the adapter really changes the model

    out = export_peft_lora(ours, cfg, tmp_path / "peft", base_model_name_or_path=str(saved_tiny_bert))
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["r"] == cfg.equivalent_rank and meta["lora_alpha"] == cfg.equivalent_rank
    assert (out / "adapter_model.safetensors").is_file()

    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(saved_tiny_bert), out).eval()
    assert (peft_model(input_ids=ids).logits - expected).abs().max() < 1e-5


@pytest.mark.parametrize("cfg", LLAMA, ids=lambda c: c.method)
def test_gqa_llama_export_reproduces_logits_with_peft(saved_tiny_llama, tmp_path, cfg):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    ours = LlamaForCausalLM.from_pretrained(saved_tiny_llama).eval()
    inject_adapters(ours, cfg)
    train_like(ours)
    ids = torch.randint(0, 120, (2, 9))
    expected = ours(input_ids=ids).logits
    out = export_peft_lora(ours, cfg, tmp_path / "peft", str(saved_tiny_llama), task_type="causal_lm")
    peft_model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(saved_tiny_llama), out).eval()
    assert (peft_model(input_ids=ids).logits - expected).abs().max() < 1e-5


def test_export_loads_in_a_process_without_melora_tune(saved_tiny_bert, tmp_path):
    """The whole point of the export: plain transformers + peft, no custom code."""
    from transformers import BertForSequenceClassification

    cfg = BERT[1]
    ours = BertForSequenceClassification.from_pretrained(saved_tiny_bert).eval()
    inject_adapters(ours, cfg)
    train_like(ours)
    ids = torch.randint(0, 120, (2, 7))
    expected = ours(input_ids=ids).logits
    export_peft_lora(ours, cfg, tmp_path / "peft", str(saved_tiny_bert))
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        from transformers import AutoModelForSequenceClassification
        from peft import PeftModel
        assert not any(m.startswith("melora_tune") for m in sys.modules)
        base = AutoModelForSequenceClassification.from_pretrained({str(saved_tiny_bert)!r})
        model = PeftModel.from_pretrained(base, {str(tmp_path / 'peft')!r}).eval()
        ids = torch.load({str(tmp_path / 'ids.pt')!r})
        torch.save(model(input_ids=ids).logits, {str(tmp_path / 'logits.pt')!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path, capture_output=True)
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() < 1e-5


def test_export_records_the_base_model_it_is_given(saved_tiny_bert, tmp_path):
    """PEFT's get_peft_model overwrites base_model_name_or_path with the skeleton's config.name_or_path: the
    caller's name must win (and without one, the model's own name_or_path, not null)."""
    from transformers import BertForSequenceClassification

    cfg = BERT[0]
    ours = BertForSequenceClassification.from_pretrained(saved_tiny_bert).eval()
    inject_adapters(ours, cfg)
    out = export_peft_lora(ours, cfg, tmp_path / "named", base_model_name_or_path="org/the-base-model")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/the-base-model"
    out = export_peft_lora(ours, cfg, tmp_path / "unnamed")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(saved_tiny_bert)


def test_export_base_model_load_report_is_silenced_but_errors_are_not(tmp_path, capfd):
    """The export rebuilds the base model under a fresh head: transformers' load report about the new head
    ("classifier.weight | MISSING ... Consider training on your downstream task") is noise there."""
    from types import SimpleNamespace

    from transformers import BertConfig, BertForSequenceClassification, BertModel
    from transformers.utils import logging as hf_logging

    from melora_tune.adapters.inject import save_adapter
    from melora_tune.errors import UsageError
    from melora_tune.adapters.peft_folder import load_base_model, quiet_transformers, write_peft

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    base = tmp_path / "base"
    BertModel(config).save_pretrained(base)  # no classifier: the export's base model loads with a new head
    trained = BertForSequenceClassification(config)
    cfg = AdapterConfig(method="melora", n=2, r=2, modules_to_save=["classifier"])
    inject_adapters(trained, cfg)
    train_like(trained)
    save_adapter(trained, cfg, tmp_path / "adapter", num_labels=2)
    capfd.readouterr()
    before = hf_logging.get_verbosity()
    path = write_peft(SimpleNamespace(model=str(base), task_type="seq_cls"), tmp_path / "adapter", tmp_path / "peft")
    out, err = capfd.readouterr()
    assert path == str(base) and (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert "MISSING" not in out + err and "LOAD REPORT" not in out + err and "downstream task" not in out + err, err
    assert hf_logging.get_verbosity() == before  # only for the export's own load
    with quiet_transformers(), pytest.raises(UsageError, match="cannot load the base model"):
        load_base_model(SimpleNamespace(model=str(tmp_path / "nowhere"), task_type="seq_cls"), 2)
