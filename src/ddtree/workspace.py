"""The device buffers a decoding round works in, and the graph cache that replays work on them.

Every round reads and writes persistent buffers whose shapes depend only on (method, budget,
attended length): the caches, the decoding state and one set of tree buffers per tree shape. On
CUDA each stage is captured once per shape as a CUDA graph over these buffers and replayed, which
removes the per-kernel launch cost that otherwise dominates a small model; on the CPU the same
stages run eagerly.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from .sampling import SamplingState, token_keys
from .tree import FrontierPlan, chain_structure

# Attended lengths are rounded up to a multiple of this, so a handful of graph shapes serve every context.
ATTEND_STEP = {"cpu": 32, "cuda": 256}
# With graphs, prompts are padded to a multiple of this many rows, so a few prefill graphs serve them all.
PREFILL_STEP = 128


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def buckets(attend: Callable[[int], int], low: int, high: int, step: int) -> list[int]:
    """The graph shapes `attend` gives to the values low..high (it is step-wise, rounding up by `step`)."""
    return sorted({attend(value) for value in [*range(low, high, step), high]})


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


def tree_kernel_for(device: torch.device):
    """The module `tree_kernel` where it builds the trees on this device, else None. Imported only then
    (Triton takes a while to import); DDTREE_TREE_KERNEL=cpu also takes it on the CPU, where it only
    runs under Triton's interpreter (TRITON_INTERPRET=1, for tests)."""
    if device.type != "cuda" and os.environ.get("DDTREE_TREE_KERNEL") != "cpu":
        return None
    from . import tree_kernel  # (optional: Triton)
    return tree_kernel if tree_kernel.available(device) else None


class Workspace:
    """Buffers that persist across requests: both caches and the decoding state of up to `batch` sequences.

    The target cache holds, per sequence, `context` committed tokens plus one verify's rows; the drafter
    cache is laid out as `Drafter.new_cache` describes. The state tensors, one entry per sequence, are
    what the stages read and write: `committed` (tokens in the target cache, also the bonus token's
    position), `bonus`, `pending_start` (position of the first context row the drafter has not yet seen),
    `features` (those rows) and `live` (a sequence is decoding there: a free slot's rounds change nothing
    it keeps). A draft leaves per-depth log-probs in `log_probs` (for trees) and each depth's likeliest
    token in `chain_tokens` (for chains). A prompt is prefilled into one sequence's slot at a time
    through `prompt`, `prompt_logits` and `prompt_features`.
    """

    def __init__(self, model, drafter, taps: tuple[int, ...], dtype: torch.dtype, context: int, max_rows: int,
                 context_limit: int, graphs: bool, batch: int = 1):
        device = model.embed_tokens.weight.device
        self.device, self.context, self.max_rows, self.context_limit = device, context, max_rows, context_limit
        self.batch = batch
        self.cache = model.new_cache(context + max_rows + 1, batch)
        self.draft_cache = drafter.new_cache(context, batch) if drafter is not None else None
        self.block = drafter.cfg.block_size if drafter is not None else 1
        longest = max(self.cache.capacity, self.draft_cache.capacity if drafter is not None else 0)
        self.steps = torch.arange(longest, device=device)
        self.attend_step = ATTEND_STEP.get(device.type, 256)
        self.prefill_step = PREFILL_STEP if graphs else 1
        self.prompt = torch.zeros(context, dtype=torch.long, device=device)  # padded with stale ids
        self.prompt_logits = torch.zeros(1, model.cfg.vocab_size, device=device)
        per_sequence = lambda dtype=torch.long: torch.zeros(batch, dtype=dtype, device=device)  # noqa: E731
        self.committed, self.pending_start, self.bonus = per_sequence(), per_sequence(), per_sequence()
        self.seed = per_sequence()  # sampling: each request's seed_key
        self.live = per_sequence(torch.bool)
        self.sampling = SamplingState(device, batch)
        self.token_keys = token_keys(model.cfg.vocab_size, device)
        if drafter is not None:
            width = len(taps) * model.cfg.hidden_size
            self.features = torch.zeros(batch, self.block, width, device=device, dtype=dtype)
            drafted = drafter.drafted_vocab_size(model.cfg.vocab_size)
            self.log_probs = torch.zeros(batch, self.block - 1, drafted, device=device)
            self.chain_tokens = torch.zeros(batch, self.block - 1, dtype=torch.long, device=device)
            self.block_tail = torch.full((self.block - 1,), drafter.cfg.mask_token_id, device=device)
            self.prompt_features = self.features.new_zeros(1, context, width)  # a joining sequence's context
            self.chain = chain_structure(self.block, device)  # a chain's parents, depths and mask
        self.yields: torch.Tensor | None = None  # auto: where a probe writes each size's expected tokens
        self.pooled: torch.Tensor | None = None  # auto: a shared budget's expected tokens at each size
        self.trees: dict[int, TreeBuffers] = {}
        self.prefixes: dict[tuple[int, int], TreeBuffers] = {}
        self.views: dict[int, Sequences] = {}
        self.plans: dict[int, FrontierPlan] = {}
        # on CUDA trees of up to tree_kernel.MAX_NODES nodes are built by one Triton kernel, others and
        # every tree elsewhere by PyTorch operations
        self.tree_kernel = tree_kernel_for(device)
        self.kernel_plans: dict = {}
        self.owner = 0  # the runner now decoding here (Engine numbers them)

    def load_prompt(self, ids: list[int], index: int = 0) -> None:
        """A new prompt for sequence `index`: its ids into the prompt buffer, the committed count its length,
        nothing drafted yet."""
        ids = torch.tensor(ids, dtype=self.prompt.dtype)
        # (from pinned memory the copy queues behind the rounds in flight; from pageable memory it waits for them)
        self.prompt[:len(ids)].copy_(ids.pin_memory() if self.device.type == "cuda" else ids, non_blocking=True)
        self.committed[index] = len(ids)
        self.pending_start[index] = 0
        self.live[index] = True

    def free(self, index: int) -> None:
        """Sequence `index` leaves: its slot, emptied, stays inside every round's attended lengths."""
        self.live[index] = False
        self.committed[index] = 0
        self.pending_start[index] = 0

    def fits(self, context: int, rows: int, batch: int = 1) -> bool:
        return self.context >= context and self.max_rows >= rows and self.batch >= batch

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
            depth, vocab = self.log_probs.shape[1:]
            self.plans[budget] = FrontierPlan(budget, min(depth, budget), vocab, self.device)
        return self.plans[budget]

    def kernel_plan(self, plan: FrontierPlan, count: int):
        """The Triton tree kernel's tables and scratch for `plan`, for trees of `count` sequences at once (cached)."""
        if (plan.budget, count) not in self.kernel_plans:
            self.kernel_plans[plan.budget, count] = self.tree_kernel.KernelPlan(plan, self.device, batch=count)
        return self.kernel_plans[plan.budget, count]

    def auto_yields(self, sizes: int) -> torch.Tensor:
        """[batch, sizes]: where auto's probes write each candidate size's expected tokens, per sequence."""
        if self.yields is None or self.yields.shape[1] != sizes:
            self.yields = torch.zeros(self.batch, sizes, device=self.device)
        return self.yields

    def pooled_yields(self, sizes: int) -> torch.Tensor:
        """[sizes]: where auto writes a shared budget's expected tokens at each size (`Stages.pool`)."""
        if self.pooled is None or self.pooled.shape[0] != sizes:
            self.pooled = torch.zeros(sizes, device=self.device)
        return self.pooled

    def sequences(self, count: int) -> "Sequences":
        """The first `count` sequences' state, caches and trees (a round over them runs at this batch size)."""
        if count not in self.views:
            self.views[count] = Sequences(self, count)
        return self.views[count]

    def tree(self, count: int, rows: int) -> "TreeBuffers":
        """The trees of the first `count` sequences verified at `rows` rows each: the first rows of one set
        of buffers of `max_rows` rows per sequence (cached), into which every tree of a round is built."""
        if count not in self.trees:
            self.trees[count] = TreeBuffers(count, self.max_rows, self)
        if rows == self.max_rows:
            return self.trees[count]
        if (count, rows) not in self.prefixes:
            self.prefixes[count, rows] = TreeBuffers(count, rows, self, parent=self.trees[count])
        return self.prefixes[count, rows]


