"""Regenerate training responses with the target itself: batched greedy decoding with left padding.

A drafter learns to predict what the target would say, so its training responses come from the
target (through its chat template), not from the dataset's original answers.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .loading import Target


def left_padded(batch: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, P] padded on the left, and the number of pads per row."""
    width = max(len(ids) for ids in batch)
    pads = torch.tensor([width - len(ids) for ids in batch], device=device)
    rows = [[pad] * (width - len(ids)) + ids for ids in batch]
    return torch.tensor(rows, device=device), pads


@torch.inference_mode()
def greedy_batch(target: Target, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy responses for a batch of tokenised prompts; each ends at its first end token (kept)."""
    model, device = target.model, target.model.embed_tokens.weight.device
    eos = torch.tensor(sorted(target.eos_token_ids), device=device)
    pad = int(eos[0])
    ids, pads = left_padded(prompts, pad, device)
    batch, width = ids.shape
    slots = torch.arange(width + max_new_tokens, device=device)
    valid = slots[None, :] >= pads[:, None]  # [B, slots]: False on the left padding
    cache = model.new_cache(width + max_new_tokens, batch=batch)
    positions = (slots[None, :width] - pads[:, None]).clamp(min=0)
    causal = torch.tril(torch.ones(width, width, dtype=torch.bool, device=device))
    # A padding query sees only itself, so no row of the mask is empty.
    mask = (causal[None] & valid[:, None, :width]) | torch.eye(width, dtype=torch.bool, device=device)[None]
    hidden, _ = model(ids, positions, mask[:, None], cache, 0)
    token = model.logits(hidden[:, -1]).argmax(-1)
    out = torch.empty(batch, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        token = torch.where(done, pad, token)
        out[:, step] = token
        done |= torch.isin(token, eos)
        if step + 1 == max_new_tokens or (step % 16 == 15 and bool(done.all())):
            break
        slot = width + step
        step_mask = valid[:, None, None, :slot + 1]
        hidden, _ = model(token[:, None], (slot - pads)[:, None], step_mask, cache, slot)
        token = model.logits(hidden[:, -1]).argmax(-1)
    responses = []
    for row in out[:, :step + 1].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in target.eos_token_ids), len(row))
        responses.append(row[:end])
    return responses


def regenerate(target: Target, prompts: list[list[int]], max_new_tokens: int, batch_size: int) -> list[list[int]]:
    """Responses for all prompts, batched by similar length; returned in the prompts' order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    responses: list[list[int]] = [[] for _ in prompts]
    with tqdm(total=len(prompts), desc="regenerating", unit="prompt") as bar:
        for begin in range(0, len(order), batch_size):
            chunk = order[begin:begin + batch_size]
            for index, response in zip(chunk, greedy_batch(target, [prompts[i] for i in chunk], max_new_tokens)):
                responses[index] = response
            bar.update(len(chunk))
    return responses
