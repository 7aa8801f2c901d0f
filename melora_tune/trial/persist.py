"""Save and restore a running trial (DeepSpeed's engine state, the adapter folder, every rank's RNG streams), and
publish an evaluation with its checkpoint. The checkpoint's layout and its DeepSpeed-free readers:
``melora_tune.trial.checkpoint``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from melora_tune.adapters.inject import save_adapter
from melora_tune.trial import checkpoint as ckpt_io
from melora_tune.trial.ranks import Ranks


STAGING_PREFIX = "melora-ckpt-"
# melora-ckpt-r<rank>-p<pid>-<random>: the pid tells a later start whether the worker that wrote it is gone
STAGING_NAME = re.compile(re.escape(STAGING_PREFIX) + r"r\d+-p(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(root: str | Path | None = None) -> list[Path]:
    """Remove the staging folders (``melora-ckpt-r*-p<pid>-*`` in the temp folder) that workers killed mid-report left:
    this user's, whose process is gone. Every trial start on a node calls it; returns what it removed."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            match = STAGING_NAME.match(entry.name)
            if not match or not entry.is_dir(follow_symlinks=False) or _alive(int(match.group(1))):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                shutil.rmtree(entry.path)
                removed.append(Path(entry.path))
    return removed


class TrialCheckpoints:
    """A trial's checkpoints: ``adapter_meta`` is what the adapter folder records besides the weights (base model,
    task, labels, pooling)."""

    def __init__(self, engine, model, adapter_cfg, adapter_meta: dict[str, Any], ranks: Ranks, reporter, *,
                 zero3: bool, resume_from: str | None = None) -> None:
        self.engine = engine
        self.model = model
        self.adapter_cfg = adapter_cfg
        self.adapter_meta = adapter_meta
        self.ranks = ranks
        self.reporter = reporter
        self.zero3 = zero3
        self.resume_from = resume_from
        remove_stale_staging()  # what a worker killed mid-report on this node left in the temp folder

    def restore(self, total_steps: int) -> dict[str, Any] | None:
        """The saved state from the reporter's latest checkpoint (weights, optimizer, RNG loaded); None if fresh."""
        from ray.train import Checkpoint  # Ray is loaded in every trial process; imported where it is needed

        checkpoint = self.reporter.latest_checkpoint()
        if checkpoint is None and self.resume_from:
            checkpoint = Checkpoint.from_directory(self.resume_from)  # e.g. a Tune (PBT) checkpoint
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            state = ckpt_io.read_state(d)
            if state is None:
                raise RuntimeError(f"checkpoint {checkpoint.path} has no {ckpt_io.STATE_NAME}")
            if state["status"] == ckpt_io.RUNNING:
                if state["world_size"] != self.ranks.world or state["total_steps"] != total_steps:
                    raise RuntimeError(
                        f"cannot resume {checkpoint.path}: it was written by {state['world_size']} worker(s) for "
                        f"{state['total_steps']} steps, this run has {self.ranks.world} worker(s) and {total_steps} steps"
                    )
                with ckpt_io.weights_only_loads():  # DeepSpeed itself would unpickle its .pt files in full
                    load_path, _ = self.engine.load_checkpoint(
                        str(Path(d) / ckpt_io.DS_DIR), tag=ckpt_io.DS_TAG, load_module_strict=False
                    )
                if load_path is None:
                    raise RuntimeError(f"DeepSpeed could not load {Path(d) / ckpt_io.DS_DIR}")
                ckpt_io.load_rng(d, self.ranks.rank)
        state["restarts"] = state.get("restarts", 0) + 1
        return state

    def save(self, directory: Path, state: dict[str, Any]) -> None:
        import deepspeed  # worker code only: the driver never loads deepspeed (and DS_ACCELERATOR is set by now)

        self.engine.save_checkpoint(
            str(directory / ckpt_io.DS_DIR), tag=ckpt_io.DS_TAG, exclude_frozen_parameters=True, save_latest=False
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        gather = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) if self.zero3 else contextlib.nullcontext()
        with gather:
            if self.ranks.rank == 0:
                save_adapter(self.model, self.adapter_cfg, directory / ckpt_io.ADAPTER_DIR, **self.adapter_meta,
                             step=state["step"])
        ckpt_io.save_rng(directory, self.ranks.rank)
        if self.ranks.rank == 0:
            ckpt_io.write_state(directory, state)

    def report(self, metrics: dict[str, Any], state: dict[str, Any], *, full_checkpoint: bool) -> None:
        """Report with a checkpoint (Train V2 keeps metrics only of reports that carry one): the full checkpoint,
        or only the trial state (a diverged trial)."""
        tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}r{self.ranks.rank}-p{os.getpid()}-"))
        try:
            if full_checkpoint:
                self.save(tmp, state)
            elif self.ranks.rank == 0:
                ckpt_io.write_state(tmp, state)
            has_files = any(tmp.iterdir())
            self.reporter.report(
                metrics,
                tmp if has_files else None,
                f"checkpoint_{state['step']:07d}" + ("" if state["status"] == ckpt_io.RUNNING else f"_{state['status']}"),
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
