"""Loading weights lean (tensor by tensor into the built model, sharded or single files, never a second copy
on the host) and --dummy-weights: random weights at a config's shape, the configs ddtree ships, drafters too."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from ddtree.api import load
from ddtree.cli import main
from ddtree.drafter import DrafterConfig
from ddtree.errors import DDTreeError
from ddtree.loading import CONFIGS_DIR, bundled_configs, load_target
from ddtree.model import DecoderConfig


def logits_of(target, ids=(3, 17, 91, 5)) -> torch.Tensor:
    from ddtree.model import causal_mask

    tokens = torch.tensor([ids])
    hidden, _ = target.model(tokens, torch.arange(len(ids))[None], causal_mask(len(ids), 0, "cpu"))
    return target.model.logits(hidden)


def sharded_copy(model_dir: str, out: str, shard_size: str) -> str:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    model.save_pretrained(out, max_shard_size=shard_size)
    for name in os.listdir(model_dir):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(model_dir, name), out)
    return out


def test_a_sharded_checkpoint_loads_as_the_single_file_does(model_dirs, tmp_path):
    single = load_target(model_dirs["llama"])
    sharded_dir = sharded_copy(model_dirs["llama"], str(tmp_path / "sharded"), "60KB")
    assert os.path.isfile(os.path.join(sharded_dir, "model.safetensors.index.json"))
    assert len([n for n in os.listdir(sharded_dir) if n.endswith(".safetensors")]) > 2
    torch.testing.assert_close(logits_of(load_target(sharded_dir)), logits_of(single), rtol=0, atol=0)
    # in bfloat16 the weights are cast as they are copied in
    assert load_target(sharded_dir, dtype=torch.bfloat16).model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16


def test_a_missing_shard_or_weight_is_named(model_dirs, tmp_path):
    sharded_dir = sharded_copy(model_dirs["qwen3"], str(tmp_path / "sharded"), "60KB")
    shard = sorted(n for n in os.listdir(sharded_dir) if n.endswith(".safetensors"))[1]
    os.rename(os.path.join(sharded_dir, shard), os.path.join(tmp_path, shard))
    with pytest.raises(DDTreeError, match=f"shards named in .* are missing: {shard}"):
        load_target(sharded_dir)
    os.remove(os.path.join(sharded_dir, "model.safetensors.index.json"))  # the rest, read as plain files
    with pytest.raises(DDTreeError, match="weights do not match its config: missing"):
        load_target(sharded_dir)


LOAD_AND_MEASURE = textwrap.dedent("""
    import sys
    from ddtree.loading import load_target, peak_host_memory
    load_target(sys.argv[2])  # a tiny model first: the code that loading imports is not the model
    before = peak_host_memory()
    target = load_target(sys.argv[1])
    peak = peak_host_memory()
    sizes = [p.numel() * p.element_size() for p in target.model.parameters()]
    print(sum(sizes), max(sizes), peak - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_loading_holds_no_second_copy_of_the_model(tmp_path, tokenizer, model_dirs):
    """A single 90 MB file of many small tensors: the host's memory grows by the model, a tensor in flight
    and the allocator's slack (loading the whole file as a state dict and then copying it, as before,
    took twice the model and more)."""
    import transformers

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=24,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=4000,
                                      max_position_embeddings=256, tie_word_embeddings=False)
    model_dir = str(tmp_path / "model")
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    result = subprocess.run([sys.executable, "-c", LOAD_AND_MEASURE, model_dir, model_dirs["llama"]], capture_output=True, text=True,
                            check=True)
    size, largest, growth = map(int, result.stdout.split())
    assert size > 80e6 and largest < size / 20
    assert growth < size + 2 * largest + 24e6, (size, largest, growth)


