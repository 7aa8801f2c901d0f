"""``melora-tune export --dataset NAME --out DIR``: the best trial of a search, ready to use elsewhere.

DIR receives:

    trial.yaml   the trial's configuration; ``melora-tune train DIR/trial.yaml`` trains it again as is
    adapter/     the native adapter (adapter_config.json + adapter_model.safetensors) of the trial's best checkpoint
    peft/        the same adapter as a standard PEFT LoRA (lossless; ``PeftModel.from_pretrained``)
    README.md    how to load each
    export.json  where it came from (MLflow run ids, trial id, scores)

Which adapter: the confirmed winner when the search was confirmed (``melora-tune
confirm``): the configuration with the highest mean validation score over its
seeds, and of its seeds the one with the best validation score (test never
chooses). Without a confirmation, the search's best trial (completed before
stopped early, then the highest final score), and the export says it is
unconfirmed. ``--method`` restricts either to one method; ``--budget B`` to one budget level of the search (with
``--method``: that cell's winner; without: the best-validating winner among the level's cells). ``--alias CELL`` (``<method>-b<budget>``) or ``--model-version N``
export a version of the dataset's registered model (``melora-<dataset>`` in MLflow's Model Registry, where every
confirmation registers each method's winner) instead: the same files, from that version's adapter. A non-empty DIR is
refused unless ``--force``; the export is written to a temporary sibling folder
and renamed into place at the end, so an interrupted export leaves no half
result behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from melora_tune.adapters import AdapterConfig
from melora_tune.errors import UsageError
from melora_tune.records import read
from melora_tune.records import REGISTERED_ARTIFACT
from melora_tune.report.export_choice import (
    confirmed_choice, download_adapter, plain, registry_choice, selection, trial_dict, write_trial_yaml,
)
from melora_tune.report.export_paths import check_budget, check_method, check_out_dir, safe_path, swap_into_place
from melora_tune.adapters.peft_folder import write_peft
from melora_tune.report.export_readme import decoder_override, peft_pooling, render_readme


@dataclass
class ExportResult:
    out_dir: Path
    run_id: str
    parent_run_id: str
    trial_id: str | None
    method: str
    score: float
    status: str
    run_name: str
    trial_yaml: Path
    selection: str = ""


# ---- checks ---------------------------------------------------------------------------------------

# ---- the pieces ------------------------------------------------------------------------------------

# ---- the export --------------------------------------------------------------------------------------

def export_best(
    dataset: str,
    *,
    out: str | Path,
    method: str | None = None,
    search: str | None = None,
    tracking_uri: str | None = None,
    force: bool = False,
    alias: str | None = None,
    model_version: str | None = None,
    budget: int | None = None,
) -> ExportResult:
    """``alias`` / ``model_version``: the registered model version of the dataset to export (the Model Registry,
    ``search.model_registry``) instead of choosing from the search's records. ``budget``: a budget level of the
    search (a cell with ``method``); a level the search does not have is a usage error naming its levels."""
    method = check_method(method)
    registry = alias is not None or model_version is not None
    if registry and (method is not None or search is not None or budget is not None):
        raise UsageError("--alias and --model-version name the adapter themselves: leave out --method and --search (and --budget)")
    if alias is not None and model_version is not None:
        raise UsageError("give --alias or --model-version, not both")
    out = check_out_dir(out, force)
    uri = read.tracking_uri(tracking_uri)
    mlf = read.client(uri)
    version = None
    artifact = "adapter"
    confirmed = None
    if registry:
        info, row, confirmed, version = registry_choice(mlf, dataset, alias, model_version)
        artifact = f"{REGISTERED_ARTIFACT}/adapter"
    else:
        info = read.resolve_search(mlf, dataset, search)
        check_budget(budget, read.levels_of(info), info.name)
        trials = read.trials_frame(mlf, info)
        chosen = confirmed_choice(read.confirmations_frame(mlf, info), method, budget)
        if chosen is not None:
            row, confirmed = chosen
        else:
            best = read.best_run(trials, method, budget)
            if best is None:
                what = (f"{method} trial" if method else "trial") + (f" at budget level {budget:,}" if budget else "")
                have = sorted(set(trials["method"])) if not trials.empty else []
                hint = f" (methods searched: {', '.join(have)})" if have else ""
                raise UsageError(f"search {info.name} has no scored {what} (completed or stopped early) to export{hint}")
            row = best.to_dict()
    chosen_how = selection(confirmed, row)

    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=parent))
    try:
        adapter_dir = download_adapter(mlf, row, tmp, artifact)
        adapter_cfg = AdapterConfig.load(adapter_dir)
        seed = int(row["seed"]) if confirmed is not None else None
        data = trial_dict(mlf, info, row, adapter_cfg, seed=seed)
        header = [
            f"melora-tune export: {row['run_name']} (trial {row['trial_id']}, MLflow run {row['run_id']})",
            f"search {info.name} on {dataset}: {chosen_how['line']}",
            "train it again with:  melora-tune train trial.yaml",
        ]
        cfg = write_trial_yaml(safe_path(tmp, "trial.yaml"), data, header)
        base_path = write_peft(cfg, adapter_dir, safe_path(tmp, "peft"))
        meta = json.loads((adapter_dir / "adapter_config.json").read_text()).get("melora_tune") or {}
        num_labels = meta.get("num_labels") if cfg.task_type == "seq_cls" else None
        provenance = {
            "dataset": dataset, "search": info.name, "parent_run_id": info.run_id, "run_id": row["run_id"],
            "run_name": row["run_name"], "trial_id": row["trial_id"], "optuna_trial": plain(row["optuna_trial"]),
            "method": adapter_cfg.method, "hyperparameters": {**adapter_cfg.method_params(), "lr": cfg.training.lr,
                                                             "alpha": adapter_cfg.alpha, "dropout": adapter_cfg.dropout},
            "score": plain(row["score"]), "best_score": plain(row["best_score"]), "status": row["status"],
            "adapter_params": plain(row["adapter_params"]), "equivalent_rank": adapter_cfg.equivalent_rank,
            "budget": plain(row.get("budget")), "cell": row.get("cell"),
            "model": cfg.model, "base_model_path": base_path, "task_type": cfg.task_type, "num_labels": num_labels,
            "tracking_uri": uri, "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "selection": chosen_how["kind"], "confirmed": chosen_how.get("confirmed"),
            "pooling": meta.get("pooling", "model"),
        }
        if version is not None:
            provenance["registered_model"] = {"name": version.name, "version": str(version.version),
                                              "aliases": sorted(getattr(version, "aliases", []) or [])}
        safe_path(tmp, "export.json").write_text(json.dumps(provenance, indent=1) + "\n")
        auto = "AutoModelForSequenceClassification" if cfg.task_type == "seq_cls" else "AutoModelForCausalLM"
        hparams = ", ".join(f"{k}={v}" for k, v in {**adapter_cfg.method_params(), "lr": f"{cfg.training.lr:.3g}",
                                                      "alpha": f"{adapter_cfg.alpha:g}", "dropout": f"{adapter_cfg.dropout:g}"}.items())
        readme = render_readme({
            "label": row["run_name"], "which": f"{method} trial" if method else "trial", "search": info.name, "dataset": dataset,
            "score": f"{row['score']:.4f}", "status": row["status"].replace("_", " "), "method": adapter_cfg.method,
            "hparams": hparams, "adapter_params": provenance["adapter_params"], "equivalent_rank": adapter_cfg.equivalent_rank,
            "model": cfg.model, "task_type": cfg.task_type, "trial_id": row["trial_id"], "optuna_trial": provenance["optuna_trial"],
            "run_id": row["run_id"], "parent_run_id": info.run_id, "tracking_uri": uri,
            "best_score": "n/a" if provenance["best_score"] is None else f"{provenance['best_score']:.4f}",
            "head": "classification head" if adapter_cfg.modules_to_save else "saved-module",
            "auto_class": auto, "base_path": base_path,
            "num_labels_arg": (f", num_labels={num_labels}" if num_labels and cfg.task_type == "seq_cls" else
                               ", is_decoder=True" if decoder_override(cfg) else ""),
            "selection": chosen_how["text"], "weights_from": chosen_how["weights"],
            "peft_pooling": peft_pooling(meta.get("pooling", "model")),
        })
        safe_path(tmp, "README.md").write_text(readme)
        swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, row["run_id"], info.run_id, row["trial_id"], adapter_cfg.method, float(row["score"]),
                        row["status"], row["run_name"], out / "trial.yaml", chosen_how["line"])


# ---- CLI -----------------------------------------------------------------------------------------------

def add_export_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="export a search's best adapter: trial YAML, native weights, PEFT LoRA, README",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", required=True, metavar="NAME", help="dataset = MLflow experiment (the task name)")
    p.add_argument("--method", default=None, metavar="M", help="best trial of this method only (lora, melora, prolora)")
    p.add_argument("--budget", default=None, type=int, metavar="B",
                   help="one budget level of the search (adapter params): that cell's confirmed winner (with --method), "
                        "or the level's best winner")
    p.add_argument("--search", default=None, metavar="PARENT_RUN_ID",
                   help="the search's parent run id or search name (default: the newest search of the dataset)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--alias", default=None, metavar="CELL",
                       help="the Model Registry's version of the dataset with this alias (<method>-b<budget>, e.g. "
                            "lora-b512: a cell's confirmed winner of the newest search); instead of --search/--method")
    which.add_argument("--model-version", default=None, metavar="N",
                       help="the Model Registry's version N of the dataset's registered model (melora-<dataset>)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or new, unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=export_command)
    return p


def export_command(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = export_best(args.dataset, out=args.out, method=args.method, search=args.search, tracking_uri=args.tracking_uri,
                      force=args.force, alias=args.alias, model_version=args.model_version, budget=args.budget)
    print(f"exported {res.run_name} (score {res.score:.4f}, {res.status.replace('_', ' ')}; MLflow run {res.run_id}) to {res.out_dir}")
    print(f"  {res.selection}")
    print(f"  train it again:  melora-tune train {res.trial_yaml}")
    print(f"  PEFT:            PeftModel.from_pretrained(base_model, {str(res.out_dir / 'peft')!r})")
    return 0
