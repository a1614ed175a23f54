"""Replays recorded rounds (record.py) under a table of round costs to compare `auto`'s ways of choosing
the tree size with every fixed size: tokens per second of each, and auto's share of the best fixed.
Costs are milliseconds per round by size, from committed GPU results (below).
    .venv/bin/python experiments/auto-policy/simulate.py ROUNDS.pt
On 6 recordings a set (record.py --limit 6, the embedded pair in fp32 on the CPU, commit 6eaa669), auto
÷ the best fixed size (63 nodes on every set): probing the largest tree at 2% (the old rule) 0.972-0.983,
the H200's measured 0.97 / 0.96 on GSM8K / MT-Bench; one size above the choice at 1% 0.986-0.993, at
0.5% 0.988-0.994; averaging each size's expected tokens over probes 0.953-0.991 (it loses the drift of
the text from one stretch to the next). Only 1% and the one-size probe went into the product.
A probe read with its round's outcome (3589212: the probe round verifies the size chosen before, no
mid-round read, the choice serving two rounds later as one round is launched ahead), on recordings of
the same kind (record.py --limit 6, an earlier session): 0.980-0.995 against 0.986-0.993 read mid-round, the same within
the recordings' noise; on the GPU it takes the host's read out of the round.
"""

import math
import sys

import torch

from ddtree import costs as C

SIZES = list(C.AUTO_SIZES["cuda"])
# ms per round (draft + tree + verify + commit/host) and the tree stage alone, by size: sizes 15-255 from
# docs/results/h200-sweep.md (GSM8K, B=16..256, tree stage of h100-issue18 for 31/63), 7 extrapolated
ROUND_MS = {7: 1.76, 15: 1.79, 31: 1.75, 63: 1.83, 127: 2.14, 255: 2.63}
TREE_MS = {7: 0.05, 15: 0.05, 31: 0.06, 63: 0.07, 127: 0.24, 255: 0.61}
READ_MS = 0.05  # a probe's mid-round host read


def tokens(accepted, n):
    return 1 + int(accepted[:n].sum())


def fixed(rounds, n):
    t = sum(tokens(a, n) for _, a in rounds)
    return t / (len(rounds) * ROUND_MS[n])


def policy(rounds, local, share, smooth=1.0, delay=0):
    """auto: probe (the largest tree, or one size above the current), choose by expected tokens per ms;
    `smooth` < 1 averages each size's expected tokens over probes (worse: it loses the text's drift).
    `delay` > 0: a probe round verifies the size chosen before it, without the mid-round host read, and
    its choice serves from `delay` rounds on (the product's since 3589212: read with the round's outcome,
    one round launched ahead)."""
    model = C.AcceptanceModel(SIZES, torch.device("cpu"))
    cost = ROUND_MS
    current, until, total_tokens, total_ms, chosen = None, 0, 0, 0.0, []
    averaged = [None] * len(SIZES)
    pending = []  # (round it serves from, size) of deferred choices
    for index, (scores, accepted) in enumerate(rounds):
        while pending and pending[0][0] <= index:
            current = pending.pop(0)[1]
        until -= 1
        extra = 0.0
        if current is None or (until < 0 and not pending):
            verified = current
            probe = max(SIZES) if (current is None or not local) else SIZES[min(SIZES.index(current) + 1, len(SIZES) - 1)]
            fresh = model.expected_yields(scores[:probe].clone() if probe < len(scores) else scores).tolist()
            options = [n for n in SIZES if n <= probe]
            for n in options:  # an average over probes: one round's tree is a noisy sample
                k = SIZES.index(n)
                averaged[k] = fresh[k] if averaged[k] is None else averaged[k] + smooth * (fresh[k] - averaged[k])
            choice = max(options, key=lambda n: averaged[SIZES.index(n)] / cost[n])
            if delay and verified is not None:
                pending.append((index + 1 + delay - 1, choice))
                extra = TREE_MS[probe] - TREE_MS[verified]
            else:
                current = choice
                extra = TREE_MS[probe] - TREE_MS[current] + READ_MS
            interval = math.ceil(max(extra, 1e-9) / (share * ROUND_MS[choice])) if local else \
                math.ceil((TREE_MS[max(SIZES)] + READ_MS) / (share * min(ROUND_MS.values())))
            until = max(1, min(C.MAX_PROBE_INTERVAL, interval)) - 1
        n = current
        chosen.append(n)
        total_tokens += tokens(accepted, n)
        total_ms += ROUND_MS[n] + extra
        model.learn(scores[:n], accepted[:n])
    return total_tokens / total_ms, chosen


def main():
    records = torch.load(sys.argv[1])
    for dataset, prompts in records.items():
        rounds = [r for p in prompts for r in p if len(r[0]) == max(SIZES)]
        speeds = {n: fixed(rounds, n) for n in SIZES}
        best = max(speeds.values())
        line = " ".join(f"{n}:{s / best:.3f}" for n, s in speeds.items())
        results = []
        for name, local, share, smooth, delay in (("largest 2%", False, 0.02, 1, 0), ("local 1%", True, 0.01, 1, 0),
                                                  ("local 1% read after", True, 0.01, 1, 1),
                                                  ("read 2 rounds after", True, 0.01, 1, 2)):
            speed, chosen = policy(rounds, local, share, smooth=smooth, delay=delay)
            results.append(f"{name} {speed / best:.3f}")
        print(f"{dataset:10s} {len(rounds)} rounds | fixed {line} | " + " | ".join(results))


main()
