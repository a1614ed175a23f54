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
from .model import Packing, causal_mask, sequence_index
from .sampling import choose_tokens, position_noise
from .tree import FrontierPlan, ancestor_mask, best_first_nodes
from .workspace import PREFILL_STEP, Graphs, Sequences, TreeBuffers, Workspace


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
    """The stages over one workspace's sequences, with the target, the drafter and auto's acceptance model
    (which scored trees read and every verified scored tree teaches). A round runs over the first `count`
    sequences (a batch size the caller picks); a prefill, and the drafter's first look at a prompt, run
    for one sequence (`index`) between rounds."""

    def __init__(self, model, drafter, workspace: Workspace, graphs: Graphs, acceptance: AcceptanceModel | None = None):
        self.model, self.drafter, self.ws, self.graphs, self.acceptance = model, drafter, workspace, graphs, acceptance
        # compiled with the layers: the sampling noise's twenty elementwise operations and the commit's path
        # search's dozen, each fused into a few kernels
        self.position_noise = torch.compile(position_noise) if model.compiled else position_noise
        self.accept = torch.compile(accepted_paths, dynamic=True) if model.compiled else accepted_paths

    def prefill(self, rows: int, taps: tuple[int, ...], index: int = 0) -> Stage:
        """The prompt's first `rows` slots (padding included) through the target into sequence `index`'s
        cache: its logits after its last real token (the committed count says which) and its tapped features."""
        return Stage(("prefill", rows, bool(taps), index), lambda: self.run_prefill(rows, taps, index), self.graphs,
                     graphed=rows <= GRAPH_PREFILL_ROWS)

    def absorb(self, attend: int, rows: int, index: int = 0) -> Stage:
        """The drafter reads the prefill's features (`rows` of them) into sequence `index`'s drafter cache."""
        return Stage(("absorb", attend, rows, index), lambda: self.run_absorb(attend, rows, index), self.graphs,
                     graphed=rows <= GRAPH_PREFILL_ROWS)

    def draft(self, count: int, attend: int, depth: int, chain: bool, tree: bool) -> Stage:
        """A round's draft of `depth` depths for the first `count` sequences: each depth's likeliest token
        (for `chain`s) and log-probs (for `tree`s)."""
        return Stage(("draft", count, attend, depth, chain, tree),
                     lambda: self.run_draft(count, attend, depth, chain, tree), self.graphs)

    def tree(self, count: int, index: int | None, kind: str, plan: FrontierPlan | None = None, scored: bool = False,
             probe: bool = False) -> Stage:
        """This round's tree of sequence `index`, or of every one (None), in the trees of `count` sequences:
        `kind` "bonus" (the bonus token alone), "chain" (the draft's likeliest tokens) or "tree" (the
        best-first tree of `plan`, its nodes' scores kept when `scored`, and with `probe` the expected
        tokens of every auto size). Every sequence's at once is one launch of each kernel for the batch."""
        key = ("tree", count, index, kind, plan.budget if plan is not None else None, scored, probe)
        return Stage(key, lambda: self.build_tree(count, index, kind, plan, scored, probe), self.graphs)

    def pool(self, count: int) -> Stage:
        """auto's expected tokens for every size of one global budget over the round's trees (`pooled_yields`)."""
        return Stage(("pool", count), lambda: self.run_pool(count), self.graphs)

    def share(self, count: int, nodes: int) -> Stage:
        """The round's trees (every sequence's, built larger) cut to the `nodes` best nodes among all of them:
        one best-first order over the batch, so a confident sequence keeps a deep tree, an unsure one a
        shallow one. Each sequence keeps the first rows of its own tree (nodes come best first)."""
        return Stage(("share", count, nodes), lambda: self.run_share(count, nodes), self.graphs)

    def verify(self, tree: TreeBuffers, attend: int, taps: tuple[int, ...], packed: int | None = None) -> Stage:
        """`packed`: the sequences' used rows run packed into this many rows (a shared budget's trees)."""
        sampling = self.ws.sampling
        mode, mixed = sampling.mode_of(tree.count), sampling.mixed(tree.count)
        return Stage(("verify", tree.key, attend, mode, mixed, bool(taps), packed),
                     lambda: self.run_verify(tree, attend, taps, mode, mixed, packed), self.graphs)

    def commit(self, tree: TreeBuffers, learn: bool = False) -> Stage:
        """`learn`: some tree of the round is scored, and auto's acceptance model learns from it."""
        return Stage(("commit", tree.key, learn), lambda: self.run_commit(tree, learn), self.graphs, repeatable=False)

    # ----- the work ------------------------------------------------------------------------------

    def run_prefill(self, rows: int, taps: tuple[int, ...], index: int) -> None:
        """In chunks (`prefill_chunks`), each attending the cache rows before it."""
        ws, model = self.ws, self.model
        cache = ws.cache.sequences(index, index + 1)
        for start, end in prefill_chunks(rows):
            hidden, features = model(ws.prompt[None, start:end], ws.steps[None, start:end],
                                     causal_mask(end - start, start, ws.device), cache, start, taps)
            if features is not None:
                ws.prompt_features[:, start:end].copy_(features)
        last = (ws.committed[index] - 1 - start).clamp(min=0).view(1)  # (0 in a capture's warm-up, at an empty context)
        ws.prompt_logits.copy_(model.logits(hidden[0].index_select(0, last)))

    def run_absorb(self, attend: int, rows: int, index: int) -> None:
        """One drafter pass with the prompt's features as its context: their keys and values go to their
        slots (the block's own, at the scratch rows, the next draft rewrites). Then nothing is pending."""
        ws, block, steps = self.ws, self.ws.block, self.ws.steps
        committed = ws.committed[index]
        slots = torch.cat([block + steps[:rows], steps[:block]])
        block_ids = torch.cat([ws.bonus[index].view(1), ws.block_tail])
        self.drafter(self.model.embed_tokens(block_ids[None]), (committed + steps[:block])[None],
                     ws.prompt_features[:, :rows], steps[None, :rows], (steps[:attend] < block + committed)[None, None, None],
                     ws.draft_cache.sequences(index, index + 1), slots)
        ws.pending_start[index] = committed

    def run_draft(self, count: int, attend: int, depth: int, chain: bool, tree: bool) -> None:
        """Per-depth log-probs of the tokens after each bonus token, from one drafter pass; for a chain,
        each depth's likeliest token. The new context rows (features of tokens from `pending_start` on;
        rows past the committed ones are stale and never attended) go to their slots, the block to the
        scratch rows."""
        ws, model, block = self.ws, self.model, self.ws.block
        seqs, steps = ws.sequences(count), ws.steps
        context_positions = seqs.pending_start[:, None] + steps[:block]
        block_positions = seqs.committed[:, None] + steps[:block]
        slots = torch.cat([block + context_positions, steps[:block].expand(count, block)], dim=1)
        mask = steps[:attend] < block + seqs.committed[:, None]  # the scratch block, then committed context rows
        block_ids = torch.cat([seqs.bonus[:, None], ws.block_tail.expand(count, -1)], dim=1)
        hidden = self.drafter(model.embed_tokens(block_ids), block_positions, seqs.features, context_positions,
                              mask[:, None, None], seqs.draft_cache, slots)
        # (from the block's first row on, whose logits go unused: 16 rows rather than 15 run the CPU's GEMM
        # over the vocabulary twice as fast, and a GPU's as fast)
        logits = self.drafter.logits(model, hidden[:, :depth + 1])[:, 1:]
        if chain:  # a chain takes each depth's argmax, which the logits give as well
            chain_tokens = seqs.chain_tokens[:, :depth]
            torch.argmax(logits, dim=-1, out=chain_tokens)
            if self.drafter.vocabulary is not None:
                chain_tokens.copy_(self.drafter.vocabulary[chain_tokens])
        if tree:
            torch.log_softmax(logits, dim=-1, out=seqs.log_probs[:, :depth])

    def build_tree(self, count: int, index: int | None, kind: str, plan: FrontierPlan | None, scored: bool,
                   probe: bool) -> None:
        ws = self.ws
        trees = ws.tree(count, ws.max_rows)
        part = slice(0, count) if index is None else slice(index, index + 1)
        ids, parents, depths, mask = trees.ids[part], trees.parents[part], trees.depths[part], trees.mask[part]
        used = trees.used[part]
        ids[:, 0].copy_(ws.bonus[part])
        if scored:  # (a free slot's tree teaches nothing)
            trees.learns[part].copy_(ws.live[part])
        else:  # (fill_: a scalar copied in would be a host copy, refused in a capture)
            trees.learns[part].fill_(False)
        if kind == "bonus":
            used.fill_(1)
            depths.zero_()  # a batch verifies more rows than the root: near the context's end, none past it
            return
        if kind == "chain":  # its shape is fixed, its tokens each depth's argmax
            rows = ws.block
            ids[:, 1:rows].copy_(ws.chain_tokens[part])
            for buffer, structure in zip((parents[:, :rows], depths[:, :rows], mask[:, :rows, :rows]), ws.chain):
                buffer.copy_(structure)
            used.fill_(rows)
            return
        rows, log_probs = plan.size + 1, ws.log_probs[part, :plan.depth]
        scores = trees.scores[part, :plan.size]
        if ws.tree_kernel is not None and ws.tree_kernel.serves(plan):  # all in one launch of each kernel
            ws.tree_kernel.build(log_probs, ws.kernel_plan(plan, len(ids)), ids[:, :rows], parents[:, :rows],
                                 depths[:, :rows], scores if scored else None, mask[:, :rows, :rows])
        else:
            for b in range(len(ids)):  # the PyTorch path, a sequence at a time
                tokens, node_parents, node_depths, node_scores = best_first_nodes(log_probs[b], plan)
                if scored:
                    scores[b].copy_(node_scores)
                ids[b, 1:rows], parents[b, 1:rows], depths[b, 1:rows] = tokens, node_parents, node_depths
                mask[b, :rows, :rows].copy_(ancestor_mask(parents[b, :rows], ws.block - 1))
        if self.drafter.vocabulary is not None:  # (the trees hold indices into the drafted vocabulary)
            ids[:, 1:rows].copy_(self.drafter.vocabulary[ids[:, 1:rows]])
        used.fill_(rows)
        if probe:  # auto's trees are scored, so `scores` is set
            ws.auto_yields(len(self.acceptance.sizes))[part].copy_(self.acceptance.expected_yields(scores))

    def run_verify(self, tree: TreeBuffers, attend: int, taps: tuple[int, ...], mode: str, mixed: bool,
                   packed: int | None) -> None:
        """One target forward over every sequence's root and nodes: the target's choice at each, and its
        features. Packed, only each sequence's used rows run (`Packing`), and the results are laid out as
        the padded trees' again."""
        ws, count, rows = self.ws, tree.count, tree.rows
        seqs, steps = ws.sequences(count), ws.steps
        slots = seqs.committed[:, None] + steps[:rows]
        positions = seqs.committed[:, None] + tree.depths
        mask = (steps[:attend] < seqs.committed[:, None])[:, None, :].expand(count, rows, attend).clone()
        mask.scatter_(2, slots[:, None, :].expand(count, rows, rows), tree.mask)
        noise = None
        if mode != "greedy":  # a node at depth d chooses the token at position committed + d + 1
            depths = min(rows, ws.block)
            noise = self.position_noise(seqs.seed[:, None], seqs.committed[:, None] + 1 + steps[:depths], ws.token_keys)
            noise = noise[sequence_index(tree.depths), tree.depths]
        if packed is None:
            hidden, features = self.model(tree.ids, positions, mask[:, None], seqs.cache, slots, taps)
            choices = choose_tokens(self.model.logits(hidden), ws.sampling.rows(count, mode, mixed), noise=noise)
        else:
            packing = Packing.of(tree.used, packed, positions, slots)
            hidden, features = self.model(packing.packed(tree.ids), packing.packed(positions), mask[:, None], seqs.cache,
                                          taps=taps, packing=packing)
            sampling = ws.sampling.rows_of(packing.slots.sequence, mode, mixed)
            choices = choose_tokens(self.model.logits(hidden[0]), sampling,
                                    noise=packing.packed(noise)[0] if noise is not None else None)
            choices, features = packing.padded(choices[None]), packing.padded(features) if features is not None else None
        tree.choices.copy_(choices)
        if features is not None:
            tree.features.copy_(features)

    def run_pool(self, count: int) -> None:
        ws = self.ws
        trees = ws.tree(count, ws.max_rows)
        sizes = len(self.acceptance.sizes)
        ws.pooled_yields(sizes).copy_(self.acceptance.pooled_yields(trees.scores, self.shareable(trees), count))

    def run_share(self, count: int, nodes: int) -> None:
        """The `nodes` best scores of all the shareable nodes: every score above the `nodes`-th best's, and of
        the nodes that tie with it as many as are left, first sequences first; a sequence keeps its root
        and its chosen nodes (a sequence not taking part, its root alone)."""
        ws = self.ws
        trees = ws.tree(count, ws.max_rows)
        shareable = self.shareable(trees)
        scores = trees.scores.masked_fill(~shareable, float("-inf"))
        threshold = scores.flatten().topk(nodes).values[-1]
        above = (scores > threshold).sum(dim=1)
        ties = ((scores == threshold) & (threshold > float("-inf"))).sum(dim=1)
        extra = (nodes - above.sum() - (ties.cumsum(0) - ties)).clamp(min=0).minimum(ties)
        trees.used.copy_(torch.where(shareable.any(dim=1), 1 + above + extra, 1))

    def shareable(self, trees: TreeBuffers) -> torch.Tensor:
        """[count, nodes]: the nodes a shared budget may choose: built this round, of a live sequence."""
        built = self.ws.steps[:trees.scores.shape[1]] < trees.used[:, None] - 1
        return built & self.ws.live[:trees.count, None]

    def run_commit(self, tree: TreeBuffers, learn: bool) -> None:
        """Per sequence, accepts the longest root path whose every token is the target's choice at its
        parent, moves its K/V rows into place, keeps its features for the drafter and sets the next bonus
        token."""
        ws, count = self.ws, tree.count
        seqs, steps = ws.sequences(count), ws.steps
        if tree.rows == 1:  # the bonus tokens alone (ar): accepted, and their rows are in place already
            features = tree.features[:, :1] if tree.features is not None else None
            self.advance(seqs, tree, tree.choices[:, :1], seqs.live.long(), features)
            return
        rows = tree.path_rows
        accepted, inside, count_accepted, path = self.accept(tree.ids, tree.choices, tree.parents, tree.mask, tree.used,
                                                             tree.depths, seqs.live, steps[:rows + 1], steps[:tree.rows])
        seqs.cache.move_rows(seqs.committed[:, None] + path, seqs.committed[:, None] + steps[:rows])
        if learn:
            self.acceptance.learn(tree.scores, accepted[:, 1:], (inside & tree.learns[:, None])[:, 1:])
        features = None
        if tree.features is not None:
            features = tree.features.gather(1, path[..., None].expand(-1, -1, tree.features.shape[-1]))
        self.advance(seqs, tree, tree.choices.gather(1, path), count_accepted, features)

    def advance(self, seqs: Sequences, tree: TreeBuffers, emitted: torch.Tensor, count: torch.Tensor,
                features: torch.Tensor | None) -> None:
        """Each sequence's accepted path of `count` tokens joins its context: `emitted` holds the target's
        choice after each path node, the last being the next bonus token; `features` are the path rows'
        taps. A free slot's count is 0: it keeps its place."""
        if features is not None:
            seqs.features[:, :features.shape[1]].copy_(features)
        seqs.bonus.copy_(emitted.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0])
        seqs.pending_start.copy_(seqs.committed)
        seqs.committed.add_(count)
        tree.out[:, 0] = count
        tree.out[:, 1:1 + emitted.shape[1]] = emitted


