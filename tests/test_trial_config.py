"""Fast checks of the trial's pieces that need neither Ray nor DeepSpeed: config, overrides, step plan, DeepSpeed config."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from melora_tune.errors import UsageError
from melora_tune.trial import TrialConfig, apply_overrides, build_ds_config, load_trial_config, parse_overrides, plan_steps
from melora_tune.trial.config import resolve_key
from melora_tune.trial.ds_config import bucket_size, plan_for
from melora_tune.adapters.inject import default_target_modules, find_head_modules

EXAMPLE = "melora_tune/trial/example_trial.yaml"


# ---- config ------------------------------------------------------------------------

def test_defaults_and_dict_round_trip():
    cfg = TrialConfig()
    assert cfg.model == "minilm" and cfg.task_type == "seq_cls" and cfg.task.name == "rotten_tomatoes"
    assert cfg.adapter.target_modules is None and cfg.adapter.modules_to_save is None  # resolved per model
    again = TrialConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert TrialConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg


def test_example_yaml_loads(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = load_trial_config(root / EXAMPLE)
    assert cfg.adapter.method == "melora" and cfg.adapter.n == 4 and cfg.adapter.r == 2
    assert cfg.training.lr == pytest.approx(3e-3)


def test_set_syntax_short_and_dotted():
    cfg = apply_overrides(TrialConfig(), ["method=melora", "n=4", "r=2", "lr=5e-4", "training.epochs=3", "adapter.alpha=32",
                                          "zero_stage=3", "target_modules=query,key,value", "num_workers=2", "precision=bf16",
                                          "eval_every_steps=null", "task.max_train_samples=100", "use_gpu=true"])
    assert (cfg.adapter.method, cfg.adapter.n, cfg.adapter.r, cfg.adapter.alpha) == ("melora", 4, 2, 32.0)
    assert cfg.training.lr == pytest.approx(5e-4) and isinstance(cfg.training.lr, float)
    assert cfg.training.epochs == 3 and cfg.training.zero_stage == 3 and cfg.training.precision == "bf16"
    assert cfg.adapter.target_modules == ["query", "key", "value"]
    assert cfg.resources.num_workers == 2 and cfg.resources.use_gpu is True
    assert cfg.task.max_train_samples == 100 and cfg.training.eval_every_steps is None
    # a dict works too (what a search space hands over), and the input config is not changed
    base = TrialConfig()
    out = apply_overrides(base, {"lr": 1e-3, "adapter.r": 4, "seed": 5})
    assert out.training.lr == 1e-3 and out.adapter.r == 4 and out.training.seed == 5 and out.task.seed == 0
    assert base.training.lr == 5e-4


def test_parse_overrides_values():
    parsed = parse_overrides(["lr=1e-3", "r=2", "dropout=0.1", "offload_optimizer=false", "model=/some/path=x"])
    assert parsed[("training", "lr")] == 1e-3
    assert parsed[("adapter", "r")] == 2 and parsed[("adapter", "dropout")] == 0.1
    assert parsed[("training", "offload_optimizer")] is False
    assert parsed[("model",)] == "/some/path=x"
    assert resolve_key("task.name") == ("task", "name") and resolve_key("name") == ("task", "name")


@pytest.mark.parametrize(
    "items, fragment",
    [
        (["lrr=1"], "did you mean 'lr'"),
        (["adapter.methd=lora"], "did you mean 'adapter.method'"),
        (["r"], "expects key=value"),
        (["=3"], "expects key=value"),
        (["training.lr=-1"], "training.lr"),
        (["r=two"], "adapter.r"),
        (["zero_stage=4"], "training.zero_stage"),
        (["precision=fp16"], "'auto', 'fp32' or 'bf16'"),
        (["method=melra"], "unknown adapter method 'melra' (did you mean 'melora'?)"),
        (["u=5", "r=2"], "u=5 must be <= r=2"),
        (["task_type=seq2seq"], "task_type"),
        (["warmup_ratio=1.5"], "training.warmup_ratio"),
    ],
)
def test_bad_overrides_are_one_line_usage_errors(items, fragment):
    with pytest.raises(UsageError) as err:
        apply_overrides(TrialConfig(), items)
    message = str(err.value)
    assert fragment in message and "\n" not in message


@pytest.mark.parametrize(
    "data, fragment",
    [
        ({"training": {"lrr": 1}}, "unknown key 'training.lrr' (did you mean 'training.lr'?)"),
        ({"adaptr": {"r": 2}}, "unknown key 'adaptr' (did you mean 'adapter'?)"),
        ({"resources": {"num_workers": 0}}, "resources.num_workers"),
        ({"adapter": {"target_modules": []}}, "target_modules is empty"),
        ([1, 2], "expected a mapping"),
    ],
)
def test_bad_config_dicts(data, fragment):
    with pytest.raises(UsageError) as err:
        TrialConfig.from_dict(data)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_yaml_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        TrialConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {lr: [\n")
    with pytest.raises(UsageError, match="not valid YAML"):
        TrialConfig.from_yaml(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("training:\n  epocs: 3\n")
    with pytest.raises(UsageError, match=r"typo.yaml: unknown key 'training.epocs' \(did you mean 'training.epochs'\?\)"):
        TrialConfig.from_yaml(typo)


def test_precision_auto():
    cfg = TrialConfig()
    assert cfg.precision_on(on_gpu=True) == "bf16" and cfg.precision_on(on_gpu=False) == "fp32"
    assert apply_overrides(cfg, ["precision=bf16"]).precision_on(on_gpu=False) == "bf16"


# ---- step plan -----------------------------------------------------------------------

def test_step_plan():
    plan = plan_steps(2000, world_size=2, micro_batch_size=16, grad_accum=1, epochs=2, warmup_ratio=0.06)
    assert plan.samples_per_worker == 1000 and plan.micro_batches_per_epoch == 63
    assert plan.steps_per_epoch == 63 and plan.total_steps == 126 and plan.warmup_steps == 8
    assert plan.global_batch_size == 32
    # grad accumulation: trailing micro-batches that cannot fill a step are skipped
    plan = plan_steps(1001, world_size=2, micro_batch_size=10, grad_accum=4, epochs=3)
    assert plan.samples_per_worker == 501 and plan.micro_batches_per_epoch == 51 and plan.steps_per_epoch == 12
    assert plan.total_steps == 36 and plan.warmup_steps == 1
    with pytest.raises(UsageError, match="fewer than grad_accum"):
        plan_steps(10, world_size=2, micro_batch_size=8, grad_accum=2, epochs=1)


# ---- DeepSpeed config -------------------------------------------------------------------

def _ds(*items, on_gpu=False, train=2000, params=20_000):
    cfg = apply_overrides(TrialConfig(), list(items))
    return build_ds_config(cfg, plan_for(cfg, train), on_gpu=on_gpu, trainable_params=params)


def test_ds_config_cpu_defaults():
    ds = _ds("micro_batch_size=16", "grad_accum=2", "num_workers=2", "lr=1e-3", "weight_decay=0.01", "zero_stage=2", "grad_clip=0.5")
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16 * 2 * 2
    opt = ds["optimizer"]
    assert opt["type"] == "AdamW" and opt["params"]["torch_adam"] is True  # no FusedAdam JIT build
    assert opt["params"]["lr"] == 1e-3 and opt["params"]["weight_decay"] == 0.01 and opt["params"]["betas"] == [0.9, 0.999]
    sched = ds["scheduler"]
    assert sched["type"] == "WarmupDecayLR" and sched["params"]["warmup_type"] == "linear"
    assert sched["params"]["warmup_max_lr"] == 1e-3 and sched["params"]["warmup_min_lr"] == 0.0
    # 2000 samples / 2 workers / 16 = 63 micro-batches -> 31 steps an epoch, 2 epochs
    assert sched["params"]["total_num_steps"] == 62 and sched["params"]["warmup_num_steps"] == 4
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is False
    assert ds["zero_optimization"]["reduce_bucket_size"] == bucket_size(20_000) == 1_000_000
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == 0.5
    assert "offload_optimizer" not in ds["zero_optimization"]
    json.dumps(ds)  # plain JSON, as DeepSpeed wants


def test_ds_config_gpu_bf16_and_stages():
    ds = _ds("zero_stage=3", on_gpu=True)
    assert ds["bf16"]["enabled"] is True and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["overlap_comm"] is True
    assert _ds("zero_stage=0")["zero_optimization"] == {"stage": 0}
    assert _ds("zero_stage=1")["zero_optimization"]["stage"] == 1
    assert _ds("precision=fp32", on_gpu=True)["bf16"]["enabled"] is False
    assert "gradient_clipping" not in _ds("grad_clip=0")


def test_ds_config_offload():
    cpu = _ds("zero_stage=2", "offload_optimizer=true")
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["zero_force_ds_cpu_optimizer"] is False
    gpu = _ds("zero_stage=3", "offload_optimizer=true", on_gpu=True)
    assert "torch_adam" not in gpu["optimizer"]["params"]  # DeepSpeed's CPUAdam: the point of offload on GPU
    assert gpu["zero_optimization"]["offload_optimizer"]["pin_memory"] is True
    with pytest.raises(UsageError, match="offload_optimizer needs ZeRO"):
        _ds("zero_stage=0", "offload_optimizer=true")


# ---- model-dependent defaults (meta device, no weights) -------------------------------------

def test_default_targets_and_heads(tiny_bert, tiny_llama):
    assert default_target_modules(tiny_bert) == ["query", "value"]
    assert find_head_modules(tiny_bert, "seq_cls", 3) == ["classifier"]
    assert default_target_modules(tiny_llama) == ["q_proj", "v_proj"]
    assert find_head_modules(tiny_llama, "causal_lm") == []


def test_head_of_other_architectures():
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    with torch.device("meta"):
        distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=50, dim=32, hidden_dim=64, n_layers=1, n_heads=2))
        llama = LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                           num_attention_heads=2, num_key_value_heads=1, num_labels=3))
    assert find_head_modules(distil, "seq_cls", 2) == ["pre_classifier", "classifier"]
    assert default_target_modules(distil) == ["q_lin", "v_lin"]
    assert find_head_modules(llama, "seq_cls", 3) == ["score"]


# ---- driver-side preparation (real task data, meta-device model) --------------------------------

def test_prepare_trial_resolves_defaults_and_checks_the_adapter():
    from melora_tune.trial import prepare_trial

    cfg = apply_overrides(TrialConfig(), ["max_train_samples=200", "max_eval_samples=50", "n=4", "r=2", "micro_batch_size=16"])
    prepared = prepare_trial(cfg)
    assert prepared.cfg.adapter.target_modules == ["query", "value"]
    assert prepared.cfg.adapter.modules_to_save == ["classifier"]
    assert prepared.num_labels == 2 and prepared.train_samples == 200 and prepared.main_metric == "accuracy"
    assert prepared.accounting["adapter_params"] == 12 * 2 * 768 and prepared.accounting["equivalent_rank"] == 8
    assert prepared.plan.total_steps == 2 * 13
    with pytest.raises(UsageError, match="MELoRA n=5 must divide"):
        prepare_trial(apply_overrides(cfg, ["n=5"]))
    with pytest.raises(UsageError, match="valu"):
        prepare_trial(apply_overrides(cfg, ["target_modules=query,valu"]))


# ---- CLI parsing ------------------------------------------------------------------------------------

def test_train_parser():
    from melora_tune.trial.cli import add_train_parser, train_command

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_train_parser(sub)
    args = parser.parse_args(["train", "c.yaml", "--set", "method=melora", "n=4", "r=2", "lr=5e-4", "--json", "--set", "epochs=1"])
    assert args.overrides == ["method=melora", "n=4", "r=2", "lr=5e-4", "epochs=1"]
    assert args.json and args.func is train_command and args.storage_path == "melora_runs" and args.name is None


def test_train_command_rejects_bad_settings_before_ray_starts(tmp_path):
    from melora_tune.cli import main

    config = tmp_path / "t.yaml"
    config.write_text("adapter:\n  method: melora\n")
    assert main(["train", str(config), "--set", "lrr=1"]) == 2
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2


def test_fractional_gpus_reach_the_trainer_and_the_search(tmp_path):
    """gpus_per_worker: 0.5 packs two trials' workers on one GPU: Ray Train must ask for exactly that share."""
    from melora_tune.search.schema import parse_space
    from melora_tune.trial.driver import build_trainer
    from melora_tune.trial.prepare import prepare_trial

    cfg = apply_overrides(TrialConfig(), {"use_gpu": True, "num_workers": 2, "resources.gpus_per_worker": 0.5})
    scaling = build_trainer(prepare_trial(cfg), tmp_path, "t").scaling_config
    assert scaling.use_gpu and scaling.num_workers == 2
    assert scaling.resources_per_worker == {"CPU": 1.0, "GPU": 0.5}
    assert TrialConfig().resources.gpus_per_worker == 1.0  # a whole GPU per worker unless told otherwise

    space = parse_space({"name": "s", "task": {"name": "rotten_tomatoes"}, "budget": {"max_params": 20000},
                         "resources": {"gpus_per_worker": 0.25}})
    trial = space.base_trial_dict(["query", "value"], ["classifier"])
    assert trial["resources"]["use_gpu"] is True and trial["resources"]["gpus_per_worker"] == 0.25
    with pytest.raises(Exception, match="gpus_per_worker"):
        parse_space({"name": "s", "task": {"name": "rotten_tomatoes"}, "budget": {"max_params": 20000},
                     "resources": {"gpus_per_worker": 2}})


def test_max_failures_reach_train_and_tune(tmp_path):
    """A lost node or a crashed worker restarts the trial from its checkpoint (the node drill
    proves it end to end); here: the configured count reaches Train's FailureConfig and the search."""
    from melora_tune.search.schema import parse_space
    from melora_tune.trial.driver import build_trainer
    from melora_tune.trial.prepare import prepare_trial

    assert build_trainer(prepare_trial(TrialConfig()), tmp_path, "t").run_config.failure_config.max_failures == 2
    cfg = apply_overrides(TrialConfig(), {"resources.max_failures": 0})
    assert build_trainer(prepare_trial(cfg), tmp_path, "t").run_config.failure_config.max_failures == 0

    space = parse_space({"name": "s", "task": {"name": "rotten_tomatoes"}, "budget": {"max_params": 20000},
                         "resources": {"max_failures": 5}})
    assert space.base_trial_dict(["query", "value"], ["classifier"])["resources"]["max_failures"] == 5
    with pytest.raises(Exception, match="max_failures"):
        parse_space({"name": "s", "task": {"name": "rotten_tomatoes"}, "budget": {"max_params": 20000},
                     "resources": {"max_failures": -1}})
