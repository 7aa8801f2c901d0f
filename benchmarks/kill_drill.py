"""Kill drill: a small real search with confirmation and report, its driver SIGKILLed at many named moments.

For each point: a fresh folder, ``melora-tune search SPACE --name drill`` with
``MELORA_DRILL_KILL_AT=<point>:<count>`` (``melora_tune.drill``: the count-th time the driver passes that point it
SIGKILLs its own process group, i.e. the driver and the local Ray it started), then
``melora-tune search SPACE --resume --name drill`` and ``melora-tune report``. The report point kills
``melora-tune report`` instead (after an unkilled search) and runs it again; the worker point kills the Tune trial
process (the one-worker trial trains in it) right after its first checkpoint, and the search itself must carry on.

Checks after each point, against one unkilled run of the same space:
  mlflow   every trial and every confirmation is one MLflow child run (no duplicates), FINISHED, parent FINISHED
  optuna   the study holds exactly one trial per Tune trial, none RUNNING/WAITING, numbers = the runs' numbers
  report   trials.csv and confirmations.csv equal the unkilled run's on the deterministic columns
           (method, hyperparameters, lr, score, status, epochs; confirmation config, seed, val/test scores)

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/kill_drill.py [--points a,b] [--keep DIR]

One line per point: point, phase, where it was killed, resume outcome, checks, seconds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # helpers.save_tiny_classifier


@dataclass(frozen=True)
class Point:
    name: str
    phase: str
    kill_at: str  # MELORA_DRILL_KILL_AT
    where: str


POINTS = [
    Point("before_fit", "search start", "search.before_fit:1",
          "MLflow parent + melora_search.json written, before Tuner.fit (no Tune snapshot yet)"),
    Point("mlflow_create", "search MLflow write", "search.mlflow_create:2",
          "2nd trial's MLflow child run created, before its params"),
    Point("result_1", "trial result -> snapshot", "search.result:1",
          "after the 1st trial result was logged, before Tune's snapshot"),
    Point("result_3", "trial result -> snapshot", "search.result:3",
          "after the 3rd trial result (2nd trial running)"),
    Point("tell", "searcher tell", "searcher.tell:1",
          "BudgetOptunaSearch.on_trial_complete: status attr set, study.tell not yet"),
    Point("told", "searcher tell", "searcher.told:2",
          "2nd trial told to Optuna, not yet marked completed nor snapshotted"),
    Point("mlflow_finish", "search MLflow write", "search.mlflow_finish:1",
          "1st trial's run tagged, not yet set_terminated"),
    Point("collected", "search -> confirmation", "search.collected:1",
          "all trials ended and collected, confirmation not started"),
    Point("confirm_planned", "confirmation planning", "confirm.planned:1",
          "confirmations planned, baselines logged, no confirmation Tune run yet"),
    Point("confirm_create", "confirmation MLflow write", "confirm.mlflow_create:1",
          "1st confirmation run created, before its params"),
    Point("confirm_result", "confirmation trial running", "confirm.result:1",
          "1st confirmation trial's epoch-1 result logged"),
    Point("confirm_finish", "confirmation MLflow write", "confirm.mlflow_finish:1",
          "1st confirmation run tagged, not yet set_terminated"),
    Point("report", "report", "report.log_artifact:2",
          "melora-tune report killed after logging its 2nd artifact"),
    Point("worker", "killed worker", "worker.reported:1",
          "the Tune trial process SIGKILLed after its 1st checkpoint (once)"),
]

TRIAL_COLS = ("method", "r", "n", "lr", "score", "status", "epochs", "adapter_params", "optuna_trial")
CONFIRM_COLS = ("method", "config", "seed", "status", "val_score", "test_score")


def space_data(model: Path, folder: Path, num_samples: int = 4, methods=("lora", "melora"), epochs: int = 2,
               samples: int = 128, points: list[dict] | None = None, budget: dict | None = None) -> dict:
    if points is None:  # the last trial is sampled (TPE's random start-up)
        points = [{"method": "lora", "r": 2, "lr": 1e-2}, {"method": "melora", "n": 4, "r": 1, "lr": 1e-2}][: num_samples - 1]
    return {
        "name": "drill",
        "model": str(model),
        "task": {"name": "rotten_tomatoes", "max_train_samples": samples, "max_eval_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "alpha": 16},
        "budget": budget or {"max_params": 512, "min_fraction": 0.5},
        "methods": list(methods),
        "space": {"lr": {"low": 1e-4, "high": 3e-2}, "r": [1, 2], **({"n": [2, 4]} if "melora" in methods else {})},
        "training": {"epochs": epochs, "micro_batch_size": 32, "max_length": 32, "zero_stage": 0},
        "asha": {"enabled": True, "grace_period": 1, "reduction_factor": 2},
        "num_samples": num_samples,
        "max_concurrent_trials": 1,  # one at a time: the unkilled run's order is the killed runs' order
        "n_startup_trials": 10,
        "seed": 0,
        "points_to_evaluate": points,
        "confirm": {"enabled": True, "top_k": 1, "seeds": 1},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
        "storage_path": str(folder / "runs"),
        "tracking_uri": f"sqlite:///{folder}/mlflow.db",
    }


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MELORA_DRILL")}
    env.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _cli(args: list[str], folder: Path, log: str, env: dict, timeout: float = 900) -> int:
    """Run ``melora-tune ARGS`` in its own session (a drill kill takes its process group, never us)."""
    with open(folder / log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "melora_tune.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env, cwd=folder, start_new_session=True)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -999
        finally:
            try:  # a killed driver's Ray processes share its group: take them down before the next start
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def search_args(folder: Path, resume: bool) -> list[str]:
    return ["search", str(folder / "space.yaml"), "--name", "drill", *(["--resume"] if resume else [])]


def report_args(folder: Path) -> list[str]:
    return ["report", "--dataset", "rotten_tomatoes", "--tracking-uri", f"sqlite:///{folder}/mlflow.db",
            "--out", str(folder / "report")]


def _rows(path: Path, cols) -> list[dict]:
    import pandas as pd

    if not path.exists():
        return []
    frame = pd.read_csv(path)
    keep = [c for c in cols if c in frame.columns]
    out = []
    for rec in frame[keep].to_dict("records"):
        out.append({k: (round(v, 6) if isinstance(v, float) and math.isfinite(v) else (None if isinstance(v, float) else v))
                    for k, v in rec.items()})
    return sorted(out, key=lambda r: json.dumps(r, sort_keys=True, default=str))


def deterministic(folder: Path) -> dict:
    return {"trials": _rows(folder / "report" / "trials.csv", TRIAL_COLS),
            "confirmations": _rows(folder / "report" / "confirmations.csv", CONFIRM_COLS)}


def check(folder: Path, num_samples: int, reference: dict | None) -> list[str]:
    """The failed checks (empty: all passed)."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    from melora_tune.search.cells import cell_studies

    failed = []
    meta = json.loads((folder / "runs" / "drill" / "melora_search.json").read_text())
    mlf = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    parent = mlf.get_run(meta["parent_run_id"])
    if parent.info.status != "FINISHED" or parent.data.tags.get("melora.status") != "finished":
        failed.append(f"parent {parent.info.status}/{parent.data.tags.get('melora.status')}")
    runs = mlf.search_runs([meta["mlflow_experiment_id"]], f"tags.`mlflow.parentRunId` = '{meta['parent_run_id']}'",
                           max_results=1000)
    confirms = [r for r in runs if r.data.tags.get("melora.kind") == "confirmation"]
    trials = [r for r in runs if r.data.tags.get("melora.kind") != "confirmation"]
    # Optuna numbers its trials per study, and a search has one study per cell
    numbers = {}
    for r in trials:
        numbers.setdefault(r.data.tags.get("melora.cell"), []).append(int(r.data.tags.get("melora.optuna_trial", -1)))
    numbers = {cell: sorted(v) for cell, v in numbers.items()}
    if len(trials) != num_samples or any(len(set(v)) != len(v) for v in numbers.values()):
        failed.append(f"mlflow trial runs {len(trials)} (optuna numbers per cell {numbers}), want {num_samples}")
    shares = {cell: len(v) for cell, v in numbers.items()}
    if len(set(shares.values())) > 1:
        failed.append(f"unequal shares after the kill: {shares}")
    if any(r.info.status != "FINISHED" for r in trials):
        failed.append("mlflow trial runs not FINISHED: " + ",".join(r.info.status for r in trials))
    keys = [(r.data.tags.get("melora.confirms"), r.data.tags.get("melora.seed")) for r in confirms]
    want_confirms = len(reference["confirmations"]) if reference else None
    if len(set(keys)) != len(keys) or (want_confirms is not None and len(confirms) != want_confirms):
        failed.append(f"mlflow confirmation runs {len(confirms)} ({len(set(keys))} distinct), want {want_confirms}")
    if any(r.info.status != "FINISHED" or r.data.tags.get("melora.status") != "completed" for r in confirms):
        failed.append("confirmation runs: " + ",".join(f"{r.info.status}/{r.data.tags.get('melora.status')}" for r in confirms))
    if any(not r.data.params.get("lr") for r in runs):
        failed.append("a run without params")
    studies = cell_studies(meta["study_name"], meta["optuna_storage"])
    if set(studies) != set(numbers):
        failed.append(f"optuna studies {sorted(studies)} != mlflow cells {sorted(numbers)}")
    for cell, study in studies.items():
        states = [t.state.name for t in study.trials]
        if len(study.trials) != shares.get(cell) or any(s in ("RUNNING", "WAITING") for s in states):
            failed.append(f"{cell}: optuna trials {len(study.trials)} {states}, want {shares.get(cell)} ended")
        if sorted(t.number for t in study.trials) != numbers.get(cell):
            failed.append(f"{cell}: optuna numbers {[t.number for t in study.trials]} != mlflow {numbers.get(cell)}")
        unfinished = [t.number for t in study.trials if t.state not in (TrialState.COMPLETE, TrialState.PRUNED)]
        if unfinished:
            failed.append(f"{cell}: optuna trials not COMPLETE/PRUNED: {unfinished}")
    if reference is not None:
        got = deterministic(folder)
        for key in ("trials", "confirmations"):
            if got[key] != reference[key]:
                failed.append(f"report {key} differ: {got[key]} != {reference[key]}")
    return failed


