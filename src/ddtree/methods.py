"""The decoding methods, one class each: the target alone, a drafted chain (DFlash), a drafted tree of a
fixed budget (DDTree) and a tree whose size `auto` chooses as it goes.

A method decides what each round verifies and how that tree is built; the round itself is the same
for all: draft → tree → verify → commit (`DecodingMethod.round`). A method object belongs to one
generation; what outlives it (the workspace, auto's costs and learned acceptance) is the engine's.
"""

from __future__ import annotations

import torch

from .costs import AutoBudget
from .options import Decoding
from .stages import Stage, Stages
from .tree import frontier_widths, tree_size
from .workspace import TreeBuffers, Workspace


class DecodingMethod:
    """What every method shares: the round, and rounds of the bonus token alone (no drafter, or no room
    left in the context for a drafted block)."""

    drafts, chain = False, False

    def __init__(self, block: int = 1, taps: tuple[int, ...] = ()):
        self.block = block  # tokens a round can add at most (a drafter's block; 1 for the target alone)
        self.taps = taps  # target layers whose outputs verifies keep: a drafter's context
        self.rows = 1  # the largest tree it verifies, root included
        self.draft_depth = block - 1  # depths each draft scores
        self.chosen: list[int] = []  # auto: the nodes each drafting round verified
        self.probed: int | None = None  # auto: the size the last round probed at, if it probed

    def round(self, stages: Stages, committed: int, prompt_rows: int | None, clock) -> TreeBuffers:
        """Launches one round on the device, `committed` being at least the tokens in the cache when it
        runs; the first round passes the prefill's rows (its draft reads the prompt's features). Returns
        the tree whose `out` will hold [count, tokens added...]."""
        ws = stages.ws
        if self.drafts and committed + self.block + 1 <= ws.context_limit:
            stages.draft(ws.draft_attend(committed), self.draft_depth, self.chain, prompt_rows).run()
            clock.mark("draft")
            tree = self.drafted_tree(stages, committed)
        else:  # the target alone, or too near the context's end for a drafted block: one token
            tree = ws.tree(1)
            tree.ids[0] = ws.bonus
        clock.mark("tree")
        stages.verify(tree, ws.attend(committed + tree.rows), self.taps).run()
        clock.mark("verify")
        stages.commit(tree).run()
        clock.mark("commit")
        return tree

    def drafted_tree(self, stages: Stages, committed: int) -> TreeBuffers:
        """Builds this round's tree from the draft (the tree stage) and returns it."""
        raise NotImplementedError

    def tree_stages(self, stages: Stages) -> list[Stage]:
        """The tree stages this method's rounds run: what `Engine.prepare` captures graphs for."""
        return []

    def verified_trees(self, ws: Workspace) -> list[TreeBuffers]:
        """The trees this method's rounds verify (and commit)."""
        return [ws.tree(1)]

    def observe(self, nodes: int, context: int, seconds: float, probed: int | None) -> None:
        """A drafting round's wall time, for methods that learn from it (auto)."""

    def timed_nodes(self, tree: TreeBuffers, first: bool) -> int | None:
        """The nodes of the round just launched (verifying `tree`), when its time teaches this method (auto)."""
        return None


class TargetOnly(DecodingMethod):
    """`ar`: the target alone, each round verifying the bonus token by itself."""


class ChainDraft(DecodingMethod):
    """DFlash: each round verifies the drafter's likeliest token at every depth, one chain."""

    drafts, chain = True, True

    def __init__(self, block: int, taps: tuple[int, ...]):
        super().__init__(block, taps)
        self.rows = block

    def drafted_tree(self, stages: Stages, committed: int) -> TreeBuffers:
        tree = stages.ws.tree(self.rows, chain=True)
        stages.tree(tree, None).run()
        return tree

    def tree_stages(self, stages: Stages) -> list[Stage]:
        return [stages.tree(stages.ws.tree(self.rows, chain=True), None)]

    def verified_trees(self, ws: Workspace) -> list[TreeBuffers]:
        return [ws.tree(self.rows, chain=True), ws.tree(1)]


