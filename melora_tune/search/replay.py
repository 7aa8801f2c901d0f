"""Replay search strategies on a recorded table (a "tabulated benchmark"): no training, a simulated clock.

The method
----------
A table (``melora-tune table``, e.g. ``benchmarks/tables/trec.csv``) holds, for every configuration of a
small grid, every seed's full learning curve: one row per (configuration, seed, epoch) with the validation
and test scores and the cumulative train + eval seconds. Replaying a strategy on it means running the
project's real searcher (``BudgetOptunaSearch`` with a registered sampler, ``search.samplers``) and the
registered scheduler (``search.schedulers``: the project's ``FiniteASHA``, ``FIFOScheduler``, or any other)
exactly as Ray Tune would call them, but answering each
trial's epoch with the recorded row instead of training, and advancing a simulated clock by the recorded
cost of that epoch (as Syne Tune's simulator backend does). ``concurrency`` trials run at once; the next
event is the earliest epoch to finish.

* The space is a ``FeasibleSpace`` whose candidates are exactly the table's configurations of one budget
  level, with ``lr_choices`` = the table's learning rates, so every sampled configuration is one table key.
* A trial draws one recorded seed of its configuration uniformly (seeded RNG): the searcher sees one noisy
  run, as it would live.
* Compute is worker-seconds (busy workers integrated over simulated time). A run stops when it reaches
  ``max_fraction`` of the grid's compute = the sum over configurations of the seed-mean cost of a full
  training; epochs still in flight then are cut off (never reported). The grid strategy also stops after
  one trial per configuration (Ray's ``num_samples`` = the grid's size).
* The incumbent after each event is the trial the product would report (``records.schema.rank_key``:
  trials that reached the last epoch first, then trials ASHA stopped, by last validation score; earliest
  on ties). Trials still running are not ranked (the report would call them interrupted). Its quality is
  its configuration's seed-mean final TEST score (not the noisy seed it drew): what deploying that choice
  yields on average.
* Normalised regret = (y* - y_inc) / (y* - y_worst): y* is the seed-mean final test score of the
  configuration with the best seed-mean final validation score, y_worst the worst seed-mean final test
  score of the level. It is negative when the incumbent's test beats y* (validation picked y*, test
  disagrees): the sign is kept. Before any trial has ended there is no incumbent; regret is then 1.

Ray Tune's call order (ray 2.60, ``ray/tune/execution/tune_controller.py``)
--------------------------------------------------------------------------
* ``tune.run`` (``ray/tune/tune.py`` ~l.829-855) calls ``search_alg.set_search_properties(metric, mode,
  config)`` (OptunaSearch built with a space answers False and keeps its own) and
  ``scheduler.set_search_properties(metric, mode)`` (how the scheduler, built without a metric, gets one).
* ``add_trial`` (~l.540): ``scheduler.on_trial_add(controller, trial)`` after the searcher's ``suggest``.
* ``_process_trial_result`` (~l.1559-1590): ``decision = scheduler.on_trial_result(...)`` unless the trial
  should stop anyway (``done``); ``search_alg.on_trial_result`` ONLY when the decision is not STOP.
* A STOP runs ``stop_trial`` (~l.1410-1436): ``scheduler.on_trial_complete(controller, trial,
  last_result)`` then ``search_alg.on_trial_complete(trial_id, result=last_result)``.
* A function trainable that returns after its last report sends a ``__duplicate__`` result (``done=True``,
  ``function_trainable.py`` ~l.95-122); ``trial.should_stop`` is then true, so neither ``on_trial_result``
  sees it again and the trial goes to ``stop_trial`` with the final result. So the final epoch is: scheduler
  ``on_trial_result`` -> (searcher ``on_trial_result`` unless STOP) -> both ``on_trial_complete``.

ASHA does not use the controller argument (``AsyncHyperBandScheduler`` only reads ``trial.trial_id``):
``None`` is passed. Trials are real ``ray.tune.experiment.Trial`` objects built with ``stub=True`` (no
trainable registry lookup, no cluster).
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from optuna.storages import InMemoryStorage
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from melora_tune.adapters import HYPERPARAMS, get_method
from melora_tune.adapters.budget import Candidate
from melora_tune.errors import UsageError
from melora_tune.records.schema import rank_key
from melora_tune.search.samplers import get_sampler, sampler_names
from melora_tune.search.schedulers import get_scheduler, scheduler_names
from melora_tune.search.schema import Asha
from melora_tune.search.searcher import BudgetOptunaSearch
from melora_tune.search.space import FeasibleSpace
from melora_tune.search.surrogate import shape_curves, shape_of, with_lr

METRIC = "score"
KEY_COLUMNS = ("method", *HYPERPARAMS, "lr", "alpha", "dropout")
COLUMNS = (*KEY_COLUMNS, "budget", "seed", "epoch", "step", "val_score", "test_score", "train_time_s",
           "eval_time_s", "adapter_params", "equivalent_rank")

# The benchmark's default rows: name -> (sampler, tell_policy, scheduler); random ignores what it is told, so
# its policy does not matter. Any other "SAMPLER[+SCHEDULER][-stock]" of registered names replays too
# (``parse_strategy``).
STRATEGIES: dict[str, tuple[str, str, str]] = {
    "random": ("random", "fidelity", "fifo"),
    "grid": ("grid", "fidelity", "fifo"),
    "tpe": ("tpe", "fidelity", "fifo"),
    "random+asha": ("random", "fidelity", "asha"),
    "tpe+asha-stock": ("tpe", "stock", "asha"),
    "tpe+asha": ("tpe", "fidelity", "asha"),
}


def parse_strategy(name: str) -> tuple[str, str, str]:
    """(sampler, tell_policy, scheduler) of a strategy name: a ``STRATEGIES`` row, or ``SAMPLER[+SCHEDULER][-stock]``
    of registered names (no scheduler: fifo; ``-stock``: Ray's tell policy). UsageError naming the known ones."""
    if name in STRATEGIES:
        return STRATEGIES[name]
    rest, stock = (name[:-len("-stock")], True) if name.endswith("-stock") else (name, False)
    sampler, _, scheduler = rest.partition("+")
    if sampler not in sampler_names() or (scheduler and scheduler not in scheduler_names()):
        raise UsageError(f"unknown strategy {name!r}: give one of {', '.join(STRATEGIES)}, or SAMPLER[+SCHEDULER][-stock] "
                         f"with a sampler from {', '.join(sampler_names())} and a scheduler from "
                         f"{', '.join(scheduler_names())}")
    return get_sampler(sampler).name, "stock" if stock else "fidelity", get_scheduler(scheduler or "fifo").name


@dataclass
class Config:
    """One configuration's recorded curves: arrays [seed, epoch] (epochs 1..E in order)."""

    key: tuple
    candidate: Candidate
    seeds: list[int]
    val: np.ndarray
    test: np.ndarray
    step: np.ndarray
    cost: np.ndarray  # seconds of each epoch (increase of train_time_s + eval_time_s)

    @property
    def final_val(self) -> float:
        return float(self.val[:, -1].mean())

    @property
    def final_test(self) -> float:
        return float(self.test[:, -1].mean())

    @property
    def full_cost(self) -> float:
        return float(self.cost.sum(axis=1).mean())


@dataclass
class Level:
    """One budget level of a table."""

    budget: int
    epochs: int
    configs: dict[tuple, Config]

    @property
    def grid_compute(self) -> float:
        return sum(c.full_cost for c in self.configs.values())

    @property
    def best(self) -> Config:
        """The configuration validation would pick with every seed known (earliest key on ties)."""
        return max(self.configs.values(), key=lambda c: c.final_val)

    @property
    def y_star(self) -> float:
        return self.best.final_test

    @property
    def y_worst(self) -> float:
        return min(c.final_test for c in self.configs.values())

    def regret(self, test: float) -> float:
        spread = self.y_star - self.y_worst
        if spread <= 0:
            raise ValueError(f"budget {self.budget}: the best-validated configuration has the worst test score")
        return (self.y_star - test) / spread

    def space(self) -> FeasibleSpace:
        """A FeasibleSpace whose leaves are exactly this level's configurations."""
        cands = {c.candidate.key: c.candidate for c in self.configs.values()}.values()
        methods = tuple(sorted({c.method for c in cands}))
        # a tied hyperparameter (m_b = m) is not a level of the tree when the table never unties it
        tied = tuple(k for k, hp in HYPERPARAMS.items() if hp.tied_to and all(
            getattr(c, k) == getattr(c, hp.tied_to) for c in cands))
        lrs = sorted({k[KEY_COLUMNS.index("lr")] for k in self.configs})
        alphas = sorted({k[KEY_COLUMNS.index("alpha")] for k in self.configs})
        dropouts = sorted({k[KEY_COLUMNS.index("dropout")] for k in self.configs})
        space = FeasibleSpace(
            methods=methods,
            candidates={m: sorted((c for c in cands if c.method == m), key=lambda c: c.key) for m in methods},
            budget=max(self.budget, max(c.adapter_params for c in cands)),
            min_fraction=0.0,
            lr=(min(lrs), max(lrs), True),
            alpha=alphas[0],
            dropout=dropouts[0],
            alpha_choices=alphas if len(alphas) > 1 else None,
            dropout_choices=dropouts if len(dropouts) > 1 else None,
            lr_choices=lrs,
            tied=tied,
        )
        if len(space.reachable()) != len(cands):
            raise ValueError(f"budget {self.budget}: two table configurations share one path of the search tree")
        return space

    def cells(self) -> dict[str, "Level"]:
        """One level per method (a cell of a search with cells: its own study and scheduler, its own grid)."""
        methods = sorted({c.candidate.method for c in self.configs.values()})
        return {m: Level(self.budget, self.epochs, {k: c for k, c in self.configs.items()
                                                    if c.candidate.method == m}) for m in methods}

    def lookup(self, sampled: dict[str, Any]) -> tuple[tuple, Config]:
        """The table key and recorded curves of a sampled configuration."""
        key = self.key_of(sampled)
        return key, self.configs[key]

    def key_of(self, sampled: dict[str, Any]) -> tuple:
        key = tuple(sampled[k] if k == "method" else (float(sampled[k]) if k in ("lr", "alpha", "dropout")
                    else int(sampled[k])) for k in KEY_COLUMNS)
        if key not in self.configs:
            raise KeyError(f"sampled configuration {key} is not in the table")
        return key


class ContinuousLevel(Level):
    """A level whose learning rate is continuous (``search.surrogate``): space.lr is the recorded range, a
    sampled lr's curves come from the surrogate, and y* / y_worst are taken over a dense lr grid.

    * A trial's curves: ``ShapeCurves.at(lr)``: the seed-mean PCHIP over log10(lr) plus the drawn seed's
      residual, per epoch; at a recorded lr exactly the recorded rows. Its quality is the seed mean there.
    * y* = the seed-mean final test score at the (shape, lr) whose seed-mean final validation score is highest,
      over the recorded lrs and ``dense`` log-spaced lrs per shape; y_worst the lowest seed-mean final test
      there. Both can only move outwards from the discrete level's (the recorded lrs are on the grid).
    * Compute stays in units of the recorded grid's compute (its configurations x recorded lrs): what a user
      who ran that grid would have spent.
    """

    def __init__(self, level: Level, dense: int = 61) -> None:
        super().__init__(level.budget, level.epochs, level.configs)
        self.discrete = level
        self.shapes = shape_curves(level)
        lows = {float(sc.lrs[0]) for sc in self.shapes.values()}
        highs = {float(sc.lrs[-1]) for sc in self.shapes.values()}
        if len(lows) != 1 or len(highs) != 1:
            raise ValueError(f"budget {level.budget}: shapes were recorded over different lr ranges")
        self.lr_range = (lows.pop(), highs.pop())
        grid = np.geomspace(*self.lr_range, dense)
        self.candidates = [self.curves(shape, float(lr)) for shape, sc in self.shapes.items()
                           for lr in sorted({*grid.tolist(), *sc.lrs.tolist()})]

    def curves(self, shape: tuple, lr: float) -> Config:
        sc = self.shapes[shape]
        at = sc.at(lr)
        any_cfg = self.configs[with_lr(shape, float(sc.lrs[0]))]
        return Config(with_lr(shape, lr), any_cfg.candidate, sc.seeds, at["val"], at["test"], at["step"], at["cost"])

    @property
    def best(self) -> Config:
        return max(self.candidates, key=lambda c: c.final_val)

    @property
    def y_worst(self) -> float:
        return min(c.final_test for c in self.candidates)

    def space(self) -> FeasibleSpace:
        """The discrete level's space with space.lr the recorded range (log) instead of lr_choices."""
        return dataclasses.replace(self.discrete.space(), lr=(*self.lr_range, True), lr_choices=None)

    def lookup(self, sampled: dict[str, Any]) -> tuple[tuple, Config]:
        lr = float(sampled["lr"])
        recorded = self.discrete.key_of({**sampled, "lr": self.lr_range[0]})
        cfg = self.curves(shape_of(recorded), lr)
        return cfg.key, cfg


def load_table(table: str | Path | pd.DataFrame) -> dict[int, Level]:
    """Budget level -> its configurations' per-seed curves (ValueError on a missing column or a ragged table)."""
    df = table if isinstance(table, pd.DataFrame) else pd.read_csv(table)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"table lacks column(s) {', '.join(missing)}")
    df = df.sort_values(["budget", *KEY_COLUMNS, "seed", "epoch"])
    levels: dict[int, Level] = {}
    for budget, part in df.groupby("budget", sort=True):
        epochs = sorted(part["epoch"].unique())
        if epochs != list(range(1, len(epochs) + 1)):
            raise ValueError(f"budget {budget}: epochs {epochs} are not 1..E")
        configs: dict[tuple, Config] = {}
        for key, rows in part.groupby(list(KEY_COLUMNS), sort=True):
            key = (key[0], *(int(v) for v in key[1:1 + len(HYPERPARAMS)]), *(float(v) for v in key[-3:]))
            seeds = sorted(int(s) for s in rows["seed"].unique())
            if len(rows) != len(seeds) * len(epochs):
                raise ValueError(f"budget {budget}: {key} lacks some (seed, epoch) rows")

            def grid(col: str) -> np.ndarray:
                return rows[col].to_numpy(dtype=float).reshape(len(seeds), len(epochs))

            spent = grid("train_time_s") + grid("eval_time_s")
            first = rows.iloc[0]
            method = str(first["method"])
            values = tuple((k, int(first[k])) for k in get_method(method).hyperparams)
            cand = Candidate(method, values, int(first["adapter_params"]), int(first["equivalent_rank"]))
            configs[key] = Config(key, cand, seeds, grid("val_score"), grid("test_score"), grid("step"),
                                  np.diff(spent, axis=1, prepend=0.0))
        levels[int(budget)] = Level(int(budget), len(epochs), configs)
    return levels


