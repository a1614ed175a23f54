"""The DFlash block-diffusion drafter, loadable from and savable to the published z-lab format.

The drafter sees a block [bonus, mask, mask, ...] embedded with the target's embedding. Context
comes from the target: the outputs of several target layers for every committed token, fused by
`fc` and `hidden_norm`, enter every draft layer as extra keys and values placed before the
block's own. Block attention is not causal, so one pass gives a distribution for every block
position. The final norm's output goes through the target's LM head.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from .checkpoints import load_checkpoint
from .errors import DDTreeError
from .hub import local_model_dir
from .model import (
    MLP, KVCache, LayerKV, RMSNorm, Rotary, apply_rotary, attention, attention_bias, compile_layer_functions, keep,
    initialise, rope_inverse_frequencies, use_bf16_products,
)

WEIGHTS_NAME = "model.safetensors"
TOKEN_COUNTS_NAME = "token_counts.json"  # how often each token occurred in the training answers (train-drafter)
# Published scalars that scale the drafter's input embeddings and its logits, with their neutral values.
SCALE_FIELDS = {"input_embedding_scale": 1.0, "output_multiplier": 1.0, "final_logit_softcapping": None}


def default_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The published default: one drafter layer reads the middle layer, else L layers spread over 1..N-3."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    first, last = 1, num_target_layers - 3
    step = (last - first) / (num_draft_layers - 1)
    return [int(round(first + i * step)) for i in range(num_draft_layers)]


@dataclass
class DrafterConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    max_positions: int
    block_size: int
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int | None  # None when the config does not say
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    input_embedding_scale: float = 1.0  # multiplies the block's (target) embeddings
    output_multiplier: float = 1.0  # multiplies the logits the target's head makes of the drafter's states
    final_logit_softcapping: float | None = None  # then cap * tanh(logits / cap)

    @classmethod
    def from_json(cls, raw: dict) -> "DrafterConfig":
        """Parses a z-lab config.json (a Qwen3 config with DFlash fields). Fields are read as z-lab's
        DFlashDraftModel reads them (z-lab/dflash, dflash/model.py and dflash/model_mlx.py; its test
        fixtures tests/fixtures/dflash2-config.json and assistant-config.json show newer configs): the
        DFlash fields from dflash_config, else from the top level.

        Run as published: block_size (required here; z-lab's code falls back to 16), mask_token_id,
        target_layer_ids (else the default rule from num_target_layers), the Qwen3 shape fields
        (hidden_size, intermediate_size, num_hidden_layers, heads, head_dim, rms_norm_eps, vocab_size,
        max_position_embeddings), rope_theta / rope_parameters / rope_scaling (every RoPE type
        transformers computes but 'dynamic'), input_embedding_scale, output_multiplier and
        final_logit_softcapping (off unless > 0).
        Refused, as they change what the drafter computes: architectures other than DFlashDraftModel
        (DFlash2DraftModel's convolutions and candidate selector, MuseGlimmerAssistantModel), any layer
        that is not 'full_attention' in layer_types (as given, or as transformers derives it from
        use_sliding_window, sliding_window and max_window_layers: z-lab's sliding layers are windowed and
        causal), is_causal true, attention_bias true, hidden_act other than silu.
        Without effect on drafting, so accepted whatever their value: attention_dropout (z-lab applies it
        in training only), sliding_window and use_sliding_window where no layer slides,
        tie_word_embeddings, token ids, dtype, use_cache, initializer_range.
        """
        from transformers import Qwen3Config

        block_size = dflash_value(raw, "block_size")
        if block_size is None:
            raise DDTreeError("drafter config has no block_size (top level or in dflash_config)")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
            raise DDTreeError(f"drafter config: block_size must be a whole number >= 2, got {block_size!r}")
        hf = Qwen3Config(**{k: v for k, v in raw.items() if k not in ("dflash_config", "architectures")})
        refuse_unsupported(raw, hf)
        num_layers = hf.num_hidden_layers
        num_target_layers = raw.get("num_target_layers")
        layer_ids = dflash_value(raw, "target_layer_ids")
        if layer_ids is None:
            if num_target_layers is None:
                raise DDTreeError("drafter config has neither target_layer_ids nor num_target_layers")
            layer_ids = default_target_layer_ids(num_target_layers, num_layers)
        mask_id = dflash_value(raw, "mask_token_id")
        if mask_id is None:
            raise DDTreeError("drafter config has no mask_token_id (dflash_config.mask_token_id)")
        rope_inverse_frequencies(hf, hf.head_dim or hf.hidden_size // hf.num_attention_heads)  # refuses what we cannot run
        return cls(
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=num_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=hf.num_key_value_heads,
            head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            rms_norm_eps=hf.rms_norm_eps,
            vocab_size=hf.vocab_size,
            max_positions=hf.max_position_embeddings,
            block_size=int(block_size),
            mask_token_id=int(mask_id),
            target_layer_ids=[int(i) for i in layer_ids],
            num_target_layers=None if num_target_layers is None else int(num_target_layers),
            rope_parameters=dict(hf.rope_parameters),
            **published_scales(raw),
        )

    def to_json(self) -> dict:
        return {
            "architectures": ["DFlashDraftModel"],
            "model_type": "qwen3",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_positions,
            "rope_theta": self.rope_parameters.get("rope_theta", 10000.0),
            "rope_parameters": self.rope_parameters,
            "hidden_act": "silu",
            "attention_bias": False,
            "tie_word_embeddings": False,
            "block_size": self.block_size,
            "num_target_layers": self.num_target_layers,
            "dflash_config": {"mask_token_id": self.mask_token_id, "target_layer_ids": self.target_layer_ids}
            | {name: getattr(self, name) for name, neutral in SCALE_FIELDS.items() if getattr(self, name) != neutral},
        }

    def hf_config(self):
        from transformers import Qwen3Config

        return Qwen3Config(**{k: v for k, v in self.to_json().items() if k not in ("dflash_config", "architectures")})


def dflash_value(raw: dict, name: str, default=None):
    """A DFlash field as z-lab's code reads it: from dflash_config, else from the top level."""
    value = (raw.get("dflash_config") or {}).get(name)
    return raw.get(name, default) if value is None else value


def refuse_unsupported(raw: dict, hf) -> None:
    """One line for the first published field whose value makes z-lab's drafter compute what ours does not."""
    architectures = raw.get("architectures") or ["DFlashDraftModel"]
    if architectures != ["DFlashDraftModel"]:
        raise DDTreeError(f"drafter config: architectures is {architectures}; only DFlashDraftModel is supported "
                          "(DFlash2's convolutions and candidate selector are not)")
    for index, kind in enumerate(hf.layer_types):
        if kind != "full_attention":
            raise DDTreeError(f"drafter config: layer_types has {kind!r} (layer {index}); only full-attention "
                              "drafter layers are supported, not sliding-window ones")
    if raw.get("is_causal"):
        raise DDTreeError("drafter config: is_causal is true; causal block attention is not supported")
    if hf.attention_bias:
        raise DDTreeError("drafter config: attention_bias is true; attention projections with biases are not supported")
    if hf.hidden_act != "silu":
        raise DDTreeError(f"drafter config: hidden_act is {hf.hidden_act!r}; only 'silu' is supported")


def published_scales(raw: dict) -> dict:
    """The SCALE_FIELDS of a config, each a finite number (the softcap off unless positive, as in z-lab's code)."""
    scales = {}
    for name, neutral in SCALE_FIELDS.items():
        value = dflash_value(raw, name, neutral)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
            raise DDTreeError(f"drafter config: {name} must be a finite number, got {value!r}")
        scales[name] = None if value is None else float(value)
    if scales["final_logit_softcapping"] is not None and scales["final_logit_softcapping"] <= 0:
        scales["final_logit_softcapping"] = None
    return scales


class DraftAttention(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def heads(self, x, proj, count, norm=None):
        """[B, T, hidden] -> [B, T, count, head_dim], with the per-head norm where given."""
        out = proj(x).view(x.shape[0], x.shape[1], count, self.head_dim)
        return norm(out) if norm is not None else out

    def keys_values(self, x, cos, sin):
        k = apply_rotary(self.heads(x, self.k_proj, self.num_kv_heads, self.k_norm), cos, sin)
        return k.transpose(1, 2), self.heads(x, self.v_proj, self.num_kv_heads).transpose(1, 2)

    def project(self, block, context, rope_block, rope_context):
        """block: [B, S, H] normed block states; context: [B, C, H] fused context rows (new rows only with
        a cache). Queries of the block, and keys and values (stacked, [2, B, kv_heads, C + S, D]) of the
        context rows then the block rows."""
        q = apply_rotary(self.heads(block, self.q_proj, self.num_heads, self.q_norm), *rope_block)
        k_ctx, v_ctx = self.keys_values(context, *rope_context)
        k_blk, v_blk = self.keys_values(block, *rope_block)
        return q, torch.stack([torch.cat([k_ctx, k_blk], dim=2), torch.cat([v_ctx, v_blk], dim=2)])


class DraftLayer(nn.Module):
    """Like the target's layers: `project` (the cache write included) and `finish` are pure functions
    around the attention, which `Drafter.compile_layers` compiles."""

    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def project(self, x, context, rope_block, rope_context, cache: LayerKV | None = None,
                slots: torch.Tensor | None = None):
        """Queries, and keys and values (None once stored in `cache`: see `model.keep`)."""
        q, kv = self.self_attn.project(self.input_layernorm(x), context, rope_block, rope_context)
        return q, keep(kv, cache, slots)

    def finish(self, x, attended):
        x = x + self.self_attn.o_proj(attended)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward(self, x, context, rope_block, rope_context, bias, cache: LayerKV | None, slots):
        q, kv = self.project(x, context, rope_block, rope_context, cache, slots)
        k, v = cache.read(bias.shape[-1]) if cache is not None else kv
        return self.finish(x, attention(q, k, v, bias))


class Drafter(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        num_features = len(cfg.target_layer_ids)
        self.fc = nn.Linear(num_features * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        inv_freq, scaling = rope_inverse_frequencies(cfg.hf_config(), cfg.head_dim)
        self.rotary = Rotary(inv_freq, scaling, cfg.max_positions)
        self.source: str | None = None  # the directory it was loaded from
        # the tokens it may propose, and the target's LM-head rows of them (None: the whole vocabulary)
        self.vocabulary: torch.Tensor | None = None
        self.head: torch.Tensor | None = None

    def restrict_vocabulary(self, token_ids: torch.Tensor, lm_head_weight: torch.Tensor) -> None:
        """Proposes only `token_ids` from now on: its logits are the target's head over those rows alone
        (a smaller GEMM and top-k every draft). The verify still scores every token, so output is unchanged;
        a token outside the set is never drafted, and the tree stops short of it."""
        ids = torch.unique(token_ids.to(lm_head_weight.device))
        self.vocabulary, self.head = ids, lm_head_weight.detach()[ids].contiguous()

    def drafted_vocab_size(self, vocab_size: int) -> int:
        return vocab_size if self.vocabulary is None else len(self.vocabulary)

    def use_bf16_products(self, lm_head_weight: torch.Tensor) -> None:
        """Its layers' matrix products with bfloat16 weights (`BF16Linear`), as the target's, and its logits
        from a bfloat16 copy of the head rows it proposes from: a draft only proposes, so its logits need not
        be the target's exact ones. `fc` keeps its weight, whose dtype the drafter cache takes."""
        use_bf16_products(self.layers)
        self.head = (lm_head_weight if self.head is None else self.head).detach().to(torch.bfloat16)

    def logits(self, model, hidden: torch.Tensor) -> torch.Tensor:
        """float32 logits of the block states `hidden` over the tokens it may propose (restricted, index i
        is token `vocabulary[i]`)."""
        if self.head is not None and self.head.dtype != hidden.dtype:  # (a bfloat16 copy: `use_bf16_products`)
            return self.scale_logits(F.linear(hidden.to(self.head.dtype), self.head).float())
        return self.scale_logits(model.logits(hidden, self.head))

    def compile_layers(self) -> None:
        """torch.compile every layer's `project` and `finish`, as the target's (`compile_layer_functions`)."""
        compile_layer_functions(self.layers, ("project", "finish"))

    def new_cache(self, context: int, batch: int = 1) -> KVCache:
        """A cache laid out as [block scratch | context row of position p at slot block + p | one block of spare]:
        the block's own rows are rewritten every round, context rows stay, and a round may write a whole
        block of context rows of which only the accepted ones are ever attended."""
        cfg, weight = self.cfg, self.fc.weight
        capacity = context + 2 * cfg.block_size
        return KVCache.empty(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim, weight.device, weight.dtype)

    def forward(
        self,
        block_embeds: torch.Tensor,
        block_positions: torch.Tensor,
        context_features: torch.Tensor,
        context_positions: torch.Tensor,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns the final-normed states of the block [B, S, H]; logits come from the target's LM head.

        block_embeds: [B, S, H] (target embedding of the block ids). context_features: the target's
        tapped layer outputs [B, C, len(target_layer_ids) * H]. `mask` (bool [B or 1, 1, S, L]) says
        what each block query sees: without a cache the C context rows then the S block rows (None =
        everything); with a cache, cache slots 0..L after the C context rows and then the S block
        rows have been written at `slots` (a tensor of C + S slot indices, or [B, C + S] of each sequence's own).
        """
        if slots is not None and slots.dim() == 1:  # (one form for the compiled layers, as the target's)
            slots = slots[None]
        context = self.hidden_norm(self.fc(context_features))
        dtype = block_embeds.dtype
        rope_block = self.rotary(block_positions, dtype)
        rope_context = self.rotary(context_positions, dtype)
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        bias = attention_bias(mask, groups, dtype) if mask is not None else None
        scale = self.cfg.input_embedding_scale
        x = block_embeds if scale == 1.0 else block_embeds * scale
        for index, layer in enumerate(self.layers):
            kv = cache.layer(index) if cache is not None else None
            x = layer(x, context, rope_block, rope_context, bias, kv, slots)
        return self.norm(x)

    def scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The config's output_multiplier and final_logit_softcapping applied to the logits the target's
        head made of this drafter's states."""
        cfg = self.cfg
        if cfg.output_multiplier != 1.0:
            logits = logits * cfg.output_multiplier
        if cfg.final_logit_softcapping is not None:
            logits = torch.tanh(logits / cfg.final_logit_softcapping) * cfg.final_logit_softcapping
        return logits


def load_drafter(spec: str, device="cpu", dtype=torch.float32, dummy: bool = False) -> Drafter:
    """The drafter in directory or Hub repo `spec` (z-lab's DFlash format) on `device` in `dtype`; `dummy`:
    random weights of its config's shape (the directory needs only its config.json)."""
    path = local_model_dir(spec, "drafter", weights=not dummy)
    config_path = os.path.join(path, "config.json")
    weights_path = os.path.join(path, WEIGHTS_NAME)
    for needed in (config_path,) if dummy else (config_path, weights_path):
        if not os.path.isfile(needed):
            raise DDTreeError(f"drafter: {needed} not found (expected a directory with config.json and {WEIGHTS_NAME})")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
        if not isinstance(raw, dict) or not isinstance(raw.get("dflash_config", {}), dict):
            raise ValueError("expected a JSON object, with dflash_config an object")
        cfg = DrafterConfig.from_json(raw)
    except DDTreeError:
        raise
    except Exception as exc:  # a user's file: JSON, type and transformers' own validation errors alike
        raise DDTreeError(f"drafter: unusable {config_path}: {' '.join(str(exc).split())[:300]}") from None
    drafter = build_drafter(cfg, device, dtype)
    if dummy:
        initialise(drafter)
    else:
        load_checkpoint(drafter, [weights_path], "drafter")
    drafter.source = path
    return drafter.eval()


def frequent_tokens(drafter: Drafter, count: int, vocab_size: int, dummy: bool = False) -> torch.Tensor:
    """The `count` tokens that occurred most in the drafter's training answers (its token_counts.json); for
    a drafter of dummy weights, whose text is noise, the first `count` ids."""
    if not 0 < count <= vocab_size:
        raise DDTreeError(f"--draft-vocab must be between 1 and the vocabulary's {vocab_size} tokens, got {count}")
    if dummy:
        return torch.arange(count)
    path = os.path.join(drafter.source or "", TOKEN_COUNTS_NAME)
    if not os.path.isfile(path):
        raise DDTreeError(f"--draft-vocab needs the drafter's token counts, {path}: ddtree train-drafter writes it, "
                          "or drop the option to draft over the whole vocabulary")
    with open(path, encoding="utf-8") as f:
        counts = torch.tensor(json.load(f)["counts"], dtype=torch.float64)
    if len(counts) != vocab_size:
        raise DDTreeError(f"{path} counts {len(counts)} tokens, but the vocabulary has {vocab_size}")
    return torch.argsort(counts, descending=True, stable=True)[:count]


def write_token_counts(path: str, sequences, response_starts, vocab_size: int) -> None:
    """How often each token occurs in the answers (the tokens after each sequence's response start)."""
    answers = [torch.as_tensor(tokens[start:], dtype=torch.long) for tokens, start in zip(sequences, response_starts)]
    counts = torch.bincount(torch.cat(answers), minlength=vocab_size)[:vocab_size]  # (one pass over all of them)
    with open(os.path.join(path, TOKEN_COUNTS_NAME), "w") as f:
        json.dump({"counts": counts.tolist()}, f)


def build_drafter(cfg: DrafterConfig, device, dtype: torch.dtype) -> Drafter:
    """A drafter of `cfg` with uninitialised weights on `device`: built without memory, then made there."""
    with torch.device("meta"):
        drafter = Drafter(cfg)
    return drafter.to(dtype=dtype).to_empty(device=device)


def save_drafter(drafter: Drafter, path: str, dtype: torch.dtype | None = None) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(drafter.cfg.to_json() | {"torch_dtype": str(dtype or drafter.fc.weight.dtype).removeprefix("torch.")}, f, indent=2)
    state = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in drafter.state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
