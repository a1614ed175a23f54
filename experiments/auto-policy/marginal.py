"""Does auto's acceptance model price the nodes that a larger tree adds? Replays recorded rounds (record.py)
with the model learning from the nodes of the `--verified` size only (as auto verifying that size does),
and compares, per set, what it expects the nodes ranked `--verified` .. 2×`--verified` to add with what
they added (tokens of the larger tree minus the smaller's), in all and by depth. A second model, with a
bin per (path log-probability, depth), shows whether the depth explains the gap.
    .venv/bin/python experiments/auto-policy/marginal.py ROUNDS.pt [--verified 63]
"""

import argparse

import torch

from ddtree import costs as C

parser = argparse.ArgumentParser()
parser.add_argument("rounds")
parser.add_argument("--verified", type=int, default=63)
args = parser.parse_args()
small, large = args.verified, 2 * args.verified + 1
edges = torch.tensor(C.SCORE_EDGES)
DEPTHS = 16


class Binned:
    """The product's model (a bin per path log-probability), or with `by_depth` a bin per (bin, depth)."""

    def __init__(self, by_depth: bool):
        self.by_depth = by_depth
        bins = (len(C.SCORE_EDGES) + 1) * (DEPTHS if by_depth else 1)
        centres = torch.tensor([C.SCORE_EDGES[0] - 0.125] + [(a + b) / 2 for a, b in
                                                            zip(C.SCORE_EDGES, C.SCORE_EDGES[1:])] + [0.0])
        prior = centres.exp().repeat(DEPTHS if by_depth else 1)
        self.seen, self.hits = torch.full((bins,), C.PRIOR_NODES), prior * C.PRIOR_NODES

    def bins(self, scores, depths):
        index = torch.bucketize(scores, edges)
        return index + (len(C.SCORE_EDGES) + 1) * depths.clamp(max=DEPTHS - 1) if self.by_depth else index

    def chance(self, scores, depths):
        return (self.hits / self.seen)[self.bins(scores, depths)]

    def learn(self, scores, depths, accepted):
        index = self.bins(scores, depths)
        self.seen.mul_(C.DECAY).index_add_(0, index, torch.ones_like(scores))
        self.hits.mul_(C.DECAY).index_add_(0, index, accepted.float())


records = torch.load(args.rounds)
for dataset, prompts in records.items():
    for by_depth in (False, True):
        expected, added = torch.zeros(DEPTHS), torch.zeros(DEPTHS)
        for rounds in prompts:
            model = Binned(by_depth)  # (each prompt a fresh generation, as in the bench)
            for scores, depths, accepted in rounds:
                marginal = slice(small, large)
                d = depths[marginal].clamp(max=DEPTHS - 1)
                expected.index_add_(0, d, model.chance(scores[marginal], depths[marginal]))
                added.index_add_(0, d, accepted[marginal].float())
                model.learn(scores[:small], depths[:small], accepted[:small])
        rounds_count = sum(len(r) for r in prompts)
        name = "bin x depth" if by_depth else "bin (product)"
        print(f"{dataset} {name}: nodes {small + 1}..{large} add {added.sum() / rounds_count:.3f} tokens a round, "
              f"expected {expected.sum() / rounds_count:.3f} (x{expected.sum() / max(added.sum(), 1e-9):.2f})")
        if not by_depth:
            print("   by depth: " + ", ".join(f"{k}: {expected[k] / rounds_count:.3f}/{added[k] / rounds_count:.3f}"
                                          for k in range(DEPTHS) if expected[k] > 0.001 or added[k] > 0))
