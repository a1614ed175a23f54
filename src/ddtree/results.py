"""What generation returns: whole results and streamed chunks."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    acceptance_lengths: list[int]
    seconds: float
    stage_seconds: dict[str, float]
    finish_reason: str
    method: str
    budget: int | str | None  # nodes per round, "auto", or None for ar and dflash
    chosen_budgets: list[int] = field(default_factory=list)  # with "auto": each round's choice
    first_token_seconds: float | None = None  # in a batch: from joining it to its first token
    batch_rounds: int | None = None  # in a batch: the rounds of the whole batch, whose time `stage_seconds` is

    @property
    def num_new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def rounds(self) -> int:
        return len(self.acceptance_lengths)

    @property
    def mean_acceptance(self) -> float:
        return sum(self.acceptance_lengths) / max(len(self.acceptance_lengths), 1)

    @property
    def tokens_per_second(self) -> float:
        return self.num_new_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "num_new_tokens": self.num_new_tokens,
            "prompt_tokens": self.prompt_tokens,
            "method": self.method,
            "budget": self.budget,
            "chosen_budgets": self.chosen_budgets,
            "acceptance_lengths": self.acceptance_lengths,
            "mean_acceptance": self.mean_acceptance,
            "rounds": self.rounds,
            "seconds": self.seconds,
            "tokens_per_second": self.tokens_per_second,
            "stage_seconds": self.stage_seconds,
            "finish_reason": self.finish_reason,
        }


@dataclass
class StreamChunk:
    """What one step of generation adds: new token ids and the text that is now safe to show."""

    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    acceptance_length: int | None = None


def shared_prefix(a: list[int], b: list[int]) -> int:
    """How many tokens two answers share before they first differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def percentiles(values: list[float]) -> dict[str, float]:
    """p50, p90 and p99 of a set of timings (none for an empty set)."""
    if not values:
        return {}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}
