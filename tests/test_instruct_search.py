"""The offline instruction search end to end on the real stack: Ray Tune + Optuna + ASHA, DeepSpeed, SQLite MLflow,
the bundled MiniLM as a causal LM on trec_instruct (exact match of greedy answers), the confirmation with its
baselines, the report with its perplexity plot, and the export loaded back with PEFT. No mocks.

The space is search_spaces/instruct_demo.yaml made smaller (fewer rows, one epoch after the first rung, one seed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    import ray

    from melora_tune.search import run_search

    tmp = tmp_path_factory.mktemp("instruct")
    data = yaml.safe_load((ROOT / "search_spaces" / "instruct_demo.yaml").read_text())
    data.update(name="itest_instruct", num_samples=2, n_startup_trials=2, storage_path=str(tmp / "runs"),
                tracking_uri=f"sqlite:///{tmp}/mlflow.db")
    # 96 rows (6 steps an epoch), 32 to score: the trials' time is MiniLM's LM head over 30,522 tokens; the probe
    # baseline still reads TREC's answer off these features (val ~0.7 against a majority of ~0.22)
    data["task"].update(max_train_samples=96, max_eval_samples=32)
    data["training"].update(epochs=2)
    data["confirm"].update(seeds=1)
    data["points_to_evaluate"] = [{"method": "melora", "n": 4, "r": 1, "lr": 4e-3}, {"method": "lora", "r": 1, "lr": 4e-3}]
    if ray.is_initialized():
        ray.shutdown()
    lines: list[str] = []
    result = run_search(data, write=lines.append)
    if ray.is_initialized():
        ray.shutdown()
    return tmp, result, lines


def test_instruction_search_records_exact_match_and_perplexity(searched):
    from mlflow import MlflowClient

    _, result, lines = searched
    assert result.status == "finished" and len(result.trials) == 2
    assert {t.method for t in result.trials} == {"melora", "lora"}
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("trec_instruct")
    runs = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    trials = [r for r in runs if "melora.trial_id" in r.data.tags]
    assert trials
    for run in trials:
        m = run.data.metrics
        assert m["score"] == m["eval_exact_match"] and 0.0 <= m["score"] <= 1.0
        assert m["eval_perplexity"] == pytest.approx(2.718281828 ** m["eval_loss"], rel=1e-6)
        assert m["head_params"] > 0 and m["adapter_params"] == 9_216  # the LM-head transform is trained, not budgeted
    # the baselines the confirmation logged on the parent run, in the same metric
    parent = client.get_run(result.parent_run_id).data
    assert parent.params["score_metric"] == "exact_match"
    majority, probe = parent.metrics["baseline.majority.val"], parent.metrics["baseline.probe.val"]
    assert 0.15 < majority < 0.35 < probe  # TREC's largest answer class is under a third of the rows
    assert any("baselines on the same splits" in ln for ln in lines)


def test_instruction_report_has_the_confirmed_table_and_perplexity_curves(searched):
    from melora_tune.cli import main

    tmp, result, _ = searched
    out = tmp / "reports"
    assert main(["report", "--dataset", "trec_instruct", "--tracking-uri", result.tracking_uri, "--out", str(out)]) == 0
    report = (out / "report.md").read_text()  # one dataset: --out is its folder
    assert "**score metric**: exact_match" in report and "## Confirmed results (held-out test)" in report
    assert "linear probe" in report and "Response perplexity" in report
    assert (out / "perplexity.png").stat().st_size > 10_000


def test_instruction_export_loads_with_peft_and_gives_our_logits(searched):
    import torch
    import transformers
    from peft import PeftModel

    from melora_tune.adapters.inject import load_adapter
    from melora_tune.adapters.models import resolve_model
    from melora_tune.cli import main

    tmp, result, _ = searched
    out = tmp / "best"
    assert main(["export", "--dataset", "trec_instruct", "--tracking-uri", result.tracking_uri, "--out", str(out)]) == 0
    peft_cfg = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert peft_cfg["task_type"] == "CAUSAL_LM" and peft_cfg["modules_to_save"] == ["cls.predictions.transform"]
    assert "is_decoder=True" in (out / "README.md").read_text()  # what a user must pass to load MiniLM causal

    path = resolve_model("minilm")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["What kind of answer does this question want?\nQuestion: Who wrote Hamlet?\nAnswer:"], return_tensors="pt")

    def base():
        torch.manual_seed(0)  # the untrained LM-head bias is the only weight neither adapter file holds
        return transformers.AutoModelForCausalLM.from_pretrained(path, is_decoder=True).eval()

    ours = base()
    load_adapter(ours, out / "adapter")
    theirs = PeftModel.from_pretrained(base(), out / "peft").eval()
    with torch.no_grad():
        expected, got = ours(**batch).logits, theirs(**batch).logits
    assert (expected - got).abs().max() < 1e-4
