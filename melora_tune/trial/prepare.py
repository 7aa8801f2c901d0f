"""Driver-side checks before any worker starts: the task loads, the model config loads, the adapter fits.

``prepare_trial`` also resolves the two adapter defaults that depend on the
model (``target_modules`` and ``modules_to_save``) so that workers, checkpoints
and logs all see explicit values. Everything here is cheap: the model is built
on the ``meta`` device from its config, no weights are read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from melora_tune.adapters.accounting import ModelSpec, account
from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.inject import default_target_modules, find_head_modules
from melora_tune.adapters.models import auto_class, load_config, resolve_model
from melora_tune.data import load_task
from melora_tune.data.instruct import prompt_format
from melora_tune.errors import UsageError, first_line
from melora_tune.trial.config import TrialConfig
from melora_tune.trial.ds_config import StepPlan, build_ds_config, plan_for


@dataclass
class PreparedTrial:
    """A validated trial: the config with defaults resolved, plus what was learnt checking it. It travels to the
    workers as it is (Ray pickles it): they train with its adapter config, step plan, DeepSpeed config and metrics
    instead of working them out again."""

    cfg: TrialConfig
    num_labels: int
    train_samples: int
    eval_samples: int
    metrics: tuple[str, ...]
    main_metric: str
    plan: StepPlan
    adapter: AdapterConfig  # cfg.adapter as the adapter layer's config (target_modules, modules_to_save resolved)
    trainable_params: int  # adapter + head tensors the optimizer gets (the accounting's, equal to injection's)
    head_group: bool  # the optimizer has a second parameter group: the head (modules_to_save)
    ds_config: dict[str, Any]  # DeepSpeed's config on the device the trial asks for (resources.use_gpu)
    accounting: dict[str, Any] = field(default_factory=dict)

    def ds_config_for(self, *, on_gpu: bool, trainable_params: int, head_group: bool) -> dict[str, Any]:
        """DeepSpeed's config for what a worker found: the prepared one (a fresh copy: DeepSpeed may write to it),
        or, on a worker without the GPU the trial asked for, the same config built for the CPU."""
        if (trainable_params, head_group) != (self.trainable_params, self.head_group):
            raise RuntimeError(f"the worker's model has {trainable_params} trainable parameters (head group: {head_group}), "
                               f"the prepared trial {self.trainable_params} (head group: {self.head_group})")
        if on_gpu == self.cfg.resources.use_gpu:
            return copy.deepcopy(self.ds_config)
        return build_ds_config(self.cfg, self.plan, on_gpu=on_gpu, trainable_params=trainable_params, head_group=head_group)

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.cfg.model,
            "task": self.cfg.task.name,
            "num_labels": self.num_labels,
            "train_samples": self.train_samples,
            "eval_samples": self.eval_samples,
            "main_metric": self.main_metric,
            **self.plan.to_dict(),
            **self.accounting,
        }


def task_metrics(task, task_type: str) -> tuple[tuple[str, ...], str]:
    """(metrics a trial computes, the one its score is): a classification task scored by a causal LM is
    scored by its eval loss (the answer's likelihood); instruction data by its declared metric."""
    if getattr(task, "is_instruction", False):
        if task_type != "causal_lm":
            raise UsageError(f"task {task.name!r} is instruction data: set task_type: causal_lm (a sequence classifier "
                             "has no response to generate)")
        return tuple(task.metrics), task.main_metric
    if task_type == "causal_lm":
        return ("loss", "perplexity"), "loss"
    return tuple(task.metrics), task.main_metric


def prepare_trial(cfg: TrialConfig, task=None) -> PreparedTrial:
    """Check everything a user can get wrong before Ray starts (UsageError otherwise)."""
    if task is None:
        task = load_task(cfg.task_spec())
    for split in ("train", "validation"):
        if split not in task.splits:
            raise UsageError(f"task {cfg.task.name!r} has no {split} split")
    if cfg.training.score_test and "test" not in task.splits:
        raise UsageError(
            f"task {cfg.task.name!r} has no test split (task.test_fraction is {cfg.task.test_fraction:g}): "
            "set task.test_fraction > 0 to score on test (confirmation), or training.score_test false"
        )
    num_labels = int(task.num_labels)
    overrides = {"num_labels": num_labels} if cfg.task_type == "seq_cls" else {}
    model_config = load_config(cfg.model, **overrides)
    spec = ModelSpec.from_config(model_config, task=cfg.task_type, name=cfg.model)
    _ = auto_class  # the task type was checked by ModelSpec.from_config

    adapter = cfg.adapter
    targets = adapter.target_modules or default_target_modules(spec.model)
    heads = adapter.modules_to_save if adapter.modules_to_save is not None else find_head_modules(spec.model, cfg.task_type, num_labels)
    # lists of module names found on this model: nothing here needs validating again
    resolved = cfg.model_copy(update={"adapter": adapter.model_copy(update={"target_modules": list(targets),
                                                                             "modules_to_save": list(heads)})})

    adapter_cfg = resolved.adapter.adapter_config()
    acct = account(spec, adapter_cfg)  # raises UsageError when the adapter does not fit the layers
    metrics, main = task_metrics(task, cfg.task_type)
    if getattr(task, "is_instruction", False) and task.prompt_format == "chat":
        import transformers  # heavy: transformers

        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model(cfg.model))
        except (OSError, ValueError) as err:
            raise UsageError(f"cannot load the tokenizer of {cfg.model!r} to check its chat template: {first_line(err)}") from None
        prompt_format(task, tokenizer)  # refuses a tokenizer without one
    plan = plan_for(resolved, len(task.splits["train"]))
    trainable, head_group = acct["adapter_params"] + acct["head_params"], acct["head_params"] > 0
    # the DeepSpeed settings a worker would refuse (offload without ZeRO...) are refused here
    ds_config = build_ds_config(resolved, plan, trainable_params=trainable, head_group=head_group)
    if len(task.splits["validation"]) < 1:
        raise UsageError(f"task {cfg.task.name!r} has an empty validation split")
    return PreparedTrial(
        cfg=resolved,
        num_labels=num_labels,
        train_samples=len(task.splits["train"]),
        eval_samples=len(task.splits["validation"]),
        metrics=metrics,
        main_metric=main,
        plan=plan,
        adapter=adapter_cfg,
        trainable_params=trainable,
        head_group=head_group,
        ds_config=ds_config,
        accounting={k: acct[k] for k in ("adapter_params", "head_params", "equivalent_rank", "adapted_layers", "base_params")},
    )
