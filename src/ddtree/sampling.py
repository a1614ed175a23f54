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
    """A request's sampling values in device tensors: work captured once per `mode` (a CUDA graph)
    reads them, so every temperature, top-k and top-p of that mode replays the same graph."""

    def __init__(self, device):
        self.temperature = torch.ones((), device=device)
        self.top_k = torch.zeros((), dtype=torch.long, device=device)
        self.top_p = torch.ones((), device=device)
        self.mode = "greedy"

    def set(self, params: SamplingParams) -> None:
        self.mode = params.mode
        if not params.greedy:
            self.temperature.fill_(params.temperature)
            self.top_k.fill_(params.top_k)
            self.top_p.fill_(params.top_p)


def filtered_logits(logits: torch.Tensor, params: SamplingParams | SamplingState) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) on logits [N, V]; removed tokens get -inf. The
    values may be numbers or device tensors; in `filter` mode both cuts come from one sort."""
    logits = logits.float() / params.temperature
    if params.mode != "filter":
        return logits
    device, vocab = logits.device, logits.shape[-1]
    top_k, top_p = torch.as_tensor(params.top_k, device=device), torch.as_tensor(params.top_p, device=device)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    # top-k keeps every token at least as likely as the k-th (ties included); k = 0 keeps all
    kth = sorted_logits.gather(-1, (top_k.clamp(max=vocab) - 1).clamp(min=0).expand(logits.shape[0], 1))
    kth = torch.where(top_k > 0, kth, float("-inf"))
    logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = sorted_logits.masked_fill(sorted_logits < kth, float("-inf")).softmax(dim=-1)
    # top-p drops a token when the tokens ranked above it already hold top_p of the mass (never at 1:
    # rounding can take the running sum past 1 before the last tokens)
    drop_sorted = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def choose_tokens(logits: torch.Tensor, params: SamplingParams | SamplingState,
                  generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of logits [N, V]: the argmax, or at temperature > 0 an independent sample per
    row from the filtered distribution p, drawn as argmax(p / E) with E ~ Exp(1) (the exponential race,
    an exact sampler that needs no host synchronisation). `noise` is E (the engine's comes from
    `position_noise`); without it, E is drawn from `generator`."""
    if params.mode == "greedy":
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
