"""The report's confirmed results, baselines, imbalance warning and learning curves, read from a real MLflow store
(SQLite in tmp_path) filled the way a search and its confirm stage record them (tests/helpers.py)."""

from __future__ import annotations

import math

import pytest

from helpers import assert_self_contained, log_baselines, log_confirmation, log_search, log_trial, md_section, md_table_rows
from melora_tune.cli import main

DATASET = "sst2"

MELORA_A = {"method": "melora", "n": 4, "r": 1, "lr": 0.01, "alpha": 16, "adapter_params": 256, "equivalent_rank": 4}
MELORA_B = {"method": "melora", "n": 2, "r": 2, "lr": 0.003, "alpha": 16, "adapter_params": 512, "equivalent_rank": 4}
LORA_C = {"method": "lora", "r": 2, "lr": 0.01, "alpha": 16, "adapter_params": 512, "equivalent_rank": 2}
PROLORA_D = {"method": "prolora", "r": 4, "u": 1, "m": 2, "lr": 0.002, "alpha": 16, "adapter_params": 448, "equivalent_rank": 4}

# (config key, hp, {seed: (val, test)}): melora B validates worse than melora A but tests better, so the winner
# chosen on validation (A) is not the one a look at test would pick.
CONFIRMED = [
    ("cfg-a", MELORA_A, {0: (0.81, 0.78), 1: (0.82, 0.79), 2: (0.83, 0.80)}),
    ("cfg-b", MELORA_B, {0: (0.80, 0.85), 1: (0.80, 0.86), 2: (0.81, 0.87)}),
    ("cfg-c", LORA_C, {0: (0.79, 0.70), 1: (0.80, 0.72), 2: (0.78, 0.74)}),
    ("cfg-d", PROLORA_D, {0: (0.81, 0.77), 1: (0.815, 0.81), 2: (0.82, 0.79)}),
]


