"""``melora-tune train CONFIG.yaml [--set k=v ...]``: one trial, no search.

Progress (Ray's and the workers') goes to stderr; stdout gets only the result:
a table, or one JSON object with ``--json``. Running the same command again
resumes the trial from its latest checkpoint: the run name defaults to the
config file's name plus a hash of the effective config.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from melora_tune.errors import UsageError
from melora_tune.trial.config import load_trial_config
from melora_tune.trial.driver import run_trial
from melora_tune.trial.memory import check_fits, estimate, gpu_memory
from melora_tune.trial.prepare import prepare_trial
from melora_tune.trial.ray_env import check_ray_address, check_run_name, check_storage, start_timeout

DEFAULT_STORAGE = "melora_runs"


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="run one trial (train, evaluate, checkpoint) without a search",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", help="trial YAML (see melora_tune/trial/example_trial.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override settings: dotted (adapter.r=2 training.lr=5e-4) or short (method=melora n=4 r=2 lr=5e-4 epochs=1)",
    )
    p.add_argument("--storage-path", default=DEFAULT_STORAGE, help=f"where runs and checkpoints go (default ./{DEFAULT_STORAGE})")
    p.add_argument("--name", default=None, help="run name; the same name and storage path resume (default: config name + config hash)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster instead of starting a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.set_defaults(func=train_command)
    return p


def default_name(config_path: str, cfg) -> str:
    digest = hashlib.sha1(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"{Path(config_path).name.split('.')[0]}-{digest}"


@contextlib.contextmanager
def stdout_to_stderr():
    """Send everything written to fd 1 (Ray's log relay included) to stderr for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.6g}"
    return str(value)


def _finite_json(obj: Any) -> Any:
    """Strict JSON: a non-finite float (a diverged trial's score is -inf) becomes null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_json(v) for v in obj]
    return obj


def format_table(result) -> str:
    lines = [f"trial {result.name}: {result.status}" + (f" ({result.reason})" if result.reason else "")]
    lines.append(f"  steps          {result.step}/{result.total_steps}")
    if result.checkpoint_path:
        lines.append(f"  checkpoint     {result.checkpoint_path}")
    if result.adapter_path:
        lines.append(f"  adapter        {result.adapter_path}")
    metrics = result.metrics or {}
    skip = {"status", "reason", "step", "total_steps"}
    if metrics:
        lines.append("  final metrics:")
        width = max(len(k) for k in metrics)
        lines += [f"    {k:<{width}}  {_fmt(v)}" for k, v in metrics.items() if k not in skip and v is not None]
    best = result.best_metrics or {}
    if best and best.get("step") != metrics.get("step"):
        lines.append(f"  best score     {_fmt(best.get('score'))} at step {best.get('step')}")
    return "\n".join(lines)


def train_command(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg = load_trial_config(args.config, args.overrides)
    prepared = prepare_trial(cfg)  # UsageError here, before Ray starts
    if prepared.cfg.resources.use_gpu:  # a trial that cannot fit its GPU is refused now, not after loading 7B weights

        gpu_bytes, _ = gpu_memory(prepared.cfg)
        if gpu_bytes is not None:
            check_fits(prepared.cfg, estimate(prepared.cfg), gpu_bytes)
    if args.name is not None:
        check_run_name(args.name, "--name")
    check_storage(str(args.storage_path), "give a folder you can write with --storage-path")
    check_ray_address(args.ray_address, "--ray-address")
    start_timeout()  # a bad MELORA_RAY_START_TIMEOUT_S: one line before anything runs
    if args.num_cpus is not None and not args.ray_address:
        res = prepared.cfg.resources
        need = res.num_workers * res.cpus_per_worker
        if args.num_cpus < max(1, need):
            raise UsageError(f"--num-cpus {args.num_cpus}: the trial's {res.num_workers} worker(s) x {res.cpus_per_worker:g} CPU "
                             f"need at least {max(1, math.ceil(need))}; raise --num-cpus or lower resources.cpus_per_worker")
    name = args.name or default_name(args.config, prepared.cfg)
    print(f"melora-tune train: run {name} under {Path(args.storage_path).resolve()}", file=sys.stderr)
    with stdout_to_stderr():
        result = run_trial(
            prepared.cfg, args.storage_path, name, ray_address=args.ray_address, num_cpus=args.num_cpus, prepared=prepared
        )
    if args.json:
        out = result.to_dict()
        out.pop("history", None)
        print(json.dumps(_finite_json(out), default=str, allow_nan=False))
    else:
        print(format_table(result))
    return 0 if result.status == "completed" else 1
