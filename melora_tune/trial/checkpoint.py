"""What a trial checkpoint holds and how to read it without Ray or DeepSpeed.

Layout of one checkpoint directory (all ranks' files merged by Ray Train)::

    trial_state.json          status, step, epoch, last/best metrics, history, config (rank 0)
    adapter/                  adapter_config.json + adapter_model.safetensors (adapter + head only)
    ds/state/...              DeepSpeed's own checkpoint of the trainable tensors, the optimizer
                              (one ZeRO partition per rank) and the LR scheduler; frozen base excluded
    rng/rank<k>.pt            torch/numpy/python RNG states of rank k

A diverged trial's last checkpoint holds only ``trial_state.json`` (status
"diverged"): resuming it finishes at once with the recorded reason instead of
training on from NaN weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_NAME = "trial_state.json"
ADAPTER_DIR = "adapter"
DS_DIR = "ds"
DS_TAG = "state"
RNG_DIR = "rng"


def write_state(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / STATE_NAME
    path.write_text(json.dumps(state, indent=1, default=_json_default, allow_nan=True) + "\n")
    return path


def read_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng(directory: str | Path, rank: int) -> None:
    folder = Path(directory) / RNG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / f"rank{rank}.pt")


def load_rng(directory: str | Path, rank: int) -> bool:
    path = Path(directory) / RNG_DIR / f"rank{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, weights_only=False))
    return True
