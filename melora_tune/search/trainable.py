"""The Ray Tune trainable of a search: one sampled configuration -> one ``tune_trial``."""

from __future__ import annotations

from typing import Any

BASE_KEY = "trial"  # the param_space key holding the base TrialConfig dict
ADAPTER_KEYS = ("method", "n", "r", "u", "m", "m_b", "alpha", "dropout")


def trial_config(config: dict[str, Any]) -> dict[str, Any]:
    """The full TrialConfig dict of a sampled configuration (base config + the searched values)."""
    base = config[BASE_KEY]
    adapter = dict(base["adapter"])
    for key in ADAPTER_KEYS:
        if key in config:
            adapter[key] = config[key]
    if adapter.get("method") != "prolora":
        adapter.update(u=0, m=1, m_b=None)
    if adapter.get("method") != "melora":
        adapter["n"] = 1
    training = {**base["training"], "lr": float(config["lr"])}
    return {**base, "adapter": adapter, "training": training}


def search_trial(config: dict[str, Any]) -> None:
    """Ray Tune function trainable. ``config``: the base trial dict under "trial" plus what the space sampled
    (method, n, r, ..., lr, and informational keys such as adapter_params and optuna_trial)."""
    from melora_tune.trial import tune_trial

    tune_trial({"trial": trial_config(config)})


def trial_dirname(trial) -> str:
    """Short, filesystem-safe trial folder names (the sampled parameter names contain '|', '=' and ',')."""
    return f"trial_{trial.trial_id}"
