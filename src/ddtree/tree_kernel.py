"""The best-first draft tree and its ancestor mask in one Triton kernel (CUDA only).

`tree.best_first_nodes` builds the tree from a dozen small PyTorch operations per depth, and at
these sizes every kernel costs its launch, not its work (about 100 launches a round). This kernel
does the same in a single program: per depth it scores
the plan's (prefix, token) pairs, sorts them and keeps the best `width` (a bitonic sort of packed
score-and-index keys); then it ranks every depth's candidates together, shallower first on ties,
links each node to its parent and writes the ancestor-or-self mask by walking up the parents.
A depth's kept scores reach the next depth in registers (`tl.gather`); the ranking of all depths and
the parent links pass through global scratch memory, with a barrier after the writes they read.

The per-depth top tokens come from three small kernels beforehand (`top_tokens`): `torch.topk` over a
large vocabulary costs its radix passes whatever the rows, as much as the tree kernel. Log-probabilities
are at most 0, so a histogram of -log p in bins of 1/8 nat finds the bin of the k-th best token in one
pass; a second pass collects the tokens of better bins (fewer than k) and of that bin, and one sort of
those few keys gives the top k, ties to the lower token id (timed in docs/performance.md).

Used where `available(device)` (Triton importable and a CUDA device) for trees of up to MAX_NODES
nodes. Tested against the PyTorch path in Triton's interpreter (TRITON_INTERPRET=1) on the CPU, and
on the GPU by `scripts/check-tree-kernel`.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU path needs no Triton
    triton = None


def available(device: torch.device) -> bool:
    """On CUDA with Triton, unless DDTREE_TREE_KERNEL=0 asks for the PyTorch path; =cpu also allows the
    CPU, which only Triton's interpreter serves (tests)."""
    mode = os.environ.get("DDTREE_TREE_KERNEL", "1")
    return triton is not None and mode != "0" and (device.type == "cuda" or mode == "cpu")


# One program sorts each depth's ~B ln B pairs, so its time grows faster than the PyTorch path's many
# small kernels: past this size the PyTorch path is faster on the H200 (docs/performance.md).
MAX_NODES = 256


def serves(plan) -> bool:
    """Whether the kernel builds this plan's tree (else the PyTorch path does)."""
    return plan.size <= MAX_NODES


def power_of_two(n: int) -> int:
    """The smallest power of two >= n, and at least 2: Triton's block sizes."""
    return 1 << max(n - 1, 1).bit_length()


# The vocabulary top-k's passes: programs of TOP_CHUNK tokens; BINS bins of 1/BIN_SCALE nat over
# -log p in [0, 64) (every log-prob below -64 in the last one); per depth, slots for at least 4k
# candidates: the tokens of better bins than the k-th's (fewer than k) take the first k, that bin's
# tokens the rest. A bin holds about a dozen tokens near the k-th best of a drafter's distribution;
# should more than the slots tie within it, the first come are kept (a tree a little less good, never
# a wrong one: any tokens make a valid tree, and the better bins are always whole).
TOP_CHUNK, BINS, BIN_SCALE = 4096, 512, 8.0


