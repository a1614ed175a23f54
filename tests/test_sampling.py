"""Losslessness at temperature > 0 (the distribution of the output equals the target's), the
top-k / top-p filters, and seeding."""

from __future__ import annotations

import math

import pytest
import torch

from ddtree.model import causal_mask
from ddtree.sampling import (
    SamplingParams, choose_tokens, filtered_logits, mix32, mul32, position_noise, seed_key, token_keys,
)

from ddtree.stages import Stages

from conftest import Oracle

PROMPT = [1, 5, 3, 7, 2]
FIRST = 3  # the joint distribution of the first FIRST new tokens is compared
NEW_TOKENS = 5  # a little more than FIRST, so the first round's tree reaches depth FIRST
RUNS = 2000


# ----- exact distributions ---------------------------------------------------------------------------

def exact_joint(model, prompt, params: SamplingParams, n: int = FIRST) -> torch.Tensor:
    """p(t1..tn | prompt) for every sequence, flattened in base-V order, from the target alone."""
    vocab = model.cfg.vocab_size
    seqs, probs = torch.tensor([prompt]), torch.ones(1, dtype=torch.float64)
    with torch.inference_mode():
        for _ in range(n):
            length = seqs.shape[1]
            hidden, _ = model(seqs, torch.arange(length)[None], causal_mask(length, 0, "cpu"))
            p = filtered_logits(model.logits(hidden[:, -1]), params).softmax(-1).double()
            probs = (probs[:, None] * p).reshape(-1)
            seqs = torch.cat([seqs.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(seqs.shape[0])[:, None]], 1)
    return probs / probs.sum()


def index_of(tokens, vocab):
    return sum(t * vocab ** (len(tokens) - 1 - i) for i, t in enumerate(tokens))


def empirical(samples: list[list[int]], vocab: int) -> torch.Tensor:
    counts = torch.zeros(vocab ** FIRST, dtype=torch.float64)
    for tokens in samples:
        counts[index_of(tokens[:FIRST], vocab)] += 1
    return counts / counts.sum()


def tv(p: torch.Tensor, q: torch.Tensor) -> float:
    return 0.5 * (p - q).abs().sum().item()


def tv_bound(p: torch.Tensor, n: int, quantile: float = 0.999, trials: int = 1000) -> float:
    """The `quantile` of TV(empirical of n draws from p, p), by Monte Carlo: what sampling error alone gives."""
    generator = torch.Generator().manual_seed(1234)
    draws = torch.multinomial(p.float().expand(trials, -1), n, replacement=True, generator=generator)
    counts = torch.zeros(trials, p.numel(), dtype=torch.float64).scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
    tvs = 0.5 * (counts / n - p).abs().sum(-1)
    return torch.quantile(tvs, quantile).item()


def sample_runs(engine, method, budget, params: SamplingParams, runs: int = RUNS, seed0: int = 0):
    results = [engine.generate(PROMPT, method=method, budget=budget, max_new_tokens=NEW_TOKENS,
                               temperature=params.temperature, top_k=params.top_k, top_p=params.top_p, seed=seed0 + i)
               for i in range(runs)]
    return [r.token_ids for r in results], results


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine("small_vocab", layers=1, block_size=8)


def greedy_continuation(model):
    """Oracle continuation for sampling: the target's greedy chain after the prefix (a helpful drafter)."""

    def continuation(prefix, n):
        ids = list(prefix)
        out = []
        with torch.inference_mode():
            for _ in range(min(n, FIRST)):
                length = len(ids)
                hidden, _ = model(torch.tensor([ids]), torch.arange(length)[None], causal_mask(length, 0, "cpu"))
                out.append(int(model.logits(hidden[0, -1]).argmax()))
                ids.append(out[-1])
        return out

    return continuation


def flat_drafter(monkeypatch):
    """A drafter with no opinion: uniform log-probs, so a tree of 20 over 12 tokens is every token at
    depth 1 and 8 children of one of them at depth 2."""
    real = Stages.run_draft

    def draft(stages, *args):
        real(stages, *args)
        stages.ws.log_probs.fill_(-math.log(stages.ws.log_probs.shape[-1]))

    monkeypatch.setattr(Stages, "run_draft", draft)


