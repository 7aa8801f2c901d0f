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
unconfirmed. ``--method`` restricts either to one method. A non-empty DIR is
refused unless ``--force``; the export is written to a temporary sibling folder
and renamed into place at the end, so an interrupted export leaves no half
result behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from melora_tune.errors import UsageError, first_line

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


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

def check_method(method: str | None) -> str | None:
    """A method name, or a one-line refusal (a name with '/', '..' or the like would reach outside DIR)."""
    if method is None:
        return None
    from melora_tune.adapters import method_names

    METHODS = method_names()
    if not NAME_RE.fullmatch(method):
        raise UsageError(f"--method {method!r} is not a method name (letters, digits, '_' or '-' only; nothing that "
                         f"could reach outside the output folder): choose one of {', '.join(METHODS)}")
    key = method.lower()
    if key not in METHODS:
        raise UsageError(f"unknown --method {method!r}: choose one of {', '.join(METHODS)}")
    return key


def check_out_dir(out: str | Path, force: bool) -> Path:
    """DIR as a Path; refuses a file, a non-empty folder without --force, and folders --force must never replace."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UsageError(f"--out {out} exists and is not empty: pass --force to replace it, or choose another folder")
        resolved = out.resolve()
        cwd = Path.cwd().resolve()
        if resolved == Path(resolved.anchor) or resolved == Path.home().resolve() or cwd == resolved or resolved in cwd.parents:
            raise UsageError(f"--out {out} is the root, your home or the working folder (or holds it): --force will not "
                             "replace it; choose a dedicated folder")
    return out


def safe_path(root: Path, *parts: str) -> Path:
    """root/parts..., refusing anything that resolves outside root."""
    for part in parts:
        if part in ("", ".", "..") or "/" in part or "\\" in part or "\x00" in part:
            raise UsageError(f"refusing the name {part!r}: it would reach outside the output folder")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise UsageError(f"refusing {path}: it resolves outside the output folder {root}")
    return path


def _check_tree(root: Path) -> None:
    """Every file a download wrote stays inside root (no links, no escaping names)."""
    base = root.resolve()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            if path.is_symlink() or not path.resolve().is_relative_to(base):
                raise UsageError(f"refusing downloaded artifact {path.relative_to(root)}: a link or a path outside the export folder")


# ---- the pieces ------------------------------------------------------------------------------------

def download_adapter(mlf, row, dest: Path) -> Path:
    """The trial's ``adapter`` artifact into dest/adapter (falls back to its local best checkpoint)."""
    from melora_tune.adapters.config import CONFIG_NAME, WEIGHTS_NAME

    target = safe_path(dest, "adapter")
    try:
        names = {a.path for a in mlf.list_artifacts(row["run_id"], "adapter")}
    except Exception:  # noqa: BLE001
        names = set()
    if {f"adapter/{CONFIG_NAME}", f"adapter/{WEIGHTS_NAME}"} <= names:
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            local = Path(mlf.download_artifacts(row["run_id"], "adapter", tmp))
            _check_tree(Path(tmp))
            shutil.copytree(local, target)
    else:
        ckpt = row.get("best_checkpoint")
        local = Path(str(ckpt)) / "adapter" if isinstance(ckpt, str) and "://" not in ckpt else None
        if local is None or not (local / CONFIG_NAME).is_file():
            raise UsageError(f"trial {row['run_name']!r} (MLflow run {row['run_id']}) has no adapter artifact and its "
                             "checkpoint is not on this machine: nothing to export")
        shutil.copytree(local, target, symlinks=False)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (target / name).is_file():
            raise UsageError(f"the adapter of run {row['run_id']} lacks {name}")
    return target


def confirmed_choice(confirmations, method: str | None):
    """(the confirmation run to export, its configuration's row of the confirmed table), or None.

    The winner is chosen on validation only: the configuration with the highest mean validation score over
    its seeds (``report.confirmed``), then that configuration's seed with the best validation score."""
    from melora_tune.report.confirmed import completed_seeds, confirmed_table

    if confirmations is None or confirmations.empty:
        return None
    table = confirmed_table(confirmations)
    winners = table[table["winner"]] if not table.empty else table
    if method is not None:
        winners = winners[winners["method"] == method]
    if winners.empty:
        return None
    config = winners.sort_values("val_mean", ascending=False, kind="mergesort").iloc[0]
    seeds = completed_seeds(confirmations)
    seeds = seeds[seeds["config"] == config["config"]].sort_values(["val_score", "start_time"], ascending=[False, True],
                                                                   kind="mergesort")
    run = seeds.iloc[0].to_dict()
    run.update(trial_id=run.get("confirms_trial"), optuna_trial=None, score=run["val_score"], best_score=math.nan,
               status="completed")
    return run, config.to_dict()


