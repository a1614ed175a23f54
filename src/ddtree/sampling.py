"""The target's own choice at each verified position: argmax at temperature 0, else a seeded sample.

A sample is drawn as argmax(p / E) with E ~ Exp(1) per token (the exponential race). The decoding
engine takes E from `position_noise`, a function of the seed, the token's position in the sequence
and the vocabulary entry only: so a seeded sample at a position is the same whichever method, tree
or budget reached that position, and speculative decoding reproduces the target alone token for
token at every temperature, not only in distribution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import DDTreeError


# Below this temperature sampling is greedy: dividing float32 logits by less overflows to inf (and
# the exponential race then picks token 0). Above it, a sample is the argmax but at exact ties.
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6  # smaller top-p values keep only the likeliest token, as this one does


@dataclass(frozen=True)
class SamplingParams:
    """How the target chooses each token: greedy at temperature 0, else a sample of the distribution
    at `temperature`, cut to the `top_k` likeliest tokens (0 or -1: no cut) and to the fewest whose
    mass reaches `top_p`. Validated when made; a temperature below MIN_TEMPERATURE is greedy."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
        if not number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise DDTreeError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise DDTreeError(f"top-p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise DDTreeError(f"top-k must be a whole number >= 0 (0 or -1 turns it off), got {self.top_k!r}")
        object.__setattr__(self, "temperature", float(self.temperature) if self.temperature >= MIN_TEMPERATURE else 0.0)
        object.__setattr__(self, "top_p", max(float(self.top_p), MIN_TOP_P))
        object.__setattr__(self, "top_k", max(self.top_k, 0))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def mode(self) -> str:
        """greedy, sample (the whole distribution) or filter (top-k or top-p cut it): each mode is one
        piece of device work, whatever the values."""
        if self.greedy:
            return "greedy"
        return "filter" if self.top_k or self.top_p < 1 else "sample"


class SamplingState:
    """The sampling values of a batch of sequences in device tensors, one entry per sequence: work captured
    once per `mode` (a CUDA graph) reads them, so every temperature, top-k and top-p replays the same
    graph. A batch's mode is the most general of its sequences' (`mode_of`); its greedy sequences still
    take the argmax (`greedy`)."""

    def __init__(self, device, batch: int = 1):
        self.temperature = torch.ones(batch, device=device)
        self.top_k = torch.zeros(batch, dtype=torch.long, device=device)
        self.top_p = torch.ones(batch, device=device)
        self.greedy = torch.ones(batch, dtype=torch.bool, device=device)
        self.modes = ["greedy"] * batch

    def set(self, params: SamplingParams, index: int = 0) -> None:
        self.modes[index] = params.mode
        self.greedy[index] = params.greedy
        self.temperature[index] = 1.0 if params.greedy else params.temperature  # (a greedy row never divides by 0)
        self.top_k[index] = params.top_k
        self.top_p[index] = params.top_p

    def mode_of(self, count: int) -> str:
        """The mode that serves the first `count` sequences: filter over sample over greedy."""
        modes = set(self.modes[:count])
        return next(mode for mode in ("filter", "sample", "greedy") if mode in modes)

    def mixed(self, count: int) -> bool:
        """Whether some of the first `count` sequences are greedy and others sample."""
        return "greedy" in self.modes[:count] and self.mode_of(count) != "greedy"

    def rows(self, count: int, mode: str, mixed: bool) -> "RowSampling":
        """The first `count` sequences' values (views), for logits [count, ..., V] in `mode`; `mixed`: the
        greedy ones among them take the argmax."""
        return RowSampling(mode, self.temperature[:count], self.top_k[:count], self.top_p[:count],
                           self.greedy[:count] if mixed else None)

    def rows_of(self, sequences: torch.Tensor, mode: str, mixed: bool) -> "RowSampling":
        """Values for logits [N, V] whose row i belongs to sequence `sequences[i]` (packed rows)."""
        return RowSampling(mode, self.temperature[sequences], self.top_k[sequences], self.top_p[sequences],
                           self.greedy[sequences] if mixed else None)

    def row(self, index: int) -> "RowSampling":
        """Sequence `index`'s values (views), for logits [N, V] of that sequence alone."""
        return RowSampling(self.modes[index], self.temperature[index], self.top_k[index], self.top_p[index])


@dataclass
class RowSampling:
    """Sampling values that broadcast against logits [..., V]: 0-d (one sequence) or [B] (a batch, logits
    [B, ..., V])."""
    mode: str
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    greedy: torch.Tensor | None = None  # [B]: a batch's greedy rows, when it mixes them with sampled ones


def per_row(value, logits: torch.Tensor):
    """A sampling value shaped to broadcast against logits [B, ..., V]: a [B] tensor one per row; a number
    or a 0-d tensor as it is (a number never becomes a device tensor: that would be a host copy a step)."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value.view(-1, *[1] * (logits.dim() - 1))
    return value


def filtered_logits(logits: torch.Tensor, params: SamplingParams | RowSampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on logits [..., V]; removed tokens get -inf. The
    values may be numbers or device tensors (per batch row: see `per_row`); in `filter` mode both cuts
    come from one sort."""
    logits = logits.float() / per_row(params.temperature, logits)
    if params.mode != "filter":
        return logits
    device, vocab = logits.device, logits.shape[-1]
    top_k = per_row(torch.as_tensor(params.top_k, device=device), logits)
    top_p = per_row(torch.as_tensor(params.top_p, device=device), logits)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    # top-k keeps every token at least as likely as the k-th (ties included); k = 0 keeps all
    kth = sorted_logits.gather(-1, (top_k.clamp(max=vocab) - 1).clamp(min=0).expand(*logits.shape[:-1], 1))
    kth = torch.where(top_k > 0, kth, float("-inf"))
    logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = sorted_logits.masked_fill(sorted_logits < kth, float("-inf")).softmax(dim=-1)
    # top-p drops a token when the tokens ranked above it already hold top_p of the mass (never at 1:
    # rounding can take the running sum past 1 before the last tokens)
    drop_sorted = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_tokens(logits: torch.Tensor, params: SamplingParams | RowSampling,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits [..., V]: the argmax, or at temperature > 0 an independent sample per
    row from the filtered distribution p, drawn as argmax(p / E) with E ~ Exp(1) (the exponential race,
    an exact sampler that needs no host synchronisation). `noise` is E (the engine's comes from
    `position_noise`); without it, E is drawn from `generator`. A batch's greedy rows take the argmax."""
    if params.mode == "greedy":
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, params).softmax(dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    sampled = (probs / noise).argmax(dim=-1)
    if not isinstance(params, RowSampling) or params.greedy is None:
        return sampled
    return torch.where(params.greedy.view(-1, *[1] * (sampled.dim() - 1)), logits.argmax(dim=-1), sampled)


MASK32 = 0xFFFFFFFF


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2**32 for 0 <= x < 2**32 in int64, in 16-bit halves of c so that no product overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer hash with strong avalanche (Wellons' "lowbias32" constants)."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """A seed of any size or sign folded to the 32 bits `position_noise` takes."""
    key, seed = 0, seed % (1 << 128)  # a negative seed as the 128-bit number with the same low bits
    while True:
        key ^= seed & MASK32
        seed >>= 32
        if not seed:
            return key


def token_keys(vocab: int, device) -> torch.Tensor:
    """Per vocabulary entry, the hashed index `position_noise` combines with each position's key."""
    return mix32((torch.arange(vocab, device=device, dtype=torch.long) + 0x9E3779B9) & MASK32)


def position_noise(seed: torch.Tensor, positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [*positions.shape, vocab] that depends only on (seed, position, token): a counter-based
    generator, so that it can be made on the device inside a captured graph and, keyed by position,
    is the same for every method. seed: int64 tensor (`seed_key`) that broadcasts against positions (a
    batch's: [B, 1]); tokens: `token_keys(vocab)`. Uniforms of 23 bits, (k + 1/2) / 2**23, are exact in
    float32 and never 0 or 1."""
    rows = mix32(seed ^ mix32(positions & MASK32))
    bits = mix32(rows[..., None] ^ tokens) >> 9
    return -torch.log((bits.float() + 0.5) * 2.0 ** -23)
