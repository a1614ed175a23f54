"""A compact decoder for the Llama family (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE) with a static KV cache.

One forward pass takes new tokens at explicit positions, writes their keys and values into
preallocated cache slots, attends under any boolean mask over [cache rows | new tokens], and
returns the final hidden states plus the outputs of chosen decoder layers ("taps"). That is all
speculative decoding needs from a target: trees are just masks and positions.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .errors import DDTreeError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe")


@dataclass
class DecoderConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None = None  # a sliding layer's query sees keys less than this many positions back
    sliding_layers: tuple[int, ...] = ()
    # Qwen3-MoE: the layers whose MLP is a mixture of experts, and the mixture's shape
    moe_layers: tuple[int, ...] = ()
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False

    @classmethod
    def from_hf(cls, hf) -> "DecoderConfig":
        """Reads a transformers config of a supported family."""
        family = hf.model_type
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return cls(
            family=family,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_positions=hf.max_position_embeddings,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=True if family == "qwen2" else bool(getattr(hf, "attention_bias", False)),
            o_bias=family in ("llama", "qwen3", "qwen3_moe") and bool(getattr(hf, "attention_bias", False)),
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            **sliding_attention(hf),
            **(mixture_fields(hf) if family == "qwen3_moe" else {}),
        )


def sliding_attention(hf) -> dict:
    """Which layers attend through a sliding window, and its width: those `layer_types` names (Qwen2/3 with
    use_sliding_window), or every layer of a Mistral that sets one."""
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    if not window:
        return {}
    if layer_types:
        layers = tuple(i for i, kind in enumerate(layer_types) if kind == "sliding_attention")
    else:
        layers = tuple(range(hf.num_hidden_layers)) if hf.model_type == "mistral" else ()
    return {"sliding_window": int(window), "sliding_layers": layers} if layers else {}


def mixture_fields(hf) -> dict:
    """Qwen3-MoE's mixture. Layers have experts as in transformers' Qwen3MoeDecoderLayer: every
    decoder_sparse_step-th layer that mlp_only_layers does not name (the others a dense MLP)."""
    dense = set(hf.mlp_only_layers or ())
    moe_layers = tuple(i for i in range(hf.num_hidden_layers)
                       if i not in dense and hf.num_experts > 0 and (i + 1) % hf.decoder_sparse_step == 0)
    return dict(moe_layers=moe_layers, num_experts=hf.num_experts, experts_per_token=hf.num_experts_per_tok,
                moe_intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob))


def rope_inverse_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE variant (llama3, yarn, ... via transformers)."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("dynamic NTK RoPE changes with the sequence length and is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, torch.device("cpu"))  # (not a meta tensor)
    return inv_freq.float(), float(scaling)


class Rotary(nn.Module):
    """cos/sin tables indexed by absolute position.

    The tables are plain float32 attributes, not buffers, so casting the model to bf16 leaves them
    exact (as in transformers, which computes them in float32 and casts per call); they are built
    on first use on the device of the positions.
    """

    def __init__(self, inv_freq: torch.Tensor, scaling: float, max_positions: int):
        super().__init__()
        self.inv_freq, self.scaling, self.max_positions = inv_freq.float().cpu(), scaling, max_positions
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None

    def build(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tables is None or self.tables[0].device != device:
            positions = torch.arange(self.max_positions, dtype=torch.float32, device=device)
            angles = torch.outer(positions, self.inv_freq.to(device))
            angles = torch.cat([angles, angles], dim=-1)
            self.tables = (angles.cos() * self.scaling, angles.sin() * self.scaling)
        return self.tables

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.build(positions.device)
        return cos[positions].to(dtype), sin[positions].to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, heads, D]; cos/sin: [B or 1, T, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(2) + rotated * sin.unsqueeze(2)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One kernel on CUDA; it normalises in float32 like transformers, and rounds once at the end.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def store_as_parts(module: nn.Module, fused: str, parts: list[str], split, join) -> None:
    """Keeps the tensor `fused` of `module` whole while its state dict shows it as `parts` (checkpoint
    names): `split(fused)` gives the parts, as views (what checkpoints are copied into), and
    `join(parts)` makes it again when a state dict holding the parts is loaded."""
    def load(mod, state, prefix, *_):
        keys = [prefix + part for part in parts]
        if all(k in state for k in keys):
            state[prefix + fused] = join([state.pop(k) for k in keys])

    def save(mod, state, prefix, *_):
        if prefix + fused in state:
            for part, piece in zip(parts, split(state.pop(prefix + fused))):
                state[prefix + part] = piece

    module.register_load_state_dict_pre_hook(load)
    module.register_state_dict_post_hook(save)


class BF16Linear(nn.Module):
    """A linear map whose weight (and bias) is kept in bfloat16: the input is rounded to bfloat16 for the product
    and the result returned in the input's dtype. On a CPU with AMX the product over a tree's rows then costs
    about what one row's does, where float32's grows with the rows (docs/performance.md)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)