@dataclass
class Event:
    """One reported epoch: when it finished, and what the scheduler decided."""

    time: float
    compute: float
    trial_id: str
    epoch: int
    score: float
    decision: str  # CONTINUE | STOP (ASHA's, or FIFO's CONTINUE)
    ended: str | None  # completed | stopped_early when the trial ended here


@dataclass
class ReplayRun:
    """What a replay did: its trials, its events in order, and the incumbent's regret after each."""

    level: Level
    strategy: str
    trials: dict[str, tuple[tuple, int]] = field(default_factory=dict)  # trial id -> (config key, seed)
    events: list[Event] = field(default_factory=list)
    trace: list[tuple[float, float]] = field(default_factory=list)  # (compute / grid compute, regret)
    searcher: Any = None

    def regret_at(self, fraction: float) -> float:
        """The regret once ``fraction`` of the grid's compute is spent (the last trace point at or before it)."""
        out = 1.0
        for at, regret in self.trace:
            if at > fraction + 1e-12:
                break
            out = regret
        return out

    def compute_to(self, regret_points: float) -> float:
        """The compute fraction at which the incumbent first came within ``regret_points`` of y* (in score
        units, e.g. 0.005), or inf."""
        spread = self.level.y_star - self.level.y_worst
        for at, regret in self.trace:
            if regret * spread <= regret_points + 1e-12:
                return at
        return math.inf