# A random drafter's chain almost never matches a sample, so dflash runs with the helpful oracle
# (the target's greedy chain at rank 0); a flat tree catches every first sample and some second ones.
CASES = [
    # (name, method, budget, params, drafter)
    ("ar", "ar", 1, SamplingParams(1.0), None),
    ("ddtree20-flat", "ddtree", 20, SamplingParams(1.0), "flat"),
    ("ddtree16-oracle-topk-topp", "ddtree", 16, SamplingParams(0.9, top_k=5, top_p=0.9), "oracle"),
    ("dflash-oracle", "dflash", 1, SamplingParams(1.0), "oracle"),
]


@pytest.mark.parametrize("name,method,budget,params,drafter", CASES, ids=[c[0] for c in CASES])
def test_first_tokens_follow_the_targets_distribution(name, method, budget, params, drafter, engine, monkeypatch):
    model = engine.model
    vocab = model.cfg.vocab_size
    if drafter == "oracle":
        Oracle(greedy_continuation(model)).install(monkeypatch)
    elif drafter == "flat":
        flat_drafter(monkeypatch)
    exact = exact_joint(model, PROMPT, params)
    bound = tv_bound(exact, RUNS)
    samples, results = sample_runs(engine, method, budget, params)
    assert all(len(s) == NEW_TOKENS for s in samples)
    distance = tv(empirical(samples, vocab), exact)
    assert distance < bound, f"{name}: TV {distance:.4f} to the target's distribution exceeds {bound:.4f}"
    if method != "ar":
        # the speculative paths were really exercised: rounds that committed several tokens at once
        lengths = [length for r in results for length in r.acceptance_lengths]
        assert max(lengths) >= FIRST and sum(lengths) / len(lengths) > 1.2


def test_the_tv_check_has_power(engine):
    """The same check rejects a sampler that is only slightly off (temperature 1.15 instead of 1)."""
    exact = exact_joint(engine.model, PROMPT, SamplingParams(1.0))
    wrong = exact_joint(engine.model, PROMPT, SamplingParams(1.15))
    generator = torch.Generator().manual_seed(5)
    draws = torch.multinomial(wrong.float(), RUNS, replacement=True, generator=generator)
    emp = torch.bincount(draws, minlength=exact.numel()).double() / RUNS
    assert tv(emp, exact) > tv_bound(exact, RUNS)


def test_same_seed_same_output(engine, make_engine):
    for method, budget in [("ar", 1), ("dflash", 1), ("ddtree", 8)]:
        kwargs = dict(method=method, budget=budget, max_new_tokens=20, temperature=1.0, top_p=0.95)
        first = engine.generate(PROMPT, seed=42, **kwargs).token_ids
        assert engine.generate(PROMPT, seed=42, **kwargs).token_ids == first
        outputs = {tuple(engine.generate(PROMPT, seed=s, **kwargs).token_ids) for s in range(8)}
        assert len(outputs) > 1, "different seeds should give different samples"
    # a bigger target and vocabulary too
    big = make_engine("qwen3", layers=1, block_size=16)
    kwargs = dict(method="ddtree", budget=32, max_new_tokens=24, temperature=0.8, top_k=20)
    assert big.generate([3, 4, 5], seed=7, **kwargs).token_ids == big.generate([3, 4, 5], seed=7, **kwargs).token_ids


def test_every_method_and_budget_draws_the_same_sample(engine, monkeypatch):
    """The sampling noise is keyed by (seed, position, token), so a seeded sample does not depend on which
    method, tree or budget reached a position: speculative decoding reproduces the target alone token
    for token at temperature > 0 too, here with trees that really accept (a flat drafter's trees hold
    every first token) and a chain that does (the target's greedy continuation)."""
    kwargs = dict(max_new_tokens=16, temperature=0.9, top_p=0.95)
    want = {seed: engine.generate(PROMPT, method="ar", seed=seed, **kwargs).token_ids for seed in range(4)}
    accepted = []
    with monkeypatch.context() as patch:
        flat_drafter(patch)
        for budget in (4, 20, 64):
            for seed, tokens in want.items():
                result = engine.generate(PROMPT, method="ddtree", budget=budget, seed=seed, **kwargs)
                assert result.token_ids == tokens, (budget, seed)
                accepted += result.acceptance_lengths
    Oracle(greedy_continuation(engine.model)).install(monkeypatch)
    for seed, tokens in want.items():
        result = engine.generate(PROMPT, method="dflash", seed=seed, **kwargs)
        assert result.token_ids == tokens, ("dflash", seed)
        accepted += result.acceptance_lengths
    assert max(accepted) >= 3 and sum(accepted) / len(accepted) > 1.3


