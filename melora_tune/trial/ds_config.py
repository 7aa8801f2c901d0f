"""The DeepSpeed engine config of a trial, and the step plan it is computed from.

Pure functions (no deepspeed import): the driver can build and check the config
before any worker starts, and tests can look at it without Ray.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from melora_tune.errors import UsageError
from melora_tune.trial.config import TrainingSection, TrialConfig


@dataclass(frozen=True)
class StepPlan:
    """How many samples, micro-batches and optimizer steps a trial runs.

    Every worker sees ``samples_per_worker`` = ceil(train_samples / world_size)
    samples an epoch (``DistributedSampler`` pads by repeating), in
    ``micro_batches_per_epoch`` micro-batches; an optimizer step takes
    ``grad_accum`` micro-batches and the trailing micro-batches that cannot fill
    a step are skipped, so every epoch has the same ``steps_per_epoch`` and a
    step boundary never straddles two epochs (which keeps resume exact).
    """

    train_samples: int
    world_size: int
    micro_batch_size: int
    grad_accum: int
    epochs: int
    samples_per_worker: int
    micro_batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def plan_steps(train_samples: int, world_size: int, micro_batch_size: int, grad_accum: int, epochs: int, warmup_ratio: float = 0.0) -> StepPlan:
    if train_samples < 1:
        raise UsageError("the training split is empty")
    per_worker = math.ceil(train_samples / world_size)
    micro = math.ceil(per_worker / micro_batch_size)
    steps = micro // grad_accum
    if steps < 1:
        raise UsageError(
            f"{train_samples} training samples over {world_size} worker(s) give {micro} micro-batch(es) of "
            f"{micro_batch_size} per epoch, fewer than grad_accum={grad_accum}: lower micro_batch_size or grad_accum"
        )
    total = steps * epochs
    return StepPlan(
        train_samples=train_samples,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        grad_accum=grad_accum,
        epochs=epochs,
        samples_per_worker=per_worker,
        micro_batches_per_epoch=micro,
        steps_per_epoch=steps,
        total_steps=total,
        warmup_steps=max(1, int(round(warmup_ratio * total))),  # DeepSpeed wants >= 1 (and uses >= 2)
    )


def plan_for(cfg: TrialConfig, train_samples: int, world_size: int | None = None) -> StepPlan:
    t = cfg.training
    return plan_steps(train_samples, world_size or cfg.resources.num_workers, t.micro_batch_size, t.grad_accum, t.epochs, t.warmup_ratio)


def bucket_size(trainable_params: int | None) -> int:
    """ZeRO's reduce/allgather buckets are allocated up front: size them to the adapter, not to 5e8 elements."""
    if not trainable_params:
        return int(5e7)
    return int(min(5e8, max(1_000_000, 2 * trainable_params)))


def learning_rates(cfg: TrialConfig) -> list[float]:
    """Peak rates of the optimizer's two parameter groups: [adapter, head (modules_to_save)]."""
    t = cfg.training
    return [t.lr, t.head_lr if t.head_lr is not None else t.lr]


def check_offload(t: TrainingSection) -> None:
    """The offload settings DeepSpeed cannot honour at this ZeRO stage (also checked by the memory estimate)."""
    if t.offload_optimizer and t.zero_stage == 0:
        raise UsageError("offload_optimizer needs ZeRO: set training.zero_stage to 1, 2 or 3")
    if t.offload_params and t.zero_stage != 3:
        # only ZeRO-3 partitions parameters; below it DeepSpeed would ignore offload_param without a word
        raise UsageError(f"offload_params needs ZeRO-3 (only it partitions parameters): set training.zero_stage: 3, "
                         f"or training.offload_params: false (zero_stage is {t.zero_stage})")


def check_quantization(cfg: TrialConfig) -> None:
    """An NF4 base (QLoRA) where it can run: bitsandbytes' 4-bit kernels need CUDA, and its packed weights are not
    something ZeRO-3 can partition."""
    t = cfg.training
    if t.quantization != "nf4":
        return
    if not cfg.resources.use_gpu:
        raise UsageError("training.quantization nf4 needs GPU workers (bitsandbytes 4-bit kernels): set "
                         "resources.use_gpu: true (gpus_per_worker in a search space), or training.quantization: none")
    if t.zero_stage == 3:
        raise UsageError("training.quantization nf4 cannot be partitioned by ZeRO-3 (bitsandbytes packs the weights): "
                         "set training.zero_stage to 0-2, or training.quantization: none")


def build_ds_config(
    cfg: TrialConfig,
    plan: StepPlan,
    *,
    on_gpu: bool | None = None,
    trainable_params: int | None = None,
    head_group: bool = False,
) -> dict[str, Any]:
    """DeepSpeed's config dict for ``deepspeed.initialize`` (optimizer and scheduler included).

    * AdamW with ``torch_adam`` (torch's AdamW, no FusedAdam JIT build), except
      with optimizer offload on a GPU, where DeepSpeed's CPUAdam is the point.
    * WarmupDecayLR: linear warmup over ``warmup_ratio`` of the steps, then
      linear decay to 0 at the last step; with ``head_group`` the optimizer has
      two parameter groups (adapter, head) and the head's peak rate is
      ``training.head_lr`` (``learning_rates``).
    * bf16 on GPU, fp32 on CPU unless ``training.precision`` says otherwise.
    """
    t = cfg.training
    on_gpu = cfg.resources.use_gpu if on_gpu is None else on_gpu
    precision = cfg.precision_on(on_gpu)
    offload_cpu_adam = t.offload_optimizer and on_gpu
    buckets = bucket_size(trainable_params)

    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage in (1, 2):
        zero.update(
            {
                "contiguous_gradients": True,
                "overlap_comm": on_gpu,
                "reduce_scatter": True,
                "reduce_bucket_size": buckets,
                "allgather_bucket_size": buckets,
            }
        )
    elif t.zero_stage == 3:
        zero.update(
            {
                "contiguous_gradients": True,
                "overlap_comm": on_gpu,
                "reduce_bucket_size": buckets,
                "stage3_prefetch_bucket_size": buckets,
                "stage3_param_persistence_threshold": 10_000,
                "stage3_gather_16bit_weights_on_model_save": False,
            }
        )
    check_offload(t)
    check_quantization(cfg)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": bool(on_gpu)}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": bool(on_gpu)}

    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": plan.global_batch_size,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": t.lr,
                "betas": [0.9, 0.999],
                "eps": 1e-8,
                "weight_decay": t.weight_decay,
                **({} if offload_cpu_adam else {"torch_adam": True}),
            },
        },
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {
                "total_num_steps": plan.total_steps,
                "warmup_min_lr": 0.0,
                "warmup_max_lr": learning_rates(cfg) if head_group else t.lr,
                "warmup_num_steps": plan.warmup_steps,
                "warmup_type": "linear",
            },
        },
        # an NF4 base computes in bf16 by itself (bitsandbytes' compute dtype) and keeps its adapters in fp32:
        # DeepSpeed's bf16 mode would cast the adapters (and try to cast the packed weights) to bf16
        "bf16": {"enabled": precision == "bf16" and t.quantization != "nf4"},
        "fp16": {"enabled": False},
    }
    if t.grad_clip > 0:
        ds["gradient_clipping"] = t.grad_clip
    if t.offload_optimizer and not offload_cpu_adam:
        # torch's AdamW on offloaded (CPU) states: DeepSpeed refuses it unless told it is intended.
        ds["zero_force_ds_cpu_optimizer"] = False
    return ds
