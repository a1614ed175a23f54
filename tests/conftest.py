"""Shared fixtures: tiny random targets of every supported family, saved as Hugging Face model
directories with a small byte-level tokenizer, and engines built on them with random drafters.

Everything heavy is session-scoped and built lazily, so a test module only pays for what it uses.
"""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from ddtree.api import random_drafter
from ddtree.engine import Engine
from ddtree.generation import BatchRunner
from ddtree.loading import load_target
from ddtree.stages import Stages

torch.set_num_threads(2)
try:  # no "Writing model shards" bars on stderr while fixtures save models
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

@pytest.fixture(autouse=True)
def cpu_without_amx(monkeypatch):
    """Tests run as on a CPU without AMX, where `--matmul-dtype auto` keeps float32 products and every method
    reproduces `ar` token for token; tests of the bfloat16 products ask for them (or patch this back)."""
    monkeypatch.setattr("ddtree.api.amx_available", lambda: False)


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_SIZE = 256 + len(SPECIAL_TOKENS)  # 256 byte tokens + the specials (ids 256, 257, 258)
EOS_ID = 256
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.2,  # spread-out logits, so greedy choices are far from ties
    rms_norm_eps=1e-6,
)

# name -> (config class name, overrides). Tied embeddings both ways, a bias variant, an explicit head_dim.
FAMILIES = {
    "llama": ("LlamaConfig", dict(vocab_size=TOKENIZER_SIZE, tie_word_embeddings=False, rope_theta=10000.0)),
    "mistral": ("MistralConfig", dict(vocab_size=TOKENIZER_SIZE, tie_word_embeddings=True, rope_theta=1e6,
                                      sliding_window=4096)),
    "qwen2": ("Qwen2Config", dict(vocab_size=TOKENIZER_SIZE, tie_word_embeddings=False, rope_theta=1e6)),
    "qwen3": ("Qwen3Config", dict(vocab_size=TOKENIZER_SIZE, tie_word_embeddings=True, head_dim=32,
                                  rope_theta=1e6)),
}
# Used only where stated: a Llama with biases on every attention projection (o_proj included).
EXTRA_TARGETS = {
    "llama_bias": ("LlamaConfig", dict(vocab_size=TOKENIZER_SIZE, tie_word_embeddings=True, attention_bias=True,
                                       mlp_bias=True)),
    # a very small vocabulary, for statistical tests of sampling
    "small_vocab": ("Qwen3Config", dict(vocab_size=12, tie_word_embeddings=False, num_hidden_layers=2,
                                        initializer_range=0.3)),
    # a short context, for the context-limit tests
    "short_context": ("LlamaConfig", dict(vocab_size=TOKENIZER_SIZE, max_position_embeddings=48,
                                          num_hidden_layers=2)),
    # a different hidden size / vocabulary, to make mismatched drafters
    "other_hidden": ("Qwen3Config", dict(vocab_size=TOKENIZER_SIZE, hidden_size=32, intermediate_size=64)),
    "other_vocab": ("Qwen3Config", dict(vocab_size=300)),
}
# Qwen3-MoE, 4 experts and 2 a token: a dense layer among the mixtures by mlp_only_layers (top-k weights
# renormalised), or every other layer dense by decoder_sparse_step (weights as the router gives them)
MOE = dict(vocab_size=TOKENIZER_SIZE, tie_word_embeddings=False, head_dim=16, rope_theta=1e6, num_experts=4,
           num_experts_per_tok=2, moe_intermediate_size=32)
MOE_TARGETS = {
    "qwen3_moe": ("Qwen3MoeConfig", MOE | dict(num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True)),
    "qwen3_moe_sparse_step": ("Qwen3MoeConfig", MOE | dict(decoder_sparse_step=2, norm_topk_prob=False)),
}
ALL_TARGETS = FAMILIES | EXTRA_TARGETS | MOE_TARGETS
# a model's seed: its rank by name, the MoE targets (added later) ranked last so that the others keep theirs
SEEDS = {name: seed for seed, name in enumerate(sorted(FAMILIES | EXTRA_TARGETS) + sorted(MOE_TARGETS))}

