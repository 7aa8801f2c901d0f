"""Search spaces without Ray: YAML validation through the CLI, the feasible-only Optuna space, the tell policy.

Everything here is fast (no training, no Ray cluster); Optuna and MLflow are real.
"""

from __future__ import annotations

import copy
import glob
import math
from pathlib import Path

import optuna
import pytest
import yaml

from helpers import tiny_bert_config, tiny_llama_config

ROOT = Path(__file__).resolve().parents[1]
SPACES = ROOT / "search_spaces"


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A config-only tiny BERT folder (the budget needs config.json, not weights)."""
    path = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert_config(num_labels=2).save_pretrained(path)
    return path


def base_space(model_dir) -> dict:
    # tiny BERT: hidden 48, 2 layers; query+value = 4 layers of 48x48: r x 96 x 4 = 384 params per unit of r
    return {
        "name": "t",
        "model": str(model_dir),
        "task": {"name": "rotten_tomatoes", "max_train_samples": 64},
        "adapter": {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
        "budget": {"max_params": 768, "min_fraction": 0.5},
        "methods": ["melora", "lora"],
        "space": {"lr": {"low": 1e-4, "high": 1e-2}, "n": [2, 4, 8], "r": [1, 2, 4]},
        "training": {"epochs": 2},
        "num_samples": 4,
    }


def write(tmp_path, data, name="space.yaml") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


def cli(args, capsys) -> tuple[int, str, str]:
    from melora_tune.cli import main

    try:
        code = main(args)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def mutate(data: dict, path: str, value) -> dict:
    data = copy.deepcopy(data)
    node = data
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    if value is DELETE:
        node.pop(parts[-1], None)
    else:
        node[parts[-1]] = value
    return data


DELETE = object()


# ---- validation: one line, exit 2, before Ray starts ---------------------------------------

BAD = [
    # unknown keys, with the closest known one suggested
    ("budgte", {"max_params": 768}, "unknown key 'budgte' (did you mean 'budget'?)"),
    ("space.nn", [2], "unknown key 'space.nn' (did you mean 'space.n'?)"),
    ("epochs", 3, "unknown key 'epochs' (did you mean 'training.epochs'?)"),
    ("asha.grace", 1, "unknown key 'asha.grace' (did you mean 'asha.grace_period'?)"),
    ("resources.gpus", 1, "(did you mean 'resources.gpus_per_worker'?)"),
    # wrong types
    ("num_samples", "many", "num_samples: Input should be a valid integer"),
    ("space.r", "two", "space.r: choices must be integers, got 'two'"),
    ("asha.enabled", "maybe", "asha.enabled: Input should be a valid boolean"),
    ("training.max_length", [64], "training.max_length: Input should be a valid integer"),
    # bad ranges
    ("space.lr", {"low": 1e-2, "high": 1e-3}, "space.lr: low=0.01 is greater than high=0.001"),
    ("space.lr", {"low": 0.0, "high": 1e-3}, "space.lr: a log-scale range needs low > 0"),
    ("space.n", [0, 2], "space.n: choices must be >= 1, got 0"),
    ("space.r", [], "space.r: the list of choices is empty"),
    ("budget.max_params", 0, "budget.max_params: Input should be greater than or equal to 1"),
    ("budget.min_fraction", 1.5, "budget.min_fraction: Input should be less than or equal to 1"),
    ("asha.reduction_factor", 1, "asha.reduction_factor: Input should be greater than 1"),
    ("asha.grace_period", 5, "asha.grace_period=5 exceeds training.epochs=2"),
    ("max_concurrent_trials", 0, "max_concurrent_trials: Input should be greater than or equal to 1"),
    ("training.lr", 1e-3, "training.lr is searched: give its range as space.lr"),
    ("space.dropout", [0.0, 1.0], "dropout choices must be in [0, 1)"),
    # methods
    ("methods", ["melra", "lora"], "unknown method 'melra' (did you mean 'melora'?)"),
    ("methods", ["dorra"], "unknown method 'dorra'"),
    ("space.u", [0, 1], "space.u applies to prolora only"),
    # required
    ("budget", DELETE, "budget is required"),
    ("name", "has space", "name must be letters, digits"),
    # points to evaluate
    ("points_to_evaluate", [{"method": "lora", "rank": 2, "lr": 1e-3}], "unknown key 'rank' (did you mean 'r'?)"),
]


# ids without DELETE's repr (an address): pytest-xdist needs the same ids in every test process
@pytest.mark.parametrize("key,value,needle", BAD,
                         ids=[f"{b[0]}={'<deleted>' if b[1] is DELETE else repr(b[1])}"[:40] for b in BAD])
def test_bad_space_is_one_line_and_exit_2(key, value, needle, tmp_path, tiny_model_dir, capsys):
    import ray

    path = write(tmp_path, mutate(base_space(tiny_model_dir), key, value))
    code, out, err = cli(["search", path, "--dry-run"], capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("melora-tune search: error: "), err
    assert needle in err, err
    assert not ray.is_initialized()


@pytest.mark.parametrize("budget,min_fraction,needle", [
    # the smallest MELoRA/LoRA configuration is r=1: 384 params
    (100, 0.0, "budget.max_params=100 fits no melora configuration (lora, melora all need more): the smallest (melora n=2 r=1) needs 384 params; the smallest budget that fits every method is 384"),
    (700, 0.9, "no melora configuration uses between 630 and 700 params (budget.min_fraction=0.9); the largest within budget uses 384: lower budget.min_fraction to <= 0.548"),
])
def test_infeasible_budget_names_what_would_fit(budget, min_fraction, needle, tmp_path, tiny_model_dir, capsys):
    data = mutate(base_space(tiny_model_dir), "budget", {"max_params": budget, "min_fraction": min_fraction})
    code, _, err = cli(["search", write(tmp_path, data), "--dry-run"], capsys)
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_budget_only_one_method_misses_names_the_budget_for_all(tmp_path, tiny_model_dir, capsys):
    # PRoLoRA with u=r=1 and no sharing costs as much as LoRA r=1; with m=2 it is cheaper than anything else
    data = base_space(tiny_model_dir)
    data.update(methods=["lora", "prolora"], budget={"max_params": 300})
    data["space"] = {"r": [1, 2], "u": [0], "m": [2]}
    code, _, err = cli(["search", write(tmp_path, data), "--dry-run"], capsys)
    assert code == 2 and "fits no lora configuration" in err and "fits every method is 384" in err, err


def test_not_yaml_and_missing_file(tmp_path, capsys):
    code, _, err = cli(["search", write(tmp_path, "name: [unclosed"), "--dry-run"], capsys)
    assert code == 2 and "is not valid YAML" in err and err.count("\n") == 1
    code, _, err = cli(["search", str(tmp_path / "nope.yaml"), "--dry-run"], capsys)
    assert code == 2 and "does not exist" in err


def test_unknown_target_module_and_infeasible_point(tmp_path, tiny_model_dir, capsys):
    data = mutate(base_space(tiny_model_dir), "adapter.target_modules", ["q_proj"])
    code, _, err = cli(["search", write(tmp_path, data), "--dry-run"], capsys)
    assert code == 2 and "q_proj" in err and err.count("\n") == 1, err
    data = mutate(base_space(tiny_model_dir), "points_to_evaluate", [{"method": "lora", "r": 4, "lr": 1e-3}])
    code, _, err = cli(["search", write(tmp_path, data), "--dry-run"], capsys)
    assert code == 2 and "points_to_evaluate[0]: lora r=4 is not feasible under the budget (feasible r: 1, 2)" in err, err


def test_dry_run_prints_feasible_space_per_method(tmp_path, tiny_model_dir, capsys):
    code, out, err = cli(["search", write(tmp_path, base_space(tiny_model_dir)), "--dry-run"], capsys)
    assert code == 0, err
    # budget 768, floor 384: r in {1, 2}; MELoRA n in {2, 4, 8} (r per mini <= 48/n always holds here)
    assert "budget 768 adapter params (min fraction 0.5): 8 feasible configurations" in out
    assert "melora      6 feasible configs (n in {2, 4, 8}, r in {1, 2})" in out
    assert "lora        2 feasible configs (r in {1, 2})" in out


def test_shipped_offline_spaces_dry_run(capsys):
    for name in ("demo.yaml", "trec.yaml"):
        code, out, err = cli(["search", str(SPACES / name), "--dry-run"], capsys)
        assert code == 0, err
        assert "feasible configs" in out and "melora" in out and "lora" in out
    code, out, _ = cli(["search", str(SPACES / "demo.yaml"), "--dry-run"], capsys)
    assert "12 layers (query, value)" in out and "4 feasible configurations" in out  # all 18,432 params
    assert "melora@18432       3 trials over    3 configs" in out and "lora@18432         3 trials over     1 config" in out


@pytest.mark.parametrize("path", sorted(glob.glob(str(SPACES / "glue_*_roberta_base.yaml"))), ids=lambda p: Path(p).stem)
def test_glue_spaces_validate_offline(path):
    """The GPU spaces validate with roberta-base's shapes built locally (no network); same dims as the Hub config."""
    from transformers import RobertaConfig

    from melora_tune.adapters.accounting import ModelSpec
    from melora_tune.search.experiment import dry_run

    spec = ModelSpec.from_config(RobertaConfig(max_position_embeddings=514, type_vocab_size=1), task="seq_cls", name="roberta-base")
    prep = dry_run(path, spec=spec)
    space, feasible = prep.space, prep.feasible
    assert space.model == "roberta-base" and space.adapter.alpha == 16 and space.adapter.dropout == 0.05
    assert feasible.target_modules == ["query", "value"] and space.resources.gpus_per_worker == 1
    # a frontier: 2 methods x 4 levels (1, 2, 4, 8 units of 36,864), LoRA r = the level's units, 6 trials each
    assert sorted(feasible.cells) == sorted((m, 36864 * u) for m in ("melora", "lora") for u in (1, 2, 4, 8))
    assert [c.r for c in feasible.candidates["lora"]] == [1, 2, 4, 8] and not feasible.infeasible
    assert {c.n for c in feasible.candidates["melora"]} == {2, 4, 8, 16} and space.num_samples == 48
    for (method, level), cell in feasible.cells.items():
        assert all(level // 2 < c.adapter_params <= level for c in cell.candidates[method])
    assert set(prep.shares.values()) == {6}


def test_glue_space_dry_run_through_the_hub_cache(tmp_path):
    """The GLUE spaces name ``roberta-base`` by Hub id. With its config.json in a Hugging Face cache (as a
    machine that downloaded it once has), the CLI dry run resolves it through the real Hub code, offline."""
    import os
    import subprocess
    import sys

    snapshot = tmp_path / "hub" / "models--roberta-base" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text((ROOT / "tests" / "fixtures" / "hub" / "roberta-base.config.json").read_text())
    (tmp_path / "hub" / "models--roberta-base" / "refs").mkdir()
    (tmp_path / "hub" / "models--roberta-base" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    proc = subprocess.run([sys.executable, "-m", "melora_tune.cli", "search", str(SPACES / "glue_sst2_roberta_base.yaml"),
                           "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "roberta-base" in proc.stdout and "24 layers" in proc.stdout, proc.stdout
    # and without the cache: one line naming the model, exit 2, no traceback
    env["HF_HOME"] = str(tmp_path / "empty")
    proc = subprocess.run([sys.executable, "-m", "melora_tune.cli", "search", str(SPACES / "glue_sst2_roberta_base.yaml"),
                           "--dry-run"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "roberta-base" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


# ---- the space: feasible only, and complete -----------------------------------------------

def feasible_space(spec_config, targets, task_type, budget, min_fraction, methods, **choices):
    from melora_tune.adapters.accounting import ModelSpec
    from melora_tune.search.schema import parse_space
    from melora_tune.search.space import build_space

    space = parse_space({
        "name": "t", "model": "unused", "task_type": task_type,
        "task": {"name": "rotten_tomatoes"},
        "adapter": {"target_modules": targets, "modules_to_save": []},
        "budget": {"max_params": budget, "min_fraction": min_fraction},
        "methods": methods, "space": {"lr": {"low": 1e-4, "high": 1e-2}, **choices},
    })
    spec = ModelSpec.from_config(spec_config, task=task_type)
    return space, spec, build_space(space, spec=spec)


CASES = {
    # BERT 48x48 (query, value), all three methods, PRoLoRA with B's sharing rate searched apart from A's
    "bert-all": (tiny_bert_config(2), ["query", "value"], "seq_cls", 1200, 0.25, ["melora", "lora", "prolora"],
                 {"n": [1, 2, 3, 4, 6, 8], "r": [1, 2, 3, 4, 8], "u": [0, 1, 2], "m": [1, 2, 4], "m_b": [1, 2, 3]}),
    # GQA Llama: v_proj is 64 -> 32 (not square); default choices (every divisor, every rank)
    "llama-gqa": (tiny_llama_config(), ["q_proj", "v_proj"], "causal_lm", 2000, 0.0, ["melora", "lora", "prolora"], {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reachable_configs_equal_enumerate_feasible(case):
    from melora_tune.adapters import AdapterConfig
    from melora_tune.adapters.budget import enumerate_feasible
    from melora_tune.search.space import candidate_key

    cfg, targets, task_type, budget, frac, methods, choices = CASES[case]
    space, spec, fs = feasible_space(cfg, targets, task_type, budget, frac, methods, **choices)
    shapes = spec.targets(targets)
    expected = set()
    for method in methods:
        kw = {"r": choices.get("r")}
        if method == "melora":
            kw["n"] = choices.get("n")
        if method == "prolora":
            kw.update(u=choices.get("u"), m=choices.get("m"), m_b=choices.get("m_b"))
        found = enumerate_feasible(shapes, method, budget, min_fraction=frac, base=AdapterConfig(method=method, target_modules=targets), **kw)
        assert found, method
        expected |= {candidate_key(c) for c in found}
    assert fs.reachable() == expected
    assert sum(fs.size(m) for m in methods) == len(expected)
    # a parameter name always offers the same choices, which depend only on the parents in its name
    dists = fs.distributions()
    assert all(isinstance(v, list) and v for v in dists.values())
    if case == "bert-all":
        assert any(name.startswith("prolora.m_b|r=") for name in dists)
        assert all("|" not in n for n in ("method", "melora.n", "lora.r", "prolora.r") if n in dists)


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_trials_are_always_feasible_and_cover_the_space(case):
    from melora_tune.adapters import AdapterConfig
    from melora_tune.adapters.accounting import adapter_params
    from melora_tune.search.samplers import make_sampler

    cfg, targets, task_type, budget, frac, methods, choices = CASES[case]
    _, spec, fs = feasible_space(cfg, targets, task_type, budget, frac, methods, **choices)
    shapes = spec.targets(targets)
    floor = math.ceil(frac * budget)
    seen = set()
    studies = [
        optuna.create_study(direction="maximize", sampler=make_sampler(seed=0, n_startup_trials=10)),
        optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1)),
    ]
    n_trials = {0: 150, 1: 400}
    for i, study in enumerate(studies):
        for _ in range(n_trials[i]):
            trial = study.ask()
            hp = fs(trial)
            # recount independently of the enumeration
            ac = AdapterConfig(method=hp["method"], n=hp["n"], r=hp["r"], u=hp["u"], m=hp["m"], m_b=hp["m_b"], target_modules=targets)
            params = adapter_params(shapes, ac)
            assert floor <= params <= budget, hp
            assert params == hp["adapter_params"] == trial.user_attrs["adapter_params"]
            assert hp["equivalent_rank"] == ac.equivalent_rank
            assert 1e-4 <= hp["lr"] <= 1e-2
            seen.add((hp["method"], hp["n"], hp["r"], hp["u"], hp["m"], hp["m_b"]))
            # a score that prefers large equivalent ranks: TPE exploits it, still within budget
            study.tell(trial, hp["equivalent_rank"] + hp["lr"])
        frozen = study.trials
        assert all(t.constraints == {"budget": t.constraints["budget"]} and t.constraints["budget"] <= 0 for t in frozen)
    assert seen <= fs.reachable() and len({k[0] for k in seen}) == len(methods)
    # every feasible configuration is reachable through Optuna itself: fixing the conditional parameters
    # of its path (enqueue_trial) makes the define-by-run function return exactly that configuration
    study = optuna.create_study(direction="maximize")
    reachable = sorted(fs.reachable())
    for method, n, r, u, m, m_b in reachable:
        study.enqueue_trial(fs.point_params({"method": method, "n": n, "r": r, "u": u, "m": m, "m_b": m_b, "lr": 1e-3}))
    got = []
    for _ in reachable:
        hp = fs(study.ask())
        got.append((hp["method"], hp["n"], hp["r"], hp["u"], hp["m"], hp["m_b"]))
    assert got == reachable


def test_point_to_evaluate_becomes_conditional_names(tiny_model_dir):
    from melora_tune.search.schema import parse_space
    from melora_tune.search.space import build_space

    data = base_space(tiny_model_dir)
    data["points_to_evaluate"] = [{"method": "melora", "n": 4, "r": 2, "lr": 3e-3}, {"method": "lora", "r": 1, "lr": 1e-3}]
    fs = build_space(parse_space(data))
    assert fs.points == [{"method": "melora", "melora.n": 4, "melora.r|n=4": 2, "lr": 3e-3}, {"method": "lora", "lora.r": 1, "lr": 1e-3}]
    study = optuna.create_study(direction="maximize")
    for p in fs.points:
        study.enqueue_trial(p)
    hps = [fs(study.ask()) for _ in fs.points]
    assert [(h["method"], h["n"], h["r"], h["lr"]) for h in hps] == [("melora", 4, 2, 3e-3), ("lora", 1, 1, 1e-3)]


# ---- the tell policy (real Optuna, Ray's searcher API without a cluster) ------------------

def make_searcher(tmp_path, fs, **kw):
    from melora_tune.search.searcher import BudgetOptunaSearch

    return BudgetOptunaSearch(fs, storage=f"sqlite:///{tmp_path}/optuna.db", study_name="s", seed=0, n_startup_trials=2,
                              max_t=2, **kw)


def test_tell_policy_complete_pruned_diverged_failed(tmp_path, tiny_model_dir):
    from optuna.trial import TrialState

    from melora_tune.search.schema import parse_space
    from melora_tune.search.space import build_space

    fs = build_space(parse_space(base_space(tiny_model_dir)))
    s = make_searcher(tmp_path, fs)
    configs = {tid: s.suggest(tid) for tid in ("a", "b", "c", "d")}
    assert all(c["adapter_params"] <= 768 for c in configs.values())
    # a: full fidelity; b: ASHA stops it after epoch 1; c: diverges in epoch 2; d: crashes
    s.on_trial_result("a", {"score": 0.6, "step": 10, "epoch": 1.0, "status": "running"})
    s.on_trial_result("a", {"score": 0.7, "step": 20, "epoch": 2.0, "status": "completed"})
    s.on_trial_complete("a", {"score": 0.7, "step": 20, "epoch": 2.0, "status": "completed"})
    s.on_trial_result("b", {"score": 0.9, "step": 10, "epoch": 1.0, "status": "running"})
    s.on_trial_complete("b", {"score": 0.9, "step": 10, "epoch": 1.0, "status": "running"})
    s.on_trial_result("c", {"score": 0.5, "step": 10, "epoch": 1.0, "status": "running"})
    s.on_trial_result("c", {"score": -math.inf, "step": 13, "epoch": 1.3, "status": "diverged", "reason": "non-finite loss"})
    s.on_trial_complete("c", {"score": -math.inf, "step": 13, "epoch": 1.3, "status": "diverged", "reason": "non-finite loss"})
    s.on_trial_complete("d", None, error=True)
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    by_attr = {t.number: t for t in study.trials}
    a, b, c, d = (by_attr[configs[k]["optuna_trial"]] for k in "abcd")
    assert a.state == TrialState.COMPLETE and a.value == 0.7 and a.intermediate_values == {10: 0.6, 20: 0.7}
    # a partial-fidelity 0.9 must not count as the best result: it is PRUNED with its intermediate value
    # (Optuna keeps a pruned trial's last intermediate value as its value; TPE still ranks it as PRUNED)
    assert b.state == TrialState.PRUNED and b.intermediate_values == {10: 0.9}
    assert study.best_trial.number == a.number
    assert c.state == TrialState.PRUNED and c.constraints["diverged"] == 1.0 and c.user_attrs["melora.status"] == "diverged"
    assert d.state == TrialState.FAIL and d.user_attrs["melora.status"] == "failed"
    assert [t.user_attrs["melora.status"] for t in (a, b)] == ["completed", "stopped_early"]
    assert all(t.constraints["budget"] <= 0 for t in (a, b, c, d))
    # TPE's split: complete first, then pruned (deeper/better first), the diverged one (infeasible) last
    from optuna.samplers._tpe.sampler import _split_trials

    below, above = _split_trials(study, study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED)), 2)
    assert [t.number for t in below] == sorted([a.number, b.number]) and [t.number for t in above] == [c.number]
    # a second completion is ignored (Tune may call it again after a restore)
    s.on_trial_complete("a", {"score": 0.1, "status": "completed"})
    assert optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db").trials[a.number].value == 0.7


def test_orphans_from_a_killed_driver_are_reused_not_duplicated(tmp_path, tiny_model_dir):
    """Ray snapshots the searcher; trials asked (or even told) after the last snapshot are handed out again."""
    from optuna.trial import TrialState

    from melora_tune.search.schema import parse_space
    from melora_tune.search.space import build_space

    fs = build_space(parse_space(base_space(tiny_model_dir)))
    s = make_searcher(tmp_path, fs)
    first = s.suggest("t1")
    s.save(str(tmp_path / "searcher.pkl"))  # Ray's snapshot
    second = s.suggest("t2")  # asked after the snapshot ...
    third = s.suggest("t3")
    s.on_trial_complete("t3", {"score": 0.5, "status": "completed", "epoch": 2.0})  # ... and told, then the driver dies
    restored = make_searcher(tmp_path, fs)
    restored.restore(str(tmp_path / "searcher.pkl"))
    again = [restored.suggest("u2"), restored.suggest("u3"), restored.suggest("u4")]
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [c["optuna_trial"] for c in again[:2]] == [second["optuna_trial"], third["optuna_trial"]]
    assert {k: again[0][k] for k in ("method", "n", "r", "lr")} == {k: second[k] for k in ("method", "n", "r", "lr")}
    assert again[2]["optuna_trial"] == 3 and len(study.trials) == 4  # one Optuna trial per Ray trial
    restored.on_trial_complete("u3", {"score": 0.9, "status": "completed", "epoch": 2.0})  # already told: not again
    restored.on_trial_complete("t1", {"score": 0.4, "status": "completed", "epoch": 2.0})
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path}/optuna.db")
    assert study.trials[third["optuna_trial"]].value == 0.5
    assert study.trials[first["optuna_trial"]].state == TrialState.COMPLETE and len(study.trials) == 4


def test_finite_asha_ignores_diverged_scores():
    from types import SimpleNamespace

    from melora_tune.search.schedulers import make_scheduler
    from melora_tune.search.schema import parse_space

    space = parse_space({"name": "t", "budget": {"max_params": 10}, "training": {"epochs": 4},
                         "asha": {"grace_period": 1, "reduction_factor": 2}})
    asha = make_scheduler(space)
    asha.set_search_properties("score", "max")
    trials = [SimpleNamespace(trial_id=str(i)) for i in range(3)]
    for t in trials:
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, trials[0], {"epoch": 1.0, "score": -math.inf}) == "CONTINUE"
    assert asha.on_trial_result(None, trials[1], {"epoch": 1.0, "score": 0.8}) == "CONTINUE"
    assert asha.on_trial_result(None, trials[2], {"epoch": 1.0, "score": 0.5}) == "STOP"  # not poisoned by -inf


def test_one_worker_trials_hold_the_workers_resources_in_tune():
    """A one-worker trial trains in its Tune trial process, so that process must hold the worker's CPUs and
    GPU share (two 0.5-GPU trials pack on one GPU); with more workers it only holds a driver's share."""
    from melora_tune.search.resources import trial_resources
    from melora_tune.search.schema import parse_space

    def resources(**res):
        return trial_resources(parse_space({"name": "t", "budget": {"max_params": 10}, "resources": res}))

    assert resources(cpus_per_worker=2) == {"CPU": 2}
    assert resources(cpus_per_worker=1, gpus_per_worker=0.5) == {"CPU": 1, "GPU": 0.5}
    assert resources(num_workers=2, cpus_per_worker=2, driver_cpus=0.25, gpus_per_worker=1) == {"CPU": 0.25}


# ---- samplers to compare against: tpe | random | grid, tell_policy fidelity | stock ---------

SAMPLER_BAD = [
    ({"sampler": "grd"}, "sampler: unknown sampler 'grd' (did you mean 'grid'?): choose from tpe, random, grid"),
    ({"tell_policy": "ray"}, "tell_policy: Input should be 'fidelity' or 'stock'"),
    ({"sampler": "grid"}, "sampler grid needs a list of learning rates: space.lr_choices"),
    ({"space.lr_choices": [1e-3]}, "give space.lr (a range) or space.lr_choices (a list), not both"),
    ({"space.lr": DELETE, "space.lr_choices": [0.0, 1e-3]}, "space.lr_choices: learning rates must be > 0, got 0"),
    ({"space.lr": DELETE, "space.lr_choices": [1e-3], "space.seeds": [0, 1]}, "space.seeds repeats every grid point per seed: use sampler: grid"),
    ({"space.lr": DELETE, "space.lr_choices": [1e-3], "sampler": "grid", "space.seeds": [-1]}, "space.seeds: seeds must be integers >= 0"),
    ({"record_test": True}, "record_test scores the test split at every evaluation, which only a full grid without early stopping may do"),
    ({"space.lr": DELETE, "space.lr_choices": [1e-3], "sampler": "grid", "record_test": True},
     "record_test scores the test split at every evaluation"),  # ASHA still on
    ({"space.lr": DELETE, "space.lr_choices": [1e-3], "sampler": "grid", "num_samples": 20},
     "cell melora@768 gets 10 trials but its grid has 6 points (sampler grid runs each once)"),
    ({"training.test_every_eval": True}, "a search's trials never see the test split"),
]


@pytest.mark.parametrize("changes,needle", SAMPLER_BAD, ids=[",".join(f"{k}={v!r}" for k, v in c[0].items() if v is not DELETE)[:50] for c in SAMPLER_BAD])
def test_bad_sampler_keys_are_one_line_and_exit_2(changes, needle, tmp_path, tiny_model_dir, capsys):
    data = base_space(tiny_model_dir)
    for key, value in changes.items():
        data = mutate(data, key, value)
    code, out, err = cli(["search", write(tmp_path, data), "--dry-run"], capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and needle in err, err


def grid_space(tiny_model_dir, **extra):
    from melora_tune.search.schema import parse_space
    from melora_tune.search.space import build_space

    data = base_space(tiny_model_dir)
    data.pop("num_samples")
    data["space"].pop("lr")
    data["space"].update(lr_choices=[1e-3, 1e-2], **extra.pop("space", {}))
    data.update(sampler="grid", **extra)
    space = parse_space(data)
    return space, build_space(space)


def test_grid_covers_the_feasible_space_exactly_once_with_concurrent_trials(tmp_path, tiny_model_dir, capsys):
    from melora_tune.search.experiment import dry_run
    from melora_tune.search.searcher import BudgetOptunaSearch

    space, fs = grid_space(tiny_model_dir, space={"seeds": [0, 3]})
    assert fs.grid_size() == len(fs.reachable()) * 2 * 2 == 32
    assert dry_run(space).space.num_samples == 32  # num_samples defaults to the grid's size
    s = BudgetOptunaSearch(fs, storage=f"sqlite:///{tmp_path}/optuna.db", study_name="g", seed=0, max_t=2, sampler="grid")
    seen, running = [], []
    for i in range(32):  # Ray asks while earlier trials still run: running trials count as taken
        tid = f"t{i}"
        hp = s.suggest(tid)
        seen.append(((hp["method"], hp["n"], hp["r"], hp["u"], hp["m"], hp["m_b"]), hp["lr"], hp["seed"]))
        running.append(tid)
        if len(running) == 3:
            done = running.pop(0)
            s.on_trial_complete(done, {"score": 0.5, "step": 2, "epoch": 2.0, "status": "completed"})
    expected = {(key, lr, seed) for key in fs.reachable() for lr in (1e-3, 1e-2) for seed in (0, 3)}
    assert len(seen) == len(set(seen)) == 32 and set(seen) == expected
    # the sampled seed is the trial's training seed, and logged as such
    from melora_tune.search.tracking import trial_params
    from melora_tune.trial.config import TrialConfig

    base = space.base_trial_dict(fs.target_modules, fs.modules_to_save)
    # the grid is covered: a further proposal would re-run a configuration, so the search is finished
    assert s.suggest("extra") == s.FINISHED
    sampled = hp
    cfg = TrialConfig.from_sampled(base, {**sampled, "seed": 3})
    assert cfg.training.seed == 3 and trial_params({**sampled, "seed": 3, "trial": base}, 768, 0.5)["training.seed"] == 3


def test_record_test_scores_test_at_every_evaluation_of_a_grid(tiny_model_dir):
    space, fs = grid_space(tiny_model_dir, record_test=True, asha={"enabled": False})
    training = space.base_trial_dict(fs.target_modules, fs.modules_to_save)["training"]
    assert training["score_test"] is True and training["test_every_eval"] is True
    plain, fs2 = grid_space(tiny_model_dir)
    training = plain.base_trial_dict(fs2.target_modules, fs2.modules_to_save)["training"]
    assert training["score_test"] is False and training["test_every_eval"] is False


def test_random_and_tpe_with_lr_choices_stay_feasible_and_on_the_list(tiny_model_dir):
    from melora_tune.search.samplers import make_sampler
    from melora_tune.search.schema import parse_space
    from melora_tune.search.space import build_space

    data = base_space(tiny_model_dir)
    data["space"].pop("lr")
    data["space"]["lr_choices"] = [5e-4, 2e-3, 8e-3]
    fs = build_space(parse_space(data))
    for kind in ("random", "tpe"):
        study = optuna.create_study(direction="maximize", sampler=make_sampler(seed=0, n_startup_trials=4, kind=kind))
        keys = set()
        for _ in range(60):
            trial = study.ask()
            hp = fs(trial)
            key = (hp["method"], hp["n"], hp["r"], hp["u"], hp["m"], hp["m_b"])
            assert key in fs.reachable() and hp["lr"] in (5e-4, 2e-3, 8e-3) and hp["adapter_params"] <= 768
            keys.add(key)
            study.tell(trial, hp["r"] - hp["lr"])
        assert len(keys) > 1, kind
    assert isinstance(make_sampler(0, 4, "random"), optuna.samplers.RandomSampler)


def test_stock_tell_policy_tells_what_rays_optuna_search_tells(tmp_path, tiny_model_dir):
    """Same events through Ray's own OptunaSearch and through ours with tell_policy stock: same study."""
    from ray.tune.search.optuna import OptunaSearch
    from optuna.trial import TrialState

    from melora_tune.search.schema import parse_space
    from melora_tune.search.samplers import make_sampler
    from melora_tune.search.space import build_space

    fs = build_space(parse_space(base_space(tiny_model_dir)))
    rays = OptunaSearch(space=fs, metric="score", mode="max", sampler=make_sampler(0, 2),
                        storage=optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/ray.db"), study_name="s")
    ours = make_searcher(tmp_path, fs, tell_policy="stock")
    (tmp_path / "f").mkdir()
    fidelity = make_searcher(tmp_path / "f", fs)
    events = [  # a: full fidelity; b: ASHA stops it after its first report; c: crashes
        ("result", "a", {"score": 0.6, "step": 10, "training_iteration": 1, "epoch": 1.0, "status": "running"}),
        ("result", "a", {"score": 0.7, "step": 20, "training_iteration": 2, "epoch": 2.0, "status": "completed"}),
        ("complete", "a", {"score": 0.7, "step": 20, "training_iteration": 2, "epoch": 2.0, "status": "completed"}),
        ("complete", "b", {"score": 0.9, "step": 10, "training_iteration": 1, "epoch": 1.0, "status": "running"}),
        ("complete", "c", None),
    ]
    studies = []
    for searcher in (rays, ours, fidelity):
        for tid in "abc":
            searcher.suggest(tid)
        for kind, tid, result in events:
            if kind == "result":
                searcher.on_trial_result(tid, result)
            else:
                searcher.on_trial_complete(tid, result, error=result is None)
        studies.append([(t.state, t.value, t.intermediate_values) for t in searcher._ot_study.trials])
    assert studies[0] == studies[1]
    # Ray's policy: the stopped trial is COMPLETE with its partial 0.9 and becomes the study's best
    assert studies[1][1][:2] == (TrialState.COMPLETE, 0.9) and studies[1][2][0] == TrialState.FAIL
    # ours (fidelity): PRUNED, the full-fidelity 0.7 stays best
    assert studies[2][1][0] == TrialState.PRUNED and studies[2][0][:2] == (TrialState.COMPLETE, 0.7)


def test_grid_resumed_after_a_killed_driver_still_covers_each_point_once(tmp_path, tiny_model_dir):
    from melora_tune.search.searcher import BudgetOptunaSearch

    space, fs = grid_space(tiny_model_dir)  # 8 configurations x 2 lrs

    def searcher():
        return BudgetOptunaSearch(fs, storage=f"sqlite:///{tmp_path}/optuna.db", study_name="g", seed=0, max_t=2,
                                  sampler="grid")

    def key(hp):
        return (hp["method"], hp["n"], hp["r"], hp["lr"])

    s = searcher()
    taken = [key(s.suggest(f"a{i}")) for i in range(3)]
    s.on_trial_complete("a0", {"score": 0.5, "step": 2, "epoch": 2.0, "status": "completed"})
    s.save(str(tmp_path / "searcher.pkl"))  # Ray's last snapshot ...
    lost = [key(s.suggest(f"a{i}")) for i in range(3, 5)]  # ... then two more asked, and the driver dies
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))
    rest = [key(restored.suggest(f"b{i}")) for i in range(fs.grid_size() - 3)]
    assert rest[:2] == lost  # the orphans are handed out again first
    assert sorted(taken + rest) == sorted({(k[0], k[1], k[2], lr) for k in fs.reachable() for lr in (1e-3, 1e-2)})
    assert len(restored._ot_study.trials) == fs.grid_size() == 16


@pytest.mark.parametrize("name,fair", [("llama2_7b_instruct", False), ("llama2_7b_instruct_fair", True)])
def test_llama_reproduction_is_labelled_unequal_and_its_fair_variant_is_not(name, fair):
    """The official script's one-learning-rate pair stays as a labelled reproduction (its dry run warns that the
    methods are not tuned); the fair variant trains every cell at the same few rates. Llama-2-7B's shapes from
    its config alone (meta device, no download)."""
    from transformers import LlamaConfig

    from melora_tune.adapters.accounting import ModelSpec
    from melora_tune.search.cells import effort_warnings
    from melora_tune.search.experiment import with_shares
    from melora_tune.search.schema import load_space
    from melora_tune.search.space import build_space

    spec = ModelSpec.from_config(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                             num_attention_heads=32, vocab_size=32000), task="causal_lm",
                                 name="meta-llama/Llama-2-7b-hf")
    space, _ = load_space(SPACES / f"{name}.yaml")
    feasible = build_space(space, spec=spec)
    assert sorted(feasible.cells) == [("lora", 524288), ("lora", 33554432), ("melora", 524288), ("melora", 33554432)]
    _, shares = with_shares(space, feasible)
    assert set(shares.values()) == ({3} if fair else {1})
    warnings = effort_warnings(space, feasible)
    assert (warnings == []) if fair else ("not a tuned comparison" in warnings[0])