def use_bf16_products(module: nn.Module) -> None:
    """Every nn.Linear below `module` as a BF16Linear (for inference: the weights are frozen)."""
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, BF16Linear(child))
        else:
            use_bf16_products(child)


def fuse_linears(module: nn.Module, fused: str, parts: tuple[str, ...], sizes: list[int]) -> None:
    """Keeps `parts` (e.g. q/k/v projections) as one stacked Linear `fused`, so one GEMM replaces several,
    while checkpoints keep transformers' separate names: stacked on load, split again on save."""
    for kind in ("weight", "bias"):
        store_as_parts(module, f"{fused}.{kind}", [f"{part}.{kind}" for part in parts],
                       lambda tensor: tensor.split(sizes), torch.cat)


class MLP(nn.Module):
    """SwiGLU; gate and up projections run as one GEMM (stored as transformers' gate_proj/up_proj)."""

    def __init__(self, hidden: int, intermediate: int, bias: bool = False):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        fuse_linears(self, "gate_up_proj", ("gate_proj", "up_proj"), [intermediate, intermediate])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Experts(nn.Module):
    """A mixture's experts, SwiGLU MLPs stacked: gate_up_proj [experts, 2 * intermediate, hidden] (each
    expert's gate rows, then its up rows) and down_proj [experts, hidden, intermediate], as transformers
    keeps them. Checkpoints on the Hub hold one gate/up/down_proj per expert: the state dict shows those,
    as views."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))
        store_as_parts(self, "gate_up_proj", [f"{e}.{part}.weight" for e in range(num_experts)
                                              for part in ("gate_proj", "up_proj")],
                       lambda tensor: tensor.view(-1, intermediate, hidden).unbind(),
                       lambda parts: torch.stack(parts).view(num_experts, 2 * intermediate, hidden))
        store_as_parts(self, "down_proj", [f"{e}.down_proj.weight" for e in range(num_experts)],
                       torch.unbind, torch.stack)

    def forward(self, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: [N, hidden]; experts, weights: [N, k], each row's experts and their weights. The (row, k)
        pairs are sorted by expert, so that each expert's rows are contiguous for a grouped GEMM; shapes
        depend on N alone and nothing waits for the device (CUDA graphs, torch.compile)."""
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        by_expert = flat[order]
        ends = torch.searchsorted(by_expert, torch.arange(self.down_proj.shape[0], device=x.device), right=True,
                                  out_int32=True)
        matmul = grouped_matmul if experts_use_grouped_mm(x.device, x.dtype) else gathered_matmul
        gate, up = matmul(x[order // experts.shape[1]], self.gate_up_proj, by_expert, ends).chunk(2, dim=-1)
        out = matmul(F.silu(gate) * up, self.down_proj, by_expert, ends)
        out = torch.empty_like(out).index_copy_(0, order, out).view(*experts.shape, -1)
        # a sum over k rather than index_add_, whose atomic adds on CUDA would vary the order run to run
        return (out * weights.unsqueeze(-1)).sum(dim=1)


def grouped_matmul(rows, weight, by_expert, ends):
    """rows [S, in] sorted by expert (expert e's end at ends[e]) times their experts' weight [experts,
    out, in], transposed: one grouped GEMM."""
    return torch._grouped_mm(rows, weight.transpose(1, 2), offs=ends)


def gathered_matmul(rows, weight, by_expert, ends):
    """`grouped_matmul` where torch._grouped_mm cannot run: each row's expert weights gathered
    (by_expert: each row's expert), then batched GEMMs."""
    return torch.bmm(weight[by_expert], rows.unsqueeze(-1)).squeeze(-1)


@torch.compiler.assume_constant_result  # compiling, it runs once as Python and its answer is compiled in
def experts_use_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    """The experts' path: grouped GEMMs where `grouped_mm_runs`, else `gathered_matmul`. Compiled, bf16
    only: the compiler's grouped GEMM takes no other dtype (torch 2.11 to 2.13)."""
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        return False
    return grouped_mm_runs(device, dtype)


@functools.cache
def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """torch._grouped_mm as the experts need it: on CUDA one kernel that waits for nothing, which PyTorch
    has for bf16 on compute capability 9.x and 10.x (elsewhere it reads the offsets on the host, which
    no CUDA graph can hold); on the CPU, where nothing is captured, in any dtype it takes."""
    if device.type == "cuda":
        if not (dtype == torch.bfloat16 and torch.version.hip is None
                and torch.cuda.get_device_capability(device)[0] in (9, 10)):
            return False
    elif device.type != "cpu":
        return False
    try:  # (no host-to-device copy: this may first run while a CUDA graph is captured)
        weight = torch.ones(2, 8, 8, device=device, dtype=dtype)
        offsets = torch.arange(1, 3, device=device, dtype=torch.int32)
        grouped_matmul(torch.ones(2, 8, device=device, dtype=dtype), weight, None, offsets)
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


class SparseMoE(nn.Module):
    """Qwen3-MoE's MLP: the router (`gate`) gives each token its top-k experts, whose outputs are summed
    weighted by the router's probabilities (renormalised over the k under norm_topk_prob), as
    transformers' Qwen3MoeSparseMoeBlock computes: softmax in float32, weights cast to the activations'."""

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.experts.active_share = cfg.experts_per_token / cfg.num_experts  # of its weights one token reads
        self.top_k, self.renormalise = cfg.experts_per_token, cfg.norm_topk_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        probs = torch.softmax(self.gate(rows), dim=-1, dtype=torch.float32)
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalise:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return self.experts(rows, experts, weights.to(x.dtype)).view_as(x)


class PackedSlots(NamedTuple):
    """Where packed rows (several sequences' rows one after another, [1, P]) go in a cache of several
    sequences: each row's sequence and slot, [P] each."""
    sequence: torch.Tensor
    slot: torch.Tensor


class Packing(NamedTuple):
    """Several sequences' new rows packed into one row axis of P (no padding between them) for the matrix
    products, and their places in a padded [count, R] layout for the attention, which is per sequence:
    `unpack` [count, R] is each padded place's packed row (any row, for places past a sequence's own),
    `pack` [P] each packed row's place (flat, count * R), `slots` where each packed row goes in the cache,
    and `positions` and `rows` ([count, R], the padded layout's positions and cache slots) for sliding windows."""
    unpack: torch.Tensor
    pack: torch.Tensor
    slots: PackedSlots
    positions: torch.Tensor
    rows: torch.Tensor

    @classmethod
    def of(cls, used: torch.Tensor, packed: int, positions: torch.Tensor, rows: torch.Tensor) -> "Packing":
        """The first `used[b]` (at least 1) of each sequence's rows in the padded layout (`positions` and cache
        slots `rows`, [count, R]) packed into `packed` rows (at least their sum). Packed rows past them are
        padding: they repeat the first sequence's first row and write their keys and values one slot past its
        padded rows, which nothing attends. Device operations of fixed shapes (CUDA graphs)."""
        count, width = positions.shape
        steps = torch.arange(width, device=used.device)
        starts = used.cumsum(0) - used
        real = steps < used[:, None]
        unpack = torch.where(real, starts[:, None] + steps, starts[:, None])  # (past its rows: its first row)
        places = torch.arange(count * width, device=used.device)
        pack = torch.zeros(packed + 1, dtype=torch.long, device=used.device)  # (the last entry takes the padding places)
        pack.scatter_(0, torch.where(real, unpack, packed).view(-1), places)
        pack = pack[:packed]
        padding = torch.arange(packed, device=used.device) >= used.sum()
        sequence = torch.where(padding, 0, pack // width)
        slot = torch.where(padding, rows[0, -1] + 1, rows.view(-1)[pack])
        return cls(unpack, pack, PackedSlots(sequence, slot), positions, rows)

    def packed(self, padded: torch.Tensor) -> torch.Tensor:
        """[count, R, ...] in the padded layout as [1, P, ...] packed rows."""
        return padded.flatten(0, 1)[self.pack][None]

    def padded(self, packed: torch.Tensor) -> torch.Tensor:
        """[1, P, ...] packed rows as [count, R, ...] in the padded layout (places past a sequence's rows hold
        another of its rows)."""
        return packed[0, self.unpack]


class LayerKV(NamedTuple):
    """One layer's part of a KVCache (a view): keys and values stacked, [2, batch, kv_heads, capacity, head_dim]."""

    kv: torch.Tensor

    def store(self, slots: "torch.Tensor | PackedSlots", kv: torch.Tensor) -> None:
        """Stores keys and values stacked [2, B, kv_heads, T, D] at `slots` (a tensor, which keeps shapes
        static for graph capture) in one copy: [1, T] slot indices shared by the batch, or [B, T], each
        sequence's own, or packed rows ([2, 1, kv_heads, P, D]) at their sequences' slots."""
        if isinstance(slots, PackedSlots):
            self.kv[:, slots.sequence, :, slots.slot] = kv[:, 0].permute(2, 0, 1, 3)
        elif slots.shape[0] == 1:  # (shared, or one sequence: the plain copy)
            self.kv.index_copy_(3, slots[0], kv)
        else:  # (indices on two axes apart put those axes first: [B, T, 2, kv_heads, D])
            self.kv[:, sequence_index(slots), :, slots] = kv.permute(1, 3, 0, 2, 4)

    def read(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and the values of slots 0..length."""
        return self.kv[0, :, :, :length], self.kv[1, :, :, :length]


def keep(kv: torch.Tensor, cache: LayerKV | None, slots: "torch.Tensor | PackedSlots | None") -> torch.Tensor | None:
    """Where a layer's projection leaves its keys and values: in the cache at `slots` (then None is
    returned), or, without a cache, returned. Called inside the compiled projections, so that under
    --compile the copy into the cache fuses with the rotary that makes the keys: one kernel fewer a layer."""
    if cache is None:
        return kv
    cache.store(slots, kv)
    return None


class KVCache:
    """Preallocated keys and values for every layer, in one tensor [layers, 2, batch, kv_heads, capacity,
    head_dim] so that one copy writes a layer's keys and values; `keys` and `values` are views of it.

    Rows are written at explicit slots; nothing is allocated while decoding. Keys are stored after
    RoPE, so a row carries its position with it and can be moved to another slot (tree compaction).
    """

    def __init__(self, kv: torch.Tensor):
        self.kv = kv
        self.keys, self.values = self.kv[:, 0], self.kv[:, 1]
        self.capacity = kv.shape[4]

    @classmethod
    def empty(cls, num_layers, batch, num_kv_heads, capacity, head_dim, device, dtype) -> "KVCache":
        return cls(torch.zeros((num_layers, 2, batch, num_kv_heads, capacity, head_dim), device=device, dtype=dtype))

    def layer(self, index: int) -> "LayerKV":
        return LayerKV(self.kv[index])

    def sequences(self, start: int, stop: int) -> "KVCache":
        """Sequences start..stop alone, as a cache of their own (a view: writes land in this cache)."""
        return KVCache(self.kv[:, :, start:stop])

    def move_rows(self, sources: torch.Tensor, destinations: torch.Tensor) -> None:
        """Copies rows `sources` to slots `destinations`, all layers at once: tensors of slot indices shared
        by the batch, or [B, R], each sequence's own."""
        if sources.dim() == 1 or sources.shape[0] == 1:
            self.kv.index_copy_(4, destinations.view(-1), self.kv.index_select(4, sources.view(-1)))
        else:
            batch = sequence_index(sources)
            self.kv[:, :, batch, :, destinations] = self.kv[:, :, batch, :, sources]


def sequence_index(slots: torch.Tensor) -> torch.Tensor:
    """For per-sequence slots [B, T]: each entry's sequence, [B, T] (the batch axis's index beside them)."""
    return torch.arange(slots.shape[0], device=slots.device)[:, None].expand_as(slots)


def attention_bias(mask: torch.Tensor, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask [B or 1, 1, T, L] as the additive bias `attention` takes, made once per forward:
    0 where attending is allowed, -inf elsewhere, rows repeated for the query heads sharing a KV head."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return bias.repeat(1, 1, groups, 1) if groups > 1 and mask.shape[-2] > 1 else bias  # one row broadcasts


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q: [B, T, H, D]; k/v: [B, KVH, L, D]; bias from `attention_bias`. Returns [B, T, H * D].

    The query heads that share a KV head are stacked along the rows, so K/V are never repeated
    and one fused attention kernel takes any mask.
    """
    batch, length, heads, dim = q.shape
    groups = heads // k.shape[1]
    q = q.transpose(1, 2).reshape(batch, k.shape[1], groups * length, dim)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return out.reshape(batch, heads, length, dim).transpose(1, 2).reshape(batch, length, heads * dim)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, packing: Packing) -> torch.Tensor:
    """`attention` for packed queries [1, P, H, D]: each sequence's, padded to [count, R], attend its own
    keys and values; returns [1, P, H * D]."""
    return packing.packed(attention(packing.padded(q), k, v, bias))


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)
        q_size, kv_size = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        fuse_linears(self, "qkv_proj", ("q_proj", "k_proj", "v_proj"), [q_size, kv_size, kv_size])
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def project(self, x, cos, sin):
        """Queries [B, T, heads, D] and keys and values stacked [2, B, kv_heads, T, D], rotated."""
        batch, length = x.shape[:2]
        qkv = self.qkv_proj(x).view(batch, length, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        else:
            qk, v = qkv.split([self.num_heads + self.num_kv_heads, self.num_kv_heads], dim=2)
        # queries and keys rotate together: one set of kernels instead of two
        q, k = apply_rotary(qk, cos, sin).split([self.num_heads, self.num_kv_heads], dim=2)
        return q, torch.stack([k, v]).transpose(2, 3)


class DecoderLayer(nn.Module):
    """Around the attention (which takes any mask) the layer's work is pure functions of fixed shapes,
    which `Decoder.compile_layers` compiles: `project` (norm, QKV, rotary, the cache write), `finish`
    (output projection, residual, norm, MLP, residual), and `finish_and_project`, one layer's finish
    and the next layer's project in one function, so that the residual add and the next norm fuse."""

    def __init__(self, cfg: DecoderConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoE(cfg) if index in cfg.moe_layers else MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)

    def project(self, x, cos, sin, cache: LayerKV | None = None, slots: torch.Tensor | None = None):
        """Queries, and keys and values (None once stored in `cache`: see `keep`)."""
        q, kv = self.self_attn.project(self.input_layernorm(x), cos, sin)
        return q, keep(kv, cache, slots)

    def finish(self, x, attended):
        x = x + self.self_attn.o_proj(attended)
        return x + self.mlp(self.post_attention_layernorm(x))

    def finish_and_project(self, following: "DecoderLayer", x, attended, cos, sin, cache: LayerKV | None = None,
                           slots: torch.Tensor | None = None):
        # the plain functions, not the compiled ones compile_layers put on the instances
        x = DecoderLayer.finish(self, x, attended)
        return x, DecoderLayer.project(following, x, cos, sin, cache, slots)


COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_mode() -> str:
    """torch.compile's mode for the layers: DDTREE_COMPILE_MODE, or "default". "max-autotune-no-cudagraphs"
    tries Triton GEMMs that can take the adds and the SiLU around them (longer compiles). Modes that add
    CUDA graphs are refused: the engine captures its own."""
    mode = os.environ.get("DDTREE_COMPILE_MODE") or "default"
    if mode not in COMPILE_MODES:
        raise DDTreeError(f"DDTREE_COMPILE_MODE={mode!r}: expected one of {', '.join(COMPILE_MODES)}")
    return mode


def compile_layer_functions(layers: nn.ModuleList, names: tuple[str, ...]) -> None:
    """torch.compile the layers' functions `names`, fusing the norms, rotary, SiLU and residual adds
    around the GEMMs. The layers share the compiled code: they differ only in their weights, which
    the compiler takes as inputs; and only the row count varies, which the compiler makes symbolic
    once it has seen two (so prompts of any length do not each compile). The attention, which takes
    any mask, stays as it is."""
    kind = type(layers[0])
    # With fullgraph, a function past the compiler's recompile limit (8 by default) fails instead of
    # running eagerly. Ours stay at five (with a cache: one row, the first row count, any; without: the
    # first, any; tested), but a long benchmark should not die on a new caller's variant or two.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for name in names:
        compiled = torch.compile(getattr(kind, name), fullgraph=True, mode=compile_mode())
        for layer in layers:
            setattr(layer, name, functools.partial(compiled, layer))


class Decoder(nn.Module):
    """The target model. Parameter names follow transformers' `*ForCausalLM` so checkpoints load as they are."""

    def __init__(self, cfg: DecoderConfig, inv_freq: torch.Tensor, rope_scaling: float = 1.0):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, index) for index in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary = Rotary(inv_freq, rope_scaling, cfg.max_positions)
        self.compiled = False  # set by compile_layers; round costs differ, so calibrations are kept apart
        self.bf16_products = False  # set by use_bf16_products; likewise

    def use_bf16_products(self) -> None:
        """The layers' matrix products with bfloat16 weights (`BF16Linear`), for a float32 model on a CPU with
        AMX. The LM head keeps its weights, so the logits the target chooses by stay unrounded (`logits`)."""
        use_bf16_products(self.layers)
        self.bf16_products = True

    def new_cache(self, capacity: int | None = None, batch: int = 1) -> KVCache:
        cfg, weight = self.cfg, self.embed_tokens.weight
        capacity = capacity or cfg.max_positions  # slots, not positions: a verified tree may reach past the context
        return KVCache.empty(cfg.num_layers, batch, cfg.num_kv_heads, capacity, cfg.head_dim, weight.device, weight.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None = None,
        slots: int | torch.Tensor = 0,
        taps: tuple[int, ...] = (),
        packing: Packing | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Runs new tokens through the decoder.

        input_ids, positions: [B, T]. mask: bool [B or 1, 1, T, L]: which of the cache slots 0..L (with
        the new rows already written) each new token sees; without a cache, [.., T, T] over the new
        tokens. With a cache, the new rows are written at `slots`: the first of T consecutive slots as
        an int, or a tensor of T slot indices, or [B, T] of each sequence's own (what the compiled layers
        take: an int there would compile once per value). Returns the final-normed hidden states [B, T, hidden]
        and the outputs of the decoder layers in `taps`, concatenated on the last axis
        ([B, T, len(taps) * hidden]).

        With `packing`, input_ids and positions are [1, P], several sequences' rows packed one after another
        (the matrix products run over their P rows alone), mask is [count, 1, R, L] in the packing's padded
        layout (each sequence attends its own cache, of the `count` sequences the cache holds) and `slots`
        is ignored (the packing's are used). The outputs are packed too.
        """
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        if packing is not None:
            slots = packing.slots
        elif isinstance(slots, int):
            slots = torch.arange(slots, slots + input_ids.shape[1], device=input_ids.device)
        if isinstance(slots, torch.Tensor) and slots.dim() == 1:  # (one form for the compiled layers: [1, T] is shared)
            slots = slots[None]
        groups = self.cfg.num_heads // self.cfg.num_kv_heads
        biases = [attention_bias(mask, groups, x.dtype)]
        if self.cfg.sliding_layers:
            near = (within_window(packing.positions, packing.rows, mask.shape[-1], self.cfg.sliding_window, True)
                    if packing is not None else
                    within_window(positions, slots, mask.shape[-1], self.cfg.sliding_window, cache is not None))
            biases.append(attention_bias(mask & near, groups, x.dtype))
        tapped = {}
        last = len(self.layers) - 1
        caches = [cache.layer(i) if cache is not None else None for i in range(len(self.layers))]
        q, kv = self.layers[0].project(x, cos, sin, caches[0], slots)
        for index, layer in enumerate(self.layers):
            bias = biases[index in self.cfg.sliding_layers]
            k, v = caches[index].read(bias.shape[-1]) if cache is not None else kv
            attended = attention(q, k, v, bias) if packing is None else packed_attention(q, k, v, bias, packing)
            if index < last:
                x, (q, kv) = layer.finish_and_project(self.layers[index + 1], x, attended, cos, sin,
                                                      caches[index + 1], slots)
            else:
                x = layer.finish(x, attended)
            if index in taps:
                tapped[index] = x
        # in the order asked for, repeats included: the drafter's fc expects exactly that layout
        features = torch.cat([tapped[i] for i in taps], dim=-1) if taps else None
        return self.norm(x), features

    def compile_layers(self) -> None:
        """torch.compile the layers' functions between the attentions (`compile_layer_functions`)."""
        compile_layer_functions(self.layers, ("project", "finish", "finish_and_project"))
        self.compiled = True

    def logits(self, hidden: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """float32 logits, never rounded to a bf16/fp16 model's dtype: rounded logits tie often (steps
        of 0.125 between 16 and 32), and a tie that a differently shaped forward breaks the other way
        makes a speculative method leave the target-alone output. `weight`: some rows of the head only."""
        weight = self.lm_head.weight if weight is None else weight
        if weight.dtype == torch.float32:
            return F.linear(hidden, weight)
        if hidden.is_cuda and mm_out_dtype_works(hidden.device):  # a bf16 GEMM that writes float32
            flat = hidden.reshape(-1, hidden.shape[-1])
            return torch.mm(flat, weight.t(), out_dtype=torch.float32).view(*hidden.shape[:-1], -1)
        return F.linear(hidden.float(), weight.float())


@functools.cache
def mm_out_dtype_works(device: torch.device) -> bool:
    """torch.mm(..., out_dtype=float32) on half-precision inputs: CUDA in recent PyTorch only."""
    try:
        torch.mm(torch.ones(1, 8, device=device, dtype=torch.bfloat16),
                 torch.ones(8, 8, device=device, dtype=torch.bfloat16), out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def initialise(module: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Normal(0, std) weights and unit norms from a fixed seed, generated where the parameters live (random
    drafters, and targets with --dummy-weights: an 8B model's weights appear on the GPU in a second)."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():  # (a tied weight comes once)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)


def within_window(positions: torch.Tensor, slots: torch.Tensor, length: int, window: int, cached: bool) -> torch.Tensor:
    """bool [B, 1, T, L]: which of the L keys lie less than `window` positions before each new token. A cache
    slot holds its own position, except the new rows', which hold the positions given (a tree's nodes sit
    in consecutive slots at their depths' positions)."""
    batch = positions.shape[0]
    if cached:
        keys = torch.arange(length, device=positions.device).expand(batch, length).clone()
        keys.scatter_(1, slots.expand(batch, -1), positions)
    else:
        keys = positions
    return (keys[:, None, None, :] > positions[:, None, :, None] - window)


def causal_mask(new: int, past: int, device) -> torch.Tensor:
    """bool [1, 1, new, past + new]: every new token sees all past rows and the new tokens up to itself."""
    allowed = torch.ones(new, past + new, dtype=torch.bool, device=device)
    allowed[:, past:] = torch.tril(allowed[:, past:])
    return allowed[None, None]
