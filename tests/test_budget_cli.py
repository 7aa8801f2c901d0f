"""`melora-tune budget` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import tiny_llama_config


def run(*args, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "melora_tune.cli", *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_single_config_json_on_bundled_model():
    res = run("budget", "--model", "minilm", "--method", "melora", "--targets", "query,value", "--n", "8", "--r", "1", "--json")
    assert res.returncode == 0, res.stderr
    row = json.loads(res.stdout)
    assert row["method"] == "melora" and row["adapter_params"] == 9216 and row["equivalent_rank"] == 8


def test_budget_lists_feasible_configs(tmp_path):
    tiny_llama_config().save_pretrained(tmp_path / "llama")
    res = run("budget", "--model", str(tmp_path / "llama"), "--task-type", "causal_lm", "--method", "melora,lora",
              "--targets", "q_proj,v_proj", "--budget", "1000", "--min-fraction", "0.5", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert rows and all(500 <= r["adapter_params"] <= 1000 for r in rows)
    assert {r["method"] for r in rows} == {"melora", "lora"}
    # q_proj 64->64 and v_proj 64->32 on 2 layers: r (64+64 + 64+32) * 2 = 448 r
    assert {(r["method"], r["r"]) for r in rows} == {("lora", 2)} | {("melora", 2)}
    assert {r["n"] for r in rows if r["method"] == "melora"} == {2, 4, 8, 16}  # n=1 (LoRA itself) only when listed


def test_readable_table_without_json():
    res = run("budget", "--model", "minilm", "--method", "lora", "--r", "2")
    assert res.returncode == 0 and "adapter_params" in res.stdout and "18432" in res.stdout


@pytest.mark.parametrize("args,needle", [
    (["--method", "melora", "--n", "7", "--r", "1"], "n=7 must divide"),
    (["--method", "lora", "--targets", "q_proj", "--r", "1"], "its linear layers are named"),
    (["--method", "lora", "--budget", "100"], "smallest lora configuration needs 9216"),
    (["--method", "lora", "--n", "2", "--r", "1"], "--n does not apply to method lora"),
    (["--method", "dorra", "--r", "1"], "unknown adapter method"),
    (["--method", "lora", "--r", "x"], "invalid int value"),
    (["--method", "lora"], "give --r"),
])
def test_bad_input_is_one_line_and_exit_2(args, needle, capsys):
    from melora_tune.cli import main

    try:
        code = main(["budget", "--model", "minilm", *args])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert out == ""


def test_error_exit_code_from_the_installed_entry_point():
    res = run("budget", "--model", "minilm", "--method", "melora", "--n", "7", "--r", "1")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "n=7 must divide" in res.stderr


def test_missing_model_folder():
    res = run("budget", "--model", "./no-such-model", "--method", "lora", "--r", "1")
    assert res.returncode == 2 and "does not exist" in res.stderr
