"""`--budget auto`: the choice rule on synthetic costs, probe spacing, learned acceptance, calibration files that
are missing, stale or corrupt, and auto's output (still exactly ar's)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ddtree.calibration import CALIBRATION_VERSION, disturbed, time_stage, warm_up
from ddtree.cli import main
from ddtree import costs as costs_module
from ddtree.costs import EXPLORED, AcceptanceModel, AutoBudget, RoundCosts, interpolate

TARGET = "llama"


def chooser(costs: RoundCosts) -> AutoBudget:
    return AutoBudget(costs, AcceptanceModel(costs.sizes, torch.device("cpu")))


@pytest.fixture
def unsmoothed(monkeypatch):
    """Each probe alone decides (tests of what the choice weighs, not of its averaging over probes)."""
    monkeypatch.setattr(costs_module, "YIELD_SMOOTHING", 1.0)


def synthetic(round_ms: dict[int, float], fixed_ms: float = 10.0, probe_ms: float = 1.0, tree_ms: float = 0.5) -> RoundCosts:
    """Flat in context; a probe at any size costs `probe_ms` against a plain tree's `tree_ms`."""
    sizes = sorted(round_ms)
    return RoundCosts(sizes, [100, 1000], [fixed_ms / 1000] * 2, {s: [round_ms[s] / 1000] * 2 for s in sizes},
                      {s: [tree_ms / 1000] * 2 for s in sizes}, {s: [probe_ms / 1000] * 2 for s in sizes})


CURVES = [
    {3: 5, 7: 6, 15: 8, 31: 14, 63: 30},  # convex
    {3: 5, 7: 5, 15: 5, 31: 12, 63: 12},  # step-wise (graph buckets)
    {3: 9, 7: 5, 15: 6, 31: 7, 63: 40},  # not monotone (a matrix kernel that dislikes 4 rows)
]


@pytest.mark.parametrize("curve", CURVES)
def test_choice_is_the_true_maximum_of_yield_per_second(curve):
    for yields in ([1.5, 1.9, 2.2, 2.4, 2.5], [2.9, 3.6, 4.4, 5.0, 5.3], [1.01, 1.02, 1.03, 1.04, 1.05]):
        auto = chooser(synthetic(curve))  # (a first probe: nothing to average with)
        sizes = auto.costs.sizes
        best = max(sizes, key=lambda s: yields[sizes.index(s)] / (0.010 + curve[s] / 1000))
        assert auto.choose(yields, 500, probed=63) == best
        # a probe at a smaller size saw only the sizes up to its own
        seen = [s for s in sizes if s <= 15]
        assert auto.choose(yields, 500, probed=15) == max(seen, key=lambda s: yields[sizes.index(s)] / (0.010 + curve[s] / 1000))


def test_probes_start_at_the_largest_then_look_one_size_above_the_choice(unsmoothed):
    auto = chooser(synthetic({3: 5, 7: 6, 15: 8, 31: 14}, fixed_ms=5, probe_ms=0.55, tree_ms=0.5))
    assert auto.probe_size() == 31
    assert auto.choose([2.0, 2.5, 2.6, 2.7], 500, probed=31) == 7  # 2.5 tokens / 11 ms
    probes = [auto.probe_size() for _ in range(12)]
    # a probe's extra is 0.05 ms, half a percent of an 11 ms round is 0.055 ms: a probe every round, at 15 nodes
    assert probes[0] == 15
    assert auto.choose([2.0, 2.5, 3.3, 2.7], 500, probed=15) == 15
    assert auto.probe_size() == 31
    auto.choose([2.0, 2.5, 3.3, 9.0], 500, probed=31)
    assert auto.current == 31 and auto.probe_size() == 31  # at the top, probes stay at the largest


def test_the_round_after_a_probe_does_not_probe_again_before_the_probe_is_read():
    """A probe's values reach the host with its round's outcome, after the next round was launched: that
    round does not probe; a probe never read (its round abandoned) holds back one round only."""
    auto = chooser(synthetic({3: 5, 7: 6, 15: 8, 31: 14}, fixed_ms=5, probe_ms=0.55, tree_ms=0.5))
    assert auto.probe_size() == 31 and auto.choose([2.0, 2.5, 2.6, 2.7], 500, probed=31) == 7  # a probe every round
    assert auto.probe_size() == 15
    assert auto.probe_size() is None  # launched before the probe's round was read
    assert auto.choose([2.0, 2.5, 2.6, 2.7], 500, probed=15) == 7
    assert auto.probe_size() == 15  # read: probing resumes
    assert auto.probe_size() is None  # never read ...
    assert auto.probe_size() == 15  # ... and not waited for


