"""The decoding engine: one target, its drafter, and the resources requests share.

`Engine` turns a request's prompt and options into a `Generation` (generation.py): it resolves the
request's decoding method (methods.py; for `--budget auto`, the device's calibrated round costs,
measured once, calibration.py), sizes the workspace for it (workspace.py) and hands both to the host
loop. `prepare` captures ahead of time every CUDA graph a kind of request can replay, as a server or
a benchmark does before it starts timing.
"""

from __future__ import annotations

import os

import torch
from jinja2 import TemplateError

from .calibration import (
    CalibrationKey, calibrate, calibration_contexts, device_description, load_or_calibrate, pair_description,
)
from .costs import AcceptanceModel, AutoBudgets, RoundCosts, candidate_sizes
from .drafter import Drafter
from .errors import DDTreeError
from .generation import BatchRunner, Generation, batch_sizes
from .loading import Target
from .methods import DecodingMethod, decoding_method, drafted_depths
from .model import compile_mode
from .options import Decoding, GenerationOptions
from .results import GenerationResult
from .sampling import SamplingParams
from .stages import Stage, Stages
from .workspace import Graphs, Workspace, buckets, round_up, tree_kernel_for


class Engine:
    def __init__(self, target: Target, drafter: Drafter | None, device: torch.device, dtype: torch.dtype,
                 cuda_graphs: bool = True):
        self.target, self.drafter = target, drafter
        self.model, self.tokenizer = target.model, target.tokenizer
        self.device, self.dtype = device, dtype
        self.context_limit = self.model.cfg.max_positions
        self.taps: tuple[int, ...] = ()
        self.block = 1
        if drafter is not None:
            check_pair(target, drafter)
            self.context_limit = min(self.context_limit, drafter.cfg.max_positions - drafter.cfg.block_size)
            self.taps, self.block = tuple(drafter.cfg.target_layer_ids), drafter.cfg.block_size
        self.graphs = Graphs(device, cuda_graphs)
        self.workspace: Workspace | None = None
        self.stages: Stages | None = None
        self.acceptance: AcceptanceModel | None = None  # auto's, kept while graphs read it
        self.autos: AutoBudgets | None = None
        self.prepared = (0, 0)  # the context and tree rows `prepare` made room for: never shrunk below
        self.outgrown_in_a_row = 0  # workspace requests in a row that needed far less than it holds
        self.tickets = 0  # generations started, numbered
        # Launch each round before reading the last one's outcome (`Generation.__iter__`): on a GPU the
        # host's work then overlaps the device's; on the CPU the host is the device, nothing overlaps.
        self.run_ahead = device.type == "cuda" and os.environ.get("DDTREE_RUN_AHEAD", "1") != "0"

    # ----- shared resources ------------------------------------------------------------------------

    def workspace_for(self, context: int, rows: int, batch: int = 1) -> Workspace:
        """The persistent buffers for `batch` sequences, grown (and graphs recaptured) when requests need more
        room than they have, and made again at the request's size once SHRINK_AFTER requests in a row needed
        far less than an outlier left them (what `prepare` made room for is kept: methods run in turns, as
        `bench` runs them, would otherwise remake it, and recapture every graph, at each turn; so would
        traffic that mixes long prompts with short ones, without the requests in a row)."""
        old = self.workspace
        kept = max(context, self.prepared[0]), max(rows, self.prepared[1])  # (what a shrink makes it again at)
        self.outgrown_in_a_row = self.outgrown_in_a_row + 1 if old is not None and outgrown(old, *kept) else 0
        shrink = self.outgrown_in_a_row >= SHRINK_AFTER
        if old is None or not old.fits(context, rows, batch) or shrink:
            if old is not None:
                batch = max(batch, old.batch)
                context, rows = kept if shrink else (max(context, old.context), max(rows, old.max_rows))
                old.owner = -1  # a runner still decoding there stops at its next round
            self.graphs.captured.clear()  # they point into the old buffers
            self.outgrown_in_a_row = 0
            self.workspace = self.stages = None  # let the old buffers go before the new ones are allocated
            self.workspace = Workspace(self.model, self.drafter, self.taps, self.dtype, round_up(context, 1024), rows,
                                       self.context_limit, self.graphs.enabled, batch)
            self.stages = Stages(self.model, self.drafter, self.workspace, self.graphs, self.acceptance)
        return self.workspace

    def tokens_held(self, prompt_tokens: int, new_tokens: int, block: int) -> int:
        """The cache room a request needs: committed tokens never pass its end by more than one round's
        path (`block`), nor the context limit."""
        return min(self.context_limit, prompt_tokens + new_tokens + block)

    def method_for(self, decoding: Decoding) -> DecodingMethod:
        """The method object for one generation; auto's first use loads or makes the calibration."""
        if decoding.drafts and self.drafter is None:
            raise DDTreeError(f"method {decoding.method!r} needs a drafter")
        autos = self.auto_budgets() if decoding.budget == "auto" else None
        return decoding_method(decoding, self.block, self.taps, self.drafted_vocab, autos)

    def auto_budgets(self, batch: int = 1) -> AutoBudgets:
        """auto's per-round budget choosers for rounds of up to `batch` sequences, from this device's stored
        calibration (measured now where missing: it uses the workspace, so never while requests decode)."""
        if not self.auto_calibrated(batch):
            self.use_costs(self.calibration(batch_sizes(batch), force=False))
        return self.autos

    def auto_calibrated(self, batch: int) -> bool:
        """Whether auto has choosers for every batch size of rounds over up to `batch` sequences."""
        return self.autos is not None and self.autos.covers(batch_sizes(batch))

    def auto_ready(self, decoding: Decoding, batch: int) -> bool:
        """Whether requests of `decoding` can decode in batches of up to `batch` without calibrating first."""
        return decoding.budget != "auto" or self.auto_calibrated(batch)

    def calibration(self, counts: list[int], force: bool) -> dict[int, RoundCosts]:
        """This device's round costs for auto at each batch size: stored, or measured now (and stored)."""
        return load_or_calibrate(self.calibration_key(), self.measure_costs, counts, force)

    def calibration_key(self) -> CalibrationKey:
        compiled = compile_mode() if self.model.compiled else None
        kernel = tree_kernel_for(self.device) is not None
        return CalibrationKey(device_description(self.device, self.dtype, self.graphs.enabled, compiled, kernel,
                                                 self.model.bf16_products),
                              pair_description(self.target.name, self.model.cfg, self.drafter.cfg, self.drafted_vocab))

    @property
    def exact(self) -> bool:
        """float32 throughout (no bfloat16 products): every method then reproduces the target alone token for token."""
        return self.dtype == torch.float32 and not self.model.bf16_products

    @property
    def drafted_vocab(self) -> int:
        """How many tokens the drafter may propose (`--draft-vocab`; else the whole vocabulary)."""
        vocab = self.model.cfg.vocab_size
        return self.drafter.drafted_vocab_size(vocab) if self.drafter is not None else vocab

    def measure_costs(self, count: int = 1) -> RoundCosts:
        """Times auto's stages for rounds of `count` sequences on this device, in the engine's own workspace
        and graphs."""
        sizes = candidate_sizes(self.device.type, self.block - 1, self.drafted_vocab)
        contexts = calibration_contexts(self.device, 1 + max(sizes), self.block, self.context_limit)
        ws = self.workspace_for(self.tokens_held(max(contexts), 8, self.block), 1 + max(sizes), count)
        self.use_acceptance(sizes)
        for index in range(count):
            ws.sampling.set(SamplingParams(), index)
        depth = drafted_depths(max(sizes), self.block, self.drafted_vocab)
        return calibrate(self.stages, sizes, contexts, self.taps, depth, count)

    def use_costs(self, costs: dict[int, RoundCosts], fresh: bool = False) -> None:
        """Calibrated costs by batch size for `auto`: choosers for the batch sizes it had none for. New tree
        sizes, or a calibration made again (`fresh`), replace them all, and learning starts afresh."""
        sizes = next(iter(costs.values())).sizes
        if fresh or self.autos is None or self.autos.sizes != sizes:
            self.use_acceptance(sizes)
            self.acceptance.reset()
            self.autos = AutoBudgets(self.acceptance)
        self.autos.add(costs)

    def use_acceptance(self, sizes: list[int]) -> None:
        """An acceptance model for these candidate sizes; graphs that read another one are dropped."""
        if self.acceptance is None or self.acceptance.sizes != list(sizes):
            self.acceptance = AcceptanceModel(sizes, self.device)
            self.graphs.captured.clear()
            if self.stages is not None:
                self.stages.acceptance = self.acceptance

    # ----- prompts -------------------------------------------------------------------------------

    def encode(self, prompt: str | list[dict] | list[int], chat: bool = False) -> list[int]:
        """Token ids of a prompt: raw ids, a message list (chat template), or text (chat template if `chat`).
        Text the tokenizer cannot take (a lone surrogate) or a template that fails is a DDTreeError."""
        try:
            return self.token_ids(prompt, chat)
        except (UnicodeError, ValueError, TypeError, TemplateError) as exc:
            raise DDTreeError(f"the prompt cannot be tokenized: {exc.__class__.__name__}: {exc}") from None

    def token_ids(self, prompt, chat: bool) -> list[int]:
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

    def stream(self, prompt, options: GenerationOptions | None = None, chat: bool = False, **fields) -> Generation:
        """An iterator of StreamChunk; after it ends, `.stats` holds timing and the prompt length. The
        options come as one object, or as its fields (method, budget, max_new_tokens, temperature, top_k,
        top_p, seed, stop)."""
        options = options or GenerationOptions.of(**fields)
        ids = self.encode(prompt, chat)
        if len(ids) >= self.context_limit:
            raise DDTreeError(f"the prompt has {len(ids)} tokens; the context holds {self.context_limit} in all")
        method = self.method_for(options.decoding)
        runner = self.runner(1, self.tokens_held(len(ids), options.max_new_tokens, method.block), method.rows)
        return Generation(runner, runner.add(ids, options, method))

    def generate(self, prompt, options: GenerationOptions | None = None, chat: bool = False,
                 **fields) -> GenerationResult:
        """Generates to completion; arguments as for `stream`."""
        chunks = self.stream(prompt, options, chat, **fields)
        token_ids, text, lengths, finish = [], "", [], "length"
        for chunk in chunks:
            token_ids += chunk.token_ids
            text += chunk.text
            if chunk.acceptance_length is not None:
                lengths.append(chunk.acceptance_length)
            finish = chunk.finish_reason or finish
        stats = chunks.stats
        return GenerationResult(text=text, token_ids=token_ids, prompt_tokens=stats["prompt_tokens"],
                                acceptance_lengths=lengths, seconds=stats["seconds"],
                                stage_seconds=stats["stage_seconds"], finish_reason=finish, method=stats["method"],
                                budget=stats["budget"], chosen_budgets=stats["budgets"])

    def runner(self, slots: int, context: int, rows: int) -> BatchRunner:
        """A batch of up to `slots` requests decoding at once in this engine's workspace (sized for `context`
        tokens per sequence and trees of `rows` rows), as `generate_batch` and the server use it. Once auto
        is in use, its costs at every batch size the runner's rounds can take are measured first, if new."""
        if self.autos is not None:
            self.auto_budgets(slots)
        return BatchRunner(self, slots, context, rows)

    def generate_batch(self, prompts: list, options: GenerationOptions | list[GenerationOptions] | None = None,
                       chat: bool = False, slots: int | None = None, **fields) -> list[GenerationResult]:
        """Generates every prompt to completion, up to `slots` of them at once (all by default), in shared
        rounds: a request joins when a slot frees up. `options` is one for all, one per prompt, or the fields
        of one (as for `stream`). Each result is what `generate` gives for that prompt alone."""
        if not prompts:
            return []
        if isinstance(options, list):
            if len(options) != len(prompts):
                raise DDTreeError(f"{len(options)} options for {len(prompts)} prompts")
        else:
            options = [options or GenerationOptions.of(**fields)] * len(prompts)
        ids = [self.encode(prompt, chat) for prompt in prompts]
        methods = [self.method_for(option.decoding) for option in options]
        context = max(self.tokens_held(len(i), o.max_new_tokens, m.block) for i, o, m in zip(ids, options, methods))
        runner = self.runner(min(slots or len(prompts), len(prompts)), context, max(m.rows for m in methods))
        requests = [runner.add(i, option, method) for i, option, method in zip(ids, options, methods)]
        for _ in runner.run():
            pass
        stage_seconds = runner.stage_seconds()
        return [request.result(stage_seconds, runner.rounds) for request in requests]

    def prepare(self, decoding: Decoding | None = None, context: int = 1024,
                sampling: SamplingParams | None = None, batch: int = 1) -> int:
        """Allocates the buffers for up to `batch` requests of up to `context` tokens each (prompt and answer
        together) and captures every CUDA graph a request decoding alone can replay, as a server does at
        start-up, so that no request pays for a capture mid-stream; auto's calibration (at every batch size up
        to `batch`) is made here too.
        Returns how many graphs were new (0 without graphs)."""
        decoding = decoding or Decoding()
        method = self.method_for(decoding)
        if decoding.budget == "auto":
            self.auto_budgets(batch)
        context = self.tokens_held(1, max(1, min(context, self.context_limit) - 1), method.block)
        self.prepared = (max(self.prepared[0], context), max(self.prepared[1], method.rows))
        ws = self.workspace_for(context, method.rows, batch)
        if not self.graphs.enabled:
            return 0
        ws.sampling.set(sampling or SamplingParams(), 0)
        before = len(self.graphs.captured)
        with torch.inference_mode():
            ws.committed.zero_()  # the warm-ups' cache rows, then, lie inside every shape's attended slots
            ws.pending_start.zero_()
            for stage in stages_to_prepare(self.stages, method, context):
                stage.capture()
        return len(self.graphs.captured) - before


