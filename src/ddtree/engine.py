"""The decoding engine: target-only (`ar`), chain DFlash (`dflash`) and DDTree (`ddtree`) in one loop.

All three methods share the caches, the verify forward and the acceptance walk; they differ only
in which tree is verified each round (none, a chain, or the best-first tree), so their speeds
compare fairly.

A round starts from the bonus token b at position s: a token the target chose whose K/V is not yet
in the cache. The drafter proposes a block after b, a tree is built from it, the target runs b plus
every node in one forward under the ancestor-only mask, and the walk keeps the longest path that
matches the target's own choices. The path's K/V rows move into place, their tapped features
become drafter context, and the choice at the path's end is the next bonus token.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .drafter import Drafter
from .errors import DDTreeError
from .loading import Target
from .model import causal_mask
from .sampling import SamplingParams, choose_tokens
from .results import GenerationResult, StreamChunk
from .stopping import StopChecker
from .tree import DraftTree, best_first_tree, chain_tree, compile_tree, empty_tree

METHODS = ("ar", "dflash", "ddtree")
# Default tree budgets: measured best on the 2-core CPU (docs/results/cpu-budgets.md); on CUDA the
# eager loop pays per-call overhead whatever the width, so a wider tree costs little.
DEFAULT_BUDGET = {"cpu": 16, "cuda": 64}
STAGES = ("prefill", "draft", "tree", "verify", "commit")


@dataclass
class Timer:
    """Wall-clock per stage; on CUDA it synchronises at stage ends so the figures mean something."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))
    last: float = field(default_factory=time.perf_counter)

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] += now - self.last
        self.last = now