def trial_dict(mlf, search, row, adapter_cfg, seed: int | None = None) -> dict[str, Any]:
    """The TrialConfig dict of the trial: the search's base config (from its space file) + the trial's values."""
    from melora_tune.records.read import space_artifact
    from melora_tune.search.schema import parse_space
    from melora_tune.search.trainable import trial_config
    from melora_tune.trial.config import TRIAL_KEY

    exact = read.exact_params(row)
    found = space_artifact(mlf, search.run_id)
    if found is not None:
        filename, text = found
        space = parse_space(yaml.safe_load(text), source=f"space artifact {filename} of run {search.run_id}")
        base = space.base_trial_dict(list(adapter_cfg.target_modules), list(adapter_cfg.modules_to_save))
    elif isinstance(exact.get(TRIAL_KEY), dict):
        base = exact[TRIAL_KEY]
    else:
        raise UsageError(f"search run {search.run_id} has no space/ artifact and the trial's params.json is not on this "
                         "machine: cannot rebuild the trial's config")
    lr = exact.get("lr")
    if not isinstance(lr, (int, float)) or not math.isfinite(lr) or not math.isclose(lr, float(row["lr"]), rel_tol=1e-4):
        lr = float(row["lr"])
    hp = {k: v for k, v in adapter_cfg.model_dump().items() if k not in ("target_modules", "modules_to_save")}
    data = trial_config({TRIAL_KEY: base, **hp, "lr": float(lr)}).to_dict()
    if seed is not None:  # a confirmation: its own seed
        data["training"]["seed"] = int(seed)
    return data


def write_trial_yaml(path: Path, data: dict[str, Any], header: list[str]):
    from melora_tune.trial.config import TrialConfig, load_trial_config

    cfg = TrialConfig.from_dict(data, source="exported trial")
    path.write_text("".join(f"# {line}\n" for line in header) + cfg.to_yaml())
    loaded = load_trial_config(path)
    if loaded.to_dict() != cfg.to_dict():
        raise RuntimeError(f"{path} does not load back as the trial's config")
    return loaded


def load_base_model(cfg, num_labels: int | None):
    """The trial's base model (fp32, eval mode), as the trial's workers load it."""
    import torch

    from melora_tune.adapters.models import auto_class, causal_lm_overrides, load_config, resolve_model

    path = resolve_model(cfg.model)
    kwargs = {"num_labels": int(num_labels)} if cfg.task_type == "seq_cls" and num_labels else {}
    if cfg.task_type == "causal_lm":
        kwargs = causal_lm_overrides(load_config(path))  # an encoder used as a decoder is loaded causal, as trained
    try:
        model = auto_class(cfg.task_type).from_pretrained(path, dtype=torch.float32, **kwargs)
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise UsageError(f"cannot load the base model {cfg.model!r} to build the PEFT export: {first}") from err
    return model.eval(), path


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load report ("classifier.weight | MISSING ... Consider training on your downstream task") and
    progress bars: expected when the export rebuilds the base model under a fresh head, noise to the user. Errors still
    raise (transformers raises them, it does not log them)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def write_peft(cfg, adapter_dir: Path, out: Path) -> str:
    """Base model + native adapter -> the lossless PEFT LoRA folder; returns the base model's path or id."""
    from melora_tune.adapters.export import export_peft_lora
    from melora_tune.adapters.inject import load_adapter

    import warnings

    meta = json.loads((adapter_dir / "adapter_config.json").read_text()).get("melora_tune") or {}
    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes, not the user's business
        model, path = load_base_model(cfg, meta.get("num_labels"))
        adapter_cfg, _ = load_adapter(model, adapter_dir)
        export_peft_lora(model, adapter_cfg, out, base_model_name_or_path=path, task_type=cfg.task_type)
    return path