# A workspace SHRINK_FACTOR times the context (or the rows) a request needs, and over SHRINK_FLOOR of it,
# was made for an outlier (one long prompt, one huge tree): after SHRINK_AFTER such requests in a row it is
# made again at the request's size.
SHRINK_FACTOR, SHRINK_FLOOR, SHRINK_AFTER = 4, {"context": 16384, "rows": 1024}, 4


def outgrown(workspace: Workspace, context: int, rows: int) -> bool:
    return ((workspace.context > SHRINK_FLOOR["context"] and workspace.context > SHRINK_FACTOR * round_up(context, 1024))
            or (workspace.max_rows > SHRINK_FLOOR["rows"] and workspace.max_rows > SHRINK_FACTOR * rows))


def stages_to_prepare(stages: Stages, method: DecodingMethod, context: int) -> list[Stage]:
    """Every stage a generation of `method` can run in a workspace for `context` tokens, at every shape:
    each tree its rounds build and verify at every attended length, the drafts, and the prefill (with the
    first draft) of every prompt length. Captured before the prefill: only the stages' warm-ups run, at an
    empty context, and what they write the prefill and the rounds rewrite before reading."""
    ws = stages.ws
    todo = method.tree_stages(stages)
    for rows in method.verified_rows():
        tree = ws.tree(1, rows)
        for attend in buckets(ws.attend, 1 + tree.rows, context + tree.rows, ws.attend_step):
            todo.append(stages.verify(tree, attend, method.taps))
        todo.append(stages.commit(tree, method.scored))
    lengths = range(1, min(context, ws.context_limit))
    if method.drafts:
        todo += [stages.draft(1, attend, method.draft_depth, method.chain, not method.chain)
                 for attend in buckets(ws.draft_attend, 1, context, ws.attend_step)]
        firsts = sorted({(ws.draft_attend(n), ws.prefill_rows(n)) for n in lengths})
        todo += [stages.absorb(attend, rows) for attend, rows in firsts]
    todo += [stages.prefill(rows, method.taps) for rows in sorted({ws.prefill_rows(n) for n in lengths})]
    return todo


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
