"""The decoding methods, one class each: the target alone, a drafted chain (DFlash), a drafted tree of a
fixed budget (DDTree) and a tree whose size `auto` chooses as it goes.

A method decides what each round verifies and how that tree is built; the round itself is the same
for all, and for a batch of sequences of any methods: draft → tree → verify → commit (`run_round`). A
method object belongs to one generation; what outlives it (the workspace, auto's costs and learned acceptance) is the engine's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .costs import AutoBudget, AutoBudgets, probe_above
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

    def build(self, stages: Stages, count: int, index: int, committed: int) -> int:
        """Launches the tree stage of sequence `index` (of `count`) after this round's draft; returns the
        rows of its tree."""
        raise NotImplementedError

    @classmethod
    def build_all(cls, stages: Stages, count: int, members: list["Member"], whole: bool) -> "Built":
        """Launches the tree stages of this round's `members` (all of this method). `whole`: no other method
        drafts this round, so one stage may build every sequence's tree at once (those that do not draft
        get theirs after)."""
        return Built([member.method.build(stages, count, member.index, member.committed) for member in members])

    def tree_stages(self, stages: Stages) -> list[Stage]:
        """The tree stages this method's rounds run alone (one sequence): what `Engine.prepare` captures."""
        return [stages.tree(1, None, "bonus")]

    def verified_rows(self) -> list[int]:
        """The tree sizes (rows) this method's rounds verify alone, root included."""
        return [1]


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

    @classmethod
    def build_all(cls, stages: Stages, count: int, members: list["Member"], whole: bool) -> "Built":
        if not whole:
            return super().build_all(stages, count, members, whole)
        stages.tree(count, None, "chain").run()
        return Built([member.method.rows for member in members])

    def tree_stages(self, stages: Stages) -> list[Stage]:
        return [*super().tree_stages(stages), stages.tree(1, None, "chain")]

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

    @classmethod
    def build_all(cls, stages: Stages, count: int, members: list["Member"], whole: bool) -> "Built":
        budgets = {member.method.budget for member in members}
        if not whole or len(budgets) > 1:
            return super().build_all(stages, count, members, whole)
        stages.tree(count, None, "tree", stages.ws.plan(budgets.pop())).run()
        return Built([member.method.rows for member in members])

    def tree_stages(self, stages: Stages) -> list[Stage]:
        return [*super().tree_stages(stages), stages.tree(1, None, "tree", stages.ws.plan(self.budget))]

    def verified_rows(self) -> list[int]:
        return [self.rows, 1]


def drafted_depths(budget: int, block: int, vocab: int) -> int:
    """The depths a tree of `budget` nodes can reach: a tree of n nodes is at most n deep, so a small budget
    drafts (and runs the LM head over) fewer depths than the block has."""
    return len(frontier_widths(budget, min(block - 1, budget), vocab))


