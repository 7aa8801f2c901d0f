"""Bad input over every CLI entry point: one line on stderr naming the problem (and the fix), exit status 2, no
traceback, and nothing left behind (no new file in the working folder or next to the inputs, no MLflow run).

The table runs in-process (``melora_tune.cli.main`` under ``capfd``, so anything a library prints to the real
stderr counts too); a few rows go through the installed entry point to prove it. Everything is local and offline:
tiny config-only model folders, small data files and spaces made here, an MLflow SQLite store with one logged
search. No row may reach Ray: a tripwire on the three places that start it fails the row instead of training.
"""

from __future__ import annotations

import copy
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import tiny_bert_config
from melora_tune.cli import main

DATASET = "rotten_tomatoes"


# ---- inputs -----------------------------------------------------------------------------------------

def _rows(make) -> str:
    return "".join(make(i) for i in range(40))


BASE_SPACE = {
    "name": "t",
    "task": {"name": DATASET, "max_train_samples": 64},
    "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    "budget": {"max_params": 768, "min_fraction": 0.5},
    "methods": ["melora", "lora"],
    "space": {"lr": {"low": 1e-4, "high": 1e-2}, "n": [2, 4, 8], "r": [1, 2, 4]},
    "training": {"epochs": 2},
    "num_samples": 4,
}

# name -> (dotted key, value); None deletes the key. Paths: "{A}" is the assets folder.
SPACES = {
    "unknown_key": ("budgets", {"max_params": 1}),
    "bad_type": ("num_samples", "many"),
    "bad_range": ("budget.min_fraction", 1.5),
    "no_budget": ("budget", None),
    "nothing_fits": ("budget.max_params", 10),
    "bad_method": ("methods", ["dorra"]),
    "bad_target": ("adapter.target_modules", ["q_proj"]),
    "bad_head": ("adapter.modules_to_save", ["nothing"]),
    "alpha": ("adapter.alpha", -1),
    "lr_order": ("space.lr", {"low": 1e-2, "high": 1e-4}),
    "grace": ("asha.grace_period", 5),
    "point": ("points_to_evaluate", [{"method": "lora", "r": 64, "lr": 1e-3}]),
    "gpus": ("resources.gpus_per_worker", -1),
    "name": ("name", "a/b"),
    "unknown_task": ("task", {"name": "nonexistent_task"}),
    "empty_text": ("task", {"name": "local", "path": "{A}/empty_text.csv"}),
    "one_class": ("task", {"name": "local", "path": "{A}/one_class.csv"}),
    "missing_data": ("task", {"name": "local", "path": "{A}/missing.csv"}),
    "storage_proc": ("storage_path", "/proc/x"),
    "storage_ftp": ("storage_path", "ftp://host/x"),
    "tracking_foo": ("tracking_uri", "foo://bar"),
    "tracking_word": ("tracking_uri", "notauri"),
    "tracking_file": ("tracking_uri", "file:///tmp/mlruns"),
    "optuna_foo": ("optuna_storage", "foo://bar"),
    "optuna_proc": ("optuna_storage", "sqlite:////proc/x/optuna.db"),
    "optuna_dir": ("optuna_storage", "{A}"),
    "gpu_memory_zero": ("resources", {"gpus_per_worker": 1, "gpu_memory_gb": 0}),
    "gpu_too_small": ("resources", {"gpus_per_worker": 1, "gpu_memory_gb": 0.5}),
    "offload_params_zero2": ("training", {"epochs": 2, "offload_params": True}),
    "instruct_metric": ("task", {"name": "trec_instruct", "metric": "f1"}),
    "bad_sampler": ("sampler", "tpee"),
    "bad_scheduler": ("scheduler", "pbt"),
    "latin1": ("task", {"name": "local", "path": "{A}/latin1.csv"}),
    "bad_encoding": ("task", {"name": "local", "path": "{A}/good.csv", "encoding": "nope"}),
    "levels_empty": ("budget", {"levels": []}),
    "levels_unsorted": ("budget", {"levels": [768, 384]}),
    "levels_twice": ("budget", {"levels": [384, 384, 768]}),
    "levels_and_max": ("budget", {"levels": [384, 768], "max_params": 768}),
    "tpc_zero": ("trials_per_cell", 0),
    "share_odd": ("num_samples", 3),
    "tpc_disagrees": ("trials_per_cell", 3),
    "warm_missing": ("warm_start", ["nosuch"]),
    "ray_timeout_zero": ("ray_start_timeout_s", 0),
    "ray_timeout_word": ("ray_start_timeout_s", "soon"),
}


def mutate(data: dict, key: str, value, root: Path) -> dict:
    data = copy.deepcopy(data)
    *parents, last = key.split(".")
    cur = data
    for part in parents:
        cur = cur.setdefault(part, {})
    if value is None:
        cur.pop(last, None)
    else:
        cur[last] = yaml.safe_load(yaml.safe_dump(value).replace("{A}", str(root)))
    return data


