"""Many requests at once (batching.py): every request's tokens equal its solo run's, whatever it shares
rounds with, in fp32 on the CPU; requests join and leave between rounds."""

from __future__ import annotations

import random
import time

import pytest
import torch

from ddtree.costs import EXPLORED
from ddtree.generation import batch_size, batch_sizes
from ddtree.errors import DDTreeError
from ddtree.options import GenerationOptions

from conftest import Oracle, random_prompts
from test_lossless import oracle_continuation, second_rank_every_fourth

FAMILY, DRAFTER = "llama", dict(layers=1, block_size=8)


@pytest.fixture
def engine(make_engine):
    return make_engine(FAMILY, **DRAFTER)


def mixed_requests(engine, count: int, seed: int) -> tuple[list[list[int]], list[GenerationOptions]]:
    """Prompts of mixed lengths, each with its own method, budget, length, temperature, seed and stop rule."""
    rng = random.Random(seed)
    prompts = random_prompts(count, engine.model.cfg.vocab_size, seed=seed, min_len=2, max_len=60)
    decodings = [("ar", None), ("dflash", None), ("ddtree", 4), ("ddtree", 12), ("ddtree", 30), ("ddtree", "auto")]
    options = []
    for i in range(count):
        method, budget = decodings[i % len(decodings)]
        sampled = i % 3 == 2
        options.append(GenerationOptions.of(
            method=method, budget=budget, max_new_tokens=rng.choice([5, 17, 28]), temperature=1.0 if sampled else 0.0,
            top_k=rng.choice([0, 20]) if sampled else 0, seed=rng.randrange(1000) if sampled else None,
            stop=[engine.tokenizer.decode([prompts[i][0]])] if i % 4 == 1 else []))
    return prompts, options


def solo(engine, prompts, options) -> list[list[int]]:
    return [engine.generate(prompt, option).token_ids for prompt, option in zip(prompts, options)]


@pytest.mark.parametrize("slots", [1, 3, 8])
def test_each_request_of_a_mixed_batch_equals_its_solo_run(engine, slots, monkeypatch, tmp_path):
    """Mixed prompt lengths, methods, budgets (auto's probes per sequence among the others), temperatures,
    seeds, stop strings and lengths; with fewer slots than requests they join as others leave. A drafter that
    often knows the answer (the target's own greedy continuation at rank 0 or 1) makes rounds accept several
    tokens, so paths move rows per sequence. (The oracle reads prefixes at launch: rounds are not run ahead.)"""
    monkeypatch.setenv("DDTREE_CACHE", str(tmp_path))  # (auto's calibration)
    prompts, options = mixed_requests(engine, 12, seed=slots)
    references = [engine.generate(p, method="ar", max_new_tokens=48).token_ids for p in prompts]
    Oracle(oracle_continuation(prompts, references), rank=second_rank_every_fourth).install(monkeypatch)
    expected = solo(engine, prompts, options)
    results = engine.generate_batch(prompts, options, slots=slots)
    for i, (result, want) in enumerate(zip(results, expected)):
        assert result.token_ids == want, f"request {i} ({options[i].decoding}) differs from its solo run"
        assert sum(result.acceptance_lengths) + 1 == len(result.token_ids)
    assert max(max(r.acceptance_lengths, default=1) for r in results) >= 4  # paths of several tokens were taken


@pytest.mark.parametrize("ahead", [False, True])
def test_solo_runs_equal_ar_and_batched_ar(engine, ahead, monkeypatch, tmp_path):
    """The batch's plain path (no oracle, a random drafter): ar, dflash and trees, greedy, against ar, also
    with each round launched before the last one is read (as on a GPU)."""
    monkeypatch.setattr(engine, "run_ahead", ahead)
    monkeypatch.setenv("DDTREE_CACHE", str(tmp_path))  # (auto's calibration)
    prompts = random_prompts(5, engine.model.cfg.vocab_size, seed=3, min_len=3, max_len=40)
    ar = solo(engine, prompts, [GenerationOptions.of(method="ar", max_new_tokens=20)] * 5)
    for method, budget in (("ar", None), ("dflash", None), ("ddtree", 12), ("ddtree", "auto")):
        batch = engine.generate_batch(prompts, method=method, budget=budget, max_new_tokens=20, slots=3)
        assert [r.token_ids for r in batch] == ar, method


