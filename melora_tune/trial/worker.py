"""One trial's worker: build (data, model, adapters, DeepSpeed engine) from the prepared trial, restore or start
fresh, train (``trial.loop``), and return rank 0's summary.

Every rank of a Ray Train worker group runs ``train_loop_per_worker``; a one-worker trial runs ``TrialWorker`` in
its own process (``trial.inprocess``). The worker trains with what the driver prepared (``PreparedTrial``: the
resolved config, adapter config, step plan, DeepSpeed config, metrics) and works none of it out again.
Evaluation: ``trial.evaluate``; checkpoint save and restore: ``trial.persist``.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import sys
import time
from typing import Any

import numpy as np
import torch

from melora_tune.adapters.inject import find_modules_to_save, inject_adapters
from melora_tune.adapters.models import auto_class, causal_lm_overrides, load_config, nf4_loading_kwargs, resolve_model
from melora_tune.adapters.pooling import apply_pooling, resolve_pooling
from melora_tune.trial import warm
from melora_tune.trial.batches import pad_collate
from melora_tune.trial.checkpoint import RUNNING
from melora_tune.trial.config import TRIAL_KEY
from melora_tune.trial.evaluate import Evaluator
from melora_tune.trial.loop import Timings, TrainLoop, fresh_state
from melora_tune.trial.persist import TrialCheckpoints
from melora_tune.trial.prepare import PreparedTrial
from melora_tune.trial.ranks import Ranks
from melora_tune.trial.reporting import TrainReporter

log = logging.getLogger("melora_tune.trial")


# ---- small helpers -------------------------------------------------------------

def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op (~95 s) on CPU.

    The op only serves ``inference_all_reduce`` (tensor-parallel inference);
    training all-reduces go through torch.distributed (gloo) either way. Set
    MELORA_DS_SHM_COMM=1 to let DeepSpeed build and use it.
    """
    if os.environ.get("MELORA_DS_SHM_COMM") == "1":
        return
    # importlib, not "import deepspeed.comm.torch as m": that resolves to the torch package
    # itself, which deepspeed.comm re-exports under the same name.
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def trainable_groups(model, adapter_cfg) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: [adapter tensors, head (modules_to_save) tensors]; one group without a head.
    The order matches ``ds_config.learning_rates``."""
    heads = tuple(f"{name}." for name in find_modules_to_save(model, adapter_cfg.modules_to_save))
    adapter, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name.startswith(heads) else adapter).append(p)
    return [{"params": adapter}] + ([{"params": head}] if head else [])


def seed_everything(seed: int) -> None:
    """Seed torch (every device), numpy and ``random``: a trial starts from its seed whatever ran before it
    in this process (another trial, with reuse_actors)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- the worker ----------------------------------------------------------------

