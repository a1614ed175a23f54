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


@dataclass
class CompiledTree:
    """What the verify forward needs: ids, absolute positions and the ancestor-only mask of root + nodes."""

    ids: torch.Tensor  # [n+1]
    positions: torch.Tensor  # [n+1]
    mask: torch.Tensor  # bool [n+1, n+1]: row i may see column j iff j is i or an ancestor of i


def compile_tree(tree: DraftTree, root_token: int, start: int, device) -> CompiledTree:
    ids = torch.tensor([root_token] + tree.tokens, device=device)
    depths = torch.tensor([0] + tree.depths, device=device)
    parents = torch.tensor([0] + tree.parents, device=device)
    return CompiledTree(ids, depths + start, ancestor_mask(parents, max(tree.depths, default=0)))


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
