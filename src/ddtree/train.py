"""Training a DFlash drafter on target-regenerated sequences (pipeline.py runs the whole recipe).

Each step: the frozen target runs over a batch of prompt+response sequences once and its tapped
layer outputs become context features. Many random anchors inside each response each make one
block [x_a, mask, ...] whose labels are the next block_size-1 tokens. All blocks of a sequence
train in one drafter pass under a block-sparse mask: a block sees its own tokens (both ways) and
the context strictly before its anchor, never another block. The loss is cross-entropy per block
position, weighted by exp(-(k-1)/gamma), optionally minus a multiple of the block's expected accepted
length under teacher forcing (`accept_loss`), which is what decoding rewards. With `distill` the
per-position loss mixes in the KL divergence from the target's own next-token distribution (from the
same target pass), which teaches the drafter the target's spread and not only its chosen tokens:
what sampling at temperature > 0 accepts.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tqdm import tqdm

from .drafter import Drafter, save_drafter, write_token_counts
from .errors import DDTreeError
from .loading import Target
from .model import causal_mask
from .parallel import any_rank, average_gradients, world
from .tree import best_first_tree

STATE_NAME = "train_state.pt"
METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    epochs: float = 6.0
    batch_size: int = 32  # sequences per step
    anchors: int = 64  # blocks per sequence per step
    max_len: int = 1024  # sequences are cut to this many tokens
    lr: float = 6e-4
    warmup: float = 0.04  # fraction of steps
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    gamma: float | None = None  # loss decay over block positions (None: 7 for block 16)
    accept_loss: float = 0.0  # weight of the expected-acceptance term (0: cross-entropy alone)
    distill: float = 0.0  # share of the per-position loss that is KL(target || drafter) (0: cross-entropy alone)
    eval_every: int = 500
    save_every: int = 500
    eval_sequences: int = 64
    eval_budgets: tuple[int, ...] = (16, 64, 256)
    seed: int = 0
    max_minutes: float | None = None  # checkpoint and stop after this long (resume with --resume)


def loss_weights(block_size: int, gamma: float | None) -> torch.Tensor:
    """exp(-(k-1)/gamma) for block positions k = 1..block_size-1 (gamma 7 for 16, 5 for 10, 4 for 8)."""
    if gamma is None:
        gamma = {16: 7.0, 10: 5.0, 8: 4.0}.get(block_size, block_size / 2.3)
    return torch.exp(-torch.arange(block_size - 1, dtype=torch.float32) / gamma)


def cosine_lr(step: int, total: int, warmup_steps: int, peak: float) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(total - warmup_steps, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] right-padded sequences
    block_ids: torch.Tensor  # [B, A * S]
    block_positions: torch.Tensor  # [B, A * S]
    labels: torch.Tensor  # [B, A, S - 1], -100 where there is no label
    mask: torch.Tensor  # bool [B, 1, A * S, T + A * S]


def make_batch(sequences, response_starts, anchors_per_seq, block_size, mask_id, rng: np.random.Generator,
               device, evenly: bool = False) -> Batch:
    """Blocks at random anchors inside each response (or evenly spaced ones with `evenly`, for evaluation).

    An anchor a can be any response position with at least one token after it; with `evenly` only
    anchors whose whole block of labels exists are used, so acceptance is not capped by the data.
    """
    width = max(len(s) for s in sequences)
    count, size = anchors_per_seq, block_size
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    anchors = torch.zeros(len(sequences), count, dtype=torch.long)
    live = torch.zeros(len(sequences), count, dtype=torch.bool)
    for row, (seq, start) in enumerate(zip(sequences, response_starts)):
        ids[row, :len(seq)] = torch.from_numpy(seq)
        last = len(seq) - (size if evenly else 2)  # the last usable anchor
        if last < start:
            continue
        choices = np.arange(start, last + 1)
        if evenly:
            picked = choices[np.linspace(0, len(choices) - 1, min(count, len(choices))).round().astype(int)]
        else:
            picked = rng.choice(choices, size=min(count, len(choices)), replace=False)
        picked = np.unique(picked)
        anchors[row, :len(picked)] = torch.from_numpy(picked)
        live[row, :len(picked)] = True
    # The rest is built where it is used: the mask is tens of MB a step, too slow to make on one CPU
    # thread (torchrun's default) and copy over.
    ids, anchors, live = ids.to(device), anchors.to(device), live.to(device)
    offsets = torch.arange(size, device=device)
    positions = anchors[:, :, None] + offsets  # [B, A, S]
    lengths = torch.tensor([len(s) for s in sequences], device=device)
    label_at = positions[:, :, 1:]
    has_label = live[:, :, None] & (label_at < lengths[:, None, None])
    labels = torch.where(has_label, ids.gather(1, label_at.clamp(max=width - 1).flatten(1)).view_as(label_at), -100)
    block_ids = torch.full_like(positions, mask_id)
    block_ids[:, :, 0] = ids.gather(1, anchors)
    # Block j sees the context strictly before its anchor and its own block, nothing else.
    context_mask = torch.arange(width, device=device)[None, None, :] < anchors[:, :, None]  # [B, A, T]
    context_mask = context_mask.repeat_interleave(size, dim=1)
    block_of = torch.arange(count * size, device=device) // size
    own_block = (block_of[:, None] == block_of[None, :])[None].expand(len(sequences), -1, -1)
    mask = torch.cat([context_mask, own_block], dim=-1)[:, None]
    return Batch(ids, block_ids.flatten(1), positions.flatten(1), labels, mask)


def drafter_logits(target: Target, drafter: Drafter, batch: Batch, features: torch.Tensor) -> torch.Tensor:
    """Drafter logits [B, A, S - 1, V] for every block position after the anchor."""
    model = target.model
    width = batch.ids.shape[1]
    context_positions = torch.arange(width, device=batch.ids.device)[None].expand(batch.ids.shape[0], -1)
    with torch.no_grad():
        block_embeds = model.embed_tokens(batch.block_ids)
    hidden = drafter(block_embeds, batch.block_positions, features, context_positions, batch.mask)
    size = drafter.cfg.block_size
    hidden = hidden.view(hidden.shape[0], -1, size, hidden.shape[-1])[:, :, 1:]
    return drafter.scale_logits(model.lm_head(hidden.to(model.lm_head.weight.dtype)))


def target_pass(target: Target, drafter: Drafter, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen target over the batch's sequences: its final hidden states [B, T, H] and the tapped
    layers' features the drafter reads."""
    model = target.model
    width = ids.shape[1]
    positions = torch.arange(width, device=ids.device)[None].expand(ids.shape[0], -1)
    with torch.no_grad():
        return model(ids, positions, causal_mask(width, 0, ids.device), None, 0, tuple(drafter.cfg.target_layer_ids))


