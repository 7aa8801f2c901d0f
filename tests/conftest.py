"""Shared test fixtures: tiny random models (BERT and a grouped-query-attention Llama). Helper functions
that are not fixtures live in tests/helpers.py."""

from __future__ import annotations

import os

import pytest
import ray  # noqa: F401  (see below)
import torch

from helpers import tiny_bert_config, tiny_llama_config

# `import ray` binds Ray's log handler to the sys.stderr of that moment and keeps writing to it. Imported here,
# that is pytest's session-wide capture; first imported inside a test using capfd/capsys, it would be that
# test's capture file, closed after it, and every later Ray warning would print "--- Logging error ---" with a
# traceback into the next test's output (seen in CI: a one-line-error assertion failed on it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """The bundled all-MiniLM-L6-v2 tokenizer (WordPiece, [CLS]/[SEP])."""
    import transformers

    from melora_tune.adapters.models import resolve_model

    return transformers.AutoTokenizer.from_pretrained(resolve_model("minilm"))


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """A tiny byte-level BPE tokenizer with BOS/EOS and no pad token, like Llama/GPT ones."""
    from helpers import bpe_tokenizer

    return bpe_tokenizer()
