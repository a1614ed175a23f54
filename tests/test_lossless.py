"""Greedy losslessness: dflash and ddtree at every budget give exactly the target's own (ar) tokens.

A random drafter never agrees with a random target, so every round accepts only the bonus token;
the `Oracle` wrapper (conftest) writes the target's true continuation into the drafter's output at
rank 0 or rank 1, so rounds accept long paths, some only through a tree's second-ranked branches.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from ddtree.api import random_drafter
from ddtree.engine import Engine

from conftest import FAMILIES, Oracle, random_prompts

BUDGETS = (1, 4, 16, 64, 256)
METHODS = [("dflash", None)] + [("ddtree", b) for b in BUDGETS]
NEW_TOKENS = 64

# one drafter shape per family: 1-2 layers, block 8 or 16
DRAFTERS = {
    "llama": dict(layers=1, block_size=8),
    "mistral": dict(layers=2, block_size=16, target_layer_ids=[0, 2]),
    "qwen2": dict(layers=2, block_size=8, target_layer_ids=[1, 3]),
    "qwen3": dict(layers=1, block_size=16),
}


def run(engine, prompts, method, budget, max_new_tokens, **kwargs):
    return [engine.generate(p, method=method, budget=budget or 1, max_new_tokens=max_new_tokens, **kwargs)
            for p in prompts]


@pytest.fixture(scope="module")
def references(make_engine):
    """(family, prompt set) -> ar results, computed once."""
    cache = {}

    def get(family, prompts, max_new_tokens):
        key = (family, tuple(map(tuple, prompts)), max_new_tokens)
        if key not in cache:
            cache[key] = [r.token_ids for r in run(make_engine(family, **DRAFTERS[family]), prompts, "ar", None,
                                                   max_new_tokens)]
        return cache[key]

    return get


def family_prompts(family):
    return random_prompts(20, FAMILIES[family][1]["vocab_size"], seed=sorted(FAMILIES).index(family), max_len=40)


@pytest.mark.parametrize("method,budget", METHODS, ids=[f"{m}{b or ''}" for m, b in METHODS])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_random_drafter_output_equals_ar(family, method, budget, make_engine, references):
    engine = make_engine(family, **DRAFTERS[family])
    prompts = family_prompts(family)
    expected = references(family, prompts, NEW_TOKENS)
    assert sum(len(e) for e in expected) > 15 * NEW_TOKENS  # most runs reach the token limit
    results = run(engine, prompts, method, budget, NEW_TOKENS)
    for i, (result, want) in enumerate(zip(results, expected)):
        assert result.token_ids == want, f"prompt {i}: {method} budget {budget} differs from ar"
        assert sum(result.acceptance_lengths) + 1 == len(result.token_ids)


def oracle_continuation(prompts, references):
    """The true greedy continuation after a prefix, read from ar results with extra tokens."""
    by_prompt = {tuple(p): r for p, r in zip(prompts, references)}

    def continuation(prefix, n):
        for prompt, ref in by_prompt.items():
            if tuple(prefix[:len(prompt)]) == prompt and list(prefix[len(prompt):]) == ref[:len(prefix) - len(prompt)]:
                done = len(prefix) - len(prompt)
                return ref[done:done + n]
        return None

    return continuation


def second_rank_every_fourth(depth, position):
    return 1 if position % 4 == 3 else 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_accepting_drafter_output_equals_ar(family, make_engine, references, monkeypatch):
    engine = make_engine(family, **DRAFTERS[family])
    prompts = family_prompts(family)[:8]
    longer = references(family, prompts, NEW_TOKENS + 16)  # the continuation after the last round too
    expected = references(family, prompts, NEW_TOKENS)
    oracle = Oracle(oracle_continuation(prompts, longer), rank=second_rank_every_fourth).install(monkeypatch)
    mean = {}
    for method, budget in METHODS:
        results = run(engine, prompts, method, budget, NEW_TOKENS)
        for i, (result, want) in enumerate(zip(results, expected)):
            assert result.token_ids == want, f"prompt {i}: {method} budget {budget} differs from ar"
        rounds = sum(r.rounds for r in results)
        mean[(method, budget)] = sum(sum(r.acceptance_lengths) for r in results) / rounds
    assert oracle.calls > 0
    # every method accepts multi-token paths; a chain stops at the second-ranked tokens, a tree does not
    print(family, {f"{m}{b or ''}": round(v, 2) for (m, b), v in mean.items()})
    assert all(m > 1.5 for m in mean.values()), mean
    assert mean[("ddtree", 1)] <= 2.0
    for budget in (16, 64, 256):
        assert mean[("ddtree", budget)] > mean[("dflash", None)] + 0.5, mean


def test_accepting_drafter_with_rank_zero_everywhere_matches_chain(make_engine, references, monkeypatch):
    """With the truth always on top and a very confident drafter, the best tree of budget >= block - 1
    contains the whole chain: dflash and ddtree both accept whole blocks."""
    family = "qwen3"
    engine = make_engine(family, **DRAFTERS[family])
    block = DRAFTERS[family]["block_size"]
    prompts = family_prompts(family)[:4]
    longer = references(family, prompts, NEW_TOKENS + 16)
    expected = references(family, prompts, NEW_TOKENS)
    Oracle(oracle_continuation(prompts, longer), rank=lambda d, p: 0, masses=(0.97, 0.02)).install(monkeypatch)
    for method, budget in [("dflash", None), ("ddtree", 16), ("ddtree", 64)]:
        for result, want in zip(run(engine, prompts, method, budget, NEW_TOKENS), expected):
            assert result.token_ids == want
            if len(want) == NEW_TOKENS:
                # full blocks until the token limit cuts the last round short
                assert result.acceptance_lengths[:-1] == [block] * (len(result.acceptance_lengths) - 1)


def test_mask_token_in_the_output_is_kept(make_engine, references):
    """A drafter whose mask id is a token the target really produces: outputs still equal ar."""
    family = "llama"
    prompts = family_prompts(family)[:5]
    expected = references(family, prompts, NEW_TOKENS)
    common = max(set(expected[0]), key=expected[0].count)
    engine = make_engine(family, layers=1, block_size=8, mask_token_id=common)
    assert engine.drafter.cfg.mask_token_id == common
    for method, budget in [("dflash", None), ("ddtree", 16)]:
        for result, want in zip(run(engine, prompts, method, budget, NEW_TOKENS), expected):
            assert result.token_ids == want


# ----- SmolLM2 --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_engine(smollm2_target):
    drafter = random_drafter(smollm2_target, num_layers=1, block_size=16)
    return Engine(smollm2_target, drafter, torch.device("cpu"), torch.float32)


def smollm2_prompts(engine, count):
    """Chat prompts and random token ids, alternating."""
    texts = ["Write a haiku about the sea.", "What is 17 times 23?", "List three prime numbers.",
             "Explain what a hash table is.", "Name a colour.", "Say hello in French."]
    chat = [engine.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
    rand = random_prompts(count, engine.model.cfg.vocab_size, seed=11, min_len=2, max_len=60)
    return [chat[i // 2] if i % 2 == 0 and i // 2 < len(chat) else rand[i] for i in range(count)]


def smollm2_check(engine, prompts, new_tokens, methods, timings=None):
    """ar first, then every method on the same prompts; with `timings`, seconds per method are
    recorded (and printed, for `pytest -s`)."""
    expected, seconds = [], time.perf_counter()
    for p in prompts:
        expected.append(engine.generate(p, method="ar", max_new_tokens=new_tokens).token_ids)
    if timings is not None:
        timings["ar"] = time.perf_counter() - seconds
        print(f"\nSmolLM2 ar: {timings['ar']:.1f} s for {len(prompts)} prompts x {new_tokens} tokens", flush=True)
    for method, budget in methods:
        seconds = time.perf_counter()
        results = run(engine, prompts, method, budget, new_tokens)
        if timings is not None:
            name = f"{method}{budget or ''}"
            timings[name] = time.perf_counter() - seconds
            stages = {k: round(sum(r.stage_seconds[k] for r in results), 1) for k in results[0].stage_seconds}
            print(f"SmolLM2 {name}: {timings[name]:.1f} s; stages {stages}", flush=True)
        for i, (result, want) in enumerate(zip(results, expected)):
            assert result.token_ids == want, f"prompt {i}: {method} budget {budget} differs from ar"
    return expected


def test_smollm2_random_drafter_small(smollm2_engine):
    """Always run: 2 prompts x 16 tokens, every method and budget."""
    smollm2_check(smollm2_engine, smollm2_prompts(smollm2_engine, 2), 16, METHODS)


def test_smollm2_accepting_drafter(smollm2_engine, monkeypatch):
    """SmolLM2 with the oracle: long paths accepted, output still ar's."""
    engine = smollm2_engine
    prompts = smollm2_prompts(engine, 2)
    longer = [engine.generate(p, method="ar", max_new_tokens=32 + 16).token_ids for p in prompts]
    oracle = Oracle(oracle_continuation(prompts, longer), rank=second_rank_every_fourth).install(monkeypatch)
    means = {}
    for method, budget in [("dflash", None), ("ddtree", 4), ("ddtree", 64)]:
        results = run(engine, prompts, method, budget, 32)
        for result, want in zip(results, longer):
            assert result.token_ids == want[:len(result.token_ids)] and (
                len(result.token_ids) == 32 or result.token_ids[-1] in engine.target.eos_token_ids)
        means[(method, budget)] = sum(r.mean_acceptance for r in results) / len(results)
    assert oracle.calls > 0
    assert all(m > 1.5 for m in means.values()), means
    assert means[("ddtree", 64)] > means[("dflash", None)], means