class TrialWorker:
    def __init__(self, prepared: PreparedTrial, name: str = "trial", *, reporter=None, resume_from: str | None = None) -> None:
        """``reporter``: where reports go and the checkpoint comes from (``melora_tune.trial.reporting``);
        a Ray Train worker's by default. ``resume_from``: a checkpoint folder to start from when the reporter has
        none (a Tune checkpoint cloned by PBT)."""
        self.t0 = time.perf_counter()
        self.wall_start = time.time()  # the driver compares it with its own clock: Ray's start-up cost
        self.timings = Timings()
        self.prepared = prepared
        self.cfg = prepared.cfg
        self.plan = prepared.plan
        self.name = name
        self.resume_from = resume_from
        self.reporter = reporter if reporter is not None else TrainReporter()
        self.rank = self.reporter.rank
        self.world = self.reporter.world_size
        self.node_ip = self.reporter.node_ip  # reported: where a restarted trial went on
        self.on_gpu = bool(self.cfg.resources.use_gpu and torch.cuda.is_available())
        if not self.on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(max(1, int(self.cfg.resources.cpus_per_worker)))
        self.causal = self.cfg.task_type == "causal_lm"

    # ---- setup ---------------------------------------------------------------
    def build(self) -> None:
        t = self.t0
        engine = self.load_libraries()
        t = self.timings.mark("import_s", t)
        self.load_data()
        t = self.timings.mark("data_s", t)
        self.build_model()
        t = self.timings.mark("model_s", t)
        self.start_engine(engine)
        self.timings.mark("deepspeed_init_s", t)

    def load_libraries(self):
        """deepspeed.initialize, once DeepSpeed and transformers are loaded and quiet."""
        import deepspeed  # worker code only, after DS_ACCELERATOR is set (__init__): the driver never loads it
        import transformers  # loaded by the worker, not by the modules the driver imports

        for name in ("DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)
        transformers.utils.logging.set_verbosity_error()
        skip_shm_comm_build()
        return deepspeed.initialize

    def load_data(self) -> None:
        """Every rank loads and tokenizes the same splits (the sampler shards them). Kept in the process between
        trials (trial.warm): read-only here."""
        cfg, tr = self.cfg, self.cfg.training
        self.path = resolve_model(cfg.model)
        self.tokenizer = warm.tokenizer(self.path)
        self.task, self.encoded = warm.task_data(cfg.task_spec(), self.path, self.tokenizer, tr.max_length,
                                                 score_test=tr.score_test, causal=self.causal)
        self.train_ds = self.encoded["train"]
        self.eval_ds = self.encoded["validation"]
        self.test_ds = self.encoded["test"] if tr.score_test else None
        if (len(self.train_ds), self.world) != (self.plan.train_samples, self.plan.world_size):
            raise RuntimeError(f"the worker has {len(self.train_ds)} training samples over {self.world} worker(s), the "
                               f"prepared trial's plan {self.plan.train_samples} over {self.plan.world_size}")

    def build_model(self) -> None:
        """The model with its adapters, seeded identically on every rank (and whatever ran before in this process)."""
        cfg, tr, path = self.cfg, self.cfg.training, self.path
        seed_everything(tr.seed)
        kwargs = {"num_labels": self.task.num_labels} if not self.causal else causal_lm_overrides(load_config(path))
        # frozen weights in the compute precision (bf16 on GPU: half the memory of fp32, what DeepSpeed would cast
        # them to anyway); an NF4 base is quantized while loading and keeps its adapters in fp32 (QLoRA)
        dtype = torch.bfloat16 if cfg.precision_on(self.on_gpu) == "bf16" else torch.float32
        if tr.quantization == "nf4":  # quantized weights are not cached between trials (trial.warm clones tensors)
            model = auto_class(cfg.task_type).from_pretrained(path, dtype=torch.bfloat16, **kwargs, **nf4_loading_kwargs())
            self.warm_start = False
        else:
            model, self.warm_start = warm.base_model(auto_class(cfg.task_type), path, dtype=dtype, **kwargs)
        # Llama-style tokenizers have no pad token: pad with EOS (masked out; labels there are -100), as is usual
        tok = self.tokenizer
        self.pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id, 0) if t is not None))
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = self.pad_id
        self.pooling = resolve_pooling(cfg.pooling, path, model, task_type=cfg.task_type)
        apply_pooling(model, self.pooling)
        self.adapter_cfg = self.prepared.adapter
        self.report_info = inject_adapters(model, self.adapter_cfg)
        if tr.gradient_checkpointing:
            # non-reentrant: the frozen embeddings' outputs need no grad for the adapters' gradients to flow
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = model

    def start_engine(self, initialize) -> None:
        """The DeepSpeed engine (only adapter + head parameters reach the optimizer, in two groups with their own peak
        rates), and the evaluation, checkpoints and loop around it."""
        cfg, tr = self.cfg, self.cfg.training
        groups = trainable_groups(self.model, self.adapter_cfg)
        ds_config = self.prepared.ds_config_for(on_gpu=self.on_gpu, trainable_params=sum(p.numel() for g in groups for p in g["params"]),
                                                head_group=len(groups) == 2)
        self.engine, self.optimizer, _, self.scheduler = initialize(
            model=self.model, model_parameters=groups, config=ds_config, dist_init_required=False
        )
        self.device = self.engine.device
        ranks = Ranks(self.rank, self.world, self.device)
        collate = pad_collate(self.pad_id)
        self.evaluator = Evaluator(self.engine, ranks, task=self.task, tokenizer=self.tokenizer, collate=collate,
                                   pad_id=self.pad_id, metric_names=self.prepared.metrics,
                                   main_metric=self.prepared.main_metric, causal=self.causal,
                                   batch_size=tr.micro_batch_size * 2)
        adapter_meta = {"base_model": cfg.model, "task": cfg.task.name, "task_type": cfg.task_type,
                        "num_labels": int(self.task.num_labels), "label_names": list(self.task.label_names or []),
                        "pooling": self.pooling}
        self.checkpoints = TrialCheckpoints(self.engine, self.model, self.adapter_cfg, adapter_meta, ranks, self.reporter,
                                            zero3=tr.zero_stage == 3, resume_from=self.resume_from)
        self.loop = TrainLoop(name=self.name, training=tr, plan=self.plan, engine=self.engine, scheduler=self.scheduler,
                              ranks=ranks, train_ds=self.train_ds, val_ds=self.eval_ds, test_ds=self.test_ds,
                              collate=collate, evaluator=self.evaluator, checkpoints=self.checkpoints,
                              timings=self.timings, describe=self.base_metrics)
        self.ranks = ranks

    # ---- state -------------------------------------------------------------
    def restore(self) -> dict[str, Any] | None:
        """The saved state from the reporter's latest checkpoint (weights, optimizer, RNG loaded); None if fresh."""
        t = time.perf_counter()
        state = self.checkpoints.restore(self.plan.total_steps)
        if state is not None:
            self.timings.mark("restore_s", t)
        return state

    def base_metrics(self, state: dict[str, Any]) -> dict[str, Any]:
        return {
            "status": state["status"],
            "step": state["step"],
            "epoch": round(state["step"] / self.plan.steps_per_epoch, 4),
            "total_steps": self.plan.total_steps,
            "trainable_params": int(self.report_info.trainable_params),
            "adapter_params": int(self.report_info.adapter_params),
            "head_params": int(self.report_info.head_params),
            "equivalent_rank": int(self.report_info.equivalent_rank),
            "world_size": self.world,
            "restarts": state.get("restarts", 0),  # Train/Tune restarts after failures, and resumes
            "worker_node_ip": self.node_ip,
            "worker_pid": os.getpid(),  # with reuse_actors, consecutive trials share it
            "warm_start": int(self.warm_start),  # 1: the base weights came from this process's cache (trial.warm)
            # what this rank's GPU held at most so far: the measured side of the will-it-fit estimate (trial.memory)
            **({"gpu_peak_mem_gib": round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)} if self.on_gpu else {}),
        }

    # ---- the trial -------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        try:
            self.build()
            state = self.restore() or fresh_state(self.plan, self.world)
            if state["status"] == RUNNING:  # else finished (or diverged) before: nothing left to do
                self.timings["setup_s"] = round(time.perf_counter() - self.t0, 3)
                self.loop.train(state)
            return self.summary(state)
        finally:
            self.close()

    def close(self) -> None:
        """DeepSpeed's own teardown (``engine.destroy``): it removes the gradient hooks its ZeRO optimizer put on
        the parameters and ZeRO-3's module hooks. Those hooks live in autograd's C++ nodes, which Python's garbage
        collector cannot see through, so without this every trial's model, engine and optimizer stayed alive in a
        reused trial process (measured: +110 tensors a trial on the tiny BERT; a search's trial processes grew by
        about 140 MB a MiniLM trial, to 8 GB each after 60 trials)."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return
        try:
            engine.destroy()
        except Exception as err:  # noqa: BLE001  (a teardown failure must not hide the trial's own result or error)
            log.warning("DeepSpeed engine teardown failed: %s", err)
        _drop_zero3_references()

    def summary(self, state: dict[str, Any]) -> dict[str, Any]:
        self.ranks.barrier()  # ZeRO-3 teardown without a barrier can abort at exit
        return {
            "status": state["status"],
            "reason": state.get("reason"),
            "step": state["step"],
            "total_steps": state["total_steps"],
            "metrics": state.get("metrics"),
            "best": state.get("best"),
            "timings": dict(self.timings),
            "restarts": state.get("restarts", 0),
            "wall_start": self.wall_start,
            "wall_end": time.time(),
        }


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Ray Train entry point (several workers; one-worker trials use ``melora_tune.trial.inprocess``).
    ``config = {TRIAL_KEY: PreparedTrial, "name": str, "resume_from": str | None}`` (``driver.build_trainer``).

    Returns rank 0's summary (status, reason, step, final and best metrics, timings).
    """
    return TrialWorker(config[TRIAL_KEY], config["name"], resume_from=config.get("resume_from")).run()


def _drop_zero3_references() -> None:
    """What ``engine.destroy`` leaves: two module-level references ZeRO-3 keeps to every engine it set up (one
    engine a process, by design), each of which kept the trial's model and through its hooks the engine alive.
    ``FWD_MODULE_STACK`` gets each engine's model pushed at set-up and never popped; the coordinator memoises which
    parameters to release in a class-level lru_cache keyed on the coordinator itself (wrapped in an NVTX decorator
    without functools.wraps, hence the closure)."""
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None:
        offload.FWD_MODULE_STACK.clear()
    coordinator = sys.modules.get("deepspeed.runtime.zero.partitioned_param_coordinator")
    if coordinator is not None:
        for fn in vars(coordinator.PartitionedParameterCoordinator).values():
            for held in [fn, *(c.cell_contents for c in getattr(fn, "__closure__", None) or ())]:
                if callable(getattr(held, "cache_clear", None)):
                    held.cache_clear()
