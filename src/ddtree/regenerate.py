"""Regenerate training responses with the target itself: batched decoding with left padding.

A drafter learns to predict what the target would say, so its training responses come from the
target (through its chat template), not from the dataset's original answers. Greedy answers teach
what the target says at temperature 0; sampled ones (temperature > 0) add what it may say when
sampling, which is where a greedy-trained drafter is accepted least.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from .loading import Target
from .parallel import gather_objects, world
from .sampling import SamplingParams, choose_tokens


def left_padded(batch: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, P] padded on the left, and the number of pads per row."""
    width = max(len(ids) for ids in batch)
    pads = torch.tensor([width - len(ids) for ids in batch], device=device)
    rows = [[pad] * (width - len(ids)) + ids for ids in batch]
    return torch.tensor(rows, device=device), pads


@torch.inference_mode()
def respond_batch(target: Target, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                  generator: torch.Generator | None) -> list[list[int]]:
    """Responses for a batch of tokenised prompts (greedy, or sampled per `params`); each ends at its
    first end token (kept)."""
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
    token = choose_tokens(model.logits(hidden[:, -1]), params, generator)
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
        token = choose_tokens(model.logits(hidden[:, -1]), params, generator)
    responses = []
    for row in out[:, :step + 1].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in target.eos_token_ids), len(row))
        responses.append(row[:end])
    return responses


def regenerate(target: Target, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
               temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Responses for all prompts, batched by similar length; returned in the prompts' order. Under
    torchrun each rank answers every size-th prompt and every rank returns all the responses."""
    rank, size = world()
    params = SamplingParams(temperature)
    generator = None
    if not params.greedy:
        generator = torch.Generator(target.model.embed_tokens.weight.device).manual_seed(seed * 1000 + rank)
    mine = sorted(range(rank, len(prompts), size), key=lambda i: len(prompts[i]))
    answered: dict[int, list[int]] = {}
    tokens, started = 0, time.perf_counter()
    with tqdm(total=len(mine), desc="regenerating", unit="prompt", disable=rank != 0) as bar:
        for begin in range(0, len(mine), batch_size):
            chunk = mine[begin:begin + batch_size]
            answers = respond_batch(target, [prompts[i] for i in chunk], max_new_tokens, params, generator)
            answered.update(zip(chunk, answers))
            tokens += sum(map(len, answers))
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{tokens * size / (time.perf_counter() - started):.0f}")  # ranks alike, about
    for part in gather_objects(answered):
        answered.update(part)
    return [answered[i] for i in range(len(prompts))]