README = """# Exported adapter: {label}

Best {which} of search `{search}` on dataset `{dataset}`: **{label}**, score {score} ({status}).

{selection}

| | |
|---|---|
| method | {method} |
| hyperparameters | {hparams} |
| adapter parameters | {adapter_params} (equivalent rank {equivalent_rank}) |
| base model | `{model}` ({task_type}) |
| trial | {trial_id} (Optuna trial {optuna_trial}) |
| MLflow run | {run_id} (search parent run {parent_run_id}, tracking URI `{tracking_uri}`) |

The adapter weights are those of {weights_from}.

## Files

- `trial.yaml`: the trial's configuration. Train it again with `melora-tune train trial.yaml`.
- `adapter/`: native melora-tune adapter (`adapter_config.json`, `adapter_model.safetensors`: adapter and
  {head} tensors only).
- `peft/`: the same adapter as a standard PEFT LoRA of rank {equivalent_rank}; the update B @ A is identical,
  so the model's outputs are the same (no melora-tune needed to use it).
- `export.json`: machine-readable provenance.

## Load with melora-tune

```python
import torch
from transformers import {auto_class}
from melora_tune.adapters.inject import load_adapter
from melora_tune.adapters.models import resolve_model

base = {auto_class}.from_pretrained(resolve_model("{model}"){num_labels_arg}, dtype=torch.float32)
cfg, report = load_adapter(base, "adapter")   # injects the {method} layers and loads their weights
model = base.eval()
```

## Load with PEFT

```python
from transformers import {auto_class}
from peft import PeftModel

base = {auto_class}.from_pretrained("{base_path}"{num_labels_arg})
model = PeftModel.from_pretrained(base, "peft").eval()
model = model.merge_and_unload()   # optional: fold the adapter into the weights
```
{peft_pooling}
The tokenizer is the base model's: `AutoTokenizer.from_pretrained("{base_path}")`.
"""


def decoder_override(cfg) -> bool:
    """Whether the trial's causal LM is an encoder loaded with is_decoder=True (what its users must pass too)."""
    if cfg.task_type != "causal_lm":
        return False
    from melora_tune.adapters.models import causal_lm_overrides, load_config

    return bool(causal_lm_overrides(load_config(cfg.model)))


def render_readme(info: dict[str, Any]) -> str:
    return README.format(**info)


# ---- the export --------------------------------------------------------------------------------------

def export_best(
    dataset: str,
    *,
    out: str | Path,
    method: str | None = None,
    search: str | None = None,
    tracking_uri: str | None = None,
    force: bool = False,
) -> ExportResult:
    from melora_tune.adapters import AdapterConfig
    from melora_tune.records import read

    method = check_method(method)
    out = check_out_dir(out, force)
    uri = read.tracking_uri(tracking_uri)
    mlf = read.client(uri)
    info = read.resolve_search(mlf, dataset, search)
    trials = read.trials_frame(mlf, info)
    chosen = confirmed_choice(read.confirmations_frame(mlf, info), method)
    confirmed = None
    if chosen is not None:
        row, confirmed = chosen
    else:
        best = read.best_run(trials, method)
        if best is None:
            what = f"{method} trial" if method else "trial"
            have = sorted(set(trials["method"])) if not trials.empty else []
            hint = f" (methods searched: {', '.join(have)})" if have else ""
            raise UsageError(f"search {info.name} has no scored {what} (completed or stopped early) to export{hint}")
        row = best.to_dict()
    selection = _selection(confirmed, row)

    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=parent))
    try:
        adapter_dir = download_adapter(mlf, row, tmp)
        adapter_cfg = AdapterConfig.load(adapter_dir)
        seed = int(row["seed"]) if confirmed is not None else None
        data = trial_dict(mlf, info, row, adapter_cfg, seed=seed)
        header = [
            f"melora-tune export: {row['run_name']} (trial {row['trial_id']}, MLflow run {row['run_id']})",
            f"search {info.name} on {dataset}: {selection['line']}",
            "train it again with:  melora-tune train trial.yaml",
        ]
        cfg = write_trial_yaml(safe_path(tmp, "trial.yaml"), data, header)
        base_path = write_peft(cfg, adapter_dir, safe_path(tmp, "peft"))
        meta = json.loads((adapter_dir / "adapter_config.json").read_text()).get("melora_tune") or {}
        num_labels = meta.get("num_labels") if cfg.task_type == "seq_cls" else None
        provenance = {
            "dataset": dataset, "search": info.name, "parent_run_id": info.run_id, "run_id": row["run_id"],
            "run_name": row["run_name"], "trial_id": row["trial_id"], "optuna_trial": _plain(row["optuna_trial"]),
            "method": adapter_cfg.method, "hyperparameters": {**adapter_cfg.method_params(), "lr": cfg.training.lr,
                                                             "alpha": adapter_cfg.alpha, "dropout": adapter_cfg.dropout},
            "score": _plain(row["score"]), "best_score": _plain(row["best_score"]), "status": row["status"],
            "adapter_params": _plain(row["adapter_params"]), "equivalent_rank": adapter_cfg.equivalent_rank,
            "model": cfg.model, "base_model_path": base_path, "task_type": cfg.task_type, "num_labels": num_labels,
            "tracking_uri": uri, "exported": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "selection": selection["kind"], "confirmed": selection.get("confirmed"),
            "pooling": meta.get("pooling", "model"),
        }
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
            "selection": selection["text"], "weights_from": selection["weights"],
            "peft_pooling": _peft_pooling(meta.get("pooling", "model")),
        })
        safe_path(tmp, "README.md").write_text(readme)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, row["run_id"], info.run_id, row["trial_id"], adapter_cfg.method, float(row["score"]),
                        row["status"], row["run_name"], out / "trial.yaml", selection["line"])