@pytest.mark.slow
def test_smollm2_random_drafter_full(smollm2_engine):
    """20 prompts x 64 tokens for ar, dflash and every budget (about half an hour on 2 CPU cores)."""
    timings = {}
    smollm2_check(smollm2_engine, smollm2_prompts(smollm2_engine, 20), NEW_TOKENS, METHODS, timings)
    print("SmolLM2 seconds for 20 prompts x 64 tokens:", {k: round(v, 1) for k, v in timings.items()})


def test_smollm2_bundled_drafter(smollm2_target):
    """The trained drafter bundled for SmolLM2 (what `ddtree.load()` picks by default): real
    multi-token acceptance on chat prompts, and still exactly the target's own output."""
    import ddtree
    from ddtree.api import BUNDLED_DRAFTERS, load_drafter

    path = BUNDLED_DRAFTERS[ddtree.api.SMOLLM2_ALIAS]
    if not os.path.isdir(path):
        pytest.skip("no bundled SmolLM2 drafter in this checkout")
    engine = Engine(smollm2_target, load_drafter(path), torch.device("cpu"), torch.float32)
    prompts = [engine.encode(t, chat=True) for t in ("What is 12 plus 30? Answer briefly.",
                                                     "Write one sentence about cats.")]
    expected = [engine.generate(p, method="ar", max_new_tokens=32).token_ids for p in prompts]
    for method, budget in [("dflash", None), ("ddtree", 64)]:
        results = run(engine, prompts, method, budget, 32)
        for result, want in zip(results, expected):
            assert result.token_ids == want
        mean = sum(sum(r.acceptance_lengths) for r in results) / sum(r.rounds for r in results)
        assert mean > 1.5, f"{method}: mean acceptance {mean:.2f} with the trained drafter"
