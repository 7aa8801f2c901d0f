"""Will a trial fit? Its per-GPU (per-worker) memory, estimated from the trial config and the model's config alone.

The model is built on the meta device (``ModelSpec``), so this needs config.json, not weights, and takes
well under a second for a 7B model. Every part is reported on its own:

* model states, the way DeepSpeed's own estimators count them
  (``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs``,
  ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``), generalised to frozen weights:
  those assume every parameter is trained; here only the adapter (+ head) carries gradients and optimizer
  states, and with trainable == total ``model_states`` returns DeepSpeed's numbers exactly
  (tests/test_memory.py compares them);
* activations of micro_batch_size x max_length tokens through every layer (Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", s*b*h*(34 + 5*a*s/h) bytes a layer in
  16-bit), or with gradient checkpointing the layer inputs plus one layer's working set;
* the logits and what the loss makes of them; a fixed allowance for the CUDA context and ZeRO's buffers.

It is an estimate for refusing what cannot fit, not a promise that the rest does: the activation formula
is an upper bound for PEFT (a frozen linear layer keeps no input for a weight gradient) and for fused
attention kernels (which keep no s x s score matrices).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from melora_tune.adapters.accounting import ModelSpec, account
from melora_tune.adapters.inject import default_target_modules, find_head_modules, find_modules_to_save, linear_modules
from melora_tune.data.registry import num_labels_of
from melora_tune.errors import UsageError
from melora_tune.trial.config import TrialConfig
from melora_tune.trial.ds_config import bucket_size, check_offload

GIB = 2**30
# What a trial process holds on a GPU besides its tensors: the CUDA context and torch's kernels (about
# 0.3-0.6 GiB on current GPUs, seen by the driver but not by torch's allocator), cuBLAS workspaces, NCCL's
# communicator buffers and the caching allocator's fragmentation. A round allowance, not a measurement.
CUDA_CONTEXT_BYTES = 1 * GIB
# A CPU trial's worker process before its first tensor: Python with torch, transformers, DeepSpeed and Ray.
CPU_PROCESS_BYTES = 1 * GIB
# DeepSpeed's estimators multiply host memory by this (their additional_buffer_factor default); so do we.
BUFFER_FACTOR = 1.5
# Bytes per trainable parameter beyond its 16-bit weight (and, at ZeRO-1/2, 16-bit gradient): DeepSpeed's
# count of the fp32 gradient partition, fp32 master weight and Adam's m and v (4 each). Its ZeRO-3 estimator
# counts these 16 and no separate 16-bit gradient (gradients are reduce-scattered into the partition).
STATE_BYTES = 16
# bitsandbytes NF4 as the worker loads it (QLoRA: blocks of 64, double quantisation): 4-bit codes, an 8-bit absmax
# a block, and an fp32 scale per 256 absmax values.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# DeepSpeed's estimators assume each process loads the model in fp32 first; the worker loads it in the compute
# dtype (trial/worker.py: bf16 on GPU), which the estimate passes in instead.
LOAD_BYTES = 4
# DeepSpeed's and our count of the host memory needed while a 4-bit base loads: its 16-bit checkpoint.
NF4_LOAD_BYTES = 2


# ---- model states: DeepSpeed's accounting with frozen weights ---------------------------------------------

@dataclass(frozen=True)
class ModelStates:
    """Bytes of a model's weights, gradients and optimizer states: per GPU, and in host memory per node."""

    frozen: float  # frozen base weights on one GPU
    weights: float  # the trainable weights (compute dtype) on one GPU
    states: float  # their gradients and optimizer states on one GPU
    live: float  # ZeRO-3: the largest layer, gathered whole while it computes (and its gradient if trained)
    cpu: float  # host memory per node (loading, offloaded states), DeepSpeed's buffer factor included
    offloaded: float = 0.0  # of which offloaded states and weights, per node, before the buffer factor

    @property
    def gpu(self) -> float:
        return self.frozen + self.weights + self.states + self.live


