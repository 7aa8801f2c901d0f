"""What a trial checkpoint holds and how to read it without Ray or DeepSpeed.

Layout of one checkpoint directory (all ranks' files merged by Ray Train)::

    trial_state.json          status, step, epoch, last/best metrics, history, config (rank 0)
    adapter/                  adapter_config.json + adapter_model.safetensors (adapter + head only)
    ds/state/...              DeepSpeed's own checkpoint of the trainable tensors, the optimizer
                              (one ZeRO partition per rank) and the LR scheduler; frozen base excluded
    rng/rank<k>.safetensors   torch (CPU and CUDA), numpy and Python RNG states of rank k: arrays + JSON
                              metadata, no pickle

A diverged trial's last checkpoint holds only ``trial_state.json`` (status
"diverged"): resuming it finishes at once with the recorded reason instead of
training on from NaN weights.

Nothing here runs pickle on a checkpoint: JSON and safetensors are read as data, and
DeepSpeed's ``.pt`` files are loaded inside ``weights_only_loads()`` (torch's
``weights_only=True`` unpickler, which builds tensors and plain containers only, with
DeepSpeed's three plain-data classes allow-listed).
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

STATE_NAME = "trial_state.json"
# a trial state's status: trained on (resumable), finished, or stopped by a non-finite loss (never resumed)
RUNNING, COMPLETED, DIVERGED = "running", "completed", "diverged"
ADAPTER_DIR = "adapter"
DS_DIR = "ds"
DS_TAG = "state"
RNG_DIR = "rng"
RNG_FORMAT = "melora-tune rng 1"


def write_state(directory: str | Path, state: dict[str, Any]) -> Path:
    path = Path(directory) / STATE_NAME
    path.write_text(json.dumps(state, indent=1, default=_json_default, allow_nan=True) + "\n")
    return path


def read_state(directory: str | Path) -> dict[str, Any] | None:
    path = Path(directory) / STATE_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def checkpoint_dirs(run_path: str | Path) -> list[Path]:
    """A run's checkpoint folders that hold a trial state, newest first (by step, then by time)."""
    run_path = Path(run_path)
    if not run_path.is_dir():
        return []
    found = [p for p in run_path.glob("checkpoint_*") if (p / STATE_NAME).is_file()]
    return sorted(found, key=lambda p: ((read_state(p) or {}).get("step", -1), p.stat().st_mtime), reverse=True)


def latest_checkpoint_dir(run_path: str | Path) -> Path | None:
    """The newest checkpoint folder with a trial state (by step, then by time)."""
    found = checkpoint_dirs(run_path)
    return found[0] if found else None


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


def _hex(x: float | None) -> str | None:
    return None if x is None else float(x).hex()


def _unhex(x: str | None) -> float | None:
    return None if x is None else float.fromhex(x)


def rng_to_arrays(state: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """An ``rng_state()`` as arrays + string metadata (safetensors' whole vocabulary), losslessly."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    py_version, py_internal, py_gauss = state["python"]
    arrays = {
        "torch": state["torch"].numpy().copy(),
        "numpy.keys": np.asarray(np_keys, dtype=np.uint32),
        "python.state": np.asarray(py_internal, dtype=np.int64),  # 624 words of 32 bits + the position
    }
    cuda = state.get("cuda") or []
    for i, s in enumerate(cuda):
        arrays[f"cuda.{i}"] = s.cpu().numpy().copy()
    meta = {
        "format": RNG_FORMAT,
        "numpy": json.dumps({"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss), "gauss": _hex(np_gauss)}),
        "python": json.dumps({"version": int(py_version), "gauss_next": _hex(py_gauss)}),
        "cuda_devices": str(len(cuda)),
    }
    return arrays, meta


def rng_from_arrays(arrays: dict[str, np.ndarray], meta: dict[str, str]) -> dict[str, Any]:
    """Inverse of ``rng_to_arrays``: the tuples and tensors ``set_rng_state`` takes."""
    if meta.get("format") != RNG_FORMAT:
        raise ValueError(f"not a melora-tune RNG file (format {meta.get('format')!r})")
    npm, pym = json.loads(meta["numpy"]), json.loads(meta["python"])
    state: dict[str, Any] = {
        "torch": torch.from_numpy(arrays["torch"].astype(np.uint8, copy=True)),
        "numpy": (npm["name"], arrays["numpy.keys"].astype(np.uint32, copy=True), npm["pos"], npm["has_gauss"],
                  _unhex(npm["gauss"])),
        "python": (pym["version"], tuple(int(v) for v in arrays["python.state"]), _unhex(pym["gauss_next"])),
    }
    devices = int(meta.get("cuda_devices", "0"))
    if devices:
        state["cuda"] = [torch.from_numpy(arrays[f"cuda.{i}"].astype(np.uint8, copy=True)) for i in range(devices)]
    return state


def save_rng(directory: str | Path, rank: int) -> Path:
    from safetensors.numpy import save_file  # heavy: safetensors

    folder = Path(directory) / RNG_DIR
    folder.mkdir(parents=True, exist_ok=True)
    arrays, meta = rng_to_arrays(rng_state())
    path = folder / f"rank{rank}.safetensors"
    save_file(arrays, str(path), metadata=meta)
    return path


def load_rng(directory: str | Path, rank: int) -> bool:
    """Restore rank's RNG states from a checkpoint (False when it has none). Reads safetensors, never pickle; a
    checkpoint written before the safetensors format (``rank<k>.pt``) loads with torch's weights-only unpickler."""
    folder = Path(directory) / RNG_DIR
    path = folder / f"rank{rank}.safetensors"
    if path.is_file():
        from safetensors import safe_open  # heavy: safetensors

        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
        set_rng_state(rng_from_arrays(arrays, meta))
        return True
    legacy = folder / f"rank{rank}.pt"
    if legacy.is_file():
        with torch.serialization.safe_globals(_numpy_array_globals()):
            set_rng_state(torch.load(legacy, weights_only=True))
        return True
    return False


def _numpy_array_globals() -> list:
    """What an old ``rank<k>.pt`` needs besides tensors: numpy's MT19937 key array (a uint32 ndarray)."""
    try:
        from numpy._core.multiarray import _reconstruct  # numpy's own path differs by version
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # numpy's own path differs by version
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def deepspeed_safe_globals() -> list:
    """The classes DeepSpeed 0.19 pickles into its checkpoint files besides tensors and containers (found with
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` over ZeRO 0-3, fp32/bf16, optimizer offload): an
    enum, a named tuple, and the loss scaler's plain attributes. Allow-listing a class lets the weights-only
    unpickler rebuild an instance of it from data; it still refuses every other callable."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # heavy: DeepSpeed, workers only
    from deepspeed.runtime.zero.config import ZeroStageEnum  # heavy: DeepSpeed, workers only
    from deepspeed.utils.tensor_fragment import fragment_address  # heavy: DeepSpeed, workers only

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside runs with ``weights_only=True``. DeepSpeed's own checkpoint loading turns the
    weights-only unpickler off (full pickle: any code in the file runs) for its model and optimizer state files."""
    real = torch.load
    allowed = deepspeed_safe_globals()

    @functools.wraps(real)
    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return real(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = real
