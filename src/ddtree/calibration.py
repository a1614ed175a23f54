"""Measuring `auto`'s round costs on this device, and keeping them: one calibration per device and model
pair, stored as JSON under the cache directory, remade when missing, stale or corrupt.

Each stage of a ddtree round is timed at a few context lengths, and every candidate size is measured
(the sizes are graph shapes, and the cost is a step function of the size: measured, not fitted), for
each batch size rounds run at (powers of two: a round of 8 sequences costs what it costs, not 8 times a
round of one). The stages timed are exactly the ones `auto` replays: each size's tree, as the first rows
of the largest, built plainly and as a probe; in a batch, the shared budget's trees, cut and packed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .costs import CALIBRATION_CONTEXTS, RoundCosts, probe_above
from .loading import cache_root
from .stages import Stages

# Bumped when round costs change under the same device key (3: the tree kernel's warp count by tree size;
# 4: the tighter frontier and the histogram top-k; 5: the stages timed are auto's own, scoring included;
# 6: a probe at every size, and each size's tree stage alone; 7: costs per batch size; 8: a batch's costs
# those of its shared budget; 9: a probe's expected tokens read after its round, not within it; 10: the least
# of the repeats, after the device is warmed up; 11: sizes timed dearer than a larger one timed again).
CALIBRATION_VERSION = 11
# Seconds of drafting before anything is timed: a GPU left idle (graph captures, loading) clocks down.
WARM_UP_SECONDS = 0.5
# A larger tree holds every smaller one, so a size timed this much dearer than a larger one was likely
# disturbed (another process on the device): it is timed again, at most RETIMES more times. (On the CPU a
# 4-row round can really cost a tenth more than a 16-row one.) Still BUSY times dearer, the user is warned.
DISTURBED = 1.15
RETIMES = 2
BUSY = 1.5


@dataclass(frozen=True)
class CalibrationKey:
    """What round costs depend on: the device and how the engine runs on it, and the models' shapes."""
    device: str
    pair: str

    @property
    def path(self) -> str:
        safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in f"{self.device}--{self.pair}")
        return os.path.join(cache_root(), "calibration", safe + ".json")


