"""`ddtree profile`: where a round's time goes, per method and budget, on this device.

Each configuration generates the same response `repeats` times after one warm-up (which also
captures the CUDA graphs); per-stage times are divided by the rounds of each run and the median
run is reported. Times per round, not per token, are what a cost model needs: they depend on the
device, the engine and the tree size, and not on how well the drafter guesses.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from .engine import Engine
from .generation import STAGES
from .options import Decoding, GenerationOptions

ROUND_STAGES = tuple(s for s in STAGES if s != "prefill")


@dataclass
class StageProfile:
    method: str
    budget: int | None
    rounds: int
    mean_acceptance: float
    tokens_per_second: float
    ms_per_round: dict[str, float]  # each stage of a round, and "round" for their sum
    token_ids: list[int]

    def to_json(self) -> dict:
        return self.__dict__.copy()


def profile(engine: Engine, prompt_ids: list[int], decoding: Decoding, max_new_tokens: int,
            repeats: int) -> StageProfile:
    options = GenerationOptions(decoding, max_new_tokens=max_new_tokens)
    engine.generate(prompt_ids, options)  # warm-up, graphs
    runs = [engine.generate(prompt_ids, options) for _ in range(repeats)]
    run = sorted(runs, key=lambda r: r.seconds)[len(runs) // 2]
    rounds = max(run.rounds, 1)
    per_round = {stage: 1000 * run.stage_seconds[stage] / rounds for stage in ROUND_STAGES}
    per_round["round"] = sum(per_round.values())
    return StageProfile(decoding.method, decoding.budget, run.rounds, run.mean_acceptance,
                        statistics.median(r.tokens_per_second for r in runs), per_round, run.token_ids)


TABLE_HEAD = ["method", "budget", "τ", "tok/s", "same as ar"] + [f"{s} ms" for s in ROUND_STAGES] + ["round ms"]


def table_row(p: StageProfile, reference: StageProfile | None) -> str:
    same = "-" if reference is None else ("yes" if p.token_ids == reference.token_ids else "NO")
    cells = [p.method, "-" if p.budget is None else str(p.budget), f"{p.mean_acceptance:.2f}",
             f"{p.tokens_per_second:.1f}", same] + [f"{p.ms_per_round[s]:.3f}" for s in ROUND_STAGES + ("round",)]
    return "| " + " | ".join(cells) + " |"


def profile_table(profiles: list[StageProfile]) -> str:
    """A markdown table; 'same as ar' compares each output with the target-only run's, where there is one."""
    reference = next((p for p in profiles if p.method == "ar"), None)
    lines = ["| " + " | ".join(TABLE_HEAD) + " |", "|" + " --- |" * len(TABLE_HEAD)]
    lines += [table_row(p, reference) for p in profiles]
    return "\n".join(lines) + "\n"
