"""A sampler and a scheduler registered from outside the package (here, from this test module) work in every place that
derives from the registries, with nothing else edited: the space's sampler:/scheduler: keys, search --help, the dry
run, the search's searcher and scheduler, and the replay benchmark."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
import yaml
from ray.tune.schedulers import FIFOScheduler

from helpers import tiny_bert_config
from melora_tune.cli import main
from melora_tune.search.replay import load_table, parse_strategy, replay
from melora_tune.search.samplers import Sampler, get_sampler, register_sampler, sampler_names, unregister_sampler
from melora_tune.search.schedulers import (
    Scheduler,
    get_scheduler,
    make_scheduler,
    register_scheduler,
    scheduler_names,
    unregister_scheduler,
)

TAG = "seams.sampler"


class TaggingRandomSampler(optuna.samplers.RandomSampler):
    """Optuna's seeded random sampler that marks every trial it proposes (so a test can tell who proposed it)."""

    def before_trial(self, study, trial):
        study._storage.set_trial_system_attr(trial._trial_id, TAG, "tagging")
        super().before_trial(study, trial)


class Tagging(Sampler):
    name = "tagging"
    summary = "seeded random search that tags its trials (a test plug-in)"

    def make(self, space, *, seed, n_startup_trials):
        return TaggingRandomSampler(seed=seed)


class StopAfterFirst(FIFOScheduler):
    """Stops every trial at its first result."""

    def on_trial_result(self, tune_controller, trial, result):
        return self.STOP


class FirstResult(Scheduler):
    name = "first-result"
    summary = "stop every trial after its first result (a test plug-in)"

    def make(self, settings, max_t):
        return StopAfterFirst()


@pytest.fixture
def plugins():
    register_sampler(Tagging)
    register_scheduler(FirstResult)
    yield "tagging", "first-result"
    unregister_sampler("tagging")
    unregister_scheduler("first-result")


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A config-only tiny BERT folder (the budget needs config.json, not weights)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert_config(num_labels=2).save_pretrained(path)
    return path


def space(model_dir, tmp_path, **extra) -> dict:
    # tiny BERT: 384 params per unit of r; budget 768 at min fraction 0.5: lora r 1..2, melora n 2/4/8 x r 1..2
    return {
        "name": "seams", "model": str(model_dir), "task": {"name": "rotten_tomatoes", "max_train_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        "budget": {"max_params": 768, "min_fraction": 0.5}, "methods": ["melora", "lora"],
        "space": {"lr": {"low": 1e-4, "high": 1e-2}, "n": [2, 4, 8], "r": [1, 2, 4]},
        "training": {"epochs": 2}, "num_samples": 4,
        "storage_path": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", **extra,
    }


def dry_run(data: dict, tmp_path, capsys) -> tuple[int, str, str]:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["search", str(path), "--dry-run"])
    out, err = capsys.readouterr()
    return code, out, err


def test_registered_strategies_are_listed_and_unregistered_after(plugins, capsys):
    sampler, scheduler = plugins
    assert sampler in sampler_names() and scheduler in scheduler_names()
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    assert "tagging" in out and Tagging.summary in out and FirstResult.summary in out
    assert "tpe" in out and "asha" in out and "fifo" in out


def test_the_fixture_leaves_the_registries_as_they_were():
    assert sampler_names() == ("tpe", "random", "grid", "gp", "bohb", "syne-bohb") and scheduler_names() == ("asha", "fifo", "hyperband")


def test_registered_strategies_in_search_dry_run(plugins, tiny_model_dir, tmp_path, capsys):
    sampler, scheduler = plugins
    code, out, err = dry_run(space(tiny_model_dir, tmp_path, sampler=sampler, scheduler=scheduler), tmp_path, capsys)
    assert code == 0, err
    assert "4 trials (2 per cell) by the tagging sampler, at most 1 at once, scheduler first-result on epoch (max 2)" in out
    # the built-ins keep their own lines; a space that names no sampler gets random search (the default)
    code, out, err = dry_run(space(tiny_model_dir, tmp_path), tmp_path, capsys)
    assert code == 0 and "4 trials (2 per cell) by random search, at most 1 at once, ASHA on epoch (grace 1, reduction 2, max 2)" in out
    code, out, err = dry_run(space(tiny_model_dir, tmp_path, sampler="tpe", asha={"enabled": False}), tmp_path, capsys)
    assert code == 0 and "4 trials (2 per cell) by Optuna TPE, at most 1 at once, no early stopping" in out
    code, out, err = dry_run(space(tiny_model_dir, tmp_path, scheduler="fifo", asha={"enabled": False}), tmp_path, capsys)
    assert code == 0 and "no early stopping" in out


def test_registered_strategies_are_what_the_search_builds(plugins, tiny_model_dir, tmp_path):
    """The search's own builders (runner: BudgetOptunaSearch + make_scheduler), short of starting Ray."""
    from optuna.storages import InMemoryStorage

    from melora_tune.search.runner import search_params
    from melora_tune.search.schema import parse_space
    from melora_tune.search.searcher import BudgetOptunaSearch
    from melora_tune.search.space import build_space

    sampler, scheduler = plugins
    parsed = parse_space(space(tiny_model_dir, tmp_path, sampler=sampler, scheduler=scheduler))
    fs = build_space(parsed)
    assert isinstance(make_scheduler(parsed), StopAfterFirst)
    searcher = BudgetOptunaSearch(fs, storage=InMemoryStorage(), study_name="s", seed=0, max_t=2, sampler=parsed.sampler)
    assert isinstance(searcher._ot_study.sampler, TaggingRandomSampler)
    searcher.suggest("t0")
    assert searcher._ot_study.trials[0].system_attrs[TAG] == "tagging"
    # recorded in the search's MLflow params; a space without the key records exactly what it did before
    assert search_params(parsed, fs, 4)["scheduler"] == scheduler and search_params(parsed, fs, 4)["asha"] is False
    plain = parse_space(space(tiny_model_dir, tmp_path))
    assert "scheduler" not in search_params(plain, build_space(plain), 4)