def test_position_noise_is_exponential_and_keyed_by_seed_position_and_token():
    keys = token_keys(1000, "cpu")
    seed = torch.tensor(seed_key(12345))
    rows = position_noise(seed, torch.tensor([5, 6, 7]), keys)
    again = position_noise(seed, torch.tensor([7, 5]), keys)
    assert torch.equal(rows[2], again[0]) and torch.equal(rows[0], again[1])  # whatever else is drawn with it
    assert not torch.equal(rows[0], rows[1])
    assert not torch.equal(position_noise(torch.tensor(seed_key(12346)), torch.tensor([5]), keys)[0], rows[0])
    noise = position_noise(seed, torch.arange(200), keys).double()  # 200,000 draws
    assert abs(noise.mean().item() - 1) < 0.01 and abs(noise.var().item() - 1) < 0.03
    assert abs((noise > 1).double().mean().item() - math.exp(-1)) < 0.005
    uniforms = torch.exp(-noise)
    counts = torch.histc(uniforms, bins=64, min=0, max=1)
    expected = uniforms.numel() / 64
    assert ((counts - expected) ** 2 / expected).sum().item() < 63 + 5 * math.sqrt(2 * 63)  # chi-square, 63 dof
    # neither neighbouring positions nor neighbouring tokens are correlated
    for a, b in ((noise[:-1], noise[1:]), (noise[:, :-1], noise[:, 1:])):
        assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()) < 0.015


def test_the_32_bit_hash_matches_its_definition():
    def reference(x):
        x ^= x >> 16
        x = x * 0x7FEB352D % 2 ** 32
        x ^= x >> 15
        x = x * 0x846CA68B % 2 ** 32
        return x ^ (x >> 16)

    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.randint(0, 2 ** 32, (1000,), generator=generator), torch.tensor([0, 1, 2 ** 32 - 1])])
    assert mix32(values).tolist() == [reference(v) for v in values.tolist()]
    assert mul32(values, 0x846CA68B).tolist() == [v * 0x846CA68B % 2 ** 32 for v in values.tolist()]
    assert seed_key(2 ** 64 - 1) == 0 and seed_key(2 ** 40 + 3) == (2 ** 8) ^ 3 and seed_key(7) == 7
    assert seed_key(-1) == 0 and seed_key(-2) == 1 and 0 <= seed_key(-12345) < 2 ** 32  # (folds 128 bits)


# ----- the filters ------------------------------------------------------------------------------------

def reference_filter(row: list[float], temperature: float, top_k: int, top_p: float) -> set[int]:
    """Tokens kept, by the textbook definitions: top-k by value, then the smallest head of the
    sorted distribution whose mass reaches top_p."""
    scaled = [x / temperature for x in row]
    order = sorted(range(len(row)), key=lambda i: -scaled[i])
    kept = order[:top_k] if 0 < top_k < len(row) else order
    if top_p < 1:
        m = max(scaled[i] for i in kept)
        z = sum(math.exp(scaled[i] - m) for i in kept)
        mass, head = 0.0, []
        for i in kept:
            head.append(i)
            mass += math.exp(scaled[i] - m) / z
            if mass >= top_p:
                break
        kept = head
    return set(kept)


