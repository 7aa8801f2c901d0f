"""The feasible search space as an Optuna define-by-run function.

A budget couples the hyperparameters (MELoRA's r depends on n, PRoLoRA's u on
r...), but Optuna needs one fixed set of choices per parameter name. So the
space is a tree computed once from ``enumerate_feasible``: each level's
parameter name carries the values of its parents, and its choices are exactly
the values that still lead to a feasible configuration::

    method                       -> {melora, lora}
    melora.n                     -> the n's with at least one feasible r
    melora.r|n=4                 -> the r's feasible with n=4
    lora.r                       -> the feasible r's
    prolora.r -> prolora.u|r=8 -> prolora.m|r=8,u=2 [-> prolora.m_b|r=8,u=2,m=4]

A name's choice set depends only on its parents (which are in the name), so
it never changes between trials; every path through the tree ends at a
feasible ``Candidate`` and every feasible candidate is the end of one path.
Hence the search only ever proposes configurations within budget and can
reach every one of them (``reachable()`` enumerates the tree for tests).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from melora_tune.adapters import HYPERPARAMS, AdapterConfig, describe, get_method  # noqa: F401
from melora_tune.adapters.accounting import ModelSpec
from melora_tune.adapters.budget import Candidate, budget_floor, enumerate_feasible, smallest_config
from melora_tune.adapters.inject import default_target_modules, find_head_modules
from melora_tune.data.registry import num_labels_of
from melora_tune.errors import UsageError
from melora_tune.search.schema import SearchSpace


def candidate_key(c: Candidate) -> tuple:
    return c.key


@dataclass
class FeasibleSpace:
    """Every feasible configuration of each method, arranged as a conditional tree for Optuna."""

    methods: tuple[str, ...]
    candidates: dict[str, list[Candidate]]
    budget: int
    min_fraction: float
    lr: tuple[float, float, bool]  # low, high, log
    alpha: float
    dropout: float
    alpha_choices: list[float] | None = None
    dropout_choices: list[float] | None = None
    lr_choices: list[float] | None = None  # a categorical lr (space.lr_choices) instead of the range
    seeds: list[int] | None = None  # grid only: every configuration once per training seed
    tied: tuple[str, ...] = ()  # hyperparameters with no declared choices that follow another (m_b = m)
    target_modules: list[str] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    shapes_summary: str = ""
    spec: Any = field(default=None, repr=False, compare=False)  # the ModelSpec it was built from (meta device)
    memory: Any = field(default=None, repr=False, compare=False)  # search.memcheck.SearchMemory, set at start checks
    floor: int | None = None  # the fewest params a configuration may use (None: min_fraction x budget)

    def __post_init__(self) -> None:
        self.points: list[dict[str, Any]] = []  # points_to_evaluate as Optuna parameter names
        # the cells (method, level) -> single-method FeasibleSpace, and the empty ones with their reason
        self.budget_levels: list[int] = [self.budget]
        self.cells: dict[tuple[str, int], FeasibleSpace] = {}
        self.infeasible: dict[tuple[str, int], str] = {}
        self.tree: dict[str, dict] = {}
        self.by_key: dict[tuple, Candidate] = {}
        for method in self.methods:
            root: dict = {}
            levels = self.levels(method)
            for c in self.candidates[method]:
                node = root
                for key in levels[:-1]:
                    node = node.setdefault(getattr(c, key), {})
                node[getattr(c, levels[-1])] = c
                self.by_key[candidate_key(c)] = c
            self.tree[method] = root

    # ---- structure --------------------------------------------------------------------
    def levels(self, method: str) -> tuple[str, ...]:
        """The method's hyperparameters in the order they are chosen, less those tied to another."""
        return tuple(k for k in get_method(method).hyperparams if k not in self.tied)

    @staticmethod
    def param_name(method: str, key: str, parents: list[tuple[str, int]]) -> str:
        name = f"{method}.{key}"
        if parents:
            name += "|" + ",".join(f"{k}={v}" for k, v in parents)
        return name

    def size(self, method: str) -> int:
        return len(self.candidates[method])

    def grid_size(self) -> int:
        """Trials in the full grid: feasible configurations x lr choices x alpha x dropout x seeds."""
        per_config = 1
        for choices in (self.lr_choices, self.alpha_choices, self.dropout_choices, self.seeds):
            per_config *= len(choices) if choices else 1
        return sum(len(c) for c in self.candidates.values()) * per_config

    def reachable(self) -> set[tuple]:
        """Every configuration some sequence of choices leads to (walks the tree exactly as ``__call__`` does)."""
        out: set[tuple] = set()

        def walk(method: str, node: Any, depth: int, parents: list[tuple[str, int]]) -> None:
            levels = self.levels(method)
            if depth == len(levels):
                assert isinstance(node, Candidate)
                out.add(candidate_key(node))
                return
            for value in self.choices(method, parents):
                walk(method, node[value], depth + 1, [*parents, (levels[depth], value)])

        for method in self.methods:
            walk(method, self.tree[method], 0, [])
        return out

    def choices(self, method: str, parents: list[tuple[str, int]]) -> list[int]:
        node = self.tree[method]
        for _, value in parents:
            node = node[value]
        return sorted(node)

    def distributions(self) -> dict[str, list]:
        """Every parameter name with its choice list (a name always has the same choices)."""
        out: dict[str, list] = {"method": list(self.methods)}

        def walk(method: str, depth: int, parents: list[tuple[str, int]]) -> None:
            levels = self.levels(method)
            if depth == len(levels):
                return
            options = self.choices(method, parents)
            out[self.param_name(method, levels[depth], parents)] = options
            for value in options:
                walk(method, depth + 1, [*parents, (levels[depth], value)])

        for method in self.methods:
            walk(method, 0, [])
        return out

    # ---- the define-by-run function -----------------------------------------------------
    def __call__(self, trial) -> dict[str, Any]:
        """Sample one feasible configuration; ``trial`` is an ``optuna.Trial`` (or Ray's wrapper of one)."""
        method = trial.suggest_categorical("method", list(self.methods))
        levels = self.levels(method)
        node: Any = self.tree[method]
        parents: list[tuple[str, int]] = []
        for key in levels:
            value = trial.suggest_categorical(self.param_name(method, key, parents), sorted(node))
            parents.append((key, value))
            node = node[value]
        cand: Candidate = node
        if self.lr_choices:
            lr = trial.suggest_categorical("lr", self.lr_choices)
        else:
            low, high, log = self.lr
            lr = trial.suggest_float("lr", low, high, log=log)
        alpha = trial.suggest_categorical("alpha", self.alpha_choices) if self.alpha_choices else self.alpha
        dropout = trial.suggest_categorical("dropout", self.dropout_choices) if self.dropout_choices else self.dropout
        excess = self.budget_excess(cand)
        if excess > 0:  # cannot happen: the tree holds feasible candidates only
            raise RuntimeError(f"infeasible candidate {cand} in the search tree (budget {self.budget})")
        hp = {
            "method": method,
            **{k: getattr(cand, k) for k in HYPERPARAMS},
            "lr": float(lr),
            "alpha": float(alpha),
            "dropout": float(dropout),
        }
        trial.set_user_attr("config", describe(hp))
        if self.seeds:
            hp["seed"] = int(trial.suggest_categorical("seed", self.seeds))
        trial.set_user_attr("adapter_params", cand.adapter_params)
        trial.set_user_attr("equivalent_rank", cand.equivalent_rank)
        trial.set_user_attr("budget", self.budget)
        with warnings.catch_warnings():  # a re-run of an interrupted trial sets it again (Optuna keeps the first)
            warnings.simplefilter("ignore")
            trial.set_constraint("budget", float(excess))
        return {**hp, "adapter_params": cand.adapter_params, "equivalent_rank": cand.equivalent_rank,
                "budget": self.budget, "optuna_trial": int(trial.number)}

    def candidate(self, params: dict[str, Any]) -> Candidate:
        """The candidate that Optuna parameters (a path through the tree) reach."""
        method = params["method"]
        node: Any = self.tree[method]
        parents: list[tuple[str, int]] = []
        for key in self.levels(method):
            value = params[self.param_name(method, key, parents)]
            parents.append((key, value))
            node = node[value]
        return node

    def budget_excess(self, cand: Candidate) -> float:
        """The ``budget`` constraint of a trial of ``cand``: its parameters above the budget or below the floor
        (<= 0: feasible, always so for the tree's candidates)."""
        floor = self.floor if self.floor is not None else budget_floor(self.min_fraction, self.budget)
        return float(max(cand.adapter_params - self.budget, floor - cand.adapter_params))

    def point_params(self, point: dict[str, Any], where: str = "point") -> dict[str, Any]:
        """A user's {method, n, r, ..., lr} as Optuna parameter names (UsageError if it is not feasible)."""
        method = point.get("method")
        if method not in self.methods:
            raise UsageError(f"{where}: method {method!r} is not one of the searched methods {list(self.methods)}")
        out: dict[str, Any] = {"method": method}
        parents: list[tuple[str, int]] = []
        node: Any = self.tree[method]
        for key in self.levels(method):
            options = sorted(node)
            value = point.get(key)
            if value is None and len(options) == 1:
                value = options[0]
            if value not in node:
                shown = ", ".join(f"{k}={v}" for k, v in parents)
                raise UsageError(
                    f"{where}: {method} {key}={value} is not feasible under the budget"
                    + (f" with {shown}" if shown else "") + f" (feasible {key}: {', '.join(map(str, options))})"
                )
            out[self.param_name(method, key, parents)] = value
            parents.append((key, value))
            node = node[value]
        low, high, _ = self.lr
        lr = float(point["lr"])
        if self.lr_choices and lr not in self.lr_choices:
            raise UsageError(f"{where}: lr={lr:g} is not among space.lr_choices {self.lr_choices}")
        if not self.lr_choices and not low <= lr <= high:
            raise UsageError(f"{where}: lr={lr:g} is outside space.lr [{low:g}, {high:g}]")
        out["lr"] = lr
        for key, choices in (("alpha", self.alpha_choices), ("dropout", self.dropout_choices)):
            if key in point:
                if not choices or float(point[key]) not in choices:
                    raise UsageError(f"{where}: {key}={point[key]} is not among the searched space.{key} choices {choices}")
                out[key] = float(point[key])
        return out

    # ---- reporting --------------------------------------------------------------------
    def summary_lines(self) -> list[str]:
        lines = []
        for method in self.methods:
            cands = self.candidates[method]
            params = [c.adapter_params for c in cands]
            ranks = [c.equivalent_rank for c in cands]
            values = {key: sorted({getattr(c, key) for c in cands}) for key in self.levels(method)}
            shown = ", ".join(f"{k} in {{{', '.join(map(str, v))}}}" for k, v in values.items())
            lines.append(
                f"  {method:<8} {len(cands):>4} feasible configs ({shown}); {min(params):,}-{max(params):,} params, "
                f"equivalent rank {min(ranks)}-{max(ranks)}"
            )
        low, high, log = self.lr
        if self.lr_choices:
            lines.append(f"  lr       one of {', '.join(f'{v:g}' for v in self.lr_choices)}")
        else:
            lines.append(f"  lr       {'log-uniform' if log else 'uniform'} [{low:g}, {high:g}]")
        if self.seeds:
            lines.append(f"  seed     each of {self.seeds} (training.seed)")
        if self.alpha_choices:
            lines.append(f"  alpha    {self.alpha_choices}")
        if self.dropout_choices:
            lines.append(f"  dropout  {self.dropout_choices}")
        return lines


