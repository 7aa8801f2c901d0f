"""How a trial's data reaches the model: padded batches, the training shard of an epoch, the evaluation shard.

Training data is sharded with a seeded ``DistributedSampler``; evaluation shards a split the same way, padded so
every rank runs the same number of forward passes (which ZeRO-3 needs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

from melora_tune.trial.config import TrainingSection
from melora_tune.trial.ds_config import StepPlan


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


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def epoch_loader(dataset, tr: TrainingSection, plan: StepPlan, collate, *, rank: int, world: int, epoch: int,
                 skip_steps: int) -> DataLoader:
    """This rank's micro-batches of ``epoch``, from optimizer step ``skip_steps`` on (a resumed epoch)."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=tr.seed, drop_last=False)
    sampler.set_epoch(epoch)
    per_step = tr.micro_batch_size * tr.grad_accum
    indices = list(sampler)[skip_steps * per_step : plan.steps_per_epoch * per_step]
    # A private generator: creating a DataLoader iterator draws a seed from its generator, and
    # drawing from the global one would shift the dropout RNG stream of a resumed run.
    return DataLoader(
        Subset(dataset, indices),
        batch_size=tr.micro_batch_size,
        shuffle=False,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(tr.seed + epoch),
    )


def eval_loader(dataset, batch_size: int, collate, *, rank: int, world: int) -> tuple[list[int], DataLoader]:
    """(this rank's row indices, padded to equal length on every rank; their loader)."""
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False, drop_last=False)
    indices = list(sampler)  # padded: equal length on every rank
    loader = DataLoader(
        Subset(dataset, indices),
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate,
        generator=torch.Generator(),
    )
    return indices, loader