@pytest.mark.parametrize("seed", range(6))
def test_filtered_logits_against_reference(seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 30, generator=generator) * 3
    for temperature in (0.5, 1.0, 2.0):
        for top_k in (0, 1, 3, 29, 30, 50):
            for top_p in (1.0, 0.95, 0.5, 0.1, 1e-6):
                params = SamplingParams(temperature, top_k, top_p)
                out = filtered_logits(logits, params)
                for row, filtered in zip(logits.tolist(), out):
                    kept = {i for i, x in enumerate(filtered.tolist()) if x != float("-inf")}
                    assert kept == reference_filter(row, temperature, top_k, top_p), (temperature, top_k, top_p)
                    # survivors keep their temperature-scaled logits
                    idx = sorted(kept)
                    assert torch.allclose(filtered[idx], torch.tensor(row)[idx] / temperature)


def test_top_k_and_top_p_examples():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    keep = lambda p: (filtered_logits(logits, p) != float("-inf"))[0].tolist()
    assert keep(SamplingParams(1.0, top_k=2)) == [True, True, False, False, False]
    assert keep(SamplingParams(1.0, top_p=0.45)) == [True, False, False, False, False]
    assert keep(SamplingParams(1.0, top_p=0.6)) == [True, True, False, False, False]
    assert keep(SamplingParams(1.0, top_p=0.84)) == [True, True, True, False, False]
    assert keep(SamplingParams(1.0, top_p=1.0)) == [True] * 5
    assert keep(SamplingParams(1.0, top_k=4, top_p=0.9)) == [True, True, True, True, False]


def test_choose_tokens_greedy_and_sampled_frequencies():
    logits = torch.log(torch.tensor([[0.1, 0.6, 0.3], [0.7, 0.2, 0.1]]))
    assert choose_tokens(logits, SamplingParams(0.0), None).tolist() == [1, 0]
    generator = torch.Generator().manual_seed(0)
    rows = logits.repeat(4000, 1)
    picks = choose_tokens(rows, SamplingParams(1.0), generator).view(4000, 2)
    freq0 = torch.bincount(picks[:, 0], minlength=3).double() / 4000
    assert torch.allclose(freq0, torch.tensor([0.1, 0.6, 0.3], dtype=torch.float64), atol=0.03)
    picks = choose_tokens(rows, SamplingParams(1.0, top_k=1), generator).view(4000, 2)
    assert picks[:, 0].eq(1).all() and picks[:, 1].eq(0).all()


@pytest.mark.parametrize("bad", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(temperature=float("inf")),
                                 dict(temperature="1"), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-2),
                                 dict(top_k=1.5), dict(top_k=True)])
def test_sampling_params_validation(bad):
    from ddtree.errors import DDTreeError

    with pytest.raises(DDTreeError):
        SamplingParams(**({"temperature": 1.0} | bad))


def test_tiny_temperatures_are_greedy_and_tiny_top_p_keeps_the_likeliest():
    """A float32 division by 1e-40 overflows and the race then picks token 0: such temperatures are greedy."""
    logits = torch.tensor([[0.1, 2.0, 0.3], [1.5, 0.2, 0.1]])
    for temperature in (1e-40, 1e-300, 5e-5):
        params = SamplingParams(temperature)
        assert params.greedy and params.mode == "greedy"
        assert choose_tokens(logits, params).tolist() == [1, 0]
    cut = SamplingParams(1.0, top_p=1e-300)
    assert cut.top_p > 0 and cut.mode == "filter"
    for seed in range(5):
        assert choose_tokens(logits, cut, torch.Generator().manual_seed(seed)).tolist() == [1, 0]
    assert SamplingParams(1.0, top_k=-1).top_k == 0  # -1 is "off", as vLLM spells it


def test_device_state_filters_as_the_values_do():
    """One captured graph per mode reads the values from tensors: the same cut as the numbers give."""
    from ddtree.sampling import SamplingState

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)) * 2
    state = SamplingState("cpu")
    for params in (SamplingParams(0.7), SamplingParams(1.3, top_k=5), SamplingParams(0.9, top_p=0.8),
                   SamplingParams(1.0, top_k=7, top_p=0.6), SamplingParams(1.0, top_k=60)):
        state.set(params)
        assert state.mode_of(1) == params.mode
        assert torch.equal(filtered_logits(logits, state.row(0)), filtered_logits(logits, params))
