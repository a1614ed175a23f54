"""The `ddtree` command line: --json output, text and stream modes, and --help."""

from __future__ import annotations

import argparse
import json

import pytest

from ddtree.cli import build_parser, main

TARGET = "qwen3"
KEYS = {"text", "token_ids", "num_new_tokens", "acceptance_lengths", "mean_acceptance", "rounds", "seconds",
        "tokens_per_second", "stage_seconds"}


@pytest.fixture(scope="module")
def drafter_dir(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "drafter"
    assert main(["init-drafter", "--target", model_dirs[TARGET], "--block-size", "8", "--out", str(out)]) == 0
    return str(out)


def run_json(capsys, model_dirs, drafter_dir, *extra):
    capsys.readouterr()
    rc = main(["generate", "--target", model_dirs[TARGET], "--drafter", drafter_dir, "--prompt", "Once upon a time",
               "--max-new-tokens", "12", "--json", *extra])
    out, err = capsys.readouterr()
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, "--json prints exactly one JSON object"
    return json.loads(lines[0])


@pytest.mark.parametrize("method", ["ar", "dflash", "ddtree"])
def test_generate_json(method, capsys, model_dirs, drafter_dir, targets):
    data = run_json(capsys, model_dirs, drafter_dir, "--method", method, "--budget", "16")
    assert KEYS <= set(data)
    assert {"draft", "tree", "verify", "commit"} <= set(data["stage_seconds"])
    assert all(isinstance(v, float) and v >= 0 for v in data["stage_seconds"].values())
    assert isinstance(data["text"], str)
    assert all(isinstance(t, int) for t in data["token_ids"])
    assert data["num_new_tokens"] == len(data["token_ids"]) == 12
    assert data["rounds"] == len(data["acceptance_lengths"])
    # the first token comes from the prefill; every later one from a round
    assert sum(data["acceptance_lengths"]) + 1 == data["num_new_tokens"]
    assert data["mean_acceptance"] == pytest.approx(sum(data["acceptance_lengths"]) / data["rounds"])
    assert data["seconds"] > 0 and data["tokens_per_second"] == pytest.approx(12 / data["seconds"])
    tok = targets[TARGET].tokenizer
    assert data["text"] == tok.decode(data["token_ids"], skip_special_tokens=True)
    if method == "ar":
        assert data["acceptance_lengths"] == [1] * 11


def test_json_outputs_agree_across_methods(capsys, model_dirs, drafter_dir, make_engine, targets):
    ar = run_json(capsys, model_dirs, drafter_dir, "--method", "ar")
    tree = run_json(capsys, model_dirs, drafter_dir, "--method", "ddtree", "--budget", "32")
    assert ar["token_ids"] == tree["token_ids"]
    # the same as the Python API on the same prompt (no chat template for a plain directory)
    tok = targets[TARGET].tokenizer
    engine = make_engine(TARGET)
    assert engine.generate("Once upon a time", method="ar", max_new_tokens=12).token_ids == ar["token_ids"]
    assert tok.encode("Once upon a time") == engine.encode("Once upon a time")


def test_json_with_compare_and_sampling(capsys, model_dirs, drafter_dir):
    data = run_json(capsys, model_dirs, drafter_dir, "--compare", "--temperature", "0.8", "--top-k", "50",
                    "--top-p", "0.9", "--seed", "3")
    assert "baseline" in data and KEYS <= set(data["baseline"])
    assert data["baseline"]["method"] == "ar" and "speedup" in data["baseline"]
    again = run_json(capsys, model_dirs, drafter_dir, "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9",
                     "--seed", "3")
    assert again["token_ids"] == data["token_ids"]


def test_generate_text_and_stream(capsys, model_dirs, drafter_dir, tmp_path):
    base = ["generate", "--target", model_dirs[TARGET], "--drafter", drafter_dir, "--max-new-tokens", "10"]
    capsys.readouterr()
    assert main(base + ["--prompt", "abc"]) == 0
    out, err = capsys.readouterr()
    assert "tok/s" in err and "mean acceptance" in err
    assert main(base + ["--prompt", "abc", "--json"]) == 0
    text = json.loads(capsys.readouterr()[0])["text"]
    assert out == text + "\n"
    assert main(base + ["--prompt", "abc", "--stream"]) == 0
    assert capsys.readouterr()[0] == text + "\n"
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("abc")
    assert main(base + ["--prompt-file", str(prompt_file), "--json"]) == 0
    assert json.loads(capsys.readouterr()[0])["text"] == text


def test_chat_flag_uses_the_template(capsys, model_dirs, drafter_dir, make_engine):
    capsys.readouterr()
    assert main(["generate", "--target", model_dirs[TARGET], "--drafter", drafter_dir, "--prompt", "hi", "--chat",
                 "--max-new-tokens", "6", "--json", "--method", "ar"]) == 0
    data = json.loads(capsys.readouterr()[0])
    engine = make_engine(TARGET)
    expected = engine.generate("hi", chat=True, method="ar", max_new_tokens=6)
    assert data["token_ids"] == expected.token_ids
    assert data["prompt_tokens"] == len(engine.apply_chat_template([{"role": "user", "content": "hi"}]))


def subcommands() -> list[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sorted(action.choices)


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr()[0]
    assert out.startswith("usage: ddtree")
    assert {"generate", "init-drafter"} <= set(subcommands())
    for command in subcommands():
        assert command in out


@pytest.mark.parametrize("command", subcommands())
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: ddtree {command}") and "Traceback" not in err
    expected = {
        "generate": ("--target", "--drafter", "--method", "--budget", "--temperature", "--top-k", "--top-p",
                     "--seed", "--max-new-tokens", "--stop", "--json", "--stream", "--chat", "--prompt-file"),
        "init-drafter": ("--target", "--layers", "--block-size", "--target-layer-ids", "--mask-token-id", "--out"),
    }.get(command, ())
    for option in expected:
        assert option in out


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code != 0


def test_parser_defaults():
    args = build_parser().parse_args(["generate", "--prompt", "x"])
    assert (args.method, args.budget, args.temperature, args.top_k, args.top_p, args.max_new_tokens) == (
        "ddtree", None, 0.0, 0, 1.0, 256)


def test_default_budget_is_auto(capsys, model_dirs, drafter_dir):
    result = run_json(capsys, model_dirs, drafter_dir)
    assert result["budget"] == "auto"
    assert len(result["chosen_budgets"]) == result["rounds"] and min(result["chosen_budgets"]) >= 1


def test_python_load_api(model_dirs, drafter_dir, capsys):
    import ddtree

    engine = ddtree.load(model_dirs[TARGET], drafter_dir, "cpu", "float32")
    assert isinstance(engine, ddtree.Engine)
    result = engine.generate("Once upon a time", method="ddtree", budget=8, max_new_tokens=5)
    assert isinstance(result, ddtree.GenerationResult) and result.num_new_tokens == 5
    chunks = list(engine.stream([1, 2, 3], method="dflash", max_new_tokens=5))
    assert sum(len(c.token_ids) for c in chunks) == 5
    ddtree.load(model_dirs[TARGET], "random", "cpu", "float32")
    assert "random" in capsys.readouterr()[1]  # a random drafter is announced on stderr


def test_profile_prints_and_writes_stage_times(capsys, model_dirs, drafter_dir, tmp_path):
    out = tmp_path / "profile.json"
    assert main(["profile", "--target", model_dirs[TARGET], "--drafter", drafter_dir, "--budgets", "4",
                 "--max-new-tokens", "6", "--repeats", "1", "--prompt", "hi", "--out", str(out)]) == 0
    table = capsys.readouterr()[0]
    data = json.loads(out.read_text())
    assert [(p["method"], p["budget"]) for p in data["profiles"]] == [("ar", None), ("dflash", None), ("ddtree", 4)]
    for profile in data["profiles"]:
        assert profile["rounds"] >= 1 and profile["ms_per_round"]["round"] > 0
        assert {"draft", "tree", "verify", "commit", "host"} <= set(profile["ms_per_round"])
    assert "| ddtree | 4 |" in table and "NO" not in table
    assert {"device", "torch", "git_commit", "command"} <= set(data)


def test_loadtest_without_a_server_is_a_clear_error(capsys):
    assert main(["loadtest", "--url", "http://127.0.0.1:9", "--seconds", "1"]) == 2
    assert "cannot reach the server" in capsys.readouterr()[1]
