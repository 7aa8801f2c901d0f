"""Trial checkpoints are read without running pickle: the RNG states are safetensors + JSON (restored bit-exactly),
DeepSpeed's .pt files load with torch's weights-only unpickler. The DeepSpeed round trip is slow (it starts
DeepSpeed in a subprocess); the rest is fast."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from melora_tune.trial import checkpoint as ckpt


def draws() -> tuple:
    """One value from every generator a trial uses, including Python's and numpy's cached Gaussians."""
    out = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.standard_normal(),
           torch.rand(3).tolist(), torch.randn(2).tolist())
    if torch.cuda.is_available():
        out += (torch.rand(3, device="cuda").tolist(),)
    return out


def scramble() -> None:
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)  # CUDA generators too


def test_rng_state_round_trips_bit_exactly_without_pickle(tmp_path):
    scramble()
    random.gauss(0, 1)  # leaves Python's second Gaussian cached (gauss_next)
    np.random.standard_normal()  # leaves numpy's second Gaussian cached (has_gauss=1)
    torch.randn(5)
    saved = ckpt.rng_state()
    assert saved["python"][2] is not None and saved["numpy"][3] == 1
    path = ckpt.save_rng(tmp_path, 3)
    assert path == tmp_path / ckpt.RNG_DIR / "rank3.safetensors"
    assert sorted(p.name for p in (tmp_path / ckpt.RNG_DIR).iterdir()) == ["rank3.safetensors"]
    expected = draws()

    scramble()
    assert ckpt.load_rng(tmp_path, 3) is True
    restored = ckpt.rng_state()
    assert restored["python"] == saved["python"]
    assert torch.equal(restored["torch"], saved["torch"])
    for mine, theirs in zip(restored["numpy"], saved["numpy"]):
        assert np.array_equal(mine, theirs) if isinstance(mine, np.ndarray) else mine == theirs
    if torch.cuda.is_available():
        assert all(torch.equal(a, b) for a, b in zip(restored["cuda"], saved["cuda"]))
    assert draws() == expected  # the same streams, bit for bit
    assert ckpt.load_rng(tmp_path, 0) is False  # no state for this rank: nothing restored, no error

    # the file is plain safetensors: arrays and string metadata, readable without torch or pickle
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata()["format"] == ckpt.RNG_FORMAT
        assert {"torch", "numpy.keys", "python.state"} <= set(f.keys())


class Payload:
    """What a hostile checkpoint holds: unpickling it runs code (here: writes a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def test_old_pt_rng_files_load_weights_only_and_a_hostile_one_runs_nothing(tmp_path):
    scramble()
    saved = ckpt.rng_state()
    (tmp_path / ckpt.RNG_DIR).mkdir()
    torch.save(saved, tmp_path / ckpt.RNG_DIR / "rank0.pt")  # the format before safetensors
    expected = draws()
    scramble()
    assert ckpt.load_rng(tmp_path, 0) is True and draws() == expected

    marker = tmp_path / "marker"
    torch.save({"torch": saved["torch"], "evil": Payload(str(marker))}, tmp_path / ckpt.RNG_DIR / "rank1.pt")
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_rng(tmp_path, 1)
    assert not marker.exists()


def test_weights_only_loads_forces_the_safe_unpickler_and_restores_torch_load(tmp_path):
    marker = tmp_path / "marker"
    torch.save({"w": torch.ones(2), "evil": Payload(str(marker))}, tmp_path / "hostile.pt")
    torch.save({"w": torch.ones(2), "step": 3}, tmp_path / "plain.pt")
    real = torch.load
    with ckpt.weights_only_loads():
        assert torch.load(tmp_path / "plain.pt", weights_only=False)["step"] == 3  # what DeepSpeed asks for
        with pytest.raises(pickle.UnpicklingError):
            torch.load(tmp_path / "hostile.pt", map_location="cpu", weights_only=False)
    assert torch.load is real and not marker.exists()


DEEPSPEED_ROUND_TRIP = textwrap.dedent("""
    import os, tempfile, logging
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["PORT"], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, torch.distributed as dist
    from melora_tune.trial.worker import skip_shm_comm_build
    from melora_tune.trial import checkpoint as ckpt
    skip_shm_comm_build()
    import deepspeed
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    dist.init_process_group("gloo")
    seen = []
    real = torch.serialization.load
    def build(stage, bf16):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        model[0].weight.requires_grad_(False)  # a frozen base, as in a trial
        cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2,
               "steps_per_print": 10**9, "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage},
               "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}},
               "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 10, "warmup_min_lr": 0.0,
                             "warmup_max_lr": 1e-2, "warmup_num_steps": 2, "warmup_type": "linear"}},
               "bf16": {"enabled": bf16}, "fp16": {"enabled": False}, "gradient_clipping": 1.0}
        params = [p for p in model.parameters() if p.requires_grad]
        return deepspeed.initialize(model=model, model_parameters=params, config=cfg, dist_init_required=False)[0]
    for stage, bf16 in [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)]:
        x = torch.randn(2, 8, dtype=torch.bfloat16 if bf16 else torch.float32)
        a = build(stage, bf16)
        for _ in range(2):
            a.backward(a(x).float().sum()); a.step()
        d = tempfile.mkdtemp()
        a.save_checkpoint(d, tag="state", exclude_frozen_parameters=True, save_latest=False)
        b = build(stage, bf16)
        with ckpt.weights_only_loads():
            path, _ = b.load_checkpoint(d, tag="state", load_module_strict=False)
        assert path is not None, (stage, bf16)
        assert b.global_steps == a.global_steps == 2 and b.lr_scheduler.state_dict() == a.lr_scheduler.state_dict()
        for _ in range(2):  # the optimizer state came back too: the next steps agree exactly
            for e in (a, b):
                e.backward(e(x).float().sum()); e.step()
        assert a(x).float().sum().item() == b(x).float().sum().item(), (stage, bf16)
        print("ok", stage, bf16, flush=True)
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_deepspeed_checkpoints_load_with_the_weights_only_unpickler(tmp_path):
    """Every ZeRO stage, fp32 and bf16: DeepSpeed's model and optimizer files load under weights_only_loads (its
    three allow-listed classes are all it pickles) and training continues exactly."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PORT": str(port), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_ROUND_TRIP], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 6, proc.stdout
