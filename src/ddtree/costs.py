"""Round costs on this device, and `--budget auto`: the tree size chosen per round from them.

A round's expected yield under the drafter's factorised surrogate is 1 + Φ(n), Φ(n) being the sum
of the probabilities of the tree's n best prefixes; its cost is what this device takes for a round
with n nodes at this context length. `auto` builds the tree once at the largest size it may use,
reads Φ at every candidate size (one small copy to the host), and verifies the prefix of the tree
(nodes come in score order, so any prefix is a tree) whose size maximises Φ-yield per second.

Costs come from a calibration stored per device and model pair: every stage of a round timed at a
few context lengths, the verify stage at every candidate size (the sizes are graph shapes, so the
cost is a step function of n, measured rather than fitted). While decoding, measured round times correct the prediction per
size, so a calibration made under other load, or one slightly off, converges to what is true now.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

CALIBRATION_VERSION = 1
# Candidate tree sizes (nodes, root not counted): with the root, multiples of 4 rows on the CPU and of
# 8 on CUDA, shapes the matrix kernels handle well (on the 2-core CPU a 3-row forward took 112 ms and
# a 4-row one 75 ms). The CPU's verify cost rises steeply with width, so its sizes stop sooner.
AUTO_SIZES = {"cpu": (3, 7, 15, 31, 63), "cuda": (7, 15, 31, 63, 127, 255)}
# Context lengths at which the costs are measured; between them they are interpolated linearly.
CALIBRATION_CONTEXTS = {"cpu": (128, 1024), "cuda": (256, 2048)}


def device_key(engine) -> str:
    device = engine.device
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    graphs = "graphs" if engine.graphs.enabled else "eager"
    return f"{name}-torch{torch.__version__}-{str(engine.dtype).removeprefix('torch.')}-{graphs}"


def pair_key(engine) -> str:
    """The target's and drafter's shapes: what the costs depend on (not the weights' values)."""
    described = json.dumps([engine.target.name, engine.model.cfg.__dict__,
                            engine.drafter.cfg.to_json() if engine.drafter is not None else None],
                           sort_keys=True, default=str)
    return f"{engine.target.name}-{hashlib.sha256(described.encode()).hexdigest()[:12]}"


def calibration_path(engine) -> str:
    from .loading import cache_root

    safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{device_key(engine)}--{pair_key(engine)}")
    return os.path.join(cache_root(), "calibration", safe + ".json")


@dataclass
class RoundCosts:
    """Seconds per round stage: `fixed[context]` (draft, tree at the largest size, commit, host) and
    `verify[size][context]`, measured at `contexts`."""

    sizes: list[int]
    contexts: list[int]
    fixed: list[float]
    verify: dict[int, list[float]]

    def predict(self, size: int, context: int) -> float:
        return interpolate(self.contexts, self.fixed, context) + interpolate(self.contexts, self.verify[size], context)

    def to_json(self) -> dict:
        return {"sizes": self.sizes, "contexts": self.contexts, "fixed": self.fixed,
                "verify": {str(k): v for k, v in self.verify.items()}}

    @classmethod
    def from_json(cls, data: dict) -> "RoundCosts":
        """Raises ValueError on anything that is not a complete, sane calibration."""
        sizes, contexts = [int(s) for s in data["sizes"]], [int(c) for c in data["contexts"]]
        fixed = [float(x) for x in data["fixed"]]
        verify = {int(k): [float(x) for x in v] for k, v in data["verify"].items()}
        numbers = fixed + [x for v in verify.values() for x in v]
        if (not sizes or sorted(verify) != sorted(sizes) or len(fixed) != len(contexts)
                or any(len(v) != len(contexts) for v in verify.values())
                or contexts != sorted(set(contexts))
                or not all(math.isfinite(x) and x > 0 for x in numbers)):
            raise ValueError("incomplete or invalid calibration")
        return cls(sizes, contexts, fixed, verify)


def interpolate(xs: list[int], ys: list[float], x: float) -> float:
    """Piecewise linear in x through (xs, ys), extended linearly past the ends (never below 0)."""
    if len(xs) == 1:
        return ys[0]
    i = max(0, min(len(xs) - 2, next((k for k in range(len(xs) - 1) if x <= xs[k + 1]), len(xs) - 2)))
    slope = (ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i])
    return max(0.0, ys[i] + slope * (x - xs[i]))


