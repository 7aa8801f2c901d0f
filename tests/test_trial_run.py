"""One trial for real: Ray Train V2 + DeepSpeed on CPU (gloo), real data, no mocks: the bundled MiniLM where what it
learns is the claim, tiny random models (with the MiniLM tokenizer or a BPE one) where the trial's machinery is.

Every test here is slow (tens of seconds to a few minutes on 2 cores). They share
one local Ray cluster (2 CPUs) except the kill-and-resume test, which runs the
CLI in subprocesses that start their own. Trials with one worker train in the
test's (or the CLI's) own process; two workers make a TorchTrainer.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from melora_tune.trial import TrialConfig, apply_overrides, run_trial

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


def small_config(**overrides) -> TrialConfig:
    base = {
        "max_train_samples": 256,
        "max_eval_samples": 64,
        "epochs": 1,
        "micro_batch_size": 16,
        "max_length": 48,
        "method": "melora",
        "n": 4,
        "r": 2,
        "lr": 3e-3,
        "zero_stage": 0,
        "num_workers": 1,
    }
    base.update(overrides)
    return apply_overrides(TrialConfig(), base)


def eval_accuracy_in_process(adapter_dir: str, max_eval: int) -> float:
    """Load the exported adapter into a fresh MiniLM and score the same validation split in this process."""
    import transformers

    from melora_tune.adapters.inject import load_adapter
    from melora_tune.data import TaskSpec, compute_metrics, encode_classification, load_task
    from melora_tune.adapters.models import resolve_model

    path = resolve_model("minilm")
    task = load_task(TaskSpec(name="rotten_tomatoes", max_train_samples=1000, max_eval_samples=max_eval))
    tok = transformers.AutoTokenizer.from_pretrained(path)
    data = encode_classification(task, tok, 64)["validation"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    load_adapter(model, adapter_dir)
    model.eval()
    logits, labels = [], []
    with torch.no_grad():
        for i in range(0, len(data), 64):
            batch = data[i : i + 64]
            labels.append(batch.pop("labels"))
            logits.append(model(**batch).logits)
    return compute_metrics(["accuracy"], torch.cat(logits).numpy(), torch.cat(labels).numpy())["accuracy"]


def test_melora_minilm_zero2_two_workers_learns_rotten_tomatoes(ray_cluster, tmp_path):
    """MELoRA (n=4, r=2: equivalent rank 8) on query+value+head, ZeRO-2, 2 gloo workers: >= 0.70 accuracy."""
    cfg = apply_overrides(
        TrialConfig(),
        {
            "max_train_samples": 1000,  # 2 epochs of 32 steps: MiniLM's sentence features learn this fast
            "max_eval_samples": 500,
            "epochs": 2,
            "micro_batch_size": 16,  # per worker: 32 a step over 2 workers
            "max_length": 64,
            "method": "melora",
            "n": 4,
            "r": 2,
            "alpha": 16,
            "lr": 3e-3,
            "zero_stage": 2,
            "num_workers": 2,
        },
    )
    t0 = time.time()
    result = run_trial(cfg, tmp_path, "rt-melora")
    elapsed = time.time() - t0
    assert result.status == "completed", result.reason
    m = result.metrics
    assert m["eval_accuracy"] >= 0.70, m
    assert m["score"] == m["eval_accuracy"]
    assert result.step == result.total_steps == 2 * math.ceil(500 / 16)
    assert [h["epoch"] for h in result.history] == [1.0, 2.0]
    for key in ("eval_loss", "train_loss", "samples_per_s", "trainable_params", "adapter_params", "equivalent_rank", "eval_f1"):
        assert key in m, key
    assert m["equivalent_rank"] == 8
    assert m["adapter_params"] == 12 * 2 * (384 + 384)  # 6 layers x (query, value), r (d_in + d_out)
    assert m["trainable_params"] == m["adapter_params"] + 384 * 2 + 2
    # the checkpoint is small (adapter + optimizer state, no frozen base) ...
    size = sum(p.stat().st_size for p in Path(result.checkpoint_path).rglob("*") if p.is_file())
    assert size < 2_000_000, size
    # ... and the exported adapter reproduces the distributed evaluation exactly
    assert eval_accuracy_in_process(result.adapter_path, 500) == pytest.approx(m["eval_accuracy"], abs=1e-9)
    print(f"accuracy {m['eval_accuracy']:.3f} in {elapsed:.0f} s; timings {result.timings}")


def test_nan_loss_ends_trial_as_diverged(ray_cluster, tmp_path):
    cfg = small_config(debug_inject_nan_at_step=3, eval_every_steps=2)
    result = run_trial(cfg, tmp_path, "nan")
    assert result.status == "diverged"
    assert "non-finite" in result.reason and "step 3" in result.reason
    assert result.step == 3
    assert result.metrics["status"] == "diverged" and result.metrics["score"] == float("-inf")
    assert [h["status"] for h in result.history] == ["running", "diverged"]  # the eval at step 2 came first
    # running it again does not train on from NaN weights: it stays diverged at once
    again = run_trial(cfg, tmp_path, "nan")
    assert again.status == "diverged" and again.step == 3 and again.reason == result.reason


def test_local_csv_sentence_pairs(ray_cluster, tmp_path):
    """A local MRPC-like CSV (sentence1, sentence2, label): pairs reach BERT as pairs, metrics come back."""
    cfg = small_config(epochs=2, micro_batch_size=8, lr=5e-3)
    cfg = apply_overrides(cfg, {"task.name": "mrpc_local", "task.path": str(FIXTURES / "mrpc_sample.csv"), "task.glue_task": "mrpc",
                                "max_train_samples": None, "max_eval_samples": None, "task.validation_fraction": 0.2})
    result = run_trial(cfg, tmp_path, "pairs")
    assert result.status == "completed", result.reason
    assert {"eval_accuracy", "eval_f1", "eval_loss", "score"} <= set(result.metrics)
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0


def test_local_regression_jsonl(ray_cluster, tmp_path):
    """STS-B-like regression from a local JSONL: num_labels 1, MSE eval loss, Pearson as score."""
    cfg = small_config(epochs=1, micro_batch_size=8)
    cfg = apply_overrides(cfg, {"task.name": "stsb_local", "task.path": str(FIXTURES / "stsb_sample.jsonl"), "task.glue_task": "stsb",
                                "max_train_samples": None, "max_eval_samples": None, "task.validation_fraction": 0.25})
    result = run_trial(cfg, tmp_path, "stsb")
    assert result.status == "completed", result.reason
    m = result.metrics
    assert m["score"] == m["eval_pearson"] and "eval_spearmanr" in m
    assert math.isfinite(m["eval_loss"])


@pytest.fixture
def tiny_llama_dir(tmp_path):
    """A random GQA Llama (4 query heads, 2 key/value heads) with the MiniLM tokenizer, saved like a Hub model."""
    import transformers

    from melora_tune.adapters.models import resolve_model

    tok = transformers.AutoTokenizer.from_pretrained(resolve_model("minilm"))
    config = transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    path = tmp_path / "tiny-llama"
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_causal_lm_tiny_llama_melora_zero3(tmp_path, tiny_llama_dir):
    """Causal LM with GQA (v_proj 64 -> 32) on plain text (the loss is the score), MELoRA on q_proj,v_proj, ZeRO-3:
    the loss falls and the adapter exported under ZeRO-3 holds real (gathered) tensors. One worker, in this process:
    ZeRO-3 partitions and gathers the same way for a world of one; the two-worker ZeRO-3 run and its gathered export
    are test_instruction_trial_zero3_on_two_workers_resumes_at_the_same_step's."""
    cfg = small_config(epochs=2, max_train_samples=320, lr=1e-2, micro_batch_size=16, max_length=64, n=2, r=4,
                       zero_stage=3, num_workers=1, warmup_ratio=0.0)
    cfg = apply_overrides(cfg, {"model": str(tiny_llama_dir), "task_type": "causal_lm"})
    linear = torch.nn.functional.linear
    result = run_trial(cfg, tmp_path, "llama")
    assert result.status == "completed", result.reason
    # ZeRO-3 swapped torch's linear for its own while it trained; whatever runs next in this process (a reused
    # trial process's next trial) gets torch's back (a full run failed test_memory.py's autograd count without it)
    assert torch.nn.functional.linear is linear
    first, last = result.history[0], result.history[-1]
    assert math.isfinite(last["eval_perplexity"]) and last["eval_perplexity"] == pytest.approx(math.exp(last["eval_loss"]))
    assert last["eval_loss"] < first["eval_loss"]
    assert last["score"] == -last["eval_loss"]
    assert result.metrics["adapter_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # 2 layers x (q_proj, v_proj)
    # the adapter exported under ZeRO-3 holds real (gathered) tensors
    import transformers

    from melora_tune.adapters.inject import adapter_state_dict, load_adapter

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    cfg_loaded, _ = load_adapter(model, result.adapter_path)
    assert cfg_loaded.target_modules == ["q_proj", "v_proj"] and cfg_loaded.modules_to_save == []
    state = adapter_state_dict(model, cfg_loaded)
    assert all(t.numel() > 0 for t in state.values())
    assert any(float(t.abs().sum()) > 0 for k, t in state.items() if k.endswith("melora_B"))  # B started at zero


# ---- kill and resume ------------------------------------------------------------

RESUME_SETTINGS = [
    "max_train_samples=256", "max_eval_samples=64", "epochs=2", "max_length=48",
    "method=melora", "n=4", "r=2", "lr=3e-3", "zero_stage=2", "eval_every_steps=3",
    "training.seed=7", "keep_checkpoints=2",
    "num_workers=1", "micro_batch_size=32",  # one worker, trained in the CLI's own process: 8 steps an epoch
]


def _cli(config: Path, storage: Path, name: str, **popen):
    cmd = [sys.executable, "-m", "melora_tune.cli", "train", str(config), "--storage-path", str(storage), "--name", name,
           "--num-cpus", "2", "--json", "--set", *RESUME_SETTINGS]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(cmd, env=env, text=True, cwd=str(storage), **popen)


def _json_result(proc, timeout=600) -> dict:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


class _Background:
    """A CLI run started now and read at the end (the unkilled reference, run beside the victim and its resumption:
    on 2 cores it fills what their starts leave idle). Its output goes to files: a pipe nobody reads would stall it."""

    def __init__(self, start, folder: Path, name: str):
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = start(stdout=out, stderr=err)

    def result(self, timeout=600) -> dict:
        self.proc.wait(timeout)
        assert self.proc.returncode == 0, self.err.read_text()[-3000:]
        return json.loads(self.out.read_text().strip().splitlines()[-1])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# Two Train workers (ZeRO-3, dropout in the adapter) are test_instruction_trial_zero3_on_two_workers_resumes_at_the_same_step's:
# a second two-worker kill here (ZeRO-2) took 209 s of a CI process (three runs of a Ray, a controller and two workers)
# and covered only the stage's own optimizer shards on top of it, which the one-worker ZeRO-2 run here restores.
def test_killed_trial_resumes_from_its_last_checkpoint(tmp_path, request):
    import ray

    from helpers import save_tiny_classifier

    if ray.is_initialized():
        ray.shutdown()
    # a tiny random BERT (2 layers, hidden 32, with dropout) and the MiniLM tokenizer: what resumes is the trial's
    # state (data order, dropout RNG, optimizer and scheduler), not MiniLM's weights, so the model stays small
    model = save_tiny_classifier(tmp_path / "tiny-bert", max_positions=64)
    config = tmp_path / "trial.yaml"
    config.write_text(f"model: {model}\ntask:\n  name: rotten_tomatoes\n")
    storage = tmp_path / "runs"
    storage.mkdir()

    # the run to kill: SIGKILL its whole process group once a checkpoint is committed
    victim = _cli(config, storage, "victim", start_new_session=True)
    background = _Background(lambda **out: _cli(config, storage, "reference", **out), tmp_path, "reference")
    request.addfinalizer(background.stop)
    run_dir = storage / "victim"
    deadline = time.time() + 480
    committed = None
    while time.time() < deadline and victim.poll() is None:
        done = sorted(run_dir.glob("checkpoint_*/trial_state.json"))
        # one worker writes no Train snapshot: its checkpoint folders are renamed into place once complete
        if done:
            committed = done
            break
        time.sleep(0.2)
    if not committed:  # the victim ended (or stalled) before a checkpoint: say why, from its own output
        if victim.poll() is None:
            os.killpg(victim.pid, signal.SIGKILL)
        out, err = victim.communicate()
        pytest.fail(f"no checkpoint was written; the victim exited {victim.returncode}:\n{err[-4000:]}\n{out[-1000:]}")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.communicate()
    states = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/trial_state.json")]
    killed_at = max(s["step"] for s in states)
    assert all(s["status"] == "running" for s in states), "killed too late: the trial had already finished"

    resumed = _json_result(_cli(config, storage, "victim"))
    reference = background.result()

    assert reference["status"] == resumed["status"] == "completed"
    # 256 samples / 32 a step = 8 steps an epoch, 2 epochs
    assert resumed["step"] == resumed["total_steps"] == reference["step"] == reference["total_steps"] == 16
    assert resumed["restarts"] == 1 and reference["restarts"] == 0
    assert killed_at < 16
    # same data order, dropout RNG and optimizer/scheduler state after the restart: the same trajectory
    for key in ("eval_loss", "train_loss", "eval_accuracy", "lr"):
        assert resumed["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-5, abs=1e-9), key
    history = json.loads((Path(resumed["checkpoint_path"]) / "trial_state.json").read_text())["history"]
    assert [h["step"] for h in history] == [3, 6, 9, 12, 15, 16]
    assert len(list(run_dir.glob("checkpoint_0*"))) <= 2  # keep_checkpoints


def test_a_worker_killed_mid_report_leaves_no_staging_folder(tmp_path, monkeypatch):
    """A report stages its checkpoint in the temp folder (melora-ckpt-r<rank>-p<pid>-*) before publishing it: a worker
    killed right then leaves that folder, and the next trial start on the machine (``TrialCheckpoints``, built by every
    worker) removes it, since its pid is gone; a live worker's folder stays. A tiny model trained in the CLI's own
    process (no Ray), a report every step, the kill the moment a staging folder shows."""
    import tempfile

    from helpers import save_tiny_classifier

    from melora_tune.trial.persist import TrialCheckpoints

    model = save_tiny_classifier(tmp_path / "tiny-bert", max_positions=32)
    config = tmp_path / "trial.yaml"
    config.write_text(json.dumps({
        "model": str(model), "task": {"name": "rotten_tomatoes", "max_train_samples": 64, "max_eval_samples": 8},
        "adapter": {"method": "lora", "r": 1},
        "training": {"epochs": 1, "micro_batch_size": 8, "max_length": 16, "eval_every_steps": 1, "zero_stage": 0,
                     "keep_checkpoints": 1},
    }))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    staged = lambda: sorted(p.name for p in tmp.iterdir() if p.name.startswith("melora-ckpt-"))  # noqa: E731

    for attempt in range(3):  # the kill lands inside a report's few milliseconds nearly always; retry when it did not
        with open(tmp_path / f"victim{attempt}.log", "w") as log:
            victim = subprocess.Popen(
                [sys.executable, "-m", "melora_tune.cli", "train", str(config), "--storage-path", str(tmp_path / "runs"),
                 "--name", f"victim{attempt}"], env=env, stdout=log, stderr=log, start_new_session=True)
            while victim.poll() is None and not staged():
                time.sleep(0.001)
            if victim.poll() is None:
                os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(60)
        if staged():
            break
    left = staged()
    assert left and victim.returncode == -signal.SIGKILL, (tmp_path / f"victim{attempt}.log").read_text()[-2000:]
    assert all(name.startswith(f"melora-ckpt-r0-p{victim.pid}-") for name in left)

    live = tmp / f"melora-ckpt-r0-p{os.getpid()}-x"  # a worker still reporting
    live.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    TrialCheckpoints(None, None, None, {}, None, None, zero3=False)  # what every trial start builds
    assert staged() == [live.name]


# ---- instruction tuning: a causal LM under ZeRO-3 on 2 workers, killed and resumed -------------------------

INSTRUCT_SETTINGS = [
    "task_type=causal_lm", "task.name=trec_instruct", "max_train_samples=128", "max_eval_samples=24", "epochs=1",
    "max_length=96", "method=lora", "r=4", "target_modules=[q_proj,v_proj]", "dropout=0.1", "lr=3e-3", "zero_stage=3",
    "eval_every_steps=2", "training.seed=5", "keep_checkpoints=2", "num_workers=2", "micro_batch_size=8",
    "task.max_new_tokens=4",
]


def test_instruction_trial_zero3_on_two_workers_resumes_at_the_same_step(tmp_path, request):
    """Llama-like model (GQA, BOS/EOS, no pad token), instruction data with exact match, ZeRO-3 over 2 Train workers:
    killed after a checkpoint, the rerun continues from that step and ends where an unkilled run ends. The adapter's
    dropout draws from each rank's RNG, so the ranks' data order, RNG and optimizer partitions must all come back.
    The unkilled run recomputes its activations (gradient checkpointing), which must not change a number either."""
    import ray

    from helpers import save_tiny_llama_with_bpe

    if ray.is_initialized():
        ray.shutdown()
    model = save_tiny_llama_with_bpe(tmp_path / "tiny-llama-bpe")
    config = tmp_path / "instruct.yaml"
    config.write_text(f"model: {model}\n")
    storage = tmp_path / "runs"
    storage.mkdir()

    def cli(name: str, extra=(), **popen):
        cmd = [sys.executable, "-m", "melora_tune.cli", "train", str(config), "--storage-path", str(storage),
               "--name", name, "--num-cpus", "2", "--json", "--set", *INSTRUCT_SETTINGS, *extra]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
        return subprocess.Popen(cmd, env=env, text=True, cwd=str(storage), **popen)

    victim = cli("victim", start_new_session=True)
    background = _Background(lambda **out: cli("reference", extra=["gradient_checkpointing=true"], **out), tmp_path,
                             "reference")
    request.addfinalizer(background.stop)
    run_dir = storage / "victim"
    deadline = time.time() + 480
    while time.time() < deadline and victim.poll() is None:
        if (run_dir / "checkpoint_manager_snapshot.json").is_file() and list(run_dir.glob("checkpoint_*/trial_state.json")):
            break
        time.sleep(0.2)
    os.killpg(victim.pid, signal.SIGKILL)
    _, err = victim.communicate()
    states = [json.loads(p.read_text()) for p in run_dir.glob("checkpoint_*/trial_state.json")]
    assert states, f"no checkpoint was written: {err[-2000:]}"
    killed_at = max(s["step"] for s in states)
    assert all(s["status"] == "running" for s in states), "killed too late: the trial had already finished"

    resumed = _json_result(cli("victim"))
    reference = background.result()
    # 128 rows / (2 workers x 8) = 8 steps, evaluated every 2
    assert resumed["status"] == reference["status"] == "completed"
    assert resumed["step"] == reference["step"] == 8 and resumed["restarts"] == 1 and reference["restarts"] == 0
    history = json.loads((Path(resumed["checkpoint_path"]) / "trial_state.json").read_text())["history"]
    assert [h["step"] for h in history] == [2, 4, 6, 8] and killed_at in (2, 4, 6)
    for key in ("eval_loss", "train_loss", "eval_exact_match", "eval_perplexity", "lr", "score"):
        assert resumed["metrics"][key] == pytest.approx(reference["metrics"][key], rel=1e-5, abs=1e-9), key
    assert resumed["metrics"]["score"] == resumed["metrics"]["eval_exact_match"]
    assert resumed["metrics"]["adapter_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # 2 layers x (q_proj, v_proj)
    # what the two ZeRO-3 ranks exported holds real (gathered) tensors, and B moved from its zero start
    import transformers

    from melora_tune.adapters.inject import adapter_state_dict, load_adapter

    base = transformers.AutoModelForCausalLM.from_pretrained(model)
    loaded, _ = load_adapter(base, resumed["adapter_path"])
    assert loaded.target_modules == ["q_proj", "v_proj"]
    state = adapter_state_dict(base, loaded)
    assert state and all(t.numel() > 0 for t in state.values())
    assert any(float(t.abs().sum()) > 0 for k, t in state.items() if k.endswith("lora_B"))


def test_bf16_instruction_trial_learns_and_saves_a_bf16_adapter(tmp_path):
    """precision bf16 (what a GPU trial uses by default), here on CPU: DeepSpeed's bf16 engine trains the instruction
    trial, the loss falls and the saved adapter is bf16 as trained. (Which dtype the frozen base loads in is not
    observable from here: DeepSpeed casts the whole module to bf16 either way.)"""
    from safetensors.torch import load_file

    from helpers import save_tiny_llama_with_bpe

    model = save_tiny_llama_with_bpe(tmp_path / "tiny-llama-bpe")
    cfg = apply_overrides(TrialConfig(), {
        "model": str(model), "task_type": "causal_lm", "task.path": None, "task.name": "trec_instruct",
        "max_train_samples": 96, "max_eval_samples": 16, "epochs": 2, "max_length": 96, "micro_batch_size": 8,
        "method": "melora", "n": 2, "r": 2, "target_modules": ["q_proj", "v_proj"], "lr": 1e-2, "zero_stage": 2,
        "precision": "bf16", "task.max_new_tokens": 3,
    })
    result = run_trial(cfg, tmp_path, "bf16")
    assert result.status == "completed", result.reason
    first, last = result.history[0], result.history[-1]
    assert math.isfinite(last["eval_loss"]) and last["eval_loss"] < first["eval_loss"]
    assert 0.0 <= last["eval_exact_match"] <= 1.0
    tensors = load_file(str(Path(result.adapter_path) / "adapter_model.safetensors"))
    assert tensors and {t.dtype for t in tensors.values()} == {torch.bfloat16}
