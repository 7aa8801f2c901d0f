"""The Ray Train worker loop of one trial: load, adapt, train under DeepSpeed, evaluate, checkpoint, report.

Every rank runs ``train_loop_per_worker``. Training data is sharded with a
seeded ``DistributedSampler``; evaluation shards the validation split the same
way (padded so every rank runs the same number of forward passes, which
ZeRO-3 needs), gathers the per-sample outputs and drops the padding, so the
metrics are those of the full split, identical on every rank.

Heavy imports (deepspeed, transformers) happen inside the worker only.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from melora_tune.trial import checkpoint as ckpt_io
from melora_tune.trial.config import TrialConfig
from melora_tune.trial.ds_config import StepPlan, build_ds_config, plan_for
from melora_tune.trial.prepare import task_metrics

log = logging.getLogger("melora_tune.trial")

RUNNING, COMPLETED, DIVERGED = "running", "completed", "diverged"
DIVERGED_SCORE = float("-inf")


# ---- small helpers -------------------------------------------------------------

def skip_shm_comm_build() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op (~95 s) on CPU.

    The op only serves ``inference_all_reduce`` (tensor-parallel inference);
    training all-reduces go through torch.distributed (gloo) either way. Set
    MELORA_DS_SHM_COMM=1 to let DeepSpeed build and use it.
    """
    if os.environ.get("MELORA_DS_SHM_COMM") == "1":
        return
    import importlib

    # importlib, not "import deepspeed.comm.torch as m": that resolves to the torch package
    # itself, which deepspeed.comm re-exports under the same name.
    module = importlib.import_module("deepspeed.comm.torch")
    module.build_shm_op = lambda: None