# ----- measuring ------------------------------------------------------------------------------------


def time_stage(engine, run, repeats: int) -> float:
    """Median seconds of one call of `run` (a stage through the graph cache), after two untimed calls
    (the first also captures the graph on CUDA)."""
    runs = []
    for _ in range(repeats + 2):
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        started = time.perf_counter()
        run()
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
        runs.append(time.perf_counter() - started)
    return statistics.median(runs[2:])


def calibrate(engine, sizes: tuple[int, ...] | None = None, contexts: tuple[int, ...] | None = None,
              repeats: int = 5) -> RoundCosts:
    """Times every stage of a ddtree round at each context length, and the verify at every size.

    Each shape runs twice untimed first: a new shape's first runs pay one-off costs (kernel choice,
    allocation; on the CPU a first pass over the sizes measured up to a third slow)."""
    from .engine import Generation
    from .sampling import SamplingParams
    from .stopping import StopChecker
    from .tree import tree_size

    kind = engine.device.type
    depth = engine.drafter.cfg.block_size - 1
    vocab = engine.model.cfg.vocab_size
    sizes = sorted({tree_size(s, depth, vocab) for s in (sizes or AUTO_SIZES.get(kind, AUTO_SIZES["cuda"]))})
    contexts = sorted(c for c in (contexts or CALIBRATION_CONTEXTS.get(kind, CALIBRATION_CONTEXTS["cuda"]))
                      if c + max(sizes) + depth + 2 < engine.context_limit) or [min(64, engine.context_limit // 4)]
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(vocab, (max(contexts),), generator=generator).tolist()
    fixed, verify = [], {size: [] for size in sizes}
    bar = tqdm(total=len(contexts) * (len(sizes) + 1), desc="calibrating round costs", unit="stage",
               file=sys.stderr)
    with torch.inference_mode():
        for context in contexts:
            stopper = StopChecker(engine.tokenizer, set(), [], 8)
            gen = Generation(engine, prompt[:context], "ddtree", max(sizes), SamplingParams(), None, stopper)
            gen.prefill()
            ws = gen.workspace
            seconds = time_stage(engine, lambda: gen.run_draft(ws.draft_attend(context)), repeats)
            largest = ws.tree(max(sizes) + 1, engine)
            plan = ws.plan(max(sizes))
            seconds += time_stage(engine, lambda: gen.run_tree(largest, plan), repeats)
            seconds += commit_and_host_seconds(engine, gen, largest, repeats)
            fixed.append(seconds)
            bar.update(1)
            for size in sizes:
                tree = ws.prefix(largest, size + 1, engine)
                verify[size].append(time_stage(engine, lambda: gen.run_verify(tree, ws.attend(context + tree.size)),
                                               repeats))
                bar.update(1)
    bar.close()
    # Every candidate size is measured, so no curve is fitted over sizes: the cost is a step function of
    # the shape (graph buckets, matrix-kernel choices), and need not even rise with the size.
    return RoundCosts(sizes, contexts, fixed, verify)


def commit_and_host_seconds(engine, gen, tree, repeats: int) -> float:
    """A commit (its state restored after each) plus reading the round's result on the host."""
    ws = gen.workspace
    saved = [t.clone() for t in (ws.committed, ws.pending_start, ws.bonus)]
    runs = []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        gen.run_commit(tree)
        tree.out.tolist()
        runs.append(time.perf_counter() - started)
        for live, value in zip((ws.committed, ws.pending_start, ws.bonus), saved):
            live.copy_(value)
    return statistics.median(runs[2:])


def load_or_calibrate(engine, force: bool = False) -> RoundCosts:
    """The stored calibration for this device and pair; made (and stored) when missing, stale or corrupt."""
    path = calibration_path(engine)
    if not force:
        try:
            with open(path) as f:
                data = json.load(f)
            if data.get("version") != CALIBRATION_VERSION or data.get("device") != device_key(engine) \
                    or data.get("pair") != pair_key(engine):
                raise ValueError("made for another version, device or pair")
            return RoundCosts.from_json(data["costs"])
        except FileNotFoundError:
            print("ddtree: first use of --budget auto on this device and model pair: calibrating "
                  f"(stored in {path})", file=sys.stderr)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"ddtree: recalibrating: the stored calibration {path} is unusable ({exc})", file=sys.stderr)
    costs = calibrate(engine)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump({"version": CALIBRATION_VERSION, "device": device_key(engine), "pair": pair_key(engine),
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "costs": costs.to_json()}, f,
                  indent=1)
    os.replace(temporary, path)  # readers never see half a file
    return costs


def costs_table(costs: RoundCosts) -> str:
    """Milliseconds per round at each calibrated context: the fixed part, and fixed + verify per size."""
    head = ["nodes"] + [f"ms at context {c}" for c in costs.contexts]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines.append("| (draft + tree + commit + host) | " + " | ".join(f"{1000 * x:.2f}" for x in costs.fixed) + " |")
    for size in costs.sizes:
        cells = [f"{1000 * (f + v):.2f}" for f, v in zip(costs.fixed, costs.verify[size])]
        lines.append(f"| {size} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----- choosing ---------------------------------------------------------------------------------------


@dataclass
class AutoBudget:
    """Chooses each round's tree size, and learns from every round it runs.

    Two corrections are learned online (exponential averages): the drafter's surrogate is
    overconfident (on SmolLM2 the accepted tokens beyond the bonus were 0.73-0.82 of Φ at every size),
    so one factor scales Φ by what rounds really accept; and each size's cost is scaled by measured
    over predicted round time. (A factor common to all sizes would never change the choice, so
    sizes not yet run keep their calibrated cost.) Every EXPLORE-th round tries a size next to the
    best, so an estimate that is too pessimistic gets corrected too."""

    costs: RoundCosts
    correction: dict[int, float] = field(default_factory=dict)  # measured / predicted round time
    confidence: float = 1.0  # accepted beyond the bonus token / Φ of the chosen size
    rounds: int = 0

    EXPLORE = 16

    @property
    def largest(self) -> int:
        return max(self.costs.sizes)

    def rate(self, size: int, expected: float, context: int) -> float:
        cost = self.costs.predict(size, context) * self.correction.get(size, 1.0)
        return (1 + self.confidence * (expected - 1)) / cost

    def choose(self, yields: list[float], context: int) -> int:
        """The size maximising expected tokens per second; `yields[k]` is 1 + Φ(sizes[k])."""
        sizes = self.costs.sizes
        best = max(range(len(sizes)), key=lambda k: self.rate(sizes[k], yields[k], context))
        self.rounds += 1
        if self.rounds % self.EXPLORE == 0:  # a neighbour, alternately smaller and larger
            step = -1 if (self.rounds // self.EXPLORE) % 2 else 1
            best = min(max(best + step, 0), len(sizes) - 1)
        return sizes[best]

    def observe(self, size: int, context: int, seconds: float, accepted: int, expected: float) -> None:
        """A finished round: its size, context, wall time, tokens added and the 1 + Φ it was chosen for."""
        predicted = self.costs.predict(size, context)
        if predicted > 0 and seconds > 0:
            ratio = min(max(seconds / predicted, 0.25), 4.0)  # one stalled round must not swing it far
            self.correction[size] = 0.9 * self.correction.get(size, 1.0) + 0.1 * ratio
        if expected > 1:
            share = min(max((accepted - 1) / (expected - 1), 0.1), 2.0)
            self.confidence = 0.95 * self.confidence + 0.05 * share
