"""The search space file: a pydantic schema, loaded from YAML and checked before Ray starts.

Every mistake a user can make in a space file becomes one ``UsageError`` line
(the CLI prints it and exits with status 2): an unknown key (with the closest
known one suggested), a wrong type, a bad range, an unknown method. Whether the
budget admits any configuration needs the model's layer shapes and is checked
in ``melora_tune.search.space.build_space``.

See ``search_spaces/demo.yaml`` for every key with its meaning and default.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from melora_tune.adapters.budget import budget_floor
from melora_tune.adapters.config import check_alpha, check_dropout, check_targets, split_list
from melora_tune.adapters.hyperparams import HYPERPARAMS, HyperParam, HyperparamSchema
from melora_tune.adapters.registry import method_names, owners
from melora_tune.errors import Schema, UsageError, closest, describe_validation_error, did_you_mean
from melora_tune.search.samplers import DEFAULT as DEFAULT_SAMPLER
from melora_tune.search.samplers import get_sampler, sampler_names
from melora_tune.search.schedulers import DEFAULT as DEFAULT_SCHEDULER
from melora_tune.search.schedulers import effective_name, get_scheduler
from melora_tune.trial.config import TaskSection, TrainingSection, TrialConfig

from melora_tune.records import DEFAULT_STORAGE_PATH, DEFAULT_TRACKING_URI  # noqa: E402,F401  (re-exported)


class FixedAdapter(Schema):
    """Adapter settings every trial shares (the searched ones live in ``space``); checked by the adapter schema."""

    target_modules: list[str] | None = None  # None: the model's attention query/value projections
    modules_to_save: list[str] | None = None  # None: the classification head (nothing for causal_lm)
    alpha: float = 16.0
    dropout: float = 0.0

    # the adapter schema's own checks
    _split = field_validator("target_modules", "modules_to_save", mode="before")(split_list)
    _alpha = field_validator("alpha")(check_alpha)
    _dropout = field_validator("dropout")(check_dropout)
    _targets = field_validator("target_modules")(check_targets)


class Budget(Schema):
    """The parameter budget: one level (``max_params``) or several (``levels``), each a column of cells.

    A cell is (method, level): the unit of a fair comparison. Its configurations use at most ``level``
    trainable adapter parameters and at least its floor: ``min_fraction`` x level when given, otherwise (with
    several levels) just above the level below, so the levels partition the parameter axis and a config
    belongs to one cell only; the lowest level's floor continues the same ratio downwards (level x
    level / next level, exclusive). One level without ``min_fraction``: no floor (0), as before levels.
    """

    max_params: int | None = Field(None, ge=1)  # one level (the search's budget)
    levels: list[int] | None = None  # several levels, ascending: e.g. [9216, 18432, 36864]
    min_fraction: float | None = Field(None, ge=0.0, le=1.0)  # floor of each level as a fraction of it

    @field_validator("levels")
    @classmethod
    def _levels(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("empty: give at least one level, e.g. [9216, 18432], or max_params")
        bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ValueError(f"budget levels must be integers >= 1, got {bad[0]!r}")
        if len(set(value)) != len(value):
            dup = next(v for v in value if value.count(v) > 1)
            raise ValueError(f"budget level {dup} is given twice: each level once, ascending")
        if value != sorted(value):
            raise ValueError(f"budget.levels must be ascending, got {value}: write {sorted(value)}")
        return value

    @model_validator(mode="after")
    def _one(self) -> "Budget":
        if self.max_params is None and self.levels is None:
            raise ValueError("give budget.max_params (one level) or budget.levels (several, ascending)")
        if self.max_params is not None and self.levels is not None:
            raise ValueError("give budget.max_params or budget.levels, not both (max_params is one level)")
        return self

    @property
    def level_list(self) -> list[int]:
        return list(self.levels) if self.levels is not None else [int(self.max_params)]

    @property
    def top(self) -> int:
        return self.level_list[-1]

    def floor(self, level: int) -> int:
        """The fewest parameters a configuration of this level's cells may use (inclusive)."""
        levels = self.level_list
        if self.min_fraction is not None:
            return budget_floor(self.min_fraction, level)
        if len(levels) == 1:
            return 0
        i = levels.index(level)
        if i > 0:
            return levels[i - 1] + 1
        return math.floor(Fraction(levels[0] * levels[0], levels[1])) + 1

    @property
    def fraction(self) -> float:
        """The floor as a fraction of the level (the min_fraction recorded in MLflow; 0 without a floor)."""
        return self.min_fraction if self.min_fraction is not None else 0.0


