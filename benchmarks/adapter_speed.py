"""Forward+backward speed of MELoRA(n, r) against PEFT LoRA and a per-mini Python loop.

For every layer shape and every n this times, interleaved in the same rounds:

* ``MELoRA(n, r)``      -- ``melora_tune.adapters.melora.MELoRALinear`` (batched, no Python loop);
* ``PEFT LoRA(r)``      -- ``peft.tuners.lora.Linear``, same trainable parameters and FLOPs;
* ``PEFT LoRA(n*r)``    -- ``peft.tuners.lora.Linear``, same rank as MELoRA(n, r);
* ``loop``              -- the research-code formulation: an ``nn.ModuleList`` of n
  (A_i, B_i) ``nn.Linear`` pairs, input split into n chunks, outputs concatenated
  (written below as :class:`LoopMELoRALinear`).

in two settings:

* ``layer``   -- the whole adapted layer, frozen base + adapter, input requiring grad as
  inside a network: ``autograd.grad(layer(x), [x, *adapter params], g)``. The frozen
  base matmul dominates this number;
* ``adapter`` -- the adapter path alone (no base matmul), same gradients.

Every variant gets the same frozen base weight, dtype, device, thread count, input
and output gradient; every B is initialised non-zero. Each round times every variant
once (the order rotates from round to round) after warm-up rounds, and the table
shows the median over rounds. On CPU the default is one intra-op thread and the
CPU time of that thread (``--clock cpu``): on a small shared machine wall-clock time
mostly measures who else holds the cores (OpenMP with 2 threads was 10x slower
than 1 thread there, and erratic); ``--clock wall`` or ``--threads N`` change that,
and ``--json`` keeps both clocks. Ratios are medians of the per-round ratios (pairs
measured seconds apart, which cancels slow drifts of a shared machine); the
``[q1-q3]`` spread of MELoRA / PEFT LoRA(r) shows how noisy the pairing was.

Usage::

    .venv/bin/python benchmarks/adapter_speed.py               # full run, ~3-5 min on 2 CPU cores
    .venv/bin/python benchmarks/adapter_speed.py --quick       # ~30 s smoke run
    .venv/bin/python benchmarks/adapter_speed.py --device cuda --dtype bf16 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

try:
    from melora_tune.adapters.config import AdapterConfig
    from melora_tune.adapters.melora import MELoRALinear
except ImportError:  # run from a checkout without an installed package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from melora_tune.adapters.config import AdapterConfig
    from melora_tune.adapters.melora import MELoRALinear

from peft import LoraConfig
from peft import __version__ as peft_version
from peft.tuners.lora import Linear as PeftLoraLinear

# (d_in, d_out, tokens on CPU, tokens on CUDA). Fewer CPU tokens for the 4096 shapes
# keep the full run within a few minutes on 2 cores.
SHAPES = {
    "768x768": (768, 768, 1024, 16384),  # BERT-base attention projection
    "4096x4096": (4096, 4096, 256, 8192),  # Llama-7B attention projection
    "4096x11008": (4096, 11008, 128, 8192),  # Llama-7B MLP up/gate projection
}
QUICK_TOKENS = {"768x768": (256, 4096), "4096x4096": (64, 2048), "4096x11008": (32, 2048)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ADAPTER = "default"


# ---------------------------------------------------------------- the loop reference
class LoopMELoRALinear(nn.Module):
    """MELoRA as in the authors' research code: a Python loop over n mini-LoRAs.

    Mini i is a pair of ``nn.Linear`` (A_i: d_in/n -> r, B_i: r -> d_out/n) applied to
    input chunk i; the n outputs are concatenated. ``torch.split`` (one SplitBackward,
    not n padded slice gradients) keeps this reference as fast as a loop can be.
    """

    def __init__(self, base: nn.Linear, n: int, r: int, scale: float) -> None:
        super().__init__()
        self.base = base
        self.n, self.scale = n, scale
        self.mini_in = base.in_features // n
        self.mini_out = base.out_features // n
        kw = {"bias": False, "dtype": base.weight.dtype, "device": base.weight.device}
        self.minis = nn.ModuleList(
            nn.ModuleDict({"A": nn.Linear(self.mini_in, r, **kw), "B": nn.Linear(r, self.mini_out, **kw)})
            for _ in range(n)
        )

    def adapter_forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(x, self.mini_in, dim=-1)
        return torch.cat([m["B"](m["A"](c)) for m, c in zip(self.minis, chunks)], dim=-1) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.adapter_forward(x)

    @torch.no_grad()
    def copy_from(self, melora: MELoRALinear) -> "LoopMELoRALinear":
        for i, m in enumerate(self.minis):
            m["A"].weight.copy_(melora.melora_A[i])
            m["B"].weight.copy_(melora.melora_B[i])
        return self


# ---------------------------------------------------------------- variants
@dataclass
class Variant:
    key: str
    layer: Callable[[torch.Tensor], torch.Tensor]
    adapter: Callable[[torch.Tensor], torch.Tensor]
    params: list[torch.Tensor]
    times: dict[str, list[float]] = field(default_factory=dict)  # mode -> ms per round


def _nonzero_(t: torch.Tensor, fan_in: int) -> None:
    with torch.no_grad():
        bound = 1.0 / math.sqrt(fan_in)
        t.copy_(torch.empty(t.shape, dtype=torch.float32).uniform_(-bound, bound).to(t))


def make_melora(base: nn.Linear, n: int, r: int, alpha: float) -> tuple[Variant, MELoRALinear]:
    layer = MELoRALinear(base, AdapterConfig(method="melora", n=n, r=r, alpha=alpha))
    _nonzero_(layer.melora_B, fan_in=r)
    params = list(layer.trainable_parameters().values())
    return Variant(f"melora_n{n}", layer, lambda x: layer.adapter_forward(layer.dropout(x)), params), layer


def make_peft(base: nn.Linear, rank: int, alpha: float) -> Variant:
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=["base"])
    layer = PeftLoraLinear(base, ADAPTER, config=cfg, r=rank, lora_alpha=alpha, lora_dropout=0.0)
    layer.to(device=base.weight.device, dtype=base.weight.dtype)
    lora_a, lora_b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    dropout, scaling = layer.lora_dropout[ADAPTER], layer.scaling[ADAPTER]
    _nonzero_(lora_b.weight, fan_in=rank)

    def adapter(x: torch.Tensor) -> torch.Tensor:  # the vanilla-LoRA branch of PEFT's Linear.forward
        return lora_b(lora_a(dropout(x))) * scaling

    return Variant(f"peft_r{rank}", layer, adapter, [lora_a.weight, lora_b.weight])


def make_loop(base: nn.Linear, melora: MELoRALinear) -> Variant:
    layer = LoopMELoRALinear(base, melora.n, melora.r, melora.scale).copy_from(melora)
    params = [p for m in layer.minis for p in (m["A"].weight, m["B"].weight)]
    return Variant(f"loop_n{melora.n}", layer, layer.adapter_forward, params)


def check_equal(a: Variant, b: Variant, x: torch.Tensor, tol: float) -> float:
    with torch.no_grad():
        diff = (a.adapter(x).float() - b.adapter(x).float()).abs().max().item()
    if diff > tol:
        raise AssertionError(f"{a.key} and {b.key} disagree: max abs diff {diff:.3g} > {tol:g}")
    return diff


# ---------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(variants: list[Variant], mode: str, x: torch.Tensor, g: torch.Tensor, warmup: int, reps: int,
                clock: str) -> None:
    """Interleaved rounds: every variant once per round, order rotated, medians later.

    Records wall-clock ms in ``v.times[mode + ":wall"]``, this thread's CPU ms in
    ``v.times[mode + ":cpu"]``, and the one ``clock`` names (the one the table uses) in
    ``v.times[mode]``.
    """
    device = x.device
    for v in variants:
        v.times[mode], v.times[mode + ":wall"], v.times[mode + ":cpu"] = [], [], []
    for rnd in range(warmup + reps):
        shift = rnd % len(variants)
        for v in variants[shift:] + variants[:shift]:
            fn = v.layer if mode == "layer" else v.adapter
            inputs = [x, *v.params]
            sync(device)
            t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
            y = fn(x)
            grads = torch.autograd.grad(y, inputs, g)
            sync(device)
            wall, cpu = (time.perf_counter_ns() - t0) / 1e6, (time.thread_time_ns() - c0) / 1e6
            del y, grads
            if rnd >= warmup:
                v.times[mode + ":wall"].append(wall)
                v.times[mode + ":cpu"].append(cpu)
                v.times[mode].append(cpu if clock == "cpu" else wall)


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def paired(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den)]


# ---------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of d_inxd_out (default {','.join(SHAPES)})")
    p.add_argument("--ns", default="2,4,8,16", help="MELoRA n values (default 2,4,8,16)")
    p.add_argument("--r", type=int, default=2, help="per-mini rank r of MELoRA = rank of the equal-params LoRA (default 2)")
    p.add_argument("--tokens", default=None,
                   help="tokens per step: one int for every shape, or a comma list matching --shapes "
                        "(default CPU 1024,256,128; CUDA 16384,8192,8192)")
    p.add_argument("--modes", default="adapter,layer", help="adapter (adapter path alone), layer (whole layer), or both")
    p.add_argument("--warmup", type=int, default=None, help="warm-up rounds per mode (default 2, quick 1)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per mode (default: adapter 30, layer 10; quick 6/4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (timings synchronise the device)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="parameter/activation dtype (default fp32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads on CPU (default 1: OpenMP timings on a shared 2-core box are "
                        "erratic with >1 thread; every variant runs with the same count)")
    p.add_argument("--clock", default="auto", choices=("auto", "wall", "cpu"),
                   help="what the table reports: wall-clock time, or the CPU time of the timing thread, which "
                        "leaves out the time other processes hold the core (auto: cpu on a 1-thread CPU run, "
                        "else wall; both go to --json)")
    p.add_argument("--quick", action="store_true", help="small token counts and few rounds (~30 s smoke run)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write all timings and ratios to PATH")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but torch.cuda.is_available() is False")
    dtype = DTYPES[args.dtype]
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    ns = [int(v) for v in args.ns.split(",")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in ("adapter", "layer"):
            raise SystemExit(f"unknown mode {m!r}: use adapter, layer")
    r, alpha = args.r, 2.0 * args.r  # scale alpha/r = 2 for MELoRA; PEFT LoRA(R) gets alpha 2R (scale 2) too
    cuda = device.type == "cuda"
    if args.tokens is None:
        table = QUICK_TOKENS if args.quick else {k: v[2:] for k, v in SHAPES.items()}
        tokens = [table.get(s, (256, 4096))[1 if cuda else 0] for s in shapes]
    else:
        tokens = [int(t) for t in args.tokens.split(",")]
        tokens = tokens * len(shapes) if len(tokens) == 1 else tokens
        if len(tokens) != len(shapes):
            raise SystemExit(f"--tokens has {len(tokens)} values for {len(shapes)} shapes")
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    reps = {"adapter": 6 if args.quick else 30, "layer": 4 if args.quick else 10}
    if args.reps is not None:
        reps = {m: args.reps for m in reps}
    if device.type == "cpu":
        torch.set_num_threads(args.threads if args.threads is not None else 1)
    torch.manual_seed(args.seed)
    clock = args.clock
    if clock == "auto":
        clock = "cpu" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    if clock == "cpu" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("--clock cpu needs --device cpu and --threads 1 (thread CPU time misses other threads and the GPU)")
    tol = 1e-4 if dtype == torch.float32 else 5e-2

    where = torch.cuda.get_device_name(device) if cuda else (platform.processor() or platform.machine())
    print(f"# adapter_speed: torch {torch.__version__}, peft {peft_version}, {device} ({where}), {args.dtype}, "
          f"{torch.get_num_threads()} thread(s), {clock} clock; MELoRA per-mini r={r}, n in {ns}; fwd+bwd "
          f"(grads of input and adapter params); median over interleaved rounds "
          f"({', '.join(f'{m} {reps[m]}' for m in modes)}) after {warmup} warm-up")

    results: list[dict] = []
    t_start = time.perf_counter()
    for shape, T in zip(shapes, tokens):
        d_in, d_out = (int(v) for v in shape.lower().split("x"))
        base = nn.Linear(d_in, d_out, bias=False, device=device, dtype=dtype)
        base.requires_grad_(False)
        variants: list[Variant] = [make_peft(base, r, alpha)]
        groups = []  # (n, melora, peft_nr, loop)
        for n in ns:
            if d_in % n or d_out % n:
                print(f"# skip {shape} n={n}: n must divide d_in and d_out")
                continue
            mel, mel_layer = make_melora(base, n, r, alpha)
            loop = make_loop(base, mel_layer)
            peft_nr = next((v for v in variants if v.key == f"peft_r{n * r}"), None) or make_peft(base, n * r, 2.0 * n * r)
            for v in (mel, peft_nr, loop):
                if not any(v is w for w in variants):
                    variants.append(v)
            groups.append((n, mel, peft_nr, loop))
        x = torch.randn(1, T, d_in, device=device, dtype=dtype, requires_grad=True)
        g = torch.randn(1, T, d_out, device=device, dtype=dtype)
        for n, mel, _, loop in groups:
            check_equal(mel, loop, x[:, :64], tol)
        gc.collect()
        gc.disable()
        try:
            for mode in modes:
                time_rounds(variants, mode, x, g, warmup, reps[mode], clock)
        finally:
            gc.enable()
        peft_r = variants[0]
        for n, mel, peft_nr, loop in groups:
            for mode in modes:
                m, p1, pn, lp = (v.times[mode] for v in (mel, peft_r, peft_nr, loop))
                vs_r = paired(m, p1)
                results.append({
                    "shape": shape, "d_in": d_in, "d_out": d_out, "tokens": T, "n": n, "r": r, "mode": mode,
                    "ms": {"melora": median(m), "peft_lora_r": median(p1), "peft_lora_nr": median(pn), "loop": median(lp)},
                    "melora_over_peft_r": median(vs_r),
                    "melora_over_peft_r_q1q3": quartiles(vs_r),
                    "melora_over_peft_nr": median(paired(m, pn)),
                    "loop_over_melora": median(paired(lp, m)),
                    "raw_ms": {c: {"melora": mel.times[f"{mode}:{c}"], "peft_lora_r": peft_r.times[f"{mode}:{c}"],
                                   "peft_lora_nr": peft_nr.times[f"{mode}:{c}"], "loop": loop.times[f"{mode}:{c}"]}
                               for c in ("wall", "cpu")},
                })
        del variants, groups, base, x, g
        gc.collect()
    elapsed = time.perf_counter() - t_start

    titles = {"adapter": "(b) adapter path alone", "layer": "(a) whole layer: frozen base + adapter"}
    for mode in modes:
        rows = [res for res in results if res["mode"] == mode]
        print(f"\n## {titles[mode]}, fwd+bwd, median {clock} ms ({reps[mode]} rounds)")
        print(f"{'shape':>11} {'tokens':>6} {'n':>3} {'r':>2} | {'MELoRA':>8} {'LoRA(r)':>8} {'LoRA(nr)':>8} {'loop':>8} |"
              f" {'MEL/LoRA(r) [q1-q3]':>20} {'MEL/LoRA(nr)':>12} {'loop/MEL':>8}")
        for res in rows:
            ms, (q1, q3) = res["ms"], res["melora_over_peft_r_q1q3"]
            print(f"{res['shape']:>11} {res['tokens']:>6} {res['n']:>3} {res['r']:>2} |"
                  f" {ms['melora']:8.3f} {ms['peft_lora_r']:8.3f} {ms['peft_lora_nr']:8.3f} {ms['loop']:8.3f} |"
                  f" {res['melora_over_peft_r']:6.2f}x [{q1:4.2f}-{q3:4.2f}]"
                  f" {res['melora_over_peft_nr']:11.2f}x {res['loop_over_melora']:7.2f}x")

    print(f"\n# LoRA(r) = PEFT LoRA rank {r} (same params/FLOPs as MELoRA); LoRA(nr) = PEFT LoRA rank n*{r} "
          f"(same rank); loop = per-mini Python loop; {elapsed:.0f} s of timing")
    verdicts = []
    for mode in modes:
        rows = [res for res in results if res["mode"] == mode]
        if not rows:
            continue
        worst = max(rows, key=lambda res: res["melora_over_peft_r"])
        misses = [res for res in rows if res["melora_over_peft_r"] > 1.0]
        noisy = sum(res["melora_over_peft_r_q1q3"][0] <= 1.0 for res in misses)
        ok1 = not misses
        verdicts.append(ok1)
        q1, q3 = worst["melora_over_peft_r_q1q3"]
        note = f"; {noisy} of the {len(misses)} misses have q1 <= 1.0 (within the round-to-round spread)" if misses else ""
        print(f"GOAL {mode:>7}: MELoRA <= 1.0x PEFT LoRA(r): {'HELD' if ok1 else 'NOT MET'}: holds on "
              f"{len(rows) - len(misses)}/{len(rows)} (worst {worst['melora_over_peft_r']:.2f}x [{q1:.2f}-{q3:.2f}] "
              f"at {worst['shape']} n={worst['n']}{note})")
        n8 = [res for res in rows if res["n"] == 8]
        if n8:
            low = min(n8, key=lambda res: res["loop_over_melora"])
            held8 = sum(res["loop_over_melora"] >= 4.0 for res in n8)
            ok2 = held8 == len(n8)
            verdicts.append(ok2)
            print(f"GOAL {mode:>7}: MELoRA >= 4x faster than the loop at n=8: {'HELD' if ok2 else 'NOT MET'}: holds on "
                  f"{held8}/{len(n8)} (lowest {low['loop_over_melora']:.2f}x at {low['shape']})")
    print(f"GOALS: {'all held' if all(verdicts) else 'not all held'}")

    if args.json:
        payload = {
            "torch": torch.__version__, "peft": peft_version, "device": str(device), "device_name": where,
            "dtype": args.dtype, "threads": torch.get_num_threads(), "clock": clock, "r": r, "ns": ns, "warmup": warmup,
            "reps": reps, "quick": args.quick, "elapsed_s": elapsed, "results": results,
        }
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