class AutoTree(DecodingMethod):
    """DDTree with `--budget auto`: probe rounds build a larger tree than the current choice (the largest
    at first, then one size above) and the expected tokens of every size it holds, which the host reads
    with the round's outcome and chooses from the size with the most tokens per second for the rounds
    after; other rounds build the size chosen, or now and then a size beside it, to time it
    (`costs.AutoBudget`). Every size's tree is the first rows of the larger ones (nodes come best first),
    so a probe round verifies the chosen size from its tree, and its nodes' scores teach the acceptance
    model. Only the first round, with nothing chosen yet, waits for its probe's choice.

    The sequences of a batch that use auto choose together, once a round: one size for all (the verify's
    cost follows its widest tree), the one with the most tokens per second summed over them, at the costs
    measured for the round's batch size."""

    drafts, scored = True, True

    def __init__(self, block: int, taps: tuple[int, ...], vocab: int, autos: AutoBudgets):
        super().__init__(block, taps)
        self.autos = autos
        self.rows = 1 + autos.largest
        self.draft_depth = drafted_depths(autos.largest, block, vocab)

    @classmethod
    def build_all(cls, stages: Stages, count: int, members: list["Member"], whole: bool) -> "Built":
        if whole and count > 1:
            return cls.build_shared(stages, count, members)
        ws, auto = stages.ws, members[0].method.autos.at(count)
        yields = ws.auto_yields(len(auto.costs.sizes))  # (made here, not inside the probe's graph capture)
        context = max(member.committed for member in members)
        indices = [None] if whole else [member.index for member in members]  # (None: every sequence at once)
        probed, size = auto.probe_size(), auto.round_size()
        for index in indices:
            stages.tree(count, index, "tree", ws.plan(probed or size), scored=True, probe=probed is not None).run()
        probe = None
        if probed is not None:
            probe = Probe(auto, yields[:count], [member.index for member in members], context, probed).deferred()
            size = size or auto.current  # (the first round's probe has just chosen it)
            used = ws.tree(count, ws.max_rows).used
            for index in indices:  # the probe built more than the round verifies
                (used if index is None else used[index]).fill_(size + 1)
        for member in members:
            member.method.chosen.append(size)
        return Built([size + 1] * len(members), Timing(auto, size, context, probed), probe=probe)

    @classmethod
    def build_shared(cls, stages: Stages, count: int, members: list["Member"]) -> "Built":
        """A batch's trees under one budget of `count` times the chosen size: every sequence's tree is built a
        size larger (the probe's size, on a probe round), the best nodes of all of them are kept
        (`Stages.share`), and the verify runs the kept rows alone, packed. auto chooses the size from the
        expected tokens of the batch's best nodes (`Stages.pool`) and the costs at this batch size."""
        ws, auto = stages.ws, members[0].method.autos.at(count)
        pooled = ws.pooled_yields(len(auto.costs.sizes))  # (made here, not inside a graph capture)
        context = max(member.committed for member in members)
        probed, size, probe = auto.probe_size(), auto.round_size(), None
        if probed is not None:  # (the batch's expected tokens come from `pool`, not each tree's own)
            stages.tree(count, None, "tree", ws.plan(probed), scored=True).run()
            stages.pool(count).run()
            probe, built = Probe(auto, pooled, None, context, probed).deferred(), probed
            size = size or auto.current
        else:
            built = probe_above(auto.costs.sizes, size)
            stages.tree(count, None, "tree", ws.plan(built), scored=True).run()
        stages.share(count, count * size).run()
        for member in members:
            member.method.chosen.append(size)
        return Built([built + 1] * len(members), Timing(auto, size, context, probed), count * (size + 1), probe)

    def tree_stages(self, stages: Stages) -> list[Stage]:
        ws, sizes = stages.ws, self.autos.sizes
        ws.auto_yields(len(sizes))
        return [*super().tree_stages(stages),
                *(stages.tree(1, None, "tree", ws.plan(size), True, probe) for size in sizes for probe in (False, True))]

    def verified_rows(self) -> list[int]:
        return [size + 1 for size in self.autos.sizes] + [1]


@dataclass
class Built:
    """A method's trees of a round: each member's rows (the most it may verify), what the round's time
    teaches (auto), the rows the verify packs the trees' used rows into (a shared budget), if it packs, and
    auto's probe, if the round probed."""
    rows: list[int]
    timing: "Timing | None" = None
    packed: int | None = None
    probe: "Probe | None" = None


@dataclass
class Probe:
    """A probe round's expected tokens at each candidate size, on the device until the host reads them with
    the round's outcome, and how auto chooses from them: `values` [sequences, sizes] summed over the rows
    of `members`, or [sizes] for the whole batch (a shared budget's pool)."""
    auto: AutoBudget
    values: torch.Tensor
    members: list[int] | None
    context: int
    probed: int

    def choose(self, values: list) -> int:
        """The size for the rounds after, from the values read."""
        if self.members is not None:
            values = [sum(values[m][k] for m in self.members) for k in range(len(values[0]))]
        return self.auto.choose(values, self.context, self.probed)

    def deferred(self) -> "Probe | None":
        """This probe, to be read with its round's outcome; or, with nothing chosen yet (the first round), None
        once it has chosen from the values now (waiting for the device)."""
        if self.auto.current is not None:
            return self
        self.choose(self.values.tolist())
        return None


