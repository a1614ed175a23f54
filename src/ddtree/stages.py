"""The device work of a decoding round: prefill, then per round draft → tree → verify → commit.

A round starts from the bonus token b at position s: a token the target chose whose K/V is not yet
in the cache. The drafter proposes a block after b (draft), a tree is built from it (tree), the
target runs b plus every node in one forward under the ancestor-only mask (verify), and the longest
path that matches the target's own choices is accepted (commit): the path's K/V rows move into
place, their tapped features become drafter context, and the choice at the path's end is the next
bonus token.

Each stage reads and writes only workspace buffers, so it can be captured once per shape as a CUDA
graph and replayed; `Stage.key` names the work and its shape (two different pieces of work must
never share a key).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .costs import AcceptanceModel
from .model import causal_mask
from .sampling import choose_tokens
from .tree import FrontierPlan, ancestor_mask, best_first_nodes
from .workspace import PREFILL_STEP, Graphs, TreeBuffers, Workspace


# A prompt is prefilled in chunks of at most this many rows: the attention's mask and activations stay
# the size of a chunk, not of the prompt (32k rows of mask per layer would take gigabytes).
PREFILL_CHUNK = 1024
# Prefills (and first drafts) of longer prompts run eagerly: a graph per prompt-length bucket up to a 32k
# context would hold hundreds of graphs, and a long prefill's work dwarfs its launches.
GRAPH_PREFILL_ROWS = 2048


@dataclass
class Stage:
    """One piece of device work under its graph key; `repeatable`: running it twice equals once; `graphed`:
    captured and replayed as a CUDA graph where graphs are on (else it always runs eagerly)."""
    key: tuple
    work: Callable[[], None]
    graphs: Graphs
    repeatable: bool = True
    graphed: bool = True

    def run(self) -> None:
        if self.graphed:
            self.graphs.run(self.key, self.work, self.repeatable)
        else:
            self.work()

    def capture(self) -> None:
        if self.graphed:
            self.graphs.capture(self.key, self.work, self.repeatable)


class Stages:
    """The stages over one workspace, with the target, the drafter and auto's acceptance model (which
    scored trees read and every verified scored tree teaches)."""

    def __init__(self, model, drafter, workspace: Workspace, graphs: Graphs, position_noise,
                 acceptance: AcceptanceModel | None = None):
        self.model, self.drafter, self.ws, self.graphs = model, drafter, workspace, graphs
        self.position_noise, self.acceptance = position_noise, acceptance

    def prefill(self, rows: int, taps: tuple[int, ...]) -> Stage:
        """The prompt's first `rows` slots (padding included) through the target: its cache rows, the
        logits after its last real token (the committed count says which) and its tapped features."""
        return Stage(("prefill", rows, bool(taps)), lambda: self.run_prefill(rows, taps), self.graphs,
                     graphed=rows <= GRAPH_PREFILL_ROWS)

    def draft(self, attend: int, depth: int, chain: bool, prompt_rows: int | None = None) -> Stage:
        """A round's draft of `depth` depths; the first round's (`prompt_rows` given) reads the prefill's
        features as context."""
        ws = self.ws
        features = ws.features if prompt_rows is None else ws.prompt_features[:, :prompt_rows]
        return Stage(("draft", attend, prompt_rows, depth, chain),
                     lambda: self.run_draft(features, attend, depth, chain), self.graphs,
                     graphed=prompt_rows is None or prompt_rows <= GRAPH_PREFILL_ROWS)

    def tree(self, tree: TreeBuffers, plan: FrontierPlan | None, yields: torch.Tensor | None = None) -> Stage:
        """The round's tree into `tree`: the chain's tokens (no plan), or the best-first tree of `plan`;
        with `yields` (an auto probe), also the expected tokens of every candidate size it holds."""
        key = ("tree", tree.key, plan.budget if plan is not None else None, yields is not None)
        return Stage(key, lambda: self.build_tree(tree, plan, yields), self.graphs)

    def verify(self, tree: TreeBuffers, attend: int, taps: tuple[int, ...]) -> Stage:
        mode = self.ws.sampling.mode
        return Stage(("verify", tree.key, attend, mode, bool(taps)), lambda: self.run_verify(tree, attend, taps, mode),
                     self.graphs)

    def commit(self, tree: TreeBuffers) -> Stage:
        return Stage(("commit", tree.key), lambda: self.run_commit(tree), self.graphs, repeatable=False)

    # ----- the work ------------------------------------------------------------------------------

    def run_prefill(self, rows: int, taps: tuple[int, ...]) -> None:
        """In chunks (`prefill_chunks`), each attending the cache rows before it."""
        ws, model = self.ws, self.model
        for start, end in prefill_chunks(rows):
            hidden, features = model(ws.prompt[None, start:end], ws.steps[None, start:end],
                                     causal_mask(end - start, start, ws.device), ws.cache, start, taps)
            if features is not None:
                ws.prompt_features[:, start:end].copy_(features)
        last = (ws.committed - 1 - start).clamp(min=0).view(1)  # (0 in a capture's warm-up, at an empty context)
        ws.prompt_logits.copy_(model.logits(hidden[0].index_select(0, last)))

    def run_draft(self, features: torch.Tensor, attend: int, depth: int, chain: bool) -> None:
        """Per-depth log-probs of the tokens after the bonus token, from one drafter pass; for a chain,
        only each depth's likeliest token. The new context rows (features of tokens from `pending_start`
        on; rows past the committed ones are stale and never attended) go to their slots, the block to
        the scratch rows."""
        ws, model, block = self.ws, self.model, self.ws.block
        steps = ws.steps
        context_positions = ws.pending_start + steps[:features.shape[1]]
        block_positions = ws.committed + steps[:block]
        slots = torch.cat([block + context_positions, steps[:block]])
        mask = steps[:attend] < block + ws.committed  # the scratch block, then committed context rows
        block_ids = torch.cat([ws.bonus[None], ws.block_tail])
        hidden = self.drafter(
            model.embed_tokens(block_ids[None]), block_positions[None], features, context_positions[None],
            mask[None, None, None], ws.draft_cache, slots,
        )
        logits = self.drafter.scale_logits(model.logits(hidden[0, 1:depth + 1]))
        if chain:  # a chain takes each depth's argmax, which the logits give as well
            torch.argmax(logits, dim=-1, out=ws.chain_tokens[:depth])
        else:
            torch.log_softmax(logits, dim=-1, out=ws.log_probs[:depth])

    def build_tree(self, tree: TreeBuffers, plan: FrontierPlan | None, yields: torch.Tensor | None) -> None:
        ws = self.ws
        tree.ids[0] = ws.bonus
        if plan is None:  # a chain: its shape is fixed in its buffers, its tokens each depth's argmax
            tree.ids[1:] = ws.chain_tokens
            return
        if ws.tree_kernel is not None and ws.tree_kernel.serves(plan):  # all in one kernel
            ws.tree_kernel.build(ws.log_probs[:plan.depth], ws.kernel_plan(plan), tree.ids, tree.parents, tree.depths,
                                 tree.scores, tree.mask)
            scores = tree.scores
        else:
            tokens, parents, depths, scores = best_first_nodes(ws.log_probs[:plan.depth], plan)
            if tree.scores is not None:
                tree.scores.copy_(scores)
            tree.ids[1:] = tokens
            tree.parents[1:] = parents
            tree.depths[1:] = depths
            tree.mask.copy_(ancestor_mask(tree.parents, ws.block - 1))
        if yields is not None:  # auto's trees are scored, so `scores` is set
            yields.copy_(self.acceptance.expected_yields(scores))

    def run_verify(self, tree: TreeBuffers, attend: int, taps: tuple[int, ...], mode: str) -> None:
        """One target forward over the root and every node: the target's choice at each, and its features."""
        ws, rows = self.ws, tree.rows
        slots = ws.committed + ws.steps[:rows]
        mask = (ws.steps[:attend] < ws.committed).expand(rows, attend).clone()
        mask.scatter_(1, slots.expand(rows, rows), tree.mask)
        hidden, features = self.model(tree.ids[None], (ws.committed + tree.depths)[None], mask[None, None], ws.cache,
                                      slots, taps)
        noise = None
        if mode != "greedy":  # a node at depth d chooses the token at position committed + d + 1
            depths = min(rows, ws.block)
            noise = self.position_noise(ws.seed, ws.committed + 1 + ws.steps[:depths], ws.token_keys)[tree.depths]
        tree.choices.copy_(choose_tokens(self.model.logits(hidden[0]), ws.sampling, noise=noise))
        if features is not None:
            tree.features.copy_(features)

    def run_commit(self, tree: TreeBuffers) -> None:
        """Accepts the longest root path whose every token is the target's choice at its parent, moves
        its K/V rows into place, keeps its features for the drafter and sets the next bonus token."""
        ws = self.ws
        if tree.rows == 1:  # the bonus token alone (ar): accepted, and its row is in place already
            self.advance(tree, tree.choices[:1], tree.out.new_ones(()), tree.features)
            return
        steps, rows = ws.steps, tree.path_rows
        matches = (tree.ids == tree.choices[tree.parents]) | (steps[:tree.rows] == 0)
        accepted = ~(tree.mask & ~matches[None, :]).any(dim=1)  # every ancestor matches
        count = accepted.sum()
        # path[d] = the accepted node at depth d; past the path's end, d itself (rows stay where they are)
        path = steps[:rows + 1].clone()
        path.scatter_(0, torch.where(accepted, tree.depths, rows), steps[:tree.rows])
        path = path[:rows]
        ws.cache.move_rows(ws.committed + path, ws.committed + steps[:rows])
        if tree.scores is not None:
            self.acceptance.learn(tree.scores, accepted[1:])
        self.advance(tree, tree.choices[path], count, tree.features[:, path] if tree.features is not None else None)

    def advance(self, tree: TreeBuffers, emitted: torch.Tensor, count: torch.Tensor, features: torch.Tensor | None):
        """The accepted path's `count` tokens join the context: `emitted` holds the target's choice after
        each path node, the last being the next bonus token; `features` are the path rows' taps."""
        ws = self.ws
        if features is not None:
            ws.features[:, :features.shape[1]].copy_(features)
        ws.bonus.copy_(emitted.index_select(0, (count - 1).view(1))[0])
        ws.pending_start.copy_(ws.committed)
        ws.committed.add_(count)
        tree.out[0] = count
        tree.out[1:] = emitted


def prefill_chunks(rows: int) -> list[tuple[int, int]]:
    """A prefill's chunks, (start, end): PREFILL_CHUNK rows each, the remainder joining the last one when
    shorter than a prefill step. Padding is less than a step, so the prompt's last token is in the last
    chunk, whose hidden states give the first token's logits."""
    starts = [start for start in range(0, rows, PREFILL_CHUNK) if start == 0 or rows - start >= PREFILL_STEP]
    return list(zip(starts, [*starts[1:], rows]))
