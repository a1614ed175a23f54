"""`--budget auto`: the choice rule on synthetic costs, the online corrections, calibration files that
are missing, stale or corrupt, and auto's output (still exactly ar's)."""

from __future__ import annotations

import json

import pytest

import ddtree.costs as costs
from ddtree.cli import main
from ddtree.costs import AutoBudget, RoundCosts, interpolate

TARGET = "llama"


def synthetic(verify_ms: dict[int, float], fixed_ms: float = 10.0) -> RoundCosts:
    sizes = sorted(verify_ms)
    return RoundCosts(sizes, [100, 1000], [fixed_ms / 1000] * 2, {s: [verify_ms[s] / 1000] * 2 for s in sizes})


CURVES = [
    {3: 5, 7: 6, 15: 8, 31: 14, 63: 30},  # convex
    {3: 5, 7: 5, 15: 5, 31: 12, 63: 12},  # step-wise (graph buckets)
    {3: 9, 7: 5, 15: 6, 31: 7, 63: 40},  # not monotone (a matrix kernel that dislikes 4 rows)
]


@pytest.mark.parametrize("curve", CURVES)
def test_choice_is_the_true_maximum_of_yield_per_second(curve):
    auto = AutoBudget(synthetic(curve))
    sizes = auto.costs.sizes
    for yields in ([1.5, 1.9, 2.2, 2.4, 2.5], [2.9, 3.6, 4.4, 5.0, 5.3], [1.01, 1.02, 1.03, 1.04, 1.05]):
        auto.rounds = 0  # away from an exploration round
        best = max(sizes, key=lambda s: yields[sizes.index(s)] / (0.010 + curve[s] / 1000))
        assert auto.choose(yields, 500) == best


def test_exploration_tries_a_neighbour_now_and_then():
    auto = AutoBudget(synthetic(CURVES[0]))
    picks = [auto.choose([1.5, 1.9, 2.2, 2.4, 2.5], 500) for _ in range(4 * AutoBudget.EXPLORE)]
    usual = max(set(picks), key=picks.count)
    others = [p for p in picks if p != usual]
    assert 1 <= len(others) <= 4 and all(abs(auto.costs.sizes.index(p) - auto.costs.sizes.index(usual)) == 1
                                         for p in others)


def test_online_corrections_follow_measured_rounds():
    auto = AutoBudget(synthetic({3: 5, 7: 6, 15: 8}))
    yields = [1.8, 2.1, 2.6]
    auto.rounds = 1
    assert auto.choose(yields, 500) == 15
    for _ in range(200):  # size 15 really costs 4x what was calibrated, and accepts less than Φ says
        auto.observe(15, 500, 4 * auto.costs.predict(15, 500), accepted=2, expected=2.6)
    assert auto.correction[15] == pytest.approx(4, rel=0.05)
    assert auto.confidence == pytest.approx(1 / 1.6, rel=0.05)
    auto.rounds = 1
    assert auto.choose(yields, 500) != 15
    auto.observe(7, 500, 1e9, accepted=1, expected=2.1)  # one stalled round moves a size by a bounded step
    assert auto.correction[7] < 1.5


def test_interpolation_in_context():
    assert interpolate([100, 1000], [1.0, 2.0], 550) == pytest.approx(1.5)
    assert interpolate([100, 1000], [1.0, 2.0], 1900) == pytest.approx(3.0)  # extended past the end
    assert interpolate([100, 1000], [1.0, 2.0], 0) == pytest.approx(0.888, abs=1e-3)
    assert interpolate([100], [1.5], 10_000) == 1.5


@pytest.fixture
def engine(make_engine, tmp_path, monkeypatch):
    path = tmp_path / "calibration" / "tiny.json"
    monkeypatch.setattr(costs, "calibration_path", lambda engine: str(path))
    built = make_engine(TARGET, layers=1, block_size=8)
    built.auto = None  # each test calibrates or loads for itself
    yield built
    built.auto = None


BROKEN = {
    "not json": "{oops",
    "empty": "",
    "another version": None,  # filled in below from a good file
    "missing costs": json.dumps({"version": costs.CALIBRATION_VERSION}),
    "negative time": None,
    "wrong shape": None,
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_calibration_files_are_rebuilt(kind, engine, capsys):
    path = costs.calibration_path(engine)
    good = costs.load_or_calibrate(engine)
    stored = json.loads(open(path).read())
    text = BROKEN[kind]
    if kind == "another version":
        text = json.dumps(stored | {"version": -1})
    elif kind == "negative time":
        stored["costs"]["fixed"][0] = -1.0
        text = json.dumps(stored)
    elif kind == "wrong shape":
        stored["costs"]["verify"].popitem()
        text = json.dumps(stored)
    with open(path, "w") as f:
        f.write(text)
    capsys.readouterr()
    rebuilt = costs.load_or_calibrate(engine)
    assert "recalibrating" in capsys.readouterr()[1]
    assert rebuilt.sizes == good.sizes and all(x > 0 for x in rebuilt.fixed)
    assert costs.load_or_calibrate(engine).to_json() == rebuilt.to_json()  # now read back as it is


def test_a_calibration_for_another_pair_is_not_used(engine, capsys):
    path = costs.calibration_path(engine)
    costs.load_or_calibrate(engine)
    stored = json.loads(open(path).read())
    with open(path, "w") as f:
        json.dump(stored | {"pair": "someone-else"}, f)
    costs.load_or_calibrate(engine)
    assert "another version, device or pair" in capsys.readouterr()[1]


def test_auto_output_equals_ar_and_reports_its_choices(engine):
    from conftest import random_prompts

    for prompt in random_prompts(4, engine.model.cfg.vocab_size, seed=11, min_len=3, max_len=30):
        expected = engine.generate(prompt, method="ar", max_new_tokens=40).token_ids
        result = engine.generate(prompt, method="ddtree", budget="auto", max_new_tokens=40)
        assert result.token_ids == expected
        assert result.budget == "auto" and len(result.chosen_budgets) == result.rounds
        assert set(result.chosen_budgets) <= set(engine.auto.costs.sizes)


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