def t_half(values: list[float], level: float = 0.95) -> float:
    """Student-t half-width by hand: t_{(1+level)/2, n-1} * std(ddof=1) / sqrt(n)."""
    from scipy import stats as st

    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return st.t.ppf((1 + level) / 2, n - 1) * std / math.sqrt(n)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A search with six trials (one stopped early, one diverged), four confirmed configurations on seeds 0-2
    (lora's seed 3 failed), baselines on the parent run. Returns (uri, client, parent, trial run ids).
    Read-only for the tests: their reports are built with --no-log."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    client = MlflowClient(uri)
    exp_id, parent = log_search(client, DATASET, "s1", start_time=1_000)
    log_baselines(client, parent, {"majority": (0.55, 0.52), "probe": (0.65, 0.63)}, majority_share=0.55, score_metric="accuracy")
    t = 2_000
    trial_runs, trial_ids = {}, {}
    for i, (key, hp, scores, status) in enumerate([
        ("a", MELORA_A, [0.70, 0.78], "completed"), ("b", MELORA_B, [0.72, 0.80], "completed"),
        ("c", LORA_C, [0.71, 0.79], "completed"), ("d", PROLORA_D, [0.69, 0.785], "completed"),
        ("slow", {**LORA_C, "r": 1, "lr": 1e-5, "adapter_params": 256}, [0.50], "stopped_early"),
        ("nan", {**LORA_C, "lr": 0.09}, [], "diverged"),
    ]):
        trial_ids[key] = f"s1-{i}"
        trial_runs[key] = log_trial(client, exp_id, parent, hp, scores, status=status, trial_id=f"s1-{i}", optuna_trial=i,
                                    start_time=(t := t + 1))
    for key, hp, seeds in CONFIRMED:
        trial = key.removeprefix("cfg-")
        for seed, (val, test) in seeds.items():
            log_confirmation(client, exp_id, parent, trial_runs[trial], hp, config=key, seed=seed, val=val, test=test,
                             trial_id=trial_ids[trial], start_time=(t := t + 1))
    log_confirmation(client, exp_id, parent, trial_runs["c"], LORA_C, config="cfg-c", seed=3, val=None, test=None,
                     status="failed", trial_id=trial_ids["c"], start_time=(t := t + 1))
    return uri, client, parent, trial_runs


def _search(client, parent):
    from melora_tune.records import read

    return read.SearchInfo.from_run(client.get_run(parent), DATASET)


def test_trials_frame_leaves_confirmations_out_and_confirmations_frame_reads_them(store):
    from melora_tune.records import read

    uri, client, parent, trial_runs = store
    info = _search(client, parent)
    trials = read.trials_frame(client, info)
    assert sorted(trials["run_id"]) == sorted(trial_runs.values())  # 6 trials, none of the 13 confirmations
    conf = read.confirmations_frame(client, info)
    assert len(conf) == 13 and not set(conf["run_id"]) & set(trials["run_id"])
    a0 = conf[(conf["config"] == "cfg-a") & (conf["seed"] == 0)].iloc[0]
    assert a0["confirms"] == trial_runs["a"] and a0["confirms_trial"] == "s1-0" and a0["method"] == "melora"
    assert a0["n"] == 4 and a0["r"] == 1 and a0["lr"] == 0.01 and a0["adapter_params"] == 256
    assert a0["val_score"] == 0.81 and a0["test_score"] == 0.78 and a0["status"] == "completed"
    failed = conf[conf["status"] == "failed"].iloc[0]
    assert failed["seed"] == 3 and math.isnan(failed["val_score"]) and math.isnan(failed["test_score"])
    assert list(conf["start_time"]) == sorted(conf["start_time"])
    assert read.best_run(trials)["run_id"] == trial_runs["b"]  # the search's best trial, never a confirmation

    base = read.baselines_of(info)
    assert base.scores == {"majority": {"val": 0.55, "test": 0.52}, "probe": {"val": 0.65, "test": 0.63}}
    assert base.majority_share == 0.55 and base.score_metric == "accuracy" and base.logged
    old = read.baselines_of(read.SearchInfo("r", "s", "1", DATASET, "finished", "FINISHED", None, None))
    assert old.scores == {} and old.majority_share is None and old.score_metric == "score" and not old.logged


def test_winner_per_method_is_chosen_on_validation_and_numbers_are_the_t_interval(store):
    from melora_tune.records import read
    from melora_tune.report.confirmed import confirmed_table

    uri, client, parent, _ = store
    table = confirmed_table(read.confirmations_frame(client, _search(client, parent))).set_index("config")
    # melora: cfg-a validates 0.82 > cfg-b 0.8033, though cfg-b tests 0.86 > 0.79
    assert table.loc["cfg-b", "test_mean"] > table.loc["cfg-a", "test_mean"]
    assert table.loc["cfg-a", "winner"] and not table.loc["cfg-b", "winner"]
    assert table["winner"].sum() == 3 and table.loc["cfg-c", "winner"] and table.loc["cfg-d", "winner"]
    assert list(table.index) == ["cfg-a", "cfg-b", "cfg-d", "cfg-c"]  # methods by their winner's validation mean
    c = table.loc["cfg-c"]
    assert c["runs"] == 4 and c["seeds"] == 3  # the failed seed is not a seed
    assert c["test_mean"] == pytest.approx(0.72) and c["test_std"] == pytest.approx(0.02)
    assert c["test_hi"] - c["test_mean"] == pytest.approx(t_half([0.70, 0.72, 0.74])) == pytest.approx(0.0496828, abs=1e-6)
    assert c["val_mean"] == pytest.approx(0.79) and c["val_std"] == pytest.approx(0.01)
    assert table.loc["cfg-a", "configuration"] == "melora n=4 r=1 lr=1.0e-2"
    assert table.loc["cfg-d", "configuration"] == "prolora r=4 u=1 m=2 lr=2.0e-3"


def test_one_seed_has_no_interval_and_a_method_with_no_completed_seed_no_winner(store):
    from melora_tune.records import read
    from melora_tune.report.confirmed import confirmed_table

    uri, client, parent, _ = store
    conf = read.confirmations_frame(client, _search(client, parent))
    few = conf[((conf["config"] == "cfg-a") & (conf["seed"] == 0)) | (conf["config"] == "cfg-c") & (conf["status"] == "failed")]
    table = confirmed_table(few).set_index("config")
    a = table.loc["cfg-a"]
    assert a["winner"] and a["seeds"] == 1 and a["val_mean"] == 0.81 and math.isnan(a["val_std"]) and math.isnan(a["test_lo"])
    assert not table.loc["cfg-c", "winner"] and table.loc["cfg-c", "seeds"] == 0


def test_report_leads_with_the_confirmed_results(store, tmp_path, capsys):
    uri, client, parent, _ = store
    out = tmp_path / "report"
    assert main(["report", "--dataset", DATASET, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    printed = capsys.readouterr().out
    assert "  confirmed melora: melora n=4 r=1 lr=1.0e-2 test 0.7900 ± 0.0100 (3 seeds)" in printed
    assert "  MELoRA beats LoRA on test accuracy by 7.0 points" in printed
    md = (out / "report.md").read_text()
    head = md_table_rows(md_section(md, "Confirmed results (held-out test)"))
    rows = {r["method"]: r for r in head}
    assert [r["method"] for r in head] == ["MELoRA", "PRoLoRA", "LoRA", "majority class", "linear probe (frozen features)"]
    melora, lora = rows["MELoRA"], rows["LoRA"]
    assert melora["configuration"] == "melora n=4 r=1 lr=1.0e-2" and melora["adapter params"] == "256" and melora["seeds"] == "3"
    assert melora["validation (mean ± std)"] == "0.8200 ± 0.0100" and melora["test (mean ± std)"] == "0.7900 ± 0.0100"
    h = t_half([0.78, 0.79, 0.80])
    assert melora["test 95% CI"] == f"{0.79 - h:.4f} to {0.79 + h:.4f}" == "0.7652 to 0.8148"
    assert lora["seeds"] == "3 of 4" and lora["test (mean ± std)"] == "0.7200 ± 0.0200" and lora["test 95% CI"] == "0.6703 to 0.7697"
    majority = rows["majority class"]
    assert majority["validation (mean ± std)"] == "0.5500" and majority["test (mean ± std)"] == "0.5200" and majority["seeds"] == ""

    wins = md_section(md, "Which method wins on this dataset")
    # melora - lora: d = 0.08, 0.07, 0.06: 7.0 points, half-width 4.3027 * 0.01 / sqrt(3) = 2.48 points
    assert ("MELoRA beats LoRA on test accuracy by 7.0 points (95% CI 4.5 to 9.5 over 3 paired seeds): "
            "the interval excludes zero.") in wins
    # melora - prolora: d = 0.01, -0.02, 0.01
    assert "MELoRA and PRoLoRA cannot be told apart on test accuracy: the 95% CI of MELoRA minus PRoLoRA (" in wins
    assert ") includes zero." in wins
    assert "PRoLoRA beats LoRA on test accuracy by 7.0 points" in wins

    every = md_table_rows(md_section(md, "Every confirmed configuration"))
    assert [r["config key"] for r in every] == ["cfg-a", "cfg-b", "cfg-d", "cfg-c"]
    assert [r["confirmed winner"] for r in every] == ["yes", "", "yes", "yes"]
    assert every[1]["test (mean ± std)"] == "0.8600 ± 0.0100" and every[1]["search trial"] == "s1-1"

    assert "## Best configuration per method" in md and "## Top 10 trials" in md  # the search's tables stay
    assert "- **score metric**: accuracy" in md and "13 runs of 4 configurations, 12 completed" in md
    assert "No confirmation ran" not in md and "mostly measures the majority class" not in md
    assert (out / "confirmations.csv").is_file() and (out / "learning_curves.png").is_file()
    assert "![Learning curves](learning_curves.png)" in md

    page = (out / "report.html").read_text()
    # frontier, heatmap, lr sensitivity, learning curves (no study here), confirmed frontier, lr curves per method
    assert assert_self_contained(page) == 6
    assert "<h2>Which method wins on this dataset</h2>" in page and "MELoRA beats LoRA on test accuracy by 7.0 points" in page
    assert "<td>0.8200 ± 0.0100</td>" in page and "<h2>Every confirmed configuration</h2>" in page


def test_report_without_confirmations_says_how_to_run_them(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id, parent = log_search(client, DATASET, "plain")
    log_trial(client, exp_id, parent, LORA_C, [0.7, 0.75])
    out = tmp_path / "r"
    assert main(["report", "--dataset", DATASET, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    assert "not confirmed yet: melora-tune confirm SPACE.yaml" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    section = md_section(md, "Confirmed results (held-out test)").strip()
    assert section.count("\n") == 0 and "No confirmation ran for this search" in section
    assert "`melora-tune confirm SPACE.yaml`" in section
    assert "Which method wins" not in md and "Every confirmed configuration" not in md and "score metric" not in md
    assert "## Best configuration per method" in md and not (out / "confirmations.csv").exists()
    assert "<code>melora-tune confirm SPACE.yaml</code>" in (out / "report.html").read_text()


@pytest.mark.parametrize("share, metric, warned", [(0.8, "accuracy", True), (0.7, "accuracy", True), (0.69, "accuracy", False),
                                                   (0.8, "f1", False)])
def test_imbalance_warning(tmp_path, share, metric, warned):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp_id, parent = log_search(client, DATASET, "imb")
    log_baselines(client, parent, {"majority": (share, share - 0.01)}, majority_share=share, score_metric=metric)
    log_trial(client, exp_id, parent, LORA_C, [share, share])
    out = tmp_path / "r"
    assert main(["report", "--dataset", DATASET, "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    md = (out / "report.md").read_text()
    assert ("accuracy mostly measures the majority class" in md) is warned
    if warned:
        assert "`task.metric: f1`" in md and "matthews_correlation" in md and f"{share:.0%}" in md
    # no confirmation, but the baselines are on the parent: shown with the one-line hint
    assert "| majority class | baseline |" in md


def test_learning_curves_data_and_plot(store, tmp_path):
    from melora_tune.records import read
    from melora_tune.report import plots

    uri, client, parent, trial_runs = store
    trials = read.trials_frame(client, _search(client, parent))
    curves = read.curves_frame(client, trials)
    points = curves.groupby("run_id").size()
    assert points[trial_runs["a"]] == 2 and points[trial_runs["slow"]] == 1  # stopped early: shorter
    assert trial_runs["nan"] not in points.index  # diverged before its first evaluation
    a = curves[curves["run_id"] == trial_runs["a"]]
    assert list(a["epoch"]) == [1.0, 2.0] and list(a["score"]) == [0.70, 0.78] and list(a["step"]) == [10, 20]
    assert set(curves.loc[curves["run_id"] == trial_runs["slow"], "status"]) == {"stopped_early"}

    path = plots.learning_curves(curves, tmp_path / "lc.png", baselines={"majority": 0.55, "probe": 0.65})
    assert path.read_bytes()[:4] == b"\x89PNG" and path.stat().st_size > 1000
    again = plots.learning_curves(curves, tmp_path / "lc2.png", baselines={"majority": 0.55, "probe": 0.65})
    assert again.read_bytes() == path.read_bytes()  # deterministic
    assert plots.learning_curves(curves.iloc[0:0], tmp_path / "none.png") is None
    assert plots.frontier(trials, tmp_path / "f.png", 512, baselines={"majority": 0.55}) is not None
    assert plots.lr_sensitivity(trials, tmp_path / "l.png", baselines={"probe": 0.65}) is not None
