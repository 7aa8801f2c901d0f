"""Cells: the unit of a fair comparison, and the searcher and scheduler that keep them apart.

A cell is (method, budget level). Comparing methods is only fair when each was tuned alike, so a search gives
every cell the same tuning effort and keeps the cells' evidence apart:

* **Equal shares.** ``CellSearcher`` hands out trials round-robin over the cells (the cell with the fewest
  trials so far, in a fixed order: levels ascending, then the space's method order) until each has its share
  (``trials_per_cell``, or ``num_samples`` / cells). Every cell draws its learning rate from the same range,
  trains under the same fidelity schedule, and runs side by side with the others on the same Ray cluster and
  concurrency limit.
* **One study per cell.** Each cell has its own ``BudgetOptunaSearch`` over its own single-method feasible
  space, stored as the Optuna study ``<search study>.<method>@<level>``: one cell's results never steer
  another's proposals. (TPE over a categorical ``method`` would give the method that looks good early most of
  the trials: the demo once gave LoRA 1 trial and MELoRA 5.)
* **Early stopping within a cell.** ``CellScheduler`` runs one copy of the space's scheduler (ASHA by default)
  per cell: a trial is compared only with its own cell's trials at a rung, so a method whose curves start
  slowly is not stopped because another method is ahead after one epoch. Each rung decision is appended to
  ``<experiment>/rungs.jsonl`` (trial, cell, rung, score, decision and the rung's peers), so the claim can be
  checked on the records.

The round-robin order is a function of the per-cell counts alone, which Ray snapshots with the searcher: a
driver killed and resumed hands its lost trials' Optuna trials (orphans, see ``search.searcher``) back to the
same cells in the same order, and the shares hold.

This module is what a cell is (labels, shares, the dry run's lines) and loads nothing heavy; the Ray Tune
searcher and scheduler are in ``search.cell_search``.
"""

from __future__ import annotations

from melora_tune.records.schema import cell_label, parse_cell  # noqa: F401  (cell_label re-exported: cells named as in records)

CELL_KEY = "cell"  # the sampled config's key (and MLflow tag melora.cell) naming a trial's cell
RUNGS_NAME = "rungs.jsonl"


def cell_study_name(study_name: str, method: str, level: int) -> str:
    """The Optuna study of one cell of a search."""
    return f"{study_name}.{cell_label(method, level)}"


def split_shares(num_samples: int, cells: list[str], trials_per_cell: int | None) -> dict[str, int]:
    """Each cell's share of the trials (equal). ValueError (a sentence) when ``num_samples`` does not divide."""
    if trials_per_cell is not None:
        return {c: trials_per_cell for c in cells}
    if num_samples % len(cells):
        lower = max(1, num_samples // len(cells)) * len(cells)
        raise ValueError(
            f"num_samples={num_samples} does not split evenly over the {len(cells)} cells ({', '.join(cells)}): "
            f"give num_samples a multiple of {len(cells)} (e.g. {lower} or {lower + len(cells)}), or trials_per_cell"
        )
    return {c: num_samples // len(cells) for c in cells}


def cell_lines(feasible, shares: dict[str, int]) -> list[str]:
    """The dry run's line per cell (``feasible``: ``search.space.FeasibleSpace``), infeasible cells named with why."""
    out = []
    levels = feasible.budget_levels
    for level in levels:
        for method in feasible.methods:
            key = (method, level)
            label = cell_label(method, level)
            if key in feasible.cells:
                cell = feasible.cells[key]
                params = sorted({c.adapter_params for c in cell.candidates[method]})
                size = f"{params[0]:,}" if len(params) == 1 else f"{params[0]:,}-{params[-1]:,}"
                configs = f"{cell.size(method)} config" + ("s" if cell.size(method) != 1 else "")
                out.append(f"  {label:<16} {shares.get(label, 0):>3} trials over {configs:>12} ({size} params)")
            elif key in feasible.infeasible:
                out.append(f"  {label:<16}   - no cell: {feasible.infeasible[key]}")
    return out


def effort_warnings(space, feasible, warm: dict[str, list] | None = None) -> list[str]:
    """Why a space's comparison is not equal-effort, one sentence each (the dry run and the report print them)."""
    out = []
    lr = space.space
    if lr.lr_choices is None and lr.lr.low == lr.lr.high:
        out.append(f"every cell trains one fixed learning rate ({lr.lr.low:g}): the methods are not tuned, so a "
                   "difference between them may be the learning rate's; give space.lr a range for a fair comparison")
    elif lr.lr_choices is not None and len(lr.lr_choices) == 1:
        out.append(f"every cell trains one learning rate ({lr.lr_choices[0]:g}): not a tuned comparison; list a few")
    methods_with_points = {p["method"] for p in space.points_to_evaluate}
    if methods_with_points and methods_with_points != set(feasible.methods):
        out.append(f"points_to_evaluate seed only {', '.join(sorted(methods_with_points))}: those cells start from "
                   "known configurations and the others do not (not equal-effort)")
    if warm:
        cold = sorted(label for label, points in warm.items() if not points)
        if cold and len(cold) < len(warm):
            out.append(f"warm start reaches only some cells ({', '.join(cold)} start cold): those cells are not "
                       "tuned alike; warm-start from a search of every method, or none")
    return out


def warm_lines(warm: dict[str, list[dict]], priors: dict[str, dict] | None = None) -> list[str]:
    """The dry run's lines: what each cell starts from (``search.warm_start``)."""
    lines = []
    for label, points in warm.items():
        if points:
            curve = len((priors or {}).get(label, {}).get("trials", []))
            lines.append(f"  {label:<16} starts with {len(points)} configuration(s) from "
                         + ", ".join(f"{p['from']} ({p['value']:.4f})" for p in points)
                         + (f"; its curve ({curve} earlier results) joins the model once the first is trained here"
                            if curve else ""))
        else:
            lines.append(f"  {label:<16} starts cold: no completed configuration of its method fits it")
    return lines


def cell_study_names(study_name: str, storage) -> dict[str, str]:
    """A search's per-cell Optuna study names by cell label (``cell_study_name``), levels ascending then methods."""
    import optuna  # heavy: the dry run and --help use this module without Optuna

    prefix = study_name + "."
    found = []
    for name in optuna.study.get_all_study_names(storage):
        cell = parse_cell(name[len(prefix):]) if name.startswith(prefix) else None
        if cell is not None:
            found.append((cell[1], cell[0], name))
    return {cell_label(method, level): name for level, method, name in sorted(found)}


def cell_studies(study_name: str, storage) -> dict[str, "optuna.Study"]:  # noqa: F821
    """A search's Optuna studies by cell label; a search from before cells has one study, named ``study_name``,
    returned under the label ``""``."""
    import optuna  # heavy: the dry run and --help use this module without Optuna

    out = {label: optuna.load_study(study_name=name, storage=storage)
           for label, name in cell_study_names(study_name, storage).items()}
    if not out and study_name in optuna.study.get_all_study_names(storage):
        out[""] = optuna.load_study(study_name=study_name, storage=storage)
    return out
