"""Will a trial fit its GPU? The memory estimate (melora_tune.trial.memory) against DeepSpeed's own estimators,
by hand on a tiny Llama, in the directions a user relies on, and as the refusal a search start gives.

Everything runs on the meta device or on a tiny CPU model: no GPU, no Ray, no training.
"""

from __future__ import annotations

import json
import re

import pytest
import yaml

from helpers import tiny_bert_config, tiny_llama_config
from melora_tune.adapters.accounting import ModelSpec
from melora_tune.errors import UsageError
from melora_tune.trial.config import TrialConfig
from melora_tune.trial.memory import (
    CUDA_CONTEXT_BYTES, GIB, STATE_BYTES, _shape_facts, check_fits, estimate, model_states, trial_facts,
)

LLAMA = "meta-llama/Llama-2-7b-hf"


@pytest.fixture(scope="module")
def llama7b():
    """Llama-2-7B on the meta device, from the config.json the package ships (offline)."""
    return ModelSpec.from_pretrained(LLAMA, task="causal_lm")


@pytest.fixture(scope="module")
def tiny_spec():
    return ModelSpec.from_config(tiny_llama_config(), task="causal_lm", name="tiny-llama")


def trial(model: str = LLAMA, *, method: str = "lora", r: int = 64, workers: int = 1, gpu: bool = True, **training) -> TrialConfig:
    return TrialConfig.from_dict({
        "model": model, "task_type": "causal_lm",
        "adapter": {"method": method, "r": r, "target_modules": ["q_proj", "v_proj"], "modules_to_save": []},
        "training": {"micro_batch_size": 8, "max_length": 256, "zero_stage": 2, "precision": "bf16", **training},
        "resources": {"use_gpu": gpu, "num_workers": workers},
    })


# ---- DeepSpeed's estimators, full fine-tuning --------------------------------------------------------------

def _full_ft(total, largest, world, stage, offload, offload_params=False, per_node=None):
    ours = model_states(total_params=total, trainable_params=total, largest_layer_params=largest, world_size=world,
                        stage=stage, offload_optimizer=offload, offload_params=offload_params, workers_per_node=per_node)
    return int(ours.cpu), int(ours.gpu)


@pytest.mark.parametrize("world", [1, 2, 8])
@pytest.mark.parametrize("offload", [False, True], ids=["no-offload", "offload"])
def test_full_finetuning_reproduces_deepspeeds_estimators(world, offload, tiny_llama):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs as zero3
    from deepspeed.runtime.zero.stage3 import model_to_params
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs as zero2

    # our module-tree facts are DeepSpeed's (on a real CPU model: its data_ptr dedup needs storage)
    total, largest = model_to_params(tiny_llama)
    facts = _shape_facts(ModelSpec(tiny_llama))
    assert (facts["total_params"], facts["largest_layer_params"]) == (total, largest) == (77_120, 7_680)

    for p, layer in ((total, largest), (6_738_415_616, 131_072_000), (1_000_003, 65_537)):  # a tiny, 7B, odd model
        assert _full_ft(p, layer, world, 2, offload) == zero2(p, num_gpus_per_node=world, cpu_offload=offload)
        for params in ((False, True) if offload else (False,)):
            ds = zero3(p, layer, num_gpus_per_node=world, cpu_offload=offload, cpu_offload_params=params, zero_init=False)
            assert _full_ft(p, layer, world, 3, offload, params) == ds[:2]
    # ZeRO-3 across nodes too: 2 nodes x 4 GPUs (DeepSpeed's ZeRO-2 offload formula counts every GPU of every
    # node per node, so only single-node layouts are compared there)
    ds = zero3(6_738_415_616, 131_072_000, num_gpus_per_node=4, num_nodes=2, cpu_offload=offload, zero_init=False)
    assert _full_ft(6_738_415_616, 131_072_000, 8, 3, offload, offload, per_node=4) == ds[:2]


# ---- PEFT, by hand on the tiny Llama --------------------------------------------------------------------------

