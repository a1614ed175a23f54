"""The drafter-training recipe: prompts -> the target's answers (greedy and sampled) -> training -> a model card.

`ddtree prompts`, `ddtree regenerate` and `ddtree train-drafter --data` run one phase each;
`ddtree train-drafter --target T --out DIR` runs them all into DIR (`run_recipe`). Each phase is skipped
when its output is there, and training resumes from its last checkpoint, so the same command, called
again after a time limit or a lost session, goes on where the last call stopped.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from dataclasses import dataclass, replace

import torch

from .api import random_drafter
from .data import SequenceFile, training_prompts
from .drafter import Drafter, load_drafter
from .engine import Engine, check_pair
from .errors import DDTreeError
from .evalsets import read_jsonl, write_jsonl
from .loading import Target
from .modelcard import write_model_card
from .regenerate import regenerate
from .train import METRICS_NAME, TrainConfig, train

PROMPTS_FILE = "prompts.jsonl"
GREEDY_FILE = "data-greedy.npz"
SAMPLED_FILE = "data-sampled.npz"
DRAFTER_DIR = "drafter"
SECONDS_FILE = "phase-seconds.json"  # wall time per phase, summed over calls, for the model card


@dataclass
class DrafterShape:
    """The drafter training starts from: `init`'s weights, or a random one of this shape."""
    layers: int
    block_size: int
    target_layer_ids: list[int] | None
    init: str | None = None

    def make(self, target: Target, seed: int) -> Drafter:
        device = target.model.embed_tokens.weight.device
        if self.init:
            drafter = load_drafter(self.init, device, torch.float32)
        else:
            drafter = random_drafter(target, self.layers, self.block_size, None, self.target_layer_ids, seed)
            drafter = drafter.to(dtype=torch.float32)
        check_pair(target, drafter)
        return drafter


@dataclass
class Recipe:
    """What `ddtree train-drafter --target T --out DIR` without --data runs."""
    target: str
    out: str
    prompts: str | None  # the user's prompts file; None collects them as `ddtree prompts` does
    data_dir: str | None  # the evaluation sets the collected prompts must not overlap
    sampled_share: float  # the share of the prompts also answered at temperature 1
    max_new_tokens: int
    regenerate_batch_size: int
    command: str


def regenerate_file(engine: Engine, rows: list[dict], out: str, max_new_tokens: int, batch_size: int,
                    temperature: float, seed: int, rank: int = 0) -> dict:
    """The target's answers to `rows`' prompts (through its chat template), saved as prompt+response ids."""
    prompts = [engine.encode(row["prompt"], chat=True) for row in rows]
    responses = regenerate(engine.target, prompts, max_new_tokens, batch_size, temperature, seed)
    if rank == 0:
        SequenceFile.save(out, [p + r for p, r in zip(prompts, responses)], [len(p) for p in prompts])
    ended = sum(bool(r) and r[-1] in engine.target.eos_token_ids for r in responses)
    return {"sequences": len(rows), "response_tokens": sum(map(len, responses)), "ended": ended}


class Deadline:
    """The call's time limit (--max-minutes), which every phase checks before it starts."""

    def __init__(self, max_minutes: float | None):
        self.max_minutes, self.started = max_minutes, time.monotonic()

    def minutes_left(self) -> float | None:
        if self.max_minutes is None:
            return None
        return self.max_minutes - (time.monotonic() - self.started) / 60

    def passed(self) -> bool:
        left = self.minutes_left()
        return left is not None and left <= 0


def write_atomically(path: str, write) -> None:
    """`write(partial)`, then a rename: an interrupted phase leaves no file that looks finished."""
    folder, name = os.path.split(path)
    partial = os.path.join(folder, "." + name)  # the same suffix: numpy's savez appends .npz otherwise
    write(partial)
    os.replace(partial, path)


def add_seconds(out: str, phase: str, seconds: float) -> dict:
    path = os.path.join(out, SECONDS_FILE)
    totals = {}
    if os.path.isfile(path):
        with open(path) as f:
            totals = json.load(f)
    totals[phase] = totals.get(phase, 0.0) + seconds
    with open(path, "w") as f:
        json.dump(totals, f, indent=1)
    return totals


def sampled_rows(rows: list[dict], share: float, seed: int) -> list[dict]:
    """A seeded `share` of the prompts, in file order (the file runs source by source, so not its head)."""
    picked = random.Random(seed).sample(range(len(rows)), round(share * len(rows)))
    return [rows[i] for i in sorted(picked)]