def prepare(folder: Path, model: Path, **space_kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "space.yaml").write_text(yaml.safe_dump(space_data(model, folder, **space_kw)))
    return folder


def run_point(point: Point | None, folder: Path, num_samples: int, reference: dict | None) -> dict:
    """Kill at ``point`` (None: the unkilled reference), resume, report, check."""
    t0 = time.time()
    out = {"point": point.name if point else "unkilled", "phase": point.phase if point else "-",
           "killed": point.where if point else "-"}
    kill = {} if point is None else {"MELORA_DRILL_KILL_AT": point.kill_at, "MELORA_DRILL_ONCE": str(folder / "drill.fired")}
    if point is not None and point.name == "report":
        rc = _cli(search_args(folder, False), folder, "search.log", _env())
        rc_kill = _cli(report_args(folder), folder, "report-killed.log", _env(**kill))
        out["first_rc"] = rc_kill
        steps = [("search", rc), ("report", _cli(report_args(folder), folder, "report.log", _env()))]
    else:
        rc_kill = _cli(search_args(folder, False), folder, "killed.log", _env(**kill))
        out["first_rc"] = rc_kill
        steps = []
        if rc_kill != 0:
            time.sleep(2)
            steps.append(("resume", _cli(search_args(folder, True), folder, "resume.log", _env())))
        steps.append(("report", _cli(report_args(folder), folder, "report.log", _env())))
    fired = point is None or (folder / "drill.fired").exists()
    expect_kill = point is not None and not point.name == "worker"
    out["resume"] = " ".join(f"{name} rc={rc}" for name, rc in steps)
    failed = []
    if point is not None and not fired:
        failed.append("the point was never reached")
    if expect_kill and rc_kill != -signal.SIGKILL:
        failed.append(f"first run exited {rc_kill}, not SIGKILLed")
    if point is not None and point.name == "worker" and rc_kill != 0:
        failed.append(f"search with a killed worker exited {rc_kill}")
    failed += [f"{name} exited {rc}" for name, rc in steps if rc != 0]
    if not any(" exited " in f for f in failed):
        try:
            failed += check(folder, num_samples, reference)
        except Exception as exc:  # noqa: BLE001
            failed.append(f"check raised {type(exc).__name__}: {exc}")
    out["checks"] = "passed" if not failed else "FAILED: " + "; ".join(failed)
    out["ok"] = not failed
    out["seconds"] = round(time.time() - t0, 1)
    return out


