"""The parameter-efficiency frontier read from a real MLflow store (SQLite in tmp_path) filled the way a search over
cells (a method at a budget level) and its confirm stage record them: per-cell winners, comparisons within and
across levels, the effort per cell, the warnings, frontier.csv/json, parameter importance per cell's Optuna study,
and ``export --budget``."""

from __future__ import annotations

import json
import math

import pytest

from helpers import log_baselines, log_confirmation, log_search, log_trial, md_section, md_table_rows
from melora_tune.cli import main

DATASET = "sst2"
LEVELS = (512, 2048)
SEEDS = (1, 2, 3)
INFEASIBLE = "dora@512: the smallest dora configuration needs 600 parameters; min_fraction 0.5 leaves 256..512"


def hp(method: str, budget: int, lr: float, params: int, **extra) -> dict:
    return {"method": method, **extra, "lr": lr, "alpha": 16, "adapter_params": params, "budget": budget}


# (cell, trial key, hp, search scores, status, duration s)
TRIALS = [
    ("melora@512", "m512", hp("melora", 512, 3e-3, 512, n=2, r=2), [0.71, 0.80], "completed", 30),
    ("melora@512", "m512b", hp("melora", 512, 1e-3, 512, n=4, r=1), [0.70, 0.78], "completed", 30),
    ("lora@512", "l512", hp("lora", 512, 1e-2, 512, r=1), [0.70, 0.79], "completed", 20),  # best lr at the upper edge
    ("lora@512", "l512b", hp("lora", 512, 1e-3, 512, r=1), [0.60, 0.70], "completed", 20),
    ("melora@2048", "m2048", hp("melora", 2048, 2e-3, 2048, n=4, r=2), [0.72, 0.81], "completed", 40),
    ("melora@2048", "m2048b", hp("melora", 2048, 1e-3, 1536, n=2, r=3), [0.60], "stopped_early", 10),
    ("lora@2048", "l2048", hp("lora", 2048, 2e-3, 1536, r=3), [0.72, 0.82], "completed", 35),
    ("lora@2048", "l2048b", hp("lora", 2048, 5e-4, 2048, r=4), [0.70, 0.75], "completed", 35),
]
# (config key, trial key, {seed: (val, test)}, flat: the last epoch gains nothing)
CONFIRMED = [
    ("m512", "m512", {1: (0.80, 0.80), 2: (0.80, 0.81), 3: (0.81, 0.82)}, True),
    ("m512b", "m512b", {1: (0.78, 0.90), 2: (0.79, 0.91), 3: (0.78, 0.92)}, True),  # better on test, worse on validation
    ("l512", "l512", {1: (0.78, 0.74), 2: (0.79, 0.75), 3: (0.78, 0.76)}, True),
    ("m2048", "m2048", {1: (0.81, 0.81), 2: (0.82, 0.83), 3: (0.81, 0.82)}, True),
    ("l2048", "l2048", {1: (0.80, 0.79), 2: (0.83, 0.825), 3: (0.81, 0.83)}, False),  # still rising
]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two methods x two levels, two trials per cell, dora@512 infeasible; confirmed on seeds 1-3. Returns
    (uri, client, parent, {trial key: run id}, {config key: {seed: run id}})."""
    import optuna
    from mlflow import MlflowClient

    from melora_tune.records import CELL_TAG

    root = tmp_path_factory.mktemp("frontier")
    uri = f"sqlite:///{root}/mlflow.db"
    storage = f"sqlite:///{root}/optuna.db"
    client = MlflowClient(uri)
    exp_id, parent = log_search(client, DATASET, "f1", start_time=1_000, params={
        "budget": 2048, "budget_levels": "512,2048", "trials_per_cell": 2, "methods": "melora,lora,dora",
        "cells": "melora@512,lora@512,melora@2048,lora@2048", "infeasible_cells": INFEASIBLE,
        "lr_low": 1e-4, "lr_high": 1e-2, "lr_log": True, "study_name": "f1", "optuna_storage": storage})
    log_baselines(client, parent, {"majority": (0.55, 0.52), "probe": (0.65, 0.63)}, majority_share=0.55,
                  score_metric="accuracy")
    t = 2_000
    trial_runs = {}
    for i, (cell, key, params, scores, status, seconds) in enumerate(TRIALS):
        t += 100_000
        run = log_trial(client, exp_id, parent, params, scores, status=status, trial_id=f"f1-{i}", optuna_trial=i,
                        start_time=t)
        client.set_tag(run, CELL_TAG, cell)
        client.set_terminated(run, status="FINISHED", end_time=t + seconds * 1000)
        trial_runs[key] = run
    seed_runs = {}
    params = {key: p for _, key, p, *_ in TRIALS}
    cells = {key: cell for cell, key, *_ in TRIALS}
    for config, trial, seeds, flat in CONFIRMED:
        for seed, (val, test) in seeds.items():
            run = log_confirmation(client, exp_id, parent, trial_runs[trial], params[trial], config=config, seed=seed,
                                   val=val, test=test, trial_id=f"f1-{trial}", start_time=(t := t + 1))
            client.set_tag(run, CELL_TAG, cells[trial])
            if flat:
                client.log_metric(run, "score", val, step=30)
            seed_runs.setdefault(config, {})[seed] = run
    # one Optuna study per cell, as the search keeps them: <study_name>.<method>@<level>
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for cell in ("melora@512", "lora@512", "melora@2048", "lora@2048"):
        study = optuna.create_study(study_name=f"f1.{cell}", storage=storage, direction="maximize")
        for j in range(4):
            lr = 10 ** (-4 + j * 0.6)
            study.add_trial(optuna.trial.create_trial(
                params={"lr": lr, "dropout": 0.1 * (j % 2)}, value=0.7 + 0.02 * j,
                distributions={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
                               "dropout": optuna.distributions.FloatDistribution(0.0, 0.2)}))
    return uri, client, parent, trial_runs, seed_runs


def _search(client, parent):
    from melora_tune.records import read

    return read.SearchInfo.from_run(client.get_run(parent), DATASET)


def test_records_carry_the_cells(store):
    from melora_tune.records import read

    uri, client, parent, trial_runs, _ = store
    info = _search(client, parent)
    assert read.levels_of(info) == [512, 2048]
    assert read.infeasible_of(info) == {("dora", 512): INFEASIBLE.split(": ", 1)[1]}
    trials = read.trials_frame(client, info).set_index("run_id")
    assert trials.loc[trial_runs["l2048"], "budget"] == 2048 and trials.loc[trial_runs["l2048"], "cell"] == "lora@2048"
    best = read.best_per_cell(trials.reset_index())
    assert sorted(best["cell"]) == ["lora@2048", "lora@512", "melora@2048", "melora@512"]
    assert read.best_run(trials.reset_index(), "lora", 2048)["run_id"] == trial_runs["l2048"]
    conf = read.confirmations_frame(client, info)
    assert set(conf["budget"]) == {512, 2048} and set(conf["cell"]) == {"melora@512", "lora@512", "melora@2048", "lora@2048"}


def test_one_winner_per_cell_chosen_on_validation_and_comparisons_stay_within_a_level(store):
    from melora_tune.records import read
    from melora_tune.records.winners import confirmed_winners
    from melora_tune.report.confirmed import confirmed_results

    uri, client, parent, _, seed_runs = store
    conf = read.confirmations_frame(client, _search(client, parent))
    winners = {(w["method"], w["budget"]): w for w in confirmed_winners(conf)}
    assert {k: w["config"] for k, w in winners.items()} == {
        ("melora", 512): "m512", ("lora", 512): "l512", ("melora", 2048): "m2048", ("lora", 2048): "l2048"}
    assert winners[("lora", 2048)]["run"]["run_id"] == seed_runs["l2048"][2]  # its best seed on validation
    results = confirmed_results(conf, read.baselines_of(_search(client, parent)))
    assert [(c.method_a, c.method_b, c.budget) for c in results.comparisons] == [("melora", "lora", 512),
                                                                                  ("melora", "lora", 2048)]
    assert results.comparisons[0].sentence.startswith("At budget level 512: MELoRA beats LoRA on test accuracy by 6.0 points")
    assert "cannot be told apart" in results.comparisons[1].sentence


def test_report_frontier_table_sentences_effort_warnings_and_files(store, tmp_path):
    uri, client, parent, _, _ = store
    out = tmp_path / "report"
    assert main(["report", "--dataset", DATASET, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    md = (out / "report.md").read_text()

    table = md_table_rows(md_section(md, "Method x budget: confirmed test score"))
    assert [r["method"] for r in table] == ["MELoRA", "LoRA", "DoRA"]
    assert table[0]["512 (test, 95% CI)"].startswith("0.8100 [0.7852, 0.8348], 512 params, 3 seeds")
    assert table[1]["2,048 (test, 95% CI)"].startswith("0.8150 [") and "1,536 params" in table[1]["2,048 (test, 95% CI)"]
    assert table[2]["512 (test, 95% CI)"] == "infeasible" and table[2]["2,048 (test, 95% CI)"] == ""

    across = md_section(md, "Comparisons within and across budget levels")
    assert ("MELoRA at 512 parameters cannot be told apart from LoRA at 1,536 (3x the parameters) on test accuracy: "
            "difference -0.5 points, 95% CI [") in across
    assert "MELoRA at 512 is within the CI of LoRA at 1,536." in across
    assert ("MELoRA at 2,048 parameters beats LoRA at 512 on test accuracy by 7.0 points (95% CI [4.5, 9.5] points over "
            "3 paired seeds): the larger adapter pays off.") in across

    effort = {r["cell"]: r for r in md_table_rows(md_section(md, "Effort per cell"))}
    assert effort["melora@2048"]["trials"] == "2" and effort["melora@2048"]["stopped early"] == "1"
    assert effort["melora@2048"]["epochs trained"] == "3" and effort["melora@2048"]["compute s"] == "50"
    assert effort["dora@512"]["status"].startswith("infeasible: the smallest dora configuration needs 600")

    warns = md_section(md, "Warnings: what would change the comparison")
    assert "lora@512: the best learning rate 1.00e-02 sits at the upper edge of the searched range" in warns
    assert "raise lr_high" in warns and "melora@512: the best learning rate" not in warns
    assert "The confirmed winners of lora@2048 (+0.02 over the last epoch) were still improving" in warns
    assert "raise training.epochs" in warns and "melora@2048 (+" not in warns
    assert "dora@512 has no feasible configuration" in warns
    assert "not tuned alike" not in warns and "linear probe" not in warns  # 2 trials each; every cell beats the probe

    for name in ("frontier_confirmed.png", "lr_curves.png", "frontier.csv", "frontier.json"):
        assert (out / name).stat().st_size > 0
    assert "![Parameter-efficiency frontier (confirmed, test)](frontier_confirmed.png)" in md

    import pandas as pd

    rows = pd.read_csv(out / "frontier.csv").set_index("cell")
    assert list(rows.index) == ["melora@512", "melora@2048", "lora@512", "lora@2048", "dora@512"]
    lora = rows.loc["lora@2048"]
    assert (lora["method"], lora["budget"], lora["adapter_params"], lora["seeds"]) == ("lora", 2048, 1536, 3)
    assert lora["test_mean"] == pytest.approx(0.815) and lora["val_mean"] == pytest.approx(0.8133333)
    assert lora["test_hi"] - lora["test_mean"] == pytest.approx(lora["test_mean"] - lora["test_lo"]) and lora["test_lo"] < 0.8
    assert (lora["trials"], lora["epochs"], lora["compute_s"]) == (2, 4, 70)
    assert rows.loc["dora@512", "status"] == "infeasible" and math.isnan(rows.loc["dora@512", "test_mean"])

    data = json.loads((out / "frontier.json").read_text())
    assert data["levels"] == [512, 2048] and data["metric"] == "accuracy" and len(data["cells"]) == 5
    assert data["cells"][0]["cell"] == "melora@512" and data["cells"][0]["test_mean"] == pytest.approx(0.81)
    assert data["cells"][4]["test_mean"] is None
    assert {d["verdict"] for d in data["across_levels_data"]} == {"cannot be told apart", "larger wins"}
    assert len(data["within_level"]) == 2 and data["warnings"]

    imp = md_section(md, "Parameter importance (Optuna, fANOVA)")
    assert "- melora@512: " in imp and "- lora@2048: " in imp  # one scope per cell's study


def test_no_cell_beats_the_probe_and_unequal_effort_are_warned(store):
    from melora_tune.records import read
    from melora_tune.report.confirmed import confirmed_results
    from melora_tune.report.frontier import build_frontier

    uri, client, parent, trial_runs, _ = store
    info = _search(client, parent)
    trials = read.trials_frame(client, info)
    conf = read.confirmations_frame(client, info)
    strong = read.Baselines({"probe": {"val": 0.85, "test": 0.95}}, 0.55, "accuracy")
    front = build_frontier(info, trials[trials["run_id"] != trial_runs["l512b"]], conf, confirmed_results(conf, strong),
                           strong)
    text = "\n".join(front.warnings)
    assert "No cell beats the linear probe on frozen features (test 0.9500; best cell melora@2048 0.8200)" in text
    assert "The cells were not tuned alike (melora@512 2, melora@2048 2, lora@512 1, lora@2048 2 trials)" in text
    unconfirmed = build_frontier(info, trials, conf.iloc[0:0], None, strong)
    assert "No cell's best trial beats the linear probe" in "\n".join(unconfirmed.warnings)
    assert [c["status"] for c in unconfirmed.cells][:4] == ["searched"] * 4
    assert "melora@512 was searched but has no confirmed winner" in "\n".join(unconfirmed.warnings)


@pytest.mark.parametrize("args, config", [(["--budget", "2048", "--method", "lora"], "l2048"),
                                          (["--budget", "512"], "m512"), (["--budget", "2048"], "m2048")])
def test_export_budget_picks_the_cells_winner(store, tmp_path, capsys, args, config):
    """No adapter artifact in these records: the export names the run it chose, then stops, leaving nothing."""
    uri, client, parent, _, seed_runs = store
    out = tmp_path / "e"
    assert main(["export", "--dataset", DATASET, "--tracking-uri", uri, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    best_seed = {"l2048": 2, "m512": 3, "m2048": 2}[config]  # the winner's best seed on validation
    assert f"(MLflow run {seed_runs[config][best_seed]}) has no adapter artifact" in err
    assert not out.exists() and not list(tmp_path.glob(".e.export-*"))


def test_export_budget_naming_no_level_is_refused(store, tmp_path, capsys):
    uri, *_ = store
    out = tmp_path / "e"
    assert main(["export", "--dataset", DATASET, "--tracking-uri", uri, "--out", str(out), "--budget", "1024"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--budget 1024: search f1 has no such budget level (its levels: 512, 2048)" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert main(["export", "--dataset", DATASET, "--alias", "lora-b512", "--budget", "512", "--out", str(out)]) == 2
    assert "leave out --method and --search (and --budget)" in capsys.readouterr().err


def test_confirmation_plan_is_the_top_k_of_each_cell_on_shared_seeds(store):
    from melora_tune.records import read
    from melora_tune.search.confirm import plan
    from melora_tune.search.schema import parse_space

    uri, client, parent, trial_runs, _ = store
    space = parse_space({
        "name": "f", "model": "minilm", "task": {"name": "rotten_tomatoes"}, "methods": ["melora", "lora"],
        "budget": {"max_params": 2048, "min_fraction": 0.25}, "space": {"lr": {"low": 1e-4, "high": 1e-2}},
        "training": {"epochs": 2, "seed": 10}, "num_samples": 8, "confirm": {"top_k": 1, "seeds": 2},
    }, source="test")
    planned = plan(space, read.trials_frame(client, _search(client, parent)))
    assert [(p.cell, p.confirms, p.seed) for p in planned] == [
        (cell, trial_runs[key], seed) for cell, key in (("melora@512", "m512"), ("melora@2048", "m2048"),
                                                        ("lora@512", "l512"), ("lora@2048", "l2048")) for seed in (11, 12)]
    assert {p.budget for p in planned} == {512, 2048} and planned[0].config_key == "melora n=2 r=2 lr=3.0e-3 @512"
    assert planned[0].tune_config()["budget"] == 512  # what the confirmation's run records as its cell
    two = plan(space, read.trials_frame(client, _search(client, parent)), top_k=2)
    assert sum(p.cell == "melora@2048" for p in two) == 2 * 2  # its stopped-early trial is its second best


def test_best_per_method_table_shows_cells_when_there_are_several_levels(store, tmp_path):
    uri, *_ = store
    out = tmp_path / "report"
    assert main(["report", "--dataset", DATASET, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    best = md_table_rows(md_section((out / "report.md").read_text(), "Best configuration per method"))
    # the search's ranking (final validation score), one row per cell
    assert [(r["method"], r["cell"]) for r in best] == [("lora", "lora@2048"), ("melora", "melora@2048"),
                                                        ("melora", "melora@512"), ("lora", "lora@512")]
