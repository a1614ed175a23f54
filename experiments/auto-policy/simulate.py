"""Replays recorded rounds (record.py) through the product's own `AutoBudget` and `AcceptanceModel` under
a table of GPU round costs: tokens per millisecond of auto and of every fixed size, auto's share of the
best fixed, and the sizes it chose. A probe's choice serves from two rounds on (one round is launched
before the probe is read), its tree costs the probed size's tree stage, and rounds teach the model the
nodes they verify, as in the product.
    .venv/bin/python experiments/auto-policy/simulate.py ROUNDS.pt [--costs alpaca]
Costs: milliseconds a round (draft + tree + verify + commit + host) and the tree stage alone, by size,
from the fixed budgets of the H100 sweep at 27b0401 (`archive/h100-sweep-t0-host-timed`; budget 2n stands for
auto's size 2n - 1, 7 nodes extrapolated).

On recordings of 12 prompts a set (record.py --datasets alpaca,gsm8k --limit 12, 502 and 467 rounds), auto ÷
the best fixed size (63 nodes on both) under Alpaca's costs: the rule of 27b0401 (probes at 1% of the time,
each probe alone deciding) 0.964 / 0.975, the sweep's 0.962 on Alpaca; probes at 0.5% 0.980 / 0.983; and
each size's expected tokens averaged over probes (a probe moving the average 0.3 of the way) 0.988 / 0.985,
the product's rule since. With the round costs the sweep's auto had learned (127 nodes 6.3% dearer than 63,
where its fixed runs show 8.8%: rounds timed by the host's reads), no rule passed 0.969 on Alpaca; rounds are
timed on the device since. Around the chosen constants (both sets, both cost tables): probes at 1% 0.969-0.984
smoothed; at 0.5% 0.985-0.993 with the average moving 0.2-0.3 a probe (0.978-0.983 unsmoothed); at 0.25%
0.989-0.993 (0.970-0.991 unsmoothed).
"""

import argparse
from collections import Counter

import torch

from ddtree import costs as C

ROUND_MS = {"alpaca": {7: 1.58, 15: 1.602, 31: 1.668, 63: 1.746, 127: 1.901, 255: 2.350},
            "gsm8k": {7: 1.61, 15: 1.638, 31: 1.700, 63: 1.785, 127: 1.950, 255: 2.363}}
TREE_MS = {7: 0.05, 15: 0.05, 31: 0.056, 63: 0.068, 127: 0.149, 255: 0.387}


def tokens(accepted: torch.Tensor, n: int) -> int:
    return 1 + int(accepted[:n].sum())


def replay(prompts: list, round_ms: dict[int, float]) -> tuple[float, Counter]:
    """auto over every prompt (a fresh generation each, as in the bench): tokens per ms, sizes chosen."""
    sizes = sorted(round_ms)
    fixed = [0.0] * 2
    table = C.RoundCosts(sizes, [128, 1024], fixed, {n: [round_ms[n] / 1000] * 2 for n in sizes},
                         {n: [TREE_MS[n] / 1000] * 2 for n in sizes}, {n: [TREE_MS[n] / 1000] * 2 for n in sizes})
    total_tokens, total_ms, chosen = 0, 0.0, Counter()
    for rounds in prompts:
        model = C.AcceptanceModel(sizes, torch.device("cpu"))
        auto, unread = C.AutoBudget(table, model), None
        for scores, _, accepted in rounds:
            probed, size = auto.probe_size(), auto.round_size()  # (this round's launch)
            if unread is not None:  # (then the round before is read: its probe chooses)
                values, seen = unread
                auto.choose(values, 128, seen)
                unread = None
            if probed is not None:
                yields = model.expected_yields(scores[:probed]).tolist()
                if auto.current is None:  # (the first round waits for its probe)
                    size = auto.choose(yields, 128, probed)
                else:
                    unread = yields, probed
                    size = size or auto.current
            ms = round_ms[size] + (TREE_MS[probed] - TREE_MS[size] if probed is not None else 0.0)
            chosen[size] += 1
            total_tokens += tokens(accepted, size)
            total_ms += ms
            auto.observe(size, 128, ms / 1000, probed)
            model.learn(scores[:size], accepted[:size])
    return total_tokens / total_ms, chosen


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("rounds")
    parser.add_argument("--costs", default="alpaca", choices=sorted(ROUND_MS))
    args = parser.parse_args()
    round_ms = ROUND_MS[args.costs]
    for dataset, prompts in torch.load(args.rounds).items():
        rounds = [r for p in prompts for r in p]
        speeds = {n: sum(tokens(a, n) for _, _, a in rounds) / (len(rounds) * ms) for n, ms in round_ms.items()}
        best = max(speeds.values())
        speed, chosen = replay(prompts, round_ms)
        print(f"{dataset:8s} {len(rounds)} rounds | fixed " + " ".join(f"{n}:{s / best:.3f}" for n, s in speeds.items())
              + f" | auto {speed / best:.3f} | chose " + " ".join(f"{n}:{k}" for n, k in sorted(chosen.items())))


main()