def fake_search(uri: str) -> tuple[str, str]:
    """One search logged the way melora_tune.search.tracking logs it (no training, no adapter artifact)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp_id = client.create_experiment(DATASET)
    parent = client.create_run(exp_id, run_name="s1", tags={"melora.kind": "search", "melora.search": "s1",
                                                            "melora.status": "finished"}).info.run_id
    client.log_param(parent, "budget", "512")
    tags = {"mlflow.parentRunId": parent, "melora.trial_id": "s1-0", "melora.optuna_trial": "0",
            "melora.status": "completed", "melora.search": "s1"}
    child = client.create_run(exp_id, run_name="lora r=2 lr=1.0e-02", tags=tags).info.run_id
    for key, value in {"method": "lora", "r": 2, "lr": 0.01, "alpha": 16, "dropout": 0, "equivalent_rank": 2,
                       "adapter_params": 512}.items():
        client.log_param(child, key, str(value))
    client.log_metric(child, "score", 0.7, step=2)
    client.log_metric(child, "best_score", 0.7)
    client.log_metric(child, "epoch", 2)
    client.set_terminated(child)
    client.set_terminated(parent)
    return parent, child


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("assets")
    tiny_bert_config(num_labels=2).save_pretrained(root / "model")  # 48 wide, 2 layers: 384 params per unit of r
    (root / "good.csv").write_text("text,label\n" + _rows(lambda i: f"sentence number {i},{i % 2}\n"))
    (root / "empty_text.csv").write_text("text,label\n" + _rows(lambda i: f",{i % 2}\n"))
    (root / "blank_text.csv").write_text("text,label\n" + _rows(lambda i: f"   ,{i % 2}\n"))
    (root / "one_class.csv").write_text("text,label\n" + _rows(lambda i: f"s {i},1\n"))  # ids say 2 classes, rows hold 1
    (root / "one_name.csv").write_text("text,label\n" + _rows(lambda i: f"s {i},pos\n"))
    (root / "no_label.csv").write_text("text,target\n" + _rows(lambda i: f"s {i},{i % 2}\n"))
    (root / "neg_label.csv").write_text("text,label\n" + _rows(lambda i: f"s {i},{-(i % 2)}\n"))
    (root / "nan_label.csv").write_text("text,label\n" + _rows(lambda i: f"s {i},{'' if i == 3 else i % 2}\n"))
    (root / "latin1.csv").write_bytes(("text,label\n" + _rows(lambda i: f"caf\u00e9 {i},{i % 2}\n")).encode("latin-1"))
    (root / "header_only.csv").write_text("text,label\n")
    (root / "two_rows.csv").write_text("text,label\na,0\nb,1\n")
    (root / "bad.jsonl").write_text('{"text": "a", "label": 0}\n{not json\n')
    (root / "data.xyz").write_text("x")
    (root / "bad.yaml").write_text("name: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    base = {**BASE_SPACE, "model": str(root / "model")}
    (root / "space.yaml").write_text(yaml.safe_dump(base))
    for name, (key, value) in SPACES.items():
        (root / f"sp_{name}.yaml").write_text(yaml.safe_dump(mutate(base, key, value, root)))
    trial = {"model": str(root / "model"), "task": {"name": "local", "path": str(root / "good.csv")},
             "adapter": {"method": "lora", "r": 2}, "training": {"epochs": 1, "micro_batch_size": 8}}
    (root / "trial.yaml").write_text(yaml.safe_dump(trial))

    # an interrupted search of space "t" (Ray's snapshot is there) and one whose record is damaged
    for name, record in (("old", '{"space": {"name": "t", "budget": {"max_params": 1}}}'), ("damaged", "{not json")):
        (root / "runs" / name).mkdir(parents=True)
        (root / "runs" / name / "melora_search.json").write_text(record)
        (root / "runs" / name / "experiment_state-2026-01-01.json").write_text("{}")

    # a local file where a folder is expected, an occupied export folder
    (root / "keep").mkdir()
    (root / "keep" / "mine.txt").write_text("mine")
    uri = f"sqlite:///{root}/mlflow.db"
    parent, child = fake_search(uri)
    return {"A": str(root), "URI": uri, "PARENT": parent, "CHILD": child}


@pytest.fixture
def tripwire(monkeypatch):
    """A row that gets past every check would start Ray and train: fail it instead."""
    import melora_tune.trial.driver as driver
    import melora_tune.trial.ray_env as ray_env

    def reached(*args, **kwargs):
        raise AssertionError("this bad input got past every check and reached Ray")

    monkeypatch.setattr(driver, "run_trial", reached)
    monkeypatch.setattr(ray_env, "start_ray", reached)


# (row id, argv with {A}/{URI}/{PARENT}/{CHILD} placeholders, text the one line must contain)
ROWS = [
    # ---- budget
    ("budget-no-r", "budget --model {A}/model --method lora", "give --r"),
    ("budget-bad-method", "budget --model {A}/model --method dorra --r 2", "unknown adapter method 'dorra'"),
    ("budget-r0", "budget --model {A}/model --method lora --r 0", "r must be >= 1"),
    ("budget-r-too-big", "budget --model {A}/model --method lora --r 200", "exceeds min(d_in, d_out)"),
    ("budget-r-not-int", "budget --model {A}/model --method lora --r abc", "invalid int value: 'abc'"),
    ("budget-unknown-flag", "budget --model {A}/model --method lora --r 2 --dropout 2", "unrecognized arguments: --dropout"),
    ("budget-bad-target", "budget --model {A}/model --method lora --r 2 --targets nothing", "matches no linear layer"),
    ("budget-empty-targets", "budget --model {A}/model --method lora --r 2 --targets ''", "target_modules is empty"),
    ("budget-bad-head", "budget --model {A}/model --method lora --r 2 --modules-to-save nothing", "matches no module"),
    ("budget-melora-n", "budget --model {A}/model --method melora --n 5 --r 1", "must divide both"),
    ("budget-stray-n", "budget --model {A}/model --method lora --r 2 --n 2", "--n does not apply to method lora"),
    ("budget-prolora-u", "budget --model {A}/model --method prolora --r 4 --u 5", "unshared ranks u must be in [0, r]: u=5 must be <= r=4"),
    ("budget-prolora-m", "budget --model {A}/model --method prolora --r 4 --m 0", "sharing rate m must be >= 1"),
    ("budget-task-type", "budget --model {A}/model --method lora --r 2 --task-type bogus", "invalid choice: 'bogus'"),
    ("budget-two-methods", "budget --model {A}/model --method all --r 2", "without --budget give one --method"),
    ("budget-choices-need-budget", "budget --model {A}/model --method lora --r-choices 1", "--r-choices needs --budget"),
    ("budget-bad-choices", "budget --model {A}/model --method lora --budget 500 --r-choices 1,x", "comma-separated integers"),
    ("budget-zero", "budget --model {A}/model --method lora --budget 0", "budget must be a positive number"),
    ("budget-nothing-fits", "budget --model {A}/model --method lora --budget 10", "the smallest lora configuration needs 384"),
    ("budget-fraction-range", "budget --model {A}/model --method lora --budget 1000 --min-fraction 1.5", "min_fraction must be in [0, 1]"),
    ("budget-fraction-nan", "budget --model {A}/model --method lora --budget 1000 --min-fraction nan", "min_fraction must be in [0, 1]"),
    ("budget-num-labels-0", "budget --model {A}/model --method lora --r 2 --num-labels 0", "--num-labels must be >= 1"),
    ("budget-num-labels-neg", "budget --model {A}/model --method lora --budget 1000 --num-labels -4", "--num-labels must be >= 1"),
    ("budget-alpha-neg", "budget --model {A}/model --method lora --r 2 --alpha -1", "alpha must be a positive finite number"),
    ("budget-alpha-nan", "budget --model {A}/model --method lora --budget 1000 --alpha nan", "alpha must be a positive finite number"),
    ("budget-alpha-inf", "budget --model {A}/model --method lora --r 2 --alpha inf", "alpha must be a positive finite number"),
    ("budget-missing-model", "budget --model {A}/nowhere --method lora --r 2", "does not exist"),
    # ---- train (each fails in prepare_trial or the start checks, before Ray)
    ("train-missing-config", "train {A}/nowhere.yaml", "does not exist"),
    ("train-bad-yaml", "train {A}/bad.yaml", "is not valid YAML"),
    ("train-yaml-list", "train {A}/list.yaml", "expected a mapping of sections"),
    ("train-set-unknown-key", "train {A}/trial.yaml --set rank=2", "unknown setting 'rank'"),
    ("train-set-no-value", "train {A}/trial.yaml --set lr", "--set expects key=value"),
    ("train-set-bad-type", "train {A}/trial.yaml --set lr=abc", "training.lr: Input should be a valid number"),
    ("train-set-bad-range", "train {A}/trial.yaml --set lr=-1", "training.lr: Input should be greater than 0"),
    ("train-set-bad-method", "train {A}/trial.yaml --set method=dorra", "adapter.method"),
    ("train-set-alpha-nan", "train {A}/trial.yaml --set adapter.alpha=nan", "adapter.alpha"),
    ("train-set-zero-stage", "train {A}/trial.yaml --set zero_stage=5", "training.zero_stage"),
    ("train-offload-without-zero", "train {A}/trial.yaml --set offload_optimizer=true zero_stage=0", "offload_optimizer needs ZeRO"),
    ("train-offload-params-zero2", "train {A}/trial.yaml --set offload_params=true zero_stage=2", "offload_params needs ZeRO-3"),
    ("train-gpu-memory-zero", "train {A}/trial.yaml --set gpu_memory_gb=0", "resources.gpu_memory_gb: Input should be greater than 0"),
    ("train-gpu-memory-negative", "train {A}/trial.yaml --set gpu_memory_gb=-24", "resources.gpu_memory_gb: Input should be greater than 0"),
    ("train-gpu-too-small", "train {A}/trial.yaml --set use_gpu=true gpu_memory_gb=0.5", "the GPUs have 0.50 GiB, and no change tried fits"),
    ("train-bad-target", "train {A}/trial.yaml --set adapter.target_modules=nothing", "matches no linear layer"),
    ("train-nf4-on-cpu", "train {A}/trial.yaml --set quantization=nf4", "training.quantization nf4 needs GPU workers"),
    ("train-nf4-zero3", "train {A}/trial.yaml --set quantization=nf4 use_gpu=true zero_stage=3",
     "nf4 cannot be partitioned by ZeRO-3"),
    ("train-instruct-seq-cls", "train {A}/trial.yaml --set task.path=null task.name=trec_instruct",
     "is instruction data: set task_type: causal_lm"),
    ("train-instruct-metric", "train {A}/trial.yaml --set task_type=causal_lm task.path=null task.name=trec_instruct task.metric=accuracy",
     "is instruction data: metric 'accuracy' does not apply; choose one of exact_match, loss"),
    ("train-instruct-template", "train {A}/trial.yaml --set task.prompt_template=Q:{{question}}",
     "task.prompt_template: prompt_template must be a string with an {instruction} placeholder"),
    ("train-instruct-new-tokens", "train {A}/trial.yaml --set task.max_new_tokens=0", "max_new_tokens must be an integer in 1..4096"),
    ("train-chat-without-template", "train {A}/trial.yaml --set task_type=causal_lm task.path=null task.name=trec_instruct task.prompt_format=chat",
     "has no chat template"),
    ("train-missing-model", "train {A}/trial.yaml --set model={A}/nowhere", "does not exist"),
    ("train-unknown-task", "train {A}/trial.yaml --set task.name=nonexistent_task task.path=null", "unknown task 'nonexistent_task'"),
    ("train-empty-text", "train {A}/trial.yaml --set task.path={A}/empty_text.csv", "text column 'text' is empty on every row"),
    ("train-blank-text", "train {A}/trial.yaml --set task.path={A}/blank_text.csv", "text column 'text' is empty on every row"),
    ("train-one-class-ids", "train {A}/trial.yaml --set task.path={A}/one_class.csv", "has the same class ('1')"),
    ("train-one-class-names", "train {A}/trial.yaml --set task.path={A}/one_name.csv", "holds a single class ('pos')"),
    ("train-no-label-column", "train {A}/trial.yaml --set task.path={A}/no_label.csv", "no column 'label'"),
    ("train-negative-labels", "train {A}/trial.yaml --set task.path={A}/neg_label.csv", "must be >= 0"),
    ("train-missing-labels", "train {A}/trial.yaml --set task.path={A}/nan_label.csv", "1 rows have no value in label column"),
    ("train-no-rows", "train {A}/trial.yaml --set task.path={A}/header_only.csv", "holds no rows"),
    ("train-not-utf8", "train {A}/trial.yaml --set task.path={A}/latin1.csv", "no task.encoding): 'utf-8' codec can't decode byte 0xe9"),
    ("train-wrong-encoding", "train {A}/trial.yaml --set task.path={A}/latin1.csv task.encoding=ascii", "as task.encoding 'ascii'"),
    ("train-unknown-encoding", "train {A}/trial.yaml --set task.encoding=nope", "task.encoding: unknown text encoding 'nope'"),
    ("train-too-few-rows", "train {A}/trial.yaml --set task.path={A}/two_rows.csv", "too few to split"),
    ("train-bad-jsonl", "train {A}/trial.yaml --set task.path={A}/bad.jsonl", "cannot read"),
    ("train-file-type", "train {A}/trial.yaml --set task.path={A}/data.xyz", "unsupported file type '.xyz'"),
    ("train-missing-data", "train {A}/trial.yaml --set task.path={A}/missing.csv", "data file not found"),
    ("train-bad-text-column", "train {A}/trial.yaml --set task.text_columns=nope", "no column 'nope'"),
    ("train-bad-glue-task", "train {A}/trial.yaml --set task.glue_task=bogus", "unknown GLUE task 'bogus'"),
    ("train-storage-proc", "train {A}/trial.yaml --storage-path /proc/x", "storage path /proc/x is not writable"),
    ("train-storage-under-file", "train {A}/trial.yaml --storage-path {A}/good.csv/runs", "is not a folder"),
    ("train-ray-address-dead", "train {A}/trial.yaml --ray-address 127.0.0.1:1", "nothing answers there"),
    ("train-ray-address-garbage", "train {A}/trial.yaml --ray-address nonsense", "is not HOST:PORT"),
    ("train-num-cpus-0", "train {A}/trial.yaml --num-cpus 0", "--num-cpus 0"),
    ("train-name-escapes", "train {A}/trial.yaml --name ../evil", "--name '../evil'"),
    # ---- search --dry-run: the space, and every start check
    ("dry-missing-space", "search {A}/nowhere.yaml --dry-run", "does not exist"),
    ("dry-bad-yaml", "search {A}/bad.yaml --dry-run", "is not valid YAML"),
    ("dry-yaml-list", "search {A}/list.yaml --dry-run", "expected a mapping of keys"),
    ("dry-unknown-key", "search {A}/sp_unknown_key.yaml --dry-run", "unknown key 'budgets' (did you mean 'budget'?)"),
    ("dry-wrong-type", "search {A}/sp_bad_type.yaml --dry-run", "num_samples: Input should be a valid integer"),
    ("dry-bad-range", "search {A}/sp_bad_range.yaml --dry-run", "budget.min_fraction"),
    ("dry-no-budget", "search {A}/sp_no_budget.yaml --dry-run", "budget"),
    ("dry-nothing-fits", "search {A}/sp_nothing_fits.yaml --dry-run", "fits no melora configuration"),
    ("dry-bad-method", "search {A}/sp_bad_method.yaml --dry-run", "unknown method 'dorra'"),
    ("dry-bad-target", "search {A}/sp_bad_target.yaml --dry-run", "q_proj matches no linear layer"),
    ("dry-bad-head", "search {A}/sp_bad_head.yaml --dry-run", "modules_to_save entry 'nothing'"),
    ("dry-alpha", "search {A}/sp_alpha.yaml --dry-run", "adapter.alpha"),
    ("dry-lr-order", "search {A}/sp_lr_order.yaml --dry-run", "is greater than high"),
    ("dry-grace", "search {A}/sp_grace.yaml --dry-run", "exceeds training.epochs"),
    ("dry-infeasible-point", "search {A}/sp_point.yaml --dry-run", "points_to_evaluate[0]: lora r=64 is not feasible"),
    ("dry-negative-gpus", "search {A}/sp_gpus.yaml --dry-run", "resources.gpus_per_worker"),
    ("dry-bad-name", "search {A}/sp_name.yaml --dry-run", "name must be letters, digits"),
    ("dry-unknown-task", "search {A}/sp_unknown_task.yaml --dry-run", "unknown task 'nonexistent_task'"),
    ("dry-empty-text", "search {A}/sp_empty_text.yaml --dry-run", "is empty on every row"),
    ("dry-one-class", "search {A}/sp_one_class.yaml --dry-run", "has the same class"),
    ("dry-not-utf8", "search {A}/sp_latin1.yaml --dry-run", "set task.encoding to the file's encoding"),
    ("dry-unknown-encoding", "search {A}/sp_bad_encoding.yaml --dry-run", "task.encoding: unknown text encoding 'nope'"),
    ("search-not-utf8", "search {A}/sp_latin1.yaml", "set task.encoding to the file's encoding"),
    ("dry-ray-timeout-zero", "search {A}/sp_ray_timeout_zero.yaml --dry-run", "ray_start_timeout_s: Input should be greater than 0"),
    ("search-ray-timeout-word", "search {A}/sp_ray_timeout_word.yaml", "ray_start_timeout_s: Input should be a valid number"),
    ("dry-missing-data", "search {A}/sp_missing_data.yaml --dry-run", "data file not found"),
    # ---- cells: budget levels and equal shares
    ("dry-levels-empty", "search {A}/sp_levels_empty.yaml --dry-run", "budget.levels: empty: give at least one level"),
    ("dry-levels-unsorted", "search {A}/sp_levels_unsorted.yaml --dry-run", "must be ascending, got [768, 384]: write [384, 768]"),
    ("dry-levels-twice", "search {A}/sp_levels_twice.yaml --dry-run", "budget level 384 is given twice"),
    ("dry-levels-and-max", "search {A}/sp_levels_and_max.yaml --dry-run", "give budget.max_params or budget.levels, not both"),
    ("dry-tpc-zero", "search {A}/sp_tpc_zero.yaml --dry-run", "trials_per_cell: Input should be greater than or equal to 1"),
    ("dry-share-odd", "search {A}/sp_share_odd.yaml --dry-run", "num_samples=3 does not split evenly over the 2 cells"),
    ("search-share-odd", "search {A}/sp_share_odd.yaml", "give num_samples a multiple of 2"),
    ("dry-share-cli", "search {A}/space.yaml --dry-run --num-samples 5", "num_samples=5 does not split evenly"),
    ("dry-tpc-disagrees", "search {A}/sp_tpc_disagrees.yaml --dry-run", "num_samples=4 and trials_per_cell=3 disagree"),
    ("dry-warm-missing", "search {A}/sp_warm_missing.yaml --dry-run", "warm_start: no search 'nosuch' under"),
    ("search-warm-missing", "search {A}/sp_warm_missing.yaml", "give an earlier search's name"),
    ("dry-num-samples", "search {A}/space.yaml --dry-run --num-samples 0", "--num-samples must be >= 1"),
    ("dry-storage-proc", "search {A}/space.yaml --dry-run --storage-path /proc/x", "storage path /proc/x is not writable"),
    ("dry-storage-proc-in-space", "search {A}/sp_storage_proc.yaml --dry-run", "storage path /proc/x is not writable"),
    ("dry-storage-is-file", "search {A}/space.yaml --dry-run --storage-path {A}/good.csv", "is not a folder"),
    ("dry-storage-scheme", "search {A}/sp_storage_ftp.yaml --dry-run", "cannot open ftp:// storage"),
    ("dry-tracking-scheme", "search {A}/space.yaml --dry-run --tracking-uri foo://bar", "no tracking store for foo://"),
    ("dry-tracking-scheme-in-space", "search {A}/sp_tracking_foo.yaml --dry-run", "no tracking store for foo://"),
    ("dry-tracking-no-scheme", "search {A}/space.yaml --dry-run --tracking-uri notauri", "tracking URI 'notauri'"),
    ("dry-tracking-no-scheme-in-space", "search {A}/sp_tracking_word.yaml --dry-run", "tracking URI 'notauri'"),
    ("dry-tracking-file-store", "search {A}/sp_tracking_file.yaml --dry-run", "file store"),
    ("dry-tracking-db-folder", "search {A}/space.yaml --dry-run --tracking-uri sqlite:///{A}", "names a folder"),
    ("dry-tracking-db-unwritable", "search {A}/space.yaml --dry-run --tracking-uri sqlite:////proc/x/mlflow.db", "is not writable"),
    ("dry-tracking-server-down", "search {A}/space.yaml --dry-run --tracking-uri http://127.0.0.1:9", "does not answer"),
    ("dry-optuna-backend", "search {A}/sp_optuna_foo.yaml --dry-run", "unknown database backend 'foo'"),
    ("dry-optuna-unwritable", "search {A}/sp_optuna_proc.yaml --dry-run", "Optuna database folder /proc/x is not writable"),
    ("dry-optuna-folder", "search {A}/sp_optuna_dir.yaml --dry-run", "is a folder"),
    ("dry-gpu-memory-zero", "search {A}/sp_gpu_memory_zero.yaml --dry-run", "resources.gpu_memory_gb: Input should be greater than 0"),
    ("dry-gpu-too-small", "search {A}/sp_gpu_too_small.yaml --dry-run", "the GPUs have 0.50 GiB, and no change tried fits"),
    ("dry-offload-params-zero2", "search {A}/sp_offload_params_zero2.yaml --dry-run", "offload_params needs ZeRO-3"),
    ("dry-instruct-metric", "search {A}/sp_instruct_metric.yaml --dry-run", "metric 'f1' does not apply"),
    ("dry-bad-sampler", "search {A}/sp_bad_sampler.yaml --dry-run",
     "sampler: unknown sampler 'tpee' (did you mean 'tpe'?): choose from tpe, random, grid"),
    ("dry-bad-scheduler", "search {A}/sp_bad_scheduler.yaml --dry-run", "scheduler: unknown scheduler 'pbt'"
     ": choose from asha, fifo"),
    ("search-bad-scheduler", "search {A}/sp_bad_scheduler.yaml", "unknown scheduler 'pbt'"),
    ("dry-address-dead", "search {A}/space.yaml --dry-run --address 127.0.0.1:1", "nothing answers there"),
    ("dry-address-garbage", "search {A}/space.yaml --dry-run --address host:notaport", "is not HOST:PORT"),
    ("dry-name-escapes", "search {A}/space.yaml --dry-run --name ../evil", "--name '../evil'"),
    ("dry-resume-nothing", "search {A}/space.yaml --dry-run --resume", "nothing to resume"),
    ("dry-resume-changed-space", "search {A}/space.yaml --dry-run --resume --name old --storage-path {A}/runs", "the space changed"),
    ("dry-damaged-record", "search {A}/space.yaml --dry-run --resume --name damaged --storage-path {A}/runs", "cannot read"),
    ("dry-exists", "search {A}/space.yaml --dry-run --name old --storage-path {A}/runs", "already exists: continue it with --resume"),
    # ---- search, the real start: the same checks, before any MLflow run, experiment folder or Ray
    ("search-storage-proc", "search {A}/space.yaml --storage-path /proc/x", "storage path /proc/x is not writable"),
    ("search-tracking-scheme", "search {A}/space.yaml --tracking-uri foo://bar", "no tracking store for foo://"),
    ("search-tracking-no-scheme", "search {A}/space.yaml --tracking-uri notauri", "tracking URI 'notauri'"),
    ("search-tracking-server-down", "search {A}/space.yaml --tracking-uri http://127.0.0.1:9", "does not answer"),
    ("search-optuna-backend", "search {A}/sp_optuna_foo.yaml", "unknown database backend 'foo'"),
    ("search-empty-text", "search {A}/sp_empty_text.yaml", "is empty on every row"),
    ("search-address-dead", "search {A}/space.yaml --address 127.0.0.1:1", "nothing answers there"),
    ("search-resume-nothing", "search {A}/space.yaml --resume", "nothing to resume"),
    ("search-resume-changed-space", "search {A}/space.yaml --resume --name old --storage-path {A}/runs", "the space changed"),
    ("search-exists", "search {A}/space.yaml --name old --storage-path {A}/runs", "already exists"),
    ("search-num-samples", "search {A}/space.yaml --num-samples 0", "--num-samples must be >= 1"),
    ("search-gpu-too-small", "search {A}/sp_gpu_too_small.yaml", "the GPUs have 0.50 GiB, and no change tried fits"),
    ("search-offload-params-zero2", "search {A}/sp_offload_params_zero2.yaml", "offload_params needs ZeRO-3"),
    # ---- confirm
    ("confirm-no-search", "confirm {A}/space.yaml --storage-path {A}/empty-runs", "nothing to confirm: no search of"),
    ("confirm-seeds", "confirm {A}/space.yaml --seeds 0", "--seeds must be >= 1"),
    ("confirm-top-k", "confirm {A}/space.yaml --top-k 0", "--top-k must be >= 1"),
    ("confirm-no-space", "confirm {A}/nope.yaml", "search space"),
    # ---- report
    ("report-no-dataset", "report", "required: --dataset"),
    ("report-no-db", "report --dataset rotten_tomatoes", "no MLflow database"),
    ("report-tracking-scheme", "report --dataset rotten_tomatoes --tracking-uri foo://bar", "no tracking store for foo://"),
    ("report-tracking-file", "report --dataset rotten_tomatoes --tracking-uri file:///tmp/mlruns", "file store"),
    ("report-tracking-server-down", "report --dataset rotten_tomatoes --tracking-uri http://127.0.0.1:9", "does not answer"),
    ("report-unknown-dataset", "report --dataset sst2 --tracking-uri {URI}", "sst2"),
    ("report-unknown-search", "report --dataset rotten_tomatoes --search nosuchsearch --tracking-uri {URI}", "nosuchsearch"),
    ("report-child-run", "report --dataset rotten_tomatoes --search {CHILD} --tracking-uri {URI}", "not the parent run of a search"),
    ("report-top-k", "report --dataset rotten_tomatoes --top-k 0 --tracking-uri {URI}", "--top-k must be >= 1"),
    # ---- export
    ("export-no-out", "export --dataset rotten_tomatoes", "required: --out"),
    ("export-no-db", "export --dataset rotten_tomatoes --out {A}/new", "no MLflow database"),
    ("export-tracking-scheme", "export --dataset rotten_tomatoes --out {A}/new --tracking-uri foo://bar", "no tracking store"),
    ("export-bad-method", "export --dataset rotten_tomatoes --method dorra --out {A}/new --tracking-uri {URI}", "unknown --method"),
    ("export-escaping-method", "export --dataset rotten_tomatoes --method ../x --out {A}/new", "is not a method name"),
    ("export-out-is-file", "export --dataset rotten_tomatoes --out {A}/good.csv --tracking-uri {URI}", "is a file"),
    ("export-out-not-empty", "export --dataset rotten_tomatoes --out {A}/keep --tracking-uri {URI}", "pass --force"),
    ("export-no-such-method", "export --dataset rotten_tomatoes --method prolora --out {A}/new --tracking-uri {URI}",
     "no scored prolora trial"),
    ("export-no-adapter", "export --dataset rotten_tomatoes --out {A}/new --tracking-uri {URI}", "has no adapter artifact"),
    ("export-bad-alias", "export --dataset rotten_tomatoes --alias 'lora b512' --out {A}/new --tracking-uri {URI}",
     "is not a cell alias"),
    ("export-bad-version", "export --dataset rotten_tomatoes --model-version 0 --out {A}/new --tracking-uri {URI}",
     "is not a version number"),
    ("export-alias-and-version", "export --dataset rotten_tomatoes --alias lora-b512 --model-version 1 --out {A}/new",
     "not allowed with argument --alias"),
    ("export-alias-with-method", "export --dataset rotten_tomatoes --alias lora-b512 --method lora --out {A}/new",
     "leave out --method and --search"),
    ("export-no-such-budget", "export --dataset rotten_tomatoes --budget 1024 --out {A}/new --tracking-uri {URI}",
     "--budget 1024: search s1 has no such budget level (its levels: 512)"),
    ("export-budget-not-int", "export --dataset rotten_tomatoes --budget lots --out {A}/new --tracking-uri {URI}",
     "invalid int value: 'lots'"),
    ("export-not-registered", "export --dataset rotten_tomatoes --alias lora-b512 --out {A}/new --tracking-uri {URI}",
     "no registered model 'melora-rotten_tomatoes'"),
    # ---- table (a recorded grid -> CSV)
    ("table-no-search", "table --dataset rotten_tomatoes --out {A}/t.csv", "required: --search"),
    ("table-not-csv", "table --dataset rotten_tomatoes --search s1 --out {A}/t.txt --tracking-uri {URI}", "give a .csv file name"),
    ("table-no-folder", "table --dataset rotten_tomatoes --search s1 --out {A}/nowhere/t.csv --tracking-uri {URI}", "does not exist"),
    ("table-not-recorded", "table --dataset rotten_tomatoes --search s1 --out {A}/t.csv --tracking-uri {URI}",
     "is not a recorded grid (sampler: grid, record_test: true, asha.enabled: false)"),
    ("table-no-such-search", "table --dataset rotten_tomatoes --search s9 --out {A}/t.csv --tracking-uri {URI}",
     "no parent run with that id or search name"),
    # ---- ui (argument errors: nothing starts)
    ("ui-port-0", "ui --port 0", "--port must be 1..65535"),
    ("ui-port-big", "ui --port 70000", "--port must be 1..65535"),
    ("ui-port-word", "ui --port abc", "invalid int value: 'abc'"),
    ("ui-no-db", "ui --tracking-uri {A}/missing.db --port 5999", "no MLflow database"),
    ("ui-tracking-scheme", "ui --tracking-uri foo://bar --port 5999", "no tracking store for foo://"),
    ("ui-server-uri", "ui --tracking-uri http://127.0.0.1:9 --port 5999", "does not answer"),
    ("ui-no-optuna-db", "ui --optuna sqlite:///{A}/nope.db --port 5999", "no Optuna database"),
    ("ui-optuna-backend", "ui --optuna foo://bar --port 5999", "unknown database backend 'foo'"),
    ("ui-optuna-missing-journal", "ui --optuna {A}/missing.journal --port 5999", "existing journal file"),
    ("ui-unknown-flag", "ui --bogus", "unrecognized arguments: --bogus"),
    # ---- cluster (argument errors: nothing starts)
    ("cluster-no-command", "cluster", "required: cluster_command"),
    ("cluster-bad-command", "cluster frob", "invalid choice: 'frob'"),
    ("cluster-cpus", "cluster up --dir {A}/c --num-cpus-head 0", "must be at least 1"),
    ("cluster-not-loopback", "cluster up --dir {A}/c --head-address 10.0.0.1", "not an IPv4 loopback address"),
    ("cluster-auth", "cluster up --dir {A}/c --auth weird", "invalid choice: 'weird'"),
    ("cluster-object-store", "cluster up --dir {A}/c --object-store-mb 10", "--object-store-mb must be at least 80"),
    ("cluster-timeout", "cluster up --dir {A}/c --timeout abc", "invalid float value: 'abc'"),
    ("cluster-status-nothing", "cluster status --dir {A}/nocluster", "no local cluster in"),
    # ---- the top level
    ("no-command", "", "required: command"),
    ("unknown-command", "frobnicate", "invalid choice: 'frobnicate'"),
]


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under roots, with size and mtime: what a row must leave as it found it."""
    out = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                path = Path(dirpath) / name
                st = path.lstat()
                out[str(path)] = (st.st_size if name in filenames else 0, st.st_mtime_ns if name in filenames else 0)
    return out


