"""`ddtree profile`: where a round's time goes, per method and budget, on this device.

Each configuration generates the same response `repeats` times after one warm-up (which also
captures the CUDA graphs); per-stage times are divided by the rounds of each run and the median
run is reported. Times per round, not per token, are what a cost model needs: they depend on the
device, the engine and the tree size, and not on how well the drafter guesses.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

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


def weight_bytes_per_token(model: nn.Module) -> int:
    """Bytes of weights one token's forward reads: every weight once but the embedding table (one row
    gathered; a tied table is read whole as the LM head's); of a mixture of experts only the active
    share (modules say theirs as `active_share`)."""
    total = 0.0
    for module_name, module in model.named_modules():
        if module_name == "embed_tokens":
            continue
        share = getattr(module, "active_share", 1.0)
        total += share * sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
    return int(total)


def copy_bandwidth(device: torch.device, size: int = 1 << 30, repeats: int = 10) -> float | None:
    """Bytes a second a device-to-device copy moves (read and write counted), the practical memory roofline;
    None off CUDA, where the cache hierarchy makes one number meaningless."""
    if device.type != "cuda":
        return None
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        target.copy_(source)
    torch.cuda.synchronize(device)
    return 2 * size * repeats / (time.perf_counter() - started)


def roofline(engine: Engine, ar: StageProfile | None) -> dict:
    """`ar`'s time a token against reading the weights once at the measured copy bandwidth."""
    bytes_per_token = weight_bytes_per_token(engine.model)
    bandwidth = copy_bandwidth(engine.device)
    result = {"weight_bytes_per_token": bytes_per_token, "copy_bandwidth": bandwidth}
    if bandwidth and ar is not None:
        result["roofline_ms"] = 1000 * bytes_per_token / bandwidth
        result["ar_ms_per_token"] = ar.ms_per_round["round"]
        result["ar_of_roofline"] = result["roofline_ms"] / result["ar_ms_per_token"]
    return result


def summary_lines(memory: dict, loading: dict) -> str:
    """The load and the memory roofline, in words."""
    lines = [f"target loaded in {loading['load_seconds']:.1f} s; peak host memory {loading['peak_host_rss'] / 1e9:.2f} GB",
             f"weights read per token: {memory['weight_bytes_per_token'] / 1e9:.3f} GB"]
    if "ar_of_roofline" in memory:
        lines.append(f"ar: {memory['ar_ms_per_token']:.3f} ms a token against {memory['roofline_ms']:.3f} ms to read them "
                     f"at the copy bandwidth ({memory['copy_bandwidth'] / 1e12:.2f} TB/s): {memory['ar_of_roofline']:.2f} "
                     "of the roofline")
    return "\n".join(lines)
