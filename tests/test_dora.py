"""DoRA, a method PEFT implements and we only register (melora_tune/adapters/dora.py), through the whole product:
exact counts from the meta device, budget, search --dry-run, the layer against PEFT's own model, the PEFT-native
export, and (slow) a real search on bundled data with its report and export."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from torch import nn

from melora_tune.adapters import AdapterConfig, get_method, make_layer
from melora_tune.adapters.accounting import ModelSpec, account
from melora_tune.adapters.inject import inject_adapters
from melora_tune.cli import main
from helpers import save_tiny_classifier, tiny_bert_config, tiny_llama_config


def requires_grad_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def perturb_trainable(model: nn.Module, seed: int) -> None:
    """Move every trainable tensor off its init (B = 0 would make any two adapters agree)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("which,targets", [("bert", ["query", "value"]), ("llama", ["q_proj", "k_proj", "v_proj", "down_proj"])])
@pytest.mark.parametrize("r", [1, 3])
def test_count_from_meta_equals_requires_grad_and_formula(which, targets, r):
    from transformers import BertForSequenceClassification, LlamaForCausalLM

    config = tiny_bert_config() if which == "bert" else tiny_llama_config()
    task = "seq_cls" if which == "bert" else "causal_lm"
    cfg = AdapterConfig(method="dora", r=r, target_modules=targets)
    spec = ModelSpec.from_config(config, task=task)
    predicted = account(spec, cfg)["adapter_params"]
    model = (BertForSequenceClassification if which == "bert" else LlamaForCausalLM)(config)
    report = inject_adapters(model, cfg)
    assert predicted == report.adapter_params == requires_grad_count(model)
    shapes = spec.targets(targets)
    assert predicted == sum(r * (s.d_in + s.d_out) + s.d_out for s in shapes)  # LoRA(r) + a magnitude per output row
    assert cfg.equivalent_rank == r and get_method("dora").label == "DoRA"


def test_layer_is_peft_dora_exactly(tiny_bert):
    """Our injected model and PEFT's get_peft_model(LoraConfig(use_dora=True)) give the same logits with the same tensors."""
    import copy

    from peft import LoraConfig, get_peft_model

    ours = copy.deepcopy(tiny_bert)
    cfg = AdapterConfig(method="dora", r=2, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"])
    inject_adapters(ours, cfg)
    perturb_trainable(ours, seed=1)
    theirs = get_peft_model(copy.deepcopy(tiny_bert), LoraConfig(r=2, lora_alpha=8, use_dora=True, target_modules=["query", "value"]))
    state = {}
    for name, mod in ours.named_modules():
        if mod.__class__.__name__ == "DoRALinear":
            state[f"base_model.model.{name}.lora_A.default.weight"] = mod.lora_A
            state[f"base_model.model.{name}.lora_B.default.weight"] = mod.lora_B
            state[f"base_model.model.{name}.lora_magnitude_vector.default.weight"] = mod.lora_magnitude
    state["base_model.model.classifier.weight"] = ours.classifier.weight
    state["base_model.model.classifier.bias"] = ours.classifier.bias
    missing = set(state) - set(theirs.state_dict())
    assert not missing, sorted(missing)[:3]
    theirs.load_state_dict({k: v.detach() for k, v in state.items()}, strict=False)
    x = torch.randint(0, 120, (3, 9))
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, atol=1e-6, rtol=1e-5)


def test_merge_and_delta_weight_match_forward():
    torch.manual_seed(0)
    layer = make_layer(nn.Linear(24, 36), AdapterConfig(method="dora", r=3))
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.lora_magnitude.mul_(1.3)
    x = torch.randn(5, 24)
    y = layer(x)
    torch.testing.assert_close(y, x @ (layer.base.weight + layer.delta_weight()).t() + layer.base.bias, atol=1e-5, rtol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)
    layer.unmerge()
    torch.testing.assert_close(layer(x), y, atol=1e-5, rtol=1e-5)


