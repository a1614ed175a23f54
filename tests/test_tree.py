"""Best-first draft trees against brute force, the device-side construction against the heap, and ancestor masks."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from ddtree.tree import (
    DraftTree, FrontierPlan, ancestor_mask, best_first_nodes, best_first_tree, chain_structure, tree_size,
)


def random_log_probs(depth: int, vocab: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # a random temperature per depth: some depths confident, some flat
    scale = torch.rand(depth, 1, generator=generator) * 4 + 0.2
    return torch.log_softmax(torch.randn(depth, vocab, generator=generator) * scale, dim=-1)


def all_prefixes(log_probs: torch.Tensor) -> dict[tuple[int, ...], float]:
    depth, vocab = log_probs.shape
    lp = log_probs.double().tolist()
    scores = {}
    for d in range(1, depth + 1):
        for prefix in itertools.product(range(vocab), repeat=d):
            scores[prefix] = sum(lp[k][t] for k, t in enumerate(prefix))
    return scores


def node_prefixes(tree: DraftTree) -> list[tuple[int, ...]]:
    prefixes: list[tuple[int, ...]] = []
    for i, (token, parent) in enumerate(zip(tree.tokens, tree.parents)):
        assert 0 <= parent <= i, "a parent must come before its child"
        prefixes.append((prefixes[parent - 1] if parent else ()) + (token,))
    return prefixes


def check_structure(tree: DraftTree, log_probs: torch.Tensor) -> list[tuple[int, ...]]:
    prefixes = node_prefixes(tree)
    assert len(set(prefixes)) == len(prefixes), "duplicate nodes"
    n = len(tree)
    assert len(tree.parents) == len(tree.depths) == len(tree.scores) == n
    lp = log_probs.double()
    for i, prefix in enumerate(prefixes):
        assert tree.depths[i] == len(prefix)
        parent = tree.parents[i]
        assert tree.depths[i] == (tree.depths[parent - 1] + 1 if parent else 1)
        # prefix-closed: the parent's prefix is a node too (by construction of node_prefixes) and precedes it
        if len(prefix) > 1:
            assert prefix[:-1] in prefixes[:i]
        assert tree.children[(parent, tree.tokens[i])] == i + 1
        expected = sum(lp[k, t].item() for k, t in enumerate(prefix))
        assert tree.scores[i] == pytest.approx(expected, abs=1e-4)
    assert len(tree.children) == n
    return prefixes


CASES = [(vocab, depth, seed) for vocab in (3, 4, 5) for depth in (1, 3, 4) for seed in range(6)]


@pytest.mark.parametrize("vocab,depth,seed", CASES)
def test_best_first_tree_matches_brute_force(vocab, depth, seed):
    log_probs = random_log_probs(depth, vocab, seed * 100 + vocab * 10 + depth)
    scores = all_prefixes(log_probs)
    ranked = sorted(scores.values(), reverse=True)
    total = len(scores)
    budgets = sorted({1, 2, 3, 5, 8, 13, total // 2, total - 1, total, total + 7} - {0})
    for budget in budgets:
        tree = best_first_tree(log_probs, budget)
        prefixes = check_structure(tree, log_probs)
        assert len(tree) == min(budget, total)
        chosen = set(prefixes)
        expected = {p for p, s in scores.items() if s >= ranked[min(budget, total) - 1]}
        assert chosen == expected, f"budget {budget}: tree differs from the top-{budget} prefixes"
        # pop order is best-first: scores never increase
        assert all(a >= b - 1e-9 for a, b in zip(tree.scores, tree.scores[1:]))


def test_best_first_tree_wide_vocab_and_shallow_budget():
    """Vocabulary larger than the budget (top-K truncation) still gives the exact top-B set."""
    for seed in range(10):
        log_probs = random_log_probs(3, 40, seed)
        scores = all_prefixes(log_probs)
        ranked = sorted(scores.items(), key=lambda kv: -kv[1])
        for budget in (1, 4, 16, 50):
            tree = best_first_tree(log_probs, budget)
            assert set(check_structure(tree, log_probs)) == {p for p, _ in ranked[:budget]}


def test_best_first_tree_is_deterministic_with_ties():
    log_probs = torch.log_softmax(torch.zeros(4, 5), dim=-1)  # every token ties
    log_probs[1, 2] = 0.0
    first = best_first_tree(log_probs, 30)
    for _ in range(3):
        again = best_first_tree(log_probs.clone(), 30)
        assert (again.tokens, again.parents, again.depths, again.scores) == (
            first.tokens, first.parents, first.depths, first.scores)
    check_structure(first, log_probs)
    assert len(first) == 30


def test_best_first_tree_edge_cases():
    log_probs = random_log_probs(3, 4, 0)
    assert len(best_first_tree(log_probs, 0)) == 0
    assert len(best_first_tree(log_probs[:0], 10)) == 0
    one = best_first_tree(log_probs, 1)
    assert one.tokens == [int(log_probs[0].argmax())] and one.parents == [0] and one.depths == [1]


def device_tree(log_probs: torch.Tensor, budget: int) -> DraftTree:
    """best_first_nodes' output as a DraftTree, with scores summed from the log-probs."""
    depth, vocab = log_probs.shape
    tokens, parents, depths, returned = (t.tolist() for t in best_first_nodes(log_probs, FrontierPlan(budget, depth, vocab)))
    prefixes: list[tuple[int, ...]] = []
    for token, parent in zip(tokens, parents):
        prefixes.append((prefixes[parent - 1] if parent else ()) + (token,))
    lp = log_probs.double()
    scores = [sum(lp[k, t].item() for k, t in enumerate(prefix)) for prefix in prefixes]
    assert returned == pytest.approx(scores, abs=1e-4)
    children = {(p, t): i + 1 for i, (p, t) in enumerate(zip(parents, tokens))}
    return DraftTree(tokens, parents, depths, scores, children)


