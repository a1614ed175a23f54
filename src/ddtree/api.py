"""The Python entry points: `load` an engine, or make a new random drafter for a target."""

from __future__ import annotations

import os
import sys

import torch

from .drafter import (
    Drafter, DrafterConfig, build_drafter, default_target_layer_ids, frequent_tokens, load_drafter, save_drafter,
)
from .engine import Engine, check_pair
from .errors import DDTreeError
from .loading import SMOLLM2_ALIAS, Target, load_target, resolve_config_dir
from .model import initialise

DEFAULT_TARGET = SMOLLM2_ALIAS
BUNDLED_DRAFTERS = {SMOLLM2_ALIAS: os.path.join(os.path.dirname(__file__), "drafters", "smollm2-135m-instruct")}
RANDOM_DRAFTER = "random"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise DDTreeError("--device cuda was asked for, but torch sees no CUDA device")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        chosen = None
    if chosen is None or chosen.type not in ("cpu", "cuda"):
        raise DDTreeError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise DDTreeError(f"--device {device}: torch sees {torch.cuda.device_count()} CUDA devices")
    return chosen


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise DDTreeError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def amx_available() -> bool:
    """Whether this CPU has AMX tiles, on which bfloat16 matrix products run far faster than float32's."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def pick_matmul_dtype(matmul_dtype: str | None, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The weights' dtype in the layers' matrix products. 'auto': bfloat16 for a float32 model on a CPU with
    AMX (`Decoder.use_bf16_products`), else the model's dtype, as is None."""
    if matmul_dtype is None:
        return dtype
    if matmul_dtype == "auto":
        return torch.bfloat16 if device.type == "cpu" and dtype == torch.float32 and amx_available() else dtype
    chosen = pick_dtype(matmul_dtype, device)
    if chosen != dtype and not (device.type == "cpu" and dtype == torch.float32 and chosen == torch.bfloat16):
        raise DDTreeError(f"matmul dtype {matmul_dtype} with dtype {str(dtype).removeprefix('torch.')}: only a float32 "
                          "model on the CPU takes bfloat16 products; elsewhere the products take the model's dtype")
    return chosen


def random_drafter(target: Target, num_layers: int = 1, block_size: int = 16, mask_token_id: int | None = None,
                   target_layer_ids: list[int] | None = None, seed: int = 0) -> Drafter:
    """A randomly initialised drafter shaped for `target` (the start of training, and a test fixture)."""
    if num_layers < 1:
        raise DDTreeError(f"a drafter needs at least one layer, got {num_layers}")
    if block_size < 2:
        raise DDTreeError(f"block size must be >= 2, got {block_size}")
    t = target.model.cfg
    rope = dict(getattr(target.hf_config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 10000.0})
    cfg = DrafterConfig(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_layers=num_layers,
        num_heads=t.num_heads,
        num_kv_heads=t.num_kv_heads,
        head_dim=t.head_dim,
        rms_norm_eps=t.rms_norm_eps,
        vocab_size=t.vocab_size,
        max_positions=t.max_positions + block_size,
        block_size=block_size,
        mask_token_id=default_mask_token(target) if mask_token_id is None else mask_token_id,
        target_layer_ids=target_layer_ids or default_target_layer_ids(t.num_layers, num_layers),
        num_target_layers=t.num_layers,
        rope_parameters=rope,
    )
    weight = target.model.embed_tokens.weight
    drafter = build_drafter(cfg, weight.device, weight.dtype)
    initialise(drafter, seed=seed)
    with torch.no_grad():  # its output goes through the target's LM head, which expects the target's final norm
        drafter.norm.weight.copy_(target.model.norm.weight)
    return drafter.eval()


def default_mask_token(target: Target) -> int:
    """The tokenizer's mask token, else its last special token that is not BOS/EOS/PAD/UNK, else the last id."""
    tok = target.tokenizer
    if getattr(tok, "mask_token_id", None) is not None:
        return tok.mask_token_id
    reserved = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id} | target.eos_token_ids
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    special = [i for i, token in decoder.items() if token.special and i not in reserved and i < target.model.cfg.vocab_size]
    return max(special) if special else target.model.cfg.vocab_size - 1


