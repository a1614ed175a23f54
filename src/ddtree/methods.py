"""The decoding methods, one class each: the target alone, a drafted chain (DFlash), a drafted tree of a
fixed budget (DDTree) and a tree whose size `auto` chooses as it goes.

A method decides what each round verifies and how that tree is built; the round itself is the same
for all, and for a batch of sequences of any methods: draft → tree → verify → commit (`run_round`). A
method object belongs to one generation; what outlives it (the workspace, auto's costs and learned acceptance) is the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

from .costs import AutoBudget
from .options import Decoding
from .stages import Stage, Stages
from .tree import frontier_widths, tree_size
from .workspace import TreeBuffers


class DecodingMethod:
    """What every method shares: rounds of the bonus token alone (no drafter, or no room left in the
    context for a drafted block)."""

    drafts, chain, scored = False, False, False

    def __init__(self, block: int = 1, taps: tuple[int, ...] = ()):
        self.block = block  # tokens a round can add at most (a drafter's block; 1 for the target alone)
        self.taps = taps  # target layers whose outputs verifies keep: a drafter's context
        self.rows = 1  # the largest tree it verifies, root included
        self.draft_depth = block - 1  # depths each draft scores
        self.chosen: list[int] = []  # auto: the nodes each drafting round verified
        self.probed: int | None = None  # auto: the size the last round probed at, if it probed

    def build(self, stages: Stages, count: int, index: int, committed: int) -> int:
        """Launches the tree stage of sequence `index` (of `count`) after this round's draft; returns the
        rows of its tree."""
        raise NotImplementedError

    def tree_stages(self, stages: Stages) -> list[Stage]:
        """The tree stages this method's rounds run alone (one sequence): what `Engine.prepare` captures."""
        return [stages.tree(1, 0, "bonus")]

    def verified_rows(self) -> list[int]:
        """The tree sizes (rows) this method's rounds verify alone, root included."""
        return [1]

    def observe(self, nodes: int, context: int, seconds: float, probed: int | None) -> None:
        """A drafting round's wall time, for methods that learn from it (auto)."""

    def timed_nodes(self, rows: int) -> int | None:
        """The nodes of the round just launched (verifying `rows` rows), when its time teaches this method (auto)."""
        return None


class TargetOnly(DecodingMethod):
    """`ar`: the target alone, each round verifying the bonus token by itself."""


class ChainDraft(DecodingMethod):
    """DFlash: each round verifies the drafter's likeliest token at every depth, one chain."""

    drafts, chain = True, True

    def __init__(self, block: int, taps: tuple[int, ...]):
        super().__init__(block, taps)
        self.rows = block

    def build(self, stages: Stages, count: int, index: int, committed: int) -> int:
        stages.tree(count, index, "chain").run()
        return self.rows

    def tree_stages(self, stages: Stages) -> list[Stage]:
        return [*super().tree_stages(stages), stages.tree(1, 0, "chain")]

    def verified_rows(self) -> list[int]:
        return [self.rows, 1]


class TreeDraft(DecodingMethod):
    """DDTree: each round verifies the best-first tree of `budget` drafted nodes."""

    drafts = True

    def __init__(self, block: int, taps: tuple[int, ...], vocab: int, budget: int):
        super().__init__(block, taps)
        self.budget = budget
        self.rows = 1 + tree_size(budget, block - 1, vocab)
        self.draft_depth = drafted_depths(budget, block, vocab)

    def build(self, stages: Stages, count: int, index: int, committed: int) -> int:
        stages.tree(count, index, "tree", stages.ws.plan(self.budget)).run()
        return self.rows

    def tree_stages(self, stages: Stages) -> list[Stage]:
        return [*super().tree_stages(stages), stages.tree(1, 0, "tree", stages.ws.plan(self.budget))]

    def verified_rows(self) -> list[int]:
        return [self.rows, 1]


def drafted_depths(budget: int, block: int, vocab: int) -> int:
    """The depths a tree of `budget` nodes can reach: a tree of n nodes is at most n deep, so a small budget
    drafts (and runs the LM head over) fewer depths than the block has."""
    return len(frontier_widths(budget, min(block - 1, budget), vocab))