def tiny_config(tmp_path, name: str, **overrides) -> str:
    """A directory holding only a config.json: a shipped config made small."""
    with open(os.path.join(CONFIGS_DIR, name, "config.json")) as f:
        config = json.load(f)
    config.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, **overrides)
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def test_shipped_configs_are_ones_ddtree_runs():
    from transformers import AutoConfig

    assert {"qwen3-4b", "qwen3-8b", "llama-3.1-8b-instruct", "qwen3-8b-dflash-b16"} <= set(bundled_configs())
    for name in bundled_configs():
        path = os.path.join(CONFIGS_DIR, name)
        raw = json.load(open(os.path.join(path, "config.json")))
        if "dflash_config" in raw:
            cfg = DrafterConfig.from_json(raw)
            assert cfg.block_size == 16 and cfg.target_layer_ids == [1, 9, 17, 25, 33]
        elif raw["model_type"] in ("llama", "qwen3"):
            cfg = DecoderConfig.from_hf(AutoConfig.from_pretrained(path))
            assert cfg.hidden_size >= 2560 and cfg.num_layers >= 32


def test_dummy_weights_decode_at_a_config_shape(tmp_path, capsys):
    """A directory with a config.json alone (the default target's tokenizer then), from the command line;
    random weights decode losslessly like any others."""
    target_dir = tiny_config(tmp_path, "qwen3-8b")
    drafter_dir = tiny_config(tmp_path, "qwen3-8b-dflash-b16", dflash_config={"mask_token_id": 151669,
                                                                               "target_layer_ids": [0, 1]},
                              num_target_layers=2, block_size=4, layer_types=["full_attention"] * 2)
    code = main(["generate", "--target", target_dir, "--drafter", drafter_dir, "--dummy-weights", "--device", "cpu",
                 "--prompt", "Tell me a story", "--max-new-tokens", "12", "--budget", "8", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr()[0])
    assert result["num_new_tokens"] == 12 and result["budget"] == 8
    engine = load(target_dir, drafter_dir, device="cpu", dummy_weights=True)
    assert engine.model.cfg.vocab_size == 151936 and engine.drafter.cfg.block_size == 4
    assert float(engine.model.layers[1].mlp.down_proj.weight.detach().std()) == pytest.approx(0.02, rel=0.1)  # initializer_range
    ids = engine.encode("Once upon a time")
    expected = engine.generate(ids, method="ar", max_new_tokens=10).token_ids
    assert engine.generate(ids, method="ddtree", budget=8, max_new_tokens=10).token_ids == expected


def test_dummy_weights_refuse_what_they_cannot_use(tmp_path, capsys):
    assert main(["generate", "--target", "qwen3-9b", "--dummy-weights", "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr()[1]
    assert "qwen3-9b" in err and "qwen3-8b" in err  # the shipped configs are listed
    (tmp_path / "empty").mkdir()
    with pytest.raises(DDTreeError, match="has no config.json"):
        load(str(tmp_path / "empty"), dummy_weights=True, device="cpu")


def test_weights_read_per_token_count_each_weight_once(targets):
    from ddtree.profile import weight_bytes_per_token

    for name in ("llama", "qwen3"):  # untied and tied embeddings
        model = targets[name].model
        every = sum(p.numel() * p.element_size() for p in model.parameters())  # (a tied weight once)
        embedding = model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
        tied = model.lm_head.weight is model.embed_tokens.weight
        assert weight_bytes_per_token(model) == (every if tied else every - embedding)


def test_a_mixture_reads_only_its_active_experts_per_token(tmp_path):
    from ddtree.profile import weight_bytes_per_token

    target = load_target(tiny_config(tmp_path, "qwen3-30b-a3b", num_experts=8, num_experts_per_tok=2,
                                     moe_intermediate_size=32), dummy=True)
    model = target.model
    experts = [m for m in model.modules() if type(m).__name__ == "Experts"]
    expert_bytes = sum(p.numel() * p.element_size() for m in experts for p in m.parameters())
    every = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    assert experts and weight_bytes_per_token(model) == every - embedding - expert_bytes + expert_bytes * 2 // 8


def test_a_bare_config_too_small_for_the_default_tokenizer_is_refused(tmp_path):
    with pytest.raises(DDTreeError, match="do not fit its vocabulary of 1000"):
        load_target(tiny_config(tmp_path, "qwen3-8b", vocab_size=1000), dummy=True)
