"""Where a trial's training loop sends its reports and finds its checkpoint.

The loop (``melora_tune.trial.worker.TrialWorker``) is the same everywhere; only
this small interface differs:

* ``TrainReporter``: a Ray Train worker (a ``TorchTrainer`` with several workers),
  ``ray.train.report`` / ``ray.train.get_checkpoint``;
* ``TuneReporter``: one worker trained inside the Ray Tune trial process itself,
  ``ray.tune.report`` / ``ray.tune.get_checkpoint`` (Tune's FailureConfig restarts it);
* ``LocalReporter``: one worker trained in the calling process (``melora-tune train``),
  checkpoint folders under ``storage_path/name`` written the way Train lays them out,
  so the same command resumes and ``result_from_run`` reads either.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Protocol

from melora_tune.trial import checkpoint as ckpt_io
from melora_tune.trial.system_metrics import SystemSampler


class Reporter(Protocol):
    rank: int
    world_size: int
    node_ip: str

    def latest_checkpoint(self):
        """A ``ray.train.Checkpoint`` to resume from, or None."""

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None, dir_name: str) -> None:
        """Publish one evaluation; ``checkpoint_dir`` (this rank's files) is copied, the caller deletes it."""


def _node_ip() -> str:
    import ray.util  # heavy: Ray

    try:
        return ray.util.get_node_ip_address()
    except Exception:  # noqa: BLE001  (outside Ray: only informational)
        return "127.0.0.1"


class TrainReporter:
    def __init__(self) -> None:
        import ray.train  # heavy: Ray

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.node_ip = _node_ip()

    def latest_checkpoint(self):
        import ray.train  # heavy: Ray

        return ray.train.get_checkpoint()

    def report(self, metrics, checkpoint_dir, dir_name) -> None:
        import ray.train  # heavy: Ray
        from ray.train import Checkpoint  # heavy: Ray

        ray.train.report(
            metrics,
            checkpoint=Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None,
            checkpoint_dir_name=dir_name,
        )


class TuneReporter:
    rank = 0
    world_size = 1

    def __init__(self, name: str, use_gpu: bool) -> None:
        self.name = name
        self.use_gpu = use_gpu
        self.node_ip = _node_ip()
        self.system = SystemSampler()  # the machine's load, added to every report (system/...)

    def latest_checkpoint(self):
        import ray.tune  # heavy: Ray

        return ray.tune.get_checkpoint()

    def report(self, metrics, checkpoint_dir, dir_name) -> None:
        import ray.tune  # heavy: Ray
        from ray.tune import Checkpoint  # heavy: Ray

        # the same keys the relay of a multi-worker trial sends (Tune rejects None-valued metrics in places)
        metrics = self.system.add_to({k: v for k, v in metrics.items() if v is not None})
        metrics["trial_name"] = self.name
        ray.tune.report(metrics, checkpoint=Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None)


class LocalReporter:
    rank = 0
    world_size = 1

    def __init__(self, run_path: str | Path, use_gpu: bool, keep: int) -> None:
        self.run_path = Path(run_path)
        self.use_gpu = use_gpu
        self.keep = keep
        self.node_ip = _node_ip()

    def latest_checkpoint(self):
        from ray.train import Checkpoint  # heavy: Ray

        latest = ckpt_io.latest_checkpoint_dir(self.run_path)
        return Checkpoint.from_directory(str(latest)) if latest is not None else None

    def report(self, metrics, checkpoint_dir, dir_name) -> None:
        if checkpoint_dir is None:
            return
        self.run_path.mkdir(parents=True, exist_ok=True)
        final = self.run_path / dir_name
        # copy aside, then rename: a kill mid-copy leaves a hidden folder, never a half checkpoint
        staging = self.run_path / f".staging-{dir_name}"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(checkpoint_dir, staging)
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        self._prune(final)

    def _prune(self, newest: Path) -> None:
        """Keep the ``keep`` latest checkpoints (by step), as Train's CheckpointConfig(num_to_keep) does."""
        for old in ckpt_io.checkpoint_dirs(self.run_path)[self.keep :]:
            if old != newest:
                shutil.rmtree(old, ignore_errors=True)
