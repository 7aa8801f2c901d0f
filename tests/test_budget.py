"""The budget enumerator against brute force: build every layer, count, keep what fits."""

from __future__ import annotations

import itertools

import pytest
from torch import nn

from melora_tune.adapters import AdapterConfig, make_layer
from melora_tune.adapters.accounting import LinearShape
from melora_tune.adapters.budget import enumerate_feasible, smallest_config
from melora_tune.errors import UsageError

# Small dims with few common divisors and a non-square layer, like GQA's v_proj.
SHAPES = [LinearShape("a", 12, 12), LinearShape("b", 12, 6)]


def brute_force(method, budget, min_fraction=0.0, m_choices=(1, 2, 4), u_choices=None):
    """Construct the real layers for every tuple in a box larger than anything feasible. By default a method's
    cell holds only that method: MELoRA n=1 and PRoLoRA u=r (nothing shared) are LoRA, so they are left out."""
    found = set()
    ns = range(2, 13) if method == "melora" else [1]
    ms = m_choices if method == "prolora" else [1]
    for n, r in itertools.product(ns, range(1, 13)):
        for u in (range(0, r) if u_choices is None else u_choices) if method == "prolora" else [0]:
            for m in ms:
                try:
                    cfg = AdapterConfig(method=method, n=n, r=r, u=u, m=m)
                    layers = [make_layer(nn.Linear(s.d_in, s.d_out), cfg) for s in SHAPES]
                except UsageError:
                    continue
                params = sum(p.numel() for layer in layers for p in layer.parameters() if p.requires_grad)
                if min_fraction * budget <= params <= budget:
                    found.add((n, r, u, m, params))
    return found


@pytest.mark.parametrize("method", ["lora", "melora", "prolora"])
@pytest.mark.parametrize("budget,min_fraction", [(60, 0.0), (200, 0.5), (400, 0.0), (5000, 0.0), (30, 0.0)])
def test_enumerator_equals_brute_force(method, budget, min_fraction):
    got = enumerate_feasible(SHAPES, method, budget, min_fraction=min_fraction, m=[1, 2, 4] if method == "prolora" else None)
    keys = [(c.n, c.r, c.u, c.m, c.adapter_params) for c in got]
    assert len(keys) == len(set(keys)), "no duplicates"
    assert set(keys) == brute_force(method, budget, min_fraction)
    for c in got:
        assert c.adapter_params <= budget and c.adapter_params >= min_fraction * budget


def test_melora_respects_divisibility_and_per_mini_rank():
    got = enumerate_feasible(SHAPES, "melora", 10_000)
    assert {c.n for c in got} == {2, 3, 6}  # common divisors of 12 and 6 but 1 (LoRA itself)
    assert {c.n for c in enumerate_feasible(SHAPES, "melora", 10_000, n=[1, 2])} == {1, 2}  # listed: kept
    assert all(c.r <= 6 // c.n for c in got)
    assert all(c.equivalent_rank == c.n * c.r <= 6 for c in got)


def test_declared_choices_restrict_and_are_all_reached():
    got = enumerate_feasible(SHAPES, "prolora", 10_000, r=[2, 4], u=[1], m=[2], m_b=[3])
    assert {(c.r, c.u, c.m, c.m_b) for c in got} == {(2, 1, 2, 3), (4, 1, 2, 3)}
    # u above every declared r: nothing, and no early stop that would hide larger r
    got = enumerate_feasible(SHAPES, "prolora", 10_000, r=[1, 2, 3], u=[3], m=[2])
    assert [(c.r, c.u) for c in got] == [(3, 3)]


def test_smallest_config_and_empty_budget():
    assert enumerate_feasible(SHAPES, "lora", 10) == []
    cheapest = smallest_config(SHAPES, "lora")
    assert cheapest.adapter_params == 12 + 12 + 12 + 6 and cheapest.r == 1
    assert smallest_config(SHAPES, "prolora", m=[4]).adapter_params < cheapest.adapter_params


def test_budget_arguments_are_validated():
    with pytest.raises(UsageError, match="min_fraction"):
        enumerate_feasible(SHAPES, "lora", 100, min_fraction=1.5)
    with pytest.raises(UsageError, match="budget must be a positive"):
        enumerate_feasible(SHAPES, "lora", 0)
