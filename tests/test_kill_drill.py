"""The kill drill, CI-sized: a real search with confirmation (tiny BERT, 2 LoRA trials, 1 epoch, 1 confirmation
seed) whose driver is SIGKILLed at a named moment (``melora_tune.drill``: here in the confirmation), resumed with ``melora-tune search
--resume``, then reported; and one whose trial process is killed after its first checkpoint. After each: every
trial and confirmation is one FINISHED MLflow run, the Optuna study has one ended trial per Tune trial, and the
report's deterministic columns equal the other runs'. The many-point version: ``benchmarks/kill_drill.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from helpers import save_tiny_classifier

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("kill_drill", ROOT / "benchmarks" / "kill_drill.py")
kill_drill = sys.modules.setdefault("kill_drill", importlib.util.module_from_spec(spec))  # dataclasses need it there
spec.loader.exec_module(kill_drill)

SPACE = dict(num_samples=2, methods=("lora",), epochs=1, samples=64,
             points=[{"method": "lora", "r": 2, "lr": 1e-2}, {"method": "lora", "r": 1, "lr": 1e-2}])
POINTS = {p.name: p for p in kill_drill.POINTS}


@pytest.fixture(scope="module")
def drill_model(tmp_path_factory):
    return save_tiny_classifier(tmp_path_factory.mktemp("models") / "tiny-bert", max_positions=64)


@pytest.fixture(scope="module")
def outcomes():
    return {}


# The searcher's "tell" moment runs in test_search_integration.py (with cells and a second trial in flight); the
# other eleven points run in benchmarks/kill_drill.py.
@pytest.mark.parametrize("name", ["confirm_result", "worker"])
def test_killed_at_a_point_resumes_to_the_same_records(drill_model, tmp_path, outcomes, name):
    folder = kill_drill.prepare(tmp_path / name, drill_model, **SPACE)
    res = kill_drill.run_point(POINTS[name], folder, SPACE["num_samples"], None)
    print(kill_drill.line(res))
    assert res["ok"], res["checks"]
    got = kill_drill.deterministic(folder)
    assert len(got["trials"]) == 2 and len(got["confirmations"]) == 1
    assert {t["lr"] for t in got["trials"]} == {0.01}  # both trials are the space's points (r=2, r=1)
    for other in outcomes.values():  # what is deterministic is the same whatever the moment of the kill
        assert got == other
    outcomes[name] = got
