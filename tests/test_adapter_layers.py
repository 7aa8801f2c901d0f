"""Each adapter layer against a dense reference written here, independently of the layer's code."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from melora_tune.adapters import AdapterConfig, LoRALinear, MELoRALinear, PRoLoRALinear, make_layer
from melora_tune.errors import UsageError

D_IN, D_OUT = 24, 36
SHAPES = [(5,), (3, 7), (1, 1), (2, 3, 4)]  # leading batch shapes: 2-D, 3-D and 4-D input


def randomize(layer):
    """B starts at zero; give every trainable tensor values so the update is not trivially 0."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.trainable_parameters().values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return layer


def dense_lora(layer: LoRALinear) -> torch.Tensor:
    return layer.scale * layer.lora_B @ layer.lora_A


def dense_melora(layer: MELoRALinear) -> torch.Tensor:
    n, A, B = layer.n, layer.melora_A, layer.melora_B
    di, do = layer.in_features // n, layer.out_features // n
    delta = torch.zeros(layer.out_features, layer.in_features)
    for i in range(n):
        delta[i * do:(i + 1) * do, i * di:(i + 1) * di] = layer.scale * B[i] @ A[i]
    return delta


def dense_prolora(layer: PRoLoRALinear, cfg: AdapterConfig) -> torch.Tensor:
    """Element by element from the definition: copy k, rank row i <- chunk row (i + k*stride) mod (r-u)."""
    rs = cfg.r - cfg.u
    A = torch.zeros(cfg.r, layer.in_features)
    B = torch.zeros(layer.out_features, cfg.r)
    if rs:
        A0, B0 = layer.prolora_A0, layer.prolora_B0
        wa, wb = A0.shape[1], B0.shape[0]
        sa, sb = max(rs // cfg.m, 1), max(rs // cfg.value("m_b"), 1)
        for col in range(layer.in_features):
            k, j = divmod(col, wa)
            for i in range(rs):
                A[i, col] = A0[(i + k * sa) % rs, j]
        for row in range(layer.out_features):
            k, j = divmod(row, wb)
            for i in range(rs):
                B[row, i] = B0[j, (i + k * sb) % rs]
    A[rs:] = layer.prolora_Au
    B[:, rs:] = layer.prolora_Bu
    return layer.scale * B @ A


CONFIGS = [
    ("lora", AdapterConfig(method="lora", r=3, alpha=6)),
    ("melora", AdapterConfig(method="melora", n=4, r=2, alpha=8)),
    ("melora", AdapterConfig(method="melora", n=6, r=3, alpha=16)),
    ("prolora", AdapterConfig(method="prolora", r=4, u=1, m=5, m_b=3, alpha=8)),  # ceil: 24/5, 36/3
    ("prolora", AdapterConfig(method="prolora", r=5, u=0, m=2, alpha=10)),
    ("prolora", AdapterConfig(method="prolora", r=6, u=2, m=7, m_b=8, alpha=12)),  # truncation on both sides
]


def reference(layer, cfg):
    if cfg.method == "lora":
        return dense_lora(layer)
    if cfg.method == "melora":
        return dense_melora(layer)
    return dense_prolora(layer, cfg)


@pytest.mark.parametrize("method,cfg", CONFIGS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(CONFIGS)])
@pytest.mark.parametrize("lead", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_and_delta_match_dense_reference(method, cfg, lead):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = randomize(make_layer(base, cfg)).eval()
    ref_delta = reference(layer, cfg).detach()
    assert ref_delta.abs().max() > 0
    torch.testing.assert_close(layer.delta_weight().detach(), ref_delta, atol=1e-6, rtol=1e-5)
    x = torch.randn(*lead, D_IN)
    expected = x @ (base.weight + ref_delta).t() + base.bias
    out = layer(x)
    assert out.shape == (*lead, D_OUT)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,cfg", CONFIGS[:4], ids=[m for m, _ in CONFIGS[:4]])
def test_merge_unmerge_round_trip(method, cfg):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    w0 = base.weight.detach().clone()
    layer = randomize(make_layer(base, cfg)).eval()
    x = torch.randn(4, 3, D_IN)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base.weight, w0 + reference(layer, cfg), atol=1e-6, rtol=1e-6)
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method,cfg", CONFIGS[:4], ids=[m for m, _ in CONFIGS[:4]])
def test_dropout_applies_to_adapter_input_only(method, cfg):
    cfg = AdapterConfig(**{**cfg.to_dict(), "dropout": 0.5})
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    layer = randomize(make_layer(base, cfg)).train()
    x = torch.randn(6, D_IN)
    torch.manual_seed(123)
    out = layer(x)
    torch.manual_seed(123)
    dropped = nn.functional.dropout(x, 0.5, training=True)
    expected = base(x) + dropped @ reference(layer, cfg).t()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    layer.eval()
    torch.testing.assert_close(layer(x), base(x) + x @ reference(layer, cfg).t(), atol=1e-5, rtol=1e-5)