def test_an_older_search_record_still_resumes(tiny_model_dir, tmp_path):
    """The space recorded for --resume (``comparable``) has no scheduler key while it is the default."""
    from melora_tune.search.experiment import comparable
    from melora_tune.search.schema import parse_space

    assert "scheduler" not in comparable(parse_space(space(tiny_model_dir, tmp_path)))
    assert "scheduler" not in comparable(parse_space(space(tiny_model_dir, tmp_path, scheduler="asha")))
    assert comparable(parse_space(space(tiny_model_dir, tmp_path, scheduler="fifo")))["scheduler"] == "fifo"


BAD = [
    ({"sampler": "tagg"}, "sampler: unknown sampler 'tagg' (did you mean 'tagging'?): choose from tpe, random, grid, gp, bohb, syne-bohb, tagging"),
    ({"scheduler": "first"}, "scheduler: unknown scheduler 'first' (did you mean 'first-result'?): choose from asha, fifo, hyperband, first-result"),
    ({"scheduler": "first-result", "asha": {"enabled": False}},
     "asha.enabled: false means no early stopping, and scheduler is first-result: drop one of them"),
]


@pytest.mark.parametrize("changes,needle", BAD, ids=["sampler", "scheduler", "asha-off"])
def test_unknown_or_conflicting_strategies_are_one_line_and_exit_2(plugins, changes, needle, tiny_model_dir, tmp_path, capsys):
    code, out, err = dry_run(space(tiny_model_dir, tmp_path, **changes), tmp_path, capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and needle in err, err


# ---- the replay benchmark ------------------------------------------------------------------------

LRS = (1e-3, 1e-2)
VAL = {1: (0.50, 0.60, 0.65), 2: (0.60, 0.70, 0.75), 4: (0.40, 0.50, 0.55), 8: (0.70, 0.62, 0.66)}


@pytest.fixture(scope="module")
def level():
    """Four LoRA ranks x two learning rates x two seeds, three epochs each (tests/test_replay.py's style)."""
    rows = []
    for r, vals in VAL.items():
        for lr in LRS:
            for seed in (0, 1):
                spent = 0.0
                for e, val in enumerate(vals, start=1):
                    spent += 2 * r
                    v = val + (0.05 if lr == 1e-2 else 0.0) + 0.01 * seed
                    rows.append(dict(budget=1000, method="lora", n=1, r=r, u=0, m=1, m_b=1, lr=lr, alpha=16.0,
                                     dropout=0.0, seed=seed, epoch=e, step=10 * e, val_score=v, test_score=v - 0.02,
                                     train_time_s=spent * 0.8, eval_time_s=spent * 0.2, adapter_params=100 * r,
                                     equivalent_rank=r))
    return load_table(pd.DataFrame(rows))[1000]


def test_registered_strategies_in_the_replay(plugins, level):
    sampler, scheduler = plugins
    assert parse_strategy(f"{sampler}+{scheduler}") == (sampler, "fidelity", scheduler)
    assert parse_strategy(sampler) == (sampler, "fidelity", "fifo")

    run = replay(level, f"{sampler}+{scheduler}", 0, concurrency=2, num_samples=6, max_fraction=10)
    study = run.searcher._ot_study
    assert isinstance(study.sampler, TaggingRandomSampler)
    assert all(t.system_attrs[TAG] == "tagging" for t in study.trials)
    # the 8-point space never re-runs a configuration: a repeated proposal is answered from the record, untrained
    ran = [t for t in study.trials if "melora.duplicate_of" not in t.user_attrs]
    assert len(ran) == len(run.trials) == len({k for k, _ in run.trials.values()}) == 6
    # the scheduler's decisions: every trial stopped at its first result
    assert [(e.epoch, e.decision, e.ended) for e in run.events] == [(1, "STOP", "stopped_early")] * 6
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.PRUNED}

    # the same sampler without a scheduler (fifo): every trial trains its three epochs
    fifo = replay(level, sampler, 0, concurrency=2, num_samples=6, max_fraction=10)
    assert [e.epoch for e in fifo.events if e.ended] == [3] * 6 and all(e.decision == "CONTINUE" for e in fifo.events)
    # seeded: the same seed proposes the same configurations, whatever the scheduler
    assert [k for k, _ in run.trials.values()] == [k for k, _ in fifo.trials.values()]


def test_unknown_replay_strategy_names_the_known_ones(level):
    from melora_tune.errors import UsageError

    with pytest.raises(UsageError, match="unknown strategy 'tpe\\+pbt'.*a scheduler from asha, fifo"):
        replay(level, "tpe+pbt", 0)
    assert get_sampler("grid").enumerates and not get_scheduler("fifo").stops_early