class TreeDraft(DecodingMethod):
    """DDTree: each round verifies the best-first tree of `budget` drafted nodes."""

    drafts = True

    def __init__(self, block: int, taps: tuple[int, ...], vocab: int, budget: int):
        super().__init__(block, taps)
        self.budget = budget
        self.rows = 1 + tree_size(budget, block - 1, vocab)
        self.draft_depth = drafted_depths(budget, block, vocab)

    def drafted_tree(self, stages: Stages, committed: int) -> TreeBuffers:
        tree = stages.ws.tree(self.rows)
        stages.tree(tree, stages.ws.plan(self.budget)).run()
        return tree

    def tree_stages(self, stages: Stages) -> list[Stage]:
        return [stages.tree(stages.ws.tree(self.rows), stages.ws.plan(self.budget))]

    def verified_trees(self, ws: Workspace) -> list[TreeBuffers]:
        return [ws.tree(self.rows), ws.tree(1)]


def drafted_depths(budget: int, block: int, vocab: int) -> int:
    """The depths a tree of `budget` nodes can reach: a tree of n nodes is at most n deep, so a small budget
    drafts (and runs the LM head over) fewer depths than the block has."""
    return len(frontier_widths(budget, min(block - 1, budget), vocab))


def auto_trees(ws: Workspace, sizes: list[int]) -> tuple[dict[int, TreeBuffers], torch.Tensor]:
    """auto's tree of each size, and where probes write every size's expected tokens. Each size's tree is
    the first rows of the largest (the same buffers: a probe's larger tree holds the chosen size's as its
    first rows, and every round whichever its size commits through the same graphs). Calibration times
    exactly these."""
    largest = ws.tree(1 + max(sizes), scored=True)
    if largest.yields is None:
        largest.yields = torch.zeros(len(sizes), device=ws.device)
    return {size: ws.prefix(largest, size + 1) for size in sizes}, largest.yields


class AutoTree(DecodingMethod):
    """DDTree with `--budget auto`: probe rounds build a larger tree than the current choice (the largest
    at first, then one size above), read the expected tokens of every size it holds and choose the size
    with the most tokens per second; other rounds build the size chosen last (`costs.AutoBudget`)."""

    drafts = True

    def __init__(self, block: int, taps: tuple[int, ...], vocab: int, auto: AutoBudget):
        super().__init__(block, taps)
        self.auto = auto
        self.rows = 1 + auto.largest
        self.draft_depth = drafted_depths(auto.largest, block, vocab)

    def drafted_tree(self, stages: Stages, committed: int) -> TreeBuffers:
        auto, ws = self.auto, stages.ws
        trees, yields = auto_trees(ws, auto.costs.sizes)
        self.probed = auto.probe_size()
        if self.probed is not None:
            stages.tree(trees[self.probed], ws.plan(self.probed), yields).run()
            size = auto.choose(yields.tolist(), committed, self.probed)  # (a second host read)
        else:
            size = auto.current
            stages.tree(trees[size], ws.plan(size)).run()
        self.chosen.append(size)
        return trees[size]

    def tree_stages(self, stages: Stages) -> list[Stage]:
        ws = stages.ws
        trees, yields = auto_trees(ws, self.auto.costs.sizes)
        return [stages.tree(tree, ws.plan(size), probe) for size, tree in trees.items() for probe in (None, yields)]

    def verified_trees(self, ws: Workspace) -> list[TreeBuffers]:
        return [*auto_trees(ws, self.auto.costs.sizes)[0].values(), ws.tree(1)]

    def observe(self, nodes: int, context: int, seconds: float, probed: int | None) -> None:
        self.auto.observe(nodes, context, seconds, probed)

    def timed_nodes(self, tree: TreeBuffers, first: bool) -> int | None:
        # (the first draft reads the whole prompt, and a round near the context's end drafts nothing)
        return tree.nodes if tree.rows > 1 and not first else None


def decoding_method(decoding: Decoding, block: int, taps: tuple[int, ...], vocab: int,
                    auto: AutoBudget | None = None) -> DecodingMethod:
    """The method object for one generation: `auto` is the engine's chooser when the budget is 'auto'."""
    if decoding.method == "ar":
        return TargetOnly()
    if decoding.method == "dflash":
        return ChainDraft(block, taps)
    if decoding.budget == "auto":
        return AutoTree(block, taps, vocab, auto)
    return TreeDraft(block, taps, vocab, decoding.budget)