def test_training_starts_at_the_base_model_and_init_bounds():
    torch.manual_seed(0)
    x = torch.randn(3, D_IN)
    for cfg in CONFIGS:
        base = nn.Linear(D_IN, D_OUT)
        layer = make_layer(base, cfg[1])
        torch.testing.assert_close(layer(x), base(x))  # B = 0
    mel = MELoRALinear(nn.Linear(D_IN, D_OUT), AdapterConfig(method="melora", n=4, r=2))
    assert mel.melora_A.abs().max() <= 1 / math.sqrt(D_IN // 4)  # each mini's own fan-in
    pro = PRoLoRALinear(nn.Linear(D_IN, D_OUT), AdapterConfig(method="prolora", r=4, u=1, m=4))
    bound = 1 / math.sqrt(D_IN)  # rectified: fan = the full d_in, not the chunk width
    assert pro.prolora_A0.abs().max() <= bound and pro.prolora_Au.abs().max() <= bound
    assert pro.prolora_A0.abs().max() > 0.5 * bound


def test_parameter_counts_and_equivalent_rank():
    cases = [
        (AdapterConfig(method="lora", r=8), 8 * (D_IN + D_OUT)),
        (AdapterConfig(method="melora", n=4, r=2), 2 * (D_IN + D_OUT)),  # that of LoRA(2), equivalent rank 8
        (AdapterConfig(method="prolora", r=4, u=1, m=5, m_b=3), 3 * (5 + 12) + 1 * (D_IN + D_OUT)),
    ]
    for cfg, expected in cases:
        layer = make_layer(nn.Linear(D_IN, D_OUT), cfg)
        assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == expected
        assert type(layer).count_params(D_IN, D_OUT, cfg) == expected
    assert AdapterConfig(method="melora", n=4, r=2).equivalent_rank == 8
    assert AdapterConfig(method="prolora", r=4, u=1, m=2).equivalent_rank == 4


@pytest.mark.parametrize("cfg", [
    AdapterConfig(method="prolora", r=4, u=1, m=1, m_b=1),
    AdapterConfig(method="prolora", r=4, u=4, m=3, m_b=6),
])
def test_prolora_reduces_to_lora(cfg):
    """m = m_B = 1, or u = r: the same update, the same count and the same init law as LoRA(r)."""
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT)
    pro = randomize(PRoLoRALinear(base, cfg))
    lora = LoRALinear(base, AdapterConfig(method="lora", r=cfg.r, alpha=cfg.alpha))
    rs = cfg.r - cfg.u
    with torch.no_grad():
        lora.lora_A.copy_(torch.cat([pro.prolora_A0, pro.prolora_Au]) if rs else pro.prolora_Au)
        lora.lora_B.copy_(torch.cat([pro.prolora_B0, pro.prolora_Bu], dim=1) if rs else pro.prolora_Bu)
    x = torch.randn(2, 5, D_IN)
    torch.testing.assert_close(pro(x), lora(x), atol=1e-6, rtol=1e-6)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(pro) == count(lora) == cfg.r * (D_IN + D_OUT)


def test_gradients_match_dense_reference():
    torch.manual_seed(0)
    cfg = AdapterConfig(method="melora", n=3, r=2)
    layer = randomize(make_layer(nn.Linear(D_IN, D_OUT), cfg))
    x = torch.randn(7, D_IN, requires_grad=True)
    layer(x).pow(2).sum().backward()
    grads = {k: p.grad.clone() for k, p in layer.trainable_parameters().items()}
    assert layer.base.weight.grad is None
    x2 = x.detach().clone().requires_grad_(True)
    for p in layer.trainable_parameters().values():
        p.grad = None
    (x2 @ (layer.base.weight + dense_melora(layer)).t() + layer.base.bias).pow(2).sum().backward()
    for k, p in layer.trainable_parameters().items():
        torch.testing.assert_close(p.grad, grads[k], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("cfg,needle", [
    (dict(method="melora", n=5, r=1), "n=5 must divide both d_in=24 and d_out=36"),
    (dict(method="melora", n=4, r=7), "per-mini rank r=7 exceeds"),
    (dict(method="lora", r=25), "exceeds min(d_in, d_out) = 24"),
    (dict(method="prolora", r=4, m=25), "sharing rates"),
])
def test_layer_rejects_configs_that_do_not_fit(cfg, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        make_layer(nn.Linear(D_IN, D_OUT), AdapterConfig(**cfg))


@pytest.mark.parametrize("cfg,needle", [
    (dict(method="dorra"), "unknown adapter method 'dorra' \\(did you mean 'dora'\\?\\)"),
    (dict(r=0), "rank r must be >= 1"),
    (dict(method="prolora", r=2, u=3), "u must be in"),
    (dict(n=0), "n .* must be >= 1"),
    (dict(r=2.5), "r must be an integer"),
    (dict(dropout=1.0), "dropout"),
])
def test_config_rejects_bad_values(cfg, needle):
    with pytest.raises(UsageError, match=needle):
        AdapterConfig(**cfg)


def test_config_rejects_unknown_key_with_suggestion():
    with pytest.raises(UsageError, match="did you mean 'alpha'"):
        AdapterConfig.from_dict({"method": "lora", "alpah": 8})