def make_searcher(level: Level, strategy: str, seed: int, n_startup_trials: int = 6,
                  points: list[dict[str, Any]] | None = None, prior: list[dict[str, Any]] | None = None):
    """The project's ``BudgetOptunaSearch`` over the level's space (``points``: {method, r, ..., lr} tried first).

    ``prior``: another table's results ({method, r, ..., lr, value}; ``value`` its score there), added to the
    study when the first point completes, shifted by that point's score here minus its ``value`` there: what
    ``warm_start`` does with an earlier search's learning-rate curve (the first point must be one of them)."""
    sampler, policy, _ = parse_strategy(strategy)
    space = level.space()
    params = [space.point_params(p) for p in points or []]
    curve = None
    if prior and params:
        fitting = []  # (the prior configuration, its Optuna parameters here) for those this level can run
        for p in prior:
            try:
                fitting.append((p, space.point_params(p)))
            except UsageError:
                continue
        anchor = next((p for p, here in fitting if here == params[0]), None)
        if anchor is None:
            raise ValueError("prior: the first point must be one of the prior's configurations")
        curve = {"anchor": "point0", "anchor_value": anchor["value"],
                 "trials": [{"params": here, "value": p["value"], "from": "prior"} for p, here in fitting]}
    return BudgetOptunaSearch(
        space, storage=InMemoryStorage(), study_name=f"replay-{level.budget}-{strategy}-{seed}",
        seed=seed, n_startup_trials=n_startup_trials, max_t=level.epochs, time_attr="epoch", metric=METRIC,
        mode="max", sampler=sampler, tell_policy=policy,
        points_to_evaluate=[] if curve else params,
        warm=[{"params": p, "from": f"point{i}"} for i, p in enumerate(params)] if curve else None, prior=curve,
    )


