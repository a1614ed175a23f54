"""Round costs on this device, and `--budget auto`: the tree size chosen from them as decoding goes.

A round with an n-node tree is expected to add 1 + Σ P(node accepted) tokens, the sum over its n
nodes (a round accepts exactly the nodes of one root path). The drafter's path probability of a
node says how likely that is, but it is overconfident, so `auto` learns, on the device and from
every round it verifies, the share of nodes accepted at each path probability, and uses that
calibrated chance instead. It divides the expected tokens by what a round of n nodes costs on this
device at this context length, and takes the best n.

Seeing a size's expected tokens needs the tree built at that size, which costs more than building a
smaller one. So `auto` builds a larger tree only on probe rounds: the largest once, then one size above
the current choice, which shows whether to grow by a step or to shrink to any smaller size. A probe
round still verifies the current choice, and its expected tokens reach the host with the round's
outcome, so the choice is made without stalling the device (only the very first round waits for it).
A probe costs little more than the round it replaces, so probes come often (as often as keeps their
extra cost to half a percent of the decoding time), and between probes rounds build and verify the size
chosen. One probe's tree is a noisy sample of the rounds after it, so each size's expected tokens are
averaged over probes (the choice then follows the text's drift without jumping at every probe).

Costs come from a calibration stored per device and model pair: each stage of a round timed at a
few context lengths, every candidate size measured (the sizes are graph shapes and the cost is a
step function of n: measured, not fitted). Decoding then corrects each size's cost by the time
its rounds really take on the device (the calibration times stages alone, on a quiet machine), and the sizes beside
the choice each verify a few rounds, so that a size calibrated too dear is measured rather than never run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .tree import tree_size

# Candidate tree sizes (nodes, root not counted): with the root, multiples of 4 rows on the CPU and of
# 8 on CUDA, shapes the matrix kernels handle well (docs/performance.md). The CPU's verify cost rises
# steeply with width, so its sizes stop sooner.
AUTO_SIZES = {"cpu": (3, 7, 15, 31, 63), "cuda": (7, 15, 31, 63, 127, 255)}
# Context lengths at which the costs are measured; between them they are interpolated linearly.
CALIBRATION_CONTEXTS = {"cpu": (128, 1024), "cuda": (256, 2048)}


@dataclass
class RoundCosts:
    """Seconds per round, measured at `contexts`: `fixed[c]` (the drafter pass), and for every size n
    `per_size[n][c]` (building, verifying and committing an n-node tree, and reading the result on the
    host), `tree[n][c]` (building it alone) and `probe[n][c]` (building it with every smaller size's
    expected tokens)."""

    sizes: list[int]
    contexts: list[int]
    fixed: list[float]
    per_size: dict[int, list[float]]
    tree: dict[int, list[float]]
    probe: dict[int, list[float]]

    def predict(self, size: int, context: int) -> float:
        return interpolate(self.contexts, self.fixed, context) + interpolate(self.contexts, self.per_size[size], context)

    def probe_extra(self, probed: int, size: int, context: int) -> float:
        """What a round verifying `size` nodes costs more when it probed at `probed` instead of building `size`."""
        return max(0.0, interpolate(self.contexts, self.probe[probed], context)
                   - interpolate(self.contexts, self.tree[size], context))

    def to_json(self) -> dict:
        return {"sizes": self.sizes, "contexts": self.contexts, "fixed": self.fixed,
                **{name: {str(k): v for k, v in table.items()}
                   for name, table in (("per_size", self.per_size), ("tree", self.tree), ("probe", self.probe))}}

    @classmethod
    def from_json(cls, data: dict) -> "RoundCosts":
        """Raises ValueError on anything that is not a complete, sane calibration."""
        sizes, contexts = [int(s) for s in data["sizes"]], [int(c) for c in data["contexts"]]
        fixed = [float(x) for x in data["fixed"]]
        tables = [{int(k): [float(x) for x in v] for k, v in data[name].items()} for name in ("per_size", "tree", "probe")]
        numbers = fixed + [x for table in tables for v in table.values() for x in v]
        if (not sizes or any(sorted(table) != sorted(sizes) for table in tables) or len(fixed) != len(contexts)
                or any(len(v) != len(contexts) for table in tables for v in table.values())
                or contexts != sorted(set(contexts))
                or not all(math.isfinite(x) and x > 0 for x in numbers)):
            raise ValueError("incomplete or invalid calibration")
        return cls(sizes, contexts, fixed, *tables)


def interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear in x through (xs, ys), extended linearly past the ends (never below 0)."""
    if len(xs) == 1:
        return ys[0]
    i = max(0, min(len(xs) - 2, next((k for k in range(len(xs) - 1) if x <= xs[k + 1]), len(xs) - 2)))
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return max(0.0, ys[i] + slope * (x - xs[i]))


