"""Test helpers that are not fixtures: tiny model configs, a saved tiny classifier, a headless browser.

Tests import them as `helpers` (``from helpers import save_tiny_classifier``): tests/ has no
__init__.py, so pytest puts it on sys.path when it imports tests/conftest.py (and each test file).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest


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


def bpe_tokenizer(vocab_size: int = 1000):
    """A byte-level BPE tokenizer trained on TREC questions, with BOS/EOS, no pad token and no chat template: what
    base Llama/GPT tokenizers look like to the data code."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from melora_tune.data import TaskSpec, load_task

    texts = load_task(TaskSpec(name="trec", max_train_samples=500)).splits["train"]["text"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")


def save_tiny_llama_with_bpe(path):
    """A random GQA Llama (4 query heads, 2 key/value heads) with ``bpe_tokenizer()``, saved like a Hub model:
    a stand-in for a Llama checkpoint (BOS/EOS, no pad token), since no pretrained decoder ships offline."""
    import torch
    import transformers

    tok = bpe_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


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


# ---- MLflow records of a search, written the way the search and its confirm stage write them -------------------
# (records, not mocks: a real MLflow store, filled with MlflowClient; the names come from melora_tune.records)

def log_search(client, dataset: str, name: str, *, params: dict | None = None, metrics: dict | None = None,
               start_time: int | None = None) -> tuple[str, str]:
    """A search's parent run: returns (experiment id, parent run id)."""
    from melora_tune.records import KIND_TAG, SEARCH_KIND, SEARCH_TAG, STATUS_TAG

    exp = client.get_experiment_by_name(dataset)
    exp_id = exp.experiment_id if exp else client.create_experiment(dataset)
    parent = client.create_run(exp_id, run_name=name, start_time=start_time,
                               tags={KIND_TAG: SEARCH_KIND, SEARCH_TAG: name, STATUS_TAG: "finished"}).info.run_id
    for key, value in {"budget": "512", **(params or {})}.items():
        client.log_param(parent, key, str(value))
    for key, value in (metrics or {}).items():
        client.log_metric(parent, key, float(value))
    client.set_terminated(parent)
    return exp_id, parent


def log_baselines(client, parent: str, scores: dict[str, tuple[float, float]], *, majority_share: float | None = None,
                  score_metric: str | None = None) -> None:
    """The baselines on the parent run: scores {name: (val, test)}, the majority share, the score metric."""
    from melora_tune.records import baseline_metric

    for name, (val, test) in scores.items():
        client.log_metric(parent, baseline_metric(name, "val"), val)
        client.log_metric(parent, baseline_metric(name, "test"), test)
    if majority_share is not None:
        client.log_metric(parent, "majority_share", majority_share)
    if score_metric is not None:
        client.log_param(parent, "score_metric", score_metric)


def _log_hp(client, run: str, hp: dict) -> None:
    for key, value in hp.items():
        if value is not None:
            client.log_param(run, key, str(value))


def log_trial(client, exp_id: str, parent: str, hp: dict, scores: list[float], *, status: str = "completed",
              trial_id: str = "t0", optuna_trial: int = 0, steps_per_epoch: int = 10, start_time: int | None = None) -> str:
    """A search trial: params ``hp`` (method, n, r, lr, adapter_params, ...), ``score`` and ``epoch`` at each
    evaluation (one per epoch, at the global step), ``best_score``."""
    from melora_tune.adapters import describe
    from melora_tune.records import OPTUNA_TAG, PARENT_TAG, STATUS_TAG, TRIAL_TAG

    tags = {PARENT_TAG: parent, TRIAL_TAG: trial_id, OPTUNA_TAG: str(optuna_trial), STATUS_TAG: status}
    run = client.create_run(exp_id, run_name=describe(hp), tags=tags, start_time=start_time).info.run_id
    _log_hp(client, run, hp)
    for epoch, score in enumerate(scores, start=1):
        client.log_metric(run, "score", score, step=epoch * steps_per_epoch)
        client.log_metric(run, "epoch", float(epoch), step=epoch * steps_per_epoch)
    if scores:
        client.log_metric(run, "best_score", max(scores))
    client.set_terminated(run, status="FINISHED" if status in ("completed", "stopped_early") else "FAILED")
    return run


def log_confirmation(client, exp_id: str, parent: str, trial_run: str, hp: dict, *, config: str, seed: int,
                     val: float | None, test: float | None, status: str = "completed", metric: str = "accuracy",
                     trial_id: str = "t0", start_time: int | None = None) -> str:
    """A confirmation run retraining ``trial_run`` on ``seed``: ``score`` per evaluation, ``val_score``,
    ``test_score`` and ``test_<metric>`` (None: the run did not get that far)."""
    from melora_tune.adapters import describe
    from melora_tune.records import (
        CONFIG_TAG, CONFIRM_KIND, CONFIRMS_TAG, CONFIRMS_TRIAL_TAG, KIND_TAG, PARENT_TAG, SEED_TAG, STATUS_TAG,
    )

    tags = {PARENT_TAG: parent, KIND_TAG: CONFIRM_KIND, CONFIRMS_TAG: trial_run, CONFIRMS_TRIAL_TAG: trial_id,
            CONFIG_TAG: config, SEED_TAG: str(seed), STATUS_TAG: status}
    run = client.create_run(exp_id, run_name=f"{describe(hp)} seed={seed}", tags=tags, start_time=start_time).info.run_id
    _log_hp(client, run, {**hp, "training.seed": seed})
    if val is not None:
        client.log_metric(run, "score", val - 0.02, step=10)
        client.log_metric(run, "score", val, step=20)
        client.log_metric(run, "val_score", val)
    if test is not None:
        client.log_metric(run, "test_score", test)
        client.log_metric(run, f"test_{metric}", test)
    client.set_terminated(run, status="FINISHED" if status == "completed" else "FAILED")
    return run


# ---- reading a report back ---------------------------------------------------------------------------------------

def md_section(text: str, title: str) -> str:
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def md_table_rows(section: str) -> list[dict[str, str]]:
    lines = [ln for ln in section.splitlines() if ln.startswith("|")]
    heads = [h.strip() for h in lines[0].strip("|").split("|")]
    return [dict(zip(heads, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def assert_self_contained(page: str) -> int:
    """No external resource: every src is a data: URI, no <link>/<script src>/@import/url(http...)."""
    srcs = re.findall(r"""\bsrc\s*=\s*["']([^"']*)["']""", page, flags=re.I)
    assert all(s.startswith("data:image/png;base64,") for s in srcs), [s[:40] for s in srcs if not s.startswith("data:")]
    assert not re.search(r"<link\b|<script\b|@import|url\(\s*['\"]?https?:", page, flags=re.I)
    assert not re.search(r"""href\s*=\s*["']https?:""", page, flags=re.I)
    return len(srcs)


# ---- a real browser on a local server (the MLflow UI tests) ----------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc) -> None:
    """Until url answers 200 (fails when proc, the server, exits first or the time runs out)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"melora-tune ui exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer within {timeout:.0f} s")


def browser():
    """Headless Debian chromium via chromedriver; fails (does not skip) when they are missing."""
    if os.environ.get("MELORA_NO_BROWSER") == "1":
        pytest.skip("MELORA_NO_BROWSER=1")
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not Path(p).is_file()]
    if missing:
        pytest.fail(f"{', '.join(missing)} missing: install Debian's chromium and chromium-driver (bash .ci/setup does), "
                    "or set MELORA_NO_BROWSER=1 to skip this test")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[test]'")
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1600,1200", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        opts.add_argument(arg)
    return webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))


def stop_ui(proc, log) -> None:
    """Stop a `melora-tune ui` process as a user's Ctrl-C would (SIGTERM: it stops its server, workers included),
    killing it only if it has not exited within 30 s; then close its log."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()



def search_on_local_ray(space, **kwargs):
    """``run_search(space)`` on a private 2-CPU local Ray started here and shut down after: (result, progress
    lines). The real-stack tests' common start; the lines are printed for the test log."""
    import ray

    from melora_tune.search import run_search

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    lines: list[str] = []
    try:
        result = run_search(space, write=lines.append, **kwargs)
    finally:
        ray.shutdown()
    print("\n".join(lines))
    return result, lines