def model_spec(space: SearchSpace):
    """The model's layer shapes from its config alone (meta device; needs config.json, not the weights)."""
    return ModelSpec.from_pretrained(space.model, task=space.task_type, num_labels=num_labels_of(space.task))


def _choices_for(space: SearchSpace, method: str) -> dict[str, Any]:
    """The declared choices (space.r, space.n, ...) of the hyperparameters this method uses."""
    return {k: getattr(space.space, k) for k in get_method(method).hyperparams}


def _level_candidates(shapes, method: str, level: int, floor: int, base: AdapterConfig,
                      choices: dict[str, Any]) -> list[Candidate]:
    cands = enumerate_feasible(shapes, method, level, min_fraction=0.0, base=base, **choices)
    return sorted((c for c in cands if c.adapter_params >= floor), key=candidate_key)


def _why_empty(shapes, method: str, level: int, floor: int, base: AdapterConfig, choices: dict[str, Any],
               budget) -> str:
    """Why a cell (method, level) holds no configuration, and what to change (one line)."""
    cheapest = smallest_config(shapes, method, base=base, **choices)
    if cheapest.adapter_params > level:
        return (f"its smallest configuration ({describe(cheapest.to_dict())}) needs {cheapest.adapter_params:,} "
                f"params, over the level's {level:,}")
    under = enumerate_feasible(shapes, method, level, min_fraction=0.0, base=base, **choices)
    largest = max(c.adapter_params for c in under)
    hint = (f"lower budget.min_fraction to <= {math.floor(largest / level * 1000) / 1000:g}"
            if budget.min_fraction is not None else "add a level nearer it, or give budget.min_fraction")
    return f"no configuration uses between {floor:,} and {level:,} params; the largest within it uses {largest:,}: {hint}"