def line(res: dict) -> str:
    return (f"{res['point']:<16} | {res['phase']:<26} | {res['killed']} | first rc={res['first_rc']}, {res['resume']} | "
            f"{res['checks']} | {res['seconds']:.0f} s")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default=None, help="comma-separated point names (default: all)")
    ap.add_argument("--keep", default=None, help="work folder to keep (default: a temporary one, removed)")
    ap.add_argument("--num-samples", type=int, default=4)  # 2 per cell (lora, melora)
    args = ap.parse_args(argv)
    from helpers import save_tiny_classifier

    chosen = [p for p in POINTS if args.points is None or p.name in args.points.split(",")]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="melora-drill-"))
    work.mkdir(parents=True, exist_ok=True)
    model = save_tiny_classifier(work / "tiny-bert", max_positions=64)
    t0 = time.time()
    ref_dir = prepare(work / "unkilled", model, num_samples=args.num_samples)
    ref = run_point(None, ref_dir, args.num_samples, None)
    reference = deterministic(ref_dir)
    print(line(ref), flush=True)
    print(f"  reference: {len(reference['trials'])} trials, {len(reference['confirmations'])} confirmations", flush=True)
    results = [ref]
    for point in chosen:
        res = run_point(point, prepare(work / point.name, model, num_samples=args.num_samples), args.num_samples, reference)
        results.append(res)
        print(line(res), flush=True)
    ok = sum(r["ok"] for r in results[1:])
    print(f"{ok}/{len(chosen)} points passed, {time.time() - t0:.0f} s in all ({work})", flush=True)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok == len(chosen) and ref["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
