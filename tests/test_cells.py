"""Cells on the real stack: a 2-method x 2-level search on local Ray (Tune + Optuna + ASHA), DeepSpeed ZeRO-2 and
SQLite MLflow, with a tiny random BERT and real rotten_tomatoes sentences. No mocks.

What a user relies on: every cell (method, budget level) gets exactly its share of the trials, each cell's Optuna
study holds only its own trials, ASHA never compares trials of two cells (checked on the rung records the search
writes), and every trial's MLflow run names its cell.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from helpers import save_tiny_classifier, search_on_local_ray

pytestmark = pytest.mark.slow

# tiny BERT: query+value = 4 layers of 32x32, 256 params per unit of r. Levels 256 and 512 partition the axis:
# level 256 holds r=1 (floor 129), level 512 holds r=2 (floor 257).
LEVELS = [256, 512]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-bert", max_positions=64)


def space(model_dir, root: Path, **over) -> dict:
    data = {
        "name": "cells",
        "model": str(model_dir),
        "task": {"name": "rotten_tomatoes", "max_train_samples": 256, "max_eval_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "alpha": 16},
        "budget": {"levels": LEVELS},
        "methods": ["melora", "lora"],
        "space": {"lr": {"low": 1e-4, "high": 3e-2}, "n": [2, 4]},
        "training": {"epochs": 2, "micro_batch_size": 32, "max_length": 32, "zero_stage": 2},
        "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2},
        "trials_per_cell": 3,
        "max_concurrent_trials": 2,
        "seed": 0,
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
        "storage_path": str(root / "runs"),
        "tracking_uri": f"sqlite:///{root}/mlflow.db",
    }
    data.update(over)
    return data


@pytest.fixture(scope="module")
def searched(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("cells")
    result, _ = search_on_local_ray(space(tiny_model, root))
    print(result.table())
    return result


CELLS = {"melora@256", "lora@256", "melora@512", "lora@512"}


def test_every_cell_gets_exactly_its_share(searched):
    result = searched
    assert result.status == "finished" and len(result.trials) == 12
    assert Counter(r.cell for r in result.trials) == {cell: 3 for cell in CELLS}
    for row in result.trials:
        assert row.cell == f"{row.method}@{row.budget}"
        floor = 129 if row.budget == 256 else 257
        assert floor <= row.adapter_params <= row.budget, row
        if row.method == "melora":
            assert row.n in (2, 4)  # a MELoRA cell holds MELoRA only (n=1 would be LoRA)
    assert set(result.best) == CELLS  # the best per cell


def test_each_cell_has_its_own_study_with_only_its_trials(searched):
    import optuna

    from melora_tune.search.cells import cell_study_name

    for cell in CELLS:
        method, level = cell.split("@")
        study = optuna.load_study(study_name=cell_study_name(result_name(searched), method, int(level)),
                                  storage=searched.optuna_storage)
        assert len(study.trials) == 3
        assert {t.params["method"] for t in study.trials} == {method}
        assert {t.user_attrs["budget"] for t in study.trials} == {int(level)}
        mine = {r.optuna_trial for r in searched.trials if r.cell == cell}
        assert {t.number for t in study.trials} == mine


def result_name(result) -> str:
    return result.study_name


def test_asha_compares_trials_only_within_their_cell(searched):
    from melora_tune.search.cells import RUNGS_NAME

    lines = [json.loads(x) for x in (Path(searched.experiment_path) / RUNGS_NAME).read_text().splitlines()]
    cell_of = {r.trial_id: r.cell for r in searched.trials}
    assert {line["trial_id"] for line in lines} == set(cell_of)  # every trial reached the first rung
    assert {line["cell"] for line in lines} == CELLS
    for line in lines:
        assert line["cell"] == cell_of[line["trial_id"]]
        assert {cell_of[peer] for peer in line["peers"]} == {line["cell"]}, line
    # a rung of a cell fills up with that cell's trials only: the last to arrive saw all its cell's peers
    firsts = [line for line in lines if line["rung"] == 1]
    assert max(len(line["peers"]) for line in firsts) == 3


def test_mlflow_runs_name_their_cell(searched):
    from mlflow import MlflowClient

    client = MlflowClient(searched.tracking_uri)
    runs = client.search_runs([searched.mlflow_experiment_id],
                              f"tags.`mlflow.parentRunId` = '{searched.parent_run_id}'", max_results=1000)
    trials = [r for r in runs if r.data.tags.get("melora.kind", "trial") != "confirmation"]
    assert Counter(r.data.tags["melora.cell"] for r in trials) == {cell: 3 for cell in CELLS}
    for run in trials:
        assert run.data.tags["melora.cell"] == f"{run.data.params['method']}@{run.data.params['budget']}"
    parent = client.get_run(searched.parent_run_id).data.params
    assert parent["budget_levels"] == "256,512" and parent["trials_per_cell"] == "3"
    assert set(parent["cells"].split(",")) == CELLS


def test_a_warm_started_search_begins_with_the_earlier_best_adds_its_curve_and_keeps_its_shares(tiny_model, searched):
    """A second search on the same storage warm-starts from the first, on the real stack: each cell's first trial is
    its method's best configuration of the first search at that level, once it is trained the first search's curve of
    that method joins the cell's study (shifted by the first trial's score here minus there; marked, never trained),
    and each cell still runs exactly its share, its own trials alone matching MLflow's."""
    import optuna
    from optuna.trial import TrialState

    from melora_tune.search.cells import cell_study_name
    from melora_tune.search.searcher import WARM_ATTR
    from melora_tune.search.warm_start import PRIOR_ATTR

    root = Path(searched.experiment_path).parents[1]
    earlier_name = Path(searched.experiment_path).name
    result, _ = search_on_local_ray(space(tiny_model, root, name="cells_warm", warm_start=[earlier_name],
                                          budget={"levels": [512]}, trials_per_cell=2))
    assert result.status == "finished" and Counter(r.cell for r in result.trials) == {"melora@512": 2, "lora@512": 2}
    for method in ("melora", "lora"):
        before = optuna.load_study(study_name=cell_study_name(searched.study_name, method, 512),
                                   storage=searched.optuna_storage)
        done = [t for t in before.trials if t.state == TrialState.COMPLETE]
        best = max(done, key=lambda t: (t.value, -t.number))
        study = optuna.load_study(study_name=cell_study_name(result.study_name, method, 512),
                                  storage=result.optuna_storage)
        own = sorted((t for t in study.trials if PRIOR_ATTR not in t.user_attrs), key=lambda t: t.number)
        added = [t for t in study.trials if PRIOR_ATTR in t.user_attrs]
        assert {t.number for t in own} == {r.optuna_trial for r in result.trials if r.cell == f"{method}@512"}
        first = own[0]
        assert first.user_attrs[WARM_ATTR] == f"{earlier_name}:{method}@512#{best.number}"
        assert first.params == best.params and first.state == TrialState.COMPLETE
        shift = first.value - best.value
        assert sorted(t.value for t in added) == pytest.approx(sorted(t.value + shift for t in done))
        assert all(t.user_attrs[PRIOR_ATTR].startswith(f"{earlier_name}:{method}@512#") for t in added)