class AutoTree(DecodingMethod):
    """DDTree with `--budget auto`: probe rounds build a larger tree than the current choice (the largest
    at first, then one size above), read the expected tokens of every size it holds and choose the size
    with the most tokens per second; other rounds build the size chosen last (`costs.AutoBudget`). Every
    size's tree is the first rows of the larger ones (nodes come best first), so a probe's tree holds the
    chosen one, and its nodes' scores teach the acceptance model."""

    drafts, scored = True, True

    def __init__(self, block: int, taps: tuple[int, ...], vocab: int, auto: AutoBudget):
        super().__init__(block, taps)
        self.auto = auto
        self.rows = 1 + auto.largest
        self.draft_depth = drafted_depths(auto.largest, block, vocab)

    def build(self, stages: Stages, count: int, index: int, committed: int) -> int:
        auto, ws = self.auto, stages.ws
        yields = ws.auto_yields(len(auto.costs.sizes))  # (made here, not inside the probe's graph capture)
        self.probed = auto.probe_size()
        if self.probed is not None:
            stages.tree(count, index, "tree", ws.plan(self.probed), scored=True, probe=True).run()
            size = auto.choose(yields[index].tolist(), committed, self.probed)
            ws.tree(count, ws.max_rows).used[index].fill_(size + 1)  # the probe built more (a second host read above)
        else:
            size = auto.current
            stages.tree(count, index, "tree", ws.plan(size), scored=True).run()
        self.chosen.append(size)
        return size + 1

    def tree_stages(self, stages: Stages) -> list[Stage]:
        ws, sizes = stages.ws, self.auto.costs.sizes
        ws.auto_yields(len(sizes))
        return [*super().tree_stages(stages),
                *(stages.tree(1, 0, "tree", ws.plan(size), True, probe) for size in sizes for probe in (False, True))]

    def verified_rows(self) -> list[int]:
        return [size + 1 for size in self.auto.costs.sizes] + [1]

    def observe(self, nodes: int, context: int, seconds: float, probed: int | None) -> None:
        self.auto.observe(nodes, context, seconds, probed)

    def timed_nodes(self, rows: int) -> int | None:
        return rows - 1 if rows > 1 else None  # (a round near the context's end drafts nothing)


@dataclass
class Member:
    """One sequence of a round: its slot in the workspace, its method, and at least the tokens in its cache
    when the round runs (only attended lengths and whether a drafted block fits depend on it)."""
    index: int
    method: DecodingMethod
    committed: int


def run_round(stages: Stages, count: int, members: list[Member], clock) -> tuple[TreeBuffers, list[int]]:
    """Launches one round over the first `count` sequences of the workspace: one draft for all, each
    member's tree, one verify, one commit. `members` are the live sequences among them (every live one).
    Returns the trees, whose `out` will hold each sequence's [count, tokens added...], and each member's
    rows."""
    ws = stages.ws
    drafting = [m for m in members if m.method.drafts and m.committed + ws.block + 1 <= ws.context_limit]
    drafts = {m.index for m in drafting}
    if drafting:
        chains = [m.method.chain for m in drafting]
        stages.draft(count, ws.draft_attend(max(m.committed for m in drafting)),
                     max(m.method.draft_depth for m in drafting), any(chains), not all(chains)).run()
        clock.mark("draft")
    rows = [m.method.build(stages, count, m.index, m.committed) if m.index in drafts else bonus_only(stages, count, m)
            for m in members]
    clock.mark("tree")
    tree = ws.tree(count, max(rows))
    taps = next((m.method.taps for m in members if m.method.taps), ())
    stages.verify(tree, ws.attend(max(m.committed for m in members) + tree.rows), taps).run()
    clock.mark("verify")
    stages.commit(tree, any(m.method.scored for m in members)).run()
    clock.mark("commit")
    return tree, rows


def bonus_only(stages: Stages, count: int, member: Member) -> int:
    """A round of the bonus token alone for this member: the target alone, or too near the context's end
    for a drafted block."""
    stages.tree(count, member.index, "bonus").run()
    return 1


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