@dataclass
class Timing:
    """What a round's time teaches auto: its chooser (of the round's batch size), the size the round
    verified, the context it ran at, and the size it probed at, if it probed."""
    auto: AutoBudget
    size: int
    context: int
    probed: int | None

    def observe(self, seconds: float) -> None:
        self.auto.observe(self.size, self.context, seconds, self.probed)


@dataclass
class Member:
    """One sequence of a round: its slot in the workspace, its method, and at least the tokens in its cache
    when the round runs (only attended lengths and whether a drafted block fits depend on it)."""
    index: int
    method: DecodingMethod
    committed: int


@dataclass
class RoundLaunch:
    """A launched round: the trees, whose `out` will hold each sequence's [count, tokens added...], each
    member's rows, what the round's time teaches auto (when its trees set the verify's width), and auto's
    probe, read with the outcome."""
    tree: TreeBuffers
    rows: list[int]
    timing: Timing | None
    probe: Probe | None


def run_round(stages: Stages, count: int, members: list[Member], clock) -> RoundLaunch:
    """Launches one round over the first `count` sequences of the workspace: one draft for all, each
    member's tree, one verify, one commit. `members` are the live sequences among them (every live one)."""
    ws = stages.ws
    drafting = [m for m in members if m.method.drafts and m.committed + ws.block + 1 <= ws.context_limit]
    if drafting:
        chains = [m.method.chain for m in drafting]
        stages.draft(count, ws.draft_attend(max(m.committed for m in drafting)),
                     max(m.method.draft_depth for m in drafting), any(chains), not all(chains)).run()
        clock.mark("draft")
    rows, timing, packed, probe = {}, None, None, None
    kinds = list(dict.fromkeys(type(m.method) for m in drafting))  # (each method once, in members' order)
    for kind in kinds:
        group = [m for m in drafting if type(m.method) is kind]
        built = kind.build_all(stages, count, group, whole=len(kinds) == 1)
        rows.update(zip((m.index for m in group), built.rows))
        timing, packed, probe = built.timing or timing, built.packed or packed, built.probe or probe
    if not drafting:  # the bonus tokens alone, every sequence's at once
        stages.tree(count, None, "bonus").run()
    for member in members:
        if member.index not in rows:
            rows[member.index] = bonus_only(stages, count, member) if drafting else 1
    clock.mark("tree")
    widest = max(rows.values())
    tree = ws.tree(count, widest)
    taps = next((m.method.taps for m in members if m.method.taps), ())
    stages.verify(tree, ws.attend(max(m.committed for m in members) + tree.rows), taps, packed).run()
    clock.mark("verify")
    stages.commit(tree, any(m.method.scored for m in members)).run()
    clock.mark("commit")
    if timing is not None and packed is None and timing.size + 1 != widest:
        timing = None  # another member's tree set the round's cost
    return RoundLaunch(tree, [rows[m.index] for m in members], timing, probe)


def bonus_only(stages: Stages, count: int, member: Member) -> int:
    """A round of the bonus token alone for this member: the target alone, or too near the context's end
    for a drafted block."""
    stages.tree(count, member.index, "bonus").run()
    return 1


def decoding_method(decoding: Decoding, block: int, taps: tuple[int, ...], vocab: int,
                    autos: AutoBudgets | None = None) -> DecodingMethod:
    """The method object for one generation: `autos` are the engine's choosers when the budget is 'auto'."""
    if decoding.method == "ar":
        return TargetOnly()
    if decoding.method == "dflash":
        return ChainDraft(block, taps)
    if decoding.budget == "auto":
        return AutoTree(block, taps, vocab, autos)
    return TreeDraft(block, taps, vocab, decoding.budget)