def costs_table(costs: RoundCosts) -> str:
    """Milliseconds per round of each size at each calibrated context, what probing one size above
    adds to it, and how often auto then probes."""
    head = ["nodes"] + [f"ms per round at context {c}" for c in costs.contexts] \
        + [f"a probe's extra at {c}" for c in costs.contexts] + ["probe every (rounds)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for size in costs.sizes:
        above = probe_above(costs.sizes, size)
        cells = [f"{1000 * costs.predict(size, c):.2f}" for c in costs.contexts]
        cells += [f"{1000 * costs.probe_extra(above, size, c):.2f}" for c in costs.contexts]
        cells.append(str(probe_interval(costs, above, size, costs.contexts[-1], 1.0)))
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----- choosing ---------------------------------------------------------------------------------------

PROBE_SHARE = 0.005  # the most of the decoding time that probe rounds may add
MAX_PROBE_INTERVAL = 32
# Path log-probability bins over which the acceptance of drafted nodes is learned (a quarter nat each).
SCORE_EDGES = tuple(x / 4 for x in range(-48, 1))
PRIOR_NODES = 4.0  # each bin starts as if this many nodes had been accepted at the drafter's own probability
DECAY = 0.99  # per round: what was learned 100 rounds ago weighs a third as much
CORRECTION_RATE = 0.1  # how far one measured round moves its size's cost correction (the mean of fewer rounds)
EXPLORED = 3  # rounds each size beside the choice verifies, so that its cost is measured, not assumed
# How far one probe moves each size's expected tokens (over the smallest size's): one round's tree is a noisy
# sample of the rounds that follow it
YIELD_SMOOTHING = 0.3
OUTLIER = 3.0  # a round this many times its predicted cost (a graph capture, a pause) is not learned from


class AcceptanceModel:
    """How likely a drafted node is to be accepted, learned on the device from every verified round.

    Tensors `seen` and `hits` count, per path-probability bin, the nodes verified and the nodes accepted
    (with decay); their ratio is a node's calibrated chance. Stages captured as CUDA graphs read and
    update them in place, so they live as long as this object; `reset` starts the learning afresh."""

    def __init__(self, sizes: list[int], device: torch.device):
        self.sizes = list(sizes)
        self.edges = torch.tensor(SCORE_EDGES, device=device)
        centres = [SCORE_EDGES[0] - 0.125] + [(a + b) / 2 for a, b in zip(SCORE_EDGES, SCORE_EDGES[1:])] + [0.0]
        self.prior = torch.tensor(centres, device=device).exp()
        self.seen = torch.empty(len(centres), device=device)
        self.hits = torch.empty_like(self.seen)
        self.index = torch.tensor([n - 1 for n in self.sizes], device=device)  # where each size's sum ends
        self.reset()

    def reset(self) -> None:
        """Each bin as if PRIOR_NODES nodes had been verified and accepted at the drafter's own probability."""
        self.seen.fill_(PRIOR_NODES)
        torch.mul(self.prior, PRIOR_NODES, out=self.hits)

    def expected_yields(self, scores: torch.Tensor) -> torch.Tensor:
        """1 + the calibrated expected accepted nodes among the best n, at each candidate size n;
        `scores`: the tree's node path log-probabilities, best first (sizes past its nodes get its total),
        or [sequences, nodes], a tree each."""
        chance = (self.hits / self.seen)[torch.bucketize(scores, self.edges)]
        return 1 + chance.cumsum(-1)[..., self.index.clamp(max=scores.shape[-1] - 1)]

    def pooled_yields(self, scores: torch.Tensor, eligible: torch.Tensor, count: int) -> torch.Tensor:
        """The expected tokens of a round that verifies the best `count * n` nodes among every sequence's
        tree, at each candidate size n: one per sequence taking part, plus the calibrated chances of those
        nodes. `scores` [sequences, nodes]: each tree's path log-probabilities; `eligible`: which nodes
        may be chosen (its sequence takes part, the node was built)."""
        chance = (self.hits / self.seen)[torch.bucketize(scores, self.edges)] * eligible
        pooled = chance.flatten().sort(descending=True).values.cumsum(0)
        return eligible.any(dim=1).sum() + pooled[((self.index + 1) * count - 1).clamp(max=pooled.numel() - 1)]

    def report(self) -> dict:
        """What it has learned (a host read): per path log-probability bin, from its upper edge down, the
        nodes verified (with decay) and the share of them accepted."""
        return {"bin_upper_edges": [*SCORE_EDGES, 0.0], "seen": self.seen.tolist(),
                "chance": (self.hits / self.seen).tolist()}

    def learn(self, scores: torch.Tensor, accepted: torch.Tensor, counted: torch.Tensor | None = None) -> None:
        """One verified round: the nodes' path log-probabilities and which of them were accepted (any shape,
        a batch's trees included), of which only the `counted` nodes teach (all without it)."""
        bins = torch.bucketize(scores, self.edges).view(-1)
        weights = torch.ones_like(scores) if counted is None else counted.to(scores.dtype)
        self.seen.mul_(DECAY).index_add_(0, bins, weights.view(-1))
        self.hits.mul_(DECAY).index_add_(0, bins, (accepted.to(scores.dtype) * weights).view(-1))


class AutoBudget:
    """Chooses the tree size on probe rounds, from the expected tokens the acceptance model gives each
    candidate size over what a round of that size costs here, and corrects each size's cost by the
    time its rounds really take."""

    def __init__(self, costs: RoundCosts, acceptance: AcceptanceModel):
        if costs.sizes != acceptance.sizes:
            raise ValueError("the costs and the acceptance model are for different sizes")
        self.costs, self.acceptance = costs, acceptance
        self.current: int | None = None  # the size chosen at the last probe
        self.until_probe = 0
        self.unread = False  # a probe was launched and its expected tokens are not read yet
        # measured ÷ calibrated round time per size, learned from the rounds run, and how many rounds that is
        self.correction = dict.fromkeys(costs.sizes, 1.0)
        self.runs = dict.fromkeys(costs.sizes, 0)
        self.expected: list[float | None] = [None] * len(costs.sizes)  # per size, as probes saw it (smoothed)
        self.trying: int | None = None  # a neighbour of the choice, to verify for one round and time

    @property
    def largest(self) -> int:
        return max(self.costs.sizes)

    # on the host

    def probe_size(self) -> int | None:
        """The size this round's tree is built at to read expected tokens (the largest at first, then one
        above the current choice), or None when no probe is due. The round after a probe, launched before
        the probe is read, does not probe again."""
        self.until_probe -= 1
        if self.current is None:
            return self.largest
        if self.unread or self.until_probe >= 0:
            self.unread = False  # (a probe whose round was never read is not waited for past one round)
            return None
        self.unread = True
        return probe_above(self.costs.sizes, self.current)

    def choose(self, yields: list[float], context: int, probed: int) -> int:
        """The size maximising expected tokens per second among those a probe at `probed` nodes saw;
        `yields[k]` is the expected tokens at sizes[k]. Each size's tokens count relative to the smallest
        size's (a batch's probes sum over however many sequences take part), averaged over probes."""
        self.unread = False
        seen = [k for k, size in enumerate(self.costs.sizes) if size <= probed]
        for k in seen if yields[0] > 0 else []:  # (a probe no sequence took part in teaches nothing)
            ratio, before = yields[k] / yields[0], self.expected[k]
            self.expected[k] = ratio if before is None else before + YIELD_SMOOTHING * (ratio - before)
        best = max(seen, key=lambda k: (self.expected[k] or 1.0) / self.round_cost(self.costs.sizes[k], context))
        self.current = self.costs.sizes[best]
        self.trying = next((self.costs.sizes[k] for k in (best - 1, best + 1)
                            if k in seen and self.runs[self.costs.sizes[k]] < EXPLORED), None)
        above = probe_above(self.costs.sizes, self.current)
        self.until_probe = probe_interval(self.costs, above, self.current, context, self.correction[self.current]) - 1
        return self.current

    def round_size(self) -> int | None:
        """The size this round verifies: the choice (None before the first); or, in the round after a choice,
        a neighbour of it that has run fewer than EXPLORED rounds (a probe holds it: it is at most one size
        above). A size calibrated too dear (while the device was busy) would otherwise never run, and its
        cost never be corrected."""
        if self.trying is None:
            return self.current
        size, self.trying = self.trying, None
        return size

    def round_cost(self, size: int, context: int) -> float:
        """Seconds a round of `size` nodes is expected to take: the calibration, times what rounds of that
        size really took against it. A size not run yet keeps its calibrated cost, so when every size
        runs slower than calibrated (a busier machine), auto tries the others, learns, and comes back."""
        return self.costs.predict(size, context) * self.correction[size]

    def observe(self, size: int, context: int, seconds: float, probed: int | None) -> None:
        """A finished round's time (on the device, from its first kernel to its outcome's copy) corrects its
        size's cost: the calibration can be off for the real decoding's cache state, load or context, on
        the CPU by a fifth. A probe round is compared with its prediction plus the probe's extra."""
        predicted = self.costs.predict(size, context)
        if probed is not None:
            predicted += self.costs.probe_extra(probed, size, context)
        ratio = seconds / predicted
        if ratio >= OUTLIER:
            return
        self.runs[size] += 1
        self.correction[size] += max(CORRECTION_RATE, 1 / self.runs[size]) * (ratio - self.correction[size])


class AutoBudgets:
    """auto's choosers by batch size: each with the costs measured for rounds of that many sequences (a
    round of eight costs what it costs, not eight rounds of one), all learning into one acceptance model
    (a node's chance of acceptance does not depend on what it is batched with)."""

    def __init__(self, acceptance: AcceptanceModel):
        self.acceptance = acceptance
        self.by_batch: dict[int, AutoBudget] = {}

    def add(self, costs: dict[int, RoundCosts]) -> None:
        """Choosers for the batch sizes not yet covered (those already there keep what they learned)."""
        for count, table in sorted(costs.items()):
            self.by_batch.setdefault(count, AutoBudget(table, self.acceptance))

    def covers(self, counts: list[int]) -> bool:
        return all(count in self.by_batch for count in counts)

    def at(self, count: int) -> AutoBudget:
        """The chooser for rounds of `count` sequences: the smallest calibrated batch size holding them (the
        largest, past every one)."""
        return self.by_batch[min((c for c in self.by_batch if c >= count), default=max(self.by_batch))]

    @property
    def sizes(self) -> list[int]:
        return self.acceptance.sizes

    def report(self) -> dict:
        """What auto chooses from, for a results file: per batch size, each size's calibrated milliseconds a
        round at each calibrated context and how much slower its real rounds ran (1: none ran); and the
        learned acceptance."""
        return {"batches": {count: {"contexts": auto.costs.contexts,
                                    "ms_per_round": {size: [round(1000 * auto.costs.predict(size, c), 4)
                                                            for c in auto.costs.contexts] for size in self.sizes},
                                    "correction": {size: round(x, 4) for size, x in auto.correction.items()}}
                            for count, auto in sorted(self.by_batch.items())},
                "acceptance": self.acceptance.report()}

    @property
    def largest(self) -> int:
        return max(self.sizes)


def probe_above(sizes: list[int], size: int) -> int:
    """The size a probe builds while `size` is chosen: the next larger one (the largest, at the top)."""
    return sizes[min(sizes.index(size) + 1, len(sizes) - 1)]


def probe_interval(costs: RoundCosts, probed: int, size: int, context: int, correction: float) -> int:
    """Rounds from one probe to the next so that probing at `probed` while `size` is chosen costs at most
    PROBE_SHARE of the decoding time (`correction`: how much slower than calibrated rounds really run)."""
    share = costs.probe_extra(probed, size, context) / (PROBE_SHARE * costs.predict(size, context) * correction)
    return max(1, min(MAX_PROBE_INTERVAL, math.ceil(share)))


def candidate_sizes(device_type: str, depth: int, vocab: int) -> list[int]:
    """auto's tree sizes on this kind of device, as trees of this depth and vocabulary can hold them."""
    return sorted({tree_size(size, depth, vocab) for size in AUTO_SIZES.get(device_type, AUTO_SIZES["cuda"])})