@pytest.mark.parametrize("vocab,depth,seed", [(v, d, s) for v in (3, 7, 40) for d in (1, 2, 5, 15) for s in range(3)])
def test_device_tree_equals_the_heap(vocab, depth, seed):
    """Same prefixes as the heap's best-first search at every budget (continuous scores, so no ties),
    a parent before each child, and exactly tree_size nodes."""
    log_probs = random_log_probs(depth, vocab, seed)
    for budget in (1, 2, 3, 8, 17, 64, 130):
        tree = device_tree(log_probs, budget)
        assert len(tree) == tree_size(budget, depth, vocab)
        prefixes = check_structure(tree, log_probs)
        assert set(prefixes) == set(node_prefixes(best_first_tree(log_probs, budget)))
        assert tree.scores == sorted(tree.scores, reverse=True)


def test_device_tree_keeps_a_parent_that_ties_its_child():
    """A depth with a certain token (log-prob 0) makes parent and child tie; the budget's cut must
    still take the parent first."""
    log_probs = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [-1e9, 0.0, -1e9], [0.5, 0.2, 0.1]]), dim=-1)
    log_probs[1] = torch.tensor([float("-inf"), 0.0, float("-inf")])
    for budget in range(1, 8):
        check_structure(device_tree(log_probs, budget), log_probs)


