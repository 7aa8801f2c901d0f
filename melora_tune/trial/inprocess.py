"""One-worker trials trained in the calling process: no TorchTrainer, no controller, no worker actor.

Ray Train's start-up and teardown (controller, placement group, a fresh worker
process) cost ~14 s a trial; a trial with one worker needs none of it. The
training loop is the Train workers' own (``TrialWorker``), given a world-size-1
process group that lives exactly as long as the trial.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

from melora_tune.errors import innermost_error_line
from melora_tune.trial import warm
from melora_tune.trial.config import TrialConfig
from melora_tune.trial.prepare import PreparedTrial
from melora_tune.trial.reporting import LocalReporter, TuneReporter

log = logging.getLogger("melora_tune.trial")

_DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def in_process(cfg: TrialConfig) -> bool:
    return cfg.resources.num_workers == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group(use_gpu: bool):
    """A world-size-1 torch.distributed group (gloo on CPU, nccl on a GPU), destroyed on exit.

    DeepSpeed wants a process group even for one rank, and falls back to MPI
    discovery unless RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK are
    set; they are set for the trial and put back afterwards, so whatever runs
    next in this process (another trial, the CLI) sees the environment it had.

    The garbage collector runs on entry and exit: a finished trial's DeepSpeed
    engine, model and optimizer hang in reference cycles (hooks), and with
    reuse_actors the next trial would otherwise start while they still hold
    memory (GPU memory too: ``empty_cache`` can only return what is freed).
    """
    import torch  # heavy: torch
    import torch.distributed as dist  # heavy: torch

    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group is already initialised in this process")
    gc.collect()  # whatever an earlier trial in this process left (an error's traceback held it until now)
    saved = {k: os.environ.get(k) for k in _DIST_ENV}
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(_free_port()))
    on_gpu = use_gpu and torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(0)
    try:
        # An in-memory store: one rank needs no rendezvous, so no port can be taken by someone else meanwhile.
        dist.init_process_group("nccl" if on_gpu else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timedelta(minutes=30))
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        _forget_deepspeed_groups()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gc.collect()
        if on_gpu:
            torch.cuda.empty_cache()


def _forget_deepspeed_groups() -> None:
    """Drop DeepSpeed's module-level handles on the destroyed group (its comm wrapper and the cached world,
    data-, model- and expert-parallel groups): a later trial in this process builds its own, instead of
    failing with "Group ... is not registered" on the dead one."""
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in list(vars(groups).items()):
            if name.startswith("_") and name.isupper() and ("GROUP" in name or name.startswith("_MPU_")):
                setattr(groups, name, {} if isinstance(value, dict) else None)
        groups.mpu = None
        groups.mesh_device = None


@contextlib.contextmanager
def torch_functions_restored():
    """Put back the torch functions a trial's DeepSpeed replaces process-wide.

    ZeRO-3 swaps ``torch.nn.functional.linear`` for its memory-efficient autograd function and leaves it there
    ("This will persist unless manually reset", DeepSpeed 0.19). A later trial in this process (reuse_actors, a
    test) then trains through it and gets other numbers than a fresh process: on a (16, 48, 384) input its output
    differs by up to 8e-6 and its gradients by up to 1.5e-3 from torch's own linear."""
    import torch.nn.functional as F  # heavy: torch

    linear = F.linear
    try:
        yield
    finally:
        F.linear = linear


def run_with_reporter(prepared: PreparedTrial, name: str, reporter) -> dict[str, Any]:
    """The training loop once, in this process, under its own process group; rank 0's summary."""
    from melora_tune.trial.worker import TrialWorker  # torch, transformers, datasets: loaded where a trial trains

    with torch_functions_restored(), single_process_group(prepared.cfg.resources.use_gpu):
        return TrialWorker(prepared, name, reporter=reporter).run()


def tune_in_process(prepared: PreparedTrial, name: str) -> None:
    """The body of a one-worker Tune trial: reports go straight to ``ray.tune.report``.

    Errors propagate: Tune's FailureConfig restarts the trial from its last
    checkpoint (``ray.tune.get_checkpoint``), which is the only retry such a trial
    gets, so Train's and Tune's restarts are never stacked.
    """
    warm.keep_weights()  # Tune may hand this process further trials of the search (reuse_actors)
    # With reuse_actors, Tune hands this process the next trial only once this function has returned, and
    # gives it TUNE_FUNCTION_THREAD_TIMEOUT_S (2 s by default) to do so after a scheduler stopped the trial
    # (the stop unwinds it from ray.tune.report); past that the next trial fails ("reuse requires
    # reset_config()"). Unwinding (process group, DeepSpeed, gc) can take longer on a loaded machine.
    # Tune reads the variable in this process when it resets the actor, after this trial.
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    run_with_reporter(prepared, name, TuneReporter(name, prepared.cfg.resources.use_gpu))


def run_local(prepared: PreparedTrial, run_path: str | Path, name: str) -> dict[str, Any]:
    """Train in this process with checkpoints under ``run_path``; up to ``resources.max_failures`` restarts.

    Returns ``{"summary": ...}`` or ``{"error": one line}``; a diverged trial is a
    summary, never retried.
    """
    cfg = prepared.cfg
    error = None
    for attempt in range(cfg.resources.max_failures + 1):
        reporter = LocalReporter(run_path, cfg.resources.use_gpu, cfg.training.keep_checkpoints)
        try:
            return {"summary": run_with_reporter(prepared, name, reporter)}
        except Exception as err:  # noqa: BLE001  (restarted from the last checkpoint, as Train would)
            error = innermost_error_line(err)
            log.warning("trial %s failed (attempt %d of %d): %s", name, attempt + 1, cfg.resources.max_failures + 1, error)
    return {"error": error}
