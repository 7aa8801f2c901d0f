"""Warm trial processes: consecutive one-worker trials in one process see nothing of each other. No mocks.

A trial run after others in the same process (caches hot, ``trial.warm``) must give exactly what the
same trial gives in a fresh process: the same final metrics and the same adapter tensors, bit for bit.
Then the real stack: a search (``run_search``: Tune + Optuna + ASHA + MLflow) with ``reuse_actors``
runs its trials in one Tune process, including a trial after one that ASHA stopped, and that trial
still matches the fresh process.

The trials are built from one search space, as the search builds them (``space.base_trial_dict`` +
``search.trainable.trial_config`` + ``prepare_trial``), on a tiny random BERT with the bundled MiniLM
tokenizer and real rotten_tomatoes sentences. Trial A (LoRA, ZeRO-2, the model's own pooler) and
trial B (MELoRA, ZeRO-3, mean pooling: a pooler swapped in and a forward pre-hook) differ in
everything a process could carry over.

A fast test checks the weights cache alone on a checkpoint without a head (the tiny classifier has
one, so there the head is loaded, not drawn from the seed).

Run as a script (``python tests/test_warm_trials.py CONFIG_JSON RUN_DIR``) it trains one trial in a
fresh process and prints the result as JSON: the reference.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Differ between runs of one configuration by nature (clocks, the process).
VOLATILE = {"samples_per_s", "train_time_s", "eval_time_s", "worker_pid", "warm_start", "worker_node_ip"}

A = {"method": "lora", "r": 2, "lr": 1e-2}
# In the search (ASHA, grace 1 epoch, reduction 2, one trial at a time): A reaches 0.58 at epoch 1; STOPPED
# (lr 1e-5) stays at 0.42, the untrained head's minority class, and is stopped; B, after it, reaches 0.58
# at epoch 1 too, so it is not stopped and its final metrics can be compared.
B = {"method": "melora", "n": 2, "r": 1, "lr": 1e-2}
STOPPED = {"method": "lora", "r": 1, "lr": 1e-5}
# The search gives each method's cell its share in turn (lora, melora, lora, melora): C (melora, lr 1e-5, first of
# its cell at the rung, so never stopped) comes before STOPPED, and B after it, where B's 0.58 is above its cell's
# rung cutoff (between C's 0.42 and B's own).
C = {"method": "melora", "n": 2, "r": 2, "lr": 1e-5}


def space_dict(model_dir, tmp_path) -> dict:
    # tiny BERT, query+value: 4 layers of 32x32, 256 adapter params per unit of r (budget 512: every point fits)
    return {
        "name": "warm",
        "model": str(model_dir),
        "pooling": "mean",
        "task": {"name": "rotten_tomatoes", "max_train_samples": 128, "max_eval_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "alpha": 16},
        "budget": {"max_params": 512, "min_fraction": 0.5},
        "methods": ["lora", "melora"],
        "space": {"lr": {"low": 1e-5, "high": 3e-2}, "n": [2], "r": [1, 2]},
        "training": {"epochs": 2, "micro_batch_size": 16, "max_length": 32, "zero_stage": 3},
        "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2},
        "num_samples": 4,
        "max_concurrent_trials": 1,
        "n_startup_trials": 3,
        "points_to_evaluate": [A, STOPPED, C, B],
        "confirm": {"enabled": False},
        # one thread, so a trial computes the same sums wherever it runs
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 0},
        "storage_path": str(tmp_path / "runs"),
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }


def trial_dict(space: dict, sampled: dict, **training) -> dict:
    """The prepared TrialConfig dict of one point of ``space``, built the way a search trial builds it."""
    from melora_tune.search.schema import parse_space
    from melora_tune.search.space import build_space
    from melora_tune.search.trainable import trial_config
    from melora_tune.trial.config import TRIAL_KEY
    from melora_tune.trial import prepare_trial

    parsed = parse_space(space)
    feasible = build_space(parsed)
    base = parsed.base_trial_dict(feasible.target_modules, feasible.modules_to_save)
    cfg = trial_config({TRIAL_KEY: base, **sampled})
    if training:
        from melora_tune.trial import apply_overrides

        cfg = apply_overrides(cfg, training)
    return prepare_trial(cfg).cfg.to_dict()


def run_one(cfg: dict, run_dir: str) -> dict:
    """Train one trial in this process (``inprocess.run_local``, the one-worker path); its final metrics and where
    its adapter went."""
    from melora_tune.trial import TrialConfig, prepare_trial
    from melora_tune.trial.driver import result_from_run
    from melora_tune.trial.inprocess import run_local

    outcome = run_local(prepare_trial(TrialConfig.from_dict(cfg)), run_dir, "trial")
    assert "summary" in outcome, outcome
    result = result_from_run(run_dir, "trial", outcome["summary"])
    assert result.status == "completed", result.reason
    return {"metrics": result.metrics, "adapter": result.adapter_path, "history": result.history}


def adapter_tensors(directory: str) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(directory).glob("*.safetensors"))
    assert files, directory
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(str(f)).items()}


def assert_same_trial(got: dict, ref: dict, what: str) -> None:
    stable = lambda m: {k: v for k, v in m.items() if k not in VOLATILE}  # noqa: E731
    assert stable(got["metrics"]) == stable(ref["metrics"]), what
    assert [stable(h) for h in got["history"]] == [stable(h) for h in ref["history"]], what
    assert_same_adapter(got["adapter"], ref["adapter"], what)


def assert_same_adapter(got: str, ref: str, what: str) -> None:
    import torch

    mine, theirs = adapter_tensors(got), adapter_tensors(ref)
    assert mine.keys() == theirs.keys(), what
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), f"{what}: {key}"


def start_fresh(cfg: dict, run_dir: Path) -> subprocess.Popen:
    """The reference: the trial alone in a new Python process (empty caches)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    run_dir.mkdir(parents=True)
    (run_dir.parent / f"{run_dir.name}.json").write_text(json.dumps(cfg))
    return subprocess.Popen([sys.executable, __file__, str(run_dir.parent / f"{run_dir.name}.json"), str(run_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def finish_fresh(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from helpers import save_tiny_classifier

    return save_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-bert", max_positions=64)


@pytest.fixture(scope="module")
def warm_space(tiny_model, tmp_path_factory):
    return space_dict(tiny_model, tmp_path_factory.mktemp("search"))


@pytest.fixture(scope="module")
def configs(warm_space):
    # A: ZeRO-2 and the model's own pooler; B exactly as the search's third trial runs
    return {"A": trial_dict({**warm_space, "pooling": "model"}, A, zero_stage=2), "B": trial_dict(warm_space, B)}


@pytest.fixture(scope="module")
def fresh(configs, tmp_path_factory):
    """Both references, started at once in their own processes (they run while the tests train)."""
    root = tmp_path_factory.mktemp("fresh")
    procs = {name: start_fresh(cfg, root / name) for name, cfg in configs.items()}
    results: dict = {}

    def get(name: str) -> dict:
        if name not in results:
            results[name] = finish_fresh(procs[name])
        return results[name]

    yield get
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()


# ---- the tests ---------------------------------------------------------------------------------------

def test_cached_weights_give_what_from_pretrained_gives(tmp_path):
    """The weights cache, alone (fast): a checkpoint without a classification head, so the head is new and
    comes from the seed. A model from the cache equals ``from_pretrained(path)`` under the same seed (head
    included, the RNG left in the same state), shares no tensor with the cache, and what a trial does to
    its model does not reach the next one."""
    import torch
    import transformers
    from helpers import tiny_bert_config

    from melora_tune.trial import warm

    torch.manual_seed(0)
    transformers.BertModel(tiny_bert_config()).save_pretrained(tmp_path / "body")  # no classifier in the file
    path, auto = str(tmp_path / "body"), transformers.AutoModelForSequenceClassification

    def reference(seed):
        torch.manual_seed(seed)
        model = auto.from_pretrained(path, dtype=torch.float32, num_labels=3)
        return model, torch.rand(3)

    warm.clear()
    warm.keep_weights()
    try:
        torch.manual_seed(1)
        first, hit1 = warm.base_model(auto, path, dtype=torch.float32, num_labels=3)
        torch.manual_seed(2)
        second, hit2 = warm.base_model(auto, path, dtype=torch.float32, num_labels=3)
        after = torch.rand(3)
        with torch.no_grad():  # a trial changing its model in place ...
            for p in second.parameters():
                p.add_(1.0)
        torch.manual_seed(2)
        third, _ = warm.base_model(auto, path, dtype=torch.float32, num_labels=3)
        [(_, _, cached, _)] = warm._weights.values()
        stats = warm.stats()
    finally:
        warm.keep_weights(False)
        warm.clear()
    assert (hit1, hit2) == (False, True) and stats == {"model_miss": 1, "model_hit": 2}
    assert "classifier.weight" not in cached  # new keys are the trial's, never cached
    ref, ref_after = reference(2)
    assert list(ref.state_dict()) == list(third.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), third.state_dict().values()))  # ... not the next
    assert torch.equal(after, ref_after)  # the same RNG stream after the load
    assert not torch.equal(first.classifier.weight, third.classifier.weight)  # the head follows the seed
    assert third.config.name_or_path == path and not third.training
    cached_ptrs = {t.data_ptr() for t in cached.values()}
    assert not any(t.data_ptr() in cached_ptrs for m in (first, third) for t in m.state_dict().values())


@pytest.mark.slow
def test_consecutive_trials_in_one_process_match_fresh_processes(configs, fresh, tmp_path):
    import gc

    import deepspeed.comm.comm as ds_comm
    import deepspeed.utils.groups as ds_groups
    import torch
    import torch.distributed as dist

    from melora_tune.trial import warm

    warm.clear()
    warm.keep_weights()  # as a Tune trial process does
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    runs, snapshot, live = [], None, []
    try:
        for i, name in enumerate(["A", "B", "A"]):
            t0 = time.time()
            runs.append(run_one(configs[name], str(tmp_path / f"{i}-{name}")))
            print(f"in-process trial {i} ({name}): {time.time() - t0:.1f} s, warm_start {runs[-1]['metrics']['warm_start']}")
            # nothing of the trial's process group or DeepSpeed's handles on it outlives the trial
            assert not dist.is_initialized()
            assert ds_comm.cdb is None and ds_groups._WORLD_GROUP is None and ds_groups._DATA_PARALLEL_GROUP is None
            assert {k: os.environ.get(k) for k in env_before} == env_before
            gc.collect()
            live.append(sum(isinstance(o, torch.Tensor) for o in gc.get_objects()) - len(snapshot or {}))
            if snapshot is None:
                [(_, _, weights, _)] = warm._weights.values()
                snapshot = {k: v.clone() for k, v in weights.items()}
        stats = warm.stats()
        [(_, _, weights, _)] = warm._weights.values()
    finally:
        warm.keep_weights(False)
        warm.clear()

    # the caches were used, so the comparison below is between a cold and a warm path
    assert stats["model_miss"] == 1 and stats["model_hit"] == 2, stats
    assert stats["data_miss"] == 1 and stats["data_hit"] == 2, stats
    assert stats["tokenizer_miss"] == 1 and stats["tokenizer_hit"] == 2, stats
    assert [r["metrics"]["warm_start"] for r in runs] == [0, 1, 1]
    # no trial changed what the cache holds
    assert weights.keys() == snapshot.keys() and all(torch.equal(weights[k], snapshot[k]) for k in weights)
    # nothing of a finished trial stays alive in the process (DeepSpeed's engine.destroy and its ZeRO-3 module-level
    # caches): before, each trial left its model, engine and optimizer (~120 tensors on this model, 140 MB on MiniLM)
    assert live[2] == live[0], f"tensors alive after each trial: {live}"
    # A and B really differ (so a leak would show)
    assert runs[0]["metrics"]["eval_loss"] != runs[1]["metrics"]["eval_loss"]

    ref_a, ref_b = fresh("A"), fresh("B")
    assert ref_a["metrics"]["warm_start"] == 0 and ref_b["metrics"]["warm_start"] == 0
    assert_same_trial(runs[0], ref_a, "A, first in the process")
    assert_same_trial(runs[1], ref_b, "B, after A")
    assert_same_trial(runs[2], ref_a, "A, after A and B")


def _tune_results(exp_dir: Path) -> dict[tuple, list[dict]]:
    """Every report of every trial, from the result.json files Tune wrote, by (method, lr)."""
    trials = {}
    for path in exp_dir.glob("trial_*/result.json"):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        if rows:
            trials[(rows[0]["config"]["method"], rows[0]["config"]["lr"])] = rows
    return trials


@pytest.mark.slow
def test_search_reuses_its_trial_process(warm_space, configs, fresh):
    import ray

    from melora_tune.search import run_search

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        t0 = time.time()
        result = run_search(warm_space, name="warm")
        print(f"search: {time.time() - t0:.1f} s")
    finally:
        ray.shutdown()
    print(result.table())
    assert result.status == "finished" and len(result.trials) == 4

    by_config = _tune_results(Path(result.experiment_path))
    # one trial at a time, the cells in turn, each cell's points in order (Optuna hands out enqueued points first)
    trials = [by_config[(p["method"], p["lr"])] for p in (A, C, STOPPED, B)]
    pids = [rows[-1]["pid"] for rows in trials]
    print("trial pids", pids, "warm", [rows[0]["warm_start"] for rows in trials],
          "scores", [[r["score"] for r in rows] for rows in trials])
    # one Tune trial process ran all four (max_concurrent_trials 1: the next trial waits for it)
    assert len(set(pids)) == 1, pids
    assert [rows[0]["warm_start"] for rows in trials] == [0, 1, 1, 1]
    assert all(rows[-1]["worker_pid"] == rows[-1]["pid"] for rows in trials)  # trained in the Tune process itself
    # each trial started from nothing: its own first step, no restart, its own name and folder
    per_epoch = trials[0][0]["total_steps"] // 2
    for rows in trials:
        assert rows[0]["step"] == per_epoch and rows[0]["restarts"] == 0, rows[0]
    assert len({rows[0]["trial_name"] for rows in trials}) == 4
    # ASHA stopped STOPPED after its first epoch; the next (B) ran in the process that trial left
    assert [len(rows) for rows in trials] == [2, 2, 1, 2]
    assert trials[2][-1]["status"] == "running" and trials[3][-1]["status"] == "completed"
    statuses = sorted(r.status for r in result.trials)
    assert statuses == ["completed", "completed", "completed", "stopped_early"], statuses
    # and B, trained after a stopped trial in a reused process, is exactly B trained in a fresh one
    ref = fresh("B")
    final = {k: v for k, v in trials[3][-1].items() if k in ref["metrics"] and k not in VOLATILE}
    assert final == {k: v for k, v in ref["metrics"].items() if k in final}
    assert set(final) >= {"eval_loss", "score", "train_loss", "eval_accuracy"}
    # its kept checkpoint (the best-scoring report) holds the same history and, if final, the same adapter
    from melora_tune.trial import checkpoint as ckpt_io

    adapter = Path(next(r for r in result.trials if r.method == "melora" and r.lr == B["lr"]).checkpoint)  # <ckpt>/adapter
    assert adapter.is_relative_to(Path(result.experiment_path))
    state = ckpt_io.read_state(adapter.parent)
    stable = lambda m: {k: v for k, v in m.items() if k not in VOLATILE}  # noqa: E731
    assert [stable(h) for h in state["history"]] == [stable(h) for h in ref["history"][: len(state["history"])]]
    if state["step"] == state["total_steps"]:
        assert_same_adapter(str(adapter), ref["adapter"], "B in the search's reused process")


if __name__ == "__main__":  # the fresh-process reference (see start_fresh)
    from melora_tune.trial import warm

    warm.keep_weights()
    config = json.loads(Path(sys.argv[1]).read_text())
    print(json.dumps(run_one(config, sys.argv[2]), default=str))
