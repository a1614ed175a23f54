"""One request's host loop: prefill, then rounds launched one ahead of the host, their outcomes read,
streamed and checked for stops. The device work of a round is the method's (`methods.py`); this
module only decides when to launch, reads what came back and times the stages.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .errors import DDTreeError
from .methods import DecodingMethod, Member, run_round
from .options import GenerationOptions
from .results import StreamChunk
from .sampling import SamplingParams, choose_tokens, seed_key
from .stages import Stages
from .stopping import StopChecker

STAGES = ("prefill", "draft", "tree", "verify", "commit", "host")


class StageClock:
    """Time per stage. On CUDA, events recorded between stages (no synchronisation until `totals`);
    elsewhere the wall clock. A stage's time runs from the previous mark to its own; `host` is the gap
    between a round's last stage and the next round's first, where the host reads results and decides."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object]] = []
        self.mark("start")

    def mark(self, stage: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((stage, event))
        else:
            self.marks.append((stage, time.perf_counter()))

    def totals(self) -> dict[str, float]:
        seconds = dict.fromkeys(STAGES, 0.0)
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        for (_, before), (stage, after) in itertools.pairwise(self.marks):
            gap = before.elapsed_time(after) / 1000 if self.cuda else after - before
            seconds["host" if stage == "round" else stage] += gap
        return seconds


class OutcomeReader:
    """Reads each round's `out` ([count, tokens...]) without stalling the device. On CUDA the copy goes
    into one of two pinned host buffers behind the round's kernels (at most two rounds are unread: one
    running, one launched), and reading waits for that round alone; elsewhere rounds run as they are
    launched, so the values are read at once (the next round reuses the device buffer)."""

    def __init__(self, device: torch.device, length: int):
        self.cuda = device.type == "cuda"
        self.buffers = [torch.empty(length, dtype=torch.long, pin_memory=True) for _ in range(2)] if self.cuda else []
        self.turn = 0

    def after(self, out: torch.Tensor) -> Callable[[], tuple[int, list[int]]]:
        if not self.cuda:
            values = out.tolist()
            return lambda: (values[0], values[1:1 + values[0]])
        buffer = self.buffers[self.turn][:len(out)]
        self.turn ^= 1
        buffer.copy_(out, non_blocking=True)
        done = torch.cuda.Event()
        done.record()

        def read() -> tuple[int, list[int]]:
            done.synchronize()
            values = buffer.tolist()
            return values[0], values[1:1 + values[0]]
        return read


@dataclass
class Launched:
    """A round on its way: how to read its outcome, and what auto learns from its time."""
    read: Callable[[], tuple[int, list[int]]]
    max_tokens: int  # the most tokens it can add
    nodes: int | None  # the nodes it verifies, when its time teaches the method
    probed: int | None  # the size auto probed at, if it did
    launched_at: float


class Generation:
    """One request's decoding, as an iterator of StreamChunk; `.stats` holds timing afterwards.

    `ticket` is the engine's number for this generation: the workspace keeps the number of the one
    decoding in it, so a second stream started on the same engine is refused, not interleaved."""

    def __init__(self, stages: Stages, method: DecodingMethod, ids: list[int], options: GenerationOptions,
                 stopper: StopChecker, ticket: int, run_ahead: bool):
        self.stages, self.method, self.ids, self.options = stages, method, ids, options
        self.stopper, self.ticket, self.run_ahead = stopper, ticket, run_ahead
        self.ws = stages.ws
        self.seed = request_seed(options)
        self.stats: dict = {"prompt_tokens": len(ids), "method": options.decoding.method,
                            "budget": options.decoding.budget, "budgets": method.chosen}
        self.rounds = 0  # launched so far

    def __iter__(self) -> Iterator[StreamChunk]:
        """Rounds run one ahead of the host: round k+1 is launched before round k's outcome is read
        (its inputs are on the device already), so the device never waits while the host reads,
        streams text and checks for stops. Only its attended length needs the committed count, and
        an upper bound serves (the mask comes from the device's exact count). A round launched past
        the end is discarded; its time counts, since the next request would wait for it."""
        ws, limit = self.ws, self.ws.context_limit
        clock = StageClock(ws.device)
        started = time.perf_counter()
        reader = OutcomeReader(ws.device, ws.block + 1)
        ws.owner = self.ticket
        with torch.inference_mode():
            chunk = self.prefill()
            clock.mark("prefill")
            yield chunk
            committed, pending, read_at = len(self.ids), None, time.perf_counter()
            while chunk.finish_reason is None:
                if ws.owner != self.ticket:
                    raise DDTreeError("another generation started on this engine; finish one stream before the next")
                launched = None
                bound = committed + (pending.max_tokens if pending else 0)  # what the cache may hold
                if pending is None or self.may_run_ahead(bound, pending.max_tokens):
                    if bound + 2 > limit:  # (only reached with nothing pending: bound is exact)
                        yield self.stopper.finish("length")
                        break
                    launched = self.launch(bound, clock, reader)
                if pending is not None:
                    count, tokens = pending.read()
                    now = time.perf_counter()
                    if pending.nodes is not None:
                        self.method.observe(pending.nodes, committed, now - max(read_at, pending.launched_at),
                                            pending.probed)
                    read_at, committed = now, committed + count
                    chunk = self.stopper.push(tokens)
                    chunk.acceptance_length = len(chunk.token_ids)
                    yield chunk
                pending = launched
        self.stats["stage_seconds"] = clock.totals()  # waits for the kernels of a round launched past the end
        self.stats["seconds"] = time.perf_counter() - started

    def may_run_ahead(self, bound: int, unread: int) -> bool:
        """Whether the next round is needed however many tokens the unread round adds (up to `unread`),
        and fits the context as it would with the exact count; otherwise the host reads first."""
        return (self.run_ahead and self.stopper.remaining > unread
                and bound + self.method.block + 2 <= self.ws.context_limit)

    def launch(self, committed: int, clock: StageClock, reader: OutcomeReader) -> Launched:
        """Starts one round, `committed` being at least the tokens in the cache when it runs."""
        self.rounds += 1
        clock.mark("round")
        launched_at = time.perf_counter()
        tree, (rows,) = run_round(self.stages, 1, [Member(0, self.method, committed)], clock)
        return Launched(reader.after(tree.out[0]), tree.path_rows, self.method.timed_nodes(rows), self.method.probed,
                        launched_at)

    def prefill(self) -> StreamChunk:
        """The prompt fills the cache and its last logits choose the first new token (the first bonus)."""
        return self.stopper.push([join(self.stages, 0, self.ids, self.method, self.options.sampling, self.seed)])


def join(stages: Stages, index: int, ids: list[int], method: DecodingMethod, sampling: SamplingParams, seed: int) -> int:
    """A prompt into sequence `index`'s slot, between rounds: the prefill fills its cache, its last logits
    choose the first new token (the first bonus, returned), and a drafting method's drafter reads the
    prompt's features. Its sampling values and seed go where the rounds' verifies read them."""
    ws = stages.ws
    ws.sampling.set(sampling, index)
    ws.seed[index] = seed_key(seed) if not sampling.greedy else 0
    ws.load_prompt(ids, index)
    rows = ws.prefill_rows(len(ids))
    stages.prefill(rows, method.taps, index).run()
    noise = None
    if not sampling.greedy:
        noise = stages.position_noise(ws.seed[index], ws.committed[index].view(1), ws.token_keys)
    ws.bonus[index] = choose_tokens(ws.prompt_logits, ws.sampling.row(index), noise=noise)[0]
    if method.drafts:
        stages.absorb(ws.draft_attend(len(ids)), rows, index).run()
    return int(ws.bonus[index])


def request_seed(options: GenerationOptions) -> int | None:
    """The request's seed; a sampled request without one gets a fresh random one."""
    return options.seed if options.seed is not None or options.sampling.greedy else torch.seed()
