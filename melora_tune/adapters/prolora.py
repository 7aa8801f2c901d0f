"""PRoLoRA (Wang et al., ACL 2024): partially rotated, chunk-shared LoRA."""

from __future__ import annotations

import math

import torch
from torch import nn

from melora_tune.adapters.base import AdapterLinear, kaiming_uniform_
from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.hyperparams import HyperParam
from melora_tune.adapters.method import Method
from melora_tune.adapters.registry import register_method
from melora_tune.errors import UsageError


DEFAULT_SHARING_RATES = (1, 2, 4, 8, 16, 32, 64)


def rotation_index(rank: int, copies: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """idx[k, i] = (i + k * stride) mod rank: which rank row copy k puts at position i."""
    ranks = torch.arange(rank, device=device)
    shifts = torch.arange(copies, device=device).unsqueeze(1) * stride
    return (ranks.unsqueeze(0) + shifts) % rank


class PRoLoRALinear(AdapterLinear):
    r"""PRoLoRA: LoRA of rank r whose first r - u ranks are broadcast from small shared chunks.

    Shared chunks :math:`A_0 \in R^{(r-u) \times \lceil d_{in}/m \rceil}` and
    :math:`B_0 \in R^{\lceil d_{out}/m_B \rceil \times (r-u)}` are copied m (m_B)
    times along the hidden axis; copy k is rotated by k * stride along the rank
    axis (row i of copy k is row (i + k stride) mod (r-u) of the chunk, as in the
    authors' ``de_reduce``), stride = max(floor((r-u)/m), 1), and the copies are
    concatenated and truncated to d_in (d_out). The u unshared ranks are full
    rows of A (``prolora_Au``, (u, d_in)) and columns of B (``prolora_Bu``,
    (d_out, u)) appended last. Then :math:`\Delta W = s B A`, s = alpha / r.

    Rectified init: all A parts are Kaiming-uniform with fan = the full d_in
    (bound 1/sqrt(d_in)), all B parts zero. With m = m_B = 1, or u = r, this is
    LoRA(r) exactly. Params: (r-u)(ceil(d_in/m) + ceil(d_out/m_B)) + u (d_in + d_out).
    """

    TRAINABLE = ("prolora_A0", "prolora_B0", "prolora_Au", "prolora_Bu")

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__(base, cfg)
        w = base.weight
        self.shared_rank = cfg.r - cfg.u
        self.m_a, self.m_b = cfg.m, cfg.value("m_b")
        self.stride_a = max(self.shared_rank // self.m_a, 1)
        self.stride_b = max(self.shared_rank // self.m_b, 1)
        chunk_in = math.ceil(self.in_features / self.m_a)
        chunk_out = math.ceil(self.out_features / self.m_b)
        kw = {"dtype": w.dtype, "device": w.device}
        self.prolora_A0 = nn.Parameter(torch.empty(self.shared_rank, chunk_in, **kw))
        self.prolora_B0 = nn.Parameter(torch.zeros(chunk_out, self.shared_rank, **kw))
        self.prolora_Au = nn.Parameter(torch.empty(cfg.u, self.in_features, **kw))
        self.prolora_Bu = nn.Parameter(torch.zeros(self.out_features, cfg.u, **kw))
        kaiming_uniform_(self.prolora_A0, fan_in=self.in_features)
        kaiming_uniform_(self.prolora_Au, fan_in=self.in_features)

    @staticmethod
    def check(d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        if cfg.r > min(d_in, d_out):
            raise UsageError(f"PRoLoRA rank r={cfg.r} exceeds min(d_in, d_out) = {min(d_in, d_out)} of a {d_in}->{d_out} layer")
        if cfg.m > d_in or cfg.value("m_b") > d_out:
            raise UsageError(
                f"PRoLoRA sharing rates m={cfg.m}, m_b={cfg.value('m_b')} exceed the layer's d_in={d_in} / d_out={d_out}"
            )

    @staticmethod
    def count_params(d_in: int, d_out: int, cfg: AdapterConfig) -> int:
        shared = cfg.r - cfg.u
        chunks = math.ceil(d_in / cfg.m) + math.ceil(d_out / cfg.value("m_b"))
        return shared * chunks + cfg.u * (d_in + d_out)

    def full_A(self) -> torch.Tensor:
        """A (r, d_in): rotated copies of A0 along d_in, then the unshared rows."""
        rank, a0 = self.shared_rank, self.prolora_A0
        if rank == 0:
            return self.prolora_Au
        idx = rotation_index(rank, self.m_a, self.stride_a, a0.device)  # (m, rank)
        copies = a0[idx]  # (m, rank, chunk_in)
        shared = copies.permute(1, 0, 2).reshape(rank, -1)[:, : self.in_features]
        return torch.cat([shared, self.prolora_Au], dim=0)

    def full_B(self) -> torch.Tensor:
        """B (d_out, r): rotated copies of B0 along d_out, then the unshared columns."""
        rank, b0 = self.shared_rank, self.prolora_B0
        if rank == 0:
            return self.prolora_Bu
        idx = rotation_index(rank, self.m_b, self.stride_b, b0.device)
        copies = b0[:, idx]  # (chunk_out, m_b, rank)
        shared = copies.permute(1, 0, 2).reshape(-1, rank)[: self.out_features]
        return torch.cat([shared, self.prolora_Bu], dim=1)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.full_A(), self.full_B() * self.scale

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.full_A().t()) @ self.full_B().t() * self.scale


@register_method
class PRoLoRA(Method):
    """PRoLoRA(r, u, m, m_b): u <= r unshared ranks; sharing rates m (of A) and m_b (of B, tied to m by default)."""

    name = "prolora"
    label = "PRoLoRA"
    summary = "PRoLoRA (Wang et al., 2024): LoRA of rank r built from rotated shared chunks plus u unshared ranks"
    hyperparams = ("r", "u", "m", "m_b")
    declares = (
        HyperParam("u", "PRoLoRA: unshared ranks", 0, at_most="r", default=0, title="PRoLoRA unshared ranks u",
                   # u=r leaves nothing shared (LoRA): a PRoLoRA cell holds PRoLoRA only unless space.u lists it
                   choices=lambda shapes, chosen: range(0, chosen["r"]),
                   column="PRoLoRA unshared ranks (0 for other methods)"),
        HyperParam("m", "PRoLoRA: sharing rate of A", 1, title="PRoLoRA sharing rate m",
                   choices=lambda shapes, chosen: DEFAULT_SHARING_RATES[1:],  # m=1 shares nothing: LoRA
                   column="PRoLoRA sharing rate of A (1 for other methods)"),
        HyperParam("m_b", "PRoLoRA: sharing rate of B (default: tied to m)", 1, tied_to="m", default=None,
                   title="PRoLoRA sharing rate m_b", choices=lambda shapes, chosen: DEFAULT_SHARING_RATES,
                   column="PRoLoRA sharing rate of B (= m when tied)"),
    )
    layer = PRoLoRALinear
    marker, color = "^", "#2ca02c"
