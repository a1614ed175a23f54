"""Records, for `auto`'s policy study, every round of the embedded pair verifying auto's largest tree
(255 nodes) on the CPU in fp32: each node's path log-probability, best first, and whether it was
accepted. A best-first prefix of n nodes is the best n-node tree, and the accepted path within it is
the full tree's path cut at the prefix, so one round tells how many tokens every size would have added.
    .venv/bin/python experiments/auto-policy/record.py OUT.pt [--datasets gsm8k,mt-bench] [--limit 20]
"""

import argparse
import sys

import torch

import ddtree
from ddtree import costs
from ddtree.evalsets import load_dataset

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--datasets", default="gsm8k,mt-bench,humaneval,alpaca")
parser.add_argument("--limit", type=int, default=12)
parser.add_argument("--max-new-tokens", type=int, default=256)
args = parser.parse_args()

sizes = list(costs.AUTO_SIZES["cuda"])
engine = ddtree.load(device="cpu", dtype="float32")
flat = [1.0] * 2
engine.use_costs(costs.RoundCosts(sizes, [128, 1024], flat, {s: flat for s in sizes}, flat))
engine.auto.choose = lambda yields, context: max(sizes)  # always verify the largest tree
records: dict[str, list] = {}
current: list = []
learn = engine.acceptance.learn


def recording_learn(scores, accepted):
    current.append((scores.clone(), accepted.clone()))
    learn(scores, accepted)


engine.acceptance.learn = recording_learn
for dataset in args.datasets.split(","):
    rounds = records.setdefault(dataset, [])
    for turns in load_dataset(dataset, "../shared/benchmarks")[:args.limit]:
        current.clear()
        engine.generate(turns[0], budget="auto", max_new_tokens=args.max_new_tokens, chat=True)
        rounds.append([(s, a) for s, a in current])
        print(dataset, len(rounds), "prompts,", sum(len(r) for r in rounds), "rounds", file=sys.stderr)
    torch.save(records, args.out)  # after each set: a long recording can be read as it goes
