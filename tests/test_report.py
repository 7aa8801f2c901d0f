"""Reports, exports and MLflow UI: fast checks on synthetic data, then one real small search shared by the slow tests.

The slow tests run a real search (local Ray, Optuna TPE + ASHA, DeepSpeed, SQLite MLflow and Optuna in a temp
folder, a tiny random BERT with the bundled MiniLM tokenizer, real rotten_tomatoes sentences), then build the
report and the export from what MLflow recorded, and drive MLflow UI in headless Chromium (Debian's chromium and
chromium-driver, installed by .ci/setup; MELORA_NO_BROWSER=1 skips that test, anything else missing fails it).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from melora_tune.cli import main
from helpers import assert_self_contained, browser, free_port, md_section, md_table_rows, save_tiny_classifier, stop_ui, wait_http

DATASET = "rotten_tomatoes"


# ---- fast: synthetic data ---------------------------------------------------------------------------

def synthetic_trials():
    import pandas as pd

    from melora_tune.records.read import COLUMNS, normalize_frame

    rows = [
        # method, n, r, lr, params, eq rank, score, best, status
        ("melora", 4, 1, 1e-2, 256, 4, 0.70, 0.71, "completed"),
        ("melora", 2, 2, 3e-3, 512, 4, 0.74, 0.74, "completed"),
        ("melora", 4, 2, 1e-4, 512, 8, 0.90, 0.90, "stopped_early"),  # higher, but fewer epochs: ranks after completed
        ("melora", 2, 1, 5e-2, 256, 2, 0.99, 0.99, "failed"),  # never best
        ("lora", None, 2, 1e-2, 512, 2, 0.72, 0.73, "completed"),
        ("lora", None, 1, 1e-5, 256, 1, 0.42, 0.42, "stopped_early"),
        ("lora", None, 1, 2e-2, 256, 1, None, None, "diverged"),
    ]
    data = []
    for i, (method, n, r, lr, params, eq, score, best, status) in enumerate(rows):
        data.append({
            "run_id": f"run{i}", "run_name": f"{method} r={r} lr={lr:.1e}", "trial_id": f"t{i}", "optuna_trial": i,
            "method": method, "n": n, "r": r, "lr": str(lr), "alpha": "16", "dropout": "0", "equivalent_rank": eq,
            "adapter_params": params, "score": score, "best_score": best, "epoch": 2.0 if status == "completed" else 1.0,
            "status": status, "reason": None, "mlflow_status": "FINISHED", "start_time": 1000 + i, "duration_s": 3.0,
            "best_checkpoint": None,
        })
    return normalize_frame(pd.DataFrame(data, columns=list(COLUMNS)))


def test_ranking_prefers_completed_then_score():
    from melora_tune.records.read import best_per_method, best_run, rank_trials

    df = synthetic_trials()
    ranked = rank_trials(df)
    assert list(ranked["run_id"]) == ["run1", "run4", "run0", "run2", "run5"]  # failed/diverged left out
    assert list(ranked["rank"]) == [1, 2, 3, 4, 5]
    best = best_per_method(df).set_index("method")
    assert best.loc["melora", "run_id"] == "run1" and best.loc["lora", "run_id"] == "run4"
    assert best_run(df)["run_id"] == "run1" and best_run(df, "lora")["run_id"] == "run4"
    assert best_run(df, "prolora") is None
    assert str(df["n"].dtype) == "Int64" and df["lr"].dtype == float


def _report_data(tmp_path, trials, scopes=None, notes=None):
    from melora_tune.report import plots
    from melora_tune.records.read import best_per_method, rank_trials
    from melora_tune.report.importance import Importance
    from melora_tune.report.render import Figure, ReportData

    figs = [
        Figure("frontier", "Score vs adapter parameters (budget frontier)", plots.frontier(trials, tmp_path / "frontier.png", 512)),
        Figure("heatmap", "MELoRA: best score over n x r", plots.heatmap_n_r(trials, tmp_path / "heatmap_n_r.png")),
        Figure("lr", "Learning-rate sensitivity", plots.lr_sensitivity(trials, tmp_path / "lr_sensitivity.png")),
        Figure("importance", "Parameter importance", plots.importance_bars(scopes or {}, tmp_path / "importance.png")),
    ]
    imp = Importance(study_name="s", storage="sqlite:///x.db", scopes=scopes or {}, notes=notes or {})
    return ReportData(
        dataset="demo|set", search_name="s-1", parent_run_id="p1", experiment_id="1", tracking_uri="sqlite:///m.db",
        search_status="finished", generated="now", trials=trials, best=best_per_method(trials), top=rank_trials(trials).head(3),
        top_k=3, figures=figs, importance=imp, settings={"budget (adapter params)": "512"},
    )


def test_render_markdown_and_self_contained_html(tmp_path):
    from melora_tune.report.render import render_html, render_markdown

    trials = synthetic_trials()
    data = _report_data(tmp_path, trials, scopes={"all methods": {"lr": 0.7, "r": 0.2, "method": 0.1}},
                        notes={"lora": "needs at least 2 completed (full-fidelity) trials, the study has 1"})
    for fig in data.figures:
        assert fig.path is not None and fig.path.stat().st_size > 1000 and fig.path.read_bytes()[:4] == b"\x89PNG"
    md = render_markdown(data)
    best = {row["method"]: row for row in md_table_rows(md_section(md, "Best configuration per method"))}
    assert set(best) == {"melora", "lora"}
    assert best["melora"]["score"] == "0.74" and best["melora"]["n"] == "2" and best["melora"]["r"] == "2"
    assert best["melora"]["lr"] == "3.00e-03" and best["melora"]["trial id"] == "t1" and best["melora"]["MLflow run"] == "run1"
    assert best["lora"]["n"] == "" and best["lora"]["adapter params"] == "512"
    top = md_table_rows(md_section(md, "Top 3 trials"))
    assert [r["#"] for r in top] == ["1", "2", "3"] and top[0]["configuration"] == "melora r=2 lr=3.0e-03"
    assert "demo\\|set" in md  # a '|' in a name does not break the tables
    assert "![Score vs adapter parameters (budget frontier)](frontier.png)" in md
    assert "all methods: lr 0.70, r 0.20, method 0.10" in md and "lora: not available: needs at least 2" in md

    page = render_html(data)
    assert assert_self_contained(page) == 4
    assert "<td>run1</td>" in page and "demo|set" in page


def test_plots_without_data_say_so(tmp_path):
    from melora_tune.report import plots

    trials = synthetic_trials()
    lora_only = trials[trials["method"] == "lora"]
    assert plots.heatmap_n_r(lora_only, tmp_path / "h.png") is None and not (tmp_path / "h.png").exists()
    nothing = trials[trials["status"] == "failed"]
    assert plots.frontier(nothing, tmp_path / "f.png") is None
    assert plots.lr_sensitivity(nothing, tmp_path / "l.png") is None
    assert plots.importance_bars({}, tmp_path / "i.png") is None


def test_importance_folds_conditional_names_and_explains_too_few_trials():
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from melora_tune.report.importance import canonical_name, study_importance

    assert canonical_name("melora.r|n=4") == "r" and canonical_name("lora.r") == "r" and canonical_name("lr") == "lr"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    method = CategoricalDistribution(("melora", "lora"))
    lr = FloatDistribution(1e-5, 1e-1, log=True)
    for i in range(8):
        n = 2 if i % 2 else 4
        params = {"method": "melora", "melora.n": n, f"melora.r|n={n}": 1 + i % 3, "lr": 10 ** (-1 - i / 2)}
        dists = {"method": method, "melora.n": CategoricalDistribution((2, 4)), f"melora.r|n={n}": CategoricalDistribution((1, 2, 3)),
                 "lr": lr}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=0.5 + 0.05 * i))
    study.add_trial(optuna.trial.create_trial(params={"method": "lora", "lora.r": 2, "lr": 1e-3},
                                              distributions={"method": method, "lora.r": CategoricalDistribution((1, 2)), "lr": lr},
                                              value=0.6))
    study.add_trial(optuna.trial.create_trial(params={"method": "lora", "lora.r": 1, "lr": 1e-2},
                                              distributions={"method": method, "lora.r": CategoricalDistribution((1, 2)), "lr": lr},
                                              state=optuna.trial.TrialState.PRUNED))
    result = study_importance(study)
    assert set(result.scopes["melora"]) == {"n", "r", "lr"}  # folded names; 'method' is constant within melora
    assert math.isclose(sum(result.scopes["melora"].values()), 1.0, rel_tol=1e-6)
    assert set(result.scopes["all methods"]) <= {"method", "r", "lr"} and "lr" in result.scopes["all methods"]
    assert "lora" not in result.scopes and "at least 2 completed" in result.notes["lora"]  # one COMPLETE lora trial


def fake_search(client, dataset: str, name: str, trials: list[tuple]) -> str:
    """Log a search the way melora_tune.search.tracking does (no training): parent run + one child per trial."""
    exp = client.get_experiment_by_name(dataset)
    exp_id = exp.experiment_id if exp else client.create_experiment(dataset)
    parent = client.create_run(exp_id, run_name=name, tags={"melora.kind": "search", "melora.search": name,
                                                            "melora.status": "finished"}).info.run_id
    client.log_param(parent, "budget", "512")
    for i, (method, n, r, lr, score, status) in enumerate(trials):
        tags = {"mlflow.parentRunId": parent, "melora.trial_id": f"{name}-{i}", "melora.optuna_trial": str(i),
                "melora.status": status, "melora.search": name}
        run = client.create_run(exp_id, run_name=f"{method} r={r} lr={lr:.1e}", tags=tags).info.run_id
        params = {"method": method, "r": r, "lr": lr, "alpha": 16, "dropout": 0, "equivalent_rank": (n or 1) * r,
                  "adapter_params": 256 * r * (n or 1) // (n or 1)}
        if n:
            params["n"] = n
        for key, value in params.items():
            client.log_param(run, key, str(value))
        for step in (7, 14):
            client.log_metric(run, "score", score - (0.05 if step == 7 else 0), step=step)
        client.log_metric(run, "best_score", score)
        client.set_terminated(run)
    client.set_terminated(parent)
    return parent


def test_report_across_datasets_from_a_synthetic_store(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    fake_search(client, "sst2", "old", [("lora", None, 1, 1e-3, 0.60, "completed")])
    p_sst2 = fake_search(client, "sst2", "new", [("melora", 4, 1, 1e-2, 0.81, "completed"), ("lora", None, 2, 3e-3, 0.79, "completed"),
                                                 ("melora", 2, 2, 1e-4, 0.70, "stopped_early")])
    p_trec = fake_search(client, "trec", "t1", [("melora", 2, 1, 5e-3, 0.88, "completed"), ("lora", None, 1, 1e-2, 0.91, "failed")])
    out = tmp_path / "reports"
    assert main(["report", "--dataset", "all", "--tracking-uri", uri, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "sst2: search new (3 trials)" in printed and "trec: search t1 (2 trials)" in printed
    index = (out / "index.md").read_text()
    rows = md_table_rows(index)
    assert [(r["dataset"], r["method"], r["score"]) for r in rows] == [("sst2", "lora", "0.79"), ("sst2", "melora", "0.81"),
                                                                       ("trec", "melora", "0.88")]
    assert assert_self_contained((out / "sst2" / "report.html").read_text()) >= 2
    md = (out / "trec" / "report.md").read_text()
    assert "Best configuration by dataset" in md  # each report carries the cross-dataset table
    assert "not available: the search's Optuna study was not found" in md
    assert "No scored MELoRA trial" not in md and (out / "trec" / "heatmap_n_r.png").is_file()
    for parent in (p_sst2, p_trec):
        assert "report/report.html" in {a.path for a in client.list_artifacts(parent, "report")}

    # --search by name (an older search), and refusals
    assert main(["report", "--dataset", "sst2", "--search", "old", "--tracking-uri", uri, "--out", str(tmp_path / "old"),
                 "--no-log"]) == 0
    assert "**search**: old (finished)" in (tmp_path / "old" / "report.md").read_text()
    child = client.search_runs([client.get_experiment_by_name("sst2").experiment_id], f"tags.`mlflow.parentRunId` = '{p_sst2}'")[0]
    capsys.readouterr()
    assert main(["report", "--dataset", "sst2", "--search", child.info.run_id, "--tracking-uri", uri]) == 2
    assert "not the parent run of a search" in capsys.readouterr().err
    assert main(["report", "--dataset", "trec", "--search", p_sst2, "--tracking-uri", uri]) == 2
    assert "another experiment" in capsys.readouterr().err
    assert main(["report", "--dataset", "sst2", "--dataset", "trec", "--search", p_sst2, "--tracking-uri", uri]) == 2
    assert main(["export", "--dataset", "trec", "--method", "prolora", "--tracking-uri", uri, "--out", str(tmp_path / "e")]) == 2
    assert "no scored prolora trial" in capsys.readouterr().err and not (tmp_path / "e").exists()

    from melora_tune.records.ui import experiment_links

    links = experiment_links(uri, "http://127.0.0.1:5000")
    assert len(links) == 2 and links[0].startswith("sst2: http://127.0.0.1:5000/#/experiments/")


def test_export_refuses_non_empty_out_and_escaping_names(tmp_path, capsys):
    from melora_tune.errors import UsageError
    from melora_tune.report.export_paths import check_out_dir, safe_path

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "--dataset", DATASET, "--tracking-uri", str(tmp_path / "none.db"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--force" in err
    assert (out / "keep.txt").read_text() == "mine"

    for bad in ("../evil", "lora/../../x", "..", "/etc/passwd", "lo ra"):
        assert main(["export", "--dataset", DATASET, "--method", bad, "--out", str(tmp_path / "new")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--method" in err
    assert main(["export", "--dataset", DATASET, "--method", "dorra", "--out", str(tmp_path / "new")]) == 2
    assert "unknown --method" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()

    with pytest.raises(UsageError, match="outside"):
        safe_path(tmp_path, "..")
    with pytest.raises(UsageError, match="outside"):
        safe_path(tmp_path, "a/../../b")
    assert safe_path(tmp_path, "adapter") == tmp_path / "adapter"
    cwd = os.getcwd()
    try:
        os.chdir(out)
        with pytest.raises(UsageError, match="will not"):
            check_out_dir(".", force=True)  # --force never replaces the working folder
        with pytest.raises(UsageError, match="will not"):
            check_out_dir("..", force=True)
    finally:
        os.chdir(cwd)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        check_out_dir(tmp_path / "afile", force=True)


def test_report_and_ui_usage_errors(tmp_path, capsys):
    assert main(["report", "--dataset", DATASET, "--tracking-uri", str(tmp_path / "missing.db")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no MLflow database" in err
    assert main(["report", "--dataset", DATASET, "--tracking-uri", "file:///tmp/mlruns"]) == 2
    assert "file store" in capsys.readouterr().err
    assert main(["ui", "--tracking-uri", str(tmp_path / "missing.db"), "--port", "5999"]) == 2
    assert "no MLflow database" in capsys.readouterr().err
    assert main(["ui", "--port", "70000"]) == 2
    assert main(["ui", "--optuna", f"sqlite:///{tmp_path}/nope.db", "--port", "5999"]) == 2
    assert "no Optuna database" in capsys.readouterr().err


def test_ui_commands_bind_loopback_with_one_worker(tmp_path):
    from melora_tune.cli import build_parser
    from melora_tune.records.ui import mlflow_command, optuna_command

    args = build_parser().parse_args(["ui"])
    assert args.optuna is None and build_parser().parse_args(["ui", "--optuna"]).optuna == ""
    cmd, env = mlflow_command(f"sqlite:///{tmp_path}/mlflow.db", args.host, args.port)
    assert Path(cmd[0]).name == "mlflow" and cmd[1] == "server"
    opts = dict(zip(cmd[2:12:2], cmd[3:12:2]))
    assert opts["--host"] == "127.0.0.1" and opts["--port"] == "5000" and opts["--workers"] == "1"
    assert opts["--backend-store-uri"] == f"sqlite:///{tmp_path}/mlflow.db"
    assert "--serve-artifacts" in cmd and env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    (tmp_path / "optuna.db").write_bytes(b"")
    cmd, _ = optuna_command(f"sqlite:///{tmp_path}/optuna.db", args.host, args.port)
    assert Path(cmd[0]).name == "optuna-dashboard" and cmd[1:] == [f"sqlite:///{tmp_path}/optuna.db", "--host", "127.0.0.1",
                                                                    "--port", "5000"]


# ---- slow: one real search shared by the tests below -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-bert", max_positions=64)


def space(model_dir, root: Path) -> dict:
    # tiny BERT: query+value = 4 layers of 32x32: 256 params per unit of r; budget 512 (r <= 2), floor 256
    return {
        "name": "rtest",
        "model": str(model_dir),
        "task": {"name": DATASET, "max_train_samples": 200, "max_eval_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "alpha": 16},
        "budget": {"max_params": 512, "min_fraction": 0.5},
        "methods": ["melora", "lora"],
        "space": {"lr": {"low": 1e-5, "high": 3e-2}, "n": [2, 4], "r": [1, 2]},
        "training": {"epochs": 2, "micro_batch_size": 32, "max_length": 32, "zero_stage": 2},
        "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2},
        "num_samples": 4,
        "max_concurrent_trials": 1,
        "n_startup_trials": 2,
        "seed": 0,
        "points_to_evaluate": [  # both methods are tried whatever TPE samples next
            {"method": "melora", "n": 4, "r": 1, "lr": 1e-2},
            {"method": "lora", "r": 2, "lr": 1e-2},
        ],
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
    }


@pytest.fixture(scope="module")
def searched(tiny_model, tmp_path_factory):
    """One real search: returns (SearchResult, work folder, tracking URI)."""
    import ray

    from melora_tune.search import run_search

    root = tmp_path_factory.mktemp("search")
    uri = f"sqlite:///{root}/mlflow.db"
    cwd = os.getcwd()
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    lines: list[str] = []
    try:
        os.chdir(root)
        t0 = time.time()
        result = run_search(space(tiny_model, root), tracking_uri=uri, storage_path=str(root / "runs"), write=lines.append)
        print("\n".join(lines))
        print(f"search wall time {time.time() - t0:.0f} s")
    finally:
        os.chdir(cwd)
        ray.shutdown()
    assert result.status == "finished", "\n".join(lines)
    scored = [t for t in result.trials if t.status in ("completed", "stopped_early")]
    assert {t.method for t in scored} == {"melora", "lora"}, result.table()
    return result, root, uri


def mlflow_best(uri: str, parent: str) -> dict:
    """The best child run per method, straight from MLflow: completed first, then the final score, then the best
    checkpoint's score; ties (the tiny model often scores exactly the majority-class rate) go to the earliest trial."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(DATASET)
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'", max_results=1000)
    key = lambda r: (r.data.tags["melora.status"] == "completed", r.data.metrics["score"], r.data.metrics.get("best_score", -1))  # noqa: E731
    best: dict[str, object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        if run.data.tags.get("melora.status") not in ("completed", "stopped_early") or run.data.metrics.get("score") is None:
            continue
        cur = best.get(run.data.params["method"])
        if cur is None or key(run) > key(cur):
            best[run.data.params["method"]] = run
    return best


@pytest.mark.slow
def test_report_from_a_real_search(searched, tmp_path):
    from mlflow import MlflowClient

    result, root, uri = searched
    out = tmp_path / "report"
    assert main(["report", "--dataset", DATASET, "--tracking-uri", uri, "--out", str(out), "--top-k", "3"]) == 0
    for name in ("report.md", "report.html", "trials.csv", "frontier.png", "heatmap_n_r.png", "lr_sensitivity.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "report.md").read_text()
    assert result.name in md and result.parent_run_id in md

    # the best table is MLflow's best run per method, and the search's own summary agrees
    best_md = {row["method"]: row for row in md_table_rows(md_section(md, "Best configuration per method"))}
    best_ml = mlflow_best(uri, result.parent_run_id)
    assert set(best_md) == set(best_ml) == {"melora", "lora"}
    for method, run in best_ml.items():
        row, p = best_md[method], run.data.params
        assert row["MLflow run"] == run.info.run_id and row["trial id"] == run.data.tags["melora.trial_id"]
        assert float(row["score"]) == pytest.approx(run.data.metrics["score"], abs=1e-4)
        assert row["r"] == p["r"] and row["n"] == p.get("n", "") and row["status"] == run.data.tags["melora.status"]
        assert float(row["lr"]) == pytest.approx(float(p["lr"]), rel=1e-2)
        assert row["adapter params"].replace(",", "") == p["adapter_params"] and row["equivalent rank"] == p["equivalent_rank"]
        assert result.best[method].trial_id == row["trial id"]
    top = md_table_rows(md_section(md, "Top 3 trials"))
    assert 1 <= len(top) <= 3 and top[0]["trial id"] in {r["trial id"] for r in best_md.values()}

    # parameter importance: a figure, or one sentence saying why not (never a crash)
    imp = md_section(md, "Parameter importance (Optuna, fANOVA)")
    assert result.study_name in imp
    assert (out / "importance.png").is_file() or "not available" in imp

    page = (out / "report.html").read_text()
    assert assert_self_contained(page) >= 3

    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(result.parent_run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/frontier.png", "report/heatmap_n_r.png"} <= logged

    # the default: the newest search, written to reports/<dataset>/ under the working folder
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert main(["report", "--dataset", "all", "--tracking-uri", uri, "--no-log"]) == 0
    finally:
        os.chdir(cwd)
    assert (tmp_path / "reports" / DATASET / "report.html").is_file()


@pytest.mark.slow
def test_export_from_a_real_search(searched, tiny_model, tmp_path, capsys):
    import torch
    from mlflow import MlflowClient
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from melora_tune.adapters.inject import load_adapter
    from melora_tune.trial.config import load_trial_config
    from melora_tune.trial.prepare import prepare_trial

    result, root, uri = searched
    out = tmp_path / "best"
    assert main(["export", "--dataset", DATASET, "--tracking-uri", uri, "--out", str(out)]) == 0
    for name in ("trial.yaml", "README.md", "export.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "peft/adapter_config.json", "peft/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    meta = json.loads((out / "export.json").read_text())
    best = mlflow_best(uri, result.parent_run_id)
    overall = min(best.values(), key=lambda r: (r.data.tags["melora.status"] != "completed", -r.data.metrics["score"],
                                                 -r.data.metrics.get("best_score", -1), r.info.start_time))
    assert meta["run_id"] == overall.info.run_id and meta["parent_run_id"] == result.parent_run_id

    # the native weights are the run's adapter artifact, byte for byte
    client = MlflowClient(uri)
    art = Path(client.download_artifacts(overall.info.run_id, "adapter", str(tmp_path / "dl")))
    assert (art / "adapter_model.safetensors").read_bytes() == (out / "adapter" / "adapter_model.safetensors").read_bytes()

    # PEFT reproduces the adapted model's logits
    torch.manual_seed(1)
    ids = torch.randint(0, 1000, (3, 12))
    ours = BertForSequenceClassification.from_pretrained(tiny_model).eval()
    load_adapter(ours, out / "adapter")
    base_logits = BertForSequenceClassification.from_pretrained(tiny_model).eval()(input_ids=ids).logits
    peft_model = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(tiny_model), out / "peft").eval()
    with torch.no_grad():
        expected = ours(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    assert (got - expected).abs().max().item() < 1e-5
    assert (expected - base_logits).abs().max().item() > 1e-6  # the adapter and head did change the model

    # trial.yaml is the trial's config, as `melora-tune train` takes it
    cfg = load_trial_config(out / "trial.yaml")
    p = overall.data.params
    assert cfg.adapter.method == p["method"] and cfg.adapter.r == int(p["r"]) and cfg.adapter.alpha == float(p["alpha"])
    assert cfg.adapter.n == (int(p["n"]) if "n" in p else 1)
    assert cfg.training.lr == pytest.approx(float(p["lr"]), rel=1e-5)
    trial_dir = Path(overall.data.tags["melora.best_checkpoint"]).parent
    assert cfg.training.lr == json.loads((trial_dir / "params.json").read_text())["lr"]  # exact, not MLflow's 6 digits
    assert cfg.model == str(tiny_model) and cfg.task.max_train_samples == 200 and cfg.training.epochs == 2
    prepared = prepare_trial(cfg)
    assert prepared.accounting["adapter_params"] == int(p["adapter_params"])
    assert prepared.accounting["equivalent_rank"] == int(p["equivalent_rank"])
    readme = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained" in readme and "melora-tune train trial.yaml" in readme and "load_adapter" in readme

    # training the exported YAML again reproduces the trial (same data, seed and steps: same losses on CPU)
    assert overall.data.tags["melora.status"] == "completed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run([sys.executable, "-m", "melora_tune.cli", "train", str(out / "trial.yaml"), "--storage-path",
                          str(tmp_path / "retrain"), "--num-cpus", "2", "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads(res.stdout.strip().splitlines()[-1])["metrics"]
    assert again["step"] == max(m.step for m in client.get_metric_history(overall.info.run_id, "score"))
    assert again["adapter_params"] == int(p["adapter_params"])
    assert again["score"] == pytest.approx(overall.data.metrics["score"], abs=1e-6)
    assert again["eval_loss"] == pytest.approx(overall.data.metrics["eval_loss"], rel=1e-4)
    assert again["train_loss"] == pytest.approx(overall.data.metrics["train_loss"], rel=1e-4)

    # --method picks that method's best; a non-empty folder is refused without --force, replaced with it
    capsys.readouterr()
    lora_out = tmp_path / "lora"
    assert main(["export", "--dataset", DATASET, "--method", "lora", "--tracking-uri", uri, "--out", str(lora_out)]) == 0
    assert json.loads((lora_out / "export.json").read_text())["run_id"] == best["lora"].info.run_id
    assert load_trial_config(lora_out / "trial.yaml").adapter.method == "lora"
    capsys.readouterr()
    assert main(["export", "--dataset", DATASET, "--method", "lora", "--tracking-uri", uri, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err
    assert json.loads((out / "export.json").read_text())["run_id"] == overall.info.run_id  # untouched
    assert main(["export", "--dataset", DATASET, "--method", "lora", "--tracking-uri", uri, "--out", str(out), "--force"]) == 0
    assert json.loads((out / "export.json").read_text())["run_id"] == best["lora"].info.run_id
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp or backup folder left
    assert main(["export", "--dataset", DATASET, "--method", "../lora", "--tracking-uri", uri, "--out", str(tmp_path / "x")]) == 2


@pytest.mark.slow
def test_mlflow_ui_lists_the_search_and_its_trials_in_a_browser(searched, tmp_path):
    from mlflow import MlflowClient
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    result, root, uri = searched
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(DATASET)
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    assert len(children) == len(result.trials)

    port = free_port()
    log = open(tmp_path / "ui.log", "w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "melora_tune.cli", "ui", "--tracking-uri", uri, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path)
    driver = None
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, proc)
        printed = (tmp_path / "ui.log").read_text()
        assert f"http://127.0.0.1:{port}" in printed
        runs_url = f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        assert runs_url in printed  # the link printed for the dataset opens its runs table
        driver = browser()
        wait = WebDriverWait(driver, 90)
        driver.get(runs_url)
        body = lambda: driver.find_element(By.TAG_NAME, "body").text  # noqa: E731
        wait.until(lambda d: result.name in body())
        # the search is one parent row; expanding it lists every trial, named method/n/r/lr
        expander = wait.until(lambda d: d.find_elements(
            By.CSS_SELECTOR, "[role=gridcell] button[data-component-id*='runnamecellrenderer']"))
        expander[0].click()
        names = {c.info.run_name for c in children}
        wait.until(lambda d: names <= set(body().splitlines()))
        links = {a.text: a.get_attribute("href") for a in driver.find_elements(By.CSS_SELECTOR, "[role=gridcell] a[href*='/runs/']")}
        assert links[result.name].endswith(f"/runs/{result.parent_run_id}")
        for child in children:
            name, p = child.info.run_name, child.data.params
            assert links[name].endswith(f"/runs/{child.info.run_id}")
            assert f"r={p['r']}" in name and "lr=" in name and (f"n={p.get('n')}" in name) == (p["method"] == "melora")
        driver.save_screenshot(str(tmp_path / "runs.png"))

        # a trial's page: its params n, r, lr, its metrics, and its parent
        best = mlflow_best(uri, result.parent_run_id)["melora"]
        driver.get(f"http://127.0.0.1:{port}/#/experiments/{exp.experiment_id}/runs/{best.info.run_id}")
        wait.until(lambda d: "Parameters" in body() and "Parent run" in body())
        wait.until(lambda d: "\nlr\n" in body())
        lines = body().splitlines()
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Parameters"))
        shown = dict(zip(lines[start + 3::2], lines[start + 4::2]))  # after "Parameters (k)", "Parameter", "Value"
        for key in ("method", "n", "r", "lr", "adapter_params"):
            assert shown.get(key) == best.data.params[key], (key, shown)
        assert "score" in lines and "eval_loss" in lines and result.name in lines
        # the data it saw: the dataset inputs (records.inputs), each split's name on the run's page
        wait.until(lambda d: f"{DATASET}/train" in body())  # the overview's Datasets row (the first, "+1" for the rest)
        assert f"{DATASET}/test" not in body()  # a search trial never sees the test split
        driver.save_screenshot(str(tmp_path / "trial.png"))
    finally:
        if driver is not None:
            driver.quit()
        stop_ui(proc, log)
    assert proc.returncode == 0, (tmp_path / "ui.log").read_text()[-2000:]
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
    assert "stopped" in (tmp_path / "ui.log").read_text()
