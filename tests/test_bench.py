"""`ddtree bench`: a small CPU run on a tiny model writes the results JSON, the table and the plots;
the dataset loaders read the shared benchmark files in the published prompt formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from types import SimpleNamespace

import pytest
import torch

from ddtree.bench import bench, load_dataset, read_results
from ddtree.options import Decoding
from ddtree.cli import main
from ddtree.data import REASONING_SUFFIX
from ddtree.errors import DDTreeError
from ddtree.results import GenerationResult

TARGET = "llama"
REQUIRED = {"dataset", "method", "budget", "temperature", "num_prompts", "mean_acceptance", "tokens_per_second",
            "speedup_vs_ar", "token_agreement_with_ar"}
SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "benchmarks")


@pytest.fixture(scope="module")
def small_run(model_dirs, tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    drafter = work / "drafter"
    assert main(["init-drafter", "--target", model_dirs[TARGET], "--block-size", "8", "--out", str(drafter)]) == 0
    prompts = work / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "Tell me a story."}, {"prompt": "What is two plus two?"},
        {"turns": ["Name a colour.", "And another one?"]},
    ]))
    out = work / "results.json"
    common = ["--target", model_dirs[TARGET], "--drafter", str(drafter), "--datasets", str(prompts),
              "--max-new-tokens", "8"]
    rc = main(["bench", *common, "--methods", "hf,ar,dflash,ddtree", "--budgets", "4,16", "--temperatures", "0,1",
               "--hf-limit", "2", "--out", str(out)])
    assert rc == 0
    return out, json.loads(out.read_text()), common


def test_results_json_has_every_run(small_run):
    _, result, _ = small_run
    assert isinstance(result["device"], str) and result["device"]
    assert {"torch", "transformers", "git_commit", "command"} <= set(result)
    runs = result["runs"]
    labels = {(r["method"], r["budget"], r["temperature"]) for r in runs}
    for t in (0.0, 1.0):
        assert {("hf", None, t), ("ar", None, t), ("dflash", None, t), ("ddtree", 4, t), ("ddtree", 16, t)} <= labels
    for run in runs:
        assert REQUIRED <= set(run), REQUIRED - set(run)
        assert run["num_prompts"] == (2 if run["method"] == "hf" else 3)
        assert run["num_responses"] == (2 if run["method"] == "hf" else 4)  # the two-turn prompt gives two
        assert run["tokens_per_second"] > 0 and run["mean_acceptance"] >= 1
        assert run["speedup_vs_ar"] > 0


def test_methods_agree_with_ar_at_every_temperature(small_run):
    """fp32 on the CPU: greedy outputs equal ar's, and so do seeded samples (the draws are keyed by seed
    and position); transformers' generate() samples its own way, so it has no agreement at T=1."""
    _, result, _ = small_run
    for run in result["runs"]:
        if run["method"] != "hf":
            assert run["token_agreement_with_ar"] == 1.0, (run["method"], run["temperature"])
        elif run["temperature"] == 1:
            assert run["token_agreement_with_ar"] is None


def test_table_and_plots_are_written(small_run):
    out, _, _ = small_run
    prefix = os.path.splitext(out)[0]
    table = open(prefix + ".md").read()
    assert "| dataset |" in table and "ddtree B=16" in table and "hf" in table
    for name in ("budget-T0", "histogram-T0", "budget-T1", "histogram-T1"):
        path = f"{prefix}-{name}.png"
        assert os.path.getsize(path) > 1000
        assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not os.path.isdir(SHARED), reason="shared benchmark files not beside the checkout")
