"""Shared test fixtures: tiny random models (BERT and a grouped-query-attention Llama)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_bert_config(num_labels: int = 3):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, num_labels=num_labels,
    )


def tiny_llama_config():
    """GQA: 4 query heads share 2 key/value heads, so k_proj/v_proj map 64 -> 32 (not square)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )


@pytest.fixture
def tiny_bert():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config()).eval()


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def saved_tiny_bert(tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    path = tmp_path / "tiny-bert"
    BertForSequenceClassification(tiny_bert_config()).save_pretrained(path)
    return path


@pytest.fixture
def saved_tiny_llama(tmp_path):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path / "tiny-llama"
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(path)
    return path
