"""``melora-tune search SPACE.yaml``: a budget-constrained search (Optuna TPE + ASHA on Ray Tune, MLflow tracking).

Progress goes to stdout, one line per change (a trial started, reported,
ended), then a summary table with the best trial of each method marked.
``--dry-run`` validates the space, runs the checks a real start runs (storage
writable, tracking URI and Optuna storage usable, --address answering, a local
data file readable, each method's largest trial fitting its GPU's memory) and
prints how many configurations fit the budget per method and the memory
estimate of each method's largest one, without starting or writing anything. ``--resume`` continues the
newest interrupted search of the same space (or the one named by --name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from melora_tune.search.cells import cell_label, cell_lines, effort_warnings, warm_lines
from melora_tune.search.samplers import DEFAULT as DEFAULT_SAMPLER
from melora_tune.search.samplers import all_samplers, get_sampler
from melora_tune.search.schedulers import all_schedulers, get_scheduler


def strategies_help() -> str:
    """The registered samplers and schedulers, one line each (search --help)."""
    width = max(len(s.name) for s in [*all_samplers(), *all_schedulers()]) + 2
    lines = [f"samplers (the space's sampler: key, default {DEFAULT_SAMPLER}):"]
    lines += [f"  {s.name:<{width}}{s.summary}" for s in all_samplers()]
    lines.append("schedulers (the space's scheduler: key, default asha):")
    lines += [f"  {s.name:<{width}}{s.summary}" for s in all_schedulers()]
    return "\n".join(lines)


def add_search_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "search",
        help="search adapter hyperparameters under a parameter budget (Ray Tune + Optuna + ASHA + MLflow)",
        description=__doc__,
        epilog=strategies_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("space", help="search space YAML (see search_spaces/demo.yaml)")
    p.add_argument("--num-samples", type=int, default=None, help="number of trials (default: the space's num_samples)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    p.add_argument("--storage-path", default=None, help="where experiments go (default: the space's, else ./melora_runs)")
    p.add_argument("--name", default=None, help="experiment name (default: <space name>-<timestamp>)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted search (the newest of this space, or --name)")
    p.add_argument("--dry-run", action="store_true", help="validate and print the feasible space size per method; start nothing")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object at the end")
    p.add_argument("--verbose", action="store_true", help="also relay the trial workers' logs")
    p.set_defaults(func=search_command)
    return p


def search_command(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.dry_run:
        return _dry_run(args)
    from melora_tune.search.runner import run_search  # heavy (Ray Tune, MLflow, torch): not for --help

    result = run_search(
        args.space,
        num_samples=args.num_samples,
        address=args.address,
        tracking_uri=args.tracking_uri,
        storage_path=args.storage_path,
        resume=args.resume,
        name=args.name,
        verbose=args.verbose,
    )
    print()
    print(result.table())
    best = result.best_overall
    print(f"\nsearch {result.name}: {result.status} in {result.wall_s:.0f} s; {len(result.trials)} trials")
    for method, row in sorted(result.best.items()):
        print(f"  best {method}: {row.label} score {row.score:.4f} ({row.status.replace('_', ' ')})"
              + (f" adapter {row.checkpoint}" if row.checkpoint else ""))
    if best is None:
        print("  no trial produced a score")
    print(f"  experiment {result.experiment_path}")
    print(f"  optuna     {result.optuna_storage} (a study per cell: {result.study_name}.<method>@<budget>): "
          f"optuna-dashboard {result.optuna_storage}")
    print(f"  mlflow     {result.tracking_uri} parent run {result.parent_run_id}")
    confirmed = result.extra.get("confirm")
    if confirmed is not None:
        _print_confirm(confirmed)
    if args.json:
        print(json.dumps(result.to_dict(), default=str))
    if result.status == "interrupted":
        print(f"interrupted: continue with  melora-tune search {args.space} --resume --name {result.name}", file=sys.stderr)
        return 130
    return 0


def _dry_run(args) -> int:
    from melora_tune.search.experiment import dry_run  # heavy (torch, transformers): not for --help

    prep = dry_run(args.space, num_samples=args.num_samples, storage_path=args.storage_path,
                   tracking_uri=args.tracking_uri, name=args.name, resume=args.resume, address=args.address)
    space, feasible, shares = prep.space, prep.feasible, prep.shares
    total = sum(feasible.size(m) for m in feasible.methods)
    scheduler = get_scheduler(space.scheduler_name)
    asha = scheduler.phrase(space.asha, space.max_t)
    res = space.resources
    levels = space.budget.level_list
    print(f"{space.name}: {space.model} on {space.task.name}, {feasible.shapes_summary}")
    if len(levels) == 1:
        print(f"budget {levels[0]:,} adapter params (min fraction {space.budget.fraction:g}): {total} feasible configurations")
    else:
        floor = (f"min fraction {space.budget.min_fraction:g} of each" if space.budget.min_fraction is not None
                 else "each level's configurations use more than the level below")
        print(f"budget levels {' / '.join(f'{v:,}' for v in levels)} adapter params ({floor}): "
              f"{len(feasible.cells)} cells")
    for line in feasible.summary_lines():
        print(line)
    print("cells (method@budget level), tuned alike: each its own Optuna study, its share of the trials, "
          "early stopping among its own trials")
    for line in cell_lines(feasible, shares):
        print(line)
    if prep.warm:
        print(f"warm start from {', '.join(space.warm_start)} (each cell from its own method's best):")
        for line in warm_lines(prep.warm, prep.priors):
            print(line)
    for line in effort_warnings(space, feasible, prep.warm):
        print(f"warning: {line}")
    sampler = get_sampler(space.sampler).phrase(feasible)
    policy = ", stopped trials told as COMPLETE (stock)" if space.tell_policy == "stock" and scheduler.stops_early else ""
    share = set(shares.values())
    each = f" ({share.pop()} per cell)" if len(share) == 1 else ""
    print(f"{space.num_samples} trials{each} by {sampler}, at most {space.max_concurrent_trials} at once, {asha}{policy}"
          + ("; test scored at every evaluation (record_test)" if space.record_test else ""))
    where = "trained in the Tune trial process" if res.num_workers == 1 else f"{res.num_workers} Ray Train workers"
    print(f"each trial: {where}, {res.cpus_per_worker:g} CPU" + (" each" if res.num_workers > 1 else "")
          + (f" + {res.gpus_per_worker:g} GPU" if res.gpus_per_worker else "")
          + f", DeepSpeed ZeRO-{space.training.zero_stage}, {space.training.epochs} epoch(s)")
    if feasible.memory is not None:
        for line in feasible.memory.lines():
            print(line)
    if args.json:
        out = {m: [c.to_dict() for c in feasible.candidates[m]] for m in feasible.methods}
        out["cells"] = {label: {"trials": n} for label, n in shares.items()}  # beside the methods' candidate lists
        out["infeasible_cells"] = {cell_label(m, v): why for (m, v), why in feasible.infeasible.items()}
        if feasible.memory is not None:
            out["memory"] = feasible.memory.to_dict()  # beside the methods' candidate lists
        print(json.dumps(out))
    return 0


# ---- melora-tune confirm -------------------------------------------------------------------------

CONFIRM_DOC = """``melora-tune confirm SPACE.yaml``: confirm a finished search's best configurations.

