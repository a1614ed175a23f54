"""Benchmarks: the same prompts through every method of one engine, with acceptance and speed.

A dataset is a list of conversations (lists of user turns). Each turn is generated in order, with
the previous answers in the context, and every turn's answer is one response. Timings are medians
over repeated runs of each response; acceptance comes from the first run (it does not change).
"""

from __future__ import annotations

import json
import lzma
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .errors import DDTreeError
from .evalsets import load_dataset
from .model import causal_mask
from .options import Decoding, GenerationOptions
from .parallel import gather_objects, world
from .results import GenerationResult, percentiles, shared_prefix
from .sampling import SamplingParams

def dataset_label(name: str) -> str:
    """A results name for a dataset: its own name, or a JSONL file's name without folder and suffix."""
    return os.path.splitext(os.path.basename(name))[0] if name.endswith(".jsonl") else name


@dataclass(frozen=True)
class Baseline:
    """A method outside the engine, listed beside its `Decoding`s: `hf`, transformers' own generate()."""
    method: str = "hf"
    budget: None = None
    label: str = "hf"


HF = Baseline()


class HFBaseline:
    """transformers' own `generate()` on the same weights and dtype: what users start from."""

    def __init__(self, engine):
        from transformers import AutoModelForCausalLM

        self.engine = engine
        self.model = AutoModelForCausalLM.from_pretrained(engine.target.model_dir, dtype=engine.dtype)
        self.model.to(engine.device).eval()

    def generate(self, messages, options: GenerationOptions) -> GenerationResult:
        engine, max_new_tokens = self.engine, options.max_new_tokens
        temperature, seed = options.sampling.temperature, options.seed
        ids = torch.tensor([engine.encode(messages)], device=engine.device)
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else \
            dict(do_sample=False, temperature=None, top_k=None, top_p=None)
        torch.manual_seed(seed)
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      eos_token_id=sorted(engine.target.eos_token_ids), pad_token_id=0, **sampling)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        seconds = time.perf_counter() - started
        new = out[0, ids.shape[1]:].tolist()
        end = next((i + 1 for i, t in enumerate(new) if t in engine.target.eos_token_ids), len(new))
        new = new[:end]
        return GenerationResult(text=engine.tokenizer.decode(new, skip_special_tokens=True), token_ids=new,
                                prompt_tokens=ids.shape[1], acceptance_lengths=[1] * max(len(new) - 1, 0),
                                seconds=seconds, stage_seconds={}, finish_reason="stop", method="hf", budget=None)


def run_conversation(generate, turns: list[str], options: GenerationOptions, repeats: int, index: int) -> list[dict]:
    """Every turn of one conversation; the answers of earlier turns come from this method's own run."""
    messages, responses = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        runs = [generate(list(messages), options) for _ in range(repeats)]
        first = runs[0]
        responses.append({
            "conversation": index,
            "token_ids": first.token_ids,
            "num_new_tokens": first.num_new_tokens,
            "acceptance_lengths": first.acceptance_lengths,
            "mean_acceptance": first.mean_acceptance,
            "seconds": statistics.median(r.seconds for r in runs),
            "stage_seconds": first.stage_seconds,
            "chosen_budgets": first.chosen_budgets,
        })
        messages.append({"role": "assistant", "content": first.text})
    return responses


def longest_context(engine, conversations: list[list[str]], max_new_tokens: int) -> int:
    """About the most tokens any of these conversations holds: its turns through the chat template and
    a full answer to each (what `Engine.prepare` sizes the buffers and graphs for)."""
    def tokens(turns: list[str]) -> int:
        return sum(len(engine.encode(turn, chat=True)) + max_new_tokens for turn in turns)
    return max(tokens(turns) for turns in conversations)


def summarise(responses: list[dict]) -> dict:
    tokens = sum(r["num_new_tokens"] for r in responses)
    seconds = sum(r["seconds"] for r in responses)
    histogram: dict[int, int] = {}
    for r in responses:
        for length in r["acceptance_lengths"]:
            histogram[length] = histogram.get(length, 0) + 1
    rounds = sum(len(r["acceptance_lengths"]) for r in responses)
    chosen: dict[int, int] = {}
    for r in responses:
        for budget in r.get("chosen_budgets", []):
            chosen[budget] = chosen.get(budget, 0) + 1
    stages = sorted({stage for r in responses for stage in r["stage_seconds"] if stage != "prefill"})
    return {
        "num_responses": len(responses),
        # each stage's time over all responses, per decoding round (empty for hf, which has no rounds)
        "stage_ms_per_round": {stage: 1000 * sum(r["stage_seconds"].get(stage, 0.0) for r in responses) / rounds
                               for stage in stages} if rounds else {},
        "mean_acceptance": statistics.fmean(r["mean_acceptance"] for r in responses) if responses else 0.0,
        "acceptance_histogram": dict(sorted(histogram.items())),
        "chosen_budgets": dict(sorted(chosen.items())),  # with budget "auto": rounds per chosen size
        "new_tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds else 0.0,
        "seconds_per_token": seconds / tokens if tokens else 0.0,
    }