def build_space(space: SearchSpace, spec=None) -> FeasibleSpace:
    """Enumerate every feasible configuration of every cell (method, budget level).

    Returns the union over levels (what the memory check, the dry run and ``grid_size`` read) with ``cells``:
    one single-method ``FeasibleSpace`` per feasible cell, and ``infeasible``: the cells that hold no
    configuration, each with its reason. UsageError when a method has no feasible cell at any level.
    """
    spec = spec if spec is not None else model_spec(space)
    targets = list(space.adapter.target_modules or default_target_modules(spec.model))
    heads = (
        list(space.adapter.modules_to_save)
        if space.adapter.modules_to_save is not None
        else find_head_modules(spec.model, space.task_type, num_labels_of(space.task))
    )
    shapes = spec.targets(targets)
    spec.head_params(heads)  # names a modules_to_save entry that matches nothing
    budget = space.budget
    levels = budget.level_list
    single = len(levels) == 1
    cell_cands: dict[tuple[str, int], list[Candidate]] = {}
    infeasible: dict[tuple[str, int], str] = {}
    too_small: dict[str, Candidate] = {}
    for method in space.methods:
        base = AdapterConfig(method=method, alpha=space.adapter.alpha, target_modules=targets, modules_to_save=heads)
        choices = _choices_for(space, method)
        cheapest = smallest_config(shapes, method, base=base, **choices)
        if cheapest is None:
            declared = ", ".join(f"space.{k}={v}" for k, v in choices.items() if v is not None) or "the defaults"
            raise UsageError(
                f"no {method} configuration within {declared} fits the {len(shapes)} target layers "
                f"({', '.join(targets)}): widen the choices"
            )
        for level in levels:
            floor = budget.floor(level)
            cands = _level_candidates(shapes, method, level, floor, base, choices)
            if cands:
                cell_cands[(method, level)] = cands
            else:
                infeasible[(method, level)] = _why_empty(shapes, method, level, floor, base, choices, budget)
        if not any(m == method for m, _ in cell_cands):
            if cheapest.adapter_params > levels[-1]:
                too_small[method] = cheapest
                continue
            if single:
                level = levels[0]
                under = enumerate_feasible(shapes, method, level, min_fraction=0.0, base=base, **choices)
                largest = max(c.adapter_params for c in under)
                fraction = budget.fraction
                raise UsageError(
                    f"no {method} configuration uses between {budget.floor(level):,} and {level:,} params "
                    f"(budget.min_fraction={fraction:g}); the largest within budget uses {largest:,}: "
                    f"lower budget.min_fraction to <= {math.floor(largest / level * 1000) / 1000:g}"
                )
            reasons = "; ".join(f"{level:,}: {infeasible[(method, level)]}" for level in levels)
            raise UsageError(f"no budget level holds a {method} configuration ({reasons})")
    if too_small:
        method, cheapest = max(too_small.items(), key=lambda kv: kv[1].adapter_params)
        others = f" ({', '.join(sorted(too_small))} all need more)" if len(too_small) > 1 else ""
        need = cheapest.adapter_params
        what = f"budget.max_params={levels[0]:,}" if single else f"the largest budget level ({levels[-1]:,})"
        raise UsageError(
            f"{what} fits no {method} configuration{others}: the smallest "
            f"({describe(cheapest.to_dict())}) needs {cheapest.adapter_params:,} params; "
            f"the smallest budget that fits every method is {need:,}"
        )
    s = space.space
    common = dict(
        lr=(s.lr.low, s.lr.high, s.lr.log),
        alpha=space.adapter.alpha,
        dropout=space.adapter.dropout,
        alpha_choices=s.alpha,
        dropout_choices=s.dropout,
        lr_choices=s.lr_choices,
        seeds=s.seeds,
        tied=tuple(k for k, hp in HYPERPARAMS.items() if hp.tied_to and getattr(s, k) is None),
        target_modules=targets,
        modules_to_save=heads,
        shapes_summary=f"{len(shapes)} layers ({', '.join(targets)})",
        spec=spec,
    )
    cells = {
        (method, level): FeasibleSpace(methods=(method,), candidates={method: cands}, budget=level,
                                       min_fraction=budget.fraction, floor=budget.floor(level), **common)
        for (method, level), cands in sorted(cell_cands.items(), key=lambda kv: (kv[0][1], space.methods.index(kv[0][0])))
    }
    union: dict[str, list[Candidate]] = {}
    for (method, _), cands in cell_cands.items():
        known = {candidate_key(c) for c in union.get(method, [])}
        union.setdefault(method, []).extend(c for c in cands if candidate_key(c) not in known)
    methods = tuple(m for m in space.methods if m in union)
    feasible = FeasibleSpace(
        methods=methods,
        candidates={m: sorted(union[m], key=candidate_key) for m in methods},
        budget=levels[-1],
        min_fraction=budget.fraction,
        floor=budget.floor(levels[0]),
        **common,
    )
    feasible.budget_levels = levels
    feasible.cells = cells
    feasible.infeasible = infeasible
    for cell in cells.values():
        cell.budget_levels = [cell.budget]
        cell.cells = {(cell.methods[0], cell.budget): cell}
    # points_to_evaluate go to the cell whose level is the smallest that holds them
    feasible.points = [feasible.point_params(p, f"points_to_evaluate[{i}]") for i, p in enumerate(space.points_to_evaluate)]
    for i, p in enumerate(space.points_to_evaluate):
        for (method, level), cell in cells.items():
            if method == p["method"]:
                try:
                    cell.points.append(cell.point_params(p, f"points_to_evaluate[{i}]"))
                    break
                except UsageError:
                    continue
    return feasible