class Engine:
    def __init__(self, target: Target, drafter: Drafter | None, device: torch.device, dtype: torch.dtype):
        self.target, self.drafter = target, drafter
        self.model, self.tokenizer = target.model, target.tokenizer
        self.device, self.dtype = device, dtype
        self.context_limit = self.model.cfg.max_positions
        if drafter is not None:
            check_pair(target, drafter)
            self.context_limit = min(self.context_limit, drafter.cfg.max_positions - drafter.cfg.block_size)
            self.taps = tuple(drafter.cfg.target_layer_ids)
        else:
            self.taps = ()

    # ----- prompts -------------------------------------------------------------------------------

    def encode(self, prompt: str | list[dict] | list[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt: raw ids, a message list (chat template), or text (chat template if `chat`)."""
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
        elif isinstance(prompt, list):
            ids = self.apply_chat_template(prompt)
        elif isinstance(prompt, str):
            if not prompt.strip():
                raise DDTreeError("the prompt is empty")
            ids = self.apply_chat_template([{"role": "user", "content": prompt}]) if chat else self.tokenizer.encode(prompt)
        else:
            raise DDTreeError(f"a prompt is text, a list of messages or a list of token ids, not {type(prompt).__name__}")
        if not ids:
            raise DDTreeError("the prompt is empty")
        return ids

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise DDTreeError("this target's tokenizer has no chat template; pass the prompt without --chat")
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)

    # ----- generation ----------------------------------------------------------------------------

    def generate(self, prompt, **kwargs) -> GenerationResult:
        """Generates to completion; keyword arguments as for `stream`."""
        chunks = self.stream(prompt, **kwargs)
        token_ids, text, lengths, finish = [], "", [], "length"
        for chunk in chunks:
            token_ids += chunk.token_ids
            text += chunk.text
            if chunk.acceptance_length is not None:
                lengths.append(chunk.acceptance_length)
            finish = chunk.finish_reason or finish
        stats = chunks.stats  # type: ignore[attr-defined]
        return GenerationResult(
            text, token_ids, stats["prompt_tokens"], lengths, stats["seconds"], stats["stage_seconds"], finish,
            stats["method"], stats["budget"],
        )

    def stream(
        self,
        prompt,
        method: str = "ddtree",
        budget: int | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        chat: bool = False,
    ) -> "Generation":
        """An iterator of StreamChunk; after it ends, `.stats` holds timing and the prompt length."""
        if method not in METHODS:
            raise DDTreeError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if method != "ar" and self.drafter is None:
            raise DDTreeError(f"method {method!r} needs a drafter")
        if budget is None:
            budget = DEFAULT_BUDGET.get(self.device.type, 64)
        if budget < 1:
            raise DDTreeError(f"budget must be >= 1, got {budget}")
        if max_new_tokens < 1:
            raise DDTreeError(f"max-new-tokens must be >= 1, got {max_new_tokens}")
        params = SamplingParams(temperature, top_k, top_p).validate()
        ids = self.encode(prompt, chat)
        if len(ids) >= self.context_limit:
            raise DDTreeError(f"the prompt has {len(ids)} tokens; the context holds {self.context_limit} in all")
        generator = None
        if not params.greedy:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(seed if seed is not None else torch.seed())
        stopper = StopChecker(self.tokenizer, self.target.eos_token_ids, stop or [], max_new_tokens)
        return Generation(self, ids, method, budget, params, generator, stopper)


class Generation:
    """One request's decoding state and loop, as an iterator of StreamChunk."""

    def __init__(self, engine: Engine, ids, method, budget, params, generator, stopper: StopChecker):
        self.engine, self.ids, self.method, self.params = engine, ids, method, params
        self.budget = budget if method == "ddtree" else None
        self.generator, self.stopper = generator, stopper
        self.taps = engine.taps if method != "ar" else ()  # target features only feed a drafter
        self.stats: dict = {"prompt_tokens": len(ids), "method": method, "budget": self.budget}

    def __iter__(self) -> Iterator[StreamChunk]:
        engine = self.engine
        model, drafter, device = engine.model, engine.drafter, engine.device
        timer = Timer(device)
        started = timer.last
        block = drafter.cfg.block_size if drafter is not None and self.method != "ar" else 1
        max_nodes = {"ar": 0, "dflash": block - 1, "ddtree": self.budget or 0}[self.method]
        prompt_len = len(self.ids)
        room = min(engine.context_limit, prompt_len + self.stopper.max_new_tokens)
        cache = model.new_cache(room + max_nodes + 1)
        draft_cache = drafter.new_cache(room) if block > 1 else None

        with torch.inference_mode():
            # Prefill: the prompt fills the cache; its last logits choose the first new token.
            ids = torch.tensor([self.ids], device=device)
            hidden, features = model(
                ids, torch.arange(prompt_len, device=device)[None], causal_mask(prompt_len, 0, device), cache, 0, self.taps
            )
            bonus = int(choose_tokens(model.logits(hidden[0, -1:]), self.params, self.generator)[0])
            timer.lap("prefill")
            committed = prompt_len  # K/V rows in the target cache; the bonus token sits at this position
            context_rows = 0  # context rows in the drafter cache
            pending = features  # target features of committed tokens the drafter has not seen yet
            chunk = self.stopper.push([bonus])
            yield chunk
            while chunk.finish_reason is None:
                # Tokens this round may still add after the bonus: the request's and the context's limits.
                room_left = min(self.stopper.remaining, engine.context_limit - committed - 1)
                if room_left < 1:
                    yield self.stopper.finish("length")
                    break
                depth_limit = min(block - 1, room_left - 1)
                tree = empty_tree()
                drafted = depth_limit > 0 and max_nodes > 0
                if drafted:
                    log_probs = self.draft(bonus, committed, context_rows, pending, draft_cache)[:depth_limit]
                    context_rows = committed
                    timer.lap("draft")
                    if self.method == "ddtree":  # near the end of the cache, fewer nodes fit
                        tree = best_first_tree(log_probs, min(max_nodes, cache.capacity - committed - 1))
                    else:
                        tree = chain_tree(log_probs)
                    timer.lap("tree")
                path, choices, features = self.verify(tree, bonus, committed, cache)
                timer.lap("verify")
                accepted = [bonus] + [tree.tokens[node - 1] for node in path[1:]]
                bonus = choices[path[-1]]
                if path[-1] != len(path) - 1:  # the path's rows are not already in place (a chain's always are)
                    cache.move_rows(torch.tensor(path, device=device) + committed, committed)
                if features is not None:
                    # Without a draft this round the drafter has not seen the older pending rows yet.
                    pending = features[:, path] if drafted else torch.cat([pending, features[:, path]], dim=1)
                committed += len(accepted)
                timer.lap("commit")
                chunk = self.stopper.push(accepted[1:] + [bonus])
                chunk.acceptance_length = len(chunk.token_ids)
                yield chunk
        self.stats["seconds"] = time.perf_counter() - started
        self.stats["stage_seconds"] = timer.seconds

    def draft(self, bonus: int, committed: int, context_rows: int, pending, draft_cache) -> torch.Tensor:
        """Per-depth log-probs [block-1, V] for the tokens after the bonus token, from one drafter pass."""
        engine = self.engine
        drafter, model, device = engine.drafter, engine.model, engine.device
        block = drafter.cfg.block_size
        block_ids = torch.full((1, block), drafter.cfg.mask_token_id, device=device)
        block_ids[0, 0] = bonus
        block_positions = torch.arange(committed, committed + block, device=device)[None]
        context_positions = torch.arange(context_rows, committed, device=device)[None]
        hidden = drafter(
            model.embed_tokens(block_ids), block_positions, pending, context_positions, None, draft_cache, context_rows
        )
        return torch.log_softmax(model.logits(hidden[0, 1:]), dim=-1)

    def verify(self, tree: DraftTree, bonus: int, committed: int, cache):
        """One target forward over the bonus token and every node; returns the accepted path (node
        indices from the root), the target's choice at every node, and the tapped features."""
        engine = self.engine
        compiled = compile_tree(tree, bonus, committed, engine.device)
        size = len(tree) + 1
        mask = torch.ones(size, committed + size, dtype=torch.bool, device=engine.device)
        mask[:, committed:] = compiled.mask
        hidden, features = engine.model(
            compiled.ids[None], compiled.positions[None], mask[None, None], cache, committed, self.taps
        )
        choices = choose_tokens(engine.model.logits(hidden[0]), self.params, self.generator).tolist()
        path = [0]
        while (child := tree.children.get((path[-1], choices[path[-1]]))) is not None:
            path.append(child)
        return path, choices, features


def check_pair(target: Target, drafter: Drafter) -> None:
    """Refuses a drafter that was not made for this target, with a message that says which part differs."""
    t, d = target.model.cfg, drafter.cfg
    if d.hidden_size != t.hidden_size:
        raise DDTreeError(f"drafter hidden size {d.hidden_size} does not match the target's {t.hidden_size}")
    if d.vocab_size != t.vocab_size:
        raise DDTreeError(f"drafter vocabulary ({d.vocab_size}) does not match the target's ({t.vocab_size})")
    if not 0 <= d.mask_token_id < t.vocab_size:
        raise DDTreeError(f"drafter mask token id {d.mask_token_id} is outside the target's vocabulary of {t.vocab_size}")
    bad = [i for i in d.target_layer_ids if not 0 <= i < t.num_layers]
    if bad:
        raise DDTreeError(f"drafter reads target layers {bad}, but the target has layers 0..{t.num_layers - 1}")
    if d.num_target_layers is not None and d.num_target_layers != t.num_layers:
        raise DDTreeError(f"drafter was made for a target of {d.num_target_layers} layers; this one has {t.num_layers}")