def run_recipe(recipe: Recipe, engine: Engine, shape: DrafterShape, cfg: TrainConfig, log=print) -> dict | None:
    """Every phase not yet done, within `cfg.max_minutes` of this call: the final metrics row once the
    drafter is trained and its card written, None when time ran out first."""
    os.makedirs(recipe.out, exist_ok=True)
    deadline = Deadline(cfg.max_minutes)
    phases = [(PROMPTS_FILE, lambda path: collect_prompts(recipe, path, log)),
              (GREEDY_FILE, answer_phase(recipe, engine, 0.0, 1.0, cfg.seed, log)),
              (SAMPLED_FILE, answer_phase(recipe, engine, 1.0, recipe.sampled_share, cfg.seed, log))]
    for name, write in phases:
        path = os.path.join(recipe.out, name)
        if os.path.exists(path):
            log(f"{name}: done in an earlier call, skipped")
            continue
        if deadline.passed():
            return out_of_time(recipe, cfg, log)
        log(f"{name}: writing")
        started = time.monotonic()
        write_atomically(path, write)
        add_seconds(recipe.out, name, time.monotonic() - started)
    if deadline.passed():
        return out_of_time(recipe, cfg, log)
    final = train_phase(recipe, engine.target, shape, replace(cfg, max_minutes=deadline.minutes_left()), log)
    return final or out_of_time(recipe, cfg, log)


def collect_prompts(recipe: Recipe, path: str, log) -> None:
    if recipe.prompts:
        rows = read_jsonl(recipe.prompts)
    else:
        rows, report = training_prompts(recipe.data_dir)
        log(json.dumps({"prompts": len(rows), "sources": report}))
    if not rows:
        raise DDTreeError(f"no prompts in {recipe.prompts}")
    write_jsonl(rows, path)


def answer_phase(recipe: Recipe, engine: Engine, temperature: float, share: float, seed: int, log):
    """The phase that writes the target's answers at `temperature` to a `share` of the prompts."""
    def write(path: str) -> None:
        rows = sampled_rows(read_jsonl(os.path.join(recipe.out, PROMPTS_FILE)), share, seed)
        summary = regenerate_file(engine, rows, path, recipe.max_new_tokens, recipe.regenerate_batch_size,
                                  temperature, seed)
        log(json.dumps(summary))
    return write


def train_phase(recipe: Recipe, target: Target, shape: DrafterShape, cfg: TrainConfig, log) -> dict | None:
    """Training into DIR/drafter, resumed from its train_state.pt, then the model card: the last held-out
    evaluation, or None when the time limit stopped training first."""
    drafter_dir = os.path.join(recipe.out, DRAFTER_DIR)
    paths = [os.path.join(recipe.out, name) for name in (GREEDY_FILE, SAMPLED_FILE)]
    sequences, starts = SequenceFile.load(paths)
    drafter = shape.make(target, cfg.seed)
    started = time.monotonic()
    record = train(target, drafter, sequences, starts, drafter_dir, cfg, resume=True, log=log)
    seconds = add_seconds(recipe.out, "training", time.monotonic() - started)
    if record["step"] < record["total_steps"]:
        return None
    metrics = read_jsonl(os.path.join(drafter_dir, METRICS_NAME))
    card = write_model_card(drafter_dir, card_facts(recipe, target, drafter, cfg, seconds), metrics, cfg.eval_budgets)
    log(f"model card: {card}")
    return [r for r in metrics if "chain_tau" in r][-1]


def out_of_time(recipe: Recipe, cfg: TrainConfig, log) -> None:
    log(f"stopped: this call has run its {cfg.max_minutes:g} minutes (--max-minutes); finished phases and the "
        f"last checkpoint are in {recipe.out}. Continue with the same command: {recipe.command}")


def card_facts(recipe: Recipe, target: Target, drafter: Drafter, cfg: TrainConfig, seconds: dict) -> dict:
    """What the model card says about the run, besides its metrics."""
    rows = read_jsonl(os.path.join(recipe.out, PROMPTS_FILE))
    sources = Counter(row.get("source", os.path.basename(recipe.prompts or "given")) for row in rows)
    device = target.model.embed_tokens.weight.device
    shape = drafter.cfg
    return {
        "target": target.name, "target_spec": recipe.target,
        "command": recipe.command,
        "drafter": f"block size {shape.block_size}, {shape.num_layers} decoder layer(s) reading target layers "
                   f"{','.join(map(str, shape.target_layer_ids))}",
        "prompts": f"{len(rows)} prompts (" + ", ".join(f"{n} {s}" for s, n in sources.items()) + ")",
        "greedy": answers_summary(os.path.join(recipe.out, GREEDY_FILE)),
        "sampled": answers_summary(os.path.join(recipe.out, SAMPLED_FILE)),
        "config": ", ".join(f"{k} {v}" for k, v in (("epochs", cfg.epochs), ("batch size", cfg.batch_size),
                                                     ("anchors", cfg.anchors), ("lr", cfg.lr))),
        "wall_time": f"{duration(sum(seconds.values()))} in all, over every call (" + ", ".join(
            f"{phase} {duration(s)}" for phase, s in seconds.items()) + ")",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
    }


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def answers_summary(path: str) -> str:
    sequences, starts = SequenceFile.load([path])
    tokens = sum(len(s) - start for s, start in zip(sequences, starts))
    return f"{len(sequences)} answers, {tokens} response tokens"