@pytest.mark.parametrize("probe_ms, every", [(0.54, 1), (0.58, 2), (0.77, 6), (1.43, 19), (100.0, 32)])
def test_probes_come_as_often_as_half_a_percent_of_the_time_allows(probe_ms, every):
    auto = chooser(synthetic({3: 5, 7: 6}, fixed_ms=5, probe_ms=probe_ms, tree_ms=0.5))
    probes = []
    for _ in range(3 * every + 1):
        probes.append(auto.probe_size())
        if probes[-1] is not None:
            auto.choose([2.0, 2.1], 500, probed=probes[-1])  # 3 nodes (10 ms a round) stay the choice
    assert [i for i, p in enumerate(probes) if p is not None] == list(range(0, 3 * every + 1, every))
    assert probes[0] == 7 and set(probes) <= {7, None}


def test_expected_yields_learn_what_is_really_accepted(unsmoothed):
    """Nodes the drafter gives 0.9 are accepted half the time here: the calibrated yield follows, and
    a size chosen on the drafter's word alone stops paying."""
    auto = chooser(synthetic({3: 5, 7: 18}))
    scores = torch.full((7,), math.log(0.9))
    before = auto.acceptance.expected_yields(scores)
    assert before.tolist() == pytest.approx([1 + 3 * 0.9, 1 + 7 * 0.9], rel=0.05)
    assert auto.choose(before.tolist(), 500, probed=7) == 7
    for round in range(400):
        auto.acceptance.learn(scores, torch.arange(7) < (7 if round % 2 else 0))  # all or nothing, half the rounds
    after = auto.acceptance.expected_yields(scores)
    assert after.tolist() == pytest.approx([1 + 3 * 0.5, 1 + 7 * 0.5], rel=0.05)
    assert auto.choose(after.tolist(), 500, probed=7) == 3  # 2.5 tokens / 15 ms beats 4.5 / 28 ms
    lower = auto.acceptance.expected_yields(torch.full((7,), math.log(0.1)))  # another bin keeps its prior
    assert lower.tolist() == pytest.approx([1 + 3 * 0.1, 1 + 7 * 0.1], rel=0.15)


def test_one_probe_moves_the_choice_only_part_of_the_way():
    """Each size's expected tokens (over the smallest size's) are averaged over probes: one probe favouring a
    larger tree moves the choice a step, a few in a row move it all the way; a batch's probe, summed over
    eight sequences, chooses as one sequence's would."""
    one, eight = chooser(synthetic({7: 5, 15: 6, 31: 8})), chooser(synthetic({7: 5, 15: 6, 31: 8}))  # 15, 16, 18 ms
    choices = []
    for yields in ([2.0, 2.1, 2.2], *[[2.0, 2.6, 3.2]] * 4):  # 31 nodes pay from the second probe on
        choices.append(one.choose(yields, 500, probed=31))
        assert eight.choose([8 * y for y in yields], 500, probed=31) == choices[-1]
    assert choices == [7, 15, 31, 31, 31]
    assert one.choose([0.0, 0.0, 0.0], 500, probed=31) == 31  # a batch's probe that no sequence took part in
    assert chooser(synthetic({7: 5, 15: 6, 31: 8})).choose([0.0, 0.0, 0.0], 500, probed=31) == 7


