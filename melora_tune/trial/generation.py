"""Greedy generation inside a trial, for exact-match scoring of instruction tasks.

Written against the model's plain forward rather than ``generate()`` because the model here is a
DeepSpeed engine on every rank: under ZeRO-3 each forward gathers the partitioned weights collectively,
so every rank must run the same number of forwards. The loop below runs a fixed schedule (the same
number of prompt batches per rank, and it stops only when every rank's rows are done), needs no KV
cache or position bookkeeping (each step re-reads the whole right-padded sequences and takes each row's
logits at its own last position) and so works for any ``AutoModelForCausalLM``. Answers here are short
(a few tokens), where recomputing the prefix costs little.
"""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def greedy_generate(
    forward: Callable[..., object],
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    end_id: int | None,
    pad_id: int,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    everyone_done: Callable[[bool], bool] = lambda done: done,
) -> list[list[int]]:
    """The greedy continuation of each prompt (token ids, without the end token), at most ``max_new_tokens``.

    ``forward(input_ids=, attention_mask=)`` returns an object with ``.logits`` (a model or an engine).
    ``everyone_done(local)`` is True when every rank's batch has finished (an all-reduce across ranks);
    the default is a single process.
    """
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        n = len(chunk)
        lengths = torch.tensor([len(p) for p in chunk], dtype=torch.long)
        width = int(lengths.max()) + max_new_tokens
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, prompt in enumerate(chunk):
            ids[i, : len(prompt)] = torch.as_tensor(prompt, dtype=torch.long)
            mask[i, : len(prompt)] = 1
        done = torch.zeros(n, dtype=torch.bool)
        generated: list[list[int]] = [[] for _ in chunk]
        rows = torch.arange(n)
        for _ in range(max_new_tokens):
            if everyone_done(bool(done.all())):
                break
            used = int(lengths.max())
            logits = forward(input_ids=ids[:, :used].to(device), attention_mask=mask[:, :used].to(device)).logits
            nxt = logits[rows, (lengths - 1).to(logits.device)].argmax(-1).cpu()
            active = ~done
            for i in torch.nonzero(active).flatten().tolist():
                token = int(nxt[i])
                if end_id is not None and token == end_id:
                    done[i] = True
                else:
                    generated[i].append(token)
            grow = active & ~done  # rows that took a token: it becomes part of their sequence
            ids[rows[grow], lengths[grow]] = nxt[grow]
            mask[rows[grow], lengths[grow]] = 1
            lengths = lengths + grow.long()
        out.extend(generated)
    return out
