"""The host loop: requests decode together, each in its own slot of the engine's workspace. A request joins
between rounds (its prefill runs then), rounds over every live request (one draft, one verify, one commit:
`methods.run_round`) are launched one ahead of the host, their outcomes read, streamed and checked for
stops, and a finished request leaves. One request alone (`Generation`) is a batch of one. The device work
is the methods' and stages'; this module decides when to launch, reads what came back and times stages.

Each sequence's work reads only its own cache rows, mask, sampling values and seed, so a request's tokens
are its solo run's whatever it shares rounds with.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .errors import DDTreeError
from .methods import DecodingMethod, Member, Probe, Timing, run_round
from .options import GenerationOptions
from .results import GenerationResult, StreamChunk
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

    def mark(self, stage: str) -> object:
        """Marks the end of `stage` (and the start of what follows); returns the mark, for `seconds`."""
        self.marks.append((stage, self.stamp()))
        return self.marks[-1][1]

    def stamp(self) -> object:
        """Now on the device: an event recorded on the stream (CUDA), else the wall clock."""
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        """The device's time from stamp `start` to stamp `end` (waits for `end`)."""
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000

    def totals(self) -> dict[str, float]:
        seconds = dict.fromkeys(STAGES, 0.0)
        if self.cuda and self.marks:
            self.marks[-1][1].synchronize()
        for (_, before), (stage, after) in itertools.pairwise(self.marks):
            gap = before.elapsed_time(after) / 1000 if self.cuda else after - before
            seconds["host" if stage == "round" else stage] += gap
        return seconds


class OutcomeReader:
    """Reads what a round leaves on the device (its `out`: [sequences, 1 + tokens], each sequence's count,
    then its tokens; auto's probe values) without stalling the device. On CUDA the copies go into pinned
    host buffers behind the round's kernels (two sets: at most two rounds are unread, one running, one
    launched), and reading waits for that round alone; elsewhere rounds run as they are launched, so the
    values are read at once (the next round reuses the device buffers)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.buffers: dict[tuple, torch.Tensor] = {}
        self.turn = 0

    def after(self, *tensors: torch.Tensor) -> Callable[[], list[list]]:
        """How to read `tensors`' values as the round launched last leaves them (as lists)."""
        if not self.cuda:
            values = [tensor.tolist() for tensor in tensors]
            return lambda: values
        copies = [self.host_buffer(tensor) for tensor in tensors]
        self.turn ^= 1
        return copied(copies, tensors)

    def alone(self, tensor: torch.Tensor) -> Callable[[], list]:
        """How to read `tensor`'s values as the work launched so far leaves them, into a host buffer of its
        own (a joining request's first token: several may join before any is read)."""
        if not self.cuda:
            values = tensor.tolist()
            return lambda: values
        read = copied([torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)], [tensor])
        return lambda: read()[0]

    def host_buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (self.turn, tuple(tensor.shape), tensor.dtype)
        if key not in self.buffers:
            self.buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        return self.buffers[key]


def copied(copies: list[torch.Tensor], tensors) -> Callable[[], list[list]]:
    """`tensors` copied into the pinned `copies` behind the work launched so far; the returned function waits
    for that work alone and reads them."""
    for copy, tensor in zip(copies, tensors):
        copy.copy_(tensor, non_blocking=True)
    done = torch.cuda.Event()
    done.record()

    def read() -> list[list]:
        done.synchronize()
        return [copy.tolist() for copy in copies]
    return read


@dataclass(eq=False)  # (a request is itself: two asking the same are two)
class BatchRequest:
    """One request: what it asked for and, as it decodes, where it stands."""
    ids: list[int]
    options: GenerationOptions
    method: DecodingMethod
    stopper: StopChecker
    index: int | None = None  # its slot while it decodes
    committed: int = 0  # tokens in its cache once every launched round is read
    left: bool = False  # finished or cancelled: no more chunks
    started: float = 0.0  # when it joined
    first: Callable[[], list] | None = None  # how to read its first token, until it is read
    first_token_seconds: float = 0.0
    seconds: float = 0.0  # from joining to leaving
    chunks: list[StreamChunk] = field(default_factory=list)

    def result(self, stage_seconds: dict[str, float], batch_rounds: int | None = None) -> GenerationResult:
        lengths = [chunk.acceptance_length for chunk in self.chunks if chunk.acceptance_length is not None]
        decoding = self.options.decoding
        return GenerationResult(
            text="".join(chunk.text for chunk in self.chunks),
            token_ids=[token for chunk in self.chunks for token in chunk.token_ids],
            prompt_tokens=len(self.ids), acceptance_lengths=lengths, seconds=self.seconds,
            stage_seconds=stage_seconds, finish_reason=next((c.finish_reason for c in self.chunks if c.finish_reason),
                                                            "length"),
            method=decoding.method, budget=decoding.budget, chosen_budgets=self.method.chosen,
            first_token_seconds=self.first_token_seconds, batch_rounds=batch_rounds)