def model_states(*, total_params: int, trainable_params: int, largest_layer_params: int, world_size: int, stage: int,
                 offload_optimizer: bool = False, offload_params: bool = False, workers_per_node: int | None = None,
                 frozen_bytes: float = 2.0, compute_bytes: int = 2, largest_layer_trainable: bool = True,
                 load_bytes: float = LOAD_BYTES, buffer_factor: float = BUFFER_FACTOR) -> ModelStates:
    """DeepSpeed's model-state estimate, for a model of which only ``trainable_params`` are trained.

    With trainable == total, 16-bit compute and all workers on one node (or any layout at ZeRO-3) this is
    exactly ``estimate_zero2/3_model_states_mem_needs`` (ZeRO-3 with zero_init=False: each worker loads the
    whole model, as ours do). Frozen weights take ``frozen_bytes`` each and no gradient or optimizer state.
    """
    n, t = world_size, trainable_params
    per_node = workers_per_node or n
    frozen_n = total_params - t
    cb = compute_bytes
    shard_w = n if stage == 3 else 1  # ZeRO-3 partitions the weights, frozen ones too
    frozen = 0.0 if offload_params else frozen_n * frozen_bytes / shard_w
    weights = 0.0 if offload_params else t * cb / shard_w
    if offload_optimizer:  # 16-bit gradients stream to the fp32 partition in host memory, bucket by bucket
        states = 0.0
    elif stage == 3:
        states = t * STATE_BYTES / n
    elif stage == 2:
        states = t * (cb + STATE_BYTES) / n
    elif stage == 1:
        states = t * cb + t * STATE_BYTES / n
    else:
        states = float(t * (cb + STATE_BYTES))
    live = largest_layer_params * (cb + (cb if largest_layer_trainable else 0)) if stage == 3 else 0.0
    offloaded = 0.0
    if offload_optimizer:
        offloaded += t * STATE_BYTES / (n if stage >= 1 else 1)
    if offload_params:
        offloaded += (frozen_n * frozen_bytes + t * cb) / shard_w
    # every worker first loads the whole base model; steady state, each holds its share of what is offloaded
    cpu = buffer_factor * max(load_bytes * total_params * per_node, offloaded * per_node)
    return ModelStates(frozen=frozen, weights=weights, states=states, live=live, cpu=cpu, offloaded=offloaded * per_node)


# ---- the model's facts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs to know about a model and an adapter on it, from the meta-device model."""

    name: str
    task_type: str
    total_params: int
    adapter_params: int
    head_params: int
    largest_layer_params: int  # the module with the most parameters of its own (what ZeRO-3 gathers at once)
    largest_layer_trainable: bool
    quantizable_params: int  # weights of the linear layers NF4 would quantize (not heads, not output embeddings)
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    gated_mlp: bool  # SwiGLU-style MLP (gate and up projections): Llama, Mistral, Qwen
    vocab_size: int
    logits_width: int  # vocab for causal LM, classes for classification
    adapted_inputs_per_layer: float  # sum of the adapted layers' input widths, per transformer layer

    @property
    def trainable_params(self) -> int:
        return self.adapter_params + self.head_params


def _shape_facts(spec) -> dict[str, Any]:
    """The adapter-independent facts of a ModelSpec, computed once per spec (its model never changes)."""
    cached = getattr(spec, "_memory_facts", None)
    if cached is not None:
        return cached

    model = spec.model
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden = getattr(config, "hidden_size", None)
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not all(isinstance(v, int) and v > 0 for v in (hidden, layers, heads)):
        raise ValueError(f"the config of {spec.name} has no hidden_size/num_hidden_layers/num_attention_heads")
    largest_name, largest = "", 0
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own > largest:
            largest_name, largest = name, own
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = linear_modules(model)
    facts = {
        "total_params": spec.total_params(),
        "largest_name": largest_name,
        "largest_layer_params": largest,
        "linears": {name: mod.weight.numel() for name, mod in linears.items() if mod is not output},
        "hidden_size": hidden,
        "num_layers": layers,
        "num_heads": heads,
        "num_kv_heads": getattr(config, "num_key_value_heads", None) or heads,
        "intermediate_size": getattr(config, "intermediate_size", None) or 4 * hidden,
        "gated_mlp": any(name.endswith(("gate_proj", "gate_up_proj")) for name in linears),
        "vocab_size": getattr(config, "vocab_size", 0) or 0,
        "num_labels": getattr(model.config, "num_labels", 2),
    }
    spec._memory_facts = facts
    return facts