def test_peft_model_states_by_hand(tiny_spec):
    # tiny Llama: 77,120 params; LoRA r=2 on q_proj (64->64) and v_proj (64->32) of 2 layers: 2*(128+96)*2 = 896
    # trainable; the largest layer is the 120x64 embedding (7,680, frozen)
    cfg = trial("tiny", r=2, workers=2, micro_batch_size=2, max_length=16)
    facts = trial_facts(cfg, tiny_spec)
    assert (facts.total_params, facts.trainable_params, facts.largest_layer_params) == (77_120, 896, 7_680)
    assert not facts.largest_layer_trainable
    frozen, t = 77_120 - 896, 896

    z2 = estimate(cfg, facts=facts).components
    assert z2["frozen weights"] == frozen * 2  # bf16, whole on each GPU
    assert z2["trainable weights"] == t * 2
    assert z2["gradients + optimizer states"] == t * (2 + STATE_BYTES) // 2  # 16-bit grads + fp32 states, sharded
    assert z2["ZeRO-3 gathered layer"] == 0

    z3 = estimate(cfg.with_overrides({"zero_stage": 3}), facts=facts).components
    assert z3["frozen weights"] == frozen * 2 // 2  # ZeRO-3 partitions the frozen weights too
    assert z3["trainable weights"] == t * 2 // 2
    assert z3["gradients + optimizer states"] == t * STATE_BYTES // 2
    assert z3["ZeRO-3 gathered layer"] == 7_680 * 2  # the embedding gathered in bf16, no gradient

    # activations: s*b*h = 16*2*64 = 2048; per layer 2048*(15 + 2 + 8*96/64) + 5*4*16^2*2 = 69,632 bytes (16-bit)
    assert z2["activations"] == 2 * 69_632
    assert z2["logits"] == 16 * 2 * 120 * (2 + 4 + 4)  # bf16 logits + the loss's fp32 copy and log-softmax
    assert z2["CUDA context"] == CUDA_CONTEXT_BYTES

    off = estimate(cfg.with_overrides({"offload_optimizer": True}), facts=facts)
    assert off.components["gradients + optimizer states"] == 0
    # host per node: each of the 2 workers loads the base in bf16 (the worker's load dtype on GPU); their
    # offloaded states are far smaller
    assert off.cpu_per_node == int(1.5 * 2 * 77_120 * 2)


def test_nf4_base_weights(llama7b):
    plain = estimate(trial(), llama7b).components["frozen weights"]
    nf4 = estimate(trial(quantization="nf4"), llama7b).components["frozen weights"]
    # 4-bit + fp32 absmax per 64 for the linear layers; embeddings and lm_head (2 x 131M) stay bf16
    assert 3.5 * GIB < nf4 < 4.0 * GIB < plain / 3


# ---- the directions a user relies on -------------------------------------------------------------------------

@pytest.mark.parametrize("world", [2, 8])
def test_zero3_needs_less_per_gpu_than_zero2_on_several_workers(world, llama7b):
    z2 = estimate(trial(workers=world), llama7b)
    z3 = estimate(trial(workers=world, zero_stage=3), llama7b)
    assert z3.per_worker < z2.per_worker
    assert z3.components["frozen weights"] == pytest.approx(z2.components["frozen weights"] / world, rel=1e-6)


def test_checkpointing_and_smaller_micro_batches_lower_activations(llama7b):
    base = estimate(trial(), llama7b).components["activations"]
    ckpt = estimate(trial(gradient_checkpointing=True), llama7b).components["activations"]
    half = estimate(trial(micro_batch_size=4, grad_accum=2), llama7b).components["activations"]
    assert ckpt < base / 10 and half < base
    more = estimate(trial(r=128), llama7b)  # a larger adapter: more trainable states, same activations
    assert more.per_worker > estimate(trial(), llama7b).per_worker


# ---- the refusal -----------------------------------------------------------------------------------------------

def named_fix(message: str) -> dict[str, str]:
    fix = re.search(r": set (.+) \(~[\d.]+ GiB\)$", message)
    assert fix, message
    return dict(part.split(": ") for part in fix.group(1).split(", "))


