"""What the trial path costs over a bare PyTorch loop: the same steps, measured side by side in one run.

All sides fine-tune the bundled MiniLM with the same adapter on the same Rotten Tomatoes
samples, in the same batches, with AdamW + linear warmup/decay and gradient clipping, with
the same thread count, and evaluate on the same validation samples after every epoch:

* ``bare``:  a plain loop: ``from_pretrained`` + ``inject_adapters`` + ``torch.optim.AdamW``;
* ``search``: a Ray Tune search of identical one-worker trials, one after the other, with
  ``reuse_actors`` on as the search sets it for one-worker trials (``search.resources.reuse_actors``):
  each trains inside its Tune trial process (DeepSpeed, ZeRO stage as given, a checkpoint per
  report through ``ray.tune.report``). The first trial is what a search's first trial pays (a
  new trial process: imports, data, weights), timed from Tune starting it to its completion;
  a further trial runs in the process the first left (``trial.warm`` caches hot: tokenizer,
  tokenized splits, base weights), timed from the previous trial's completion to its own, so
  Tune's reset of the process and its scheduling are counted. Each trial's ``pid`` and
  ``warm_start`` are checked: a further trial that did not run warm is reported as such;
* ``--compare-fresh``: the same search again with ``reuse_actors`` off (each further trial in a
  fresh process, as before warm processes), for the difference;
* ``train``: ``run_trial`` with 2 Ray Train workers of ``threads / 2`` threads each (a
  ``TorchTrainer``: controller, placement group, worker actors): the multi-worker path.

It prints wall times and each ratio to the bare loop. ``ray.init`` (once per search) is
timed apart. Goals: first trial <= 1.15, a trial in a warm process <= 1.05, for ~60 s trials.
Run it on an idle machine: under load the sides do not see the same CPU and the ratios mean nothing.

Usage::

    .venv/bin/python benchmarks/trial_overhead.py                 # ~60 s trials, ~6 min in all on 2 cores
    .venv/bin/python benchmarks/trial_overhead.py --train 800     # shorter trials: fixed costs weigh more
    .venv/bin/python benchmarks/trial_overhead.py --further 2 --compare-fresh --json out.json
    .venv/bin/python benchmarks/trial_overhead.py --zero 2 --skip-train
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
    from melora_tune.adapters.pooling import apply_pooling, resolve_pooling
    from melora_tune.data import compute_metrics, encode_classification, load_task
    from melora_tune.adapters.models import resolve_model
    from melora_tune.trial.ds_config import plan_for
    from melora_tune.trial.batches import pad_collate

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
    apply_pooling(model, resolve_pooling(cfg.pooling, path, model, task_type=cfg.task_type))  # the trial's head input
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


def search_path(cfg, threads: int, storage: str, *, further: int, reuse: bool) -> dict:
    """``1 + further`` identical one-worker trials in one Tune search, one at a time, each timed by Tune callbacks."""
    import ray
    from ray import tune

    from melora_tune.trial import tune_trial

    class Clock(tune.Callback):
        def __init__(self):
            self.start, self.end, self.order = {}, {}, []

        def on_trial_start(self, iteration, trials, trial, **info):
            self.start[trial.trial_id] = time.perf_counter()
            self.order.append(trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.end[trial.trial_id] = time.perf_counter()

    t0 = time.perf_counter()
    ray.init(num_cpus=threads, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    ray_init_s = time.perf_counter() - t0
    clock = Clock()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    try:
        t1 = time.perf_counter()
        grid = tune.Tuner(
            tune.with_resources(tune_trial, {"CPU": threads}),
            param_space={"trial": cfg.to_dict(), "training.seed": tune.grid_search([cfg.training.seed] * (1 + further))},
            tune_config=tune.TuneConfig(metric="score", mode="max", max_concurrent_trials=1, reuse_actors=reuse),
            run_config=tune.RunConfig(name=f"overhead-{'warm' if reuse else 'fresh'}", storage_path=storage, verbose=0,
                                      callbacks=[clock]),
        ).fit()
        search_s = time.perf_counter() - t1
    finally:
        ray.shutdown()
    if grid.errors or any(r.metrics.get("status") != "completed" for r in grid):
        raise SystemExit(f"a search trial did not complete: {grid.errors}")
    by_id = {r.metrics["trial_id"]: r.metrics for r in grid}
    order = clock.order
    first_s = clock.end[order[0]] - clock.start[order[0]]
    # a further trial: from the previous one's completion (Tune resets or starts a process, then trains it)
    further_s = [clock.end[b] - clock.end[a] for a, b in zip(order, order[1:])]
    pids = [by_id[t]["pid"] for t in order]
    warm = [int(by_id[t].get("warm_start", 0)) for t in order]
    accuracy = float(by_id[order[0]].get("eval_accuracy", math.nan))
    return {"ray_init_s": ray_init_s, "search_s": search_s, "first_s": first_s, "further_s": further_s,
            "further_started_s": [clock.end[t] - clock.start[t] for t in order[1:]], "pids": pids, "warm_start": warm,
            "reused": [p == pids[0] for p in pids[1:]], "accuracy": accuracy}


def train_path(cfg, threads: int, storage: str) -> dict:
    """The multi-worker path: run_trial with 2 TorchTrainer workers sharing the threads."""
    import ray

    from melora_tune.trial import apply_overrides, run_trial

    workers = 2
    cfg2 = apply_overrides(cfg, {"num_workers": workers, "cpus_per_worker": max(1, threads // workers),
                                 "micro_batch_size": cfg.training.micro_batch_size // workers})
    ray.init(num_cpus=max(threads, workers), include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        t1 = time.perf_counter()
        result = run_trial(cfg2, storage, "overhead-train", shutdown_ray=False)
        trial_s = time.perf_counter() - t1
    finally:
        ray.shutdown()
    if not result.ok:
        raise SystemExit(f"the Train trial did not complete: {result.status} {result.reason}")
    return {"trial_s": trial_s, "timings": result.timings, "steps": result.step,
            "accuracy": float(result.metrics.get("eval_accuracy", math.nan))}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2000, help="training samples (default 2000: ~60 s trials on 2 cores)")
    ap.add_argument("--eval", type=int, default=400, help="validation samples")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--zero", type=int, default=2, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage of the trial")
    ap.add_argument("--threads", type=int, default=2, help="torch threads on both sides (= the worker's CPUs)")
    ap.add_argument("--further", type=int, default=1, help="further trials after the first, in the warm process (default 1)")
    ap.add_argument("--compare-fresh", action="store_true",
                    help="also run the search with reuse_actors off (further trials in fresh processes)")
    ap.add_argument("--skip-train", action="store_true", help="skip the 2-worker TorchTrainer side")
    ap.add_argument("--json", default=None, help="also write every number here")
    args = ap.parse_args(argv)
    if args.further < 1:
        ap.error("--further must be >= 1 (a warm trial is what this measures)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = trial_config(args)
    with tempfile.TemporaryDirectory(prefix="melora-overhead-") as storage:
        # a warm-up of the file cache (model weights, data) so no side pays the cold read
        from melora_tune.data import load_task

        load_task(cfg.task_spec())
        bare = bare_loop(cfg, args.threads)
        search = search_path(cfg, args.threads, storage, further=args.further, reuse=True)
        fresh = search_path(cfg, args.threads, storage, further=args.further, reuse=False) if args.compare_fresh else None
        train = None if args.skip_train else train_path(cfg, args.threads, storage)
    b = bare["wall_s"]
    warm_s = search["further_s"]
    ratios = {"first": search["first_s"] / b, "warm": sum(warm_s) / len(warm_s) / b}
    if fresh:
        ratios["fresh"] = sum(fresh["further_s"]) / len(fresh["further_s"]) / b
    if train:
        ratios["train"] = train["trial_s"] / b
    all_warm = all(search["reused"]) and all(search["warm_start"][1:])
    print(f"\nMiniLM + MELoRA(n=4, r=2), {args.train} train / {args.eval} eval samples, {args.epochs} epoch(s), "
          f"{bare['steps']} steps, {args.threads} thread(s), ZeRO-{args.zero}")
    print(f"{'':46}{'wall s':>8}{'/ bare':>8}")
    print(f"{'bare PyTorch loop':46}{b:8.1f}{1:8.2f}   (accuracy {bare['accuracy']:.3f})")
    print(f"{'ray.init (once per search)':46}{search['ray_init_s']:8.1f}")
    print(f"{'search, first trial (in-process)':46}{search['first_s']:8.1f}{ratios['first']:8.2f}   "
          f"(accuracy {search['accuracy']:.3f})")
    for i, (s_, pid, w) in enumerate(zip(warm_s, search["pids"][1:], search["warm_start"][1:]), start=2):
        how = "warm process" if pid == search["pids"][0] and w else "NOT warm: " + ("new process" if pid != search["pids"][0] else "cache missed")
        print(f"{f'search, trial {i} ({how})':46}{s_:8.1f}{s_ / b:8.2f}")
    if fresh:
        for i, s_ in enumerate(fresh["further_s"], start=2):
            print(f"{f'search without reuse_actors, trial {i} (fresh)':46}{s_:8.1f}{s_ / b:8.2f}")
    if train:
        print(f"{'run_trial, 2 Train workers (TorchTrainer)':46}{train['trial_s']:8.1f}{ratios['train']:8.2f}   "
              f"(accuracy {train['accuracy']:.3f})")
        t = train["timings"]
        print("  of which: " + ", ".join(f"{k} {t[k]:.1f}" for k in ("ray_train_start_s", "import_s", "deepspeed_init_s",
                                                                    "ray_train_stop_s") if k in t))
    print(f"\ngoal first trial <= 1.15: {'met' if ratios['first'] <= 1.15 else 'NOT met'} ({ratios['first']:.3f}); "
          f"goal warm trial <= 1.05: {'met' if ratios['warm'] <= 1.05 else 'NOT met'} ({ratios['warm']:.3f})"
          + ("" if all_warm else "  [a further trial did not run warm: see above]"))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "bare": bare, "search": search, "fresh": fresh,
                                               "train": train, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