def model_facts(spec, adapter_cfg, task_type: str) -> ModelFacts:
    """The facts of ``adapter_cfg`` (target_modules and modules_to_save resolved) on ``spec``'s model."""
    shape = _shape_facts(spec)
    acct = account(spec, adapter_cfg)
    heads = find_modules_to_save(spec.model, list(adapter_cfg.modules_to_save))

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in heads)

    adapted = spec.targets(adapter_cfg.target_modules)
    return ModelFacts(
        name=spec.name,
        task_type=task_type,
        total_params=shape["total_params"],
        adapter_params=acct["adapter_params"],
        head_params=acct["head_params"],
        largest_layer_params=shape["largest_layer_params"],
        largest_layer_trainable=in_head(shape["largest_name"]),
        quantizable_params=sum(n for name, n in shape["linears"].items() if not in_head(name)),
        hidden_size=shape["hidden_size"],
        num_layers=shape["num_layers"],
        num_heads=shape["num_heads"],
        num_kv_heads=shape["num_kv_heads"],
        intermediate_size=shape["intermediate_size"],
        gated_mlp=shape["gated_mlp"],
        vocab_size=shape["vocab_size"],
        logits_width=shape["vocab_size"] if task_type == "causal_lm" else shape["num_labels"],
        adapted_inputs_per_layer=sum(s.d_in for s in adapted) / shape["num_layers"],
    )


def trial_facts(cfg: TrialConfig, spec=None) -> ModelFacts:
    """``model_facts`` for a trial config, resolving its default targets and head as ``prepare_trial`` does."""
    num_labels = num_labels_of(cfg.task) if cfg.task_type == "seq_cls" else None
    if spec is None:
        spec = ModelSpec.from_pretrained(cfg.model, task=cfg.task_type, num_labels=num_labels)
    adapter = cfg.adapter
    targets = adapter.target_modules or default_target_modules(spec.model)
    heads = adapter.modules_to_save if adapter.modules_to_save is not None else find_head_modules(spec.model, cfg.task_type, num_labels)
    resolved = adapter.model_copy(update={"target_modules": list(targets), "modules_to_save": list(heads)})
    return model_facts(spec, resolved.adapter_config(), cfg.task_type)


# ---- activations -----------------------------------------------------------------------------------------

def layer_activation_bytes(facts: ModelFacts, tokens: int, micro_batch: int) -> float:
    """One transformer layer's activations kept for backward, in 16-bit (Korthikanti et al. 2022, eq. 1).

    s*b*h*(34 + 5*a*s/h): attention 11 sbh + 5 a s^2 b (scores, softmax, its dropout mask), two layer norms
    4 sbh, the MLP 19 sbh for the paper's 4h GELU MLP. The MLP term follows the model's intermediate size:
    3 + 4*i/h (19 at i = 4h); a gated MLP keeps gate, up, activation and product: 2 + 8*i/h.
    """
    s, b, h, a, i = tokens, micro_batch, facts.hidden_size, facts.num_heads, facts.intermediate_size
    mlp = (2 + 8 * i / h) if facts.gated_mlp else (3 + 4 * i / h)
    return s * b * h * (11 + 4 + mlp) + 5 * a * s * s * b


def activation_bytes(facts: ModelFacts, *, tokens: int, micro_batch: int, compute_bytes: int, checkpointing: bool,
                     dropout: float = 0.0) -> float:
    """Activations of one micro-batch through all layers (scaled from 16-bit to the compute dtype)."""
    scale = compute_bytes / 2
    per_layer = layer_activation_bytes(facts, tokens, micro_batch) * scale
    if dropout > 0:  # an adapter's dropout keeps its dropped input (for A's gradient) and a 1-byte mask
        per_layer += tokens * micro_batch * facts.adapted_inputs_per_layer * (compute_bytes + 1)
    if checkpointing:  # each layer's input (s*b*h in the compute dtype) + one layer recomputed at a time
        return facts.num_layers * tokens * micro_batch * facts.hidden_size * compute_bytes + per_layer
    return facts.num_layers * per_layer


