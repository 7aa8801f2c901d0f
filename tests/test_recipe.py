"""The trial recipe's keys: pooling (what the classifier reads), the head's own learning rate, the score metric,
and the test split that only confirmations score. Tiny random models and real bundled data; no Ray."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import save_tiny_classifier, tiny_bert_config

from melora_tune.adapters.pooling import TokenPooler, apply_pooling, checkpoint_pooling, resolve_pooling
from melora_tune.errors import UsageError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("recipe") / "tiny-bert", max_positions=64)


def _batch():
    ids = torch.tensor([[101, 7, 8, 9, 102], [101, 5, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, mask


def test_mean_pooling_is_the_masked_mean_the_head_reads():
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config(2)).eval()
    apply_pooling(model, "mean")
    ids, mask = _batch()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        mean = torch.stack([hidden[0].mean(0), hidden[1, :3].mean(0)])  # padding left out
        assert torch.allclose(logits, model.classifier(mean), atol=1e-6)
        # the pooler's dense + tanh are gone: nothing of the old pooler is trained or saved
        assert not [n for n, _ in model.named_parameters() if "pooler" in n]
        assert isinstance(model.bert.pooler, TokenPooler)


def test_cls_pooling_reads_the_first_state_without_the_tanh():
    import transformers

    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(tiny_bert_config(2)).eval()
    apply_pooling(model, "cls")
    ids, mask = _batch()
    with torch.no_grad():
        hidden = model.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        assert torch.allclose(model(input_ids=ids, attention_mask=mask).logits, model.classifier(hidden[:, 0]), atol=1e-6)


def test_auto_takes_the_checkpoints_own_pooling(tiny_dir, tmp_path):
    import transformers

    from melora_tune.adapters.models import resolve_model

    minilm = resolve_model("minilm")
    assert checkpoint_pooling(minilm) == "mean"  # all-MiniLM-L6-v2 ships sentence-transformers' 1_Pooling
    model = transformers.BertForSequenceClassification(tiny_bert_config(2))
    assert resolve_pooling("auto", minilm, model) == "mean"
    assert resolve_pooling("auto", tiny_dir, model) == "model"  # no 1_Pooling: the model's own head
    assert resolve_pooling("auto", minilm, model, task_type="causal_lm") == "model"
    with pytest.raises(UsageError, match="unknown pooling"):
        resolve_pooling("max", minilm, model)


def test_explicit_pooling_on_a_model_without_a_pooler_is_refused():
    import transformers

    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=64, num_labels=2)
    model = transformers.RobertaForSequenceClassification(config)
    assert resolve_pooling("auto", None, model) == "model"
    with pytest.raises(UsageError, match="set pooling: model"):
        resolve_pooling("mean", None, model)


def test_a_saved_adapter_restores_its_pooling(tmp_path):
    import transformers

    from melora_tune.adapters import AdapterConfig
    from melora_tune.adapters.inject import inject_adapters, load_adapter, save_adapter

    torch.manual_seed(0)
    trained = transformers.BertForSequenceClassification(tiny_bert_config(2)).eval()
    base_state = {k: v.clone() for k, v in trained.state_dict().items()}
    apply_pooling(trained, "mean")
    cfg = AdapterConfig(method="melora", n=2, r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    inject_adapters(trained, cfg)
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_adapter(trained, cfg, tmp_path / "adapter", pooling="mean")
    fresh = transformers.BertForSequenceClassification(tiny_bert_config(2)).eval()
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path / "adapter")
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids, attention_mask=mask).logits, trained(input_ids=ids, attention_mask=mask).logits)


def test_head_lr_is_its_own_optimizer_group():
    from melora_tune.trial.config import TrialConfig
    from melora_tune.trial.ds_config import build_ds_config, learning_rates, plan_for
    from melora_tune.trial.worker import trainable_groups

    cfg = TrialConfig.from_dict({"training": {"lr": 3e-3, "head_lr": 1e-2}})
    plan = plan_for(cfg, 1000)
    ds = build_ds_config(cfg, plan, head_group=True)
    assert ds["scheduler"]["params"]["warmup_max_lr"] == [3e-3, 1e-2] == learning_rates(cfg)
    assert learning_rates(TrialConfig.from_dict({"training": {"lr": 3e-3}})) == [3e-3, 3e-3]  # default: lr

    import transformers

    from melora_tune.adapters import AdapterConfig
    from melora_tune.adapters.inject import inject_adapters

    model = transformers.BertForSequenceClassification(tiny_bert_config(2))
    adapter = AdapterConfig(method="lora", r=2, target_modules=["query", "value"], modules_to_save=["classifier"])
    inject_adapters(model, adapter)
    groups = trainable_groups(model, adapter)
    head = {id(p) for p in model.classifier.parameters()}
    assert len(groups) == 2 and {id(p) for p in groups[1]["params"]} == head
    assert not head & {id(p) for p in groups[0]["params"]}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_the_score_metric_is_selectable_per_task():
    from melora_tune.data import load_task
    from melora_tune.data.spec import TaskSpec

    task = load_task(TaskSpec(name="rotten_tomatoes", metric="matthews_correlation", max_train_samples=50, max_eval_samples=20))
    assert task.main_metric == "matthews_correlation" and "accuracy" in task.metrics
    assert load_task(TaskSpec(name="rotten_tomatoes", max_train_samples=50)).main_metric == "accuracy"
    with pytest.raises(UsageError, match="f1 is binary"):
        load_task(TaskSpec(name="trec", metric="f1", max_train_samples=50))
    with pytest.raises(UsageError, match="classification task: metric .pearson. does not apply"):
        load_task(TaskSpec(name="rotten_tomatoes", metric="pearson", max_train_samples=50))
    with pytest.raises(ValueError, match="did you mean 'accuracy'"):
        TaskSpec(metric="acuracy")


def test_score_test_needs_a_test_split_and_search_spaces_refuse_it():
    from melora_tune.search.schema import parse_space
    from melora_tune.trial.config import TrialConfig
    from melora_tune.trial.prepare import prepare_trial

    cfg = TrialConfig.from_dict({"task": {"name": "rotten_tomatoes", "test_fraction": 0, "max_train_samples": 64,
                                          "max_eval_samples": 32}, "training": {"score_test": True}})
    with pytest.raises(UsageError, match="no test split"):
        prepare_trial(cfg)
    with pytest.raises(UsageError, match="never see the test split"):
        parse_space({"name": "x", "budget": {"max_params": 100}, "training": {"score_test": True}})


def test_only_a_score_test_trial_scores_test(tiny_dir, tmp_path):
    """The final report of a trial with score_test holds test_* next to val_score; without it, none."""
    from melora_tune.trial.config import TrialConfig
    from melora_tune.trial.inprocess import single_process_group
    from melora_tune.trial.prepare import prepare_trial
    from melora_tune.trial.reporting import LocalReporter
    from melora_tune.trial.worker import TrialWorker

    def final(score_test: bool):
        cfg = TrialConfig.from_dict({
            "model": str(tiny_dir), "task": {"name": "rotten_tomatoes", "max_train_samples": 64, "max_eval_samples": 32},
            "adapter": {"method": "lora", "r": 2}, "training": {"epochs": 1, "max_length": 32, "lr": 1e-2,
                                                                "score_test": score_test},
        })
        run = tmp_path / f"run-{score_test}"
        with single_process_group(False):
            worker = TrialWorker(prepare_trial(cfg), "t", reporter=LocalReporter(run, False, 1))
            out = worker.run()
        assert (worker.task.splits.get("test") is not None) == score_test  # a search trial never holds test
        shutil.rmtree(run)
        return out["metrics"]

    with_test, without = final(True), final(False)
    assert {"test_score", "test_accuracy", "test_loss", "val_score"} <= set(with_test)
    assert with_test["val_score"] == with_test["score"]
    assert 0.0 <= with_test["test_score"] <= 1.0
    assert not [k for k in without if k.startswith("test_") or k == "val_score"]
    json.dumps(with_test)  # reportable as is