@dataclass
class Launched:
    """A round on its way: how to read its outcome (and auto's probe values), each request in it with the
    most tokens it can add, what auto learns from its time (stamps at its start and end on the device: a
    prefill queued before it, or the host's pace, do not count), and its probe."""
    read: Callable[[], list[list]]
    members: dict[BatchRequest, int]
    timing: Timing | None
    probe: Probe | None
    started: object
    ended: object


class BatchRunner:
    """Decodes requests in up to `slots` sequences at once, in the engine's workspace sized for `context` tokens
    per sequence and trees of up to `rows` rows. `add` queues a request; `step` admits waiting ones and runs a
    round; `run` steps until all are done. Both yield (request, chunk) pairs as chunks come.

    Rounds run one ahead of the host: round k+1 is launched before round k's outcome is read (its inputs
    are on the device already), so the device never waits while the host reads, streams text and checks
    for stops. Only attended lengths need the committed counts, and upper bounds serve (masks come from the
    device's exact counts). What a round launched past a request's end computed for it is discarded.

    The engine numbers runners: the workspace keeps the number of the one decoding in it, and an older one
    still running is refused, not interleaved."""

    def __init__(self, engine, slots: int, context: int, rows: int):
        if slots < 1:
            raise DDTreeError(f"a batch needs at least one slot, got {slots}")
        self.engine = engine
        self.ws = engine.workspace_for(context, rows, slots)
        self.stages = engine.stages
        self.slots: list[BatchRequest | None] = [None] * slots
        self.waiting: deque[BatchRequest] = deque()
        self.pending: Launched | None = None
        self.rounds = 0  # launched
        self.run_ahead = engine.run_ahead
        self.reader = OutcomeReader(self.ws.device)
        self.clock = StageClock(self.ws.device)
        engine.tickets += 1
        self.ticket = self.ws.owner = engine.tickets
        for index in range(slots):  # (a runner before this one may have left its slots marked live)
            self.ws.free(index)

    def add(self, ids: list[int], options: GenerationOptions, method: DecodingMethod | None = None) -> BatchRequest:
        """Queues a request (token ids; its method object, when the caller made it already); it joins the
        batch when a slot is free."""
        engine = self.engine
        if len(ids) >= engine.context_limit:
            raise DDTreeError(f"the prompt has {len(ids)} tokens; the context holds {engine.context_limit} in all")
        method = method or engine.method_for(options.decoding)
        if not self.fits(ids, options, method):
            raise DDTreeError(f"a request of {len(ids)} prompt tokens and {options.max_new_tokens} new ones does "
                              f"not fit this batch's workspace ({self.ws.context} tokens, {self.ws.max_rows} rows)")
        stopper = StopChecker(engine.tokenizer, engine.target.eos_token_ids, list(options.stop), options.max_new_tokens)
        request = BatchRequest(ids, options, method, stopper)
        self.waiting.append(request)
        return request

    def fits(self, ids: list[int], options: GenerationOptions, method: DecodingMethod | None = None) -> bool:
        """Whether this batch's workspace has room for such a request."""
        method = method or self.engine.method_for(options.decoding)
        return self.ws.fits(self.engine.tokens_held(len(ids), options.max_new_tokens, method.block), method.rows)

    @property
    def owns(self) -> bool:
        """Whether the engine's workspace is still this runner's (no other runner, nor a grown workspace, since)."""
        return self.engine.workspace is self.ws and self.ws.owner == self.ticket

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(self.slots) or self.pending is not None

    def run(self) -> Iterator[tuple[BatchRequest, StreamChunk]]:
        """Steps until every request added (also while running) has finished."""
        while self.busy:
            yield from self.step()

    def step(self) -> Iterator[tuple[BatchRequest, StreamChunk]]:
        """Waiting requests join; the next round is launched (unless the host must read first); the round
        before it is read."""
        with torch.inference_mode():
            if not self.owns:
                raise DDTreeError("another generation started on this engine; finish one stream before the next")
            self.admit()
            launched = None
            if any(self.slots) and (self.pending is None or self.may_run_ahead()):
                if self.pending is None:  # counts are exact: who has no room left for a round finishes
                    for request in self.live():
                        if request.committed + 2 > self.ws.context_limit:
                            yield from self.greet(request)
                            if not request.left:
                                yield from self.emit(request, request.stopper.finish("length"))
                if any(self.slots):
                    launched = self.launch()
            for request in self.live():  # (after the launch: the device runs the round while the host waits here)
                yield from self.greet(request)
            if self.pending is not None:
                yield from self.read(self.pending)
            self.pending = launched

    def admit(self) -> None:
        """Waiting requests into free slots (the lowest first, which keeps rounds' batches small). A round in
        flight still computes for a slot it found free; the prefill runs after it on the device, and its
        first token is read after the next launch (`greet`), so the device never waits for the host here."""
        while self.waiting and None in self.slots:
            request = self.waiting.popleft()
            request.index = self.slots.index(None)
            request.started = time.perf_counter()
            self.slots[request.index] = request
            self.clock.mark("round")
            join(self.stages, request.index, request.ids, request.method, request.options.sampling,
                 request_seed(request.options))
            self.clock.mark("prefill")
            request.committed = len(request.ids)
            request.first = self.reader.alone(self.ws.bonus[request.index:request.index + 1])

    def greet(self, request: BatchRequest) -> Iterator[tuple[BatchRequest, StreamChunk]]:
        """A joined request's first token, once (a round launched with it before then computed past its end
        if that token ends it: its outcome is discarded as a run-ahead one is)."""
        if request.first is None:
            return
        first, request.first = request.first(), None
        request.first_token_seconds = time.perf_counter() - request.started
        yield from self.emit(request, request.stopper.push(first))

    def unread(self, request: BatchRequest) -> int:
        """The most tokens the round in flight may still add to the request."""
        return self.pending.members.get(request, 0) if self.pending is not None else 0

    def may_run_ahead(self) -> bool:
        """Whether every live request needs the next round however many tokens the unread one adds, and
        has room for it as it would with the exact count; otherwise the host reads first."""
        return self.run_ahead and all(
            request.stopper.remaining > self.unread(request)
            and request.committed + self.unread(request) + request.method.block + 2 <= self.ws.context_limit
            for request in self.live())

    def launch(self) -> Launched:
        """Starts one round over every live request."""
        live = self.live()
        count = batch_size(max(request.index for request in live) + 1, len(self.slots))
        started = self.clock.mark("round")
        members = [Member(r.index, r.method, r.committed + self.unread(r)) for r in live]
        launch = run_round(self.stages, count, members, self.clock)
        self.rounds += 1
        probed = [launch.probe.values] if launch.probe is not None else []
        read = self.reader.after(launch.tree.out[:count], *probed)
        return Launched(read, {request: min(self.ws.block, used) for request, used in zip(live, launch.rows)},
                        launch.timing, launch.probe, started, self.clock.stamp())

    def read(self, launched: Launched) -> Iterator[tuple[BatchRequest, StreamChunk]]:
        """A round's outcome for each request still there: its tokens, streamed and checked for stops."""
        outcomes, *probed = launched.read()
        if launched.timing is not None:
            launched.timing.observe(self.clock.seconds(launched.started, launched.ended))
        if launched.probe is not None:
            launched.probe.choose(probed[0])
        for request in launched.members:
            if request.left:  # (it finished in the round before; this one ran past its end)
                continue
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

    def cancel(self, request: BatchRequest) -> None:
        """The request leaves now (its client went away): no more chunks for it."""
        if request in self.waiting:
            self.waiting.remove(request)
            request.left = True
        elif not request.left and request.index is not None:
            self.leave(request)

    def abandon(self) -> None:
        """Every request leaves (after a failed round, whose state nothing can trust)."""
        for request in list(self.waiting):
            self.cancel(request)
        for request in self.live():
            self.leave(request)
        self.pending = None

    def leave(self, request: BatchRequest) -> None:
        """Its slot is free for the next round (on the device, after any round in flight)."""
        request.seconds = time.perf_counter() - request.started
        request.left = True
        self.ws.free(request.index)
        self.slots[request.index] = None

    def live(self) -> list[BatchRequest]:
        return [request for request in self.slots if request is not None]

    def stage_seconds(self) -> dict[str, float]:
        """Each stage's time over the runner's life (waits for the kernels of a round launched past the end)."""
        return self.clock.totals()


