"""Best-first draft trees against brute force, and the compiled form (positions, ancestor mask)."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from ddtree.tree import DraftTree, ancestor_mask, best_first_tree, chain_tree, compile_tree


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


@pytest.mark.parametrize("seed", range(5))
def test_chain_tree_is_argmax_per_depth(seed):
    log_probs = random_log_probs(7, 11, seed)
    tree = chain_tree(log_probs)
    assert tree.tokens == log_probs.argmax(-1).tolist()
    assert tree.parents == list(range(7))
    assert tree.depths == list(range(1, 8))
    assert tree.scores == pytest.approx(log_probs.max(-1).values.double().cumsum(0).tolist(), abs=1e-4)
    check_structure(tree, log_probs)
    # a chain equals the best-first tree of the top-1 path when every depth is confident
    peaked = torch.log_softmax(torch.randn(5, 6, generator=torch.Generator().manual_seed(seed)) + 30 * torch.nn.functional.one_hot(torch.arange(5), 6), -1)
    best = best_first_tree(peaked, 5)
    assert best.tokens == chain_tree(peaked).tokens and best.parents == chain_tree(peaked).parents


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
def test_compile_tree_and_ancestor_mask(seed):
    rng = random.Random(seed)
    tree = random_tree(rng.randint(1, 40), rng)
    start = rng.randint(0, 100)
    compiled = compile_tree(tree, root_token=7, start=start, device="cpu")
    assert compiled.ids.tolist() == [7] + tree.tokens
    assert compiled.positions.tolist() == [start] + [start + d for d in tree.depths]
    assert compiled.mask.dtype == torch.bool
    assert torch.equal(compiled.mask, brute_ancestors([0] + tree.parents))
    # the same tree compiles the same way
    assert torch.equal(compile_tree(tree, 7, start, "cpu").mask, compiled.mask)


def test_ancestor_mask_on_a_chain_is_lower_triangular():
    parents = torch.tensor([0, 0, 1, 2, 3, 4])
    assert torch.equal(ancestor_mask(parents, 5), torch.tril(torch.ones(6, 6, dtype=torch.bool)))
    empty = compile_tree(DraftTree([], [], [], [], {}), 3, 10, "cpu")
    assert empty.ids.tolist() == [3] and empty.positions.tolist() == [10]
    assert empty.mask.tolist() == [[True]]


def test_best_first_tree_compiles_to_a_valid_mask():
    log_probs = random_log_probs(4, 5, 3)
    tree = best_first_tree(log_probs, 60)
    compiled = compile_tree(tree, 0, 5, "cpu")
    assert torch.equal(compiled.mask, brute_ancestors([0] + tree.parents))
    # siblings share a position; a node's position is its parent's + 1
    pos = compiled.positions.tolist()
    for i, parent in enumerate(tree.parents, start=1):
        assert pos[i] == pos[parent] + 1
