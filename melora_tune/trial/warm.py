"""What a trial process keeps between trials: tokenizers, tokenized splits, the base model's pretrained weights.

Why: with Tune's ``reuse_actors`` the one-worker trials of a search run one after
another in the same process (``melora_tune.trial.inprocess``). Every trial of a
search loads the same tokenizer, reads, splits and tokenizes the same data and
reads the same checkpoint; only the adapter, the head, the learning rate and the
seed change. This module keeps the unchanging part in the process.

Why it is safe (a trial must not see anything of the one before):

* the tokenizer is cached after its pad token is set (the only change a trial
  made to it), so a trial finds it exactly as a fresh load would leave it; the
  trial only reads ``pad_token_id`` from it;
* the loaded task is cached per (task spec, the local files' size and mtime),
  its tokenized splits per (that, tokenizer, max_length, score_test,
  encoding); a search trial's copy has no test split (dropped from a copy, so
  the cached task keeps it for confirmation), and trials only index the
  datasets (``Subset``, samplers) and read the task's fields;
* the model is never cached: each trial builds a fresh model (so fresh
  adapters, head, pooling hook and DeepSpeed engine) from a copy of the cached
  config and a *clone* of the cached pretrained tensors, which the trial's model
  therefore never aliases. Keys the checkpoint lacks (a new classification head)
  are left out of the cache, so transformers initialises them from the trial's
  seed exactly as ``from_pretrained(path)`` does: same tensors, same RNG
  stream afterwards (the isolation test compares with a fresh process).

``MELORA_WARM_CACHE=0`` turns every cache off (each call loads as before).
The weights cache holds one model (a search trains one) as a CPU copy, one more
copy of the base weights in host memory for as long as the process lives; so it
is only filled in a process that says it will run further trials
(``keep_weights()``: a Tune trial process, ``inprocess.tune_in_process``). Ray
Train workers and ``melora-tune train`` run one trial a process and never keep
them; the small caches (tokenizer, data) are kept everywhere.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
from collections import Counter, OrderedDict
from typing import Any

from melora_tune.data import encode_causal_lm, encode_classification, load_task
from melora_tune.data.instruct import encode_instruction

_lock = threading.RLock()  # trials run in Tune's training thread; fills must not interleave
_tokenizers: dict[str, Any] = {}
_tasks: OrderedDict[tuple, Any] = OrderedDict()
_splits: OrderedDict[tuple, tuple[Any, Any]] = OrderedDict()
_weights: OrderedDict[tuple, tuple[type, Any, dict, Any]] = OrderedDict()
MAX_SPLITS = 4  # a search uses one (task, encoding); confirmation adds one with the test split
MAX_WEIGHTS = 1
_counts: Counter = Counter()
_keep_weights = False


def enabled() -> bool:
    return os.environ.get("MELORA_WARM_CACHE", "1") != "0"


def keep_weights(on: bool = True) -> None:
    """Say that this process will run further trials, so the base weights are worth keeping between them."""
    global _keep_weights
    _keep_weights = on


def stats() -> dict[str, int]:
    """Hits and misses per cache (``tokenizer_hit``, ``data_miss``, ``model_hit``, ...): what the tests check."""
    with _lock:
        return dict(_counts)


def clear() -> None:
    """Forget everything cached (and the counts): the next trial loads as a fresh process would."""
    with _lock:
        _tokenizers.clear()
        _tasks.clear()
        _splits.clear()
        _weights.clear()
        _counts.clear()


def _count(kind: str, hit: bool) -> None:
    _counts[f"{kind}_{'hit' if hit else 'miss'}"] += 1


def _cached(store: OrderedDict, kind: str, key, build, limit: int):
    """``store[key]``, built on a miss; the least recently used entries beyond ``limit`` are dropped."""
    with _lock:
        hit = key in store
        _count(kind, hit)
        if hit:
            store.move_to_end(key)
        else:
            store[key] = build()
            while len(store) > limit:
                store.popitem(last=False)
        return store[key]


# ---- tokenizer ---------------------------------------------------------------------------

def _load_tokenizer(path: str):
    import transformers  # heavy: transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def tokenizer(path: str):
    """The tokenizer of ``path`` with a pad token (eos, else unk, when it has none). Shared: read it, never change it."""
    if not enabled():
        return _load_tokenizer(path)
    with _lock:
        hit = path in _tokenizers
        _count("tokenizer", hit)
        if not hit:
            _tokenizers[path] = _load_tokenizer(path)
        return _tokenizers[path]


# ---- data ----------------------------------------------------------------------------------

def _file_stamps(spec) -> tuple:
    """Size and mtime of the task's local files: an edited file between two trials is read again."""
    out = []
    for value in (spec.path, spec.validation_path, spec.name):
        if value and os.path.isfile(value):
            st = os.stat(value)
            out.append((os.path.abspath(value), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _key(spec) -> tuple:
    return spec.model_dump_json(), _file_stamps(spec)


def task(spec):
    """The loaded task (every split, test too) of a ``TaskSpec``. Shared between trials: read it, never change it
    (``task_data`` drops the test split from a copy)."""
    if not enabled():
        return load_task(spec)
    return _cached(_tasks, "task", _key(spec), lambda: load_task(spec), MAX_SPLITS)


def _encode(spec, tok, max_length: int, score_test: bool, causal: bool):
    import datasets  # heavy: datasets

    full = task(spec)
    # a search trial never holds the test split (selection cannot see it); a copy, so the cached task keeps it
    kept = {name: rows for name, rows in full.splits.items() if score_test or name != "test"}
    loaded = dataclasses.replace(full, splits=datasets.DatasetDict(kept))
    if loaded.is_instruction:
        return loaded, encode_instruction(loaded, tok, max_length)  # never padded: padded per batch
    encode = encode_causal_lm if causal else encode_classification
    return loaded, encode(loaded, tok, max_length, pad_to_max_length=False)  # padded per batch


def task_data(spec, tokenizer_path: str, tok, max_length: int, *, score_test: bool, causal: bool):
    """(TaskData, encoded DatasetDict) of a task, tokenized by ``tok`` (the tokenizer of ``tokenizer_path``),
    without the test split unless ``score_test``. Shared between trials: index the datasets, never change them."""
    if not enabled():
        return _encode(spec, tok, max_length, score_test, causal)
    key = (*_key(spec), tokenizer_path, int(max_length), bool(score_test), bool(causal))
    return _cached(_splits, "data", key, lambda: _encode(spec, tok, max_length, score_test, causal), MAX_SPLITS)


# ---- model ---------------------------------------------------------------------------------

def base_model(auto_cls, path: str, *, dtype, **kwargs) -> tuple[Any, bool]:
    """A fresh ``auto_cls.from_pretrained(path, dtype=dtype, **kwargs)`` model and whether the cache served it.

    Call it after seeding: keys missing from the checkpoint (a new head) are
    initialised from the global RNG here, the same way on a hit as on a miss.
    """
    import torch  # heavy: torch

    if not enabled():
        return auto_cls.from_pretrained(path, dtype=dtype, **kwargs), False
    key = (auto_cls.__name__, path, str(dtype), tuple(sorted(kwargs.items())))
    with _lock:
        cached = _weights.get(key)
        _count("model", cached is not None)
        if cached is None:
            model, info = auto_cls.from_pretrained(path, dtype=dtype, output_loading_info=True, **kwargs)
            if not _keep_weights:
                return model, False
            new = set(info.get("missing_keys") or ())  # initialised by this trial's seed: never cached
            with torch.no_grad():
                weights = {k: v.detach().clone() for k, v in model.state_dict().items() if k not in new}
            _weights[key] = (type(model), copy.deepcopy(model.config), weights, copy.deepcopy(getattr(model, "generation_config", None)))
            while len(_weights) > MAX_WEIGHTS:
                _weights.popitem(last=False)
            return model, False
        _weights.move_to_end(key)
        cls, config, weights, generation = cached
    with torch.no_grad():
        state = {k: v.clone() for k, v in weights.items()}  # the trial owns its tensors: it cannot touch the cache
    model = cls.from_pretrained(None, config=copy.deepcopy(config), state_dict=state, dtype=dtype)
    model.config.name_or_path = path  # from_pretrained(None, ...) leaves it empty; what a load from path records
    model.name_or_path = path
    if generation is not None:
        model.generation_config = copy.deepcopy(generation)
    return model, True