def accepted_paths(ids: torch.Tensor, choices: torch.Tensor, parents: torch.Tensor, mask: torch.Tensor,
                   used: torch.Tensor, depths: torch.Tensor, live: torch.Tensor, depth_steps: torch.Tensor,
                   row_steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per sequence, the nodes on the longest root path whose every token is the target's choice at its parent
    (`accepted`), the rows its tree uses (`inside`), how many (0 for a free slot), and `path[b, d]`: the
    accepted node at depth d, and past the path's end d itself (rows stay put). `*_steps`: 0, 1, ... of the
    path's length plus one and of the tree's rows."""
    matches = (ids == choices.gather(1, parents)) | (row_steps == 0)
    inside = row_steps < used[:, None]
    accepted = ~(mask & ~matches[:, None, :]).any(dim=2) & inside  # every ancestor matches
    count = accepted.sum(dim=1) * live
    rows = depth_steps.shape[0] - 1
    path = depth_steps.repeat(ids.shape[0], 1)
    path.scatter_(1, torch.where(accepted, depths, rows), row_steps.expand(ids.shape[0], -1))
    return accepted, inside, count, path[:, :rows]


def prefill_chunks(rows: int) -> list[tuple[int, int]]:
    """A prefill's chunks, (start, end): PREFILL_CHUNK rows each, the remainder joining the last one when
    shorter than a prefill step. Padding is less than a step, so the prompt's last token is in the last
    chunk, whose hidden states give the first token's logits."""
    starts = [start for start in range(0, rows, PREFILL_CHUNK) if start == 0 or rows - start >= PREFILL_STEP]
    return list(zip(starts, [*starts[1:], rows]))
