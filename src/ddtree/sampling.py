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


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0

    def validate(self) -> "SamplingParams":
        if not self.temperature >= 0:
            raise DDTreeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise DDTreeError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DDTreeError(f"top-k must be >= 0 (0 turns it off), got {self.top_k}")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on logits [N, V]; removed tokens get -inf."""
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already hold top_p of the mass
        drop_sorted = probs.cumsum(dim=-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def choose_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                  noise: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits [N, V]: the argmax, or at temperature > 0 an independent sample per
    row from the filtered distribution p, drawn as argmax(p / E) with E ~ Exp(1) (the exponential race,
    an exact sampler that needs no host synchronisation). `noise` is E (the engine's comes from
    `position_noise`); without it, E is drawn from `generator`."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, params).softmax(dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)


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
    """Exp(1) noise [len(positions), vocab] that depends only on (seed, position, token): a counter-based
    generator, so that it can be made on the device inside a captured graph and, keyed by position,
    is the same for every method. seed: int64 tensor (`seed_key`); tokens: `token_keys(vocab)`.
    Uniforms of 23 bits, (k + 1/2) / 2**23, are exact in float32 and never 0 or 1."""
    rows = mix32(seed ^ mix32(positions & MASK32))
    bits = mix32(rows[:, None] ^ tokens) >> 9
    return -torch.log((bits.float() + 0.5) * 2.0 ** -23)
