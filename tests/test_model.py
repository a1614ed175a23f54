"""Our Decoder against transformers' own models on the same weights, with and without the static cache."""

from __future__ import annotations

import pytest
import torch

from ddtree.loading import load_target, resolve_target
from ddtree.model import causal_mask

from conftest import FAMILIES, SMOLLM2


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-4):
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= rtol * scale, f"max |diff| {diff:.3g} exceeds {rtol} x max |logit| {scale:.3g}"


def full_logits(model, ids: list[int]) -> torch.Tensor:
    n = len(ids)
    hidden, _ = model(torch.tensor([ids]), torch.arange(n)[None], causal_mask(n, 0, "cpu"))
    return model.logits(hidden)[0]


def chunked_logits(model, ids: list[int], cuts: list[int]) -> torch.Tensor:
    """Feeds ids through the static cache in pieces (prefill, then the rest), positions continuing."""
    cache = model.new_cache(len(ids) + 5)
    out, start = [], 0
    for end in cuts + [len(ids)]:
        piece = ids[start:end]
        hidden, _ = model(torch.tensor([piece]), torch.arange(start, end)[None],
                          causal_mask(len(piece), start, "cpu"), cache, start)
        out.append(model.logits(hidden)[0])
        start = end
    return torch.cat(out)


@pytest.fixture(scope="module")
def hf_models(model_dirs):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = hf_model(model_dirs[name])
        return cache[name]

    return get


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_matches_transformers(family, targets, hf_models):
    target, ref_model = targets[family], hf_models(family)
    assert target.model.cfg.family == family
    assert target.model.cfg.tie_word_embeddings == FAMILIES[family][1]["tie_word_embeddings"]
    generator = torch.Generator().manual_seed(1)
    for length, cuts in [(29, [17, 23]), (12, [5]), (7, [1, 2])]:
        ids = torch.randint(0, target.model.cfg.vocab_size, (length,), generator=generator).tolist()
        with torch.inference_mode():
            ref = ref_model(torch.tensor([ids])).logits[0].float()
            assert_logits_close(full_logits(target.model, ids), ref)
            assert_logits_close(chunked_logits(target.model, ids, cuts), ref)


def test_qwen3_explicit_head_dim_is_used(targets):
    cfg = targets["qwen3"].model.cfg
    assert cfg.head_dim == 32 and cfg.head_dim * cfg.num_heads != cfg.hidden_size
    assert cfg.qk_norm


def test_llama_with_attention_bias_matches_transformers(targets, hf_models):
    """Llama with attention_bias=True has biases on q, k, v *and* o_proj (and mlp_bias on the MLP)."""
    target, ref_model = targets["llama_bias"], hf_models("llama_bias")
    ids = torch.randint(0, target.model.cfg.vocab_size, (21,), generator=torch.Generator().manual_seed(2)).tolist()
    with torch.inference_mode():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
        assert_logits_close(full_logits(target.model, ids), ref)
        assert_logits_close(chunked_logits(target.model, ids, [9, 15]), ref)


@pytest.mark.parametrize("taps", [(0, 2), (1,), (2, 0), (1, 1)])
def test_taps_are_decoder_layer_outputs_in_the_order_asked(taps, targets, hf_models):
    """Tap i is the output of decoder layer i (transformers' hidden_states[i + 1]), concatenated
    in the order the drafter lists them (a drafter's fc weight expects exactly that layout)."""
    target, ref_model = targets["qwen2"], hf_models("qwen2")
    ids = list(range(5, 25))
    n = len(ids)
    with torch.inference_mode():
        states = ref_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        _, features = target.model(torch.tensor([ids]), torch.arange(n)[None], causal_mask(n, 0, "cpu"), taps=taps)
    expected = torch.cat([states[i + 1] for i in taps], dim=-1)
    assert features is not None and features.shape == expected.shape
    assert_logits_close(features, expected)


