"""A drafter restricted to some tokens (`--draft-vocab`): output stays the target's own, the drafted tokens
map back to their ids, a token outside the set is never drafted, and the counts come from training data."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ddtree.api import random_drafter
from ddtree.calibration import pair_description
from ddtree.drafter import TOKEN_COUNTS_NAME, frequent_tokens, write_token_counts
from ddtree.engine import Engine
from ddtree.errors import DDTreeError
from ddtree.stages import Stages

from conftest import FAMILIES, Oracle, random_prompts
from test_lossless import oracle_continuation

FAMILY = "qwen3"
NEW_TOKENS = 48


def restricted_engine(targets, tokens: list[int]) -> Engine:
    target = targets[FAMILY]
    drafter = random_drafter(target, num_layers=1, block_size=8)
    drafter.restrict_vocabulary(torch.tensor(tokens), target.model.lm_head.weight)
    return Engine(target, drafter, torch.device("cpu"), torch.float32)


def generate_all(engine, prompts, method, budget=None, max_new_tokens=NEW_TOKENS):
    return [engine.generate(p, method=method, budget=budget or 1, max_new_tokens=max_new_tokens) for p in prompts]


@pytest.fixture(scope="module")
def case(targets):
    """Prompts, their ar continuations (with 16 tokens more, for the oracle), and the tokens those use."""
    vocab = FAMILIES[FAMILY][1]["vocab_size"]
    prompts = random_prompts(6, vocab, seed=5, max_len=30)
    engine = restricted_engine(targets, list(range(vocab)))
    longer = [r.token_ids for r in generate_all(engine, prompts, "ar", max_new_tokens=NEW_TOKENS + 16)]
    return prompts, longer, sorted({t for ids in longer for t in ids}), vocab


def mean_acceptance(results) -> float:
    return sum(sum(r.acceptance_lengths) for r in results) / sum(r.rounds for r in results)


@pytest.mark.parametrize("method,budget", [("dflash", None), ("ddtree", 16)])
def test_drafted_tokens_map_back_to_their_ids(case, targets, monkeypatch, method, budget):
    """Every token the answers use is drafted, among others, at indices unlike the ids: the oracle's true
    tokens are accepted in long runs, which a wrong mapping would break."""
    prompts, longer, used, vocab = case
    others = [t for t in range(vocab) if t not in used][::3]
    engine = restricted_engine(targets, used + others)
    assert engine.drafted_vocab == len(used) + len(others) < vocab
    Oracle(oracle_continuation(prompts, longer)).install(monkeypatch)
    results = generate_all(engine, prompts, method, budget)
    assert [r.token_ids for r in results] == [ids[:NEW_TOKENS] for ids in longer]
    assert mean_acceptance(results) > 3.0


@pytest.mark.parametrize("method,budget", [("dflash", None), ("ddtree", 16), ("ddtree", "auto")])
def test_only_the_vocabulary_is_drafted(case, targets, monkeypatch, method, budget):
    """Every token in every round's chain or tree is one of the drafted vocabulary's (here the tokens the
    answers do not use, so nothing is ever accepted past the bonus token), and the output is the target's."""
    prompts, longer, used, vocab = case
    allowed = [t for t in range(vocab) if t not in used]
    engine = restricted_engine(targets, allowed)
    drafted = []
    real_build = Stages.build_tree

    def build_tree(stages, count, index, kind, *args):
        real_build(stages, count, index, kind, *args)
        if kind != "bonus":
            trees = stages.ws.tree(count, stages.ws.max_rows)
            drafted.extend(int(t) for b in range(count) for t in trees.ids[b, 1:int(trees.used[b])])

    monkeypatch.setattr(Stages, "build_tree", build_tree)
    results = generate_all(engine, prompts, method, budget)
    assert [r.token_ids for r in results] == [ids[:NEW_TOKENS] for ids in longer]
    assert len(drafted) > 100 and set(drafted) <= set(allowed)
    assert mean_acceptance(results) == 1.0


def test_frequent_tokens_come_from_the_counts(tmp_path, targets):
    drafter = random_drafter(targets[FAMILY], num_layers=1, block_size=8)
    vocab = drafter.cfg.vocab_size
    drafter.source = str(tmp_path)
    with pytest.raises(DDTreeError, match="token_counts.json"):
        frequent_tokens(drafter, 10, vocab)
    sequences = [np.array([1, 2, 3, 7, 7, 7, 5]), np.array([9, 9, 5, 7])]
    write_token_counts(str(tmp_path), sequences, [3, 1], vocab)  # answers: 7 7 7 5 | 9 5 7
    counts = json.load(open(os.path.join(tmp_path, TOKEN_COUNTS_NAME)))["counts"]
    assert len(counts) == vocab and counts[7] == 4 and counts[5] == 2 and counts[9] == 1 and sum(counts) == 7
    assert frequent_tokens(drafter, 3, vocab).tolist() == [7, 5, 9]
    assert frequent_tokens(drafter, 3, vocab, dummy=True).tolist() == [0, 1, 2]
    for bad in (0, vocab + 1):
        with pytest.raises(DDTreeError, match="--draft-vocab must be between 1"):
            frequent_tokens(drafter, bad, vocab)


def test_the_drafted_vocabulary_has_its_own_calibration(targets):
    """auto's stored costs depend on the draft's vocabulary size; the whole vocabulary keeps the old keys."""
    target = targets[FAMILY]
    drafter = random_drafter(target, num_layers=1, block_size=8)
    cfg, vocab = target.model.cfg, target.model.cfg.vocab_size
    whole = pair_description(target.name, cfg, drafter.cfg)
    assert pair_description(target.name, cfg, drafter.cfg, vocab) == whole
    assert pair_description(target.name, cfg, drafter.cfg, vocab // 2) != whole
