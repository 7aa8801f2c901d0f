"""The built-in strategies of issue 24 on small synthetic tables: gp, hyperband, bohb find a known optimum; one
Hyperband bracket's schedule by hand; no duplicate proposals in a finite space; the continuous-lr surrogate."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pandas as pd
import pytest
from optuna.storages import InMemoryStorage

from melora_tune.search.replay import ContinuousLevel, load_table, make_replay_scheduler, replay
from melora_tune.search.samplers.bohb import fidelity_view
from melora_tune.search.schedulers.brackets import hyperband_brackets, hyperband_weights
from melora_tune.search.searcher import BudgetOptunaSearch
from melora_tune.search.surrogate import leave_one_lr_out, loo_summary

LRS = (1e-4, 1e-3, 1e-2, 1e-1)
RANKS = (1, 2, 4, 8)


def table(quality=None, lrs=LRS, seeds=(0, 1), epochs=3, noise=0.0) -> pd.DataFrame:
    """LoRA r in RANKS x lrs: val = quality(r, lr) * (1 - 0.5^epoch) + seed noise; test = val - 0.01."""
    quality = quality or (lambda r, lr: 0.9 - 0.02 * abs(math.log2(r / 4)) - 0.1 * math.log10(lr / 1e-2) ** 2)
    rng = np.random.default_rng(0)
    rows = []
    for r in RANKS:
        for lr in lrs:
            for seed in seeds:
                spent = 0.0
                for e in range(1, epochs + 1):
                    spent += 2.0 * r
                    v = quality(r, lr) * (1 - 0.5 ** e) + noise * rng.normal()
                    rows.append(dict(budget=1000, method="lora", n=1, r=r, u=0, m=1, m_b=1, lr=lr, alpha=16.0,
                                     dropout=0.0, seed=seed, epoch=e, step=10 * e, val_score=v, test_score=v - 0.01,
                                     train_time_s=spent * 0.8, eval_time_s=spent * 0.2, adapter_params=100 * r,
                                     equivalent_rank=r))
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def level():
    return load_table(table())[1000]


@pytest.mark.parametrize("strategy", ["gp", "random+hyperband", "tpe+hyperband", "bohb+hyperband", "syne-bohb+asha",
                                      "syne-bohb+hyperband"])
def test_each_new_strategy_finds_the_known_optimum(level, strategy):
    # the optimum: r=4, lr=1e-2 (quality 0.9). Finite (16 points, 3x the grid's compute): found, nothing re-run.
    run = replay(level, strategy, 0, concurrency=2, max_fraction=3, n_startup_trials=4)
    assert level.best.key[2] == 4 and level.best.key[-3] == 1e-2
    assert run.regret_at(3) == 0.0
    keys = [k for k, _ in run.trials.values()]
    assert len(keys) == len(set(keys))
    # continuous lr (nothing to enumerate): within 2 % of the regret scale at twice the grid's compute
    cont = ContinuousLevel(level)
    run = replay(cont, strategy, 1, concurrency=2, max_fraction=2, n_startup_trials=4)
    assert run.regret_at(2) < 0.02


def test_hyperband_bracket_arithmetic():
    # max_t 9, grace 1, eta 3: s_max = 2, three brackets with Hyperband's n = ceil(3/(s+1) * 3^s) for s = 2, 1, 0
    assert hyperband_brackets(9, 1, 3) == 3 and hyperband_weights(3, 3) == [9, 5, 3]
    assert hyperband_brackets(3, 1, 3) == 2 and hyperband_weights(2, 3) == [3, 2]
    assert hyperband_brackets(3, 1, 2) == 2 and hyperband_weights(2, 2) == [2, 2]
    assert hyperband_brackets(9, 1, 3, brackets=2) == 2 and hyperband_brackets(9, 1, 3, brackets=7) == 3
    assert hyperband_brackets(2, 2, 3) == 1  # grace = max_t: one bracket, which never stops early


def hand_table():
    """Five LoRA configurations, one seed, three epochs, cost 1 per epoch."""
    vals = {1: (0.5, 0.6, 0.7), 2: (0.6, 0.7, 0.8), 4: (0.4, 0.5, 0.6), 8: (0.3, 0.9, 0.95), 16: (0.7, 0.7, 0.7)}
    rows = []
    for r, curve in vals.items():
        for e, v in enumerate(curve, start=1):
            rows.append(dict(budget=1000, method="lora", n=1, r=r, u=0, m=1, m_b=1, lr=1e-3, alpha=16.0,
                             dropout=0.0, seed=0, epoch=e, step=10 * e, val_score=v, test_score=v,
                             train_time_s=0.8 * e, eval_time_s=0.2 * e, adapter_params=100 * r, equivalent_rank=r))
    return load_table(pd.DataFrame(rows))[1000]


def test_one_hyperband_schedule_by_hand():
    # eta 3, grace 1, max_t 3: bracket 0 has rungs at epochs 1 and 3 (a trial below the rung's 66.7th percentile
    # stops), bracket 1 a single rung at 3 (never stops early); shares 3:2, dealt 0, 1, 0, 1, 0. One worker.
    level = hand_table()
    sched = make_replay_scheduler(level, "hyperband", 3)
    assert [[milestone for milestone, _ in b._rungs] for b in sched._brackets] == [[3, 1], [3]]
    order = [{"method": "lora", "r": r, "lr": 1e-3} for r in (1, 2, 4, 8, 16)]
    assert brackets_dealt(level, len(order)) == [0, 1, 0, 1, 0]
    run = replay(level, "random+hyperband", 0, concurrency=1, reduction_factor=3, num_samples=5, points=order,
                 max_fraction=10)
    assert [(e.trial_id, e.epoch, e.score, e.decision, e.ended) for e in run.events] == [
        ("00000", 1, 0.5, "CONTINUE", None),         # bracket 0: rung 1 empty
        ("00000", 2, 0.6, "CONTINUE", None),
        ("00000", 3, 0.7, "CONTINUE", "completed"),  # rung 3 empty
        ("00001", 1, 0.6, "CONTINUE", None),         # bracket 1: no rung before 3
        ("00001", 2, 0.7, "CONTINUE", None),
        ("00001", 3, 0.8, "CONTINUE", "completed"),
        ("00002", 1, 0.4, "STOP", "stopped_early"),  # bracket 0: 0.4 < cutoff 0.5 (the 66.7th pct of {0.5})
        ("00003", 1, 0.3, "CONTINUE", None),         # bracket 1: its poor first epoch is not judged ...
        ("00003", 2, 0.9, "CONTINUE", None),
        ("00003", 3, 0.95, "CONTINUE", "completed"),  # ... and it is the best configuration
        ("00004", 1, 0.7, "CONTINUE", None),         # bracket 0: 0.7 >= 0.4667 (the 66.7th pct of {0.5, 0.4})
        ("00004", 2, 0.7, "CONTINUE", None),
        ("00004", 3, 0.7, "CONTINUE", "completed"),  # 0.7 is not below the cutoff 0.7 of {0.7}
    ]
    # plain ASHA (one bracket) stops the best configuration at its first epoch: what the second bracket is for
    asha = replay(level, "random+asha", 0, concurrency=1, reduction_factor=3, num_samples=5, points=order,
                  max_fraction=10)
    assert [(e.epoch, e.decision) for e in asha.events if e.trial_id == "00003"] == [(1, "STOP")]


def brackets_dealt(level, n: int) -> list[int]:
    from ray.tune.experiment import Trial  # Ray Tune's trial, built as the replay builds it (stub: no cluster)

    sched = make_replay_scheduler(level, "hyperband", 3)
    out = []
    for i in range(n):
        trial = Trial("replay", config={}, trial_id=f"t{i}", stub=True)
        sched.on_trial_add(None, trial)
        out.append(sched._brackets.index(sched._trial_info[trial.trial_id]))
    return out


def test_hyperband_deals_each_iteration_in_hyperbands_shares(level):
    sched_level = hand_table()
    dealt = brackets_dealt(sched_level, 10)
    assert [dealt[:5].count(k) for k in (0, 1)] == [3, 2] and [dealt[5:].count(k) for k in (0, 1)] == [3, 2]


@pytest.mark.parametrize("strategy", ["random", "tpe", "gp", "bohb", "syne-bohb"])
def test_no_duplicate_proposals_in_a_finite_space(level, strategy):
    """16 configurations, 16 trials asked one after another, each told at once: 16 distinct ones, then FINISHED."""
    space = level.space()
    s = BudgetOptunaSearch(space, storage=InMemoryStorage(), study_name=strategy, seed=1, n_startup_trials=3,
                           max_t=3, sampler=strategy)
    seen = []
    for i in range(16):
        hp = s.suggest(f"t{i}")
        assert isinstance(hp, dict), f"proposal {i}: {hp}"
        seen.append((hp["r"], hp["lr"]))
        s.on_trial_result(f"t{i}", {"score": 0.8, "step": 10, "epoch": 1})
        s.on_trial_complete(f"t{i}", {"score": 0.8 + 0.001 * i, "step": 30, "epoch": 3, "status": "completed"})
    assert len(set(seen)) == 16
    assert s.suggest("t16") == s.FINISHED
    study = s._ot_study.get_trials()
    dups = [t for t in study if "melora.duplicate_of" in t.user_attrs]
    # a duplicate was answered from the record: told its first trial's value, never handed to a Ray trial
    for t in dups:
        first = study[t.user_attrs["melora.duplicate_of"]]
        assert t.params == first.params and t.value == first.value
    assert not s.orphans()  # answered duplicates are not re-run after a restart either


def test_running_configurations_count_as_taken(level):
    s = BudgetOptunaSearch(level.space(), storage=InMemoryStorage(), study_name="c", seed=0, n_startup_trials=3,
                           max_t=3, sampler="random")
    seen = [(hp["r"], hp["lr"]) for hp in (s.suggest(f"t{i}") for i in range(16))]  # none told yet
    assert len(set(seen)) == 16 and s.suggest("t16") == s.FINISHED


def test_a_continuous_space_is_not_deduplicated(level):
    cont = ContinuousLevel(level)
    s = BudgetOptunaSearch(cont.space(), storage=InMemoryStorage(), study_name="c", seed=0, n_startup_trials=3,
                           max_t=3, sampler="random")
    lrs = [s.suggest(f"t{i}")["lr"] for i in range(20)]
    assert len(set(lrs)) == 20 and all(1e-4 <= lr <= 1e-1 for lr in lrs)


def test_bohb_models_the_largest_epoch_with_enough_scores():
    study = optuna.create_study(direction="maximize")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    for i, (values, state) in enumerate([({10: 0.5, 20: 0.6, 30: 0.7}, "COMPLETE"), ({10: 0.4}, "PRUNED"),
                                         ({10: 0.6, 20: 0.65}, "PRUNED"), ({10: 0.3}, "PRUNED")]):
        study.add_trial(optuna.trial.create_trial(
            params={"x": i / 10}, distributions=dist, intermediate_values=values,
            state=getattr(optuna.trial.TrialState, state), value=0.7 if state == "COMPLETE" else None))
    trials = study.get_trials()
    b, seen = fidelity_view(trials, min_points=2)  # step 20 has 2 scores, step 30 only 1
    assert b == 20 and [(t.params["x"], t.value, t.state.name) for t in seen] == [(0.0, 0.6, "COMPLETE"),
                                                                                 (0.2, 0.65, "COMPLETE")]
    b, seen = fidelity_view(trials, min_points=4)
    assert b == 10 and [t.value for t in seen] == [0.5, 0.4, 0.6, 0.3]
    assert fidelity_view(trials, min_points=5) == (None, trials)


def _kde_study(seed: int, n: int = 24) -> optuna.Study:
    """x in [0, 1], lr log in [1e-4, 1e-1]: the score peaks at x = 0.8, lr = 1e-2; every trial reports epochs 1..3."""
    from melora_tune.search.samplers.syne_bohb import SyneTuneBOHBSampler

    study = optuna.create_study(direction="maximize", sampler=SyneTuneBOHBSampler(seed=seed, n_startup_trials=4))
    rng = np.random.default_rng(0)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1),
            "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for _ in range(n):
        x, lr = float(rng.uniform()), float(10 ** rng.uniform(-4, -1))
        q = 1 - (x - 0.8) ** 2 - 0.1 * math.log10(lr / 1e-2) ** 2
        study.add_trial(optuna.trial.create_trial(
            params={"x": x, "lr": lr}, distributions=dist, value=q,
            intermediate_values={e: q * (1 - 0.5 ** e) for e in (1, 2, 3)}))
    return study


def test_syne_bohb_proposes_from_syne_tunes_model_reproducibly():
    """The proposals come from Syne Tune's KDE fitted on the study (they crowd the good region a random sampler
    would not), the same study and seed propose the same values (the study is the only state: a resumed search
    proposes what an uninterrupted one would), and numpy's global generator is left as it was."""
    pytest.importorskip("syne_tune")
    dist = {"x": optuna.distributions.FloatDistribution(0, 1),
            "lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}

    def proposals(seed: int, k: int = 30) -> list[tuple[float, float]]:
        study = _kde_study(seed)
        out = []
        for _ in range(k):
            t = study.ask(dist)
            out.append((t.params["x"], t.params["lr"]))
            study.tell(t, state=optuna.trial.TrialState.FAIL)  # not told a score: every proposal sees the same data
        return out

    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    a = proposals(0)
    assert np.random.random() == before
    assert a == proposals(0) and a != proposals(1)
    # a third at random (Syne Tune's random_fraction), the rest from the good KDE: most land near the optimum
    near = sum(abs(x - 0.8) < 0.25 and abs(math.log10(lr / 1e-2)) < 0.75 for x, lr in a)
    assert near >= 12, a  # a uniform draw lands there with probability 0.5 * 0.25 = 1/8: about 4 of 30
    assert all(0 <= x <= 1 and 1e-4 <= lr <= 1e-1 for x, lr in a)


def test_syne_bohb_missing_package_is_one_clear_line(monkeypatch):
    import importlib.util

    from melora_tune.errors import UsageError
    from melora_tune.search.samplers import get_sampler

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "syne_tune" else real(name, *a))
    with pytest.raises(UsageError, match=r"sampler syne-bohb needs syne_tune, not installed: pip install .*syne-tune"):
        get_sampler("syne-bohb").check()


