"""The decoding engine: target-only (`ar`), chain DFlash (`dflash`) and DDTree (`ddtree`) in one loop.

All three methods share the caches, the verify forward and the acceptance step; they differ only
in which tree is verified each round (the bonus token alone, a chain, or the best-first tree), so
their speeds compare fairly.

A round starts from the bonus token b at position s: a token the target chose whose K/V is not yet
in the cache. The drafter proposes a block after b, a tree is built from it, the target runs b plus
every node in one forward under the ancestor-only mask, and the longest path that matches the
target's own choices is accepted. The path's K/V rows move into place, their tapped features
become drafter context, and the choice at the path's end is the next bonus token.

Every round works on persistent buffers with shapes fixed by (method, budget, attended length):
the decoding state lives on the device, the four stages (draft, tree, verify, commit) only update
buffers in place, and the host reads back one small tensor per round (how many tokens were
accepted, and which). On CUDA each stage is captured once per shape as a CUDA graph and replayed,
which removes the per-kernel launch overhead that otherwise dominates a small model; on the CPU
the same stages run eagerly.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .costs import AutoBudget, RoundCosts, load_or_calibrate
from .drafter import Drafter
from .errors import DDTreeError
from .loading import Target
from .model import causal_mask
from .results import GenerationResult, StreamChunk
from .sampling import SamplingParams, choose_tokens, position_noise, seed_key, token_keys
from .stopping import StopChecker
from .tree import FrontierPlan, ancestor_mask, best_first_nodes, chain_structure, tree_size

METHODS = ("ar", "dflash", "ddtree")
# The default tree budget: chosen per round from this device's measured costs. Against the best fixed
# budget chosen after the fact it reached 0.99-1.05x on four datasets on the 2-core CPU, 0.99-1.00x on
# the H200 with the PyTorch tree build and 0.96-0.98x with the Triton tree kernel (docs/results/README.md).
DEFAULT_BUDGET = "auto"
STAGES = ("prefill", "draft", "tree", "verify", "commit", "host")
# Attended lengths are rounded up to a multiple of this, so a handful of graph shapes serve every context.
ATTEND_STEP = {"cpu": 32, "cuda": 256}
# With graphs, prompts are padded to a multiple of this many rows, so a few prefill graphs serve them all.
PREFILL_STEP = 128


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


class Graphs:
    """Runs stage functions: on CUDA each (stage, shape) is captured once as a CUDA graph and then
    replayed; elsewhere the function runs eagerly. A stage function reads and writes only persistent
    buffers, so a replay computes exactly what a fresh call would."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.enabled = enabled and device.type == "cuda"
        self.captured: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.stream = torch.cuda.Stream(device) if self.enabled else None

    def run(self, key: tuple, stage: Callable[[], None], repeatable: bool = True) -> None:
        """`repeatable`: running the stage twice equals running it once, so it may warm up eagerly on the
        capture stream first (library handles and workspaces must exist before a capture)."""
        if not self.enabled:
            stage()
            return
        self.capture(key, stage, repeatable).replay()

    def capture(self, key: tuple, stage: Callable[[], None], repeatable: bool = True) -> "torch.cuda.CUDAGraph":
        """The stage's graph, captured now if it is new. Capturing runs nothing but a repeatable stage's
        warm-up, so graphs can be made ahead of time without disturbing the decoding state."""
        graph = self.captured.get(key)
        if graph is None:
            # Nothing may run while a graph is captured: a round launched ahead would still be in flight.
            torch.cuda.current_stream().synchronize()
            self.stream.wait_stream(torch.cuda.current_stream())
            if repeatable:
                with torch.cuda.stream(self.stream):
                    stage()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                stage()
            torch.cuda.current_stream().wait_stream(self.stream)
            self.captured[key] = graph
        return graph


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def buckets(attend: Callable[[int], int], low: int, high: int, step: int) -> list[int]:
    """The graph shapes `attend` gives to the values low..high (it is step-wise, rounding up by `step`)."""
    return sorted({attend(value) for value in [*range(low, high, step), high]})