SLIDING = {  # every layer sliding (Mistral), and some (Qwen2: layers from max_window_layers on)
    "mistral": ("MistralConfig", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", dict(sliding_window=8, use_sliding_window=True, max_window_layers=1)),
}


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_attention_matches_transformers(family, tmp_path, tokenizer):
    """Past the window, with and without the cache; and DDTree's trees (nodes at their depths' positions)
    decode exactly as the target alone does."""
    import transformers

    from ddtree.api import random_drafter
    from ddtree.engine import Engine

    class_name, overrides = SLIDING[family]
    config = getattr(transformers, class_name)(vocab_size=300, hidden_size=32, intermediate_size=64,
                                              num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=256, initializer_range=0.3, **overrides)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    target = load_target(str(tmp_path))
    assert target.model.cfg.sliding_window == 8 and target.model.cfg.max_positions == 256
    assert target.model.cfg.sliding_layers == ((0, 1, 2) if family == "mistral" else (1, 2))
    ref_model = hf_model(str(tmp_path))
    ids = torch.randint(0, 300, (30,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.inference_mode():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
        assert_logits_close(full_logits(target.model, ids), ref)
        assert_logits_close(chunked_logits(target.model, ids, [13, 21]), ref)
    engine = Engine(target, random_drafter(target, block_size=6), torch.device("cpu"), torch.float32)
    expected = engine.generate(ids, method="ar", max_new_tokens=30).token_ids
    assert engine.generate(ids, method="ddtree", budget=12, max_new_tokens=30).token_ids == expected


# ----- the real SmolLM2 --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_hf():
    return hf_model(resolve_target(SMOLLM2))


def test_smollm2_matches_transformers(smollm2_target, smollm2_hf):
    tok = smollm2_target.tokenizer
    ids = tok.encode("The quick brown fox jumps over the lazy dog because")
    assert len(ids) > 6
    model = smollm2_target.model
    with torch.inference_mode():
        ref = smollm2_hf(torch.tensor([ids])).logits[0].float()
        assert_logits_close(full_logits(model, ids), ref)
        assert_logits_close(chunked_logits(model, ids, [len(ids) - 4, len(ids) - 1]), ref)


def test_smollm2_tokenizer_ends_turns_with_im_end(smollm2_target):
    tok = smollm2_target.tokenizer
    assert tok.eos_token == "<|im_end|>"
    assert smollm2_target.eos_token_ids == {2}
    assert tok.convert_tokens_to_ids("<|im_end|>") == 2


def test_compiled_layers_decode_as_the_eager_ones_and_share_their_code(model_dirs):
    """--compile: every method's output unchanged, and the layers share the compiled code: three
    functions for the target's layers (4 here) and two for the drafter's, each compiled at most three
    times with a cache (the first row count, then any, and one row, which the compiler always
    specialises) and twice without one (the benchmark's margin forwards), whatever the prompt lengths
    and tree sizes; the commit's path search (two graphs); and the sampling noise, compiled too, draws
    what the eager one draws. (The compiler's default limit is eight variants a function, past which a
    compiled forward fails.)"""
    import torch._dynamo

    from conftest import random_prompts
    from ddtree.api import load
    from ddtree.bench import logit_margin

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    plain = load(model_dirs["qwen3"], "random", "cpu", "float32", quiet=True)
    compiled = load(model_dirs["qwen3"], "random", "cpu", "float32", quiet=True, compile=True)
    for prompt in random_prompts(3, plain.model.cfg.vocab_size, seed=5, min_len=3, max_len=30):
        for method in ("ar", "ddtree"):
            want = plain.generate(prompt, method=method, budget=6, max_new_tokens=10)
            got = compiled.generate(prompt, method=method, budget=6, max_new_tokens=10)
            assert got.token_ids == want.token_ids and got.acceptance_lengths == want.acceptance_lengths
        sampled = dict(method="ddtree", budget=6, max_new_tokens=10, temperature=0.8, seed=3)  # compiled noise too
        assert compiled.generate(prompt, **sampled).token_ids == plain.generate(prompt, **sampled).token_ids
        for method, budget in (("dflash", 6), ("ddtree", 3), ("ddtree", 12)):
            assert (compiled.generate(prompt, method=method, budget=budget, max_new_tokens=10).token_ids
                    == plain.generate(prompt, method=method, budget=budget, max_new_tokens=10).token_ids)
        assert logit_margin(compiled, prompt) == pytest.approx(logit_margin(plain, prompt), abs=1e-4)
    assert 5 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 20
    for model, names in ((compiled.model, ("project", "finish", "finish_and_project")),
                         (compiled.drafter, ("project", "finish"))):
        for name in names:  # one compiled function, shared by the layers
            assert len({getattr(layer, name).func for layer in model.layers}) == 1
    prompts = random_prompts(3, plain.model.cfg.vocab_size, seed=6, min_len=3, max_len=30)
    batch = compiled.generate_batch(prompts, method="ddtree", budget=6, max_new_tokens=10)  # per-sequence slots
    assert [r.token_ids for r in batch] == [plain.generate(p, method="ar", max_new_tokens=10).token_ids for p in prompts]


def test_compile_mode_comes_from_the_environment_and_is_checked(monkeypatch):
    from ddtree.errors import DDTreeError
    from ddtree.model import compile_mode

    monkeypatch.delenv("DDTREE_COMPILE_MODE", raising=False)
    assert compile_mode() == "default"
    monkeypatch.setenv("DDTREE_COMPILE_MODE", "max-autotune-no-cudagraphs")
    assert compile_mode() == "max-autotune-no-cudagraphs"
    monkeypatch.setenv("DDTREE_COMPILE_MODE", "reduce-overhead")  # its CUDA graphs would clash with the engine's
    with pytest.raises(DDTreeError, match="DDTREE_COMPILE_MODE='reduce-overhead'"):
        compile_mode()


ROPE_SCALINGS = {
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "linear": {"rope_type": "linear", "factor": 2.0},
}


@pytest.mark.parametrize("kind", sorted(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(kind, tmp_path, tokenizer):
    """Llama 3.x's `llama3`, YaRN (with its attention factor) and linear scaling, past the original length."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      initializer_range=0.3, rope_theta=10000.0, rope_scaling=ROPE_SCALINGS[kind])
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    target, ref_model = load_target(str(tmp_path)), hf_model(str(tmp_path))
    assert ref_model.config.rope_parameters["rope_type"] == kind
    ids = torch.randint(0, 300, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    with torch.inference_mode():
        ref = ref_model(torch.tensor([ids])).logits[0].float()
        assert_logits_close(full_logits(target.model, ids), ref)
        assert_logits_close(chunked_logits(target.model, ids, [40, 70]), ref)