def logits_bytes(facts: ModelFacts, *, tokens: int, micro_batch: int, compute_bytes: int) -> float:
    """The logits in the compute dtype, plus the loss's fp32 copy and its fp32 log-softmax (transformers'
    causal-LM loss upcasts before cross-entropy): 32k-vocabulary Llama logits outweigh a layer's activations."""
    rows = tokens * micro_batch if facts.task_type == "causal_lm" else micro_batch
    return rows * facts.logits_width * (compute_bytes + 4 + 4)


# ---- the estimate -------------------------------------------------------------------------------------------

def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


@dataclass(frozen=True)
class MemoryEstimate:
    """Memory of one trial worker (per GPU, or per CPU worker process) and host memory per node."""

    device: str  # "gpu" | "cpu"
    components: dict[str, int]  # part -> bytes per worker, in the order estimate() lists them
    per_worker: int
    cpu_per_node: int  # host memory of a node running all of this trial's workers
    settings: dict[str, Any]  # what the estimate assumed
    facts: ModelFacts = field(repr=False, compare=False)

    def largest(self) -> tuple[str, int]:
        return max(self.components.items(), key=lambda kv: kv[1])

    def parts(self, minimum: float = 0.005 * GIB) -> str:
        """'activations 15.20, frozen weights 12.55, ...': the parts in GiB, largest first."""
        shown = sorted(((k, v) for k, v in self.components.items() if v >= minimum), key=lambda kv: -kv[1])
        return ", ".join(f"{k} {gib(v)}" for k, v in shown)

    def assumed(self) -> str:
        s = self.settings
        offload = [w for w, on in (("optimizer", s["offload_optimizer"]), ("params", s["offload_params"])) if on]
        return (f"{s['precision']}, ZeRO-{s['zero_stage']} over {s['num_workers']} worker(s), micro batch "
                f"{s['micro_batch_size']} x {s['max_length']} tokens, "
                f"{'gradient checkpointing' if s['gradient_checkpointing'] else 'no gradient checkpointing'}, "
                f"{'offload ' + ' + '.join(offload) if offload else 'no offload'}"
                + (", NF4 base" if s["quantization"] == "nf4" else "")
                + f"; {s['trainable_params']:,} trainable of {s['total_params']:,} params")

    def lines(self) -> list[str]:
        where, host = (("per GPU", "host ~{} GiB per node") if self.device == "gpu" else
                       ("per worker process", "~{} GiB for all the trial's workers"))
        return [
            f"~{gib(self.per_worker)} GiB {where} ({self.parts()}); {host.format(gib(self.cpu_per_node))}",
            f"assumes {self.assumed()}",
        ]

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "per_worker_bytes": self.per_worker, "cpu_per_node_bytes": self.cpu_per_node,
                "components_bytes": dict(self.components), "settings": dict(self.settings)}


