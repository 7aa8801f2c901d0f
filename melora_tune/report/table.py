"""``melora-tune table``: a recorded grid search as a tabulated benchmark (one CSV row per trial x evaluation).

A search space with ``sampler: grid``, ``record_test: true`` and ASHA off trains
every configuration of its grid (x ``space.seeds``) to the end and scores
validation and test after every epoch. This reads those MLflow records back:
one row per (configuration, seed, evaluation), with the columns ``table_columns()``
describes, so that ``benchmarks/search_efficiency.py`` can replay searches
against it without training. Several searches (one per budget level) go into
one table; the ``budget`` column tells them apart.

Next to ``<out>.csv`` goes ``<out>.json``: the command that made it, the
tracking store, each search (name, parent run id, space file, budget) and the
column meanings. Both are written to temporary files and renamed, so an
interrupted export leaves no half-written table.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.hyperparams import HYPERPARAMS
from melora_tune.adapters.registry import method_names
from melora_tune.errors import UsageError
from melora_tune.records import read

# name -> meaning (written into the JSON next to the CSV); the hyperparameters' columns come after "config".
FIXED_COLUMNS: dict[str, str] = {
    "budget": "the search's budget.max_params (one budget level)",
    "method": "",  # the registered methods: lora | melora | prolora | ...
    "config": "the configuration in words, learning rate included (the MLflow run name)",
    "lr": "learning rate",
    "alpha": "adapter alpha",
    "dropout": "adapter dropout",
    "seed": "training seed (init and data order; the data split is the same for all)",
    "epoch": "epochs trained at this evaluation",
    "step": "optimizer steps at this evaluation",
    "val_score": "the search's score (task metric) on the validation split",
    "test_score": "the same metric on the test split (never seen by a search)",
    "val_loss": "validation loss",
    "train_loss": "mean training loss since the previous evaluation",
    "train_time_s": "cumulative training seconds up to this evaluation",
    "eval_time_s": "cumulative validation seconds up to this evaluation (test scoring excluded)",
    "adapter_params": "trainable adapter parameters (the budgeted count)",
    "equivalent_rank": "rank of the adapter's weight update",
    "status": "the trial's outcome (completed for a full table)",
    "search": "the search's name",
    "run_id": "the trial's MLflow run id",
}


def table_columns() -> dict[str, str]:
    """Every column and its meaning: the fixed ones with the registered hyperparameters (n, r, u, m, m_b, ...)
    after ``config``."""
    head = ("budget", "method", "config")
    return {**{k: FIXED_COLUMNS[k] for k in head}, "method": " | ".join(method_names()),
            **{k: hp.column or hp.help for k, hp in HYPERPARAMS.items()},
            **{k: v for k, v in FIXED_COLUMNS.items() if k not in head}}


def copied_params() -> tuple[str, ...]:
    """The MLflow params a row copies."""
    return ("method", *read.hp_columns(), "lr", "alpha", "dropout", "adapter_params", "equivalent_rank")

METRICS = {"val_score": "score", "test_score": "test_score", "val_loss": "eval_loss", "train_loss": "train_loss",
           "train_time_s": "train_time_s", "eval_time_s": "eval_time_s"}


def _recorded(search: read.SearchInfo) -> None:
    p = search.params
    if str(p.get("record_test")).lower() != "true" or p.get("sampler") != "grid" or str(p.get("asha")).lower() == "true":
        raise UsageError(
            f"search {search.name} is not a recorded grid (sampler: grid, record_test: true, asha.enabled: false): "
            f"a table needs every configuration's full curve with test scores"
        )


def _hyperparams(params: dict[str, str]) -> dict[str, int]:
    """Every hyperparameter column filled as ``adapters.budget.Candidate`` reads it: the method's own values,
    defaults for those it does not use (LoRA's n is 1), m_b = m when tied. One key per configuration."""
    given = {k: int(float(params[k])) for k in read.hp_columns() if params.get(k) not in (None, "", "None")}
    cfg = AdapterConfig(method=params.get("method", "lora"), **given)
    return {k: cfg.value(k) for k in read.hp_columns()}


def table_frame(mlf, search: read.SearchInfo):
    """The rows of one recorded search (columns ``table_columns()``), sorted by method, configuration, seed, epoch."""
    import pandas as pd  # heavy: pandas, loaded where tables are built

    _recorded(search)
    budget = int(float(search.params.get("budget", "nan")))
    rows = []
    for run in read.child_runs(mlf, search):
        if read.is_confirmation(run):
            continue
        p, t = run.data.params, run.data.tags
        histories = {col: {m.step: m.value for m in mlf.get_metric_history(run.info.run_id, name)}
                     for col, name in (("epoch", "epoch"), *METRICS.items())}
        fixed = {k: p.get(k) for k in copied_params()}
        fixed.update(_hyperparams(p))
        for step in sorted(histories["epoch"]):
            rows.append({
                "budget": budget, **fixed, "config": run.info.run_name, "seed": p.get("training.seed"),
                "epoch": histories["epoch"][step], "step": step,
                **{col: histories[col].get(step, math.nan) for col in METRICS},
                "status": t.get(read.STATUS_TAG, "?"), "search": search.name, "run_id": run.info.run_id,
            })
    df = pd.DataFrame(rows, columns=list(table_columns()))
    for col in (*read.hp_columns(), "seed", "step", "adapter_params", "equivalent_rank", "budget"):
        df[col] = pd.to_numeric(df[col]).astype("Int64")
    for col in ("lr", "alpha", "dropout", "epoch", *METRICS):
        df[col] = pd.to_numeric(df[col]).astype(float)
    order = ["method", *read.hp_columns(), "lr", "seed", "epoch"]
    return df.sort_values(order, kind="stable").reset_index(drop=True)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


ENV_PACKAGES = ("torch", "transformers", "peft", "deepspeed", "ray", "optuna", "mlflow", "numpy", "pandas", "scipy")


def environment() -> dict:
    """The versions and the machine of this process: a table is exported where it was recorded (benchmarks/README.md),
    so these are the recording's."""
    cpu = next((line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine())
    versions = {}
    for name in ENV_PACKAGES:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    import torch  # heavy: only an export asks which GPU recorded the table

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"python": platform.python_version(), "packages": versions, "platform": platform.platform(),
            "cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu}


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def export_table(dataset: str, searches: list[str], out: str | os.PathLike, *, tracking_uri: str | None = None,
                 command: str | None = None):
    """Write ``out`` (.csv) and its ``.json`` from the recorded searches; returns (DataFrame, json path, the JSON's
    content)."""
    import pandas as pd  # heavy: pandas, loaded where tables are built

    out = Path(out)
    if out.suffix != ".csv":
        raise UsageError(f"--out {out}: give a .csv file name, e.g. benchmarks/tables/{dataset}.csv")
    if not out.parent.is_dir():
        raise UsageError(f"--out {out}: folder {out.parent} does not exist")
    uri = read.tracking_uri(tracking_uri)
    mlf = read.client(uri)
    frames, info = [], []
    for name in searches:
        search = read.resolve_search(mlf, dataset, name)
        df = table_frame(mlf, search)
        if df.empty:
            raise UsageError(f"search {search.name} has no recorded evaluation yet")
        budget = int(df["budget"].iloc[0])
        if any(i["budget"] == budget for i in info):
            raise UsageError(f"two searches at budget {budget}: give one search per budget level")
        artifact = read.space_artifact(mlf, search.run_id)
        info.append({"name": search.name, "parent_run_id": search.run_id, "status": search.status, "budget": budget,
                     "space_file": artifact[0] if artifact else None, "trials": int(df["run_id"].nunique())})
        frames.append(df)
    table = pd.concat(frames, ignore_index=True)
    not_done = sorted(set(table.loc[table["status"] != "completed", "config"]))
    meta = {
        "command": command or "melora-tune table " + " ".join(f"--search {s}" for s in searches) + f" --out {out}",
        "dataset": dataset,
        "tracking_uri": uri,
        "git_commit": _git_commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "environment": environment(),
        "searches": info,
        "spaces": {str(i["budget"]): f"search_spaces/{i['space_file']}" for i in info if i["space_file"]},
        "rows": len(table),
        "not_completed": not_done,
        "columns": table_columns(),
    }
    meta_path = out.with_suffix(".json")
    _write_atomic(out, lambda p: table.to_csv(p, index=False, float_format="%.6g"))
    _write_atomic(meta_path, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return table, meta_path, meta


def add_table_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "table",
        help="export recorded grid searches as a tabulated benchmark (CSV + JSON)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, metavar="NAME", help="dataset = MLflow experiment (the task name)")
    p.add_argument("--search", action="append", required=True, metavar="NAME",
                   help="a recorded search (parent run id or search name); repeat it for each budget level")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    p.add_argument("--out", required=True, metavar="FILE.csv", help="the table; its .json goes next to it")
    p.set_defaults(func=table_command)
    return p


def table_command(args) -> int:
    command = "melora-tune " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["table"] else None
    table, meta_path, meta = export_table(args.dataset, args.search, args.out, tracking_uri=args.tracking_uri,
                                          command=command)
    configs = table.groupby("budget")["config"].nunique().to_dict()
    seeds = table.groupby("budget")["seed"].nunique().to_dict()
    for budget in sorted(configs):
        print(f"budget {budget:,}: {configs[budget]} configurations x {seeds[budget]} seed(s)")
    print(f"{len(table)} rows -> {args.out} (meta {meta_path})")
    not_done = meta["not_completed"]
    if not_done:
        print(f"melora-tune table: warning: {len(not_done)} configuration(s) did not complete: {', '.join(not_done)}",
              file=sys.stderr)
    return 0