def test_dataset_formats():
    gsm8k = load_dataset("gsm8k", SHARED)
    assert len(gsm8k) == 1319 and gsm8k[0][0].endswith(REASONING_SUFFIX)
    mt_bench = load_dataset("mt-bench", SHARED)
    assert len(mt_bench) == 80 and all(len(turns) == 2 for turns in mt_bench)
    assert len(load_dataset("math500", SHARED)) == 500
    assert len(load_dataset("alpaca", SHARED)) == 80
    humaneval = load_dataset("humaneval", SHARED)
    assert len(humaneval) == 164 and humaneval[0][0].startswith("Write a solution")
    mbpp = load_dataset("mbpp", SHARED)
    assert len(mbpp) == 427 and "assert" in mbpp[0][0]
    with pytest.raises(DDTreeError):
        load_dataset("no-such-set", SHARED)


def test_data_parallel_run_gathers_the_same_results(small_run, tmp_path):
    """Two processes under torchrun (gloo, CPU) shard the prompts; rank 0 writes the gathered results
    (here xz-compressed, as docs/results keeps them)."""
    _, single, common = small_run
    out = tmp_path / "dp.json.xz"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "ddtree.cli", "bench", *common, "--methods", "ar,ddtree", "--budgets", "4",
               "--device", "cpu", "--out", str(out)]
    # A standalone run talks over loopback only; naming it spares gloo guessing an interface from the hostname.
    env = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    # torchrun's own traceback fills the tail; the ranks' messages come first.
    assert done.returncode == 0, done.stderr[:3000]
    assert out.read_bytes()[:6] == b"\xfd7zXZ\x00"  # the xz magic
    result = read_results(str(out))
    assert result["world_size"] == 2 and (tmp_path / "dp.md").exists()
    expected = {(r["method"], r["budget"]): r for r in single["runs"] if r["temperature"] == 0}
    for run in result["runs"]:
        want = expected[(run["method"], run["budget"])]
        assert run["num_prompts"] == 3
        assert [r["token_ids"] for r in run["responses"]] == [r["token_ids"] for r in want["responses"]]
        assert [r["conversation"] for r in run["responses"]] == [0, 1, 2, 2]


def test_divergences_give_the_position_and_the_logit_margin(small_run):
    import copy

    import ddtree
    from ddtree.bench import divergences, logit_margin

    _, result, common = small_run
    engine = ddtree.load(common[1], common[3], "cpu", "float32", quiet=True)
    conversations = load_dataset(common[5], SHARED)
    ar = next(r for r in result["runs"] if r["method"] == "ar" and r["temperature"] == 0)["responses"]
    assert divergences(engine, conversations, ar, ar) == []
    changed = copy.deepcopy(ar)
    last = changed[3]  # the second turn of the two-turn conversation
    position = min(2, len(last["token_ids"]) - 1)
    last["token_ids"][position] = (last["token_ids"][position] + 1) % engine.model.cfg.vocab_size
    [found] = divergences(engine, conversations, changed, ar)
    assert (found["conversation"], found["turn"], found["position"]) == (2, 1, position)
    messages = [{"role": "user", "content": conversations[2][0]},
                {"role": "assistant", "content": engine.tokenizer.decode(ar[2]["token_ids"], skip_special_tokens=True)},
                {"role": "user", "content": conversations[2][1]}]
    expected = logit_margin(engine, engine.encode(messages) + ar[3]["token_ids"][:position])
    assert found["margin"] == pytest.approx(expected) and found["margin"] >= 0


class RecordingEngine:
    """Just enough of an Engine for `bench`: records what is prepared and generated, in order."""

    device, dtype = torch.device("cpu"), torch.float32
    target = SimpleNamespace(name="recording")
    tokenizer = SimpleNamespace(decode=lambda ids, **_: "x")
    autos = SimpleNamespace(report=dict)
    model = SimpleNamespace(bf16_products=False)

    def __init__(self):
        self.events: list[tuple] = []
        self.prepared: set[tuple] = set()

    def prepare(self, decoding, context, sampling):
        new = (decoding, sampling) not in self.prepared
        self.prepared.add((decoding, sampling))
        self.events.append(("prepare", decoding.method, decoding.budget))
        return int(new)

    def encode(self, text, chat=False):
        return [1, 2, 3]

    def generate(self, prompt, options=None, chat=False, **fields):
        decoding = options.decoding if options else Decoding(fields.get("method", "ddtree"), fields.get("budget"))
        self.events.append(("generate", decoding.method, decoding.budget, prompt))
        return GenerationResult(text="x", token_ids=[7], prompt_tokens=3, acceptance_lengths=[1], seconds=0.01,
                                stage_seconds={}, finish_reason="length", method=decoding.method,
                                budget=decoding.budget)