class Sequences:
    """The first `count` sequences of a workspace, as views: their state, caches and sampling values."""

    def __init__(self, ws: Workspace, count: int):
        self.count = count
        self.committed, self.pending_start, self.bonus = ws.committed[:count], ws.pending_start[:count], ws.bonus[:count]
        self.seed, self.live = ws.seed[:count], ws.live[:count]
        self.cache = ws.cache.sequences(0, count)
        if ws.draft_cache is not None:
            self.draft_cache = ws.draft_cache.sequences(0, count)
            self.features, self.log_probs = ws.features[:count], ws.log_probs[:count]
            self.chain_tokens = ws.chain_tokens[:count]


class TreeBuffers:
    """One round's trees of `count` sequences and their verification, `rows` rows each: the root (the bonus
    token) and up to `rows - 1` drafted nodes. Sequence b's tree uses its first `used[b]` rows; the rows
    after them hold what earlier rounds left there, which is still a tree (nodes come in score order, every
    parent before its children), so verifying them is harmless, and they are never accepted.

    A prefix (`parent` given) views the first `rows` rows of a larger set's every buffer. `key` tells graphs
    over different buffers apart."""

    def __init__(self, count: int, rows: int, workspace: Workspace, parent: "TreeBuffers | None" = None):
        device = workspace.device
        self.count, self.rows = count, rows
        self.path_rows = min(workspace.block, rows)  # the longest path such a tree can have
        self.key = (count, rows)
        if parent is None:
            self.ids = torch.zeros(count, rows, dtype=torch.long, device=device)
            self.parents = torch.zeros(count, rows, dtype=torch.long, device=device)
            self.depths = torch.zeros(count, rows, dtype=torch.long, device=device)
            self.mask = torch.eye(rows, dtype=torch.bool, device=device).repeat(count, 1, 1)  # ancestor-or-self
            # auto: the nodes' path log-probabilities, from which it learns what gets accepted
            self.scores = torch.zeros(count, rows - 1, device=device)
            self.choices = torch.zeros(count, rows, dtype=torch.long, device=device)
            self.features = (workspace.features.new_zeros(count, rows, workspace.features.shape[-1])
                             if workspace.draft_cache is not None else None)
            self.used = torch.ones(count, dtype=torch.long, device=device)  # rows in each sequence's tree
            self.learns = torch.zeros(count, dtype=torch.bool, device=device)  # its nodes teach auto's model
            self.out = torch.zeros(count, workspace.block + 1, dtype=torch.long, device=device)  # [count, tokens...]
        else:
            for name in ("ids", "parents", "depths", "choices"):
                setattr(self, name, getattr(parent, name)[:, :rows])
            self.mask, self.scores = parent.mask[:, :rows, :rows], parent.scores[:, :rows - 1]
            self.features = parent.features[:, :rows] if parent.features is not None else None
            self.used, self.learns, self.out = parent.used, parent.learns, parent.out
