"""MELoRA (Ren et al., ACL 2024): mini-ensemble low-rank adapters."""

from __future__ import annotations

import torch
from torch import nn

from melora_tune.adapters.base import AdapterLinear, kaiming_uniform_
from melora_tune.adapters.config import AdapterConfig
from melora_tune.adapters.hyperparams import HyperParam
from melora_tune.adapters.method import Method, common_divisors, min_dim
from melora_tune.adapters.registry import register_method
from melora_tune.errors import UsageError


class MELoRALinear(AdapterLinear):
    r"""MELoRA: n mini-LoRAs side by side on disjoint slices of the input and output.

    .. math::
        \Delta W = \mathrm{blockdiag}(s B_1 A_1, \dots, s B_n A_n),\quad
        A_i \in R^{r \times d_{in}/n},\ B_i \in R^{d_{out}/n \times r},\ s = \alpha / r

    so mini i maps input slice i to output slice i. Equivalent rank n r with the
    r (d_in + d_out) parameters of LoRA(r). All A_i live in one tensor
    ``melora_A`` (n, r, d_in/n) and all B_i in ``melora_B`` (n, d_out/n, r), so
    the forward is two batched contractions, no loop over minis. A_i is
    Kaiming-uniform with the mini's own fan-in d_in/n (each mini is an
    nn.Linear(d_in/n, r) in the authors' code), B_i is zero.
    """

    TRAINABLE = ("melora_A", "melora_B")

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__(base, cfg)
        n, w = cfg.n, base.weight
        self.n = n
        self.mini_in = self.in_features // n
        self.mini_out = self.out_features // n
        self.melora_A = nn.Parameter(torch.empty(n, cfg.r, self.mini_in, dtype=w.dtype, device=w.device))
        self.melora_B = nn.Parameter(torch.zeros(n, self.mini_out, cfg.r, dtype=w.dtype, device=w.device))
        kaiming_uniform_(self.melora_A, fan_in=self.mini_in)

    @staticmethod
    def check(d_in: int, d_out: int, cfg: AdapterConfig) -> None:
        n = cfg.n
        if d_in % n or d_out % n:
            raise UsageError(
                f"MELoRA n={n} must divide both d_in={d_in} and d_out={d_out} of the layer: "
                f"pick n among the common divisors of {d_in} and {d_out}"
            )
        if cfg.r > min(d_in // n, d_out // n):
            raise UsageError(
                f"MELoRA per-mini rank r={cfg.r} exceeds the mini's size min({d_in // n}, {d_out // n}) "
                f"for n={n} on a {d_in}->{d_out} layer: lower r or n"
            )

    @staticmethod
    def count_params(d_in: int, d_out: int, cfg: AdapterConfig) -> int:
        return cfg.r * (d_in + d_out)

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        # Two bmm over the n minis (the FLOPs of LoRA(r)), laid out for speed (see
        # benchmarks/README.md): x enters as a strided view, not a copy; A is the left
        # operand, so autograd forms its gradient as (r x tokens) @ (tokens x d_in/n), like
        # B's, the shape BLAS runs fast (the einsum version got (d_in/n x tokens) @
        # (tokens x r), several times slower with MKL); the scale rides on the small B,
        # not on the (tokens x d_out) output. One copy puts y back in token order.
        lead = x.shape[:-1]
        xt = x.reshape(lead.numel(), self.n, self.mini_in).permute(1, 2, 0)  # (n, d_in/n, b)
        ht = torch.bmm(self.melora_A, xt)  # (n, r, b)
        bt = (self.melora_B * self.scale).transpose(1, 2).contiguous()  # (n, r, d_out/n)
        y = torch.bmm(ht.transpose(1, 2), bt)  # (n, b, d_out/n)
        return y.transpose(0, 1).reshape(*lead, self.out_features)

    def delta_weight(self) -> torch.Tensor:
        return torch.block_diag(*(self.melora_B * self.scale) @ self.melora_A)

    def lora_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Block-diagonal A (n r, d_in) and B (d_out, n r): MELoRA(n, r) as LoRA of rank n r."""
        return torch.block_diag(*self.melora_A), torch.block_diag(*(self.melora_B * self.scale))


@register_method
class MELoRA(Method):
    """MELoRA(n, r): n must divide every layer's d_in and d_out; r is per mini, r <= min(d_in, d_out) / n."""

    name = "melora"
    label = "MELoRA"
    summary = "MELoRA (Ren et al., 2024): n mini-LoRAs of rank r side by side, equivalent rank n r"
    hyperparams = ("n", "r")
    declares = (
        HyperParam("n", "MELoRA: number of mini-LoRAs", 1, title="MELoRA n (number of minis)",
                   # n=1 is LoRA itself: a MELoRA cell holds MELoRA only unless space.n lists 1
                   choices=lambda shapes, chosen: [d for d in common_divisors(shapes) if d > 1],
                   column="MELoRA mini-LoRAs (1 for other methods)"),
    )
    layer = MELoRALinear
    marker, color = "o", "#1f77b4"

    def max_rank(self, shapes, chosen):
        return min_dim(shapes) // chosen.get("n", 1)

    def equivalent_rank(self, cfg):
        return cfg.n * cfg.r

    def peft_description(self, cfg):
        return (f"a standard PEFT LoRA of rank {cfg.n * cfg.r} with block-diagonal A and B; "
                "the update B @ A is identical")
