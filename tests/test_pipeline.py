"""`ddtree train-drafter` without --data: every phase of the recipe in one resumable command."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from ddtree.cli import main
from ddtree.data import SequenceFile
from ddtree.drafter import load_drafter
from ddtree.pipeline import Deadline
from test_loading import tiny_config

PROMPTS = ["Tell me a story.", "Count to five.", "Hi", "Name a colour.", "What is 2+2?", "Say yes.",
           "Write a haiku.", "Spell cat."]


def recipe_command(target: str, tmp_path, *extra: str) -> list[str]:
    """A tiny recipe: 8 prompts, 4 of them also sampled; 11 training sequences, 1 held out, 5 steps."""
    given = tmp_path / "given.jsonl"
    given.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return ["train-drafter", "--target", target, "--out", str(tmp_path / "work"), "--prompts", str(given),
            "--sampled-share", "0.5", "--max-new-tokens", "8", "--regenerate-batch-size", "4", "--device", "cpu",
            "--layers", "1", "--block-size", "4", "--batch-size", "2", "--anchors", "4", "--epochs", "1",
            "--eval-every", "2", "--save-every", "2", "--eval-sequences", "1", "--eval-budgets", "4,8", *extra]


def trained_step(work) -> int:
    return torch.load(work / "drafter" / "train_state.pt", weights_only=False)["step"]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_one_command_runs_every_phase_and_a_second_call_skips_them(model_dirs, tmp_path, capsys, family):
    command = recipe_command(model_dirs[family], tmp_path)
    assert main(command) == 0
    work = tmp_path / "work"
    assert [json.loads(line)["prompt"] for line in open(work / "prompts.jsonl")] == PROMPTS
    greedy, sampled = (SequenceFile.load([str(work / name)])[0] for name in ("data-greedy.npz", "data-sampled.npz"))
    assert len(greedy) == 8 and len(sampled) == 4
    drafter = load_drafter(str(work / "drafter"))
    assert drafter.cfg.block_size == 4 and drafter.cfg.num_layers == 1
    assert trained_step(work) == 5
    card = (work / "drafter" / "README.md").read_text()
    assert (work / "drafter" / "curves.png").stat().st_size > 0
    assert "ddtree " + " ".join(command) in card and "8 prompts" in card and "chain" in card
    final = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert final["step"] == 5 and final["chain_tau"] >= 1

    written = {name: os.path.getmtime(work / name) for name in ("prompts.jsonl", "data-greedy.npz", "data-sampled.npz")}
    assert main(command) == 0
    out = capsys.readouterr().out
    assert out.count("done in an earlier call, skipped") == 3 and "resumed from step 5" in out
    assert written == {name: os.path.getmtime(work / name) for name in written}
    assert trained_step(work) == 5


def test_time_limit_stops_between_phases_and_inside_training_and_the_same_command_goes_on(
        model_dirs, tmp_path, capsys, monkeypatch):
    command = recipe_command(model_dirs["qwen3"], tmp_path, "--max-minutes", "30")
    work = tmp_path / "work"
    clock = iter([5.0])  # the prompts phase starts; the next check finds the time spent
    monkeypatch.setattr(Deadline, "minutes_left", lambda self: next(clock, 0.0))
    assert main(command) == 0
    assert "Continue with the same command" in capsys.readouterr().out
    assert (work / "prompts.jsonl").exists() and not (work / "data-greedy.npz").exists()
    # time left for every phase, but so little that training stops after its first step
    monkeypatch.setattr(Deadline, "minutes_left", lambda self: 1e-9)
    assert main(command) == 0
    assert "Continue with the same command" in capsys.readouterr().out
    assert trained_step(work) == 1 and not (work / "drafter" / "README.md").exists()
    monkeypatch.undo()
    assert main(command) == 0
    assert "resumed from step 1" in capsys.readouterr().out
    assert trained_step(work) == 5 and (work / "drafter" / "README.md").exists()


def test_one_command_with_dummy_weights_at_a_config_shape_and_no_matplotlib(tmp_path, monkeypatch):
    """A directory holding only a config.json (a shipped Qwen3 config made small; the default target's
    tokenizer): the whole recipe runs on random weights of that shape. Without matplotlib the card says
    why it has no curves."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the import fails as if it were not installed
    target = tiny_config(tmp_path, "qwen3-8b")
    assert main(recipe_command(target, tmp_path, "--dummy-weights", "--target-layer-ids", "0,1")) == 0
    drafter_dir = tmp_path / "work" / "drafter"
    drafter = load_drafter(str(drafter_dir))
    assert drafter.cfg.target_layer_ids == [0, 1] and drafter.cfg.vocab_size == 151936
    assert "matplotlib is not installed" in (drafter_dir / "README.md").read_text()
    assert not (drafter_dir / "curves.png").exists()
