"""What a request asks for, validated once: the decoding method and its budget, sampling, and limits.

The command line, the server, `bench` and `profile` all build these objects; the engine takes them
as they are. A bad value is a DDTreeError naming the option, raised where the object is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import DDTreeError
from .sampling import SamplingParams

METHODS = ("ar", "dflash", "ddtree")
AUTO = "auto"
# The default tree budget: chosen per round from this device's measured costs (costs.AutoBudget).
DEFAULT_BUDGET = AUTO
# The largest fixed budget a request may ask for: past it a tree's verify costs more than its nodes can
# return on any device measured, and its buffers grow without bound.
MAX_BUDGET = 4096


def parse_budget(text: str) -> int | str:
    """A budget as written on a command line: 'auto' or a whole number (range checked by `Decoding`)."""
    if text == AUTO:
        return text
    try:
        return int(text)
    except ValueError:
        raise DDTreeError(f"a budget is 'auto' or a whole number, not {text!r}") from None


@dataclass(frozen=True)
class Decoding:
    """A decoding method: `ar` (the target alone), `dflash` (one drafted chain a round) or `ddtree` (a
    tree of `budget` drafted nodes a round, the root not counted, or 'auto'). Only ddtree has a budget;
    None there means the default."""

    method: str = "ddtree"
    budget: int | str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise DDTreeError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method != "ddtree":
            object.__setattr__(self, "budget", None)
            return
        budget = DEFAULT_BUDGET if self.budget is None else self.budget
        if budget != AUTO and (isinstance(budget, bool) or not isinstance(budget, int) or not 1 <= budget <= MAX_BUDGET):
            raise DDTreeError(f"budget must be 'auto' or a whole number from 1 to {MAX_BUDGET}, got {budget!r}")
        object.__setattr__(self, "budget", budget)

    @property
    def drafts(self) -> bool:
        return self.method != "ar"

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget}"


@dataclass(frozen=True)
class GenerationOptions:
    """Everything about one generation but its prompt."""

    decoding: Decoding = field(default_factory=Decoding)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    seed: int | None = None  # keys the sampling noise; None: a fresh one (unused when greedy)
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise DDTreeError(f"max-new-tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise DDTreeError(f"seed must be a whole number, got {self.seed!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        if not all(isinstance(s, str) and s for s in self.stop):
            raise DDTreeError("stop strings must be non-empty text")

    @classmethod
    def of(cls, method: str = "ddtree", budget: int | str | None = None, max_new_tokens: int = 256,
           temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
           stop=()) -> "GenerationOptions":
        """The options from plain values (the Python API's keyword arguments)."""
        return cls(Decoding(method, budget), SamplingParams(temperature, top_k, top_p), max_new_tokens, seed,
                   tuple(stop or ()))
