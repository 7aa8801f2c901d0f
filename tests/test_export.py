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
