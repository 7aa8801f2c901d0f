"""Test helpers that are not fixtures: tiny model configs and a saved tiny classifier.

Tests import them as `helpers` (``from helpers import save_tiny_classifier``): tests/ has no
__init__.py, so pytest puts it on sys.path when it imports tests/conftest.py (and each test file).
"""

from __future__ import annotations


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


def save_tiny_classifier(path, *, head_bias=(0.3, 0.0), max_positions: int = 128):
    """A tiny random BertForSequenceClassification (2 layers, hidden 32) with the bundled MiniLM tokenizer,
    saved to ``path``: what the real-stack search tests train.

    The head's bias starts at ``head_bias``: untrained, it predicts "rotten" (label 0, the minority class of
    rotten_tomatoes, 0.42 accuracy); a learning rate around 1e-2 moves it to the majority class within an
    epoch (0.58), 1e-5 does not, which makes ASHA's first rung deterministic in those tests.
    """
    import torch
    import transformers

    from melora_tune.adapters.models import resolve_model

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=max_positions, num_labels=2,
    )
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.tensor(head_bias))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