class FloatRange(Schema):
    low: float
    high: float
    log: bool = True

    @model_validator(mode="after")
    def _check(self) -> "FloatRange":
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got low={self.low:g}")
        if self.low > self.high:
            raise ValueError(f"low={self.low:g} is greater than high={self.high:g}")
        return self


def _int_choices(value: Any, name: str, minimum: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"give a list of integers, e.g. [1, 2, 4] (got {value!r})")
    if not value:
        raise ValueError("the list of choices is empty: leave the key out to use every value")
    out = []
    for v in value:
        if isinstance(v, bool) or not (isinstance(v, int) or (isinstance(v, float) and v.is_integer())):
            raise ValueError(f"choices must be integers, got {v!r}")
        if int(v) < minimum:
            raise ValueError(f"choices must be >= {minimum}, got {int(v)}")
        out.append(int(v))
    return sorted(set(out))


class SpaceSection(HyperparamSchema):
    """What the search varies. Integer choices left out mean "every value the layers allow".

    Each registered hyperparameter (``adapters.hyperparams``: n, r, u, m, m_b, a plug-in's own) is a key
    ``space.<name>``: a list of integer choices; None (left out): the method's default choices (n: every
    common divisor of the layer dims; r: 1 .. the largest the layers allow; u: 0..r; m: 1, 2, 4, ... 64;
    m_b: tied to m).
    """

    hyperparams_after = "seeds"

    lr: FloatRange = Field(default_factory=lambda: FloatRange(low=1e-4, high=1e-2, log=True))
    # A list of learning rates instead of the range: lr becomes a categorical choice (what the grid sampler
    # needs; TPE and random then draw from the same list). None: draw from space.lr.
    lr_choices: list[float] | None = None
    # Grid sampler only: repeat every configuration with each of these training seeds (training.seed of the
    # trial: init and data order; the split stays task.seed). How a tabulated benchmark gets its seeds.
    seeds: list[int] | None = None
    alpha: list[float] | None = None  # optional: search alpha too (overrides adapter.alpha)
    dropout: list[float] | None = None  # optional: search dropout too (overrides adapter.dropout)

    @classmethod
    def hyperparam_value(cls, hp: HyperParam, value: Any) -> Any:
        return _int_choices(value, hp.name, hp.minimum)

    @classmethod
    def hyperparam_default(cls, hp: HyperParam) -> Any:
        return None

    @field_validator("lr", mode="before")
    @classmethod
    def _lr(cls, value: Any) -> Any:
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return {"low": value, "high": value}  # a fixed learning rate
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return {"low": value[0], "high": value[1]}
        return value

    @field_validator("alpha", "dropout", "lr_choices", "seeds", mode="before")
    @classmethod
    def _lists(cls, value: Any, info) -> Any:
        """A single value is a one-item list; an empty list is refused (leaving the key out means something)."""
        if value is None:
            return None
        if not isinstance(value, (list, tuple)):
            value = [value]
        if not value:
            if info.field_name in ("alpha", "dropout"):
                raise ValueError("the list of choices is empty: leave the key out to keep the fixed adapter value")
            raise ValueError(f"the list is empty: leave space.{info.field_name} out")
        return value

    @field_validator("lr_choices")
    @classmethod
    def _lr_choices(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            bad = [v for v in value if not v > 0]
            if bad:
                raise ValueError(f"learning rates must be > 0, got {bad[0]:g}")
            return sorted(set(float(v) for v in value))
        return value

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            bad = [v for v in value if isinstance(v, bool) or not isinstance(v, int) or v < 0]
            if bad:
                raise ValueError(f"seeds must be integers >= 0, got {bad[0]!r}")
            return sorted(set(value))
        return value

    @model_validator(mode="after")
    def _one_lr(self) -> "SpaceSection":
        if self.lr_choices is not None and "lr" in self.model_fields_set:
            raise ValueError("give space.lr (a range) or space.lr_choices (a list), not both")
        return self

    @field_validator("alpha")
    @classmethod
    def _alpha(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            bad = [v for v in value if v <= 0]
            if bad:
                raise ValueError(f"alpha choices must be > 0, got {bad[0]:g}")
            return sorted(set(value))
        return value

    @field_validator("dropout")
    @classmethod
    def _dropout(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            bad = [v for v in value if not 0.0 <= v < 1.0]
            if bad:
                raise ValueError(f"dropout choices must be in [0, 1), got {bad[0]:g}")
            return sorted(set(value))
        return value


class SearchTraining(TrainingSection):
    """The trial's training section without ``lr`` (searched: ``space.lr``); ``epochs`` is the max fidelity."""

    @model_validator(mode="before")
    @classmethod
    def _no_lr(cls, data: Any) -> Any:
        if isinstance(data, dict) and "lr" in data:
            raise ValueError("training.lr is searched: give its range as space.lr: {low: 1.0e-4, high: 1.0e-2}")
        if isinstance(data, dict) and (data.get("score_test") or data.get("test_every_eval")):
            raise ValueError("a search's trials never see the test split: score it with the confirm section (confirm.enabled: true)")
        return data


class Confirm(Schema):
    """Retrain the best configurations with new seeds, at full fidelity, and score them on the test split."""

    enabled: bool = False  # run it right after the search (``melora-tune confirm`` runs it for a finished search)
    top_k: int = Field(1, ge=1)  # configurations per method, best first (the search's ranking, on validation)
    seeds: int = Field(3, ge=1)  # new seeds per configuration: training.seed + 1 .. + seeds (init and data order)
    max_concurrent_trials: int | None = Field(None, ge=1)  # None: the search's max_concurrent_trials


class Asha(Schema):
    enabled: bool = True
    time_attr: Literal["epoch", "training_iteration"] = "epoch"
    grace_period: int = Field(1, ge=1)  # epochs (or reports) every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1.0)  # keep the top 1/reduction_factor at each rung
    brackets: int = Field(1, ge=1)


class Resources(Schema):
    """What one trial asks of the cluster."""

    # DeepSpeed ranks per trial. 1: trained inside the Tune trial process (no Ray Train start-up), which then
    # holds cpus_per_worker (+ gpus_per_worker); more: a Ray Train TorchTrainer with that many workers.
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(0.0, ge=0, le=1)  # 0: CPU; 1: a GPU per worker; 0.5: two trials' workers share a GPU
    driver_cpus: float = Field(0.1, gt=0)  # the Tune trial of a multi-worker trial (it only waits on its TorchTrainer)
    # Restarts of a trial after an error or a lost node, from its last checkpoint. One worker: Tune restarts
    # the trial this many times. More: Train restarts its workers this many times, then the trial gives up
    # (a Tune restart, meant for a lost trial process, ends at once instead of repeating them).
    max_failures: int = Field(2, ge=0)
    # Memory of one GPU in GiB, for the check that each method's largest trial fits (trial config's
    # resources.gpu_memory_gb). None: measure this machine's GPU, or skip the check (and say so) without CUDA.
    gpu_memory_gb: float | None = Field(None, gt=0)


class SearchSpace(Schema):
    """A whole search: what to train, the budget, what to vary, how to schedule and where to run."""

    name: str
    model: str = "minilm"
    task_type: Literal["seq_cls", "causal_lm"] = "seq_cls"
    pooling: Literal["auto", "model", "mean", "cls"] = "auto"  # what the classifier reads (adapters.pooling)
    task: TaskSection = Field(default_factory=TaskSection)
    adapter: FixedAdapter = Field(default_factory=FixedAdapter)
    budget: Budget
    methods: list[str] = Field(default_factory=lambda: ["melora", "lora"])
    space: SpaceSection = Field(default_factory=SpaceSection)
    training: SearchTraining = Field(default_factory=SearchTraining)
    asha: Asha = Field(default_factory=Asha)
    # trials (all cells together): split evenly over the feasible cells (refused when it does not divide)
    num_samples: int = Field(8, ge=1)
    # trials each cell (method, budget level) gets; num_samples is then cells x trials_per_cell
    trials_per_cell: int | None = Field(None, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)
    n_startup_trials: int | None = Field(None, ge=0)  # random trials before TPE per cell (None: a third of a share, 2..10)
    # Which Optuna sampler proposes configurations, always over the feasible-only space: random (the default: no
    # model-based sampler beat it on the benchmark tables, samplers/registry.py), tpe (multivariate TPE), or grid
    # (Optuna's BruteForceSampler: every feasible configuration x space.lr_choices [x space.seeds] exactly once;
    # num_samples defaults to the grid's size). Any registered sampler (melora_tune/search/samplers/).
    sampler: str = DEFAULT_SAMPLER
    # What stops trials early: asha (the asha section's settings) or fifo (none, as asha.enabled: false).
    # Any registered scheduler (melora_tune/search/schedulers/).
    scheduler: str = DEFAULT_SCHEDULER
    # What a trial ASHA stopped tells the sampler: fidelity (PRUNED, see search/searcher.py) or stock
    # (what Ray's OptunaSearch does: COMPLETE with its partial-fidelity score). For comparisons.
    tell_policy: Literal["fidelity", "stock"] = "fidelity"
    # Record a tabulated benchmark: every evaluation also scores the test split (test_* metrics). Only for
    # a full grid without early stopping, where nothing is selected inside the search.
    record_test: bool = False
    seed: int = Field(0, ge=0)
    # Earlier searches (experiment folder or space name, same storage path) whose best configurations of each
    # method start this search's cells of that method (search/warm_start.py).
    warm_start: list[str] = Field(default_factory=list)
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)  # configs to try first, e.g. {method: lora, r: 8, lr: 5e-4}
    resources: Resources = Field(default_factory=Resources)
    confirm: Confirm = Field(default_factory=Confirm)
    storage_path: str | None = None  # None: ./melora_runs
    optuna_storage: str | None = None  # None: sqlite:///<storage_path>/optuna.db
    tracking_uri: str | None = None  # None: sqlite:///mlflow.db in the working directory
    # Seconds a local Ray may take to start (its GCS server; MELORA_RAY_START_TIMEOUT_S wins). None: Ray's own 30 s.
    ray_start_timeout_s: float | None = Field(None, gt=0, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value or ""):
            raise ValueError(f"name must be letters, digits, '_', '-' or '.', got {value!r}")
        return value

    @field_validator("methods", mode="before")
    @classmethod
    def _methods(cls, value: Any) -> Any:
        value = split_list(value)
        if isinstance(value, str):
            value = [value]
        known = list(method_names())
        if not isinstance(value, list) or not value:
            raise ValueError(f"give a list of methods from {', '.join(known)}")
        out = []
        for v in value:
            key = str(v).strip().lower()
            if key not in known:
                raise ValueError(f"unknown method {v!r}{did_you_mean(key, known)}: choose from {', '.join(known)}")
            if key not in out:
                out.append(key)
        return out

    @field_validator("sampler")
    @classmethod
    def _sampler(cls, value: str) -> str:
        sampler = get_sampler(value)  # UsageError: unknown, with the closest and the known ones
        sampler.check()  # UsageError: an optional package it needs is missing
        return sampler.name

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, value: str) -> str:
        return get_scheduler(value).name

    @field_validator("points_to_evaluate")
    @classmethod
    def _points(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        known = ("method", *HYPERPARAMS, "lr", "alpha", "dropout")
        for i, point in enumerate(value):
            for key in point:
                if key not in known:
                    close = closest(str(key), list(known), cutoff=0.5)
                    hint = f" (did you mean {close!r}?)" if close else ""
                    raise ValueError(f"point {i}: unknown key {key!r}{hint}; known: {', '.join(known)}")
            if "method" not in point or "lr" not in point:
                raise ValueError(f"point {i}: give at least method and lr (and the method's n/r/u/m)")
        return value

    @model_validator(mode="after")
    def _check(self) -> "SearchSpace":
        for key in HYPERPARAMS:
            users = owners(key)
            if getattr(self.space, key) is not None and not any(m in self.methods for m in users):
                raise ValueError(f"space.{key} applies to {'/'.join(users)} only, which is not in methods {self.methods}")
        if self.asha.time_attr == "training_iteration" and self.training.eval_every_steps is not None:
            raise ValueError(
                "asha.time_attr training_iteration counts reports, which eval_every_steps makes more than one an epoch: "
                "use time_attr: epoch"
            )
        if self.confirm.enabled and self.task.test_fraction == 0:
            raise ValueError(
                "confirm scores the test split, and task.test_fraction is 0 (no test split): "
                "set task.test_fraction (e.g. 0.1), or confirm.enabled: false"
            )
        sampler = get_sampler(self.sampler)
        grids = " or ".join(s for s in sampler_names() if get_sampler(s).enumerates)
        if sampler.enumerates and self.space.lr_choices is None:
            raise ValueError(f"sampler {self.sampler} needs a list of learning rates: space.lr_choices: [1.0e-3, 3.0e-3, 1.0e-2]")
        if self.space.seeds is not None and not sampler.enumerates:
            raise ValueError(f"space.seeds repeats every grid point per seed: use sampler: {grids}, or drop space.seeds")
        if self.scheduler != DEFAULT_SCHEDULER and not self.asha.enabled and get_scheduler(self.scheduler).stops_early:
            raise ValueError(f"asha.enabled: false means no early stopping, and scheduler is {self.scheduler}: "
                             "drop one of them")
        if self.record_test:
            if not sampler.enumerates or get_scheduler(self.scheduler_name).stops_early:
                raise ValueError(
                    "record_test scores the test split at every evaluation, which only a full grid without early "
                    f"stopping may do: set sampler: {grids} and asha.enabled: false, or record_test: false"
                )
            if self.task.test_fraction == 0:
                raise ValueError("record_test needs a test split, and task.test_fraction is 0: set it (e.g. 0.1)")
        if self.scheduler_name == DEFAULT_SCHEDULER and self.asha.grace_period > self.training.epochs:
            raise ValueError(
                f"asha.grace_period={self.asha.grace_period} exceeds training.epochs={self.training.epochs} (the max fidelity)"
            )
        return self

    # ---- derived ------------------------------------------------------------------
    @property
    def scheduler_name(self) -> str:
        """The scheduler this space runs (``asha.enabled: false`` with the default asha: fifo)."""
        return effective_name(self.scheduler, self.asha.enabled)

    @property
    def max_t(self) -> int:
        """ASHA's max fidelity: epochs (a report per epoch when time_attr is training_iteration)."""
        return self.training.epochs

    def startup_trials(self, share: int | None = None) -> int:
        """Random trials before a model-based sampler takes over, in each cell's study (``share``: its trials):
        n_startup_trials, or about a third of the share within 2..10."""
        if self.n_startup_trials is not None:
            return self.n_startup_trials
        return max(2, min(10, (share if share is not None else self.num_samples) // 3))

    def base_trial_dict(self, target_modules: list[str] | None = None, modules_to_save: list[str] | None = None) -> dict[str, Any]:
        """The TrialConfig dict every trial starts from (the adapter's searched values are filled per trial)."""
        return self.base_trial(target_modules, modules_to_save).to_dict()

    def base_trial(self, target_modules: list[str] | None = None, modules_to_save: list[str] | None = None) -> TrialConfig:
        """The validated TrialConfig every trial starts from: where a space whose trials cannot be configured is
        refused (UsageError "space <name>: ...")."""
        training = self.training.model_dump(mode="json")
        if self.record_test:
            training.update(score_test=True, test_every_eval=True)
        res = self.resources
        data = {
            "model": self.model,
            "task_type": self.task_type,
            "pooling": self.pooling,
            "task": self.task.model_dump(mode="json"),
            "adapter": {
                "method": self.methods[0],
                "alpha": self.adapter.alpha,
                "dropout": self.adapter.dropout,
                "target_modules": target_modules if target_modules is not None else self.adapter.target_modules,
                "modules_to_save": modules_to_save if modules_to_save is not None else self.adapter.modules_to_save,
            },
            "training": {**training, "lr": self.space.lr.low},
            "resources": {"num_workers": res.num_workers, "use_gpu": res.gpus_per_worker > 0,
                          "cpus_per_worker": res.cpus_per_worker, "max_failures": res.max_failures},
        }
        if res.gpus_per_worker > 0:
            data["resources"]["gpus_per_worker"] = res.gpus_per_worker
        if res.gpu_memory_gb is not None:
            data["resources"]["gpu_memory_gb"] = res.gpu_memory_gb
        return TrialConfig.from_dict(data, source=f"space {self.name}")


# ---- loading and error messages -------------------------------------------------------

def describe_error(err: ValidationError) -> str:
    """One line for the first problem of a space file (and a count of the others)."""
    return describe_validation_error(err, SearchSpace, what="space file")


def parse_space(data: Any, source: str = "space") -> SearchSpace:
    if not isinstance(data, dict):
        raise UsageError(f"{source}: expected a mapping of keys (name, model, task, budget, methods, space, ...), got {type(data).__name__}")
    try:
        return SearchSpace.model_validate(data)
    except ValidationError as err:
        raise UsageError(f"{source}: {describe_error(err)}") from None
    except UsageError as err:  # raised by a reused section's own checks
        raise UsageError(f"{source}: {err}") from None


def load_space(path: str | Path) -> tuple[SearchSpace, str]:
    """The validated space and the file's text (logged to MLflow as the search's artifact)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"search space {path} does not exist")
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = " ".join(str(err).strip().splitlines()[:2])
        raise UsageError(f"{path} is not valid YAML: {first}") from None
    return parse_space(data, source=str(path)), text