def test_auto_in_a_batch_chooses_once_a_round_at_that_batch_sizes_costs(engine, monkeypatch, tmp_path):
    """The auto requests of a batch choose one size a round, from the costs measured for rounds of that many
    sequences: cheap large trees alone, dear ones at batch 4 (made up here); the round's time teaches the
    chooser of its batch size only. Tokens stay ar's."""
    from test_costs import synthetic

    monkeypatch.setenv("DDTREE_CACHE", str(tmp_path))
    flat, steep = {3: 5, 7: 5, 15: 5, 31: 5, 63: 5}, {3: 5, 7: 50, 15: 100, 31: 200, 63: 400}
    engine.use_costs({1: synthetic(flat), 2: synthetic(flat), 4: synthetic(steep)}, fresh=True)
    observed = {count: [] for count in (1, 4)}
    for count in (1, 2, 4):
        engine.autos.at(count).runs = dict.fromkeys(engine.autos.sizes, EXPLORED)  # (nothing beside the choice to time)
    for count in observed:
        monkeypatch.setattr(engine.autos.at(count), "observe", lambda *args, count=count: observed[count].append(args))
    prompts = random_prompts(4, engine.model.cfg.vocab_size, seed=5, min_len=3, max_len=30)
    ar = solo(engine, prompts, [GenerationOptions.of(method="ar", max_new_tokens=24)] * 4)
    batch = engine.generate_batch(prompts, method="ddtree", budget="auto", max_new_tokens=24, slots=4)
    assert [r.token_ids for r in batch] == ar
    together = min(len(r.chosen_budgets) for r in batch)  # rounds all four were in
    assert all(len({r.chosen_budgets[k] for r in batch}) == 1 for k in range(together))
    assert set(batch[0].chosen_budgets[1:together]) == {3}  # after the first probe, at the largest
    assert observed[4] and not observed[1] and {size for size, *_ in observed[4]} <= {3, 63}
    alone = engine.generate(prompts[0], method="ddtree", budget="auto", max_new_tokens=24)
    assert alone.token_ids == ar[0] and alone.chosen_budgets[1] == 63 and observed[1]


def test_auto_is_calibrated_at_every_batch_size_a_runner_can_take(engine, monkeypatch, tmp_path):
    import json

    monkeypatch.setenv("DDTREE_CACHE", str(tmp_path))
    monkeypatch.setattr(engine, "autos", None)
    engine.prepare(GenerationOptions.of(method="ddtree", budget="auto").decoding, context=256, batch=3)
    stored = json.load(open(engine.calibration_key().path))
    assert sorted(map(int, stored["batches"])) == batch_sizes(3) == [1, 2, 3]
    assert engine.autos.covers([1, 2, 3]) and engine.auto_ready(GenerationOptions.of().decoding, 3)
    assert not engine.auto_ready(GenerationOptions.of().decoding, 8)
    engine.runner(8, 256, engine.workspace.max_rows)  # measures the batch sizes still missing, keeps the rest
    stored = json.load(open(engine.calibration_key().path))
    assert sorted(map(int, stored["batches"])) == [1, 2, 3, 4, 8]


def test_a_batch_is_calibrated_as_its_shared_budget_runs(engine, monkeypatch, tmp_path):
    """At batch 2 every size n is timed as auto runs it there (`AutoTree.build_shared`): trees built a size
    larger, cut to the batch's 2n best nodes, verified packed into 2(n + 1) rows; probes at n read the
    pooled yields. Alone, the tree of n nodes, verified unpacked."""
    from ddtree.costs import probe_above
    from ddtree.stages import Stages

    monkeypatch.setenv("DDTREE_CACHE", str(tmp_path))
    calls = []
    for name in ("tree", "share", "pool", "verify"):
        def spy(self, *args, name=name, original=getattr(Stages, name), **kwargs):
            calls.append((name, args, kwargs))
            return original(self, *args, **kwargs)
        monkeypatch.setattr(Stages, name, spy)
    costs = engine.calibration([1, 2], force=True)
    sizes = costs[2].sizes
    trees = {(args[0], args[3].budget) for name, args, _ in calls if name == "tree" and args[2] == "tree"}
    shares = {args for name, args, _ in calls if name == "share"}
    verifies = {(args[0].count, args[0].rows, args[3]) for name, args, _ in calls if name == "verify"}
    assert shares == {(2, 2 * n) for n in sizes}
    assert {(2, probe_above(sizes, n)) for n in sizes} | {(2, n) for n in sizes} <= trees
    assert {(2, probe_above(sizes, n) + 1, 2 * (n + 1)) for n in sizes} <= verifies
    assert {(1, n + 1, None) for n in sizes} <= verifies and any(name == "pool" for name, *_ in calls)
    assert all(x > 0 for table in (costs[2].per_size, costs[2].tree, costs[2].probe) for v in table.values() for x in v)