def pad_collate(pad_token_id: int):
    """Pad a list of encoded examples (dicts of 1-D tensors) to the longest; labels pad with -100."""

    def collate(features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for key in features[0]:
            values = [torch.as_tensor(f[key]) for f in features]
            if values[0].dim() == 0:
                out[key] = torch.stack(values)
                continue
            pad = {"input_ids": pad_token_id, "labels": -100}.get(key, 0)
            length = max(v.shape[0] for v in values)
            batch = values[0].new_full((len(values), length), pad)
            for i, v in enumerate(values):
                batch[i, : v.shape[0]] = v
            out[key] = batch
        return out

    return collate


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def trainable_groups(model, adapter_cfg) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: [adapter tensors, head (modules_to_save) tensors]; one group without a head.
    The order matches ``ds_config.learning_rates``."""
    from melora_tune.adapters.inject import find_modules_to_save

    heads = tuple(f"{name}." for name in find_modules_to_save(model, adapter_cfg.modules_to_save))
    adapter, head = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name.startswith(heads) else adapter).append(p)
    return [{"params": adapter}] + ([{"params": head}] if head else [])


def seed_everything(seed: int) -> None:
    """Seed torch (every device), numpy and ``random``: a trial starts from its seed whatever ran before it
    in this process (another trial, with reuse_actors)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _finite(x: float) -> bool:
    return x is not None and math.isfinite(x)


# ---- the worker ----------------------------------------------------------------

class TrialWorker:
    def __init__(self, config: dict[str, Any], reporter=None) -> None:
        """``reporter``: where reports go and the checkpoint comes from (``melora_tune.trial.reporting``);
        a Ray Train worker's by default."""
        self.t0 = time.perf_counter()
        self.wall_start = time.time()  # the driver compares it with its own clock: Ray's start-up cost
        self.timings: dict[str, float] = {}
        trial = config["trial"]  # the driver's validated TrialConfig (a dict from older callers)
        self.cfg = trial if isinstance(trial, TrialConfig) else TrialConfig.from_dict(trial)
        self.name = config.get("name", "trial")
        self.resume_from = config.get("resume_from")
        if reporter is None:
            from melora_tune.trial.reporting import TrainReporter

            reporter = TrainReporter()
        self.reporter = reporter
        self.rank = reporter.rank
        self.world = reporter.world_size
        self.node_ip = reporter.node_ip  # reported: where a restarted trial went on
        self.on_gpu = bool(self.cfg.resources.use_gpu and torch.cuda.is_available())
        if not self.on_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            torch.set_num_threads(max(1, int(self.cfg.resources.cpus_per_worker)))
        self.causal = self.cfg.task_type == "causal_lm"

    def _mark(self, name: str, since: float) -> float:
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + now - since, 3)
        return now

    # ---- setup ---------------------------------------------------------------
    def build(self) -> None:
        import deepspeed
        import transformers

        from melora_tune.adapters.inject import inject_adapters
        from melora_tune.adapters.models import auto_class, causal_lm_overrides, load_config, nf4_loading_kwargs, resolve_model
        from melora_tune.adapters.pooling import apply_pooling, resolve_pooling
        from melora_tune.trial import warm

        cfg, tr = self.cfg, self.cfg.training
        t = self.t0
        for name in ("DeepSpeed", "deepspeed"):
            logging.getLogger(name).setLevel(logging.WARNING)
        transformers.utils.logging.set_verbosity_error()
        skip_shm_comm_build()
        t = self._mark("import_s", t)

        # data (every rank loads and tokenizes the same splits; the sampler shards them). Kept in the process
        # between trials (trial.warm): read-only here.
        path = resolve_model(cfg.model)
        self.tokenizer = warm.tokenizer(path)
        self.task, self.encoded = warm.task_data(cfg.task_spec(), path, self.tokenizer, tr.max_length,
                                                 score_test=tr.score_test, causal=self.causal)
        self.train_ds = self.encoded["train"]
        self.eval_ds = self.encoded["validation"]
        self.test_ds = self.encoded["test"] if tr.score_test else None
        self.metric_names, self.main_metric = task_metrics(self.task, cfg.task_type)
        t = self._mark("data_s", t)

        # model + adapters, seeded identically on every rank (and whatever ran before in this process)
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
        self.adapter_cfg = cfg.adapter.adapter_config()
        self.report_info = inject_adapters(model, self.adapter_cfg)
        if tr.gradient_checkpointing:
            # non-reentrant: the frozen embeddings' outputs need no grad for the adapters' gradients to flow
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = model
        t = self._mark("model_s", t)

        # DeepSpeed engine: only adapter (+ head) parameters reach the optimizer, in two groups (own peak rates)
        self.plan: StepPlan = plan_for(cfg, len(self.train_ds), self.world)
        groups = trainable_groups(model, self.adapter_cfg)
        trainable = [p for g in groups for p in g["params"]]
        self.ds_config = build_ds_config(cfg, self.plan, on_gpu=self.on_gpu, trainable_params=sum(p.numel() for p in trainable),
                                         head_group=len(groups) == 2)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.ds_config, dist_init_required=False
        )
        self.device = self.engine.device
        self.zero3 = tr.zero_stage == 3
        self.collate = pad_collate(self.pad_id)
        self._mark("deepspeed_init_s", t)

    # ---- state -------------------------------------------------------------
    def fresh_state(self) -> dict[str, Any]:
        return {
            "status": RUNNING,
            "reason": None,
            "step": 0,
            "total_steps": self.plan.total_steps,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "world_size": self.world,
            "metrics": None,
            "best": None,
            "history": [],
            "train_time_s": 0.0,
            "restarts": 0,
        }

    def restore(self) -> dict[str, Any] | None:
        """The saved state from the reporter's latest checkpoint (weights, optimizer, RNG loaded); None if fresh."""
        from ray.train import Checkpoint

        checkpoint = self.reporter.latest_checkpoint()
        if checkpoint is None and self.resume_from:
            checkpoint = Checkpoint.from_directory(self.resume_from)  # e.g. a Tune (PBT) checkpoint
        if checkpoint is None:
            return None
        t = time.perf_counter()
        with checkpoint.as_directory() as d:
            state = ckpt_io.read_state(d)
            if state is None:
                raise RuntimeError(f"checkpoint {checkpoint.path} has no {ckpt_io.STATE_NAME}")
            if state["status"] == RUNNING:
                if state["world_size"] != self.world or state["total_steps"] != self.plan.total_steps:
                    raise RuntimeError(
                        f"cannot resume {checkpoint.path}: it was written by {state['world_size']} worker(s) for "
                        f"{state['total_steps']} steps, this run has {self.world} worker(s) and {self.plan.total_steps} steps"
                    )
                with ckpt_io.weights_only_loads():  # DeepSpeed itself would unpickle its .pt files in full
                    load_path, _ = self.engine.load_checkpoint(
                        str(Path(d) / ckpt_io.DS_DIR), tag=ckpt_io.DS_TAG, load_module_strict=False
                    )
                if load_path is None:
                    raise RuntimeError(f"DeepSpeed could not load {Path(d) / ckpt_io.DS_DIR}")
                ckpt_io.load_rng(d, self.rank)
        state["restarts"] = state.get("restarts", 0) + 1
        self._mark("restore_s", t)
        return state

    # ---- data ------------------------------------------------------------------
    def epoch_loader(self, epoch: int, skip_steps: int):
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        tr = self.cfg.training
        sampler = DistributedSampler(
            self.train_ds, num_replicas=self.world, rank=self.rank, shuffle=True, seed=tr.seed, drop_last=False
        )
        sampler.set_epoch(epoch)
        per_step = tr.micro_batch_size * tr.grad_accum
        indices = list(sampler)[skip_steps * per_step : self.plan.steps_per_epoch * per_step]
        # A private generator: creating a DataLoader iterator draws a seed from its generator, and
        # drawing from the global one would shift the dropout RNG stream of a resumed run.
        return DataLoader(
            Subset(self.train_ds, indices),
            batch_size=tr.micro_batch_size,
            shuffle=False,
            collate_fn=self.collate,
            generator=torch.Generator().manual_seed(tr.seed + epoch),
        )

    # ---- collectives -------------------------------------------------------------
    def all_sum(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def all_gather(self, obj: Any) -> list[Any]:
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    # ---- evaluation --------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, dataset=None) -> dict[str, float]:
        """``eval_*`` metrics of ``dataset`` (default: the validation split)."""
        from torch.utils.data import DataLoader, DistributedSampler, Subset

        from melora_tune.data import compute_metrics

        dataset = self.eval_ds if dataset is None else dataset
        sampler = DistributedSampler(dataset, num_replicas=self.world, rank=self.rank, shuffle=False, drop_last=False)
        indices = list(sampler)  # padded: equal length on every rank
        loader = DataLoader(
            Subset(dataset, indices),
            batch_size=self.cfg.training.micro_batch_size * 2,
            shuffle=False,
            collate_fn=self.collate,
            generator=torch.Generator(),
        )
        self.engine.eval()
        outputs = []
        prompts: list[tuple[int, list[int]]] = []  # (row, prompt ids) of this rank's rows, for exact match
        for batch in loader:
            rows, lengths = batch.pop("row", None), batch.pop("prompt_length", None)
            if rows is not None and "exact_match" in self.metric_names:
                prompts += [(int(r), ids[:n].tolist()) for r, ids, n in zip(rows, batch["input_ids"], lengths)]
            batch = _to(batch, self.device)
            labels = batch.pop("labels")
            logits = self.engine(**batch).logits.float()
            if self.causal:
                shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
                nll = F.cross_entropy(shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none")
                mask = shift_labels != -100
                outputs.append(torch.stack([(nll * mask).sum(1), mask.sum(1).float()], 1).double().cpu())
            else:
                outputs.append(torch.cat([logits, labels.float().reshape(len(labels), -1)], 1).cpu())
        self.engine.train()
        local = (indices, torch.cat(outputs).numpy())
        seen: dict[int, Any] = {}
        for idx, rows in self.all_gather(local):
            for i, row in zip(idx, rows):
                seen.setdefault(i, row)  # the padding repeats early samples: keep one copy
        import numpy as np

        rows = np.stack([seen[i] for i in sorted(seen)])
        if self.causal:
            loss = float(rows[:, 0].sum() / max(rows[:, 1].sum(), 1.0))
            metrics = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
            if "exact_match" in self.metric_names:
                metrics["eval_exact_match"] = self.exact_match(dataset, prompts)
            return metrics
        predictions, labels = rows[:, :-1], rows[:, -1]
        if self.task.is_regression:
            predictions = predictions[:, 0]
            loss = float(np.mean((predictions - labels) ** 2))
        else:
            logits = torch.from_numpy(predictions)
            loss = float(F.cross_entropy(logits, torch.from_numpy(labels).long()))
            labels = labels.astype(np.int64)
        metrics = {"eval_loss": loss}
        metrics.update({f"eval_{k}": float(v) for k, v in compute_metrics(self.metric_names, predictions, labels).items()})
        return metrics

    def exact_match(self, dataset, prompts: list[tuple[int, list[int]]]) -> float:
        """Greedy answers to this rank's prompts, gathered, against the split's reference outputs."""
        from melora_tune.data.instruct import end_token
        from melora_tune.data.metrics import exact_match
        from melora_tune.trial.generation import greedy_generate

        split = "test" if dataset is self.test_ds else "validation"
        references = self.task.splits[split]["output"]
        new_tokens = self.task.max_new_tokens
        if self.task.answer_names:  # short labels: the longest one, plus its end token
            longest = max(len(self.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in self.task.answer_names)
            new_tokens = min(new_tokens, longest + 1)

        def everyone_done(done: bool) -> bool:
            return self.all_sum([0.0 if done else 1.0])[0] == 0.0

        answers = greedy_generate(
            self.engine, [ids for _, ids in prompts], max_new_tokens=new_tokens, end_id=end_token(self.tokenizer),
            pad_id=self.pad_id, device=self.device, batch_size=self.cfg.training.micro_batch_size * 2,
            everyone_done=everyone_done,
        )
        local = [(row, self.tokenizer.decode(ids, skip_special_tokens=True)) for (row, _), ids in zip(prompts, answers)]
        texts: dict[int, str] = {}
        for part in self.all_gather(local):
            for row, text in part:
                texts.setdefault(row, text)  # the sampler's padding repeats rows: one copy each
        return exact_match([texts[r] for r in sorted(texts)], [references[r] for r in sorted(texts)])

    def score_test_split(self, val_metrics: dict[str, float]) -> dict[str, float]:
        """The final model on the test split, once (``training.score_test``): ``test_*``, ``test_score``, and
        ``val_score`` (the same model's validation score, next to it); nothing without score_test."""
        if self.test_ds is None:
            return {}
        t = time.perf_counter()
        test = self.evaluate(self.test_ds)
        self._mark("test_s", t)
        out = {"test_" + k.removeprefix("eval_"): v for k, v in test.items()}
        out["test_score"] = self.score(test)
        out["val_score"] = self.score(val_metrics)
        return out

    def score(self, metrics: dict[str, float]) -> float:
        """Higher is better: the task's main metric, or minus the eval loss (a causal LM on classification data,
        or instruction data scored by loss)."""
        if self.main_metric == "loss":
            return -metrics["eval_loss"]
        return metrics[f"eval_{self.main_metric}"]

    # ---- checkpoints ---------------------------------------------------------------
    def save_checkpoint(self, directory: Path, state: dict[str, Any]) -> None:
        import deepspeed

        from melora_tune.adapters.inject import save_adapter

        self.engine.save_checkpoint(
            str(directory / ckpt_io.DS_DIR), tag=ckpt_io.DS_TAG, exclude_frozen_parameters=True, save_latest=False
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        gather = deepspeed.zero.GatheredParameters(trainable, modifier_rank=None) if self.zero3 else contextlib.nullcontext()
        with gather:
            if self.rank == 0:
                save_adapter(
                    self.model,
                    self.adapter_cfg,
                    directory / ckpt_io.ADAPTER_DIR,
                    base_model=self.cfg.model,
                    task=self.cfg.task.name,
                    task_type=self.cfg.task_type,
                    num_labels=int(self.task.num_labels),
                    label_names=list(self.task.label_names or []),
                    pooling=self.pooling,
                    step=state["step"],
                )
        ckpt_io.save_rng(directory, self.rank)
        if self.rank == 0:
            ckpt_io.write_state(directory, state)

    def report(self, metrics: dict[str, Any], state: dict[str, Any], *, full_checkpoint: bool) -> None:
        """Report with a checkpoint (Train V2 keeps metrics only of reports that carry one)."""
        t = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f"melora-ckpt-r{self.rank}-"))
        try:
            if full_checkpoint:
                self.save_checkpoint(tmp, state)
            elif self.rank == 0:
                ckpt_io.write_state(tmp, state)
            has_files = any(tmp.iterdir())
            self.reporter.report(
                metrics,
                tmp if has_files else None,
                f"checkpoint_{state['step']:07d}" + ("" if state["status"] == RUNNING else f"_{state['status']}"),
            )
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self._mark("checkpoint_report_s", t)

    # ---- the loop ----------------------------------------------------------------
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

    def run(self) -> dict[str, Any]:
        self.build()
        restored = self.restore()
        state = restored or self.fresh_state()
        if state["status"] != RUNNING:  # finished (or diverged) before: nothing left to do
            return self.summary(state)

        tr, plan = self.cfg.training, self.plan
        every = tr.eval_every_steps
        step = state["step"]
        loss_sum = micro_count = samples = 0.0
        train_time = 0.0
        inject = tr.debug_inject_nan_at_step
        self.engine.train()
        self.timings["setup_s"] = round(time.perf_counter() - self.t0, 3)

        while step < plan.total_steps:
            epoch, in_epoch = divmod(step, plan.steps_per_epoch)
            loader = self.epoch_loader(epoch, in_epoch)
            t_train = time.perf_counter()
            step_loss = 0.0
            for i, batch in enumerate(loader):
                batch = _to(batch, self.device)
                loss = self.engine(**batch).loss
                if inject is not None and step + 1 == inject:
                    loss = loss * float("nan")
                self.engine.backward(loss)
                self.engine.step()
                value = float(loss.detach())
                step_loss += value
                loss_sum += value
                micro_count += 1
                samples += len(batch["input_ids"])
                if (i + 1) % tr.grad_accum:
                    continue
                step += 1
                bad = 0.0 if _finite(step_loss) else 1.0
                step_loss = 0.0
                [bad] = self.all_sum([bad])
                if bad:
                    train_time += time.perf_counter() - t_train
                    return self.diverge(state, step, f"non-finite training loss at step {step} (lr={tr.lr:g})", train_time)
                end_of_epoch = step % plan.steps_per_epoch == 0
                if step == plan.total_steps or (every and step % every == 0) or (not every and end_of_epoch):
                    train_time += time.perf_counter() - t_train
                    totals = self.all_sum([loss_sum, micro_count, samples])
                    train_loss = totals[0] / max(totals[1], 1.0)
                    samples_per_s = totals[2] / train_time if train_time > 0 else 0.0
                    state["train_time_s"] = round(state.get("train_time_s", 0.0) + train_time, 3)
                    t_eval = time.perf_counter()
                    metrics = self.evaluate()
                    self._mark("eval_s", t_eval)
                    # validation time (not the test split's): with train_time_s, what an evaluation costs a search
                    state["eval_time_s"] = round(state.get("eval_time_s", 0.0) + time.perf_counter() - t_eval, 3)
                    if not _finite(metrics["eval_loss"]):
                        return self.diverge(state, step, f"non-finite eval loss at step {step} (lr={tr.lr:g})", 0.0)
                    state["step"] = step
                    state["status"] = COMPLETED if step == plan.total_steps else RUNNING
                    test = self.score_test_split(metrics) if step == plan.total_steps or tr.test_every_eval else {}
                    metrics = {
                        **self.base_metrics(state),
                        "train_loss": train_loss,
                        **metrics,
                        "score": self.score(metrics),
                        "samples_per_s": round(samples_per_s, 3),
                        "lr": float(self.scheduler.get_last_lr()[0]) if self.scheduler is not None else tr.lr,
                        "train_time_s": state["train_time_s"],
                        "eval_time_s": state["eval_time_s"],
                        "reason": None,
                        **test,
                    }
                    state["metrics"] = metrics
                    state["history"].append(metrics)
                    if state["best"] is None or metrics["score"] > state["best"]["score"]:
                        state["best"] = metrics
                    if self.rank == 0:
                        print(
                            f"[{self.name}] step {step}/{plan.total_steps} epoch {metrics['epoch']:.2f} "
                            f"train_loss {train_loss:.4f} eval_loss {metrics['eval_loss']:.4f} score {metrics['score']:.4f} "
                            f"{samples_per_s:.1f} samples/s",
                            flush=True,
                        )
                    self.report(metrics, state, full_checkpoint=True)
                    loss_sum = micro_count = samples = 0.0
                    train_time = 0.0
                    t_train = time.perf_counter()
                if step == plan.total_steps:
                    break
            else:
                train_time += time.perf_counter() - t_train
        return self.summary(state)

    def diverge(self, state: dict[str, Any], step: int, reason: str, train_time: float) -> dict[str, Any]:
        state.update(status=DIVERGED, reason=reason, step=step)
        state["train_time_s"] = round(state.get("train_time_s", 0.0) + train_time, 3)
        metrics = {**self.base_metrics(state), "score": DIVERGED_SCORE, "reason": reason, "train_time_s": state["train_time_s"]}
        state["metrics"] = metrics
        state["history"].append(metrics)
        if self.rank == 0:
            print(f"[{self.name}] diverged: {reason}", flush=True)
        self.report(metrics, state, full_checkpoint=False)
        return self.summary(state)

    def summary(self, state: dict[str, Any]) -> dict[str, Any]:
        if self.world > 1:
            torch.distributed.barrier()  # ZeRO-3 teardown without a barrier can abort at exit
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
    ``config = {"trial": TrialConfig dict (resolved), "name": str}``.

    Returns rank 0's summary (status, reason, step, final and best metrics, timings).
    """
    return TrialWorker(config).run()