def test_measured_round_times_correct_the_calibration():
    costs = synthetic({7: 5, 15: 6, 31: 8})  # with the drafter's 10 ms: 15, 16 and 18 ms a round
    auto = chooser(costs)
    yields = [2.0, 2.5, 2.9]  # tokens per ms: 0.133, 0.156, 0.161
    assert auto.choose(yields, 500, probed=31) == 31
    for _ in range(30):  # 31-node rounds really take twice their calibrated time
        auto.observe(31, 500, 2 * costs.predict(31, 500), probed=None)
    assert auto.correction[31] == pytest.approx(2.0, rel=0.05)
    assert auto.choose(yields, 500, probed=31) == 15
    auto.observe(15, 500, 100 * costs.predict(15, 500), probed=None)  # a capture or a pause: ignored
    assert auto.correction[15] == 1.0
    # a probe round is compared with its prediction plus the probe's extra (0.5 ms here), not counted as slow
    auto.observe(15, 500, costs.predict(15, 500) + 0.0005, probed=31)
    assert auto.correction[15] == pytest.approx(1.0)


def test_a_size_calibrated_too_dear_is_tried_measured_and_then_chosen():
    """15 nodes calibrated at three times their real cost (the calibration ran beside another process): auto
    verifies each neighbour of its choice for a few rounds, learns what they really cost, and moves to 15."""
    calibrated = synthetic({7: 5, 15: 18, 31: 8, 63: 14})  # with the drafter's 10 ms: 15, 28, 18, 24 ms
    real = {7: 15.0, 15: 16.0, 31: 18.0, 63: 24.0}
    yields = [2.0, 2.7, 2.9, 3.0]  # tokens per real ms: 0.133, 0.169, 0.161, 0.125
    auto, verified = chooser(calibrated), []
    for _ in range(200):
        probed, size = auto.probe_size(), auto.round_size()
        if probed is not None:
            auto.choose(yields, 500, probed)
            size = size or auto.current
        verified.append(size)
        auto.observe(size, 500, real[size] / 1000 + (calibrated.probe_extra(probed, size, 500) if probed else 0),
                     probed)
    assert auto.current == 15 and auto.correction[15] == pytest.approx(16 / 28, rel=0.01)
    assert set(verified[-100:]) == {15}  # explored, then settled
    assert verified.count(63) <= EXPLORED and verified.count(7) <= EXPLORED


def test_the_first_rounds_of_a_size_set_its_correction_by_their_mean():
    auto = chooser(synthetic({7: 5, 15: 6}))
    predicted = auto.costs.predict(7, 500)
    for ratio in (0.5, 0.7):
        auto.observe(7, 500, ratio * predicted, probed=None)
    assert auto.correction[7] == pytest.approx(0.6) and auto.runs == {7: 2, 15: 0}


def test_a_stage_is_timed_by_its_least_repeat_after_two_untimed_calls(monkeypatch):
    """Interference only adds: three slow calls of five (a busy host, a GPU clocking up) do not make a size
    look dear, which auto would then never run to correct."""
    import ddtree.calibration as calibration

    ticks = iter([0, 9, 9, 18, 18, 20, 20, 29, 29, 38, 38, 40, 40, 49])  # untimed 9 and 9; then 2, 9, 9, 2, 9
    monkeypatch.setattr(calibration.time, "perf_counter", lambda: next(ticks))
    assert time_stage(lambda: None, torch.device("cpu"), repeats=5) == 2
    calls = []
    warm_up(lambda: calls.append(1), torch.device("cpu"))
    assert not calls  # (on the CPU nothing clocks down between stages)


def test_interpolation_in_context():
    assert interpolate([100, 1000], [1.0, 2.0], 550) == pytest.approx(1.5)
    assert interpolate([100, 1000], [1.0, 2.0], 1900) == pytest.approx(3.0)  # extended past the end
    assert interpolate([100, 1000], [1.0, 2.0], 0) == pytest.approx(0.888, abs=1e-3)
    assert interpolate([100], [1.5], 10_000) == 1.5


