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


def chain_tree(log_probs: torch.Tensor) -> DraftTree:
    """Plain DFlash: the argmax token at every depth, one after another."""
    best_values, best_ids = log_probs.float().max(dim=-1)
    tokens = best_ids.tolist()
    scores = best_values.cumsum(0).tolist()
    n = len(tokens)
    parents = list(range(n))
    return DraftTree(tokens, parents, list(range(1, n + 1)), scores, {(p, t): p + 1 for p, t in zip(parents, tokens)})


def dominating_pairs(width: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Index pairs (i, j), i, j < width, with (i + 1)(j + 1) <= budget: the only pairs of a rank-i
    prefix and a rank-j token that can be among the best `budget` sums, since every (i', j') with
    i' <= i and j' <= j scores at least as high. About budget * ln(budget) pairs instead of width**2."""
    pairs = [(i, j) for i in range(width) for j in range(min(width, budget // (i + 1)))]
    left, right = zip(*pairs)
    return torch.tensor(left), torch.tensor(right)


def tree_size(budget: int, depth: int, vocab: int) -> int:
    """Nodes a best-first tree of this budget has: fewer only when depth * vocab prefixes are fewer."""
    return min(budget, depth * min(budget, vocab))


def best_first_nodes(log_probs: torch.Tensor, budget: int, pairs: tuple[torch.Tensor, torch.Tensor]):
    """The best-first tree of `best_first_tree`, computed on the device with static shapes (no host
    round trip, so it can sit inside a CUDA graph).

    The per-depth distributions do not depend on the prefix, so a prefix's score is a sum of one
    log-prob per depth, and the best `budget` prefixes of depth d are the best sums of a best prefix
    of depth d-1 and a best token at depth d: one small top-k per depth over `dominating_pairs`.
    Then all depths' candidates are ranked by score, shallower first on ties (a stable sort over
    candidates listed depth by depth), so a parent always comes before its children and the first
    `tree_size` form a tree. Returns (tokens, parents, depths) of nodes 1..n; parent 0 is the root.
    """
    depth_limit, vocab = log_probs.shape
    width = min(budget, vocab)
    size = tree_size(budget, depth_limit, vocab)
    top_values, top_ids = log_probs.float().topk(width, dim=-1)
    left, right = pairs
    scores, tokens, parent_ranks = [top_values[0]], [top_ids[0]], [torch.zeros_like(top_ids[0])]
    for depth in range(1, depth_limit):
        sums = scores[-1][left] + top_values[depth][right]
        best, which = sums.topk(width)
        scores.append(best)
        tokens.append(top_ids[depth][right[which]])
        parent_ranks.append(left[which])
    order = torch.sort(torch.cat(scores), descending=True, stable=True).indices[:size]
    candidates = len(scores) * width
    node_of = torch.zeros(candidates, dtype=torch.long, device=log_probs.device)
    node_of[order] = torch.arange(1, size + 1, device=log_probs.device)
    depth = order // width  # 0-based
    parent_candidate = (depth - 1).clamp(min=0) * width + torch.cat(parent_ranks)[order]
    parents = torch.where(depth == 0, 0, node_of[parent_candidate])
    return torch.cat(tokens)[order], parents, depth + 1


def chain_nodes(log_probs: torch.Tensor):
    """Plain DFlash on the device: the argmax token at every depth, each node the child of the one before."""
    depth_limit = log_probs.shape[0]
    steps = torch.arange(depth_limit, device=log_probs.device)
    return log_probs.argmax(dim=-1), steps, steps + 1


def ancestor_mask(parents: torch.Tensor, max_depth: int) -> torch.Tensor:
    """Ancestor-or-self matrix from parent indices (root's parent is itself), one gather per depth level."""
    size = parents.numel()
    rows = torch.arange(size, device=parents.device)
    mask = torch.eye(size, dtype=torch.bool, device=parents.device)
    ancestor = rows
    for _ in range(max_depth):
        ancestor = parents[ancestor]
        mask[rows, ancestor] = True
    return mask