def make_replay_scheduler(level: Level, scheduler: str, reduction_factor: float = 3, grace_period: int = 1,
                          brackets: int = 1):
    """The registered scheduler as a search builds it (asha: FiniteASHA, stop_last_trials=False; fifo: FIFO;
    hyperband: HyperbandASHA, brackets 1 = every bracket that fits), from an ``asha`` section of these settings."""
    section = Asha(time_attr="epoch", grace_period=grace_period, reduction_factor=reduction_factor, brackets=brackets)
    scheduler = get_scheduler(scheduler).make(section, level.epochs)
    scheduler.set_search_properties(METRIC, "max")  # what tune.run does with TuneConfig(metric, mode)
    return scheduler


def replay(level: Level, strategy: str, seed: int, *, concurrency: int = 4, max_fraction: float = 1.0,
           reduction_factor: float = 3, n_startup_trials: int = 6, num_samples: float | None = None,
           points: list[dict[str, Any]] | None = None, grace_period: int = 1, brackets: int = 1,
           prior: list[dict[str, Any]] | None = None) -> ReplayRun:
    """Run one strategy on one level with the simulated clock (deterministic given ``seed``).

    ``num_samples``: most trials to start (Ray's; default: the grid's size for ``grid``, else unbounded).
    ``points``: configurations the searcher tries first (``points_to_evaluate``), in order.
    ``prior``: another table's results, added to the model once the first point completes (``make_searcher``).
    ``reduction_factor``, ``grace_period``, ``brackets``: the scheduler's ``asha`` settings.
    """
    sampler, _, scheduler_name = parse_strategy(strategy)
    run = ReplayRun(level, strategy)
    searcher = run.searcher = make_searcher(level, strategy, seed, n_startup_trials, points, prior)
    scheduler = make_replay_scheduler(level, scheduler_name, reduction_factor, grace_period, brackets)
    rng = np.random.default_rng(seed)
    if get_sampler(sampler).enumerates and isinstance(level, ContinuousLevel):
        raise UsageError(f"{strategy}: a grid needs recorded learning rates; replay it on the discrete level")
    if num_samples is None:
        num_samples = len(level.configs) if get_sampler(sampler).enumerates else math.inf
    target = max_fraction * level.grid_compute
    E = level.epochs

    trials: dict[str, Trial] = {}
    queue: list[tuple[float, int, str, int]] = []  # (finish time, start order, trial id, epoch)
    clock = compute = 0.0
    started = 0
    best: tuple | None = None  # (rank_key, -start order): the earliest trial wins a tie, as in the report
    incumbent: Config | None = None  # its configuration's curves
    curves: dict[str, Config] = {}  # trial id -> the curves it replays

    def start(now: float) -> None:
        nonlocal started
        while len(queue) < concurrency and started < num_samples:
            trial_id = f"{started:05d}"
            sampled = searcher.suggest(trial_id)
            if not isinstance(sampled, dict):
                return  # None: nothing to propose now; FINISHED: a finite space has run every configuration
            key, cfg = level.lookup(sampled)
            curves[trial_id] = cfg
            s = int(rng.integers(len(cfg.seeds)))
            trial = trials[trial_id] = Trial("replay", config=sampled, trial_id=trial_id, stub=True)
            scheduler.on_trial_add(None, trial)
            run.trials[trial_id] = (key, cfg.seeds[s])
            heapq.heappush(queue, (now + cfg.cost[s, 0], started, trial_id, 1))
            started += 1

    start(0.0)
    while queue:
        finish, order, trial_id, epoch = queue[0]
        spent = compute + len(queue) * (finish - clock)
        if spent >= target - 1e-9:
            break  # the budget runs out before (or as) this epoch ends: it and every in-flight epoch are cut
        heapq.heappop(queue)
        # the busy count changes only at events, so compute is exact piecewise-linear worker-seconds
        clock, compute = finish, spent
        key, seed_value = run.trials[trial_id]
        cfg = curves[trial_id]
        s = cfg.seeds.index(seed_value)
        score = float(cfg.val[s, epoch - 1])
        result = {METRIC: score, "epoch": epoch, "training_iteration": epoch, "step": int(cfg.step[s, epoch - 1]),
                  "status": "completed" if epoch == E else "running", "trial_id": trial_id}
        trial = trials[trial_id]
        decision = scheduler.on_trial_result(None, trial, result)
        if decision != TrialScheduler.STOP:
            searcher.on_trial_result(trial_id, result)
        ended = None
        if decision == TrialScheduler.STOP or epoch == E:
            scheduler.on_trial_complete(None, trial, result)
            searcher.on_trial_complete(trial_id, result)
            ended = "completed" if epoch == E else "stopped_early"
            rk = (rank_key(ended, score), -order)
            if best is None or rk > best:
                best, incumbent = rk, cfg
        else:
            heapq.heappush(queue, (clock + cfg.cost[s, epoch], order, trial_id, epoch + 1))
        run.events.append(Event(clock, compute, trial_id, epoch, score, decision, ended))
        if incumbent is not None:
            run.trace.append((compute / level.grid_compute, level.regret(incumbent.final_test)))
        start(clock)
    if queue:
        compute = target  # the in-flight epochs ran until the budget was spent
    if run.trace:
        run.trace.append((compute / level.grid_compute, run.trace[-1][1]))
    return run