def test_seeded_sampling_does_not_depend_on_the_batch(engine):
    """The same sampled request, alone and beside different company, draws the same tokens."""
    prompt = [5, 9, 23, 4, 17]
    mine = GenerationOptions.of(method="ddtree", budget=12, max_new_tokens=24, temperature=1.0, seed=7)
    others = random_prompts(4, engine.model.cfg.vocab_size, seed=11, min_len=5, max_len=30)
    alone = engine.generate(prompt, mine).token_ids
    for company in (others[:1], others):
        company_options = [GenerationOptions.of(method="dflash", max_new_tokens=9, temperature=0.7, seed=1)] * len(company)
        results = engine.generate_batch([*company, prompt], [*company_options, mine])
        assert results[-1].token_ids == alone


def test_a_request_at_the_context_limit_finishes_by_length(make_engine):
    engine = make_engine(FAMILY, **DRAFTER)
    limit = engine.context_limit
    long_prompt = [i % engine.model.cfg.vocab_size for i in range(1, limit - 5)]
    results = engine.generate_batch([long_prompt, [3, 4, 5]], method="ddtree", budget=12, max_new_tokens=50)
    assert results[0].finish_reason == "length" and len(long_prompt) + len(results[0].token_ids) <= limit
    assert results[0].token_ids == engine.generate(long_prompt, method="ar", max_new_tokens=50).token_ids
    assert results[1].token_ids == engine.generate([3, 4, 5], method="ddtree", budget=12, max_new_tokens=50).token_ids


def test_requests_ending_at_their_first_token_join_and_leave_among_longer_ones(engine, monkeypatch):
    """A joining request's first token is read after the next round is launched (with it, as on a GPU, where
    rounds run ahead): one that ends there (one token asked, its first token a stop string, a prompt one
    token short of the context) gives just that token, and the others are untouched by the round that ran
    past its end."""
    monkeypatch.setattr(engine, "run_ahead", True)
    limit = engine.context_limit
    prompts = random_prompts(6, engine.model.cfg.vocab_size, seed=5, min_len=3, max_len=30)
    prompts[4] = [i % engine.model.cfg.vocab_size for i in range(1, limit)]
    first = engine.generate(prompts[3], method="ar", max_new_tokens=1).token_ids
    options = [GenerationOptions.of(method=method, budget=budget, max_new_tokens=n, stop=stop) for method, budget, n, stop in (
        ("ddtree", 12, 30, []), ("ar", None, 1, []), ("dflash", None, 25, []),
        ("ddtree", 12, 20, [engine.tokenizer.decode(first)]), ("ddtree", 12, 9, []), ("ar", None, 1, []))]
    expected = solo(engine, prompts, options)
    results = engine.generate_batch(prompts, options, slots=2)
    assert [r.token_ids for r in results] == expected
    assert [len(results[i].token_ids) for i in (1, 4, 5)] == [1, 1, 1]
    assert [results[i].finish_reason for i in (1, 3, 4, 5)] == ["length", "stop", "length", "length"]


