"""The one-kernel tree build (ddtree.tree_kernel) against the PyTorch path, in Triton's interpreter on
the CPU: the same prefixes as the heap, parents before children, and the ancestor mask."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from test_tree import brute_ancestors, check_structure, node_prefixes, random_log_probs  # noqa: E402

from ddtree import tree_kernel  # noqa: E402
from ddtree.tree import DraftTree, FrontierPlan, best_first_tree, tree_size  # noqa: E402

# Triton reads TRITON_INTERPRET when it is first imported (its own library functions, tl.sort among
# them, are decorated then), so the kernel's tests run in a pytest process of their own that sets it.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(INTERPRETED, reason="this is the launcher")
def test_tree_kernel_in_triton_interpreter():
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", __file__],
                            env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "15 passed, 1 skipped" in result.stdout, result.stdout[-2000:]  # every kernel test ran


def kernel_tree(log_probs: torch.Tensor, budget: int):
    depth, vocab = log_probs.shape
    plan = FrontierPlan(budget, depth, vocab)
    kplan = tree_kernel.KernelPlan(plan, log_probs.device)
    kplan.node_of.fill_(1 << 30)  # scratch starts as whatever memory held: the kernel must set what it reads
    rows = plan.size + 1
    ids, parents, depths = (torch.full((rows,), -7, dtype=torch.long) for _ in range(3))
    scores = torch.full((plan.size,), float("nan"))
    mask = torch.ones(rows, rows, dtype=torch.bool)  # stale content the kernel must clear
    tree_kernel.build(log_probs, kplan, ids, parents, depths, scores, mask)
    tree = DraftTree(ids[1:].tolist(), parents[1:].tolist(), depths[1:].tolist(), scores.tolist(),
                     {(p, t): i + 1 for i, (p, t) in enumerate(zip(parents[1:].tolist(), ids[1:].tolist()))})
    assert ids[0] == -7 and parents[0] == -7 and depths[0] == -7  # the root's row is the caller's
    assert torch.equal(mask, brute_ancestors([0] + tree.parents))
    return tree


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter's process (the launcher above)")
@pytest.mark.parametrize("vocab,depth,seed", [(3, 5, 0), (7, 1, 1), (7, 15, 2), (40, 2, 3), (300, 15, 4)])
def test_kernel_tree_equals_the_heap(vocab, depth, seed):
    log_probs = random_log_probs(depth, vocab, seed)
    for budget in (1, 3, 8, 17, 64, 130):
        tree = kernel_tree(log_probs, budget)
        assert len(tree) == tree_size(budget, depth, vocab)
        prefixes = check_structure(tree, log_probs)
        assert set(prefixes) == set(node_prefixes(best_first_tree(log_probs, budget)))
        assert tree.scores == sorted(tree.scores, reverse=True)


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter's process (the launcher above)")
@pytest.mark.parametrize("budget", [5, 40])
def test_a_batch_of_trees_in_one_launch_equals_each_tree_alone(budget):
    """Three sequences' trees from their own log-probs, one program each, written into the first rows of
    larger strided buffers (as a round's trees are): each equals the tree built alone."""
    depth, vocab, batch, max_rows = 6, 50, 3, 64
    log_probs = torch.stack([random_log_probs(depth + 2, vocab, seed) for seed in range(batch)])[:, :depth]
    plan = FrontierPlan(budget, depth, vocab)
    rows = plan.size + 1
    ids, parents, depths = (torch.full((batch + 1, max_rows), -7, dtype=torch.long) for _ in range(3))
    scores = torch.full((batch + 1, max_rows - 1), float("nan"))
    mask = torch.ones(batch + 1, max_rows, max_rows, dtype=torch.bool)
    tree_kernel.build(log_probs, tree_kernel.KernelPlan(plan, log_probs.device, batch=batch + 1), ids[:batch, :rows],
                      parents[:batch, :rows], depths[:batch, :rows], scores[:batch, :plan.size], mask[:batch, :rows, :rows])
    for b in range(batch):
        alone = kernel_tree(log_probs[b], budget)
        assert ids[b, 1:rows].tolist() == alone.tokens and parents[b, 1:rows].tolist() == alone.parents
        assert depths[b, 1:rows].tolist() == alone.depths and scores[b, :plan.size].tolist() == alone.scores
        assert torch.equal(mask[b, :rows, :rows], brute_ancestors([0] + alone.parents))
        assert ids[b, 0] == -7 and (ids[b, rows:] == -7).all() and mask[b, rows:].all()  # nothing else written
    assert (ids[batch] == -7).all() and scores[batch].isnan().all() and mask[batch].all()  # the sequence not asked for


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter's process (the launcher above)")
def test_kernel_tree_with_impossible_tokens_keeps_parents_first():
    log_probs = torch.log_softmax(torch.tensor([[2.0, 1.0, 0.0], [-1e9, 0.0, -1e9], [0.5, 0.2, 0.1]]), dim=-1)
    log_probs[1] = torch.tensor([float("-inf"), 0.0, float("-inf")])
    for budget in range(1, 8):
        check_structure(kernel_tree(log_probs, budget), log_probs)


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter's process (the launcher above)")
def test_engine_rounds_with_the_kernel_match_the_pytorch_path(make_engine, monkeypatch):
    """Decoding with the kernel building every tree (forced on the CPU): the same tokens and the same
    acceptance lengths as the PyTorch path, with an accepting drafter so that long tree paths are taken;
    and `auto` (its trees built into the largest tree's strided first rows) stays lossless."""
    from test_costs import synthetic
    from test_lossless import DRAFTERS, family_prompts, oracle_continuation, second_rank_every_fourth

    from conftest import Oracle

    family, new_tokens = "qwen3", 20
    engine = make_engine(family, **DRAFTERS[family])
    prompts = family_prompts(family)[:2]
    truth = [engine.generate(p, method="ar", max_new_tokens=new_tokens + 16).token_ids for p in prompts]
    Oracle(oracle_continuation(prompts, truth), rank=second_rank_every_fourth).install(monkeypatch)
    runs = {}
    for mode in ("0", "cpu"):
        monkeypatch.setenv("DDTREE_TREE_KERNEL", mode)
        engine.workspace = None  # a workspace decides its tree builder when it is made
        # calibrations are kept apart by tree builder, whose costs differ
        assert engine.calibration_key().device.endswith("-treekernel") == (mode == "cpu")
        for budget in (8, 32):
            results = [engine.generate(p, method="ddtree", budget=budget, max_new_tokens=new_tokens) for p in prompts]
            runs[mode, budget] = [(r.token_ids, r.acceptance_lengths) for r in results]
            assert [r.token_ids for r in results] == [t[:new_tokens] for t in truth]
    assert engine.workspace.tree_kernel is tree_kernel
    together = engine.generate_batch(prompts, method="ddtree", budget=8, max_new_tokens=new_tokens)  # one launch a round
    assert [(r.token_ids, r.acceptance_lengths) for r in together] == runs["cpu", 8]
    for budget in (8, 32):
        assert runs["cpu", budget] == runs["0", budget]
        assert max(max(lengths) for _, lengths in runs["cpu", budget]) > 3  # long paths were accepted
    engine.use_costs({1: synthetic({3: 5, 7: 6, 15: 8, 31: 14, 63: 30})}, fresh=True)
    for prompt, want in zip(prompts, truth):
        result = engine.generate(prompt, method="ddtree", budget="auto", max_new_tokens=new_tokens)
        assert result.token_ids == want[:new_tokens] and result.chosen_budgets


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter's process (the launcher above)")
def test_kernel_tree_from_raw_logits_and_nans_is_still_a_tree():
    """Positive scores (a chain's raw logits, which a graph warm-up once fed it) and NaNs: every value
    counts as at most 0 (NaN as -inf), so parents still come first and every link is set (issue 18)."""
    log_probs = torch.randn(15, 500, generator=torch.Generator().manual_seed(7)) * 3 + 2
    log_probs[3, :250] = float("nan")
    log_probs[5] = float("nan")
    sane = log_probs.nan_to_num(nan=float("-inf")).clamp(max=0.0)
    for budget in (8, 33, 64):  # (past 128 nodes, test_kernel_tree_equals_the_heap: a minute each here)
        tree = kernel_tree(log_probs, budget)
        assert len(tree) == tree_size(budget, 15, 500)
        check_structure(tree, sane)


def kernel_top_k(log_probs: torch.Tensor, budget: int):
    depth, vocab = log_probs.shape
    kplan = tree_kernel.KernelPlan(FrontierPlan(budget, depth, vocab), log_probs.device)
    values, ids = tree_kernel.top_tokens(log_probs, kplan)
    return values[:kplan.depth].clone(), ids[:kplan.depth].clone()


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter's process (the launcher above)")
@pytest.mark.parametrize("vocab,depth,budget,seed", [(3, 4, 8, 0), (300, 3, 64, 1), (5000, 2, 64, 2), (9000, 3, 130, 3)])
def test_vocabulary_top_k_is_torch_topk(vocab, depth, budget, seed):
    """The histogram top-k (two chunks and more at the larger vocabularies) finds torch.topk's tokens,
    best first, whether the k-th best sits in a crowded bin or not."""
    log_probs = random_log_probs(depth, vocab, seed)
    values, ids = kernel_top_k(log_probs, budget)
    want_values, want_ids = log_probs.topk(min(budget, vocab), dim=-1)
    assert torch.equal(values, want_values) and torch.equal(ids, want_ids)


@pytest.mark.skipif(not INTERPRETED, reason="runs in the interpreter's process (the launcher above)")
def test_vocabulary_top_k_with_ties_impossible_tokens_and_an_overfull_bin():
    """-inf tokens fill up a row with few possible ones; and when
    more tokens than the slots share the k-th's bin, every token of a better bin is still kept and the
    rest are real tokens of that bin, best first."""
    vocab = 6000
    log_probs = torch.full((3, vocab), -20.0)
    log_probs[0, [5, 4000, 17]] = torch.tensor([-0.5, -1.0, -1.0])  # 5997 tokens tie at -20
    log_probs[1] = float("-inf")
    log_probs[1, [7, 2]] = torch.tensor([-0.1, -2.5])
    log_probs[2] = -9.0 - torch.arange(vocab) * 1e-6  # all in one bin, distinct: more than the slots
    log_probs[2, 4321] = -3.0
    values, ids = kernel_top_k(log_probs, 16)
    assert ids[0, :4].tolist() == [5, 17, 4000, 0] and values[0, 3] == -20.0
    ties = ids[0, 3:].tolist()  # more than the slots tie: which ones are kept depends on the programs' order
    assert len(set(ties)) == 13 and not set(ties) & {5, 17, 4000} and (values[0, 3:] == -20.0).all()
    assert ids[1, :2].tolist() == [7, 2] and torch.isinf(values[1, 2:]).all()
    assert len(set(ids[1].tolist())) == 16 and max(ids[1].tolist()) < vocab
    assert ids[2, 0] == 4321 and values[2, 0] == -3.0
    assert (values[2, 1:] <= -9.0).all() and torch.equal(values[2], values[2].sort(descending=True).values)
    assert torch.equal(log_probs[2].gather(0, ids[2]), values[2]) and len(set(ids[2].tolist())) == 16