class Engine:
    def __init__(self, target: Target, drafter: Drafter | None, device: torch.device, dtype: torch.dtype,
                 cuda_graphs: bool = True):
        self.target, self.drafter = target, drafter
        self.model, self.tokenizer = target.model, target.tokenizer
        self.device, self.dtype = device, dtype
        self.context_limit = self.model.cfg.max_positions
        if drafter is not None:
            check_pair(target, drafter)
            self.context_limit = min(self.context_limit, drafter.cfg.max_positions - drafter.cfg.block_size)
            self.taps = tuple(drafter.cfg.target_layer_ids)
        else:
            self.taps = ()
        self.workspace: Workspace | None = None
        self.graphs = Graphs(device, cuda_graphs)
        # sampling noise inside the verify stage: some twenty elementwise operations, fused when compiling
        self.position_noise = torch.compile(position_noise) if self.model.compiled else position_noise
        self.auto: AutoBudget | None = None
        # Launch each round before reading the last one's outcome (`Generation.__iter__`): on a GPU the
        # host's work then overlaps the device's; on the CPU the host is the device, nothing overlaps.
        self.run_ahead = device.type == "cuda" and os.environ.get("DDTREE_RUN_AHEAD", "1") != "0"

    def workspace_for(self, context: int, nodes: int) -> "Workspace":
        """The persistent buffers, grown (and graphs recaptured) when a request needs more room than they have."""
        old = self.workspace
        if old is None or old.context < context or old.max_nodes < nodes:
            if old is not None:
                context, nodes = max(context, old.context), max(nodes, old.max_nodes)
            self.graphs.captured.clear()  # they point into the old buffers
            self.workspace = None  # let the old buffers go before the new ones are allocated
            self.workspace = Workspace(self, round_up(context, 1024), nodes)
        return self.workspace

    def auto_budget(self) -> AutoBudget:
        """The per-round budget chooser, from this device's stored calibration (made on first use)."""
        if self.auto is None:
            self.use_costs(load_or_calibrate(self))
        return self.auto

    def use_costs(self, costs: RoundCosts) -> None:
        """A new calibration for `auto`, whose learned acceptance starts afresh; graphs that wrote
        into the old chooser's tensors are dropped with it."""
        self.auto = AutoBudget(costs, self.device)
        self.graphs.captured.clear()

    # ----- prompts -------------------------------------------------------------------------------

    def encode(self, prompt: str | list[dict] | list[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt: raw ids, a message list (chat template), or text (chat template if `chat`)."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, list):
            ids = self.apply_chat_template(prompt)
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise DDTreeError("the prompt is empty")
            ids = self.apply_chat_template([{"role": "user", "content": prompt}]) if chat else self.tokenizer.encode(prompt)
        else:
            raise DDTreeError(f"a prompt is text, a list of messages or a list of token ids, not {type(prompt).__name__}")
        if not ids:
            raise DDTreeError("the prompt is empty")
        return ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DDTreeError("this target's tokenizer has no chat template; pass the prompt without --chat")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    # ----- generation ----------------------------------------------------------------------------

    def prepare(self, method: str = "ddtree", budget: int | str | None = None, context: int = 1024,
                temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> int:
        """Allocates the buffers for requests of up to `context` tokens (prompt and answer together) and
        captures every CUDA graph their decoding can replay, as a server does at start-up, so that no
        request pays for a capture mid-stream. Returns how many graphs were new (0 without graphs)."""
        generation = self.stream([0], method, budget, max(1, min(context, self.context_limit) - 1),
                                 temperature, top_k, top_p)
        return generation.capture_graphs()

    def generate(self, prompt, **kwargs) -> GenerationResult:
        """Generates to completion; keyword arguments as for `stream`."""
        chunks = self.stream(prompt, **kwargs)
        token_ids, text, lengths, finish = [], "", [], "length"
        for chunk in chunks:
            token_ids += chunk.token_ids
            text += chunk.text
            if chunk.acceptance_length is not None:
                lengths.append(chunk.acceptance_length)
            finish = chunk.finish_reason or finish
        stats = chunks.stats  # type: ignore[attr-defined]
        return GenerationResult(
            text, token_ids, stats["prompt_tokens"], lengths, stats["seconds"], stats["stage_seconds"], finish,
            stats["method"], stats["budget"], stats["budgets"],
        )

    def stream(
        self,
        prompt,
        method: str = "ddtree",
        budget: int | str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        chat: bool = False,
    ) -> "Generation":
        """An iterator of StreamChunk; after it ends, `.stats` holds timing and the prompt length."""
        if method not in METHODS:
            raise DDTreeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method != "ar" and self.drafter is None:
            raise DDTreeError(f"method {method!r} needs a drafter")
        if budget is None:
            budget = DEFAULT_BUDGET
        if budget != "auto" and (not isinstance(budget, int) or budget < 1):
            raise DDTreeError(f"budget must be 'auto' or an integer >= 1, got {budget!r}")
        if max_new_tokens < 1:
            raise DDTreeError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        params = SamplingParams(temperature, top_k, top_p).validate()
        ids = self.encode(prompt, chat)
        if len(ids) >= self.context_limit:
            raise DDTreeError(f"the prompt has {len(ids)} tokens; the context holds {self.context_limit} in all")
        if not params.greedy and seed is None:
            seed = torch.seed()
        stopper = StopChecker(self.tokenizer, self.target.eos_token_ids, stop or [], max_new_tokens)
        return Generation(self, ids, method, budget, params, seed, stopper)


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
    size: int | None  # auto: the nodes it verifies, when its time corrects auto's cost model
    probed: bool
    launched_at: float


class Workspace:
    """Buffers that persist across requests: both caches and the per-round decoding state.

    The target cache holds `context` committed tokens plus one verify's nodes; the drafter cache is
    laid out as `Drafter.new_cache` describes. The state tensors are what the stages read and write:
    `committed` (tokens in the target cache, also the bonus token's position), `bonus`, `pending_start`
    (position of the first context row the drafter has not yet seen) and `features` (those rows).
    """

    def __init__(self, engine: "Engine", context: int, max_nodes: int):
        model, drafter, device = engine.model, engine.drafter, engine.device
        self.context, self.max_nodes = context, max_nodes
        self.cache = model.new_cache(context + max_nodes + 1)
        self.draft_cache = drafter.new_cache(context) if drafter is not None else None
        self.block = drafter.cfg.block_size if drafter is not None else 1
        longest = max(self.cache.capacity, self.draft_cache.capacity if drafter is not None else 0)
        self.steps = torch.arange(longest, device=device)
        self.attend_step = ATTEND_STEP.get(device.type, 256)
        self.prefill_step = PREFILL_STEP if engine.graphs.enabled else 1
        self.context_limit = engine.context_limit
        self.prompt = torch.zeros(context, dtype=torch.long, device=device)  # padded with stale ids
        self.prompt_logits = torch.zeros(1, model.cfg.vocab_size, device=device)
        self.committed = torch.zeros((), dtype=torch.long, device=device)
        self.seed = torch.zeros((), dtype=torch.long, device=device)  # sampling: the request's seed_key
        self.token_keys = token_keys(model.cfg.vocab_size, device)
        self.pending_start = torch.zeros((), dtype=torch.long, device=device)
        self.bonus = torch.zeros((), dtype=torch.long, device=device)
        if drafter is not None:
            width = len(engine.taps) * model.cfg.hidden_size
            self.features = torch.zeros(1, self.block, width, device=device, dtype=engine.dtype)
            self.log_probs = torch.zeros(self.block - 1, model.cfg.vocab_size, device=device)  # a tree's draft
            self.chain_tokens = torch.zeros(self.block - 1, dtype=torch.long, device=device)  # a chain's draft
            self.block_tail = torch.full((self.block - 1,), drafter.cfg.mask_token_id, device=device)
            self.prompt_features = self.features.new_zeros(1, context, width)  # the first draft's context
        self.trees: dict[tuple[int, bool, bool], "TreeBuffers"] = {}
        self.prefixes: dict[tuple[str, int], "TreeBuffers"] = {}
        self.plans: dict[int, FrontierPlan] = {}
        # on CUDA trees of up to 256 nodes are built by one Triton kernel (tree_kernel.py), others and
        # every tree elsewhere by PyTorch operations
        self.tree_kernel = tree_kernel_for(engine.device)
        self.kernel_plans: dict = {}
        self.owner: object | None = None

    def prefill_rows(self, length: int) -> int:
        """Rows a prefill of `length` prompt tokens runs: padded to a graph shape. The padding's cache
        rows and features lie past the committed context, so nothing attends them before rounds overwrite them."""
        return min(round_up(length, self.prefill_step), self.context, self.context_limit)

    def attend(self, rows: int) -> int:
        """Target cache slots a verify attends when rows 0..rows are in use (rounded up to a graph shape)."""
        return min(round_up(rows, self.attend_step), self.cache.capacity)

    def draft_attend(self, committed: int) -> int:
        """Drafter cache slots a draft attends: the scratch block and the committed context rows."""
        return min(round_up(self.block + committed, self.attend_step), self.draft_cache.capacity)

    def plan(self, budget: int) -> FrontierPlan:
        """The tree plan of `budget` nodes: no deeper than the block, nor than `budget` (a tree's depth)."""
        if budget not in self.plans:
            depth, vocab = self.log_probs.shape
            self.plans[budget] = FrontierPlan(budget, min(depth, budget), vocab, self.log_probs.device)
        return self.plans[budget]

    def kernel_plan(self, plan: FrontierPlan):
        """The Triton tree kernel's tables and scratch for `plan` (cached)."""
        if plan.budget not in self.kernel_plans:
            self.kernel_plans[plan.budget] = self.tree_kernel.KernelPlan(plan, self.log_probs.device)
        return self.kernel_plans[plan.budget]

    def tree(self, size: int, engine: "Engine", scored: bool = False, chain: bool = False) -> "TreeBuffers":
        """Tree buffers of `size` rows; `scored` ones (auto's) also keep their nodes' scores; a `chain`'s
        (plain DFlash's) hold its fixed shape."""
        if (size, scored, chain) not in self.trees:
            self.trees[size, scored, chain] = TreeBuffers(size, engine, self, scored=scored, chain=chain)
        return self.trees[size, scored, chain]

    def prefix(self, tree: "TreeBuffers", size: int, engine: "Engine") -> "TreeBuffers":
        """The first `size` rows of `tree`, as a tree of its own (cached)."""
        key = (tree.key, size)
        if key not in self.prefixes:
            self.prefixes[key] = TreeBuffers(size, engine, self, parent=tree)
        return self.prefixes[key]


class TreeBuffers:
    """One round's tree and its verification, for trees of `size` rows (the root and its nodes).

    A prefix tree (`parent` given) views the first `size` rows of a larger tree's ids, parents,
    depths and mask, which is a tree because nodes come in score order; it has its own outputs.
    `key` tells graphs over different buffers apart."""

    def __init__(self, size: int, engine: "Engine", workspace: "Workspace", parent: "TreeBuffers | None" = None,
                 scored: bool = False, chain: bool = False):
        device = engine.device
        self.size, self.path_rows = size, min(workspace.block, size)  # the longest path such a tree can have
        if parent is None:
            self.key = ("chain" if chain else "tree") + str(size) + ("-scored" if scored else "")
            self.ids = torch.zeros(size, dtype=torch.long, device=device)
            if chain:
                self.parents, self.depths, self.mask = chain_structure(size, device)
            else:
                self.parents = torch.zeros(size, dtype=torch.long, device=device)
                self.depths = torch.zeros(size, dtype=torch.long, device=device)
                self.mask = torch.eye(size, dtype=torch.bool, device=device)  # ancestor-or-self
            # auto: the nodes' path log-probabilities, from which it learns what gets accepted
            self.scores = torch.zeros(size - 1, device=device) if scored else None
        else:
            self.key = f"{parent.key}[:{size}]"
            self.ids, self.parents, self.depths = parent.ids[:size], parent.parents[:size], parent.depths[:size]
            self.mask = parent.mask[:size, :size]
            self.scores = parent.scores[:size - 1] if parent.scores is not None else None
        self.choices = torch.zeros(size, dtype=torch.long, device=device)
        self.features = workspace.features.new_zeros(1, size, workspace.features.shape[-1]) if engine.taps else None
        self.out = torch.zeros(self.path_rows + 1, dtype=torch.long, device=device)  # [count, tokens added...]
        self.yields: torch.Tensor | None = None  # auto: 1 + Φ(n) at each candidate size n


class Generation:
    """One request's decoding loop, as an iterator of StreamChunk; `.stats` holds timing afterwards."""

    def __init__(self, engine: Engine, ids, method, budget, params, seed: int | None, stopper: StopChecker):
        self.engine, self.ids, self.method, self.params = engine, ids, method, params
        self.budget = budget if method == "ddtree" else None
        self.seed, self.stopper = seed, stopper  # the seed keys the sampling noise (None when greedy)
        self.taps = engine.taps if method != "ar" else ()  # target features only feed a drafter
        self.stats: dict = {"prompt_tokens": len(ids), "method": method, "budget": self.budget, "budgets": []}
        drafter = engine.drafter
        self.block = drafter.cfg.block_size if drafter is not None and method != "ar" else 1
        depth = self.block - 1
        # auto: room for the largest candidate size (a probe round builds it and verifies the prefix it chooses)
        self.auto = engine.auto_budget() if self.budget == "auto" else None
        nodes = self.auto.largest if self.auto is not None else self.budget
        self.tree_budget = nodes if method == "ddtree" else None
        self.size = 1 + {"ar": 0, "dflash": depth, "ddtree": tree_size(nodes or 1, depth, engine.model.cfg.vocab_size)}[method]
        # Committed tokens never pass the request's end by more than one round's path, nor the context limit.
        self.context = min(engine.context_limit, len(ids) + stopper.max_new_tokens + self.block)
        self.workspace = engine.workspace_for(self.context, self.size)
        # The depths drafted: those the largest tree's plan has (a tree of n nodes is at most n deep), so a
        # small budget runs the drafter's LM head, three one-row target forwards' work at 15 depths, at fewer.
        self.draft_depth = self.workspace.plan(nodes).depth if method == "ddtree" else depth
        self.prompt_rows = 0  # rows of the prefill, whose features are the first draft's context
        self.probed = False  # auto: whether the last round was a probe
        self.rounds = 0  # launched so far

    def __iter__(self) -> Iterator[StreamChunk]:
        """Rounds run one ahead of the host: round k+1 is launched before round k's outcome is read
        (its inputs are on the device already), so the device never waits while the host reads,
        streams text and checks for stops. Only its attended length needs the committed count, and
        an upper bound serves (the mask comes from the device's exact count). A round launched past
        the end is discarded; its time counts, since the next request would wait for it."""
        engine, ws = self.engine, self.workspace
        clock = StageClock(engine.device)
        started = time.perf_counter()
        ws.owner = self
        reader = OutcomeReader(engine.device, self.block + 1)
        with torch.inference_mode():
            chunk = self.prefill()
            clock.mark("prefill")
            yield chunk
            committed, pending, read_at = len(self.ids), None, time.perf_counter()
            while chunk.finish_reason is None:
                if ws.owner is not self or engine.workspace is not ws:
                    raise DDTreeError("another generation started on this engine; finish one stream before the next")
                launched = None
                bound = committed + (pending.max_tokens if pending else 0)  # what the cache may hold
                if pending is None or self.may_run_ahead(bound, pending.max_tokens):
                    if bound + 2 > engine.context_limit:  # (only reached with nothing pending: bound is exact)
                        yield self.stopper.finish("length")
                        break
                    launched = self.launch(bound, clock, reader)
                if pending is not None:
                    count, tokens = pending.read()
                    now = time.perf_counter()
                    if pending.size is not None:
                        self.auto.observe(pending.size, committed, now - max(read_at, pending.launched_at),
                                          pending.probed)
                    read_at = now
                    committed += count
                    chunk = self.stopper.push(tokens)
                    chunk.acceptance_length = len(chunk.token_ids)
                    yield chunk
                pending = launched
        self.stats["stage_seconds"] = clock.totals()  # waits for the kernels of a round launched past the end
        self.stats["seconds"] = time.perf_counter() - started

    def may_run_ahead(self, bound: int, unread: int) -> bool:
        """Whether the next round is needed however many tokens the unread round adds (up to `unread`),
        and fits the context as it would with the exact count; otherwise the host reads first."""
        return (self.engine.run_ahead and self.stopper.remaining > unread
                and bound + self.block + 2 <= self.engine.context_limit)

    def launch(self, committed: int, clock: StageClock, reader: "OutcomeReader") -> "Launched":
        """Starts one round, `committed` being at least the tokens in the cache when it runs."""
        first, size = self.rounds == 0, self.size
        self.rounds += 1
        # A drafting round needs its deepest node inside the context; near the end, one token at a time.
        if size > 1 and committed + self.block + 1 > self.engine.context_limit:
            size = 1
        clock.mark("round")
        launched_at = time.perf_counter()
        tree = self.round(size, committed, first, clock)
        observed = self.auto is not None and size > 1 and not first  # (the first draft reads the whole prompt)
        return Launched(reader.after(tree.out), tree.path_rows, self.stats["budgets"][-1] if observed else None,
                        self.probed, launched_at)

    def prefill(self) -> StreamChunk:
        """The prompt fills the cache and its last logits choose the first new token (the first bonus)."""
        ws, length = self.workspace, len(self.ids)
        ws.prompt[:length].copy_(torch.tensor(self.ids))
        ws.committed.fill_(length)
        ws.pending_start.zero_()
        self.prompt_rows = ws.prefill_rows(length)
        self.engine.graphs.run(*self.prefill_stage(self.prompt_rows))
        noise = None
        if not self.params.greedy:
            ws.seed.fill_(seed_key(self.seed))  # read by the rounds' captured verify stages
            noise = self.engine.position_noise(ws.seed, ws.committed.view(1), ws.token_keys)
        ws.bonus.copy_(choose_tokens(ws.prompt_logits, self.params, noise=noise)[0])
        return self.stopper.push([int(ws.bonus)])

    def round(self, size: int, committed: int, first: bool, clock: StageClock) -> "TreeBuffers":
        """Launches one round's stages; returns the tree whose `out` will hold [count, tokens added...]."""
        engine, ws = self.engine, self.workspace
        tree = ws.tree(size, engine, scored=self.auto is not None, chain=self.method == "dflash" and size > 1)
        attend = ws.attend(committed + size)
        if size > 1:
            draft_attend = ws.draft_attend(committed)
            self.run_draft(draft_attend, self.prompt_rows if first else None)
            clock.mark("draft")
            if self.auto is not None:
                tree = self.auto_tree(self.auto_largest(), committed)
                attend = ws.attend(committed + tree.size)
                self.stats["budgets"].append(tree.size - 1)
            else:
                self.run_tree(tree, ws.plan(self.tree_budget) if self.method == "ddtree" else None)
        else:
            tree.ids[0] = ws.bonus
        clock.mark("tree")
        self.run_verify(tree, attend)
        clock.mark("verify")
        self.run_commit(tree)
        clock.mark("commit")
        return tree

    def auto_tree(self, largest: "TreeBuffers", committed: int) -> "TreeBuffers":
        """auto's tree this round. A probe builds the largest, reads every candidate size's expected
        tokens (a second host read) and keeps the best prefix; other rounds build the size chosen last."""
        auto, ws, engine = self.auto, self.workspace, self.engine
        self.probed = auto.probe_due()
        if not self.probed:
            # the chosen size built into the largest tree's first rows: the same buffers, and so the same
            # verify and commit graphs, as a probe round that chose it
            tree = ws.prefix(largest, auto.current + 1, engine)
            self.run_tree(tree, ws.plan(auto.current))
            return tree
        self.run_tree(largest, ws.plan(auto.largest))
        return ws.prefix(largest, auto.choose(largest.yields.tolist(), committed) + 1, engine)

    def auto_largest(self) -> "TreeBuffers":
        """auto's largest tree: probes build it and read every candidate size's expected yield from it."""
        largest = self.workspace.tree(self.size, self.engine, scored=True)
        if largest.yields is None:
            largest.yields = torch.zeros(len(self.auto.costs.sizes), device=self.engine.device)
        return largest

    # ----- stages through the graph cache: one key per stage and shape, shared with the calibration ----

    def prefill_stage(self, rows: int) -> tuple:
        return ("prefill", rows, bool(self.taps)), lambda: self.run_prefill(rows)

    def draft_stage(self, attend: int, prompt_rows: int | None = None) -> tuple:
        """A round's draft; the first round's (`prompt_rows` given) reads the prefill's features instead."""
        ws = self.workspace
        features = ws.features if prompt_rows is None else ws.prompt_features[:, :prompt_rows]
        return ("draft", attend, prompt_rows, self.draft_depth, self.method), lambda: self.draft(features, attend)

    def tree_stage(self, tree: "TreeBuffers", plan: FrontierPlan | None) -> tuple:
        return ("tree", self.method, tree.key), lambda: self.build_tree(tree, plan)

    def verify_stage(self, tree: "TreeBuffers", attend: int) -> tuple:
        return ("verify", tree.key, attend, self.params, bool(self.taps)), lambda: self.verify(tree, attend)

    def commit_stage(self, tree: "TreeBuffers") -> tuple:
        return ("commit", tree.key), lambda: self.commit(tree), False  # not repeatable: it moves the state on

    def run_draft(self, attend: int, prompt_rows: int | None = None) -> None:
        self.engine.graphs.run(*self.draft_stage(attend, prompt_rows))

    def run_tree(self, tree: "TreeBuffers", plan: FrontierPlan | None) -> None:
        self.engine.graphs.run(*self.tree_stage(tree, plan))

    def run_verify(self, tree: "TreeBuffers", attend: int) -> None:
        self.engine.graphs.run(*self.verify_stage(tree, attend))

    def run_commit(self, tree: "TreeBuffers") -> None:
        self.engine.graphs.run(*self.commit_stage(tree))

    def capture_graphs(self) -> int:
        """Captures now every graph this generation's rounds can replay, at every context its workspace
        holds, and returns how many were new. Otherwise each is captured on first use, in the middle
        of decoding: `auto` switches between several tree sizes, each verified at several context
        lengths, so a benchmark would time dozens of captures. Called before the prefill: only the
        stages' warm-ups run, at an empty context, and what they write the prefill and the rounds
        rewrite before reading."""
        engine, ws = self.engine, self.workspace
        if not engine.graphs.enabled:
            return 0
        before = len(engine.graphs.captured)
        with torch.inference_mode():
            ws.committed.zero_()  # the warm-ups' cache rows, then, lie inside every shape's attended slots
            ws.pending_start.zero_()
            built, verified = self.round_trees()
            stages = [self.tree_stage(tree, plan) for tree, plan in built]
            for tree in verified:
                attends = buckets(ws.attend, len(self.ids) + tree.size, self.context + tree.size, ws.attend_step)
                stages += [self.verify_stage(tree, attend) for attend in attends] + [self.commit_stage(tree)]
            if built:
                attends = buckets(ws.draft_attend, len(self.ids), self.context, ws.attend_step)
                stages += [self.draft_stage(attend) for attend in attends]
            # every prompt this workspace holds: its prefill's rows and, when it drafts, the first draft's shape
            lengths = range(1, min(self.context, engine.context_limit))
            stages += [self.prefill_stage(rows) for rows in sorted({ws.prefill_rows(n) for n in lengths})]
            if built:
                firsts = sorted({(ws.draft_attend(n), ws.prefill_rows(n)) for n in lengths})
                stages += [self.draft_stage(attend, rows) for attend, rows in firsts]
            for stage in stages:
                engine.graphs.capture(*stage)
        return len(engine.graphs.captured) - before

    def round_trees(self) -> tuple[list[tuple["TreeBuffers", FrontierPlan | None]], list["TreeBuffers"]]:
        """The trees this generation's drafting rounds build (with their plans), and those they verify."""
        engine, ws = self.engine, self.workspace
        if self.auto is not None:
            largest = self.auto_largest()
            prefixes = [ws.prefix(largest, size + 1, engine) for size in self.auto.costs.sizes]
            return ([(largest, ws.plan(self.auto.largest))] + [(p, ws.plan(p.size - 1)) for p in prefixes]), prefixes
        tree = ws.tree(self.size, engine, chain=self.method == "dflash")
        if self.method == "ar":
            return [], [tree]
        return [(tree, ws.plan(self.tree_budget) if self.method == "ddtree" else None)], [tree]

    # ----- stages: each reads and writes only workspace buffers ----------------------------------------

    def run_prefill(self, rows: int) -> None:
        """The prompt's first `rows` slots (padding included) through the target: its cache rows, the
        logits after its last real token (the committed count says which) and its tapped features."""
        engine, ws = self.engine, self.workspace
        model, device = engine.model, engine.device
        hidden, features = model(ws.prompt[None, :rows], ws.steps[None, :rows], causal_mask(rows, 0, device),
                                 ws.cache, 0, self.taps)
        last = (ws.committed - 1).clamp(min=0).view(1)  # (0 in a capture's warm-up, at an empty context)
        ws.prompt_logits.copy_(model.logits(hidden[0].index_select(0, last)))
        if features is not None:
            ws.prompt_features[:, :rows].copy_(features)

    def draft(self, features: torch.Tensor, attend: int) -> None:
        """Per-depth log-probs of the tokens after the bonus token, from one drafter pass; for a chain,
        only each depth's most likely token (its own buffer: a tree stage's warm-up may read `log_probs`).

        The new context rows (features of tokens from `pending_start` on; rows past the committed
        ones are stale and never attended) go to their slots, the block to the scratch rows."""
        engine, ws = self.engine, self.workspace
        model, block = engine.model, self.block
        steps = ws.steps
        context_positions = ws.pending_start + steps[:features.shape[1]]
        block_positions = ws.committed + steps[:block]
        slots = torch.cat([block + context_positions, steps[:block]])
        mask = steps[:attend] < block + ws.committed  # the scratch block, then committed context rows
        block_ids = torch.cat([ws.bonus[None], ws.block_tail])
        hidden = engine.drafter(
            model.embed_tokens(block_ids[None]), block_positions[None], features, context_positions[None],
            mask[None, None, None], ws.draft_cache, slots,
        )
        depth = self.draft_depth
        logits = model.logits(hidden[0, 1:depth + 1])
        if self.method == "dflash":  # a chain takes each depth's argmax, which the logits give as well
            torch.argmax(logits, dim=-1, out=ws.chain_tokens[:depth])
        else:
            torch.log_softmax(logits, dim=-1, out=ws.log_probs[:depth])

    def build_tree(self, tree: TreeBuffers, plan: FrontierPlan | None) -> None:
        ws = self.workspace
        tree.ids[0] = ws.bonus
        if plan is None:  # a chain: its shape is fixed in its buffers, its tokens each depth's argmax
            tree.ids[1:] = ws.chain_tokens
            return
        if ws.tree_kernel is not None and ws.tree_kernel.serves(plan):  # all in one kernel
            ws.tree_kernel.build(ws.log_probs[:plan.depth], ws.kernel_plan(plan), tree.ids, tree.parents, tree.depths,
                                 tree.scores, tree.mask)
            scores = tree.scores
        else:
            tokens, parents, depths, scores = best_first_nodes(ws.log_probs[:plan.depth], plan)
            if tree.scores is not None:
                tree.scores.copy_(scores)
            tree.ids[1:] = tokens
            tree.parents[1:] = parents
            tree.depths[1:] = depths
            tree.mask.copy_(ancestor_mask(tree.parents, self.block - 1))
        if tree.yields is not None:  # auto's trees are scored, so `scores` is set
            tree.yields.copy_(self.engine.auto.expected_yields(scores))

    def verify(self, tree: TreeBuffers, attend: int) -> None:
        """One target forward over the root and every node: the target's choice at each, and its features."""
        engine, ws = self.engine, self.workspace
        size = tree.size
        slots = ws.committed + ws.steps[:size]
        mask = (ws.steps[:attend] < ws.committed).expand(size, attend).clone()
        mask.scatter_(1, slots.expand(size, size), tree.mask)
        hidden, features = engine.model(
            tree.ids[None], (ws.committed + tree.depths)[None], mask[None, None], ws.cache, slots, self.taps
        )
        noise = None
        if not self.params.greedy:  # a node at depth d chooses the token at position committed + d + 1
            rows = min(tree.size, self.block)
            noise = engine.position_noise(ws.seed, ws.committed + 1 + ws.steps[:rows], ws.token_keys)[tree.depths]
        tree.choices.copy_(choose_tokens(engine.model.logits(hidden[0]), self.params, noise=noise))
        if features is not None:
            tree.features.copy_(features)

    def commit(self, tree: TreeBuffers) -> None:
        """Accepts the longest root path whose every token is the target's choice at its parent, moves
        its K/V rows into place, keeps its features for the drafter and sets the next bonus token."""
        ws = self.workspace
        if tree.size == 1:  # the bonus token alone (ar): accepted, and its row is in place already
            self.advance(tree, tree.choices[:1], tree.out.new_ones(()), tree.features)
            return
        steps, rows = ws.steps, tree.path_rows
        matches = (tree.ids == tree.choices[tree.parents]) | (steps[:tree.size] == 0)
        accepted = ~(tree.mask & ~matches[None, :]).any(dim=1)  # every ancestor matches
        count = accepted.sum()
        # path[d] = the accepted node at depth d; past the path's end, d itself (rows stay where they are)
        path = steps[:rows + 1].clone()
        path.scatter_(0, torch.where(accepted, tree.depths, rows), steps[:tree.size])
        path = path[:rows]
        ws.cache.move_rows(ws.committed + path, ws.committed + steps[:rows])
        if tree.scores is not None:
            self.engine.auto.learn(tree.scores, accepted[1:])
        self.advance(tree, tree.choices[path], count, tree.features[:, path] if tree.features is not None else None)

    def advance(self, tree: TreeBuffers, emitted: torch.Tensor, count: torch.Tensor, features: torch.Tensor | None):
        """The accepted path's `count` tokens join the context: `emitted` holds the target's choice after
        each path node, the last being the next bonus token; `features` are the path rows' taps."""
        ws = self.workspace
        if features is not None:
            ws.features[:, :features.shape[1]].copy_(features)
        ws.bonus.copy_(emitted.index_select(0, (count - 1).view(1))[0])
        ws.pending_start.copy_(ws.committed)
        ws.committed.add_(count)
        tree.out[0] = count
        tree.out[1:] = emitted


def tree_kernel_for(device: torch.device):
    """The module `tree_kernel` where it builds the trees on this device, else None. Imported only then
    (Triton takes a while to import); DDTREE_TREE_KERNEL=cpu also takes it on the CPU, where it only
    runs under Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    if device.type != "cuda" and os.environ.get("DDTREE_TREE_KERNEL") != "cpu":
        return None
    from . import tree_kernel
    return tree_kernel if tree_kernel.available(device) else None


def check_pair(target: Target, drafter: Drafter) -> None:
    """Refuses a drafter that was not made for this target, with a message that says which part differs."""
    t, d = target.model.cfg, drafter.cfg
    if d.hidden_size != t.hidden_size:
        raise DDTreeError(f"drafter hidden size {d.hidden_size} does not match the target's {t.hidden_size}")
    if d.vocab_size != t.vocab_size:
        raise DDTreeError(f"drafter vocabulary ({d.vocab_size}) does not match the target's ({t.vocab_size})")
    if not 0 <= d.mask_token_id < t.vocab_size:
        raise DDTreeError(f"drafter mask token id {d.mask_token_id} is outside the target's vocabulary of {t.vocab_size}")
    bad = [i for i in d.target_layer_ids if not 0 <= i < t.num_layers]
    if bad:
        raise DDTreeError(f"drafter reads target layers {bad}, but the target has layers 0..{t.num_layers - 1}")
    if d.num_target_layers is not None and d.num_target_layers != t.num_layers:
        raise DDTreeError(f"drafter was made for a target of {d.num_target_layers} layers; this one has {t.num_layers}")
