"""What the trial path costs over a bare PyTorch loop: the same steps, measured side by side in one run.

Both sides fine-tune the bundled MiniLM with the same adapter on the same Rotten Tomatoes
samples, in the same batches, with AdamW + linear warmup/decay and gradient clipping, one
process with the same thread count, and evaluate on the same validation samples after
every epoch:

* ``trial``: ``melora_tune.trial.run_trial``, i.e. Ray Train V2 ``TorchTrainer`` (1 worker)
  + DeepSpeed (ZeRO stage as given) + a checkpoint (adapter + optimizer state) per report;
* ``bare``:  a plain loop: ``from_pretrained`` + ``inject_adapters`` + ``torch.optim.AdamW``.

It prints wall times, the ratio trial / bare twice (with the one-off ``ray.init``, paid
once per search, and without it: what each further trial of a search pays) and where the
trial's fixed costs go (Ray Train start-up, imports, data, model, DeepSpeed init, checkpoint
+ report, teardown). Goal: ratio <= 1.15 for ~60-second trials.

Usage::

    .venv/bin/python benchmarks/trial_overhead.py                 # ~60 s trials, ~3 min in all on 2 cores
    .venv/bin/python benchmarks/trial_overhead.py --train 800     # shorter trials: fixed costs weigh more
    .venv/bin/python benchmarks/trial_overhead.py --zero 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def trial_config(args):
    from melora_tune.trial import TrialConfig, apply_overrides, prepare_trial

    return prepare_trial(apply_overrides(TrialConfig(), {
        "model": "minilm", "task.name": "rotten_tomatoes", "max_train_samples": args.train, "max_eval_samples": args.eval,
        "method": "melora", "n": 4, "r": 2, "alpha": 16, "lr": 3e-3, "epochs": args.epochs, "micro_batch_size": 32,
        "max_length": 64, "zero_stage": args.zero, "num_workers": 1, "cpus_per_worker": args.threads, "seed": 0,
        "keep_checkpoints": 1,
    })).cfg  # target modules and head resolved, as the trial path does


def bare_loop(cfg, threads: int) -> dict:
    """The same training as the trial, written the way one would without any framework."""
    import torch
    import transformers
    from torch.utils.data import DataLoader

    from melora_tune.adapters.inject import inject_adapters
    from melora_tune.data import compute_metrics, encode_classification, load_task
    from melora_tune.adapters.models import resolve_model
    from melora_tune.trial.ds_config import plan_for
    from melora_tune.trial.worker import pad_collate

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    transformers.utils.logging.set_verbosity_error()
    tr = cfg.training
    path = resolve_model(cfg.model)
    task = load_task(cfg.task_spec())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    enc = encode_classification(task, tok, tr.max_length, pad_to_max_length=False)
    torch.manual_seed(tr.seed)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=task.num_labels, dtype=torch.float32)
    inject_adapters(model, cfg.adapter.adapter_config())
    params = [p for p in model.parameters() if p.requires_grad]
    plan = plan_for(cfg, len(enc["train"]), 1)
    opt = torch.optim.AdamW(params, lr=tr.lr, weight_decay=tr.weight_decay)
    sched = transformers.get_linear_schedule_with_warmup(opt, plan.warmup_steps, plan.total_steps)
    collate = pad_collate(tok.pad_token_id)
    setup_s = time.perf_counter() - t0
    acc = math.nan
    for epoch in range(tr.epochs):
        model.train()
        g = torch.Generator().manual_seed(tr.seed + epoch)
        loader = DataLoader(enc["train"], batch_size=tr.micro_batch_size, shuffle=True, generator=g, collate_fn=collate)
        for step, batch in enumerate(loader):
            if step >= plan.steps_per_epoch:
                break
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        model.eval()
        preds, labels = [], []
        with torch.no_grad():
            for batch in DataLoader(enc["validation"], batch_size=tr.micro_batch_size * 2, collate_fn=collate):
                labels.append(batch.pop("labels"))
                preds.append(model(**batch).logits)
        acc = compute_metrics(("accuracy",), torch.cat(preds).numpy(), torch.cat(labels).numpy())["accuracy"]
    return {"wall_s": time.perf_counter() - t0, "setup_s": setup_s, "accuracy": float(acc), "steps": plan.total_steps}


def trial_path(cfg, threads: int, storage: str) -> dict:
    import ray

    from melora_tune.trial import run_trial

    t0 = time.perf_counter()
    ray.init(num_cpus=threads, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    result = run_trial(cfg, storage, "overhead", shutdown_ray=False)
    trial_s = time.perf_counter() - t1
    ray.shutdown()
    if not result.ok:
        raise SystemExit(f"the trial did not complete: {result.status} {result.reason}")
    return {
        "ray_init_s": ray_init_s, "trial_s": trial_s, "timings": result.timings, "steps": result.step,
        "accuracy": float(result.metrics.get("eval_accuracy", math.nan)),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000, help="training samples (default 2000: ~60 s trials on 2 cores)")
    ap.add_argument("--eval", type=int, default=400, help="validation samples")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage of the trial")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides (= the worker's CPUs)")
    ap.add_argument("--order", choices=["bare-first", "trial-first"], default="bare-first")
    ap.add_argument("--json", default=None, help="also write every number here")
    args = ap.parse_args(argv)

    cfg = trial_config(args)
    with tempfile.TemporaryDirectory(prefix="melora-overhead-") as storage:
        # a warm-up of the file cache (model weights, data) so neither side pays the cold read
        from melora_tune.data import load_task

        load_task(cfg.task_spec())
        runs = {}
        order = ["bare", "trial"] if args.order == "bare-first" else ["trial", "bare"]
        for side in order:
            runs[side] = bare_loop(cfg, args.threads) if side == "bare" else trial_path(cfg, args.threads, storage)
    bare, trial = runs["bare"], runs["trial"]
    t = trial["timings"]
    with_init = (trial["ray_init_s"] + trial["trial_s"]) / bare["wall_s"]
    without = trial["trial_s"] / bare["wall_s"]
    print(f"\nMiniLM + MELoRA(n=4, r=2), {args.train} train / {args.eval} eval samples, {args.epochs} epoch(s), "
          f"{trial['steps']} steps, {args.threads} thread(s), trial under ZeRO-{args.zero}")
    print(f"{'':34}{'wall s':>9}")
    print(f"{'bare PyTorch loop':34}{bare['wall_s']:9.1f}   (accuracy {bare['accuracy']:.3f})")
    print(f"{'trial: ray.init (once per search)':34}{trial['ray_init_s']:9.1f}")
    print(f"{'trial: run_trial':34}{trial['trial_s']:9.1f}   (accuracy {trial['accuracy']:.3f})")
    print("\nwhere the trial's time goes (s):")
    for key in ("ray_train_start_s", "import_s", "data_s", "model_s", "deepspeed_init_s", "checkpoint_report_s", "eval_s",
                "ray_train_stop_s"):
        if key in t:
            print(f"  {key:24}{t[key]:8.2f}")
    print(f"  bare loop setup (data + model) {bare['setup_s']:.2f}")
    print(f"\nratio trial / bare, first trial of a search (with ray.init): {with_init:.3f}")
    print(f"ratio trial / bare, every further trial (Ray already up):    {without:.3f}   goal <= 1.15: "
          + ("met" if without <= 1.15 else "NOT met"))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "bare": bare, "trial": trial,
                                               "ratio_with_init": with_init, "ratio": without}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