def test_batch_sizes_are_powers_of_two_up_to_the_slots():
    assert [batch_size(used, 8) for used in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert batch_size(5, 6) == 6


def test_bad_batches_are_refused(engine):
    with pytest.raises(DDTreeError, match="2 options for 3 prompts"):
        engine.generate_batch([[1], [2], [3]], [GenerationOptions.of()] * 2)
    with pytest.raises(DDTreeError, match="context holds"):
        engine.generate_batch([[1] * (engine.context_limit + 1)])
    assert engine.generate_batch([]) == []


def test_cache_rows_of_a_batch_go_to_each_sequences_own_slots():
    """Per-sequence slots [B, T] store and move each sequence's rows; shared slots [T] do as before."""
    from ddtree.model import KVCache

    cache = KVCache.empty(2, 3, 2, 10, 4, "cpu", torch.float32)
    kv = torch.randn(2, 3, 2, 2, 4)  # [2, B, kv_heads, T, D]
    cache.layer(1).store(torch.tensor([[0, 1], [5, 6], [8, 9]]), kv)
    for b, slots in enumerate(([0, 1], [5, 6], [8, 9])):
        assert torch.equal(cache.kv[1, :, b][:, :, slots], kv[:, b])
    before = cache.kv.clone()
    cache.move_rows(torch.tensor([[1, 1], [6, 5], [9, 8]]), torch.tensor([[3, 4], [0, 1], [2, 3]]))
    for b, (sources, destinations) in enumerate((([1, 1], [3, 4]), ([6, 5], [0, 1]), ([9, 8], [2, 3]))):
        assert torch.equal(cache.kv[:, :, b][..., destinations, :], before[:, :, b][..., sources, :])


def test_the_server_decodes_concurrent_clients_together_and_each_reply_is_its_solo_run(engine):
    """Eight streaming clients at once against a server of four slots: requests join and leave between
    rounds, /metrics shows batches of more than one, and every temperature-0 reply equals its solo run."""
    import threading

    from test_server import PROMPTS, RunningServer, chat_reference, metric, run_threads

    running = RunningServer(engine, max_batch=4, context=512)
    client, replies, sizes = running.client(), {}, []
    requests = [(PROMPTS[i % len(PROMPTS)], 8 + 5 * i, ("ar", "dflash", "ddtree")[i % 3]) for i in range(8)]

    def ask(index: int) -> None:
        prompt, max_tokens, method = requests[index]
        stream = client.chat.completions.create(model=running.settings.model_name, max_tokens=max_tokens, temperature=0,
                                                stream=True, messages=[{"role": "user", "content": prompt}],
                                                extra_body={"method": method, "budget": 8})
        replies[index] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    def watch() -> None:
        while len(replies) < len(requests):
            sizes.append(metric(running, "ddtree_batch_size"))
            time.sleep(0.02)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(requests))] + [threading.Thread(target=watch)]
    run_threads(threads, running)
    assert max(sizes) > 1
    for index, (prompt, max_tokens, method) in enumerate(requests):
        assert replies[index] == chat_reference(engine, prompt, max_tokens, method=method, budget=8).text, index


def test_a_request_too_large_for_the_batch_waits_until_it_is_empty_then_the_batch_grows(engine, monkeypatch):
    """The server's batch is made for the trees of the first requests: one asking for a larger tree waits
    for the running ones to finish, then runs in a larger batch; every reply is its solo run."""
    import threading

    from ddtree.generation import BatchRunner
    from test_server import PROMPTS, RunningServer, chat_reference, run_threads

    made = []
    real_init = BatchRunner.__init__

    def recording(runner, engine, slots, context, rows):
        made.append(rows)
        real_init(runner, engine, slots, context, rows)

    monkeypatch.setattr(BatchRunner, "__init__", recording)
    engine.workspace = engine.stages = None  # (made again at the first request's size)
    running = RunningServer(engine, max_batch=2, context=64)
    client, replies = running.client(), {}
    asks = [(PROMPTS[0], 8), (PROMPTS[1], 8), (PROMPTS[2], 30)]  # (prompt, budget): the last needs more rows

    def ask(index: int) -> None:
        prompt, budget = asks[index]
        reply = client.chat.completions.create(model=running.settings.model_name, max_tokens=20, temperature=0,
                                               messages=[{"role": "user", "content": prompt}],
                                               extra_body={"method": "ddtree", "budget": budget})
        replies[index] = reply.choices[0].message.content

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    time.sleep(0.2)  # (the first request makes the batch)
    run_threads([first] + [threading.Thread(target=ask, args=(i,)) for i in range(1, len(asks))], running)
    assert made[0] == 9 and made[-1] == 31  # the batch grew for the larger tree
    for index, (prompt, budget) in enumerate(asks):
        assert replies[index] == chat_reference(engine, prompt, 20, method="ddtree", budget=budget).text