def runs_in(db: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(db) as conn:
        return sorted(conn.execute("SELECT run_uuid, status FROM runs").fetchall())


def fill(template: str, assets: dict[str, str]) -> list[str]:
    import shlex

    return shlex.split(template.format(**assets))


def check_one_line(code, out: str, err: str, needle: str) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err  # exactly one line
    assert lines[0].startswith("melora-tune"), err
    assert needle in lines[0], err
    assert out == "", out


@pytest.mark.parametrize("template,needle", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(template, needle, assets, tripwire, tmp_path, monkeypatch, capfd):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = Path(assets["A"])
    db = root / "mlflow.db"
    before, runs_before = tree(work, root), runs_in(db)
    capfd.readouterr()
    try:
        code = main(fill(template, assets))
    except SystemExit as exit_:  # argparse
        code = exit_.code
    out, err = capfd.readouterr()
    check_one_line(code, out, err, needle)
    assert tree(work, root) == before  # no new or changed file: no experiment folder, database, export, probe
    assert runs_in(db) == runs_before  # no MLflow run, RUNNING or otherwise


@pytest.mark.parametrize("value", ["abc", "0", "-5"])
@pytest.mark.parametrize("command", ["search {A}/space.yaml --dry-run", "search {A}/space.yaml", "confirm {A}/space.yaml",
                                     "train {A}/trial.yaml"], ids=["dry-run", "search", "confirm", "train"])
def test_a_bad_ray_start_timeout_variable_is_one_line(command, value, assets, tripwire, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("MELORA_RAY_START_TIMEOUT_S", value)
    monkeypatch.chdir(tmp_path)
    root = Path(assets["A"])
    before, runs_before = tree(tmp_path, root), runs_in(root / "mlflow.db")
    capfd.readouterr()
    code = main(fill(command, assets))
    out, err = capfd.readouterr()
    check_one_line(code, out, err, f"MELORA_RAY_START_TIMEOUT_S='{value}': give the seconds a local Ray may take to start")
    assert tree(tmp_path, root) == before and runs_in(root / "mlflow.db") == runs_before


def test_the_table_is_broad():
    commands = {t.split(" ", 1)[0] for _, t, _ in ROWS if t}
    assert len(ROWS) >= 60 and commands == {"budget", "train", "search", "confirm", "report", "export", "table", "ui", "cluster", "frobnicate"}
    assert sum(1 for _, t, _ in ROWS if t.startswith("search") and "--dry-run" not in t) >= 8  # real starts


# ---- through the installed entry point ----------------------------------------------------------------

@pytest.mark.parametrize("template,needle", [
    ("budget --model {A}/model --method lora --r 2 --alpha nan", "alpha must be a positive finite number"),
    ("search {A}/space.yaml --dry-run --storage-path /proc/x", "storage path /proc/x is not writable"),
    ("search {A}/space.yaml --tracking-uri foo://bar", "no tracking store for foo://"),  # the real start
], ids=["budget-alpha", "dry-run-storage", "search-tracking"])
def test_entry_point_prints_one_line(template, needle, assets, tmp_path):
    root = Path(assets["A"])
    before, runs_before = tree(tmp_path, root), runs_in(root / "mlflow.db")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "melora_tune.cli", *fill(template, assets)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    check_one_line(proc.returncode, proc.stdout, proc.stderr, needle)
    assert tree(tmp_path, root) == before and runs_in(root / "mlflow.db") == runs_before


# ---- inputs that must be accepted (the audit's false refusals) -------------------------------------------

def test_min_fraction_floor_is_exact(tmp_path, monkeypatch, capsys):
    """0.56 x 1600 = 896 (float says 896.0000000000001, whose ceiling 897 refused LoRA r=1 at exactly 896)."""
    from transformers import BertConfig

    # query + value of 2 layers, 112 wide: 4 x (112 + 112) = 896 params per unit of LoRA rank
    BertConfig(vocab_size=100, hidden_size=112, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
               max_position_embeddings=32).save_pretrained(tmp_path / "m112")
    for budget, fraction in ((1600, "0.56"), (3200, "0.28")):
        assert main(["budget", "--model", str(tmp_path / "m112"), "--method", "lora", "--budget", str(budget),
                     "--min-fraction", fraction, "--json"]) == 0
        rows = yaml.safe_load(capsys.readouterr().out)
        assert rows[0]["r"] == 1 and rows[0]["adapter_params"] == 896
    space = {**BASE_SPACE, "model": str(tmp_path / "m112"), "methods": ["lora"], "space": {"r": [1, 2]},
             "budget": {"max_params": 1600, "min_fraction": 0.56}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(tmp_path / "space.yaml"), "--dry-run"]) == 0
    assert "1 feasible configurations" in capsys.readouterr().out


def test_dry_run_checks_leave_nothing_behind(assets, tmp_path, monkeypatch, capfd):
    """A good dry run probes the storage, the database folders and the data, and leaves no trace of it."""
    monkeypatch.chdir(tmp_path)
    root = Path(assets["A"])
    space = mutate({**BASE_SPACE, "model": str(root / "model")}, "task", {"name": "local", "path": str(root / "good.csv")}, root)
    (root / "good_space.yaml").write_text(yaml.safe_dump(space))
    before = tree(tmp_path, root)
    assert main(["search", str(root / "good_space.yaml"), "--dry-run", "--storage-path", str(tmp_path / "runs" / "deep"),
                 "--tracking-uri", f"sqlite:///{tmp_path}/db/mlflow.db"]) == 0
    out, err = capfd.readouterr()
    assert "feasible configurations" in out and err == ""
    assert tree(tmp_path, root) == before


def test_tracking_schemes_are_mlflow_s_own():
    """The start check accepts only schemes MLflow 3 registers a tracking store for (file stores excepted)."""
    from mlflow.tracking._tracking_service.utils import _tracking_store_registry

    from melora_tune.records.store import TRACKING_SCHEMES

    assert set(TRACKING_SCHEMES) <= set(_tracking_store_registry._registry) - {"", "file"}


def test_search_record_that_cannot_be_written_leaves_no_folder(tmp_path):
    """The search record is written after the parent run exists: a failure there is one line, and the folder it
    created is gone again (the start's finally then closes the parent run as failed)."""
    from melora_tune.errors import UsageError
    from melora_tune.search.experiment import META_NAME, read_meta, write_meta

    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="cannot write the search record"):
        write_meta(tmp_path / "afile" / "exp", {"name": "x"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / META_NAME).write_text("[1, 2]")
    with pytest.raises(UsageError, match="is not a search record"):
        read_meta(exp)


@pytest.mark.slow
def test_start_that_fails_on_the_cluster_leaves_no_run_and_no_folder(assets, tmp_path, monkeypatch, capfd):
    """Ray starts before MLflow records anything: a cluster too small for one trial ends in one line and leaves no
    parent run (RUNNING or otherwise) and no experiment folder. Needs a real (local) Ray, hence slow."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.chdir(tmp_path)
    root = Path(assets["A"])
    space = mutate({**BASE_SPACE, "model": str(root / "model")}, "resources", {"cpus_per_worker": 512}, root)
    (tmp_path / "big.yaml").write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    capfd.readouterr()
    code = main(["search", str(tmp_path / "big.yaml"), "--storage-path", str(tmp_path / "runs"), "--tracking-uri", uri])
    out, err = capfd.readouterr()
    assert not ray.is_initialized()  # the start shut its Ray down again
    assert code == 2 and "one trial needs 512 CPUs (1 worker, trained in the trial" in err and "Traceback" not in err, err
    assert err.strip().splitlines()[-1].startswith("melora-tune search: error:"), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    assert not (tmp_path / "mlflow.db").exists() or runs_in(tmp_path / "mlflow.db") == []
