"""Draft trees: the best B prefixes under the drafter's factorised scores, and their compiled form.

Under the factorised surrogate q(u) = prod_k q_k(u_k), the expected acceptance length of a tree is
the sum of q(u) over its nodes, so the best tree of B nodes is the B highest-scoring prefixes. A
child never scores above its parent, so those prefixes always form a tree, and a best-first
search finds them with at most B pops and 2B pushes.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class DraftTree:
    """Nodes 1..n in pop order (parents before children); node 0 is the root (the bonus token)."""

    tokens: list[int]  # token of node i+1
    parents: list[int]  # parent node index of node i+1 (0 = root)
    depths: list[int]  # depth of node i+1 (1 = child of the root)
    scores: list[float]  # log q(prefix) of node i+1
    children: dict[tuple[int, int], int]  # (parent node, token) -> child node

    def __len__(self) -> int:
        return len(self.tokens)


def empty_tree() -> DraftTree:
    return DraftTree([], [], [], [], {})


def best_first_tree(log_probs: torch.Tensor, budget: int) -> DraftTree:
    """The `budget` highest-scoring prefixes of depth <= D from per-depth log-probs [D, V].

    Ties break by push order, so the result is deterministic. Each heap entry is a candidate
    (score, push counter, depth, rank at that depth, parent node, parent score).
    """
    depth_limit, vocab = log_probs.shape
    if budget < 1 or depth_limit < 1:
        return empty_tree()
    width = min(budget, vocab)
    top_values, top_ids = log_probs.float().topk(width, dim=-1)
    values, ids = top_values.tolist(), top_ids.tolist()  # one device-to-host copy for the whole search
    tree = empty_tree()
    heap = [(-values[0][0], 0, 1, 0, 0, 0.0)]
    pushes = 1
    while heap and len(tree) < budget:
        neg_score, _, depth, rank, parent, parent_score = heapq.heappop(heap)
        score = -neg_score
        node = len(tree) + 1
        token = ids[depth - 1][rank]
        tree.tokens.append(token)
        tree.parents.append(parent)
        tree.depths.append(depth)
        tree.scores.append(score)
        tree.children[(parent, token)] = node
        if rank + 1 < width:
            sibling = parent_score + values[depth - 1][rank + 1]
            heapq.heappush(heap, (-sibling, pushes, depth, rank + 1, parent, parent_score))
            pushes += 1
        if depth < depth_limit:
            heapq.heappush(heap, (-(score + values[depth][0]), pushes, depth + 1, 0, node, score))
            pushes += 1
    return tree


def frontier_widths(budget: int, depth: int, vocab: int) -> list[int]:
    """How many of each depth's best prefixes the best `budget` prefixes can hold, for depths 1..depth
    up to the budget (a deeper one holds none): at most budget - d + 1 at depth d (a prefix of rank r
    there comes with its r betters and d - 1 ancestors), and at most the pairs `pair_ranks` lists."""
    tokens, widths = min(budget, vocab), []
    for d in range(1, min(depth, budget) + 1):
        pairs = tokens if d == 1 else sum(len(pair_ranks(budget, tokens, d, i)) for i in range(widths[-1]))
        widths.append(min(pairs, budget - d + 1))
    return widths


def pair_ranks(budget: int, tokens: int, d: int, i: int) -> range:
    """The token ranks j that can follow the rank-i prefix of depth d - 1 in the best `budget` prefixes.
    Every (i', j') with i' <= i and j' <= j scores at least as high as (i, j), so a tree holding (i, j)
    holds (i + 1)(j + 1) prefixes of depth d, the i + 1 best of depth d - 1 and an ancestor at each
    depth above: (i + 1)(j + 2) <= budget - d + 2."""
    return range(min(tokens, (budget - d + 2) // (i + 1) - 1))


def tree_size(budget: int, depth: int, vocab: int) -> int:
    """Nodes in a best-first tree of this budget: fewer only when there are fewer prefixes than that."""
    return min(budget, sum(frontier_widths(budget, depth, vocab)))


class FrontierPlan:
    """The static shapes of `best_first_nodes` for one (budget, depth, vocab): per depth, the pairs
    (i, j) of a rank-i prefix of the depth above and a rank-j token that can be among the best
    `budget` sums (`pair_ranks`): about budget * (ln(budget) - 1) pairs instead of budget * vocab.
    `depth` counts the depths that can hold a node (at most `budget`)."""

    def __init__(self, budget: int, depth: int, vocab: int, device=None):
        self.budget, self.vocab, self.tokens = budget, vocab, min(budget, vocab)
        self.widths = frontier_widths(budget, depth, vocab)
        self.depth = len(self.widths)
        self.size = tree_size(budget, depth, vocab)
        # The pairs of all depths below the first, in one flat table: the rank of the prefix above
        # (`left`) and the token's place in the flattened [depth, rank] top-k (`token`), so the token
        # scores and ids of every pair come out of one gather each.
        left, token, self.spans = [], [], []
        for d, above in enumerate(self.widths[:-1], start=2):
            start = len(left)
            for i in range(above):
                for j in pair_ranks(budget, self.tokens, d, i):
                    left.append(i)
                    token.append((d - 1) * self.tokens + j)
            self.spans.append((start, len(left)))
        self.left = torch.tensor(left, dtype=torch.long, device=device)
        self.token = torch.tensor(token, dtype=torch.long, device=device)
        # where each depth's chosen pairs sit in the flat table (added to the per-depth top-k indices)
        self.span_starts = torch.tensor([start for (start, _), w in zip(self.spans, self.widths[1:]) for _ in range(w)],
                                        dtype=torch.long, device=device)
        # candidates are listed depth by depth: the depth of each, and where each depth's list starts
        self.depth_of = torch.cat([torch.full((w,), d, device=device) for d, w in enumerate(self.widths)])
        self.starts = torch.tensor([0] + self.widths[:-1], device=device).cumsum(0)


def best_first_nodes(log_probs: torch.Tensor, plan: FrontierPlan):
    """The best-first tree of `best_first_tree`, computed on the device with static shapes (no host
    round trip, so it can sit inside a CUDA graph).

    The per-depth distributions do not depend on the prefix, so a prefix's score is a sum of one
    log-prob per depth, and the best prefixes of depth d are the best sums of a best prefix of depth
    d-1 and a best token at depth d: one small top-k per depth over the plan's pairs (three kernels
    a depth; everything else is gathered once for all depths). Then all depths' candidates are ranked
    by score, shallower first on ties (a stable sort over candidates listed depth by depth), so a
    parent always comes before its children and the first `plan.size` form a tree. Returns (tokens,
    parents, depths, scores) of nodes 1..n, best first; parent 0 is the root.
    """
    device = log_probs.device
    top_values, top_ids = log_probs.float().topk(plan.tokens, dim=-1)
    top_values = at_most_zero(top_values)
    pair_scores = top_values.flatten()[plan.token]
    scores, chosen = [top_values[0]], []
    for (start, end), width in zip(plan.spans, plan.widths[1:]):
        best, which = (scores[-1][plan.left[start:end]] + pair_scores[start:end]).topk(width)
        scores.append(best)
        chosen.append(which)
    candidates = len(plan.depth_of)
    if chosen:
        pairs = torch.cat(chosen) + plan.span_starts
        tokens = torch.cat([top_ids[0], top_ids.flatten()[plan.token[pairs]]])
        parent_ranks = torch.cat([torch.zeros_like(top_ids[0]), plan.left[pairs]])
    else:
        tokens, parent_ranks = top_ids[0], torch.zeros_like(top_ids[0])
    ranked = torch.sort(torch.cat(scores), descending=True, stable=True)
    order = ranked.indices[:plan.size]
    node_of = torch.zeros(candidates, dtype=torch.long, device=device)
    node_of[order] = torch.arange(1, plan.size + 1, device=device)
    depth = plan.depth_of[order]  # 0-based
    parent_candidate = plan.starts[(depth - 1).clamp(min=0)] + parent_ranks[order]
    parents = torch.where(depth == 0, 0, node_of[parent_candidate])
    return tokens[order], parents, depth + 1, ranked.values[:plan.size]


def at_most_zero(log_probs: torch.Tensor) -> torch.Tensor:
    """Log-probs as the tree builders need them, whatever a drafter gave: at most 0, NaN as -inf, so a
    child never scores above its parent and the best prefixes always form a tree."""
    return log_probs.nan_to_num(nan=float("-inf"), posinf=0.0, neginf=float("-inf")).clamp_(max=0.0)


def chain_structure(size: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain DFlash's tree of `size` rows (the root, then one node per depth, each the child of the one
    before): its parents, depths and ancestor-or-self mask. They never change, so a chain's buffers
    hold them from the start and a round writes only the drafted tokens, the argmax at each depth."""
    steps = torch.arange(size, device=device)
    return (steps - 1).clamp(min=0), steps, torch.ones(size, size, dtype=torch.bool, device=device).tril()


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Ancestor-or-self matrix from parent indices (the root's parent is itself).

    Reachability by repeated squaring: M = self-or-parent, and M @ M reaches two levels up, so
    ceil(log2(max_depth + 1)) products reach every ancestor: a handful of kernels whatever the depth.
    The products count paths; only whether a count is positive matters, and sums of non-negative
    terms cannot cancel, so low precision is exact enough.
    """
    size = parents.numel()
    dtype = torch.float32 if parents.device.type == "cpu" else torch.bfloat16
    reach = torch.eye(size, dtype=dtype, device=parents.device)
    reach.scatter_(1, parents[:, None], 1.0)
    for _ in range(max(max_depth, 1).bit_length()):
        reach = (reach @ reach).clamp_(max=1.0)
    return reach > 0
