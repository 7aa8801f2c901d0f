"""A method registered from outside the package (here, from this test module) works in every place that derives from
the registry, with nothing else edited: counts, budget, search --dry-run with its conditional space, run names."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from torch import nn

from melora_tune.adapters import AdapterConfig, AdapterLinear, Method, describe, method_names, register_method, unregister_method
from melora_tune.adapters.base import kaiming_uniform_
from melora_tune.cli import main


class LoRAFALinear(AdapterLinear):
    r"""LoRA-FA (Zhang et al., 2023): :math:`\Delta W = s\,BA` with A frozen at its random init, only B (d_out, r) trained."""

    TRAINABLE = ("fa_B",)

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__(base, cfg)
        self.register_buffer("fa_A", kaiming_uniform_(torch.empty(cfg.r, self.in_features), fan_in=self.in_features))
        self.fa_B = nn.Parameter(torch.zeros(self.out_features, cfg.r))

    @staticmethod
    def check(d_in, d_out, cfg):
        from melora_tune.errors import UsageError

        if cfg.r > min(d_in, d_out):
            raise UsageError(f"LoRA-FA rank r={cfg.r} exceeds min(d_in, d_out) = {min(d_in, d_out)}")

    @staticmethod
    def count_params(d_in, d_out, cfg):
        return cfg.r * d_out

    def lora_factors(self):
        return self.fa_A, self.fa_B * self.scale


class LoRAFA(Method):
    name = "lorafa"
    label = "LoRA-FA"
    hyperparams = ("r",)
    layer = LoRAFALinear


@pytest.fixture
def lorafa():
    register_method(LoRAFA)
    yield "lorafa"
    unregister_method("lorafa")


def test_registered_method_counts_exactly(lorafa, tiny_bert):
    from melora_tune.adapters.inject import inject_adapters

    cfg = AdapterConfig(method=lorafa, r=3, target_modules=["query", "value"])
    report = inject_adapters(tiny_bert, cfg)
    assert report.adapter_params == sum(p.numel() for p in tiny_bert.parameters() if p.requires_grad) == 4 * 3 * 48
    assert cfg.method_params() == {"r": 3} and describe({"method": lorafa, "r": 3, "lr": 1e-3}) == "lorafa r=3 lr=1.0e-3"


def test_registered_method_in_budget_cli(lorafa, capsys):
    assert lorafa in method_names()
    assert main(["budget", "--model", "minilm", "--method", lorafa, "--r", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["adapter_params"] == 12 * 2 * 384
    assert main(["budget", "--model", "minilm", "--method", f"{lorafa},lora", "--budget", "9216", "--min-fraction", "0.5", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {(r["r"], r["adapter_params"]) for r in rows if r["method"] == lorafa} == {(1, 4608), (2, 9216)}
    assert main(["budget", "--model", "minilm", "--method", "lorafaa", "--r", "1"]) == 2
    assert "did you mean 'lorafa'" in capsys.readouterr().err


def test_registered_method_in_search_dry_run(lorafa, tmp_path, capsys):
    space = {
        "name": "plugin", "model": "minilm", "budget": {"max_params": 9216, "min_fraction": 0.5},
        "methods": [lorafa, "melora"], "space": {"lr": {"low": 1e-3, "high": 1e-2}, "r": [1, 2]},
        "points_to_evaluate": [{"method": lorafa, "r": 2, "lr": 2e-3}],
        "storage_path": str(tmp_path / "runs"), "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    assert main(["search", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert lorafa in out and "2 feasible configs (r in {1, 2})" in out

    from melora_tune.search.schema import parse_space
    from melora_tune.search.space import build_space

    fs = build_space(parse_space(space))
    assert {c.r for c in fs.candidates[lorafa]} == {1, 2} and fs.distributions()[f"{lorafa}.r"] == [1, 2]
    space["space"]["n"] = [2]
    space["methods"] = [lorafa]
    path.write_text(yaml.safe_dump(space))
    assert main(["search", str(path), "--dry-run"]) == 2
    assert "space.n applies to melora only" in capsys.readouterr().err
