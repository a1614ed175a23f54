"""Many requests at once: each decodes in its own slot of the engine's workspace, and one round (one draft,
one verify, one commit; `methods.run_round`) serves them all. Requests join between rounds (their prefill
runs then, into a free slot) and leave when they finish, so a long request never holds up the rest.

Each sequence's work reads only its own cache rows, mask, sampling values and seed, so a request's tokens
are its solo run's whatever it shares rounds with.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .errors import DDTreeError
from .generation import STAGES, StageClock, join, request_seed
from .methods import DecodingMethod, Member, run_round
from .options import GenerationOptions
from .results import GenerationResult, StreamChunk
from .stopping import StopChecker


@dataclass(eq=False)  # (a request is itself: two asking the same are two)
class BatchRequest:
    """One request of a batch: what it asked for and, as it decodes, where it stands."""
    ids: list[int]
    options: GenerationOptions
    method: DecodingMethod
    stopper: StopChecker
    order: int  # its place among the requests given
    index: int | None = None  # its slot while it decodes
    committed: int = 0  # tokens in its cache
    started: float = 0.0  # when it joined
    first_token_seconds: float = 0.0
    chunks: list[StreamChunk] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def finished(self) -> bool:
        return bool(self.chunks) and self.chunks[-1].finish_reason is not None

    def result(self, stage_seconds: dict[str, float]) -> GenerationResult:
        lengths = [chunk.acceptance_length for chunk in self.chunks if chunk.acceptance_length is not None]
        decoding = self.options.decoding
        return GenerationResult(
            text="".join(chunk.text for chunk in self.chunks),
            token_ids=[token for chunk in self.chunks for token in chunk.token_ids],
            prompt_tokens=len(self.ids), acceptance_lengths=lengths, seconds=self.seconds,
            stage_seconds=stage_seconds, finish_reason=self.chunks[-1].finish_reason or "length",
            method=decoding.method, budget=decoding.budget, chosen_budgets=self.method.chosen,
            first_token_seconds=self.first_token_seconds)


class BatchRunner:
    """Decodes requests in up to `slots` sequences at once, in a workspace sized for `context` tokens per
    sequence and trees of up to `rows` rows. `add` queues a request; `run` decodes until all are done,
    yielding each request's chunks as they come."""

    def __init__(self, engine, slots: int, context: int, rows: int):
        if slots < 1:
            raise DDTreeError(f"a batch needs at least one slot, got {slots}")
        self.engine = engine
        self.ws = engine.workspace_for(context, rows, slots)
        self.stages = engine.stages
        for index in range(slots):  # (a solo generation leaves its slot marked live)
            self.ws.free(index)
        self.slots: list[BatchRequest | None] = [None] * slots
        self.waiting: deque[BatchRequest] = deque()
        self.added = 0
        self.clock = StageClock(self.ws.device)
        engine.tickets += 1
        self.ticket = engine.tickets

    def add(self, ids: list[int], options: GenerationOptions) -> BatchRequest:
        """Queues a request (token ids); it joins the batch when a slot is free."""
        engine = self.engine
        if len(ids) >= engine.context_limit:
            raise DDTreeError(f"the prompt has {len(ids)} tokens; the context holds {engine.context_limit} in all")
        method = engine.method_for(options.decoding)
        needed = engine.tokens_held(len(ids), options.max_new_tokens, method.block)
        if not self.ws.fits(needed, method.rows):
            raise DDTreeError(f"a request of {needed} tokens and trees of {method.rows} rows does not fit this batch's "
                              f"workspace ({self.ws.context} tokens, {self.ws.max_rows} rows)")
        stopper = StopChecker(engine.tokenizer, engine.target.eos_token_ids, list(options.stop), options.max_new_tokens)
        request = BatchRequest(ids, options, method, stopper, self.added)
        self.added += 1
        self.waiting.append(request)
        return request

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.slots)

    def fits(self, ids: list[int], options: GenerationOptions) -> bool:
        """Whether this batch's workspace has room for such a request."""
        method = self.engine.method_for(options.decoding)
        return self.ws.fits(self.engine.tokens_held(len(ids), options.max_new_tokens, method.block), method.rows)

    def run(self) -> Iterator[tuple[BatchRequest, StreamChunk]]:
        """Rounds until every request added (also while running) has finished: (request, chunk) pairs."""
        while self.busy:
            yield from self.step()

    def step(self) -> Iterator[tuple[BatchRequest, StreamChunk]]:
        """Waiting requests join, then one round: the chunks they produced."""
        with torch.inference_mode():
            self.ws.owner = self.ticket
            yield from self.admit()
            if any(self.slots):
                yield from self.round()

    def cancel(self, request: BatchRequest) -> None:
        """The request leaves now (its client went away): no more chunks for it."""
        if request in self.waiting:
            self.waiting.remove(request)
        elif request.index is not None and self.slots[request.index] is request:
            self.leave(request)

    def abandon(self) -> None:
        """Every request leaves (after a failed round, whose state nothing can trust)."""
        self.waiting.clear()
        for request in self.live():
            self.leave(request)

    def admit(self) -> Iterator[tuple[BatchRequest, StreamChunk]]:
        """Waiting requests into free slots (the lowest first, which keeps rounds' batches small)."""
        while self.waiting and None in self.slots:  # (a round's host read has finished what the device did)
            request = self.waiting.popleft()
            request.index = self.slots.index(None)
            request.started = time.perf_counter()
            self.slots[request.index] = request
            self.clock.mark("round")
            first = join(self.stages, request.index, request.ids, request.method, request.options.sampling,
                         request_seed(request.options))
            self.clock.mark("prefill")
            request.committed = len(request.ids)
            request.first_token_seconds = time.perf_counter() - request.started
            yield from self.emit(request, request.stopper.push([first]))

    def round(self) -> Iterator[tuple[BatchRequest, StreamChunk]]:
        """One round over every live request; those with no room left in the context finish first."""
        for request in self.live():
            if request.committed + 2 > self.ws.context_limit:
                yield from self.emit(request, request.stopper.finish("length"))
        live = self.live()
        if not live:
            return
        count = batch_size(max(request.index for request in live) + 1, len(self.slots))
        self.clock.mark("round")
        members = [Member(request.index, request.method, request.committed) for request in live]
        tree, _ = run_round(self.stages, count, members, self.clock)
        outcomes = tree.out.tolist()  # one host read for the whole batch
        for request in live:
            added, *tokens = outcomes[request.index]
            request.committed += added
            chunk = request.stopper.push(tokens[:added])
            chunk.acceptance_length = len(chunk.token_ids)
            yield from self.emit(request, chunk)

    def emit(self, request: BatchRequest, chunk: StreamChunk) -> Iterator[tuple[BatchRequest, StreamChunk]]:
        request.chunks.append(chunk)
        if chunk.finish_reason is not None:
            self.leave(request)
        yield request, chunk

    def leave(self, request: BatchRequest) -> None:
        """Its slot is free for the next round."""
        request.seconds = time.perf_counter() - request.started
        self.ws.free(request.index)
        self.slots[request.index] = None

    def live(self) -> list[BatchRequest]:
        return [request for request in self.slots if request is not None]

    def stage_seconds(self) -> dict[str, float]:
        return self.clock.totals() if len(self.clock.marks) > 1 else dict.fromkeys(STAGES, 0.0)


def batch_size(used: int, slots: int) -> int:
    """The batch size a round runs at when slots 0..used are in use: a power of two (a few graph shapes
    serve every batch), at most the slots there are."""
    return min(1 << (used - 1).bit_length(), slots)


def default_max_batch(engine, context: int, cap: int = 32) -> int:
    """How many requests a server decodes at once by default: on a GPU, as many sequences of `context`
    tokens as half the free memory holds (caches, trees and activations), at most `cap`; on the CPU, whose
    cores a single request already keeps busy, one."""
    if engine.device.type != "cuda":
        return 1
    free, _ = torch.cuda.mem_get_info(engine.device)
    cfg, itemsize = engine.model.cfg, engine.dtype.itemsize
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
    if engine.drafter is not None:
        d = engine.drafter.cfg
        per_token += 2 * d.num_layers * d.num_kv_heads * d.head_dim * itemsize
    per_sequence = per_token * context * 2  # (room for the verify's activations beside the cache)
    return max(1, min(cap, free // 2 // per_sequence))
