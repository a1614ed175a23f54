"""Records, for `auto`'s policy study, every round of the embedded pair verifying auto's largest tree
(255 nodes) on the CPU in fp32: each node's path log-probability and depth, best first, and whether it was
accepted. A best-first prefix of n nodes is the best n-node tree, and the accepted path within it is
the full tree's path cut at the prefix, so one round tells how many tokens every size would have added.
    .venv/bin/python experiments/auto-policy/record.py OUT.pt [--datasets gsm8k,alpaca] [--limit 12]
Each set's rounds: a list per prompt of (scores, depths, accepted) tensors of the tree's nodes.
"""

import argparse
import sys

import torch

import ddtree
from ddtree import costs
from ddtree.evalsets import load_dataset
from ddtree.stages import Stages

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--datasets", default="gsm8k,mt-bench,humaneval,alpaca")
parser.add_argument("--limit", type=int, default=12)
parser.add_argument("--max-new-tokens", type=int, default=256)
args = parser.parse_args()

engine = ddtree.load(device="cpu", dtype="float32")
sizes = costs.candidate_sizes("cuda", engine.drafter.cfg.block_size - 1, engine.model.cfg.vocab_size)
flat = [1e-3] * 2  # (no calibration: every round verifies the largest tree whatever it costs)
engine.use_costs({1: costs.RoundCosts(sizes, [128, 1024], flat, *({s: flat for s in sizes} for _ in range(3)))})
costs.AutoBudget.probe_size = lambda self: None if self.current is not None else self.largest
costs.AutoBudget.round_size = lambda self: self.largest
current: list = []
learn, commit = costs.AcceptanceModel.learn, Stages.run_commit
depths = {}


def recording_commit(stages, tree, learns):
    depths["now"] = tree.depths[0, 1:].clone()
    commit(stages, tree, learns)


def recording_learn(model, scores, accepted, counted=None):
    used = int(counted[0].sum()) if counted is not None else scores.shape[-1]
    current.append((scores[0, :used].clone(), depths["now"][:used], accepted[0, :used].clone()))
    learn(model, scores, accepted, counted)


Stages.run_commit = recording_commit
costs.AcceptanceModel.learn = recording_learn
records: dict[str, list] = {}
for dataset in args.datasets.split(","):
    prompts = records.setdefault(dataset, [])
    for turns in load_dataset(dataset, "../shared/benchmarks")[:args.limit]:
        current.clear()
        engine.generate(turns[0], budget="auto", max_new_tokens=args.max_new_tokens, chat=True)
        prompts.append(list(current))
        print(dataset, len(prompts), "prompts,", sum(len(p) for p in prompts), "rounds", file=sys.stderr)
    torch.save(records, args.out)  # after each set: a long recording can be read as it goes