def bundled_drafter(target_spec: str, target_name: str) -> str:
    """The drafter bundled for this target, by alias or by the model's own name (a local copy of the
    SmolLM2 GGUF, say); 'random' where none is bundled."""
    name = target_name.lower()
    for alias, path in BUNDLED_DRAFTERS.items():
        if (target_spec == alias or name == alias or name.startswith(alias + ".")) and os.path.isdir(path):
            return path
    return RANDOM_DRAFTER


def load(target: str | None = None, drafter: str | None = None, device: str | None = None,
         dtype: str | torch.dtype | None = None, quiet: bool = False, cuda_graphs: bool = True,
         compile: bool = False, dummy_weights: bool = False, draft_vocab: int | None = None,
         matmul_dtype: str | None = "auto") -> Engine:
    """An engine for a target and its drafter.

    target: a Hugging Face model directory or Hub id ('Qwen/Qwen3-8B'), a .gguf file, or
    'smollm2-135m-instruct' (the default).
    drafter: a drafter directory or Hub id in the z-lab DFlash format ('z-lab/Qwen3-8B-DFlash-b16'),
    'random' for an untrained one, or None for the drafter bundled with the target (random where none
    is bundled, said on stderr).
    Hub ids are fetched into the Hugging Face cache, or found there offline (HF_HUB_OFFLINE=1).
    cuda_graphs: on CUDA, capture each decoding stage once as a CUDA graph and replay it (the fast path).
    compile: torch.compile the target's and the drafter's layers (`compile_layer_functions`).
    dummy_weights: random weights of the configs' shapes, made on the device (target and drafter may be
    directories holding only a config.json, or names of configs shipped with ddtree): for timing.
    draft_vocab: the drafter proposes only this many tokens, the most frequent in its training answers
    (`frequent_tokens`); None: the whole vocabulary. Output is unchanged.
    matmul_dtype: the weights' dtype in the layers' matrix products ('auto', a dtype name, or None: the model's
    dtype; `pick_matmul_dtype`). On a CPU with AMX, 'auto' keeps float32 activations, norms, attention and
    logits and gives the layers bfloat16 weights: a tree's rows cost about one row's. Output is then that of the
    target with bfloat16 products, which a differently shaped product may round differently at a near-tie.
    """
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    target_spec = target or DEFAULT_TARGET
    loaded = load_target(target_spec, dev, dt, dummy=dummy_weights)
    if drafter is None:
        drafter = bundled_drafter(target_spec, loaded.name)
    if drafter == RANDOM_DRAFTER:
        if not quiet:
            print("ddtree: using a randomly initialised drafter (no trained drafter given): expect little speedup",
                  file=sys.stderr)
        draft_model = random_drafter(loaded)
    elif dummy_weights:
        draft_model = load_drafter(resolve_config_dir(drafter, "drafter"), dev, dt, dummy=True)
    else:
        draft_model = load_drafter(drafter, dev, dt)
    if draft_vocab is not None:  # (an untrained drafter's text is noise too: any tokens will do)
        ids = frequent_tokens(draft_model, draft_vocab, loaded.model.cfg.vocab_size,
                              dummy=dummy_weights or drafter == RANDOM_DRAFTER)
        draft_model.restrict_vocabulary(ids, loaded.model.lm_head.weight)
    if pick_matmul_dtype(matmul_dtype, dev, dt) != dt:
        loaded.model.use_bf16_products()
        draft_model.use_bf16_products(loaded.model.lm_head.weight)
    if compile:
        loaded.model.compile_layers()
        draft_model.compile_layers()
    return Engine(loaded, draft_model, dev, dt, cuda_graphs)


def init_drafter(target: str, out: str, num_layers: int = 1, block_size: int = 16, mask_token_id: int | None = None,
                 target_layer_ids: list[int] | None = None, seed: int = 0) -> Drafter:
    """Writes a randomly initialised drafter for `target` to `out` in the published format."""
    loaded = load_target(target)
    drafter = random_drafter(loaded, num_layers, block_size, mask_token_id, target_layer_ids, seed)

    check_pair(loaded, drafter)
    save_drafter(drafter, out)
    return drafter
