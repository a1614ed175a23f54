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
    """Buffers that persist across requests: both caches and the per-round decoding state.

    The target cache holds `context` committed tokens plus one verify's rows; the drafter cache is
    laid out as `Drafter.new_cache` describes. The state tensors are what the stages read and write:
    `committed` (tokens in the target cache, also the bonus token's position), `bonus`, `pending_start`
    (position of the first context row the drafter has not yet seen) and `features` (those rows).
    A draft leaves per-depth log-probs in `log_probs` (for trees) or each depth's likeliest token in
    `chain_tokens` (for a chain).
    """

    def __init__(self, model, drafter, taps: tuple[int, ...], dtype: torch.dtype, context: int, max_rows: int,
                 context_limit: int, graphs: bool):
        device = model.embed_tokens.weight.device
        self.device, self.context, self.max_rows, self.context_limit = device, context, max_rows, context_limit
        self.cache = model.new_cache(context + max_rows + 1)
        self.draft_cache = drafter.new_cache(context) if drafter is not None else None
        self.block = drafter.cfg.block_size if drafter is not None else 1
        longest = max(self.cache.capacity, self.draft_cache.capacity if drafter is not None else 0)
        self.steps = torch.arange(longest, device=device)
        self.attend_step = ATTEND_STEP.get(device.type, 256)
        self.prefill_step = PREFILL_STEP if graphs else 1
        self.prompt = torch.zeros(context, dtype=torch.long, device=device)  # padded with stale ids
        self.prompt_logits = torch.zeros(1, model.cfg.vocab_size, device=device)
        self.committed = torch.zeros((), dtype=torch.long, device=device)
        self.pending_start = torch.zeros((), dtype=torch.long, device=device)
        self.bonus = torch.zeros((), dtype=torch.long, device=device)
        self.seed = torch.zeros((), dtype=torch.long, device=device)  # sampling: the request's seed_key
        self.sampling = SamplingState(device)
        self.token_keys = token_keys(model.cfg.vocab_size, device)
        if drafter is not None:
            width = len(taps) * model.cfg.hidden_size
            self.features = torch.zeros(1, self.block, width, device=device, dtype=dtype)
            self.log_probs = torch.zeros(self.block - 1, model.cfg.vocab_size, device=device)
            self.chain_tokens = torch.zeros(self.block - 1, dtype=torch.long, device=device)
            self.block_tail = torch.full((self.block - 1,), drafter.cfg.mask_token_id, device=device)
            self.prompt_features = self.features.new_zeros(1, context, width)  # the first draft's context
        self.trees: dict[tuple[int, bool, bool], TreeBuffers] = {}
        self.prefixes: dict[tuple[str, int], TreeBuffers] = {}
        self.plans: dict[int, FrontierPlan] = {}
        # on CUDA trees of up to tree_kernel.MAX_NODES nodes are built by one Triton kernel, others and
        # every tree elsewhere by PyTorch operations
        self.tree_kernel = tree_kernel_for(device)
        self.kernel_plans: dict = {}
        self.owner = 0  # the generation now decoding here (Engine numbers them)

    def load_prompt(self, ids: list[int]) -> None:
        """A new prompt: its ids into the prompt buffer, the committed count its length, nothing drafted yet."""
        self.prompt[:len(ids)].copy_(torch.tensor(ids))
        self.committed.fill_(len(ids))
        self.pending_start.zero_()

    def fits(self, context: int, rows: int) -> bool:
        return self.context >= context and self.max_rows >= rows

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
            self.plans[budget] = FrontierPlan(budget, min(depth, budget), vocab, self.device)
        return self.plans[budget]

    def kernel_plan(self, plan: FrontierPlan):
        """The Triton tree kernel's tables and scratch for `plan` (cached)."""
        if plan.budget not in self.kernel_plans:
            self.kernel_plans[plan.budget] = self.tree_kernel.KernelPlan(plan, self.device)
        return self.kernel_plans[plan.budget]

    def tree(self, rows: int, scored: bool = False, chain: bool = False) -> "TreeBuffers":
        """Tree buffers of `rows` rows; `scored` ones (auto's) also keep their nodes' scores; a `chain`'s
        (plain DFlash's) hold its fixed shape."""
        if (rows, scored, chain) not in self.trees:
            self.trees[rows, scored, chain] = TreeBuffers(rows, self, scored=scored, chain=chain)
        return self.trees[rows, scored, chain]

    def prefix(self, tree: "TreeBuffers", rows: int) -> "TreeBuffers":
        """The first `rows` rows of `tree`, as a tree of its own (cached)."""
        key = (tree.key, rows)
        if key not in self.prefixes:
            self.prefixes[key] = TreeBuffers(rows, self, parent=tree)
        return self.prefixes[key]


class TreeBuffers:
    """One round's tree and its verification, for trees of `rows` rows: the root (the bonus token) and
    `nodes` drafted nodes.

    A prefix tree (`parent` given) views the first `rows` rows of a larger tree's ids, parents,
    depths and mask, which is a tree because nodes come in score order; it has its own outputs.
    `key` tells graphs over different buffers apart."""

    def __init__(self, rows: int, workspace: Workspace, parent: "TreeBuffers | None" = None,
                 scored: bool = False, chain: bool = False):
        device = workspace.device
        self.rows, self.nodes = rows, rows - 1
        self.path_rows = min(workspace.block, rows)  # the longest path such a tree can have
        if parent is None:
            self.key = ("chain" if chain else "tree") + str(rows) + ("-scored" if scored else "")
            self.ids = torch.zeros(rows, dtype=torch.long, device=device)
            if chain:
                self.parents, self.depths, self.mask = chain_structure(rows, device)
            else:
                self.parents = torch.zeros(rows, dtype=torch.long, device=device)
                self.depths = torch.zeros(rows, dtype=torch.long, device=device)
                self.mask = torch.eye(rows, dtype=torch.bool, device=device)  # ancestor-or-self
            # auto: the nodes' path log-probabilities, from which it learns what gets accepted
            self.scores = torch.zeros(self.nodes, device=device) if scored else None
        else:
            self.key = f"{parent.key}[:{rows}]"
            self.ids, self.parents, self.depths = parent.ids[:rows], parent.parents[:rows], parent.depths[:rows]
            self.mask = parent.mask[:rows, :rows]
            self.scores = parent.scores[:self.nodes] if parent.scores is not None else None
        self.choices = torch.zeros(rows, dtype=torch.long, device=device)
        self.features = (workspace.features.new_zeros(1, rows, workspace.features.shape[-1])
                         if workspace.draft_cache is not None else None)
        self.out = torch.zeros(self.path_rows + 1, dtype=torch.long, device=device)  # [count, tokens added...]
        self.yields: torch.Tensor | None = None  # auto's largest tree: where probes write each size's expected tokens
