"""`melora-tune budget`: parameter accounting and budget feasibility from a model's config."""

from __future__ import annotations

import argparse
import json

from melora_tune.adapters.accounting import ModelSpec, account
from melora_tune.adapters.budget import enumerate_feasible, smallest_config
from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.hyperparams import HYPERPARAMS
from melora_tune.adapters.models import TASK_TYPES
from melora_tune.adapters.registry import get_method, method_names
from melora_tune.errors import UsageError


def int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_budget_parser(sub) -> None:
    p = sub.add_parser(
        "budget",
        help="count adapter parameters, or list every configuration that fits a budget",
        description="Adapter parameter accounting from the model config alone (no weights are loaded).",
    )
    p.add_argument("--model", required=True, help="local path, Hugging Face Hub id, or bundled short name (minilm)")
    p.add_argument("--task-type", default="seq_cls", choices=TASK_TYPES, help="model head (default seq_cls)")
    p.add_argument("--num-labels", type=int, default=None, help="classes of the seq_cls head (default: the config's)")
    p.add_argument("--method", default="melora",
                   help=f"one of {', '.join(method_names())}; with --budget a comma list or 'all'")
    p.add_argument("--targets", default="query,value", help="target module name suffixes, comma-separated")
    p.add_argument("--modules-to-save", default="", help="modules kept fully trainable (e.g. classifier); reported apart")
    p.add_argument("--alpha", type=float, default=16.0)
    for hp in HYPERPARAMS.values():  # --r, --n, ... and their --*-choices, from the method registry
        flag = hp.name.replace("_", "-")
        p.add_argument(f"--{flag}", type=int, dest=hp.name, help=hp.help)
    p.add_argument("--budget", type=int, help="max adapter params: list every feasible configuration instead")
    p.add_argument("--min-fraction", type=float, default=0.0, help="with --budget: keep configs using >= this fraction")
    for hp in HYPERPARAMS.values():
        flag = hp.name.replace("_", "-")
        p.add_argument(f"--{flag}-choices", type=int_list, dest=f"{hp.name}_choices",
                       help=f"with --budget: the {hp.name} values to consider")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=budget_command)


def _single_config(args) -> AdapterConfig:
    given = {k: getattr(args, k) for k in HYPERPARAMS if getattr(args, k) is not None}
    method = get_method(args.method)
    if "r" not in given:
        flags = " ".join(f"--{k.replace('_', '-')}" for k in method.hyperparams)
        raise UsageError(f"give {flags} for {method.name}, or --budget B to list configurations")
    stray = sorted(set(given) - set(method.hyperparams))
    if stray:
        raise UsageError(f"--{stray[0].replace('_', '-')} does not apply to method {args.method}")
    return AdapterConfig(
        method=args.method, alpha=args.alpha, target_modules=args.targets, modules_to_save=args.modules_to_save, **given
    )


def budget_command(args) -> int:
    methods = list(method_names()) if args.method == "all" else [m for m in args.method.split(",") if m]
    for method in methods:
        get_method(method)  # names the bad method before any model is loaded
    if args.budget is None and len(methods) != 1:
        raise UsageError("without --budget give one --method")
    if args.num_labels is not None and args.num_labels < 1:
        raise UsageError(f"--num-labels must be >= 1 (classes of the head; 1 is a regression head), got {args.num_labels}")
    AdapterConfig(method=methods[0], alpha=args.alpha)  # alpha must be finite and > 0
    spec = ModelSpec.from_pretrained(args.model, task=args.task_type, num_labels=args.num_labels)
    if args.budget is None:
        for flag in (f"{k}_choices" for k in HYPERPARAMS):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} needs --budget")
        row = account(spec, _single_config(args))
        print(json.dumps(row) if args.json else _table([row]))
        return 0
    if any(getattr(args, k) is not None for k in HYPERPARAMS):
        raise UsageError("--budget lists configurations: use --n-choices/--r-choices..., not --n/--r")
    rows = []
    for method in methods:
        base = AdapterConfig(method=method, alpha=args.alpha, target_modules=args.targets, modules_to_save=args.modules_to_save)
        shapes = spec.targets(base.target_modules)
        choices = {k: getattr(args, f"{k}_choices") for k in get_method(method).hyperparams}
        found = enumerate_feasible(shapes, method, args.budget, min_fraction=args.min_fraction, base=base, **choices)
        if not found:
            cheapest = smallest_config(shapes, method, base=base, **choices)
            hint = f"the smallest {method} configuration needs {cheapest.adapter_params} params" if cheapest else f"no {method} configuration fits these layers at all"
            raise UsageError(f"no {method} configuration fits a budget of {args.budget} (min fraction {args.min_fraction}): {hint}")
        rows.extend(c.to_dict() for c in found)
    print(json.dumps(rows) if args.json else _table(rows))
    return 0


def _table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (list, dict))))
    order = ["method", *HYPERPARAMS, "alpha", "adapter_params", "head_params", "equivalent_rank"]
    keys.sort(key=lambda k: order.index(k) if k in order else len(order))
    cells = [[str(r.get(k, "")) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(keys), line(["-" * w for w in widths]), *(line(c) for c in cells)])