# ---- the continuous-lr surrogate --------------------------------------------------------------------------------

def test_surrogate_reproduces_every_recorded_row():
    level = load_table(table(noise=0.01))[1000]
    cont = ContinuousLevel(level)
    for key, cfg in level.configs.items():
        got = cont.lookup({"method": "lora", "n": 1, "r": key[2], "u": 0, "m": 1, "m_b": 1, "lr": key[-3],
                           "alpha": 16.0, "dropout": 0.0})[1]
        np.testing.assert_allclose(got.val, cfg.val, atol=1e-12)
        np.testing.assert_allclose(got.test, cfg.test, atol=1e-12)
        np.testing.assert_allclose(got.cost, cfg.cost, atol=1e-12)
    # between recorded lrs: the seed mean stays within its neighbours' (PCHIP does not overshoot)
    sc = cont.shapes[next(iter(cont.shapes))]
    mid = sc.at(math.sqrt(1e-3 * 1e-2))["val"].mean(axis=0)
    lo, hi = np.sort(sc.val[1:3].mean(axis=1), axis=0)
    assert np.all(mid >= lo - 1e-12) and np.all(mid <= hi + 1e-12)


def test_leave_one_lr_out_as_documented():
    # quality quadratic in log10(lr); with seeds identical the seed mean is exact, so the error is PCHIP's
    level = load_table(table())[1000]
    df = leave_one_lr_out(level)
    assert len(df) == 4 * 4 * 3  # shapes x lrs x epochs
    row = df[(df.key.map(lambda s: s[2]) == 4) & (df.lr == 1e-3) & (df.epoch == 3)].iloc[0]
    # by hand: the points left are x = -4, -2, -1 with y(x) = q(x) * (1 - 0.5^3), q = 0.9 - 0.1 (x + 2)^2
    from scipy.interpolate import PchipInterpolator

    f = lambda x: (0.9 - 0.1 * (x + 2) ** 2) * 0.875  # noqa: E731
    pred = PchipInterpolator([-4, -2, -1], [f(-4), f(-2), f(-1)])(-3)
    assert not row.end and row.actual == pytest.approx(100 * f(-3))
    assert row.error == pytest.approx(100 * abs(pred - f(-3)))
    end = df[(df.key.map(lambda s: s[2]) == 4) & (df.lr == 1e-1) & (df.epoch == 3)].iloc[0]
    assert end.end and end.predicted == pytest.approx(100 * f(-2))  # the nearest recorded value, held
    summary = loo_summary(level)
    assert set(summary.end) == {False, True} and (summary.points == 8).all()


def test_continuous_replay_finds_the_optimum_between_recorded_lrs():
    level = load_table(table())[1000]
    cont = ContinuousLevel(level)
    # the recorded optimum lr 1e-2 is on the dense grid; PCHIP keeps it the best
    assert cont.best.key[2] == 4 and cont.best.key[-3] == pytest.approx(1e-2)
    run = replay(cont, "tpe", 0, concurrency=2, max_fraction=3, n_startup_trials=4)
    lrs = [k[-3] for k, _ in run.trials.values()]
    assert len(set(lrs)) == len(lrs) and not set(lrs) & set(LRS)  # continuous: off the recorded lrs
    assert run.regret_at(3) < 0.05
    with pytest.raises(Exception, match="grid needs recorded learning rates"):
        replay(cont, "grid", 0)