def estimate(cfg: TrialConfig, spec=None, *, facts: ModelFacts | None = None, on_gpu: bool | None = None,
             keeps_weights: bool = False) -> MemoryEstimate:
    """The memory of one worker of this trial. ``facts`` (or ``spec``, a ModelSpec) avoids rebuilding the
    meta-device model; ``keeps_weights``: the trial process also keeps a host copy of the base weights
    between trials (``trial.warm``: one-worker trials of a search)."""
    t = cfg.training
    check_offload(t)
    facts = facts or trial_facts(cfg, spec)
    on_gpu = cfg.resources.use_gpu if on_gpu is None else on_gpu
    precision = cfg.precision_on(on_gpu)
    cb = 2 if precision == "bf16" else 4
    n = cfg.resources.num_workers
    stage = t.zero_stage
    total, trainable = facts.total_params, facts.trainable_params
    frozen_total = total - trainable
    frozen_bytes: float = cb
    load_bytes: float = cb  # the worker's from_pretrained dtype
    if t.quantization == "nf4":  # quantized linears at NF4, everything else frozen (embeddings, norms) at 16-bit
        quantized = min(facts.quantizable_params, frozen_total)
        frozen_bytes = (quantized * NF4_BYTES + (frozen_total - quantized) * cb) / max(frozen_total, 1)
        load_bytes = NF4_LOAD_BYTES
    ms = model_states(total_params=total, trainable_params=trainable, largest_layer_params=facts.largest_layer_params,
                      world_size=n, stage=stage, offload_optimizer=t.offload_optimizer, offload_params=t.offload_params,
                      frozen_bytes=frozen_bytes, compute_bytes=cb, largest_layer_trainable=facts.largest_layer_trainable,
                      load_bytes=load_bytes)
    acts = activation_bytes(facts, tokens=t.max_length, micro_batch=t.micro_batch_size, compute_bytes=cb,
                            checkpointing=t.gradient_checkpointing, dropout=cfg.adapter.dropout)
    logits = logits_bytes(facts, tokens=t.max_length, micro_batch=t.micro_batch_size, compute_bytes=cb)
    # ZeRO's reduce bucket (double-buffered when communication overlaps, on GPU) and ZeRO-3's prefetch bucket
    buckets = 0 if stage == 0 else bucket_size(trainable) * cb * ((2 if on_gpu else 1) + (1 if stage == 3 else 0))
    components = {
        "frozen weights": ms.frozen,
        "trainable weights": ms.weights,
        "gradients + optimizer states": ms.states,
        "ZeRO-3 gathered layer": ms.live,
        "activations": acts,
        "logits": logits,
        "ZeRO buffers": buckets,
        ("CUDA context" if on_gpu else "process baseline"): CUDA_CONTEXT_BYTES if on_gpu else CPU_PROCESS_BYTES,
    }
    components = {k: int(v) for k, v in components.items()}
    per_worker = sum(components.values())
    warm_copy = load_bytes * total if keeps_weights else 0
    if on_gpu:
        cpu = ms.cpu + warm_copy
    else:  # all of it is host memory: the workers, what they "offload to the CPU", or the fp32 load if larger
        cpu = max(per_worker * n + ms.offloaded, (load_bytes * total + CPU_PROCESS_BYTES) * n) + warm_copy
    settings = {
        "model": facts.name, "method": cfg.adapter.method, "precision": precision, "zero_stage": stage,
        "num_workers": n, "offload_optimizer": t.offload_optimizer, "offload_params": t.offload_params,
        "gradient_checkpointing": t.gradient_checkpointing, "quantization": t.quantization,
        "micro_batch_size": t.micro_batch_size, "max_length": t.max_length, "grad_accum": t.grad_accum,
        "trainable_params": trainable, "total_params": total, "keeps_weights": keeps_weights,
    }
    return MemoryEstimate(device="gpu" if on_gpu else "cpu", components=components, per_worker=per_worker,
                          cpu_per_node=int(cpu), settings=settings, facts=facts)


# ---- the GPUs, and the refusal ------------------------------------------------------------------------------

def measure_gpu() -> int | None:
    """Total memory of this machine's GPU 0, or None without CUDA. Asks NVML first, which creates no CUDA
    context in the calling process (a search driver would otherwise hold one on the GPU its trials use)."""
    try:
        import pynvml  # optional: nvidia-ml-py, GPU machines

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001  (no NVML library, no driver, no GPU: try torch)
        pass
    import torch  # heavy: torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.get_device_properties(0).total_memory)


def gpu_memory(cfg: TrialConfig) -> tuple[int | None, str]:
    """(bytes of one GPU, where that number comes from), or (None, why it is unknown)."""
    if cfg.resources.gpu_memory_gb is not None:
        return int(cfg.resources.gpu_memory_gb * GIB), "resources.gpu_memory_gb"
    measured = measure_gpu()
    if measured is not None:
        return measured, "this machine's GPU 0"
    return None, "no CUDA GPU on this machine to measure: set resources.gpu_memory_gb to check"


def worker_share(cfg: TrialConfig, gpu_bytes: int) -> int:
    """A worker's part of a GPU: gpus_per_worker 0.5 packs two workers on one, each with half its memory."""
    return int(gpu_bytes * min(cfg.resources.gpus_per_worker, 1.0))


