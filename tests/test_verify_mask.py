"""The tree verify forward (ancestor-only mask, depth positions) against running each root path alone,
and KV-cache compaction (move_rows) against a fresh run of context + accepted path."""

from __future__ import annotations

import random

import pytest
import torch

from ddtree.model import causal_mask
from ddtree.tree import DraftTree, ancestor_mask

from conftest import device_prefix
from test_tree import random_tree

TAPS = (0, 2)


def assert_close(ours, ref, rtol=1e-4):
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rtol * scale, f"max |diff| {diff:.3g} > {rtol} x {scale:.3g}"


def plain_run(model, ids: list[int]):
    """Logits and taps of every position of ids, without a cache."""
    n = len(ids)
    hidden, features = model(torch.tensor([ids]), torch.arange(n)[None], causal_mask(n, 0, "cpu"), taps=TAPS)
    return model.logits(hidden)[0], features[0]


def prefill(model, context: list[int], extra: int):
    cache = model.new_cache(len(context) + extra)
    n = len(context)
    model(torch.tensor([context]), torch.arange(n)[None], causal_mask(n, 0, "cpu"), cache, 0, TAPS)
    return cache


def verify_forward(model, cache, tree: DraftTree, root: int, start: int):
    size = len(tree) + 1
    ids = torch.tensor([root] + tree.tokens)
    positions = start + torch.tensor([0] + tree.depths)
    mask = torch.ones(size, start + size, dtype=torch.bool)
    mask[:, start:] = ancestor_mask(torch.tensor([0] + tree.parents), max(tree.depths, default=0))
    hidden, features = model(ids[None], positions[None], mask[None, None], cache, start, TAPS)
    return model.logits(hidden)[0], features[0]


def root_path(tree: DraftTree, node: int) -> list[int]:
    """Node indices from the root (0) to node."""
    path = [node]
    while path[-1] != 0:
        path.append(tree.parents[path[-1] - 1])
    return path[::-1]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_verify_logits_equal_each_paths_own_run(family, targets):
    model = targets[family].model
    vocab = model.cfg.vocab_size
    rng = random.Random(family)
    with torch.inference_mode():
        for trial in range(4):
            context = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
            tree = random_tree(rng.randint(1, 24), rng, vocab)
            root = rng.randrange(vocab)
            start = len(context)
            cache = prefill(model, context, len(tree) + 1)
            logits, features = verify_forward(model, cache, tree, root, start)
            tokens = [root] + tree.tokens
            for node in range(len(tree) + 1):
                path = root_path(tree, node)
                ref_logits, ref_features = plain_run(model, context + [tokens[i] for i in path])
                assert_close(logits[node], ref_logits[-1])
                assert_close(features[node], ref_features[-1])


def test_verify_of_a_wide_tree_with_many_siblings(targets):
    """Many siblings at one position: each must see only its own ancestors."""
    model = targets["mistral"].model
    context = list(range(40, 60))
    tokens = list(range(1, 31)) + [7, 8, 9]
    parents = [0] * 30 + [3, 3, 31]
    depths = [1] * 30 + [2, 2, 3]
    tree = DraftTree(tokens, parents, depths, [0.0] * 33, {(p, t): i + 1 for i, (p, t) in enumerate(zip(parents, tokens))})
    with torch.inference_mode():
        cache = prefill(model, context, 40)
        logits, _ = verify_forward(model, cache, tree, 99, len(context))
        for node in (0, 1, 3, 17, 30, 31, 32, 33):
            path = root_path(tree, node)
            ids = context + [([99] + tokens)[i] for i in path]
            assert_close(logits[node], plain_run(model, ids)[0][-1])


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_move_rows_compaction(family, targets):
    """After verifying a tree, moving an accepted path's rows into place leaves a cache that is
    exactly the cache of context + path: the next forward matches a fresh run."""
    model = targets[family].model
    vocab = model.cfg.vocab_size
    rng = random.Random(7)
    with torch.inference_mode():
        for trial in range(6):
            context = [rng.randrange(vocab) for _ in range(rng.randint(1, 25))]
            tree = random_tree(rng.randint(2, 20), rng, vocab)
            root = rng.randrange(vocab)
            start = len(context)
            cache = prefill(model, context, len(tree) + 8)
            verify_forward(model, cache, tree, root, start)
            # the deepest node's path: in general not contiguous in the cache
            node = max(range(len(tree) + 1), key=lambda i: (tree.depths[i - 1] if i else 0, i))
            path = root_path(tree, node)
            cache.move_rows(torch.tensor(path) + start, torch.arange(len(path)) + start)
            accepted = [([root] + tree.tokens)[i] for i in path]
            committed = start + len(path)
            # two more steps on top of the compacted cache: one token, then three at once
            nxt = [rng.randrange(vocab) for _ in range(4)]
            hidden, _ = model(torch.tensor([nxt[:1]]), torch.tensor([[committed]]),
                              causal_mask(1, committed, "cpu"), cache, committed)
            ref = plain_run(model, context + accepted + nxt)[0]
            assert_close(model.logits(hidden)[0, -1], ref[committed])
            hidden, _ = model(torch.tensor([nxt[1:]]), torch.arange(committed + 1, committed + 4)[None],
                              causal_mask(3, committed + 1, "cpu"), cache, committed + 1)
            assert_close(model.logits(hidden)[0], ref[committed + 1:])


