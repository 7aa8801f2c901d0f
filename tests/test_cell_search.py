"""The cell searcher and scheduler without a cluster: Optuna in SQLite, Ray Tune's real ASHA, stub Trials (what
Tune hands a scheduler), as the replay drives them. The real-stack version is tests/test_cells.py."""

from __future__ import annotations

from collections import Counter

import pytest
from helpers import tiny_bert_config
from ray.tune.experiment import Trial
from ray.tune.search import Searcher

from melora_tune.search.cell_search import CellScheduler, CellSearcher
from melora_tune.search.cells import cell_label, cell_study_name, cell_studies, split_shares
from melora_tune.search.experiment import with_shares
from melora_tune.search.schedulers import make_scheduler
from melora_tune.search.schema import parse_space
from melora_tune.search.searcher import BudgetOptunaSearch
from melora_tune.search.space import build_space


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert_config(num_labels=2).save_pretrained(path)
    return path


def space(model_dir, **over):
    # tiny BERT: 384 params per unit of r; levels 384 (r=1) and 768 (r=2)
    data = {
        "name": "c", "model": str(model_dir), "task": {"name": "rotten_tomatoes", "max_train_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        "budget": {"levels": [384, 768]}, "methods": ["melora", "lora"],
        "space": {"lr": {"low": 1e-4, "high": 1e-2}, "n": [2, 4]}, "training": {"epochs": 2},
        "trials_per_cell": 3, "seed": 0,
    }
    data.update(over)
    return parse_space(data)


def searcher(sp, fs, shares, storage, study="s"):
    subs = {cell_label(m, level): BudgetOptunaSearch(cell, storage=storage, study_name=cell_study_name(study, m, level),
                                                     seed=0, n_startup_trials=2, max_t=2, sampler=sp.sampler)
            for (m, level), cell in fs.cells.items()}
    return CellSearcher(subs, shares, metric="score", mode="max")


def test_round_robin_gives_every_cell_its_share_and_only_its_own_configurations(tiny_model_dir, tmp_path):
    sp = space(tiny_model_dir)
    fs = build_space(sp)
    sp, shares = with_shares(sp, fs)
    assert shares == {"melora@384": 3, "lora@384": 3, "melora@768": 3, "lora@768": 3} and sp.num_samples == 12
    storage = f"sqlite:///{tmp_path}/o.db"
    s = searcher(sp, fs, shares, storage)
    order = []
    for i in range(12):
        config = s.suggest(f"t{i}")
        order.append(config["cell"])
        assert config["cell"] == f"{config['method']}@{config['budget']}"
        assert config["budget"] // 2 < config["adapter_params"] <= config["budget"]
        s.on_trial_complete(f"t{i}", {"score": 0.5, "step": 2, "epoch": 2.0, "status": "completed"})
    # one round over the cells at a time, in a fixed order: levels ascending, then the space's method order
    assert order == ["melora@384", "lora@384", "melora@768", "lora@768"] * 3
    assert s.suggest("t12") == Searcher.FINISHED
    studies = cell_studies("s", storage)
    assert {cell: len(st.trials) for cell, st in studies.items()} == shares
    assert all({t.params["method"] for t in st.trials} == {cell.split("@")[0]} for cell, st in studies.items())


def test_a_snapshot_restores_the_shares(tiny_model_dir, tmp_path):
    sp = space(tiny_model_dir)
    fs = build_space(sp)
    sp, shares = with_shares(sp, fs)
    s = searcher(sp, fs, shares, f"sqlite:///{tmp_path}/o.db")
    for i in range(5):
        s.suggest(f"t{i}")
    s.save(str(tmp_path / "snap.pkl"))
    fresh = searcher(sp, fs, shares, f"sqlite:///{tmp_path}/o.db", study="other")
    fresh.restore(str(tmp_path / "snap.pkl"))
    assert fresh.counts == {"melora@384": 2, "lora@384": 1, "melora@768": 1, "lora@768": 1}
    assert fresh.suggest("t5")["cell"] == "lora@384"  # the next in turn, as the unkilled search would ask


def test_a_finished_finite_cell_leaves_the_others_running(tiny_model_dir, tmp_path):
    # lora@384 holds one configuration (r=1) x 2 learning rates: its grid ends before its share of 3
    sp = space(tiny_model_dir, space={"lr_choices": [1e-3, 1e-2], "n": [2, 4]}, sampler="random")
    fs = build_space(sp)
    sp, shares = with_shares(sp, fs)
    s = searcher(sp, fs, shares, f"sqlite:///{tmp_path}/o.db")
    got = []
    for i in range(12):
        config = s.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        got.append((config["cell"], config.get("n"), config["lr"]))
        s.on_trial_complete(f"t{i}", {"score": 0.5, "step": 2, "epoch": 2.0, "status": "completed"})
    counts = Counter(cell for cell, _, _ in got)
    assert counts == {"melora@384": 3, "lora@384": 2, "melora@768": 3, "lora@768": 2}
    assert len(got) == len(set(got))  # nothing ran twice


def test_split_shares_refuses_what_does_not_divide():
    assert split_shares(6, ["a", "b"], None) == {"a": 3, "b": 3}
    assert split_shares(99, ["a", "b"], 4) == {"a": 4, "b": 4}
    with pytest.raises(ValueError, match="num_samples=7 does not split evenly over the 2 cells"):
        split_shares(7, ["a", "b"], None)


def test_asha_stops_a_trial_only_against_its_own_cell(tiny_model_dir, tmp_path):
    """Two cells: melora's trials score 0.9 at the first rung, lora's 0.5 and 0.4. One ASHA over both would stop
    lora's trials (below melora's rung); per cell, lora's 0.4 is compared with lora's 0.5 only."""
    import json

    sp = space(tiny_model_dir, budget={"max_params": 768, "min_fraction": 0.5})
    sched = CellScheduler(lambda: make_scheduler(sp), ["melora@768", "lora@768"], rungs_path=tmp_path / "rungs.jsonl")
    sched.set_search_properties("score", "max")
    trials = {}
    for tid, cell in [("m1", "melora@768"), ("m2", "melora@768"), ("l1", "lora@768"), ("l2", "lora@768")]:
        trials[tid] = Trial("x", config={"cell": cell}, trial_id=tid, stub=True)
        sched.on_trial_add(None, trials[tid])
    decisions = {}
    for tid, score in [("m1", 0.9), ("m2", 0.9), ("l1", 0.5), ("l2", 0.4)]:
        decisions[tid] = sched.on_trial_result(None, trials[tid], {"score": score, "epoch": 1, "training_iteration": 1})
    assert decisions["l1"] == "CONTINUE"  # the first of its cell at the rung: nothing to be behind
    assert decisions["l2"] == "STOP"  # behind lora's 0.5, not melora's 0.9
    lines = [json.loads(x) for x in (tmp_path / "rungs.jsonl").read_text().splitlines()]
    for line in lines:
        assert {trials[p].config["cell"] for p in line["peers"]} == {line["cell"]}
    assert [(x["trial_id"], x["decision"]) for x in lines] == [("m1", "CONTINUE"), ("m2", "CONTINUE"),
                                                                 ("l1", "CONTINUE"), ("l2", "STOP")]


def test_warm_start_enqueues_each_cells_best_from_the_same_method_of_an_earlier_search(tiny_model_dir, tmp_path):
    """An earlier search (its record under the storage path and its per-cell studies in SQLite, written by the
    real searcher) starts a new search's cells: each cell gets its own method's best completed configurations,
    the nearest level's when its own is missing, and never another method's."""
    from melora_tune.search.experiment import prepare_search
    from melora_tune.search.searcher import WARM_ATTR

    runs, storage, sampled = _earlier_search(tiny_model_dir, tmp_path)
    new = space(tiny_model_dir, name="new", warm_start=["old"], storage_path=str(runs),
                tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", trials_per_cell=3)
    prep = prepare_search(new)
    assert set(prep.warm) == {"melora@384", "lora@384", "melora@768", "lora@768"}
    for label, points in prep.warm.items():
        method, level = label.split("@")
        best_score, best = max(sampled[f"{method}@768"], key=lambda x: x[0])
        assert len(points) == 1 and points[0]["value"] == best_score  # share 3 // 3 = 1 configuration
        assert points[0]["from"].startswith(f"old-1:{method}@768#")  # its own method, the nearest level
        assert points[0]["params"]["method"] == method and points[0]["params"]["lr"] == best["lr"]
        if level == "384":  # the earlier level's rank (r=2) does not fit r=1: left to the sampler, the lr kept
            assert not any(k.endswith(".r") or ".r|" in k for k in points[0]["params"])
    sub = BudgetOptunaSearch(prep.feasible.cells[("melora", 768)], storage=storage, study_name="new-1.melora@768",
                             seed=0, max_t=2, warm=prep.warm["melora@768"])
    first = sub.suggest("w0")
    assert first["lr"] == prep.warm["melora@768"][0]["params"]["lr"] and first["n"] == sampled_best_n(sampled)
    assert sub._ot_trials["w0"].user_attrs[WARM_ATTR] == prep.warm["melora@768"][0]["from"]


def _earlier_search(tiny_model_dir, tmp_path):
    """An earlier search at one level (768), lora and melora, 3 trials each with known scores: its record under the
    storage path and its per-cell studies in SQLite, written by the real searcher."""
    import json

    runs = tmp_path / "runs"
    storage = f"sqlite:///{runs}/optuna.db"
    runs.mkdir()
    old = space(tiny_model_dir, name="old", budget={"max_params": 768, "min_fraction": 0.75}, trials_per_cell=3)
    fs = build_space(old)
    old, shares = with_shares(old, fs)
    s = searcher(old, fs, shares, storage, study="old-1")
    scores = iter([0.61, 0.70, 0.80, 0.55, 0.66, 0.90])
    sampled = {}
    for i in range(6):
        config = s.suggest(f"t{i}")
        score = next(scores)
        sampled.setdefault(config["cell"], []).append((score, config))
        s.on_trial_complete(f"t{i}", {"score": score, "step": 2, "epoch": 2.0, "status": "completed"})
    (runs / "old-1").mkdir()
    (runs / "old-1" / "melora_search.json").write_text(json.dumps({"study_name": "old-1", "optuna_storage": storage}))
    return runs, storage, sampled


def test_warm_start_adds_the_earlier_curve_once_shifted_at_its_best_point(tiny_model_dir, tmp_path):
    """The earlier search's learning-rate curve: every completed configuration of the cell's method that the cell
    can run whole joins the cell's study once the best one (enqueued first) has been trained here, each score
    shifted by (its score here - its score there); never handed out as a trial, never added twice."""
    from optuna.trial import TrialState

    from melora_tune.search.experiment import prepare_search
    from melora_tune.search.warm_start import PRIOR_ATTR

    runs, storage, sampled = _earlier_search(tiny_model_dir, tmp_path)
    new = space(tiny_model_dir, name="new", warm_start=["old"], storage_path=str(runs),
                tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", trials_per_cell=3)
    prep = prepare_search(new)
    earlier = {round(cfg["lr"], 12): score for score, cfg in sampled["melora@768"]}
    prior = prep.priors["melora@768"]
    assert prior["anchor"] == prep.warm["melora@768"][0]["from"] and prior["anchor_value"] == max(earlier.values())
    assert sorted(t["value"] for t in prior["trials"]) == sorted(earlier.values())
    assert prep.priors["melora@384"]["trials"] == []  # r=2 does not fit the 384 level: no whole configuration

    cell, study = prep.feasible.cells[("melora", 768)], "new-1.melora@768"
    sub = BudgetOptunaSearch(cell, storage=storage, study_name=study, seed=0, n_startup_trials=2, max_t=2,
                             warm=prep.warm["melora@768"], prior=prior)
    sub.suggest("w0")  # the anchor: the earlier best, trained here
    sub.on_trial_complete("w0", {"score": 0.5, "step": 2, "epoch": 2.0, "status": "completed"})
    shift = 0.5 - max(earlier.values())
    added = [t for t in sub._ot_study.get_trials() if PRIOR_ATTR in t.user_attrs]
    assert len(added) == 3 and all(t.state == TrialState.COMPLETE and set(t.constraints) == {"budget"}
                                   and t.constraints["budget"] <= 0 for t in added)  # as every trial of the cell
    assert {round(t.params["lr"], 12): t.value for t in added} == pytest.approx(
        {lr: v + shift for lr, v in earlier.items()})
    assert sub.orphans() == []  # not the trials of an interrupted run: nothing re-runs them
    second = sub.suggest("w1")
    assert second["optuna_trial"] == 4  # a new trial (0: the anchor, 1-3: the curve), proposed with the curve
    again = BudgetOptunaSearch(cell, storage=storage, study_name=study, seed=0, max_t=2, warm=prep.warm["melora@768"],
                               prior=prior)  # a resumed search: its anchor's completion adds nothing again
    again._add_prior(0.9)
    assert len([t for t in again._ot_study.get_trials() if PRIOR_ATTR in t.user_attrs]) == 3


def sampled_best_n(sampled):
    return max(sampled["melora@768"], key=lambda x: x[0])[1]["n"]
