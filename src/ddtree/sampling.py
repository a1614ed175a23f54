"""The target's own choice at each verified position: argmax at temperature 0, else a seeded sample."""

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
    an exact sampler that needs no host synchronisation). `noise` is E, drawn ahead of time (a CUDA
    graph cannot draw from a per-request generator); without it, E is drawn from `generator`."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filtered_logits(logits, params).softmax(dim=-1)
    if noise is None:
        noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise).argmax(dim=-1)
