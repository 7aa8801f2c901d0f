"""The frontier on the real stack: a 2-method x 2-level search (Ray Tune + Optuna + ASHA off, DeepSpeed ZeRO-2,
SQLite MLflow) with its confirm stage, a tiny random BERT and real rotten_tomatoes sentences. No mocks.

What a user relies on: confirmation runs per cell on shared seeds, one registered winner per cell, the report's
frontier table, effort and plot, frontier.csv with one row per cell, and ``export --budget`` taking that cell's
confirmed winner."""

from __future__ import annotations

import json

import pytest
from helpers import md_section, md_table_rows, save_tiny_classifier, search_on_local_ray

pytestmark = pytest.mark.slow

LEVELS = [256, 512]  # tiny BERT (query+value, 4 layers of 32x32): 256 params per unit of r; r=1 | r=2
CELLS = {"melora@256", "lora@256", "melora@512", "lora@512"}


@pytest.fixture(scope="module")
def confirmed(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier_e2e")
    model = save_tiny_classifier(root / "tiny-bert", max_positions=64)
    space = {
        "name": "fe2e", "model": str(model),
        "task": {"name": "rotten_tomatoes", "max_train_samples": 192, "max_eval_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "alpha": 16},
        "budget": {"levels": LEVELS}, "methods": ["melora", "lora"],
        "space": {"lr": {"low": 1e-3, "high": 3e-2}, "n": [2, 4]},
        "training": {"epochs": 1, "micro_batch_size": 32, "max_length": 32, "zero_stage": 2},
        "asha": {"enabled": False}, "trials_per_cell": 1, "max_concurrent_trials": 2, "seed": 0,
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9},
        "confirm": {"enabled": True, "top_k": 1, "seeds": 2},
        "storage_path": str(root / "runs"), "tracking_uri": f"sqlite:///{root}/mlflow.db",
    }
    result, _ = search_on_local_ray(space)
    return result, root


def test_confirmation_per_cell_report_and_export_budget(confirmed, tmp_path):
    from mlflow import MlflowClient

    from melora_tune.cli import main
    from melora_tune.records import read

    result, root = confirmed
    mlf = MlflowClient(result.tracking_uri)
    info = read.SearchInfo.from_run(mlf.get_run(result.parent_run_id), "rotten_tomatoes")
    conf = read.confirmations_frame(mlf, info)
    assert set(conf["cell"]) == CELLS and len(conf) == 4 * 2
    assert {c: sorted(g["seed"]) for c, g in conf.groupby("cell")} == {c: [1, 2] for c in CELLS}  # shared seeds
    assert all(conf["budget"] == conf["cell"].str.split("@").str[1].astype(int))

    versions = mlf.search_model_versions("name = 'melora-rotten_tomatoes'")
    assert {v.tags["melora.cell"] for v in versions} == {"melora-b256", "lora-b256", "melora-b512", "lora-b512"}

    out = tmp_path / "report"
    uri = result.tracking_uri
    assert main(["report", "--dataset", "rotten_tomatoes", "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    md = (out / "report.md").read_text()
    table = md_table_rows(md_section(md, "Method x budget: confirmed test score"))
    assert [r["method"] for r in table] == ["MELoRA", "LoRA"] and all("2 seeds" in r["256 (test, 95% CI)"] for r in table)
    effort = md_table_rows(md_section(md, "Effort per cell"))
    assert {r["cell"] for r in effort} == CELLS and {r["trials"] for r in effort} == {"1"}
    assert (out / "frontier_confirmed.png").stat().st_size > 0
    rows = json.loads((out / "frontier.json").read_text())["cells"]
    assert {r["cell"] for r in rows} == CELLS and all(r["status"] == "confirmed" for r in rows)

    export = tmp_path / "e"
    assert main(["export", "--dataset", "rotten_tomatoes", "--tracking-uri", uri, "--budget", "256", "--method", "lora",
                 "--out", str(export)]) == 0
    meta = json.loads((export / "export.json").read_text())
    winner = conf[(conf["cell"] == "lora@256")]
    assert meta["selection"] == "confirmed" and meta["run_id"] in set(winner["run_id"]) and meta["budget"] == 256
    assert (export / "peft" / "adapter_config.json").is_file()
    assert main(["export", "--dataset", "rotten_tomatoes", "--tracking-uri", uri, "--budget", "300",
                 "--out", str(tmp_path / "bad")]) == 2 and not (tmp_path / "bad").exists()
