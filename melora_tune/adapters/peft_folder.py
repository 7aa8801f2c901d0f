"""The standard PEFT folder of an export (and of a registered model version): the base model rebuilt as a trial's
workers load it, the native adapter injected and loaded, then written as a lossless PEFT LoRA (``adapters.export``).
``cfg`` is a trial config (``model``, ``task_type``)."""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from melora_tune.adapters.export import export_peft_lora
from melora_tune.adapters.inject import load_adapter
from melora_tune.adapters.models import auto_class, causal_lm_overrides, load_config, resolve_model
from melora_tune.errors import UsageError, first_line

def load_base_model(cfg, num_labels: int | None):
    """The trial's base model (fp32, eval mode), as the trial's workers load it."""
    import torch  # heavy: torch, loaded where a model is built

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
    from transformers.utils import logging as hf_logging  # heavy: transformers, loaded where a model is built

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
    meta = json.loads((adapter_dir / "adapter_config.json").read_text()).get("melora_tune") or {}
    with warnings.catch_warnings(), quiet_transformers():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notes, not the user's business
        model, path = load_base_model(cfg, meta.get("num_labels"))
        adapter_cfg, _ = load_adapter(model, adapter_dir)
        export_peft_lora(model, adapter_cfg, out, base_model_name_or_path=path, task_type=cfg.task_type)
    return path