def test_budget_cli_counts_and_lists_dora(capsys):
    assert main(["budget", "--model", "minilm", "--method", "dora", "--r", "2", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["method"] == "dora" and row["r"] == 2 and row["equivalent_rank"] == 2
    assert row["adapter_params"] == 12 * (2 * (384 + 384) + 384)  # 6 layers x query, value of MiniLM
    assert main(["budget", "--model", "minilm", "--method", "dora,melora", "--budget", "25000", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"dora", "melora"}
    assert [r["r"] for r in rows if r["method"] == "dora"] == [1, 2]  # 13,824 and 23,040 params; r=3 is 32,256
    assert main(["budget", "--model", "minilm", "--method", "dora", "--n", "2", "--r", "1"]) == 2
    assert "--n does not apply to method dora" in capsys.readouterr().err


def test_search_dry_run_with_dora_against_melora(tmp_path, capsys):
    import yaml

    space = {
        "name": "dora-dry", "model": "minilm", "task": {"name": "rotten_tomatoes"},
        "budget": {"max_params": 24_000, "min_fraction": 0.5}, "methods": ["dora", "melora"],
        "space": {"lr": {"low": 1e-3, "high": 1e-2}},
        "points_to_evaluate": [{"method": "dora", "r": 1, "lr": 3e-3}],
        "storage_path": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    assert main(["search", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dora" in out and "melora" in out
    space["points_to_evaluate"] = [{"method": "dora", "r": 3, "lr": 3e-3}]  # 32,256 params: over budget
    path.write_text(yaml.safe_dump(space))
    assert main(["search", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dora r=3 is not feasible" in err


def test_peft_native_export_loads_and_reproduces_logits(saved_tiny_bert, tmp_path):
    from peft import PeftConfig, PeftModel
    from transformers import BertForSequenceClassification

    from melora_tune.adapters.export import export_peft_lora

    model = BertForSequenceClassification.from_pretrained(saved_tiny_bert)
    cfg = AdapterConfig(method="dora", r=2, alpha=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    inject_adapters(model, cfg)
    perturb_trainable(model, seed=3)
    model.eval()
    export_peft_lora(model, cfg, tmp_path / "peft", base_model_name_or_path=str(saved_tiny_bert))
    peft_cfg = PeftConfig.from_pretrained(tmp_path / "peft")
    assert peft_cfg.use_dora and peft_cfg.r == 2 and peft_cfg.lora_alpha == 4
    loaded = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(saved_tiny_bert), tmp_path / "peft").eval()
    x = torch.randint(0, 120, (2, 11))
    torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-6, rtol=1e-5)


# ---- slow: a real search of DoRA on bundled data, then its report and PEFT export ------------------------

@pytest.mark.slow
def test_dora_search_report_and_export(tmp_path):
    import ray
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from melora_tune.search import run_search

    model_dir = save_tiny_classifier(tmp_path / "tiny-bert", max_positions=64)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = {
        "name": "dtest", "model": str(model_dir),
        "task": {"name": "rotten_tomatoes", "max_train_samples": 128, "max_eval_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"], "alpha": 16},
        "budget": {"max_params": 600, "min_fraction": 0.0},  # dora r=1: 4 x (64 + 32) = 384; r=2: 640 is over
        "methods": ["dora"], "space": {"lr": {"low": 1e-3, "high": 3e-2}},
        "training": {"epochs": 1, "micro_batch_size": 32, "max_length": 32, "zero_stage": 2},
        "asha": {"enabled": False}, "num_samples": 1, "max_concurrent_trials": 1, "seed": 0,
        "resources": {"num_workers": 1, "cpus_per_worker": 0.9, "driver_cpus": 0.1},
    }
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    cwd, lines = os.getcwd(), []
    try:
        os.chdir(tmp_path)
        t0 = time.time()
        result = run_search(space, tracking_uri=uri, storage_path=str(tmp_path / "runs"), write=lines.append)
        print(f"dora search wall time {time.time() - t0:.0f} s")
    finally:
        os.chdir(cwd)
        ray.shutdown()
    assert result.status == "finished", "\n".join(lines)
    (trial,) = result.trials
    assert trial.method == "dora" and trial.status == "completed" and trial.adapter_params == 384, result.table()

    out = tmp_path / "report"
    assert main(["report", "--dataset", "rotten_tomatoes", "--tracking-uri", uri, "--out", str(out), "--no-log"]) == 0
    md = (out / "report.md").read_text()
    assert "dora" in md and (out / "frontier.png").is_file()

    best = tmp_path / "best"
    assert main(["export", "--dataset", "rotten_tomatoes", "--tracking-uri", uri, "--out", str(best)]) == 0
    assert json.loads((best / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    loaded = PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(model_dir), best / "peft")
    assert sum(p.numel() for n, p in loaded.named_parameters() if "lora_magnitude_vector" in n) == 4 * 32