def test_llama7b_lora_r64_on_24gb_is_refused_with_a_fix_that_fits(llama7b):
    cfg = trial()  # LoRA r=64 (33.6M params), bf16, ZeRO-2, 1 worker, micro batch 8 x 256 tokens
    est = estimate(cfg, llama7b)
    assert est.per_worker > 24 * GIB
    with pytest.raises(UsageError) as err:
        check_fits(cfg, est, 24 * GIB)
    message = str(err.value)
    assert "\n" not in message and "the GPUs have 24.00 GiB" in message
    assert "frozen weights 12." in message and "activations 12." in message
    fixed = cfg.with_overrides(named_fix(message))
    assert estimate(fixed, llama7b).per_worker <= 24 * GIB
    check_fits(fixed, estimate(fixed, llama7b), 24 * GIB)  # and the check agrees


def test_a_smaller_gpu_gets_a_combined_fix_and_a_hopeless_one_names_the_largest_part(llama7b):
    cfg = trial()
    with pytest.raises(UsageError) as err:
        check_fits(cfg, estimate(cfg, llama7b), 8 * GIB)
    fix = named_fix(str(err.value))
    assert fix["training.zero_stage"] == "3" and int(fix["resources.num_workers"]) > 1
    assert estimate(cfg.with_overrides(fix), llama7b).per_worker <= 8 * GIB
    # half a GiB: even 8 workers with everything on leave the frozen weights' share over it
    with pytest.raises(UsageError, match=r"and no change tried fits \(.*at best ~[\d.]+ GiB, most of it frozen weights "
                                         r"[\d.]+\): set training.quantization: nf4 .*, or use GPUs with more memory$"):
        check_fits(cfg, estimate(cfg, llama7b), GIB // 2)


def test_a_gpu_share_is_what_a_worker_gets(llama7b):
    cfg = trial(gradient_checkpointing=True).with_overrides({"gpus_per_worker": 0.5})
    est = estimate(cfg, llama7b)
    check_fits(cfg, est, 40 * GIB)
    with pytest.raises(UsageError, match=r"a worker's share \(0.5 of a 24.00 GiB GPU\) is 12.00 GiB"):
        check_fits(cfg, est, 24 * GIB)


def test_estimate_refuses_offload_settings_deepspeed_cannot_honour(tiny_spec):
    with pytest.raises(UsageError, match="offload_params needs ZeRO-3"):
        estimate(trial("tiny", r=2, offload_params=True), tiny_spec)


# ---- Llama-2-7B offline: MELoRA's parameter ratio -----------------------------------------------------------

def test_llama7b_counts_behind_melora_papers_ratio(llama7b):
    from melora_tune.adapters import AdapterConfig
    from melora_tune.adapters.accounting import account

    lora = account(llama7b, AdapterConfig(method="lora", r=64, target_modules=["q_proj", "v_proj"], modules_to_save=[]))
    melora = account(llama7b, AdapterConfig(method="melora", n=8, r=1, target_modules=["q_proj", "v_proj"], modules_to_save=[]))
    assert lora["base_params"] == 6_738_415_616
    assert (lora["adapter_params"], melora["adapter_params"]) == (33_554_432, 524_288)  # 64x fewer
    assert ModelSpec.from_pretrained("llama-2-7b", task="causal_lm").total_params() == 6_738_415_616


# ---- search --dry-run ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert_config(num_labels=2).save_pretrained(path)
    return path


def space(model_dir, **resources) -> dict:
    return {
        "name": "t", "model": str(model_dir), "task": {"name": "rotten_tomatoes", "max_train_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        "budget": {"max_params": 768, "min_fraction": 0.5}, "methods": ["melora", "lora"],
        "space": {"lr": {"low": 1e-4, "high": 1e-2}, "n": [2, 4, 8], "r": [1, 2, 4]},
        "training": {"epochs": 2}, "num_samples": 4, "resources": resources,
    }


def dry_run(tmp_path, monkeypatch, capsys, data, *flags) -> tuple[int, str, str]:
    from melora_tune.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(data))
    try:
        code = main(["search", "space.yaml", "--dry-run", *flags])
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def test_dry_run_prints_each_methods_largest_trial_per_gpu(tmp_path, tiny_model_dir, monkeypatch, capsys):
    code, out, err = dry_run(tmp_path, monkeypatch, capsys, space(tiny_model_dir, gpus_per_worker=1, gpu_memory_gb=24), "--json")
    assert code == 0, err
    assert "memory per GPU, each method's largest configuration (fits 24.00 GiB a worker, from resources.gpu_memory_gb)" in out
    assert re.search(r"^  melora n=\d+ r=2: ~1\.\d\d GiB per GPU \(CUDA context 1\.00.*; host ~[\d.]+ GiB per node$", out, re.M)
    assert re.search(r"^  lora r=2: ~1\.\d\d GiB per GPU", out, re.M)
    assert "  assumes bf16, ZeRO-2 over 1 worker(s), micro batch 32 x 128 tokens" in out
    memory = json.loads(out.strip().splitlines()[-1])["memory"]
    assert memory["capacity_bytes"] == 24 * GIB and set(memory["methods"]) == {"melora", "lora"}
    assert memory["methods"]["lora"]["config"] == "lora r=2" and memory["methods"]["lora"]["per_worker_bytes"] > GIB


def test_dry_run_of_cpu_trials_reports_without_refusing(tmp_path, tiny_model_dir, monkeypatch, capsys):
    code, out, err = dry_run(tmp_path, monkeypatch, capsys, space(tiny_model_dir))
    assert code == 0, err
    assert "memory per CPU worker, each method's largest configuration (reported, not refused on CPU; this machine:" in out
    assert "  assumes fp32, ZeRO-2" in out


def test_dry_run_says_when_the_gpus_cannot_be_measured(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU to measure")
    code, out, err = dry_run(tmp_path, monkeypatch, capsys, space(tiny_model_dir, gpus_per_worker=1))
    assert code == 0, err
    assert "(fit not checked: no CUDA GPU on this machine to measure: set resources.gpu_memory_gb to check)" in out


def test_a_trial_too_large_for_its_gpu_is_refused_at_the_dry_run(tmp_path, tiny_model_dir, monkeypatch, capsys):
    code, out, err = dry_run(tmp_path, monkeypatch, capsys, space(tiny_model_dir, gpus_per_worker=1, gpu_memory_gb=1))
    assert code == 2 and out == ""
    line, = err.splitlines()
    assert line.startswith("melora-tune search: error: the largest melora trial (melora n=") and "the GPUs have 1.00 GiB" in line
    assert "most of it CUDA context 1.00): use GPUs with more memory" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]  # no storage, database or experiment


# ---- against what autograd keeps ------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_activation_estimate_covers_what_autograd_keeps_for_a_lora_trial(attention):
    """Every tensor the layers save for backward (a bf16 Llama-shaped model with LoRA on q_proj/v_proj, on CPU),
    counted once per storage, weights excluded: the estimate is above it, and not wildly."""
    import torch
    import transformers

    from melora_tune.adapters import AdapterConfig
    from melora_tune.adapters.inject import inject_adapters
    from melora_tune.trial.memory import activation_bytes, model_facts

    config = transformers.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    config._attn_implementation = attention
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    adapter = AdapterConfig(method="lora", r=8, target_modules=["q_proj", "v_proj"], modules_to_save=[])
    facts = model_facts(ModelSpec(model), adapter, "causal_lm")
    inject_adapters(model, adapter)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.model(input_ids=torch.randint(0, 1000, (2, 64))).last_hidden_state.float().sum().backward()
    est = activation_bytes(facts, tokens=64, micro_batch=2, compute_bytes=2, checkpointing=False)
    kept = sum(saved.values())
    assert kept <= est <= 1.6 * kept, (kept, est)