def test_frontier_plan_keeps_only_pairs_a_tree_can_hold():
    """Pair (i, j) of depth d needs (i + 1)(j + 2) <= budget - d + 2; a depth-d prefix of rank r needs
    r + d <= budget; depths past the budget are left out."""
    plan = FrontierPlan(10, 3, 50)
    assert plan.widths == [10, 9, 8] and plan.size == 10 and plan.depth == 3
    start, end = plan.spans[0]
    left, right = plan.left[start:end], plan.token[start:end] - plan.tokens  # depth 2's token ranks
    pairs = set(zip(left.tolist(), right.tolist()))
    assert (0, 8) in pairs and (4, 0) in pairs and (1, 3) in pairs
    assert not pairs & {(0, 9), (5, 0), (1, 4), (2, 2)}
    assert len(pairs) == end - start == sum(max(0, 10 // (i + 1) - 1) for i in range(10))
    small = FrontierPlan(100, 3, 4)  # fewer prefixes than the budget: 4 + 16 + 64
    assert small.widths == [4, 16, 64] and small.size == 84
    assert FrontierPlan(10, 2, 3).widths == [3, 8]  # (2, 2) would need 9 + 3 nodes: 8 pairs remain
    assert FrontierPlan(3, 15, 50).depth == 3


@pytest.mark.parametrize("seed", range(5))
def test_chain_structure_is_the_best_first_tree_of_a_confident_drafter(seed):
    parents, depths, mask = chain_structure(8)
    assert parents.tolist() == [0, 0, 1, 2, 3, 4, 5, 6] and depths.tolist() == list(range(8))
    assert torch.equal(mask, brute_ancestors(parents.tolist())) and torch.equal(mask, ancestor_mask(parents, 7))
    # the chain of argmax tokens is the best-first tree when every depth is confident
    peaked = torch.log_softmax(torch.randn(5, 6, generator=torch.Generator().manual_seed(seed))
                               + 30 * torch.nn.functional.one_hot(torch.arange(5), 6), -1)
    best = best_first_tree(peaked, 5)
    assert best.tokens == peaked.argmax(-1).tolist() and best.parents == chain_structure(6)[0][1:].tolist()
    assert best.depths == chain_structure(6)[1][1:].tolist()


def brute_ancestors(parents: list[int]) -> torch.Tensor:
    size = len(parents)
    mask = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        j = i
        mask[i, j] = True
        while j != 0:
            j = parents[j]
            mask[i, j] = True
    return mask


def random_tree(size: int, rng: random.Random, vocab: int = 50) -> DraftTree:
    tokens, parents, depths, children = [], [], [], {}
    for node in range(1, size + 1):
        parent = rng.randrange(node)
        token = rng.randrange(vocab)
        while (parent, token) in children:
            token = rng.randrange(vocab)
        tokens.append(token)
        parents.append(parent)
        depths.append(depths[parent - 1] + 1 if parent else 1)
        children[(parent, token)] = node
    return DraftTree(tokens, parents, depths, [0.0] * size, children)


@pytest.mark.parametrize("seed", range(8))
def test_ancestor_mask_against_brute_force(seed):
    rng = random.Random(seed)
    tree = random_tree(rng.randint(1, 40), rng)
    parents = torch.tensor([0] + tree.parents)
    assert torch.equal(ancestor_mask(parents, max(tree.depths)), brute_ancestors([0] + tree.parents))


def test_ancestor_mask_on_a_chain_is_lower_triangular():
    parents = torch.tensor([0, 0, 1, 2, 3, 4])
    assert torch.equal(ancestor_mask(parents, 5), torch.tril(torch.ones(6, 6, dtype=torch.bool)))
    assert ancestor_mask(torch.tensor([0]), 0).tolist() == [[True]]


def test_best_first_tree_gives_a_valid_mask():
    log_probs = random_log_probs(4, 5, 3)
    tree = best_first_tree(log_probs, 60)
    assert torch.equal(ancestor_mask(torch.tensor([0] + tree.parents), 4), brute_ancestors([0] + tree.parents))


def test_a_plan_no_deeper_than_its_budget_builds_the_same_tree():
    """A tree of B nodes is at most B deep, so the engine plans small budgets over their first B depths
    only (and drafts only those): the nodes must be those of the full-depth plan."""
    log_probs = random_log_probs(15, 40, 3)
    log_probs[:, 0] += 6.0
    log_probs = torch.log_softmax(log_probs, dim=-1)  # a confident drafter: chains run deep
    for budget in (1, 3, 7, 14):
        full = best_first_nodes(log_probs, FrontierPlan(budget, 15, 40))
        short = best_first_nodes(log_probs[:budget], FrontierPlan(budget, budget, 40))
        assert all(torch.equal(a, b) for a, b in zip(full, short))
        if budget <= 7:  # so confident that these trees are chains: the depth limit is reached
            assert int(full[2].max()) == budget