class KernelPlan:
    """A FrontierPlan's pair tables padded per depth, and the scratch the kernels write between steps, for
    trees of up to `batch` sequences at once (one program each). `num_warps`: the threads a program sorts
    with (scripts/check-tree-kernel --warps times others); by default 16 from 128 nodes, 8 below, the
    faster on the H200 (docs/performance.md)."""

    def __init__(self, plan, device, num_warps: int | None = None, batch: int = 1):
        self.num_warps = num_warps or (16 if plan.size >= 128 else 8)
        depth = plan.depth
        self.depth, self.size, self.tokens, self.batch = depth, plan.size, plan.tokens, batch
        self.width_pad = power_of_two(max(plan.widths))
        spans = plan.spans or [(0, 0)]
        self.pair_pad = power_of_two(max(end - start for start, end in spans))
        self.candidate_pad = power_of_two(depth * self.width_pad)
        self.node_pad = power_of_two(plan.size + 1)
        left = torch.zeros(max(depth - 1, 1), self.pair_pad, dtype=torch.int32)
        token = torch.zeros_like(left)
        count = torch.zeros(max(depth - 1, 1), dtype=torch.int32)
        for level, (start, end) in enumerate(plan.spans):
            left[level, :end - start] = plan.left[start:end].cpu().to(torch.int32)
            token[level, :end - start] = plan.token[start:end].cpu().to(torch.int32)
            count[level] = end - start
        self.left, self.token, self.pair_count = left.to(device), token.to(device), count.to(device)
        self.widths = torch.tensor(plan.widths, dtype=torch.int32, device=device)
        self.scores = torch.empty(batch, depth, self.width_pad, dtype=torch.float32, device=device)
        self.pairs = torch.empty(batch, depth, self.width_pad, dtype=torch.int32, device=device)
        self.node_of = torch.empty(batch, depth * self.width_pad, dtype=torch.int32, device=device)
        self.node_scores = torch.empty(batch, plan.size, dtype=torch.float32, device=device)
        # the vocabulary top-k's scratch and results
        self.vocab = plan.vocab
        self.top_chunk = min(TOP_CHUNK, power_of_two(plan.vocab))
        self.chunks = -(-plan.vocab // self.top_chunk)
        self.slots = max(power_of_two(4 * self.tokens), 64)
        rows = batch * depth
        self.histograms = torch.empty(rows, self.chunks, BINS, dtype=torch.int32, device=device)
        self.filled = torch.empty(rows, 2, dtype=torch.int32, device=device)
        self.candidates = torch.empty(rows, self.slots, dtype=torch.int64, device=device)
        self.top_values = torch.empty(batch, depth, self.tokens, dtype=torch.float32, device=device)
        self.top_ids = torch.empty(batch, depth, self.tokens, dtype=torch.int64, device=device)


def top_tokens(log_probs: torch.Tensor, kplan: KernelPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `kplan.tokens` of each of the first `kplan.depth` rows of `log_probs` [rows, vocab], or of
    each sequence's [batch, rows, vocab] (float32 log-probabilities), best first, and their token ids:
    `torch.topk`'s result but for the order of exact ties, in kplan's buffers ([depth, tokens], or
    [batch, depth, tokens])."""
    batched = log_probs.dim() == 3
    log_probs = log_probs if batched else log_probs[None]
    batch, depth = log_probs.shape[0], kplan.depth
    if batch > kplan.batch:
        raise ValueError(f"a kernel plan for {kplan.batch} sequences got {batch}")
    rows, strides = batch * depth, (log_probs.stride(0), log_probs.stride(1))
    common = dict(VOCAB=kplan.vocab, CHUNK=kplan.top_chunk, CHUNKS=kplan.chunks, BINS=BINS, BIN_SCALE=BIN_SCALE,
                  DEPTH=depth)
    _top_histogram[(rows, kplan.chunks)](log_probs, *strides, kplan.histograms, kplan.filled, kplan.candidates,
                                         SLOTS=kplan.slots, **common, num_warps=4)
    _top_collect[(rows, kplan.chunks)](log_probs, *strides, kplan.histograms, kplan.filled, kplan.candidates,
                                       K=kplan.tokens, SLOTS=kplan.slots, **common, num_warps=4)
    _top_select[(rows,)](kplan.candidates, kplan.top_values, kplan.top_ids, K=kplan.tokens, SLOTS=kplan.slots,
                         VOCAB=kplan.vocab, num_warps=4)
    values, ids = kplan.top_values[:batch], kplan.top_ids[:batch]
    return (values, ids) if batched else (values[0], ids[0])


def build(log_probs: torch.Tensor, kplan: KernelPlan, ids: torch.Tensor, parents: torch.Tensor,
          depths: torch.Tensor, scores: torch.Tensor | None, mask: torch.Tensor) -> None:
    """Fills nodes 1..size of `ids`, `parents` and `depths` [rows] (row 0, the root, is the caller's), the
    nodes' path scores into `scores` [size] (when given), and the ancestor-or-self `mask` [size+1, size+1]
    (rows may be strided), from `log_probs` [depth, vocab]; or every sequence's of a batch, each with a
    leading batch axis, one program a sequence."""
    if log_probs.dim() == 2:  # one sequence: a batch of one
        ids, parents, depths, mask = ids[None], parents[None], depths[None], mask[None]
        scores = scores[None] if scores is not None else None
    top_values, top_ids = top_tokens(log_probs.float(), kplan)
    if scores is None:
        scores = kplan.node_scores
    if not ids.stride() == parents.stride() == depths.stride():
        raise ValueError("ids, parents and depths must share their strides")
    _best_first_tree[(ids.shape[0],)](
        top_values, top_ids, kplan.left, kplan.token, kplan.pair_count, kplan.widths,
        kplan.scores, kplan.pairs, kplan.node_of,
        ids, parents, depths, ids.stride(0), scores, scores.stride(0), mask, mask.stride(0), mask.stride(1),
        DEPTH=kplan.depth, TOKENS=kplan.tokens, SIZE=kplan.size, WIDTH_PAD=kplan.width_pad,
        PAIR_PAD=kplan.pair_pad, CANDIDATE_PAD=kplan.candidate_pad, NODE_PAD=kplan.node_pad,
        CLEAR_ROWS=max(1, 4096 // kplan.node_pad), num_warps=kplan.num_warps,
    )


if triton is not None:
    @triton.jit
    def _sort_key(score, index, valid, INDEX_LIMIT: tl.constexpr):
        """An int64 whose order is the score's, then the lower index first: sorted descending, the
        best score comes first and ties keep their listed order. Padding (not `valid`) sorts below
        every score, -inf included (a drafter may give a token no chance at all)."""
        bits = score.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as signed-integer order
        ordered = tl.where(valid, ordered, -2147483647 - 1)
        return (ordered.to(tl.int64) << 32) | (INDEX_LIMIT - index).to(tl.int64)

    @triton.jit
    def _unpack(key, INDEX_LIMIT: tl.constexpr):
        ordered = (key >> 32).to(tl.int32)
        bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
        low = key - ((key >> 32) << 32)  # the index part, without a 64-bit mask literal
        return bits.to(tl.float32, bitcast=True), INDEX_LIMIT - low.to(tl.int32)

    @triton.jit
    def _bin_of(value, BINS: tl.constexpr, BIN_SCALE: tl.constexpr):
        """-log p in steps of 1/BIN_SCALE nat, the best bin first; -inf (and NaN) in the last."""
        scaled = tl.minimum(tl.maximum(-value * BIN_SCALE, 0.0), BINS - 1.0)
        return tl.where(value == value, scaled, BINS - 1.0).to(tl.int32)

    @triton.jit
    def _load_chunk(log_probs, sequence_stride, stride, row, chunk, VOCAB: tl.constexpr, CHUNK: tl.constexpr,
                    DEPTH: tl.constexpr):
        """A chunk of one row's log-probs (row = sequence * DEPTH + depth): the token ids, which are inside
        the vocabulary, and the values, at most 0 and never NaN (NaN as -inf), so a child never outscores
        its parent whatever the input."""
        token = chunk * CHUNK + tl.arange(0, CHUNK)
        real = token < VOCAB
        start = (row // DEPTH).to(tl.int64) * sequence_stride + (row % DEPTH) * stride
        value = tl.load(log_probs + start + token, mask=real, other=float("-inf"))
        return token, real, tl.where(value == value, tl.minimum(value, 0.0), float("-inf"))

    @triton.jit
    def _top_histogram(log_probs, sequence_stride, stride, histograms, filled, candidates, SLOTS: tl.constexpr,
                       VOCAB: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr, BINS: tl.constexpr,
                       BIN_SCALE: tl.constexpr, DEPTH: tl.constexpr):
        """Each chunk's histogram; a row's first chunk also empties the collect pass's counters and slots
        (the last round's select has read them: kernels run in order)."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        token, real, value = _load_chunk(log_probs, sequence_stride, stride, row, chunk, VOCAB, CHUNK, DEPTH)
        counts = tl.histogram(_bin_of(value, BINS, BIN_SCALE), BINS, mask=real)
        tl.store(histograms + (row * CHUNKS + chunk) * BINS + tl.arange(0, BINS), counts)
        if chunk == 0:
            pair = tl.arange(0, 2)
            tl.store(filled + row * 2 + pair, tl.zeros([2], tl.int32))
            slot = tl.arange(0, SLOTS)
            lowest = (tl.zeros([SLOTS], tl.int64) - 2147483648) << 32  # below every packed key
            tl.store(candidates + row * SLOTS + slot, lowest)

    @triton.jit
    def _top_collect(log_probs, sequence_stride, stride, histograms, filled, candidates, K: tl.constexpr,
                     SLOTS: tl.constexpr, VOCAB: tl.constexpr, CHUNK: tl.constexpr, CHUNKS: tl.constexpr,
                     BINS: tl.constexpr, BIN_SCALE: tl.constexpr, DEPTH: tl.constexpr):
        """The bin of the row's k-th best token from all its chunks' histograms (every program sums them,
        which costs less than a launch); then every token of a better bin into slots 0..k-1 (there are
        fewer than k), the k-th's bin's into slots k.. while they last; atomic counters hand each
        program its places."""
        row, chunk = tl.program_id(0), tl.program_id(1)
        bins = tl.arange(0, BINS)
        counts = tl.zeros([BINS], tl.int32)
        for other in range(CHUNKS):
            counts += tl.load(histograms + (row * CHUNKS + other) * BINS + bins)
        edge = tl.min(tl.where(tl.cumsum(counts, 0) >= K, bins, BINS - 1))
        token, real, value = _load_chunk(log_probs, sequence_stride, stride, row, chunk, VOCAB, CHUNK, DEPTH)
        where = _bin_of(value, BINS, BIN_SCALE)
        better = real & (where < edge)
        tied = real & (where == edge)
        key = _sort_key(value, token, real, VOCAB)
        first_better = tl.atomic_add(filled + row * 2, tl.sum(better.to(tl.int32)))
        slot = first_better + tl.cumsum(better.to(tl.int32), 0) - 1
        tl.store(candidates + row * SLOTS + slot, key, mask=better & (slot < K))
        first_tied = tl.atomic_add(filled + row * 2 + 1, tl.sum(tied.to(tl.int32)))
        slot = K + first_tied + tl.cumsum(tied.to(tl.int32), 0) - 1
        tl.store(candidates + row * SLOTS + slot, key, mask=tied & (slot < SLOTS))

    @triton.jit
    def _top_select(candidates, top_values, top_ids, K: tl.constexpr, SLOTS: tl.constexpr, VOCAB: tl.constexpr):
        row = tl.program_id(0)
        slot = tl.arange(0, SLOTS)
        keys = tl.sort(tl.load(candidates + row * SLOTS + slot), descending=True)
        value, token = _unpack(keys, VOCAB)
        tl.store(top_values + row * K + slot, value, mask=slot < K)
        tl.store(top_ids + row * K + slot, token.to(tl.int64), mask=slot < K)

    @triton.jit
    def _best_first_tree(top_values, top_ids, left_table, token_table, pair_count, widths,
                         cand_scores, cand_pairs, node_of,
                         out_ids, out_parents, out_depths, node_stride, out_scores, scores_stride,
                         mask, mask_sequence_stride, mask_stride,
                         DEPTH: tl.constexpr, TOKENS: tl.constexpr, SIZE: tl.constexpr, WIDTH_PAD: tl.constexpr,
                         PAIR_PAD: tl.constexpr, CANDIDATE_PAD: tl.constexpr, NODE_PAD: tl.constexpr,
                         CLEAR_ROWS: tl.constexpr):
        # one program a sequence: its top tokens, scratch and outputs
        sequence = tl.program_id(0).to(tl.int64)
        top_values += sequence * DEPTH * TOKENS
        top_ids += sequence * DEPTH * TOKENS
        cand_scores += sequence * DEPTH * WIDTH_PAD
        cand_pairs += sequence * DEPTH * WIDTH_PAD
        node_of += sequence * DEPTH * WIDTH_PAD
        out_ids += sequence * node_stride
        out_parents += sequence * node_stride
        out_depths += sequence * node_stride
        out_scores += sequence * scores_stride
        mask += sequence * mask_sequence_stride
        ranks = tl.arange(0, WIDTH_PAD)
        # depth 1: the best tokens themselves (already sorted by topk); each depth's kept scores stay in
        # registers for the next (a gather), and go to scratch only for the ranking of all depths below
        first_width = tl.load(widths)
        above = tl.load(top_values + ranks, mask=ranks < first_width, other=float("-inf"))
        tl.store(cand_scores + ranks, above)
        pair = tl.arange(0, PAIR_PAD)
        for level in range(1, DEPTH):
            count = tl.load(pair_count + level - 1)
            live = pair < count
            left = tl.load(left_table + (level - 1) * PAIR_PAD + pair, mask=live, other=0)
            token = tl.load(token_table + (level - 1) * PAIR_PAD + pair, mask=live, other=0)
            value = tl.load(top_values + token, mask=live, other=float("-inf"))
            summed = tl.where(live, tl.gather(above, left, 0) + value, float("-inf"))
            best = tl.sort(_sort_key(summed, pair, live, PAIR_PAD), descending=True)
            score, which = _unpack(best, PAIR_PAD)
            width = tl.load(widths + level)
            keep = pair < width
            score = tl.where(keep, score, float("-inf"))
            tl.store(cand_scores + level * WIDTH_PAD + pair, score, mask=pair < WIDTH_PAD)
            tl.store(cand_pairs + level * WIDTH_PAD + pair, which, mask=keep)
            # (the next depth's pairs index only the kept ranks, all below PAIR_PAD)
            above = tl.gather(score, tl.minimum(ranks, PAIR_PAD - 1), 0)
        tl.debug_barrier()
        # every depth's candidates, listed depth by depth: the best SIZE, shallower first on ties
        flat = tl.arange(0, CANDIDATE_PAD)
        listed = flat < DEPTH * WIDTH_PAD
        real_candidate = listed & (flat % WIDTH_PAD < tl.load(widths + flat // WIDTH_PAD, mask=listed, other=0))
        cand = tl.load(cand_scores + flat, mask=listed, other=float("-inf"))
        ranked = tl.sort(_sort_key(cand, flat, real_candidate, CANDIDATE_PAD), descending=True)
        score, chosen = _unpack(ranked, CANDIDATE_PAD)
        picked = flat < SIZE
        tl.store(node_of + chosen, flat + 1, mask=picked)
        tl.debug_barrier()
        level = chosen // WIDTH_PAD
        rank = chosen % WIDTH_PAD
        deeper = picked & (level > 0)
        pair_index = tl.load(cand_pairs + chosen, mask=deeper, other=0)
        pair_at = (level - 1) * PAIR_PAD + pair_index
        parent_rank = tl.load(left_table + pair_at, mask=deeper, other=0)
        token_at = tl.where(deeper, tl.load(token_table + pair_at, mask=deeper, other=0), rank)
        parent = tl.load(node_of + (level - 1) * WIDTH_PAD + parent_rank, mask=deeper, other=0)
        parent = tl.where(deeper, tl.minimum(tl.maximum(parent, 0), SIZE), 0)  # (picked first: always set)
        tl.store(out_ids + 1 + flat, tl.load(top_ids + token_at, mask=picked, other=0), mask=picked)
        tl.store(out_parents + 1 + flat, parent.to(tl.int64), mask=picked)
        tl.store(out_depths + 1 + flat, (level + 1).to(tl.int64), mask=picked)
        tl.store(out_scores + flat, score, mask=picked)
        # the ancestor-or-self mask over the root and the nodes: clear it, then walk every node up
        node = tl.arange(0, NODE_PAD)
        real = node <= SIZE
        rows = tl.arange(0, CLEAR_ROWS)
        for first in range(0, SIZE + 1, CLEAR_ROWS):
            row = first + rows[:, None]
            tl.store(mask + row * mask_stride + node[None, :], 0, mask=(row <= SIZE) & real[None, :])
        tl.debug_barrier()
        # every node's parent, by node (the root its own), in registers: the walk up gathers from it
        parent_of = tl.where((node > 0) & real, tl.gather(parent, tl.minimum(tl.maximum(node - 1, 0), CANDIDATE_PAD - 1), 0), 0)
        current = node
        tl.store(mask + node * mask_stride + node, 1, mask=real)
        for _ in range(DEPTH):
            current = tl.gather(parent_of, current, 0)
            tl.store(mask + node * mask_stride + current, 1, mask=real)