The top ``confirm.top_k`` configurations per method (the search's ranking, on
validation) are trained again at full fidelity with ``confirm.seeds`` new seeds
each, as Ray Tune trials, and the final models are scored once on the test
split, which the search never loaded. The baselines (majority class, linear
probe) are computed on the same splits. Each confirmation is an MLflow child
run of the search, linked to the trial it confirms. Running it again resumes
and never trains a finished confirmation twice; ``melora-tune report`` then
shows the confirmed table, the paired comparison and the baselines.
"""


def add_confirm_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("confirm", help="retrain a search's best configurations with new seeds, scored on test",
                              description=CONFIRM_DOC, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("space", help="the search's space YAML")
    p.add_argument("--name", default=None, help="the search's experiment name (default: the newest search of this space)")
    p.add_argument("--storage-path", default=None, help="where the search's experiment is (default: the space's, else ./melora_runs)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: the search's)")
    p.add_argument("--address", default=None, help="join this Ray cluster (default: start a local one)")
    p.add_argument("--top-k", type=int, default=None, help="configurations per method (default: the space's confirm.top_k)")
    p.add_argument("--seeds", type=int, default=None, help="new seeds per configuration (default: the space's confirm.seeds)")
    p.set_defaults(func=confirm_command)
    return p


def _print_confirm(result) -> None:
    from melora_tune.search.confirm import summary_lines  # heavy (Ray Tune, MLflow): not for --help

    print(f"\nconfirmation of {result.search}: {result.status} in {result.wall_s:.0f} s; "
          f"{len(result.planned)} planned, {sum(1 for r in result.rows if r['status'] == 'completed')} completed")
    for line in summary_lines(result):
        print(line)
    print("  the report (melora-tune report) holds the confirmed table with 95% intervals, the paired comparison and the baselines")


def confirm_command(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from melora_tune.search.confirm import run_confirm  # heavy (Ray Tune, MLflow): not for --help

    result = run_confirm(args.space, storage_path=args.storage_path, name=args.name, tracking_uri=args.tracking_uri,
                         address=args.address, top_k=args.top_k, seeds=args.seeds)
    _print_confirm(result)
    if result.status == "interrupted":
        print(f"interrupted: continue with  melora-tune confirm {args.space} --name {result.search}", file=sys.stderr)
        return 130
    return 0