def speedup(stats: dict, baseline: list[dict] | None) -> float | None:
    """Baseline time per token over this method's, on the same prompts (None without a baseline)."""
    if not baseline or not stats["seconds_per_token"]:
        return None
    return summarise(baseline)["seconds_per_token"] / stats["seconds_per_token"]


def same_conversations(responses: list[dict], reference: list[dict] | None) -> list[dict]:
    """The responses to the conversations the reference ran too (hf runs on the first few only)."""
    if not reference:
        return responses
    done = {r["conversation"] for r in reference}
    return [r for r in responses if r["conversation"] in done]


def agreement(responses: list[dict], reference: list[dict]) -> float:
    """Share of the reference's tokens reproduced before the first difference, over all responses."""
    same = total = 0
    for mine, ref in zip(responses, reference):
        a, b = mine["token_ids"], ref["token_ids"]
        same += shared_prefix(a, b)
        total += max(len(a), len(b))
    return same / total if total else 1.0


def divergences(engine, conversations: list[list[str]], responses: list[dict], reference: list[dict]) -> list[dict]:
    """Where a temperature-0 response first leaves ar's, with the target's logit margin there (its
    top logit minus the runner-up on the shared prefix): a lossless method diverges only at near-ties,
    where rounding in a differently shaped forward can flip the argmax.

    Only a conversation's first differing turn is examined: up to it both saw the same prompt."""
    found = []
    turns_of = lambda rs, index: [r for r in rs if r["conversation"] == index]  # noqa: E731
    for index in sorted({r["conversation"] for r in responses}):
        messages = []
        for turn, (mine, ref) in enumerate(zip(turns_of(responses, index), turns_of(reference, index))):
            messages.append({"role": "user", "content": conversations[index][turn]})
            a, b = mine["token_ids"], ref["token_ids"]
            if a != b:
                position = shared_prefix(a, b)
                found.append({"conversation": index, "turn": turn, "position": position,
                              "margin": logit_margin(engine, engine.encode(list(messages)) + b[:position])})
                break
            messages.append({"role": "assistant", "content": engine.tokenizer.decode(b, skip_special_tokens=True)})
    return found


@torch.inference_mode()
def logit_margin(engine, ids: list[int]) -> float:
    model, length = engine.model, len(ids)
    hidden, _ = model(torch.tensor([ids], device=engine.device), torch.arange(length, device=engine.device)[None],
                      causal_mask(length, 0, engine.device))
    top = model.logits(hidden[0, -1]).topk(2).values
    return float(top[0] - top[1])


def results_opener(path: str):
    """`open`, or `lzma.open` for an xz-compressed results file (NAME.json.xz: docs/results keeps them so,
    13 times smaller)."""
    return lzma.open if path.endswith(".xz") else open