def device_description(device: torch.device, dtype: torch.dtype, graphs: bool, compiled: str | None,
                       tree_kernel: bool, bf16_products: bool = False) -> str:
    """The device and the engine's settings that change round costs (`compiled`: the compile mode;
    `bf16_products`: the layers' products with bfloat16 weights)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}-{os.cpu_count()}cores"
    return (f"{name}-torch{torch.__version__}-{str(dtype).removeprefix('torch.')}-{'graphs' if graphs else 'eager'}"
            f"{f'-compiled-{compiled}' if compiled else ''}{'-treekernel' if tree_kernel else ''}"
            f"{'-bf16products' if bf16_products else ''}")


def pair_description(target_name: str, model_cfg, drafter_cfg, drafted_vocab: int | None = None) -> str:
    """The target's and drafter's shapes (not their weights' values) and the drafted vocabulary's size, hashed."""
    shapes = [target_name, model_cfg.__dict__, drafter_cfg.to_json() if drafter_cfg else None]
    if drafted_vocab not in (None, model_cfg.vocab_size):  # (the whole vocabulary keeps the keys made before)
        shapes.append(drafted_vocab)
    described = json.dumps(shapes, sort_keys=True, default=str)
    return f"{target_name}-{hashlib.sha256(described.encode()).hexdigest()[:12]}"


def time_stage(run, device: torch.device, repeats: int) -> float:
    """The least seconds of one call of `run` over `repeats`, after two untimed calls (the first also captures
    the graph on CUDA; a new shape's first runs pay one-off costs, on the CPU up to a third more). The least:
    interference only adds, and decoding corrects each size's cost by what its rounds really take, but a
    size calibrated too dear would never be run to be corrected."""
    runs = []
    for _ in range(repeats + 2):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        runs.append(time.perf_counter() - started)
    return min(runs[2:])


def warm_up(run, device: torch.device, seconds: float = WARM_UP_SECONDS) -> None:
    """On CUDA, calls `run` for `seconds`, so that the GPU runs at its working clocks when timing starts."""
    if device.type != "cuda":
        return
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        torch.cuda.synchronize(device)


def calibration_contexts(device: torch.device, largest_rows: int, block: int, context_limit: int) -> list[int]:
    """The context lengths to measure at: the device's usual ones that fit, or one short one."""
    wanted = CALIBRATION_CONTEXTS.get(device.type, CALIBRATION_CONTEXTS["cuda"])
    return sorted(c for c in wanted if c + largest_rows + block + 1 < context_limit) or [min(64, context_limit // 4)]


def calibrate(stages: Stages, sizes: list[int], contexts: list[int], taps: tuple[int, ...], draft_depth: int,
              count: int = 1, repeats: int = 5) -> RoundCosts:
    """Times rounds of `count` sequences (each at the same context) as auto runs them (`auto_round`): the draft
    at each context length, and for every size the trees, the same trees as probes (with the expected tokens
    of every smaller size), their verify, and their commit and host read."""
    ws, device = stages.ws, stages.ws.device
    vocab = ws.log_probs.shape[-1]
    prompt = torch.randint(vocab, (max(contexts),), generator=torch.Generator().manual_seed(0)).tolist()
    fixed, tables = [], {name: {size: [] for size in sizes} for name in ("per_size", "tree", "probe")}
    bar = tqdm(total=len(contexts) * len(sizes), desc=f"calibrating round costs, batch {count}", unit="size",
               file=sys.stderr)
    with torch.inference_mode():
        for context in contexts:
            for index in range(count):
                ws.load_prompt(prompt[:context], index)
                stages.prefill(ws.prefill_rows(context), taps, index).run()
            draft = stages.draft(count, ws.draft_attend(context), draft_depth, chain=False, tree=True)
            warm_up(draft.run, device)
            fixed.append(time_stage(draft.run, device, repeats))
            measured = time_sizes(stages, sizes, context, taps, count, repeats, bar)
            for size in sizes:
                for name, seconds in zip(("probe", "tree", "per_size"), measured[size]):
                    tables[name][size].append(seconds)
    bar.close()
    for index in range(count):
        ws.free(index)
    return RoundCosts(sizes, contexts, fixed, tables["per_size"], tables["tree"], tables["probe"])


def time_sizes(stages: Stages, sizes: list[int], context: int, taps: tuple[int, ...], count: int, repeats: int,
               bar: tqdm) -> dict[int, tuple[float, float, float]]:
    """Each size's probe, tree stage and whole round at `context`, the sizes that read dearer than a larger
    one timed again (the least of each kept); a warning if some still read far dearer."""
    measured: dict[int, tuple[float, float, float]] = {}
    pending = sizes
    for attempt in range(1 + RETIMES):
        if attempt:
            bar.total += len(pending)
        for size in pending:
            times = time_size(stages, sizes, size, context, taps, count, repeats)
            measured[size] = tuple(map(min, zip(measured[size], times))) if size in measured else times
            bar.update(1)
        rounds = {size: times[2] for size, times in measured.items()}
        pending = disturbed(rounds, DISTURBED)
        if not pending:
            return measured
    if busy := disturbed(rounds, BUSY):
        print(f"ddtree: warning: calibrating at context {context}, rounds of {', '.join(map(str, busy))} nodes still "
              "read far dearer than larger ones when timed again: the device looks busy, and auto's choices may be "
              "off. Calibrate again when it is idle: ddtree profile --calibrate", file=sys.stderr)
    return measured


def disturbed(rounds: dict[int, float], factor: float) -> list[int]:
    """The sizes whose round reads more than `factor` times a larger size's."""
    sizes = sorted(rounds)
    return [size for k, size in enumerate(sizes[:-1]) if rounds[size] > factor * min(rounds[s] for s in sizes[k + 1:])]


def time_size(stages: Stages, sizes: list[int], size: int, context: int, taps: tuple[int, ...], count: int,
              repeats: int) -> tuple[float, float, float]:
    """Seconds of a size's probe, of its tree stage, and of its whole round (tree, verify, commit, host read)."""
    ws, device = stages.ws, stages.ws.device
    tree, build, probe, packed = auto_round(stages, sizes, size, count)
    probed = time_stage(probe, device, repeats)
    built = time_stage(build, device, repeats)  # (before the verify: it sets the rows the verify packs)
    verify = time_stage(stages.verify(tree, ws.attend(context + tree.rows), taps, packed).run, device, repeats)
    return probed, built, built + verify + commit_seconds(stages, tree, repeats)


def auto_round(stages: Stages, sizes: list[int], size: int, count: int):
    """What auto runs for `size` nodes a sequence in a round of `count` sequences (`methods.AutoTree`): the
    trees it verifies, their tree stage, a probe at this size (with its expected tokens), and the
    rows the verify packs them into. Alone, the tree of `size` nodes; in a batch, one budget of `count * size`
    nodes: every tree built a size larger, the best nodes of all kept, the kept rows verified packed."""
    ws = stages.ws
    if count == 1:
        ws.auto_yields(len(sizes))  # (made before the probe's graph capture)
        tree_stage = stages.tree(1, None, "tree", ws.plan(size), scored=True)
        probe = stages.tree(1, None, "tree", ws.plan(size), scored=True, probe=True)
        return ws.tree(1, size + 1), tree_stage.run, probe.run, None
    ws.pooled_yields(len(sizes))
    built = probe_above(sizes, size)
    tree_stage, share = stages.tree(count, None, "tree", ws.plan(built), scored=True), stages.share(count, count * size)
    probe, pool = stages.tree(count, None, "tree", ws.plan(size), scored=True), stages.pool(count)
    return (ws.tree(count, built + 1), lambda: (tree_stage.run(), share.run()),
            lambda: (probe.run(), pool.run()), count * (size + 1))


def commit_seconds(stages: Stages, tree, repeats: int) -> float:
    """A commit and the host's read of its result, the decoding state restored after each."""
    ws, commit = stages.ws, stages.commit(tree, learn=True)
    state = (ws.committed, ws.pending_start, ws.bonus)
    saved = [t.clone() for t in state]

    def run():
        commit.run()
        tree.out.tolist()
        for live, value in zip(state, saved):
            live.copy_(value)
    return time_stage(run, ws.device, repeats)


def load_or_calibrate(key: CalibrationKey, measure, counts: list[int], force: bool = False) -> dict[int, RoundCosts]:
    """The costs for `key` at each batch size in `counts`, stored or made by `measure(count)` (and stored
    with the others) when missing, stale, corrupt or `force`d. A cache that cannot be written costs a
    warning: the costs are used all the same."""
    stored: dict[int, RoundCosts] = {}
    if not force:
        try:
            stored = read(key)
        except FileNotFoundError:
            print("ddtree: first use of --budget auto on this device and model pair: calibrating", file=sys.stderr)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            print(f"ddtree: recalibrating: the stored calibration is unusable ({exc})", file=sys.stderr)
    missing = [count for count in counts if count not in stored]
    if missing:
        stored.update({count: measure(count) for count in missing})
        try:
            store(key, stored)
        except OSError as exc:
            print(f"ddtree: warning: the calibration could not be stored ({exc.strerror or exc}); it is kept for "
                  "this process only", file=sys.stderr)
    return {count: stored[count] for count in counts}


def read(key: CalibrationKey) -> dict[int, RoundCosts]:
    """The stored costs by batch size; raises ValueError on a file for another version, device or pair."""
    with open(key.path) as f:
        data = json.load(f)
    if data.get("version") != CALIBRATION_VERSION or data.get("device") != key.device or data.get("pair") != key.pair:
        raise ValueError("made for another version, device or pair")
    costs = {int(count): RoundCosts.from_json(table) for count, table in data["batches"].items()}
    if len({tuple(c.sizes) for c in costs.values()}) > 1:
        raise ValueError("batch sizes calibrated for different tree sizes")
    return costs


def store(key: CalibrationKey, costs: dict[int, RoundCosts]) -> None:
    os.makedirs(os.path.dirname(key.path), exist_ok=True)
    temporary = f"{key.path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump({"version": CALIBRATION_VERSION, "device": key.device, "pair": key.pair,
                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                   "batches": {str(count): table.to_json() for count, table in sorted(costs.items())}}, f, indent=1)
    os.replace(temporary, key.path)  # readers never see half a file