@pytest.fixture
def engine(make_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DDTREE_CACHE", str(tmp_path))
    built = make_engine(TARGET, layers=1, block_size=8)
    built.autos = None  # each test calibrates or loads for itself
    yield built
    built.autos = None


BROKEN = {
    "not json": "{oops",
    "empty": "",
    "another version": None,  # filled in below from a good file
    "missing costs": json.dumps({"version": CALIBRATION_VERSION}),
    "negative time": None,
    "wrong shape": None,
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_calibration_files_are_rebuilt(kind, engine, capsys):
    path = engine.calibration_key().path
    good = engine.calibration([1], force=False)[1]
    stored = json.loads(open(path).read())
    text = BROKEN[kind]
    if kind == "another version":
        text = json.dumps(stored | {"version": -1})
    elif kind == "negative time":
        stored["batches"]["1"]["fixed"][0] = -1.0
        text = json.dumps(stored)
    elif kind == "wrong shape":
        stored["batches"]["1"]["per_size"].popitem()
        text = json.dumps(stored)
    with open(path, "w") as f:
        f.write(text)
    capsys.readouterr()
    rebuilt = engine.calibration([1], force=False)[1]
    assert "recalibrating" in capsys.readouterr()[1]
    assert rebuilt.sizes == good.sizes and all(x > 0 for x in rebuilt.fixed)
    assert engine.calibration([1], force=False)[1].to_json() == rebuilt.to_json()  # now read back as it is


def test_a_size_timed_dearer_than_a_larger_one_is_disturbed():
    """The smoke's lanes sharing the GPU left such costs in the cache (H100, ba28699: 5.5 ms a round of 7 nodes,
    3.7 ms of 63): auto never ran the small sizes, and lost 5% on Alpaca."""
    assert disturbed({7: 5.5, 15: 6.96, 31: 8.3, 63: 3.75, 127: 3.82, 255: 6.87}, 1.15) == [7, 15, 31]
    assert disturbed({7: 1.8, 15: 1.9, 31: 1.85, 63: 2.0, 127: 2.1, 255: 2.5}, 1.15) == []  # within 15%


def round_seconds(size: int) -> float:
    return 0.001 * (1 + size / 64)


@pytest.mark.parametrize("persistent", [False, True])
def test_disturbed_sizes_are_timed_again(persistent, engine, monkeypatch, capsys):
    """A size read dearer than larger ones is timed again and the least of its timings kept; if it stays dear,
    the user is told the device looks busy."""
    import ddtree.calibration as calibration

    calls = []

    def time_size(stages, sizes, size, context, taps, count, repeats):
        calls.append(size)
        slow = size == min(sizes) and (persistent or calls.count(size) == 1)
        seconds = 0.05 if slow else round_seconds(size)
        return seconds / 4, seconds / 2, seconds

    monkeypatch.setattr(calibration, "time_size", time_size)
    costs = engine.calibration([1], force=True)[1]
    smallest, contexts = min(costs.sizes), len(costs.contexts)
    assert calls.count(smallest) == contexts * (1 + (calibration.RETIMES if persistent else 1))
    assert all(calls.count(size) == contexts for size in costs.sizes if size != smallest)
    warned = "the device looks busy" in capsys.readouterr()[1]
    assert warned == persistent
    assert costs.per_size[smallest] == [0.05 if persistent else round_seconds(smallest)] * contexts


def test_a_calibration_for_another_pair_is_not_used(engine, capsys):
    path = engine.calibration_key().path
    engine.calibration([1], force=False)
    stored = json.loads(open(path).read())
    with open(path, "w") as f:
        json.dump(stored | {"pair": "someone-else"}, f)
    engine.calibration([1], force=False)
    assert "another version, device or pair" in capsys.readouterr()[1]


def test_auto_output_equals_ar_and_reports_its_choices(engine):
    from conftest import random_prompts

    for prompt in random_prompts(4, engine.model.cfg.vocab_size, seed=11, min_len=3, max_len=30):
        expected = engine.generate(prompt, method="ar", max_new_tokens=40).token_ids
        result = engine.generate(prompt, method="ddtree", budget="auto", max_new_tokens=40)
        assert result.token_ids == expected
        assert result.budget == "auto" and len(result.chosen_budgets) == result.rounds
        assert set(result.chosen_budgets) <= set(engine.autos.sizes)


@pytest.mark.parametrize("ahead", [False, True])
def test_a_probe_round_verifies_the_current_choice_and_its_values_choose_for_the_rounds_after(engine, monkeypatch, ahead):
    """Only the first round waits for its probe's choice; every later probe round verifies the size chosen
    before it, and its values, read with its outcome, choose once (launched ahead: after the next round's
    launch, which does not probe)."""
    from conftest import random_prompts

    monkeypatch.setattr(engine, "run_ahead", ahead)
    engine.use_costs({1: synthetic({3: 5, 7: 5, 15: 6, 31: 6, 63: 7}, probe_ms=0.55)}, fresh=True)
    auto, log = engine.autos.at(1), []
    auto.runs = dict.fromkeys(auto.runs, EXPLORED)  # (no size beside the choice left to time)
    probe_size, choose = auto.probe_size, auto.choose

    def logged_probe_size():
        log.append(["probe", auto.current, probe_size()])
        return log[-1][2]
    monkeypatch.setattr(auto, "probe_size", logged_probe_size)
    monkeypatch.setattr(auto, "choose", lambda *args: log.append(["choose", choose(*args)]) or log[-1][1])
    prompt = random_prompts(1, engine.model.cfg.vocab_size, seed=4, min_len=5, max_len=20)[0]
    result = engine.generate(prompt, method="ddtree", budget="auto", max_new_tokens=60)
    assert result.token_ids == engine.generate(prompt, method="ar", max_new_tokens=60).token_ids
    rounds = [k for k, entry in enumerate(log) if entry[0] == "probe"]  # (log positions, a round each)
    assert log[0] == ["probe", None, 63] and log[1][0] == "choose"  # the first round's choice, at once
    assert result.chosen_budgets[0] == log[1][1]
    probes = [(r, k) for r, k in enumerate(rounds) if log[k][2] is not None][1:]
    assert len(probes) >= 3 and sum(entry[0] == "choose" for entry in log) == len(probes) + 1
    for r, k in probes:
        assert result.chosen_budgets[r] == log[k][1]  # it verified the choice it probed above
    followers = [log[k + 1] for _, k in probes if k + 1 < len(log)]
    launched_before_read = [entry for entry in followers if entry[0] == "probe"]
    assert all(entry[2] is None for entry in launched_before_read)
    assert bool(launched_before_read) == ahead


@pytest.mark.parametrize("timed", [False, True])
def test_auto_verifies_the_sizes_beside_its_choice_and_stays_lossless(engine, timed):
    """15 nodes calibrated far cheaper than the rest: auto's first choice. It then verifies 7 nodes in some
    rounds to time them (and moves there: they cost as little here); with every size timed already
    (`timed`), each round verifies 15. The output is `ar`'s either way."""
    from conftest import random_prompts

    engine.use_costs({1: synthetic({3: 90, 7: 90, 15: 1, 31: 90, 63: 90}, probe_ms=0.55)}, fresh=True)
    if timed:
        engine.autos.at(1).runs = dict.fromkeys(engine.autos.sizes, EXPLORED)
    prompt = random_prompts(1, engine.model.cfg.vocab_size, seed=5, min_len=5, max_len=20)[0]
    result = engine.generate(prompt, method="ddtree", budget="auto", max_new_tokens=60)
    assert result.token_ids == engine.generate(prompt, method="ar", max_new_tokens=60).token_ids
    assert result.chosen_budgets[0] == 15
    assert (set(result.chosen_budgets) == {15}) == timed and (7 in result.chosen_budgets) != timed


def test_generate_json_and_profile_calibrate(engine, capsys, model_dirs, tmp_path):
    drafter_dir = str(tmp_path / "drafter")
    assert main(["init-drafter", "--target", model_dirs[TARGET], "--block-size", "8", "--out", drafter_dir]) == 0
    capsys.readouterr()
    assert main(["generate", "--target", model_dirs[TARGET], "--drafter", drafter_dir, "--prompt", "hi",
                 "--budget", "auto", "--max-new-tokens", "12", "--json"]) == 0
    data = json.loads(capsys.readouterr()[0])
    assert data["budget"] == "auto" and data["chosen_budgets"] and len(data["chosen_budgets"]) == data["rounds"]
    assert main(["profile", "--calibrate", "--target", model_dirs[TARGET], "--drafter", drafter_dir,
                 "--methods", "ddtree", "--budgets", "auto", "--max-new-tokens", "6", "--repeats", "1"]) == 0
    out = capsys.readouterr()[0]
    assert "| nodes |" in out and "| ddtree | auto |" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--target", model_dirs[TARGET], "--drafter", drafter_dir, "--prompt", "hi",
              "--budget", "lots"])
    assert exit_info.value.code == 2 and "'auto' or a whole number" in capsys.readouterr()[1]
