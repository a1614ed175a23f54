"""Qwen3-MoE: our mixture of experts (grouped GEMMs over the (token, expert) pairs sorted by expert) against
transformers' own model, the batched fallback against the grouped path, both checkpoint layouts (experts one by
one as on the Hub, or stacked), lossless decoding, compiled layers, and the shipped Qwen3-30B-A3B config."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ddtree.model as model_module
from ddtree.api import load
from ddtree.cli import main
from ddtree.errors import DDTreeError
from ddtree.loading import CONFIGS_DIR, load_target
from ddtree.model import Decoder, DecoderConfig, Experts, gathered_matmul, grouped_matmul

from conftest import MOE_TARGETS, TOKENIZER_SIZE, Oracle, random_prompts
from test_loading import tiny_config
from test_lossless import oracle_continuation, second_rank_every_fourth
from test_model import assert_logits_close, chunked_logits, full_logits, hf_model

# which layers have experts: mlp_only_layers [1] of 3 layers; decoder_sparse_step 2 of 4
MOE_LAYERS = {"qwen3_moe": (0, 2), "qwen3_moe_sparse_step": (1, 3)}


@pytest.fixture(scope="module")
def hf_models(model_dirs):
    return {name: hf_model(model_dirs[name]) for name in MOE_TARGETS}


def random_ids(count: int, seed: int) -> list[int]:
    return torch.randint(0, TOKENIZER_SIZE, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("name", sorted(MOE_TARGETS))
def test_decoder_matches_transformers(name, targets, hf_models):
    """Prefill and one-token decodes through the cache, and without a cache, as transformers computes them."""
    model, ref_model = targets[name].model, hf_models[name]
    assert model.cfg.moe_layers == MOE_LAYERS[name]
    assert [type(layer.mlp).__name__ for layer in model.layers] == [
        "SparseMoE" if i in MOE_LAYERS[name] else "MLP" for i in range(model.cfg.num_layers)]
    for length, cuts in [(29, [17, 28]), (12, [11]), (7, [1, 2])]:
        ids = random_ids(length, seed=length)
        with torch.inference_mode():
            ref = ref_model(torch.tensor([ids])).logits[0].float()
            assert_logits_close(full_logits(model, ids), ref)
            assert_logits_close(chunked_logits(model, ids, cuts), ref)


def random_routing(rows: int, hidden: int, experts: int, picks: int, dtype):
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, hidden, generator=generator).to(dtype)
    chosen = torch.rand(rows, experts, generator=generator).topk(picks, dim=-1).indices  # distinct experts a row
    return x, chosen, torch.rand(rows, picks, generator=generator).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_and_gathered_paths_agree(dtype, monkeypatch):
    experts = Experts(num_experts=6, hidden=32, intermediate=16).to(dtype)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0, 0.2)
    for rows in (1, 5, 40):  # some experts get no rows
        x, chosen, weights = random_routing(rows, 32, 6, 3, dtype)
        # one expert at a time, in plain Python: what both paths compute
        expected = torch.zeros(rows, 32)
        for row in range(rows):
            for pick in range(3):
                e = int(chosen[row, pick])
                gate, up = (experts.gate_up_proj[e].float() @ x[row].float()).chunk(2)
                out = experts.down_proj[e].float() @ (torch.nn.functional.silu(gate) * up)
                expected[row] += weights[row, pick].float() * out
        tolerance = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for grouped in {False, model_module.grouped_mm_runs(torch.device("cpu"), dtype)}:  # the grouped where it runs
            monkeypatch.setattr(model_module, "experts_use_grouped_mm", lambda *_, grouped=grouped: grouped)
            with torch.inference_mode():
                torch.testing.assert_close(experts(x, chosen, weights).float(), expected, **tolerance)


def test_both_paths_give_the_models_logits(targets, monkeypatch):
    model = targets["qwen3_moe_sparse_step"].model
    ids = random_ids(23, seed=4)
    with torch.inference_mode():
        monkeypatch.setattr(model_module, "experts_use_grouped_mm", lambda *_: True)
        grouped = full_logits(model, ids)
        monkeypatch.setattr(model_module, "experts_use_grouped_mm", lambda *_: False)
        gathered = full_logits(model, ids)
    torch.testing.assert_close(gathered, grouped, rtol=1e-5, atol=1e-5)


def test_where_grouped_gemms_run(monkeypatch):
    """On this CPU (torch >= 2.10) in float32: the path the comparisons with transformers take. On CUDA only
    bf16 on compute capability 9.x/10.x: elsewhere torch._grouped_mm reads its offsets on the host, which no
    CUDA graph can hold."""
    assert model_module.grouped_mm_runs(torch.device("cpu"), torch.float32)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    model_module.grouped_mm_runs.cache_clear()
    try:
        assert not any(model_module.grouped_mm_runs(torch.device("cuda"), dtype)
                       for dtype in (torch.float32, torch.float16, torch.bfloat16))
    finally:
        model_module.grouped_mm_runs.cache_clear()


def test_state_dict_shows_the_hub_names_as_views_and_loads_either_layout(targets, hf_models):
    model = targets["qwen3_moe"].model
    state = model.state_dict(keep_vars=True)
    expert_names = {f"layers.0.mlp.experts.{e}.{part}.weight" for e in range(4)
                    for part in ("gate_proj", "up_proj", "down_proj")}
    assert expert_names | {"layers.0.mlp.gate.weight"} <= set(state)
    assert not any(name.endswith(("gate_up_proj", "experts.down_proj")) for name in state)
    gate_up = model.layers[0].mlp.experts.gate_up_proj
    assert state["layers.0.mlp.experts.2.up_proj.weight"]._base is gate_up
    assert torch.equal(state["layers.0.mlp.experts.2.up_proj.weight"], gate_up[2, 32:])
    ids = random_ids(15, seed=5)
    with torch.inference_mode():
        expected = full_logits(model, ids)
        # load_state_dict takes our per-expert names and transformers' stacked ones
        hf_state = {k.removeprefix("model."): v for k, v in hf_models["qwen3_moe"].state_dict().items()}
        assert "layers.0.mlp.experts.gate_up_proj" in hf_state
        for source in (model.state_dict(), hf_state):
            copy = Decoder(model.cfg, model.rotary.inv_freq, model.rotary.scaling)
            copy.load_state_dict(source)
            torch.testing.assert_close(full_logits(copy, ids), expected, rtol=0, atol=0)


def test_stacked_checkpoints_load_as_the_hubs_per_expert_ones(model_dirs, targets, hf_models, tmp_path):
    """transformers saves the experts one by one (the Hub's layout) unless asked not to keep the original
    format: then stacked, under its parameters' names. Both load; an expert missing is named."""
    per_expert = load_file(os.path.join(model_dirs["qwen3_moe"], "model.safetensors"))
    assert "model.layers.2.mlp.experts.3.down_proj.weight" in per_expert
    stacked_dir = str(tmp_path / "stacked")
    hf_models["qwen3_moe"].save_pretrained(stacked_dir, save_original_format=False)
    targets["qwen3_moe"].tokenizer.save_pretrained(stacked_dir)
    stacked = load_file(os.path.join(stacked_dir, "model.safetensors"))
    assert "model.layers.2.mlp.experts.gate_up_proj" in stacked and not any(".experts.3." in k for k in stacked)
    ids = random_ids(11, seed=6)
    with torch.inference_mode():
        torch.testing.assert_close(full_logits(load_target(stacked_dir).model, ids),
                                   full_logits(targets["qwen3_moe"].model, ids), rtol=0, atol=0)
    del per_expert["model.layers.2.mlp.experts.3.up_proj.weight"]
    save_file(per_expert, os.path.join(stacked_dir, "model.safetensors"))
    with pytest.raises(DDTreeError, match=r"missing \['layers.2.mlp.experts.3.up_proj.weight'\]"):
        load_target(stacked_dir)


def test_ddtree_and_dflash_decode_as_ar(make_engine, monkeypatch):
    """A random drafter (every round accepts the bonus token alone), then one that knows the continuation
    (long accepted paths, some through second-ranked branches): every method gives ar's tokens."""
    engine = make_engine("qwen3_moe", layers=1, block_size=8)
    prompts = random_prompts(6, TOKENIZER_SIZE, seed=7, max_len=30)
    expected = [engine.generate(p, method="ar", max_new_tokens=40).token_ids for p in prompts]
    longer = [engine.generate(p, method="ar", max_new_tokens=56).token_ids for p in prompts]
    methods = [("dflash", 1), ("ddtree", 4), ("ddtree", 32)]
    for method, budget in methods:
        for prompt, want in zip(prompts, expected):
            assert engine.generate(prompt, method=method, budget=budget, max_new_tokens=40).token_ids == want
    Oracle(oracle_continuation(prompts, longer), rank=second_rank_every_fourth).install(monkeypatch)
    accepted = 0
    for method, budget in methods:
        for prompt, want in zip(prompts, expected):
            result = engine.generate(prompt, method=method, budget=budget, max_new_tokens=40)
            assert result.token_ids == want
            accepted = max(accepted, max(result.acceptance_lengths))
    assert accepted >= 4


def test_compiled_layers_compute_the_eager_logits(model_dirs, monkeypatch):
    """Compiled (whole graphs), the experts take the gathered path in float32 (the compiler's grouped GEMM
    takes bf16 only) and the grouped one in bf16 (where it runs: torch 2.13 on this CPU); bf16 logits within
    bf16's distance of float32's (eager bf16 is 0.015 of the largest logit away)."""
    import torch._dynamo

    traced = []
    for path in (grouped_matmul, gathered_matmul):  # the compiler calls them as it traces
        monkeypatch.setattr(model_module, path.__name__,
                            lambda *args, path=path: traced.append(path.__name__) or path(*args))
    ids = random_ids(13, seed=8)
    prefixes = (ids, ids[:9])  # a second row count: the symbolic one
    reference = load_target(model_dirs["qwen3_moe"]).model
    with torch.inference_mode():
        expected = [full_logits(reference, prefix) for prefix in prefixes]
    bf16_path = "grouped_matmul" if model_module.grouped_mm_runs(torch.device("cpu"), torch.bfloat16) else "gathered_matmul"
    for dtype, rtol, path in ((torch.float32, 1e-5, "gathered_matmul"), (torch.bfloat16, 0.04, bf16_path)):
        model = load_target(model_dirs["qwen3_moe"], dtype=dtype).model
        torch._dynamo.reset()
        model.compile_layers()
        traced.clear()
        with torch.inference_mode():
            for prefix, want in zip(prefixes, expected):
                assert_logits_close(full_logits(model, prefix), want, rtol=rtol)
                assert_logits_close(chunked_logits(model, prefix, [len(prefix) - 1]), want, rtol=rtol)
        assert set(traced) == {path}


def test_the_shipped_qwen3_30b_a3b_config():
    from transformers import AutoConfig

    cfg = DecoderConfig.from_hf(AutoConfig.from_pretrained(os.path.join(CONFIGS_DIR, "qwen3-30b-a3b")))
    assert cfg.family == "qwen3_moe" and cfg.qk_norm and cfg.moe_layers == tuple(range(48))
    assert (cfg.num_experts, cfg.experts_per_token, cfg.moe_intermediate_size, cfg.norm_topk_prob) == (128, 8, 768, True)


def test_dummy_weights_decode_at_a_shrunken_qwen3_30b_a3b(tmp_path, capsys):
    target_dir = tiny_config(tmp_path, "qwen3-30b-a3b", num_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=32, mlp_only_layers=[1])
    code = main(["generate", "--target", target_dir, "--drafter", "random", "--dummy-weights", "--device", "cpu",
                 "--prompt", "Tell me a story", "--max-new-tokens", "12", "--budget", "8", "--json"])
    assert code == 0
    assert json.loads(capsys.readouterr()[0])["num_new_tokens"] == 12
    engine = load(target_dir, "random", device="cpu", dummy_weights=True, quiet=True)
    assert engine.model.cfg.moe_layers == (0,) and engine.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 64, 64)
    ids = engine.encode("Once upon a time")
    expected = engine.generate(ids, method="ar", max_new_tokens=10).token_ids
    assert engine.generate(ids, method="ddtree", budget=8, max_new_tokens=10).token_ids == expected