def read_results(path: str) -> dict:
    """A `ddtree bench` results file, plain or xz-compressed."""
    with results_opener(path)(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def git_commit() -> str:
    """DDTREE_GIT_COMMIT when set (a lent GPU machine runs a copy whose git metadata, if any, is not
    the commit that was sent), else this checkout's commit."""
    if os.environ.get("DDTREE_GIT_COMMIT"):
        return os.environ["DDTREE_GIT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(__file__)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment(engine) -> dict:
    commit = git_commit()
    import transformers

    device = engine.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_commit": commit, "command": " ".join(sys.argv),
            "dtype": str(engine.dtype).removeprefix("torch."), "bf16_products": engine.model.bf16_products,
            "target": engine.target.name}


def gather(responses: list[dict]) -> list[dict]:
    """Every rank's responses, in conversation order (a stable sort keeps each conversation's turns in order)."""
    return sorted((r for part in gather_objects(responses) for r in part), key=lambda r: r["conversation"])


@dataclass
class BenchPlan:
    """What one `bench` call runs: the methods (each a Decoding, or HF), the generation settings shared
    by all, and this process's share of the prompts under torchrun."""
    specs: list
    max_new_tokens: int
    repeats: int
    seed: int
    hf_limit: int = 5
    rank: int = 0
    size: int = 1

    def prompts(self, spec, conversations: list) -> int:
        """How many of a set's conversations `spec` runs (hf is slow: only the first few)."""
        return min(len(conversations), self.hf_limit) if spec is HF else len(conversations)

    def mine(self, count: int) -> range:
        return range(self.rank, count, self.size)

    def options(self, spec, temperature: float) -> GenerationOptions:
        return GenerationOptions(spec if spec is not HF else Decoding("ar"), SamplingParams(temperature),
                                 self.max_new_tokens, self.seed)


def bench(engine, datasets: list[str], specs: list, temperatures: list[float], limit: int | None,
          max_new_tokens: int, repeats: int, seed: int, root: str | None = None, hf_limit: int = 5,
          concurrency: list[int] | None = None) -> dict:
    """Runs every (dataset, temperature, method) and returns the results document; with `concurrency`,
    at each of those levels the set's prompts decode that many at a time (`concurrent_runs`).

    Under torchrun, each rank takes every size-th conversation and the responses are gathered on
    all ranks, so every rank returns the same document.
    """
    rank, size = world()
    if concurrency and (size > 1 or HF in specs):
        raise DDTreeError("--concurrency runs in one process, and without the hf baseline")
    plan = BenchPlan(specs, max_new_tokens, repeats, seed, hf_limit, rank, size)
    result = environment(engine) | {"max_new_tokens": max_new_tokens, "repeats": repeats, "seed": seed,
                                    "world_size": size, "runs": []}
    conversations = {name: load_dataset(name, root)[:limit] for name in datasets}
    total = sum(len(plan.mine(plan.prompts(spec, c))) for c in conversations.values() for spec in specs)
    bar = tqdm(total=total * len(temperatures) * len(concurrency or [1]), desc="bench", unit="prompt",
               disable=rank != 0)
    generators = method_generators(engine, specs)
    for name, convs in conversations.items():
        engine.generate(convs[0][0], chat=True, max_new_tokens=8, method="ar")  # warm-up
        context = longest_context(engine, convs, max_new_tokens)
        for temperature in temperatures:
            if concurrency:
                result["runs"] += concurrent_runs(engine, plan, name, convs, temperature, concurrency, context, bar)
                continue
            prepare_all(engine, specs, context, temperature)
            per_method = run_set(plan, generators, name, convs, temperature, bar)
            result["runs"] += [run_record(engine, plan, spec, name, convs, temperature, per_method) for spec in specs]
    bar.close()
    return result


def concurrent_runs(engine, plan: BenchPlan, name: str, convs: list, temperature: float, levels: list[int],
                    context: int, bar) -> list[dict]:
    """Every method at every concurrency level: the set's conversations decode `level` at a time (a request
    joins as another finishes), turn by turn. Throughput is the set's new tokens over the wall time; a
    request's latency and time to first token run from joining the batch. With CUDA graphs, a first
    untimed pass captures them; the wall time is the median of `repeats` timed passes."""
    rows = max(engine.method_for(spec).rows for spec in plan.specs)
    engine.workspace_for(context, rows, max(levels))  # once: growing it mid-run would drop every graph
    records = []
    for level in levels:
        per_method = {}
        for spec in plan.specs:
            bar.set_postfix(dataset=name, method=spec.label, t=temperature, concurrency=level)
            options = plan.options(spec, temperature)
            if engine.graphs.enabled:
                run_batched(engine, convs, options, level)
            passes = [run_batched(engine, convs, options, level) for _ in range(plan.repeats)]
            per_method[spec.label] = passes[0], statistics.median(p["seconds"] for p in passes)
            bar.update(len(convs))
        ar = per_method.get("ar")
        for spec in plan.specs:
            first, seconds = per_method[spec.label]
            records.append(concurrent_record(spec, name, temperature, level, first, seconds, ar))
    return records


def run_batched(engine, convs: list, options: GenerationOptions, level: int) -> dict:
    """One pass over a set, `level` requests at a time: each turn of every conversation, with its own answers
    to the earlier turns in the context. Returns the responses, the wall time, and each stage's time per
    round of the batch."""
    histories: list[list[dict]] = [[] for _ in convs]
    responses, stages, rounds = [], {}, 0
    started = time.perf_counter()
    for turn in range(max(len(turns) for turns in convs)):
        active = [i for i, turns in enumerate(convs) if turn < len(turns)]
        for i in active:
            histories[i].append({"role": "user", "content": convs[i][turn]})
        results = engine.generate_batch([list(histories[i]) for i in active], options, chat=True, slots=level)
        rounds += results[0].batch_rounds
        for stage, seconds in results[0].stage_seconds.items():
            stages[stage] = stages.get(stage, 0.0) + seconds
        for i, result in zip(active, results):
            histories[i].append({"role": "assistant", "content": result.text})
            responses.append({"conversation": i, "token_ids": result.token_ids, "num_new_tokens": result.num_new_tokens,
                              "acceptance_lengths": result.acceptance_lengths, "mean_acceptance": result.mean_acceptance,
                              "seconds": result.seconds, "first_token_seconds": result.first_token_seconds,
                              "stage_seconds": {}, "chosen_budgets": result.chosen_budgets})
    return {"responses": sorted(responses, key=lambda r: r["conversation"]), "seconds": time.perf_counter() - started,
            "stage_ms_per_round": {stage: 1000 * seconds / rounds for stage, seconds in stages.items()
                                   if stage != "prefill"} if rounds else {},
            "auto": engine.autos.report() if options.decoding.budget == "auto" else None}


def concurrent_record(spec, name: str, temperature: float, level: int, first: dict, seconds: float,
                      ar: tuple[dict, float] | None) -> dict:
    """One method's results at one concurrency level (its first pass's responses and stage times, the median
    pass's wall time), against `ar` at the same level."""
    responses = first["responses"]
    stats = summarise(responses) | {"stage_ms_per_round": first["stage_ms_per_round"]}
    throughput = stats["new_tokens"] / seconds if seconds else 0.0
    return {"dataset": dataset_label(name), "method": spec.method, "budget": spec.budget, "temperature": temperature,
            "concurrency": level, "num_prompts": len({r["conversation"] for r in responses}),
            **stats, "seconds": seconds, "tokens_per_second": throughput,
            "seconds_per_token": seconds / stats["new_tokens"] if stats["new_tokens"] else 0.0,
            "request_tokens_per_second": percentiles([r["num_new_tokens"] / r["seconds"] for r in responses
                                                      if r["seconds"] > 0]),
            "first_token_seconds": percentiles([r["first_token_seconds"] for r in responses]),
            "latency_seconds": percentiles([r["seconds"] for r in responses]),
            "speedup_vs_ar": (throughput / (sum(r["num_new_tokens"] for r in ar[0]["responses"]) / ar[1])
                              if ar and ar[1] else None),
            "speedup_vs_hf": None,
            "token_agreement_with_ar": agreement(responses, ar[0]["responses"]) if ar else None,
            "divergences": [], "auto": first["auto"], "responses": responses}


def method_generators(engine, specs: list) -> dict:
    """Per method label, a function (messages, options) -> GenerationResult."""
    hf = HFBaseline(engine) if HF in specs else None
    return {spec.label: hf.generate if spec is HF else engine.generate for spec in specs}


def run_set(plan: BenchPlan, generators: dict, name: str, convs: list, temperature: float, bar) -> dict:
    """Every method's responses to this process's share of a set, gathered from every process.

    Prompt by prompt, every method in turn (the order rotating), so that a machine whose speed drifts
    over minutes slows every method alike instead of whichever ran during the slow spell."""
    per_method = {spec.label: [] for spec in plan.specs}
    for index in plan.mine(len(convs)):
        for spec in rotated(plan.specs, index):
            if index >= plan.prompts(spec, convs):
                continue
            bar.set_postfix(dataset=name, method=spec.label, t=temperature)
            per_method[spec.label] += run_conversation(generators[spec.label], convs[index],
                                                       plan.options(spec, temperature), plan.repeats, index)
            bar.update(1)
    return {label: gather(responses) for label, responses in per_method.items()}


def run_record(engine, plan: BenchPlan, spec, name: str, convs: list, temperature: float, per_method: dict) -> dict:
    """One method's results on one set at one temperature, against `ar` and `hf` where they ran."""
    ar, hf_responses = per_method.get("ar"), per_method.get("hf")
    responses = per_method[spec.label]
    stats = summarise(responses)
    return {"dataset": dataset_label(name), "method": spec.method, "budget": spec.budget,
            "temperature": temperature, "num_prompts": plan.prompts(spec, convs), **stats,
            "speedup_vs_ar": speedup(stats, ar),
            "speedup_vs_hf": speedup(summarise(same_conversations(responses, hf_responses)), hf_responses),
            # at temperature > 0 too: the engine's draws are keyed by seed and position, so every method
            # samples what `ar` samples (`hf` draws its own way)
            "token_agreement_with_ar": (agreement(responses, ar)
                                        if ar and (temperature == 0 or spec is not HF) else None),
            "divergences": (divergences(engine, convs, responses, ar)
                            if ar and temperature == 0 and spec.method != "ar" else []),
            "auto": engine.autos.report() if spec.budget == "auto" else None,
            "responses": responses}


def prepare_all(engine, specs: list, context: int, temperature: float) -> None:
    """Buffers and graphs for every method before any is timed. Growing the workspace for a larger
    tree drops the graphs captured so far, so passes repeat until none is new."""
    for _ in range(3):
        if not sum(engine.prepare(spec, context, SamplingParams(temperature)) for spec in specs if spec is not HF):
            return


def rotated(specs: list, index: int) -> list:
    shift = index % len(specs)
    return specs[shift:] + specs[:shift]


def markdown_table(result: dict) -> str:
    lines = [f"device: {result['device']}; torch {result['torch']}; commit {result['git_commit'][:10]}; "
             f"{result['max_new_tokens']} new tokens; median of {result['repeats']}"
             f"{'; bfloat16 products' if result.get('bf16_products') else ''}",
             "", "| dataset | T | method | prompts | τ | tok/s | speedup vs ar | speedup vs hf | agreement with ar "
                 "| largest margin at a divergence | ms per round: draft / tree / verify / commit + host |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    cell = lambda value, fmt: "" if value is None else format(value, fmt)  # noqa: E731
    batched = [run for run in result["runs"] if "concurrency" in run]
    single = [run for run in result["runs"] if "concurrency" not in run]
    for run in single:
        label = method_label(run)
        margins = [d["margin"] for d in run.get("divergences", [])]
        lines.append(f"| {run['dataset']} | {run['temperature']:g} | {label} | {run['num_prompts']} | "
                     f"{run['mean_acceptance']:.2f} | {run['tokens_per_second']:.1f} | "
                     f"{cell(run['speedup_vs_ar'], '.2f')} | {cell(run['speedup_vs_hf'], '.2f')} | "
                     f"{cell(run['token_agreement_with_ar'], '.3f')} | {cell(max(margins, default=None), '.3f')} | "
                     f"{stage_cell(run)} |")
    if batched:  # (with no single-stream run, its table is left out)
        lines = (lines if single else lines[:1]) + concurrency_table(batched)
    return "\n".join(lines) + "\n"


def stage_cell(run: dict) -> str:
    """A run's milliseconds per round in each stage (a batch's rounds, for runs at a concurrency)."""
    ms = run.get("stage_ms_per_round", {})
    return (f"{ms.get('draft', 0):.2f} / {ms.get('tree', 0):.2f} / {ms.get('verify', 0):.2f} / "
            f"{ms.get('commit', 0) + ms.get('host', 0):.2f}") if ms else ""


def method_label(run: dict) -> str:
    return run["method"] if run["budget"] is None else f"{run['method']} B={run['budget']}"


def concurrency_table(runs: list[dict]) -> list[str]:
    """Runs at several concurrency levels: throughput, and per request its speed, first token and latency."""
    spread = lambda p: f"{p['p50']:.2f} / {p['p90']:.2f} / {p['p99']:.2f}" if p else ""  # noqa: E731
    lines = ["", "| dataset | T | method | concurrency | prompts | τ | throughput tok/s | vs ar | request tok/s p50 "
                 "| first token s p50 / p90 / p99 | latency s p50 / p90 / p99 | agreement with ar "
                 "| ms per round: draft / tree / verify / commit + host |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        vs_ar = "" if run["speedup_vs_ar"] is None else f"{run['speedup_vs_ar']:.2f}"
        agree = "" if run["token_agreement_with_ar"] is None else f"{run['token_agreement_with_ar']:.3f}"
        lines.append(f"| {run['dataset']} | {run['temperature']:g} | {method_label(run)} | {run['concurrency']} | "
                     f"{run['num_prompts']} | {run['mean_acceptance']:.2f} | {run['tokens_per_second']:.1f} | {vs_ar} | "
                     f"{run['request_tokens_per_second'].get('p50', 0.0):.1f} | {spread(run['first_token_seconds'])} | "
                     f"{spread(run['latency_seconds'])} | {agree} | {stage_cell(run)} |")
    return lines


def plot(result: dict, prefix: str) -> list[str]:
    """PNG plots per temperature: τ and speedup against budget per dataset, and acceptance histograms
    (best budget vs chain). Written beside the results as PREFIX-budget-TT.png and PREFIX-histogram-TT.png."""
    import matplotlib  # (optional: the bench extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for temperature in sorted({r["temperature"] for r in result["runs"]}):
        runs = [r for r in result["runs"] if r["temperature"] == temperature]
        batched = [r for r in runs if "concurrency" in r]
        kinds = [("concurrency", plot_concurrency)] if batched else [("budget", plot_budgets), ("histogram", plot_histograms)]
        for kind, draw in kinds:
            fig = draw(plt, batched or runs)
            fig.suptitle(f"{result['device']}, T={temperature:g}")
            fig.tight_layout()
            written.append(f"{prefix}-{kind}-T{temperature:g}.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written


def plot_concurrency(plt, runs: list[dict]):
    """Throughput and median request latency against concurrency, a line per method, a row per dataset."""
    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(len(datasets), 2, figsize=(11, 3.8 * len(datasets)), squeeze=False)
    for row, name in zip(axes, datasets):
        for label in dict.fromkeys(method_label(r) for r in runs if r["dataset"] == name):
            mine = sorted((r for r in runs if r["dataset"] == name and method_label(r) == label),
                          key=lambda r: r["concurrency"])
            levels = [r["concurrency"] for r in mine]
            row[0].plot(levels, [r["tokens_per_second"] for r in mine], marker="o", label=label)
            row[1].plot(levels, [r["latency_seconds"]["p50"] for r in mine], marker="o", label=label)
        levels = sorted({r["concurrency"] for r in runs if r["dataset"] == name})
        for ax, ylabel in zip(row, ("throughput (new tokens/s)", "request latency p50 (s)")):
            ax.set_xscale("log", base=2)
            ax.set_xticks(levels, [str(level) for level in levels])
            ax.set_xlabel("concurrency (requests decoding at once)")
            ax.set_ylabel(ylabel)
            ax.set_title(name)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    return fig


def plot_budgets(plt, runs: list[dict]):
    """τ and speedup over ar against the tree budget, a line per dataset; chain DFlash dotted, auto dashed."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in sorted({r["dataset"] for r in runs}):
        trees = sorted((r for r in runs if r["dataset"] == name and r["method"] == "ddtree"
                        and isinstance(r["budget"], int)), key=lambda r: r["budget"])
        if not trees:
            continue
        budgets = [r["budget"] for r in trees]
        colour = axes[0].plot(budgets, [r["mean_acceptance"] for r in trees], marker="o", label=name)[0].get_color()
        if trees[0]["speedup_vs_ar"] is not None:
            axes[1].plot(budgets, [r["speedup_vs_ar"] for r in trees], marker="o", label=name, color=colour)
        for method, budget, style in (("dflash", None, ":"), ("ddtree", "auto", "--")):
            other = next((r for r in runs if r["dataset"] == name and (r["method"], r["budget"]) == (method, budget)),
                         None)
            if other is None:
                continue
            axes[0].axhline(other["mean_acceptance"], color=colour, linestyle=style, linewidth=1)
            if other["speedup_vs_ar"] is not None:
                axes[1].axhline(other["speedup_vs_ar"], color=colour, linestyle=style, linewidth=1)
    for ax, ylabel in zip(axes, ("mean acceptance length τ", "speedup over ar")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tree budget B (dotted: chain DFlash; dashed: auto)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def plot_histograms(plt, runs: list[dict]):
    """Per dataset, the share of rounds by tokens accepted: chain DFlash against the fastest DDTree budget."""
    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.5), squeeze=False)
    for ax, name in zip(axes[0], datasets):
        trees = [r for r in runs if r["dataset"] == name and r["method"] == "ddtree"]
        best = max(trees, key=lambda r: r["tokens_per_second"], default=None)
        chain = next((r for r in runs if r["dataset"] == name and r["method"] == "dflash"), None)
        for run, label in ((chain, "dflash"), (best, f"ddtree B={best['budget']}" if best else "")):
            if run:
                hist = {int(k): v for k, v in run["acceptance_histogram"].items()}
                total = sum(hist.values()) or 1
                ax.bar(list(hist), [v / total for v in hist.values()], alpha=0.5, label=label)
        ax.set_title(name)
        ax.set_xlabel("tokens accepted per round")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("share of rounds")
    return fig