def test_methods_are_interleaved_prompt_by_prompt_after_every_graph_is_prepared(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(3)))
    engine = RecordingEngine()
    specs = [Decoding("ar"), Decoding("ddtree", 4), Decoding("ddtree", "auto")]
    bench(engine, [str(prompts)], specs, [0.0], None, 8, 1, 0)
    timed = [e for e in engine.events if e[0] == "generate"][1:]  # after the warm-up
    last_prepare = max(i for i, e in enumerate(engine.events) if e[0] == "prepare")
    assert last_prepare < engine.events.index(timed[0])
    # each prompt in turn, every method on it, the order rotating from prompt to prompt
    assert [(e[3][0]["content"], e[1], e[2]) for e in timed] == [
        ("q0", "ar", None), ("q0", "ddtree", 4), ("q0", "ddtree", "auto"),
        ("q1", "ddtree", 4), ("q1", "ddtree", "auto"), ("q1", "ar", None),
        ("q2", "ddtree", "auto"), ("q2", "ar", None), ("q2", "ddtree", 4)]


def test_concurrency_runs_decode_sets_several_at_a_time(small_run, tmp_path):
    """--concurrency: per level and method, throughput over the wall time, request percentiles, answers
    equal to ar's at temperature 0 (two-turn conversations too), a table and a plot."""
    _, _, common = small_run
    out = tmp_path / "batched.json"
    assert main(["bench", *common, "--methods", "ar,dflash,ddtree", "--budgets", "4,auto", "--concurrency", "1,2",
                 "--out", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert sorted((r["concurrency"], r["method"], str(r["budget"])) for r in runs) == [
        (level, method, budget) for level in (1, 2)
        for method, budget in (("ar", "None"), ("ddtree", "4"), ("ddtree", "auto"), ("dflash", "None"))]
    for run in runs:  # what auto chose from: its costs per batch size, their corrections, what it learned
        if run["budget"] == "auto":
            batches, level = run["auto"]["batches"], str(run["concurrency"])
            assert level in batches and run["chosen_budgets"]
            assert all(ms > 0 for batch in batches.values() for costs in batch["ms_per_round"].values() for ms in costs)
            assert set(run["chosen_budgets"]) <= set(batches[level]["correction"])
            assert 0 < sum(run["auto"]["acceptance"]["seen"])
        else:
            assert run["auto"] is None
    for run in runs:
        assert run["num_prompts"] == 3 and len(run["responses"]) == 4  # the two-turn conversation twice
        assert run["token_agreement_with_ar"] == 1.0
        assert run["tokens_per_second"] == pytest.approx(run["new_tokens"] / run["seconds"])
        assert 0 < run["first_token_seconds"]["p50"] <= run["latency_seconds"]["p99"]
        ms = run["stage_ms_per_round"]  # per round of the batch
        assert ms["verify"] > 0 and (ms["draft"] > 0) == (run["method"] != "ar")
    prefix = os.path.splitext(out)[0]
    table = open(prefix + ".md").read()
    assert "| concurrency |" in table and "| ms per round: draft / tree / verify / commit + host |" in table
    assert "| tok/s |" not in table  # (no single-stream run, no empty table for them)
    assert open(f"{prefix}-concurrency-T0.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", *common, "--methods", "hf,ar", "--concurrency", "2", "--out", str(out)]) != 0  # (refused)