class Generation:
    """One request's decoding (a batch of one), as an iterator of StreamChunk; `.stats` holds timing afterwards."""

    def __init__(self, runner: BatchRunner, request: BatchRequest):
        self.runner, self.request = runner, request
        options = request.options
        self.stats: dict = {"prompt_tokens": len(request.ids), "method": options.decoding.method,
                            "budget": options.decoding.budget, "budgets": request.method.chosen}

    def __iter__(self) -> Iterator[StreamChunk]:
        started = time.perf_counter()
        for _, chunk in self.runner.run():
            yield chunk
        self.stats["stage_seconds"] = self.runner.stage_seconds()
        self.stats["seconds"] = time.perf_counter() - started


def join(stages: Stages, index: int, ids: list[int], method: DecodingMethod, sampling: SamplingParams, seed: int) -> None:
    """A prompt into sequence `index`'s slot, between rounds: the prefill fills its cache, its last logits
    choose the first new token (the first bonus, left on the device), and a drafting method's drafter reads
    the prompt's features. Its sampling values and seed go where the rounds' verifies read them."""
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


def request_seed(options: GenerationOptions) -> int | None:
    """The request's seed; a sampled request without one gets a fresh random one."""
    return options.seed if options.seed is not None or options.sampling.greedy else torch.seed()


def batch_size(used: int, slots: int) -> int:
    """The batch size a round runs at when slots 0..used are in use: a power of two (a few graph shapes
    serve every batch), at most the slots there are."""
    return min(1 << (used - 1).bit_length(), slots)


def batch_sizes(slots: int) -> list[int]:
    """Every batch size that rounds over up to `slots` sequences run at."""
    return sorted({batch_size(used, slots) for used in range(1, slots + 1)})


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