def _fixes(cfg: TrialConfig) -> list[dict[str, Any]]:
    """The changes that lower a worker's memory, cheapest first: each alone, then piled up in the same order."""
    t, n = cfg.training, cfg.resources.num_workers
    zero3 = {"training.zero_stage": 3} if t.zero_stage < 3 else {}
    offload = {} if t.offload_optimizer else {"training.offload_optimizer": True, **({"training.zero_stage": 2} if t.zero_stage == 0 else {})}
    ckpt = {} if t.gradient_checkpointing else {"training.gradient_checkpointing": True}
    micros = []  # the same global batch in more, smaller micro-batches
    micro = t.micro_batch_size // 2
    while micro >= 1:
        micros.append({"training.micro_batch_size": micro, "training.grad_accum": t.grad_accum * t.micro_batch_size // micro})
        micro //= 2

    def more_workers(accum: int) -> list[dict[str, Any]]:  # ZeRO-3 shards everything, frozen weights too
        out = []
        for k in (2, 4, 8):
            fix: dict[str, Any] = {"resources.num_workers": n * k, "training.zero_stage": 3}
            if accum % k == 0:
                fix["training.grad_accum"] = accum // k  # keeps the global batch
            if fix.get("training.grad_accum") == t.grad_accum and accum == t.grad_accum:
                del fix["training.grad_accum"]  # unchanged
            out.append(fix)
        return out

    singles = [f for f in (zero3, offload, ckpt) if f] + micros + more_workers(t.grad_accum)
    piled, acc = [], {}
    for f in (zero3, offload, ckpt):
        if f:
            acc = {**acc, **f}
            piled.append(acc)
    for f in micros:
        piled.append({**acc, **f})
    smallest = micros[-1] if micros else {}
    for f in more_workers(smallest.get("training.grad_accum", t.grad_accum)):
        piled.append({**acc, **smallest, **f})
    out: list[dict[str, Any]] = []
    for f in singles + piled:
        if f not in out:
            out.append(f)
    return out


def _setting(changes: dict[str, Any]) -> str:
    def show(v: Any) -> str:
        return str(v).lower() if isinstance(v, bool) else str(v)

    return ", ".join(f"{k}: {show(v)}" for k, v in changes.items())


def check_fits(cfg: TrialConfig, est: MemoryEstimate, gpu_bytes: int, *, what: str = "trial") -> None:
    """Raise a one-line UsageError when a worker of ``cfg`` (estimated as ``est``) cannot fit its GPU share,
    naming the first change that the estimate says fits: ZeRO-3, optimizer offload, gradient checkpointing,
    smaller micro-batches (same global batch), more workers; or, when none does, the largest part."""
    capacity = worker_share(cfg, gpu_bytes)
    if est.per_worker <= capacity:
        return
    have = (f"the GPUs have {gib(capacity)} GiB" if cfg.resources.gpus_per_worker >= 1 else
            f"a worker's share ({cfg.resources.gpus_per_worker:g} of a {gib(gpu_bytes)} GiB GPU) is {gib(capacity)} GiB")
    head = f"{what} needs ~{gib(est.per_worker)} GiB per GPU ({est.parts()}), {have}"
    best: MemoryEstimate | None = None
    for changes in _fixes(cfg):
        try:
            changed = cfg.with_overrides(changes)
            trial = estimate(changed, facts=est.facts, on_gpu=est.device == "gpu", keeps_weights=est.settings["keeps_weights"])
        except UsageError:
            continue
        if trial.per_worker <= capacity:
            raise UsageError(f"{head}: set {_setting(changes)} (~{gib(trial.per_worker)} GiB)")
        if best is None or trial.per_worker < best.per_worker:
            best = trial
    best = best or est
    part, size = best.largest()
    remedy = {
        "activations": "shorten training.max_length",
        "logits": "shorten training.max_length",
        "frozen weights": "set training.quantization: nf4 or training.offload_params: true with ZeRO-3",
    }.get(part)
    raise UsageError(f"{head}, and no change tried fits (ZeRO-3, optimizer offload, gradient checkpointing, micro batch 1, "
                     f"more workers: at best ~{gib(best.per_worker)} GiB, most of it {part} {gib(size)}): "
                     + (f"{remedy}, or " if remedy else "") + "use GPUs with more memory")