SMOLLM2 = "smollm2-135m-instruct"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: expensive CPU runs (SmolLM2 at full size); run with -m slow")


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only when asked for with `-m slow` (or a -m expression naming it)."""
    if "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ----- tokenizer and model directories -----------------------------------------------------------

def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast


def save_tiny_model(name: str, path: str, tokenizer, seed: int = 0) -> str:
    import transformers

    class_name, overrides = ALL_TARGETS[name]
    config = getattr(transformers, class_name)(**(COMMON | overrides))
    config.eos_token_id = EOS_ID if EOS_ID < config.vocab_size else None
    config.bos_token_id = None
    config.pad_token_id = None
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    with torch.no_grad():  # random norms and biases too, so a missing or misplaced one would show
        for pname, param in model.named_parameters():
            if pname.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn_like(param))
            elif pname.endswith(".bias"):
                param.copy_(0.2 * torch.randn_like(param))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """name -> directory, each built on first use."""
    root = tmp_path_factory.mktemp("models")

    class Dirs(dict):
        def __missing__(self, name):
            path = save_tiny_model(name, str(root / name), tokenizer, seed=SEEDS[name])
            self[name] = path
            return path

    return Dirs()


@pytest.fixture(scope="session")
def targets(model_dirs):
    """name -> ddtree Target (fp32, cpu), loaded on first use."""

    class Targets(dict):
        def __missing__(self, name):
            target = load_target(model_dirs[name])
            self[name] = target
            return target

    return Targets()


@pytest.fixture(scope="session")
def make_engine(targets):
    """make_engine(name, layers=1, block_size=8, seed=0, **drafter_kwargs) -> Engine with a random drafter (cached)."""
    cache = {}

    def make(name, layers=1, block_size=8, seed=0, **kwargs):
        key = (name, layers, block_size, seed, tuple(sorted((k, tuple(v) if isinstance(v, list) else v)
                                                            for k, v in kwargs.items())))
        if key not in cache:
            target = targets[name]
            drafter = random_drafter(target, num_layers=layers, block_size=block_size, seed=seed, **kwargs)
            cache[key] = Engine(target, drafter, torch.device("cpu"), torch.float32)
        return cache[key]

    return make


def engine_with_eos(engine: Engine, eos_ids: set[int]) -> Engine:
    """The same models with other end-of-sequence ids."""
    target = dataclasses.replace(engine.target, eos_token_ids=set(eos_ids))
    return Engine(target, engine.drafter, engine.device, engine.dtype)


def random_prompts(count: int, vocab: int, seed: int, min_len: int = 1, max_len: int = 40) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


# ----- a drafter that knows the answer -------------------------------------------------------------

def device_prefix(request) -> list[int]:
    """A decoding request's tokens as its cache and bonus hold them at a launch: its prompt, its first token
    (read or not yet) and the tokens read since."""
    return list(request.ids) + (request.first() if request.first else []) + list(request.stopper.tokens)


class Oracle:
    """Wraps the draft stage: the real drafter still runs (so its cache is exercised), then the
    target's true continuation is written into the log-probs at a chosen rank per depth.

    `continuation(prefix_ids, n)` returns the n tokens the target will really choose after
    prefix_ids (the prompt, the committed tokens and the bonus token), or None to leave a depth alone.
    `rank(depth, position)` says where the true token goes: 0 = top (a chain finds it), 1 = second
    (only a tree with a sibling at that depth finds it), None = leave the drafter's output alone.
    Depths where the truth is unknown keep the (random, flat) drafter's log-probs.
    """

    def __init__(self, continuation, rank=lambda depth, position: 0, masses=(0.6, 0.3)):
        self.continuation, self.rank, self.masses = continuation, rank, masses
        self.calls = 0

    def install(self, monkeypatch):
        real_draft, real_launch = Stages.run_draft, BatchRunner.launch
        oracle, current = self, {}

        def launch(runner, **options):  # the requests whose round drafts next, each in its slot
            current["prefixes"] = {r.index: device_prefix(r) for r in runner.live()}
            return real_launch(runner, **options)

        def draft(stages, *args):
            real_draft(stages, *args)
            for index, prefix in current.pop("prefixes", {}).items():  # (a calibration's drafts: none)
                oracle.rewrite(stages.ws, index, prefix, stages.drafter.vocabulary)

        monkeypatch.setattr(BatchRunner, "launch", launch)
        monkeypatch.setattr(Stages, "run_draft", draft)
        return self

    def rewrite(self, ws, index: int, prefix: list[int], vocabulary: torch.Tensor | None) -> None:
        """`vocabulary`: the drafter's (sorted) drafted tokens, whose indices the log-probs are over; a true
        token outside it cannot be drafted, and its depth is left alone."""
        log_probs = ws.log_probs[index]  # edited in place: the tree stage reads it next
        self.calls += 1
        committed = int(ws.committed[index])
        assert prefix[-1] == int(ws.bonus[index]) and len(prefix) == committed + 1
        true = self.continuation(prefix, log_probs.shape[0])
        for depth, true_id in enumerate(true or []):
            rank = self.rank(depth, committed + 1 + depth)
            token = true_id if vocabulary is None else drafted_index(vocabulary, true_id)
            if token is None or rank is None:
                continue
            # A confident drafter: the top two tokens hold `masses` (0.6 and 0.3) of the probability,
            # the drafter's own ranking fills the rest. The truth is the top token or the runner-up.
            row = torch.log_softmax(log_probs[depth], dim=-1) - 5.0  # (stale after a chain's draft)
            order = row.argsort(descending=True)
            wrong = int(order[order != token][0])
            first, second = (token, wrong) if rank == 0 else (wrong, token)
            row[first], row[second] = math.log(self.masses[0]), math.log(self.masses[1])
            log_probs[depth] = torch.log_softmax(row, dim=-1)
            # what a chain drafts: each depth's likeliest, as a token id
            ws.chain_tokens[index, depth] = first if vocabulary is None else int(vocabulary[first])


def drafted_index(vocabulary: torch.Tensor, token: int) -> int | None:
    """Where `token` sits in a sorted drafted vocabulary, or None if it is not drafted."""
    at = int(torch.searchsorted(vocabulary, token))
    return at if at < len(vocabulary) and int(vocabulary[at]) == token else None


@pytest.fixture(scope="session")
def smollm2_target():
    """The real default target (SmolLM2-135M-Instruct, fp32 on the CPU)."""
    return load_target(SMOLLM2)
