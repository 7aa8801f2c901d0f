"""Does a trial recipe learn? One-worker trials in this process on the demo's data, one row per override set.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/recipe_probe.py                      # the README's table
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/recipe_probe.py "method=lora r=1 lr=8e-3 pooling=model"

Each row trains the example trial (melora_tune/trial/example_trial.yaml) with the demo's sizes (1,000 train /
400 validation sentences, 2 epochs, seed 0) and the row's overrides, through the real trial path
(``TrialWorker`` under DeepSpeed, in process, checkpoints in a temporary folder), and prints the validation
score after each epoch (0.5775 is the majority class: nothing learned). The baselines (majority class, linear
probe on frozen features, with mean pooling and with the model's pooler) come last. About 2 minutes a row on
one CPU core.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ["task.max_train_samples=1000", "task.max_eval_samples=400", "cpus_per_worker=1"]
ROWS = [
    "method=lora r=1 lr=8e-3 pooling=model",
    "method=lora r=1 lr=8e-3 pooling=mean",
    "method=melora n=2 r=2 lr=1e-2 pooling=mean",
    "method=lora r=1 lr=3e-3 pooling=mean",
    "method=lora r=1 lr=3e-3 head_lr=1e-2 pooling=mean",
    "method=lora r=1 lr=1e-3 pooling=mean",
    "method=lora r=1 lr=1e-3 head_lr=1e-2 pooling=mean",
    "method=melora n=4 r=1 lr=3e-3 pooling=mean",
    "method=lora r=1 lr=2.1e-2 pooling=mean",
    "method=lora r=1 lr=2.1e-2 head_lr=2e-3 pooling=mean",
    "method=lora r=1 lr=2.1e-2 warmup_ratio=0.2 pooling=mean",
    "method=melora n=8 r=2 lr=2.9e-2 pooling=mean",
    "method=melora n=8 r=2 lr=2.9e-2 head_lr=2e-3 pooling=mean",
]


def prepared(overrides: list[str]):
    from melora_tune.trial.config import TrialConfig
    from melora_tune.trial.prepare import prepare_trial

    cfg = TrialConfig.from_yaml(ROOT / "melora_tune/trial/example_trial.yaml").with_overrides(DEMO + overrides)
    return prepare_trial(cfg)


def config(overrides: list[str]):
    return prepared(overrides).cfg


def run_row(overrides: list[str]) -> dict:
    from melora_tune.trial.inprocess import single_process_group
    from melora_tune.trial.reporting import LocalReporter
    from melora_tune.trial.worker import TrialWorker

    trial = prepared(overrides)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as run, single_process_group(False):
        worker = TrialWorker(trial, "probe", reporter=LocalReporter(run, False, 1))
        out = worker.run()
        state = json.loads(sorted(Path(run).glob("checkpoint_*/trial_state.json"))[-1].read_text())
    return {"overrides": " ".join(overrides), "pooling": worker.pooling,
            "scores": [round(m["score"], 4) for m in state["history"]], "train_loss": out["metrics"].get("train_loss"),
            "seconds": round(time.time() - t0)}


def main(argv: list[str]) -> int:
    import torch

    from melora_tune.trial.baselines import compute_baselines

    torch.set_num_threads(1)
    rows = [r.split() for r in (argv or ROWS)]
    print(f"{'overrides':58s} {'pooling':8s} {'val score per epoch':22s} {'train loss':>10s} {'s':>5s}", flush=True)
    for overrides in rows:
        r = run_row(overrides)
        print(f"{r['overrides']:58s} {r['pooling']:8s} {str(r['scores']):22s} {r['train_loss']:10.4f} {r['seconds']:5d}", flush=True)
    for pooling in ("auto", "model"):
        b = compute_baselines(config([f"pooling={pooling}"]))
        print(b.describe(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
