"""A method with a hyperparameter of its own, declared and registered from this test module alone, reaches every
place that derives from the registry: the adapter config's keys and checks, ``melora-tune budget`` flags, the search
space's ``space.k`` and its conditional space, the trial config, injection and forward, the records reader's and
the report tables' columns, the progress summary. Unregistering it removes ``k`` again."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from melora_tune.adapters import HYPERPARAMS, AdapterConfig, AdapterLinear, HyperParam, Method, register_method, unregister_method
from melora_tune.adapters.base import kaiming_uniform_
from melora_tune.cli import main
from melora_tune.errors import UsageError

# MiniLM (6 layers, query/value 384 -> 384): 12 adapted layers of r (384 / k + 384) params each.
LAYERS, D = 12, 384


class LoRAKLinear(AdapterLinear):
    r"""LoRA whose A is one (r, d_in / k) block shared by the k blocks of the input: :math:`A = [A_0 \cdots A_0]`."""

    TRAINABLE = ("lorak_A", "lorak_B")

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__(base, cfg)
        self.k = cfg.k
        self.lorak_A = nn.Parameter(torch.empty(cfg.r, self.in_features // cfg.k))
        self.lorak_B = nn.Parameter(torch.zeros(self.out_features, cfg.r))
        kaiming_uniform_(self.lorak_A, fan_in=self.in_features)

    @staticmethod
    def check(d_in, d_out, cfg):
        if d_in % cfg.k:
            raise UsageError(f"LoRA-K k={cfg.k} must divide d_in={d_in}")
        if cfg.r > min(d_in, d_out):
            raise UsageError(f"LoRA-K rank r={cfg.r} exceeds min(d_in, d_out) = {min(d_in, d_out)}")

    @staticmethod
    def count_params(d_in, d_out, cfg):
        return cfg.r * (d_in // cfg.k + d_out)

    def lora_factors(self):
        return self.lorak_A.repeat(1, self.k), self.lorak_B * self.scale


class LoRAK(Method):
    name = "lorak"
    label = "LoRA-K"
    hyperparams = ("r", "k")
    declares = (
        HyperParam("k", "LoRA-K: input blocks sharing one A", 1, title="LoRA-K blocks k",
                   choices=lambda shapes, chosen: [k for k in (1, 2, 4, 8) if all(s.d_in % k == 0 for s in shapes)]),
    )
    layer = LoRAKLinear


@pytest.fixture
def lorak():
    register_method(LoRAK)
    yield "lorak"
    unregister_method("lorak")


def params(r: int, k: int) -> int:
    return LAYERS * r * (D // k + D)


def test_config_keys_and_checks(lorak):
    assert list(HYPERPARAMS) == ["n", "r", "u", "m", "m_b", "k"]
    cfg = AdapterConfig(method=lorak, r=2, k=4)
    assert cfg.k == 4 and cfg.method_params() == {"r": 2, "k": 4} and AdapterConfig().k == 1
    assert AdapterConfig.from_dict(cfg.to_dict()) == cfg and cfg.replace(k=2).k == 2
    with pytest.raises(UsageError, match="adapter k must be an integer, got 'x'"):
        AdapterConfig(method=lorak, k="x")
    with pytest.raises(UsageError, match="LoRA-K blocks k must be >= 1, got 0"):
        AdapterConfig(method=lorak, k=0)
    with pytest.raises(UsageError, match=r"unknown key 'kk' \(did you mean 'k'\?\).*m_b, k, target_modules"):
        AdapterConfig(method=lorak, kk=2)


def test_budget_cli_counts_it(lorak, capsys):
    assert main(["budget", "--model", "minilm", "--method", lorak, "--r", "1", "--k", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_params"] == params(1, 2)
    assert main(["budget", "--model", "minilm", "--method", lorak, "--budget", "7000", "--min-fraction", "0.5",
                 "--r-choices", "1,2", "--k-choices", "1,2,4", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["r"], r["k"], r["adapter_params"]) for r in rows} == {(1, 2, params(1, 2)), (1, 4, params(1, 4))}
    assert main(["budget", "--model", "minilm", "--method", "lora", "--r", "1", "--k", "2"]) == 2
    assert "--k does not apply to method lora" in capsys.readouterr().err


def test_search_space_and_dry_run(lorak, tmp_path, capsys):
    from melora_tune.search.schema import parse_space
    from melora_tune.search.space import build_space

    space = {
        "name": "plugin-k", "model": "minilm", "budget": {"max_params": 7000, "min_fraction": 0.5},
        "methods": [lorak], "space": {"lr": {"low": 1e-3, "high": 1e-2}, "r": [1, 2], "k": [1, 2, 4]},
        "points_to_evaluate": [{"method": lorak, "r": 1, "k": 2, "lr": 2e-3}],
        "storage_path": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }
    parsed = parse_space(space)
    assert parsed.space.k == [1, 2, 4] and parsed.space.n is None
    fs = build_space(parsed)
    assert {(c.r, c.k) for c in fs.candidates[lorak]} == {(1, 2), (1, 4)}
    dists = fs.distributions()
    assert dists[f"{lorak}.r"] == [1] and dists[f"{lorak}.k|r=1"] == [2, 4]

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    assert main(["search", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert lorak in out and "2 feasible configs" in out

    for bad, message in (({"kk": [2]}, "unknown key 'space.kk' (did you mean 'space.k'?)"),
                         ({"k": [0]}, "space.k: choices must be >= 1, got 0")):
        with pytest.raises(UsageError) as err:
            parse_space({**space, "space": {**space["space"], **bad}})
        assert message in str(err.value)
    with pytest.raises(UsageError, match="space.k applies to lorak only"):
        parse_space({**space, "methods": ["lora"], "points_to_evaluate": []})


def test_trial_config_injects_and_forwards(lorak, tiny_bert):
    from melora_tune.adapters.inject import adapter_layers, inject_adapters
    from melora_tune.trial.config import TrialConfig

    cfg = TrialConfig.from_dict({"adapter": {"method": lorak, "r": 2, "k": 4, "target_modules": ["query", "value"],
                                             "modules_to_save": []}})
    assert cfg.adapter.k == 4 and cfg.with_overrides(["adapter.k=2"]).adapter.k == 2
    with pytest.raises(UsageError, match="adapter.k: adapter k must be an integer"):
        TrialConfig.from_dict({"adapter": {"method": lorak, "k": 1.5}})
    sampled = TrialConfig.from_sampled(cfg.to_dict(), {"method": "lora", "r": 3, "lr": 1e-3})
    assert sampled.adapter.k == 1  # a hyperparameter the sampled method does not use goes back to its default

    adapter = cfg.adapter.adapter_config()
    report = inject_adapters(tiny_bert, adapter)
    assert report.adapter_params == sum(p.numel() for p in tiny_bert.parameters() if p.requires_grad) == 4 * 2 * (48 // 4 + 48)
    layer = next(iter(adapter_layers(tiny_bert).values()))
    with torch.no_grad():
        layer.lorak_B.normal_()
        x = torch.randn(3, 48)
        a, b = layer.lora_factors()
        assert torch.allclose(layer(x), layer.base(x) + x @ a.t() @ b.t(), atol=1e-5)
        out = tiny_bert(input_ids=torch.randint(0, 120, (2, 7))).logits
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_records_and_report_columns(lorak):
    from melora_tune.adapters.registry import describe
    from melora_tune.records import read
    from melora_tune.report import render, table
    from melora_tune.search.progress import TrialRow, summary_table

    assert read.hp_columns() == ("n", "r", "u", "m", "m_b", "k") and read.COLUMNS[7:13] == read.hp_columns()  # after method, budget, cell
    row = {c: None for c in read.trial_columns()}
    row.update(run_id="x", method=lorak, r="2", k="4", n="1", u="0", m="1", lr="0.001", score="0.5", status="completed")
    frame = read.normalize_frame(pd.DataFrame([row], columns=list(read.trial_columns())))
    assert frame["k"].tolist() == [4] and str(frame["k"].dtype) == "Int64"
    assert "k" in read.confirm_columns() and "k" in table.table_columns() and "k" in table.copied_params()
    assert ("k", "k") in render.best_columns() and ("k", "k") in render.cross_columns()
    assert describe({"method": lorak, "r": 2, "k": 4, "lr": 1e-3}) == "lorak r=2 k=4 lr=1.0e-3"
    trial = TrialRow("t0", lorak, {"n": 1, "r": 2, "u": 0, "m": 1, "m_b": None, "k": 4}, 1e-3, 100, 2, 0.5, "completed", 1.0)
    header, line = summary_table([trial]).splitlines()[0], summary_table([trial]).splitlines()[2]
    assert header.split()[1:6] == ["method", "n", "r", "u/m", "k"] and line.split()[1:4] == [lorak, "2", "4"]


def test_unregistering_removes_the_hyperparameter():
    register_method(LoRAK)
    unregister_method("lorak")
    assert list(HYPERPARAMS) == ["n", "r", "u", "m", "m_b"]
    with pytest.raises(UsageError, match="unknown key 'k'"):
        AdapterConfig(k=2)