@torch.no_grad()
def target_log_probs(target: Target, hidden: torch.Tensor, batch: Batch, block_size: int) -> torch.Tensor:
    """The target's next-token log-probs [B, A, S - 1, V] at every block position after the anchor: the
    label at position a + k is predicted at a + k - 1 (clamped inside the sequence where no label is)."""
    rows, width = hidden.shape[:2]
    at = batch.block_positions.view(rows, -1, block_size)[:, :, 1:].clamp(max=width) - 1
    picked = hidden.gather(1, at.flatten(1)[..., None].expand(-1, -1, hidden.shape[-1]))
    return torch.log_softmax(target.model.logits(picked).float(), dim=-1).view(*at.shape, -1)


def weighted_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, accept_weight: float = 0.0,
                  teacher: torch.Tensor | None = None, distill: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Position-weighted cross-entropy, minus `accept_weight` times the expected accepted share; with
    `teacher` (the target's log-probs at the same positions) a `distill` share of each position's loss
    is KL(target || drafter) instead of the cross-entropy.

    The expected accepted length of a block is sum_k prod_{j<=k} p_j, with p_j the drafter's
    probability of the true token at position j: a chain accepts position k only if every earlier
    one was right. Cross-entropy treats positions as independent, so it spends as much effort on a
    position behind an early likely miss as on the first; the acceptance term weighs each position
    by how often decoding reaches it. Divided by the block's label count it lies in [0, 1]; the
    cross-entropy keeps a gradient where every p is tiny (the product's vanishes there).
    """
    valid = labels >= 0
    log_q = torch.log_softmax(logits.float(), dim=-1)  # once, for the cross-entropy and the KL alike
    ce = -log_q.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    w = weights.to(logits.device)[None, None, :] * valid
    per_position = ce
    if teacher is not None and distill:
        kl = (teacher.exp() * (teacher - log_q)).sum(-1)
        per_position = (1 - distill) * ce + distill * kl
    loss = (per_position * w).sum() / w.sum().clamp(min=1e-6)
    # Labels run out only at a sequence's end, so a missing label ends the chain: its -log p counts as inf.
    reached = torch.exp(-torch.where(valid, ce, math.inf).cumsum(-1))  # [B, A, S-1]: prod_{j<=k} p_j
    blocks = valid[..., 0]
    expected = reached.sum(-1)[blocks]  # accepted drafted tokens per block (the target's token adds 1)
    if accept_weight:
        loss = loss - accept_weight * (expected / valid.sum(-1)[blocks]).mean()
    with torch.no_grad():
        top1 = ((logits.argmax(-1) == labels) & valid).float().sum() / valid.sum().clamp(min=1)
    return loss, {"top1": float(top1), "expected_accept": float(expected.detach().mean()) if len(expected) else 0.0}


@torch.no_grad()
def teacher_forced_acceptance(target: Target, drafter: Drafter, sequences, response_starts, budgets,
                              anchors_per_seq: int = 16, batch_size: int = 16) -> dict:
    """Mean acceptance length if the target's continuation is the data: chain and best-first trees."""
    device = target.model.embed_tokens.weight.device
    cfg = drafter.cfg
    chain, trees = [], {b: [] for b in budgets}
    rng = np.random.default_rng(0)
    for begin in range(0, len(sequences), batch_size):
        seqs, starts = sequences[begin:begin + batch_size], response_starts[begin:begin + batch_size]
        batch = make_batch(seqs, starts, anchors_per_seq, cfg.block_size, cfg.mask_token_id, rng, device, evenly=True)
        _, features = target_pass(target, drafter, batch.ids)
        with autocast(device):
            log_probs = torch.log_softmax(drafter_logits(target, drafter, batch, features).float(), dim=-1)
        labels = batch.labels
        for row, col in (labels[:, :, 0] >= 0).nonzero().tolist():
            truth = labels[row, col].tolist()
            matches = (log_probs[row, col].argmax(-1) == labels[row, col]).tolist()
            chain.append(1 + next((d for d, ok in enumerate(matches) if not ok), len(matches)))
            for budget in budgets:
                tree = best_first_tree(log_probs[row, col], budget)
                node, depth = 0, 0
                while depth < len(truth) and (node := tree.children.get((node, truth[depth]), -1)) >= 0:
                    depth += 1
                trees[budget].append(1 + depth)
    mean = lambda xs: float(np.mean(xs)) if xs else 0.0  # noqa: E731
    return {"chain_tau": mean(chain), **{f"tree_tau_{b}": mean(v) for b, v in trees.items()}, "anchors": len(chain)}


def autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@dataclass
class TrainingData:
    """The sequences cut to `max_len`, a held-out share for evaluation, and each step's batch: a fresh
    order every epoch and fresh anchors every step, both reproducible after a resume."""
    sequences: list
    response_starts: list[int]
    train_ids: list[int]
    eval_ids: list[int]
    cfg: TrainConfig

    @classmethod
    def split(cls, sequences, response_starts, cfg: TrainConfig) -> "TrainingData":
        order = list(range(len(sequences)))
        random.Random(cfg.seed).shuffle(order)
        held = max(1, min(cfg.eval_sequences, len(order) // 10))
        return cls([s[:cfg.max_len] for s in sequences], list(response_starts), order[held:], order[:held], cfg)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_ids) // self.cfg.batch_size)

    @property
    def total_steps(self) -> int:
        return max(1, int(self.cfg.epochs * self.steps_per_epoch))

    def held_out(self) -> tuple[list, list[int]]:
        return [self.sequences[i] for i in self.eval_ids], [self.response_starts[i] for i in self.eval_ids]

    def batch(self, step: int, rank: int, size: int, drafter_cfg, device) -> Batch:
        """This process's share of step `step`'s batch."""
        cfg, share = self.cfg, self.cfg.batch_size // size
        epoch, index = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng(cfg.seed + epoch).permutation(self.train_ids)
        picked = order[index * cfg.batch_size + rank * share:][:share]
        rng = np.random.default_rng([cfg.seed, step, rank])
        return make_batch([self.sequences[i] for i in picked], [self.response_starts[i] for i in picked], cfg.anchors,
                          drafter_cfg.block_size, drafter_cfg.mask_token_id, rng, device)


def train(target: Target, drafter: Drafter, sequences, response_starts, out: str, cfg: TrainConfig,
          resume: bool = False, log=print) -> dict:
    """Trains `drafter` in place; checkpoints (published format + train_state.pt) go to `out`. Returns the
    last step's metrics and `total_steps` (more than the step when the time limit stopped it).

    Under torchrun each rank takes its share of every step's batch and the gradients are averaged, so
    a step is the same step on any number of GPUs; rank 0 evaluates, logs and saves."""
    device = target.model.embed_tokens.weight.device
    rank, size = world()
    check_config(cfg, size)
    target.model.requires_grad_(False)
    drafter.train().requires_grad_(True)
    os.makedirs(out, exist_ok=True)
    if rank == 0:  # (what --draft-vocab picks the drafted tokens by)
        write_token_counts(out, sequences, response_starts, target.model.cfg.vocab_size)
    data = TrainingData.split(sequences, response_starts, cfg)
    total, warmup_steps = data.total_steps, max(1, int(cfg.warmup * data.total_steps))
    optimizer = torch.optim.AdamW(drafter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    weights = loss_weights(drafter.cfg.block_size, cfg.gamma)
    step = restore(drafter, optimizer, os.path.join(out, STATE_NAME), device) if resume else 0
    if step and rank == 0:
        log(f"resumed from step {step}")
    tokens_seen, started = 0, time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="training", unit="step", disable=rank != 0)
    record = {"step": step}
    while step < total:
        batch = data.batch(step, rank, size, drafter.cfg, device)
        lr = cosine_lr(step, total, warmup_steps, cfg.lr)
        loss, extra, grad_norm = train_step(target, drafter, optimizer, batch, weights, lr, cfg)
        step += 1
        tokens_seen += int((batch.labels >= 0).sum()) * size
        elapsed = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", top1=f"{extra['top1']:.3f}", tok_s=f"{tokens_seen / elapsed:.0f}")
        record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, **extra, "seconds": elapsed}
        # every rank must stop at the same step, so they agree on the clock (a one-number all-reduce)
        out_of_time = cfg.max_minutes is not None and any_rank(elapsed > 60 * cfg.max_minutes, device)
        if rank == 0:
            record = checkpoint(target, drafter, optimizer, data, record, out, last=step == total or out_of_time,
                                log=log)
        if out_of_time:
            break
    bar.close()
    return record | {"total_steps": total}


def check_config(cfg: TrainConfig, processes: int) -> None:
    if cfg.batch_size % processes:
        raise DDTreeError(f"--batch-size {cfg.batch_size} does not split evenly over {processes} processes")
    if not 0 <= cfg.distill <= 1:
        raise DDTreeError(f"--distill is a share of the loss, between 0 and 1 (got {cfg.distill})")


def restore(drafter: Drafter, optimizer, path: str, device) -> int:
    """The step a saved training state reached, its weights and optimizer state loaded (0 without one)."""
    if not os.path.isfile(path):
        return 0
    state = torch.load(path, map_location=device, weights_only=False)
    drafter.load_state_dict(state["drafter"])
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def train_step(target: Target, drafter: Drafter, optimizer, batch: Batch, weights: torch.Tensor, lr: float,
               cfg: TrainConfig) -> tuple[float, dict, float]:
    """One optimizer step on one batch: the loss, its extra figures and the gradient norm before clipping."""
    device = target.model.embed_tokens.weight.device
    for group in optimizer.param_groups:
        group["lr"] = lr
    hidden, features = target_pass(target, drafter, batch.ids)
    teacher = target_log_probs(target, hidden, batch, drafter.cfg.block_size) if cfg.distill else None
    with autocast(device):
        logits = drafter_logits(target, drafter, batch, features)
    loss, extra = weighted_loss(logits, batch.labels, weights, cfg.accept_loss, teacher, cfg.distill)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(drafter)
    grad_norm = float(torch.nn.utils.clip_grad_norm_(drafter.parameters(), cfg.grad_clip))
    optimizer.step()
    return loss.item(), extra, grad_norm


def checkpoint(target: Target, drafter: Drafter, optimizer, data: TrainingData, record: dict, out: str, last: bool,
               log) -> dict:
    """Rank 0 after a step: the held-out evaluation and its log line when due, the metrics file, and the
    drafter and training state every `save_every` steps and at the end."""
    cfg, step = data.cfg, record["step"]
    if step % cfg.eval_every == 0 or last:
        drafter.eval()
        record |= teacher_forced_acceptance(target, drafter, *data.held_out(), cfg.eval_budgets)
        drafter.train()
        log(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
    if step % 50 == 0 or "chain_tau" in record:
        with open(os.path.join(out, METRICS_NAME), "a") as f:
            f.write(json.dumps(record) + "\n")
    if step % cfg.save_every == 0 or last:
        save_drafter(drafter, out, dtype=torch.bfloat16)
        torch.save({"drafter": drafter.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                    "config": asdict(cfg)}, os.path.join(out, STATE_NAME))
    return record