def _selection(confirmed: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, Any]:
    """What the export took and how sure we are of it, in words (README, header, CLI) and as data (export.json)."""
    if confirmed is None:
        line = (f"UNCONFIRMED: the search's best trial, validation score {row['score']:.4f} from one seed "
                f"({row['status'].replace('_', ' ')}); no confirmation ran (melora-tune confirm SPACE.yaml)")
        return {"kind": "unconfirmed", "line": line, "text": line + ".",
                "weights": f"the trial's best checkpoint (score {row['score']:.4f})"}
    ci = (f"95% CI {confirmed['test_lo']:.4f} to {confirmed['test_hi']:.4f}" if math.isfinite(confirmed["test_lo"])
          else "one seed: no interval")
    line = (f"CONFIRMED winner {confirmed['configuration']}: test {confirmed['test_mean']:.4f} "
            f"± {confirmed['test_std']:.4f} over {int(confirmed['seeds'])} seeds ({ci}), validation "
            f"{confirmed['val_mean']:.4f}; these weights are seed {int(row['seed'])}, its best on validation")
    data = {k: _plain(confirmed[k]) for k in ("configuration", "seeds", "val_mean", "val_std", "test_mean", "test_std",
                                              "test_lo", "test_hi")}
    data.update(seed=int(row["seed"]), confirms=row.get("confirms"))
    return {"kind": "confirmed", "line": line, "text": line + ".", "confirmed": data,
            "weights": f"the final model of confirmation seed {int(row['seed'])} (validation {row['score']:.4f}, "
                       f"test {row['test_score']:.4f})"}


def _peft_pooling(pooling: str) -> str:
    if pooling in (None, "model"):
        return ""
    return (f"\nThe trial's classifier read the *{pooling}*-pooled token states, not the model's own pooler "
            "(`pooling: " + pooling + "`); PEFT does not know that setting, so apply it after loading, or the logits differ:\n\n"
            "```python\nfrom melora_tune.adapters.pooling import apply_pooling\n"
            f"apply_pooling(model, \"{pooling}\")\n```\n")


def _plain(value: Any) -> Any:
    """numpy / pandas scalars -> JSON-able Python values (NA -> None)."""
    try:
        import pandas as pd

        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value.item() if hasattr(value, "item") else value


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished tmp folder to out; an existing out (empty, or --force) is moved aside first."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}-{int(time.time())}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


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
    p.add_argument("--search", default=None, metavar="PARENT_RUN_ID",
                   help="the search's parent run id or search name (default: the newest search of the dataset)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: sqlite:///mlflow.db here)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or new, unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=export_command)
    return p


def export_command(args) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    res = export_best(args.dataset, out=args.out, method=args.method, search=args.search, tracking_uri=args.tracking_uri,
                      force=args.force)
    print(f"exported {res.run_name} (score {res.score:.4f}, {res.status.replace('_', ' ')}; MLflow run {res.run_id}) to {res.out_dir}")
    print(f"  {res.selection}")
    print(f"  train it again:  melora-tune train {res.trial_yaml}")
    print(f"  PEFT:            PeftModel.from_pretrained(base_model, {str(res.out_dir / 'peft')!r})")
    return 0
