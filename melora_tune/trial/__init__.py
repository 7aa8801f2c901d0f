"""One trial: a config, a DeepSpeed engine config, a Ray Train worker loop, checkpoints, and the driver.

Nothing heavy is imported here: Ray, DeepSpeed and transformers load inside the
functions that need them (deepspeed only ever in the Train workers).
"""

from melora_tune.trial.config import (
    ALIASES,
    TrialConfig,
    apply_overrides,
    load_trial_config,
    parse_overrides,
)
from melora_tune.trial.driver import TrialResult, build_trainer, run_trial, tune_trial
from melora_tune.trial.ds_config import StepPlan, build_ds_config, plan_for, plan_steps
from melora_tune.trial.prepare import PreparedTrial, prepare_trial
from melora_tune.trial.worker import train_loop_per_worker


__all__ = [
    "ALIASES",
    "TrialConfig",
    "TrialResult",
    "StepPlan",
    "PreparedTrial",
    "apply_overrides",
    "build_ds_config",
    "build_trainer",
    "load_trial_config",
    "parse_overrides",
    "plan_for",
    "plan_steps",
    "prepare_trial",
    "run_trial",
    "train_loop_per_worker",
    "tune_trial",
]