def test_a_waiting_request_can_be_cancelled_before_it_joins(engine):
    runner = engine.runner(1, 256, 16)
    first = runner.add([3, 4, 5], GenerationOptions.of(method="ar", max_new_tokens=6))
    second = runner.add([6, 7, 8], GenerationOptions.of(method="ar", max_new_tokens=6))
    events = runner.step()
    request, _ = next(events)  # the first joins
    assert request is first
    runner.cancel(second)
    assert [r for r, _ in [*events, *runner.run()]] and not second.chunks and second.left
    assert first.result({}).token_ids == engine.generate([3, 4, 5], method="ar", max_new_tokens=6).token_ids


def test_a_shared_budget_keeps_the_best_nodes_of_the_whole_batch(engine):
    """`Stages.share`: the batch's best nodes by score, wherever they are (ties: first sequences first); a
    free slot takes none and keeps its root."""
    engine.generate_batch([[1, 2, 3]] * 3, method="ddtree", budget=4, max_new_tokens=2)  # (a workspace of 3)
    ws, stages = engine.workspace, engine.stages
    trees = ws.tree(3, ws.max_rows)

    @torch.inference_mode()
    def share(scores: list[list[float]], live: list[bool], nodes: int) -> list[int]:
        trees.scores.fill_(0.0)
        trees.scores[:, :4] = torch.tensor(scores)
        trees.used.fill_(5)  # four nodes built in every tree
        ws.live[:3] = torch.tensor(live)
        stages.share(3, nodes).run()
        return trees.used.tolist()

    confident, unsure = [-0.1, -0.2, -0.3, -5.0], [-0.15, -3.0, -4.0, -6.0]
    assert share([confident, unsure, [0.0] * 4], [True, True, False], 4) == [4, 2, 1]
    assert share([confident, unsure, [0.0] * 4], [True, True, True], 4) == [1, 1, 5]  # live, its zeros are the best four
    assert share([[-1.0] * 4, [-1.0, -1.0, -2.0, -2.0], [-1.0] * 4], [True, True, False], 3) == [4, 1, 1]
    assert share([confident, unsure, [0.0] * 4], [True, True, False], 8) == [5, 5, 1]  # more than there are: all


def test_pooled_yields_count_the_best_nodes_of_every_tree():
    from ddtree.costs import AcceptanceModel

    model = AcceptanceModel([1, 2, 3], torch.device("cpu"))
    scores = torch.log(torch.tensor([[0.9, 0.5, 0.1], [0.8, 0.05, 0.01]]))
    chance = (model.hits / model.seen)[torch.bucketize(scores, model.edges)]
    best = chance.flatten().sort(descending=True).values.cumsum(0).tolist()
    both = torch.ones(2, 3, dtype=torch.bool)
    assert model.pooled_yields(scores, both, 2).tolist() == pytest.approx([2 + best[1], 2 + best[3], 2 + best[5]])
    first = torch.tensor([[True] * 3, [False] * 3])  # the second sequence does not take part
    alone = chance[0].sort(descending=True).values.cumsum(0).tolist()
    assert model.pooled_yields(scores, first, 2).tolist() == pytest.approx([1 + alone[1], 1 + alone[2], 1 + alone[2]])


def test_auto_requests_sharing_one_budget_equal_their_solo_runs(engine, monkeypatch, tmp_path):
    """Greedy and seeded sampled auto requests (top-k too) in one batch, whose trees share one budget and
    whose verify runs packed: each request's tokens are its solo run's, with an accepting drafter."""
    monkeypatch.setenv("DDTREE_CACHE", str(tmp_path))
    prompts = random_prompts(4, engine.model.cfg.vocab_size, seed=9, min_len=3, max_len=40)
    references = [engine.generate(p, method="ar", max_new_tokens=40).token_ids for p in prompts]
    Oracle(oracle_continuation(prompts, references), rank=second_rank_every_fourth).install(monkeypatch)
    options = [GenerationOptions.of(method="ddtree", budget="auto", max_new_tokens=30, temperature=t, top_k=k, seed=5)
               for t, k in ((0.0, 0), (1.0, 0), (0.7, 20), (0.0, 0))]
    expected = solo(engine, prompts, options)
    results = engine.generate_batch(prompts, options, slots=4)
    assert [r.token_ids for r in results] == expected
    assert max(max(r.acceptance_lengths) for r in results) >= 4