def test_move_rows_moves_exact_rows():
    from ddtree.model import KVCache

    cache = KVCache.empty(2, 1, 2, 10, 3, "cpu", torch.float32)
    cache.keys.copy_(torch.arange(cache.keys.numel(), dtype=torch.float32).view_as(cache.keys))
    cache.values.copy_(-cache.keys)
    before_k, before_v = cache.keys.clone(), cache.values.clone()
    cache.move_rows(torch.tensor([4, 7, 9]), torch.tensor([4, 5, 6]))
    assert torch.equal(cache.keys[:, :, :, 4:7], before_k[:, :, :, [4, 7, 9]])
    assert torch.equal(cache.values[:, :, :, 4:7], before_v[:, :, :, [4, 7, 9]])
    assert torch.equal(cache.keys[:, :, :, :4], before_k[:, :, :, :4])


@pytest.mark.parametrize("method,budget", [("dflash", None), ("ddtree", 3), ("ddtree", 16)])
def test_drafted_log_probs_equal_a_fresh_drafter_pass(method, budget, make_engine, monkeypatch):
    """Every round, the log-probs the engine drafts from its cached, block-at-a-time drafter context
    equal one cache-free drafter pass over the target features of everything committed so far (a
    chain's draft keeps only each depth's argmax)."""
    from ddtree.generation import BatchRunner
    from ddtree.stages import Stages

    engine = make_engine("llama", layers=2, block_size=6)
    model, drafter = engine.model, engine.drafter
    real_draft, real_launch = Stages.run_draft, BatchRunner.launch
    checked, current = [], {}

    def launch(runner, **options):
        current["generation"], = runner.live()  # (a request alone)
        return real_launch(runner, **options)

    def draft(stages, count, attend, depth, chain, tree):
        real_draft(stages, count, attend, depth, chain, tree)
        ws, gen = stages.ws, current["generation"]
        committed = int(ws.committed[0])
        prefix = device_prefix(gen)
        assert len(prefix) == committed + 1 and prefix[-1] == int(ws.bonus[0])
        _, context = model(torch.tensor([prefix[:-1]]), torch.arange(committed)[None],
                           causal_mask(committed, 0, "cpu"), taps=engine.taps)
        block = drafter.cfg.block_size
        ids = torch.tensor([[prefix[-1]] + [drafter.cfg.mask_token_id] * (block - 1)])
        hidden = drafter(model.embed_tokens(ids), torch.arange(committed, committed + block)[None], context,
                         torch.arange(committed)[None])
        assert depth == (min(block - 1, budget) if method == "ddtree" else block - 1)  # 3 nodes: 3 depths
        assert chain == (method == "dflash") and tree == (not chain)
        logits = model.logits(hidden[0, 1:depth + 1])
        if chain:
            assert torch.equal(ws.chain_tokens[0], logits.argmax(dim=-1))
        else:
            assert_close(ws.log_probs[0, :depth], torch.log_softmax(logits, dim=-1))
        checked.append(committed)

    monkeypatch.setattr(BatchRunner, "launch", launch)
    monkeypatch.setattr(Stages, "run_draft", draft)
    with torch.inference_mode():
        for prompt in ([5, 9, 23, 4], list(range(30, 70))):
            engine.generate(prompt, method=method, budget=budget, max_new_tokens=24)
    assert len(checked) >= 8
