"""Bad input through the command line: a non-zero exit, one line 'ddtree: error: ...' on stderr and
no traceback. Also `ddtree init-drafter` and the drafter config variants that must load."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from ddtree.cli import main
from ddtree.drafter import DrafterConfig, default_target_layer_ids, load_drafter
from ddtree.errors import DDTreeError

TARGET = "qwen3"


def cli(capsys, *args):
    capsys.readouterr()  # drop what building fixtures printed
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc, err, *words):
    assert rc != 0
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines!r}"
    assert lines[0].startswith("ddtree: error:")
    for word in words:
        assert word.lower() in lines[0].lower(), f"{word!r} not in {lines[0]!r}"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("errors")


@pytest.fixture(scope="module")
def drafters(model_dirs, work):
    """name -> drafter directory written by `ddtree init-drafter` (1 layer, block 8)."""

    class Drafters(dict):
        def __missing__(self, name):
            out = work / f"drafter-{name}"
            assert main(["init-drafter", "--target", model_dirs[name], "--layers", "1", "--block-size", "8",
                         "--out", str(out)]) == 0
            self[name] = str(out)
            return self[name]

    return Drafters()


def edited_copy(src: str, dst, **changes) -> str:
    """A copy of a model/drafter directory with config.json fields replaced (None deletes a field;
    'dflash_config.x' edits the nested dict)."""
    dst = str(dst)
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as f:
        config = json.load(f)
    for key, value in changes.items():
        holder, name = (config["dflash_config"], key.split(".", 1)[1]) if key.startswith("dflash_config.") else (config, key)
        if value is None:
            holder.pop(name, None)
        else:
            holder[name] = value
    with open(path, "w") as f:
        json.dump(config, f)
    return dst


def generate_args(target, drafter, *extra, prompt="hello there"):
    return ["generate", "--target", target, "--drafter", drafter, "--prompt", prompt, "--max-new-tokens", "4",
            "--device", "cpu", *extra]


# ----- drafter / target mismatches ------------------------------------------------------------------

def test_drafter_of_another_hidden_size(capsys, model_dirs, drafters):
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], drafters["other_hidden"]))
    assert_clean_error(rc, err, "hidden size")


def test_drafter_of_another_vocabulary(capsys, model_dirs, drafters):
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], drafters["other_vocab"]))
    assert_clean_error(rc, err, "vocabulary")


def test_drafter_layer_ids_out_of_range(capsys, model_dirs, drafters, work):
    bad = edited_copy(drafters[TARGET], work / "bad-layers", **{"dflash_config.target_layer_ids": [7]})
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], bad))
    assert_clean_error(rc, err, "layers")


def test_drafter_for_a_deeper_target(capsys, model_dirs, drafters, work):
    bad = edited_copy(drafters[TARGET], work / "bad-depth", num_target_layers=12)
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], bad))
    assert_clean_error(rc, err, "layers")


def test_drafter_mask_id_outside_vocabulary(capsys, model_dirs, drafters, work):
    bad = edited_copy(drafters[TARGET], work / "bad-mask", **{"dflash_config.mask_token_id": 5000})
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], bad))
    assert_clean_error(rc, err, "mask")


def test_init_drafter_with_mask_id_outside_vocabulary(capsys, model_dirs, work):
    rc, _, err = cli(capsys, "init-drafter", "--target", model_dirs[TARGET], "--mask-token-id", 999,
                     "--out", work / "never")
    assert_clean_error(rc, err, "mask")
    assert not os.path.exists(work / "never" / "model.safetensors")


def test_drafter_config_that_disagrees_with_its_weights(capsys, model_dirs, drafters, work):
    """config.json edited to another hidden size than the weights have: a clean error, not a traceback."""
    bad = edited_copy(drafters[TARGET], work / "bad-shape", hidden_size=32)
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], bad))
    assert_clean_error(rc, err)


def test_target_config_that_disagrees_with_its_weights(capsys, model_dirs, drafters, work):
    bad = edited_copy(model_dirs[TARGET], work / "bad-target-shape", hidden_size=32)
    rc, _, err = cli(capsys, *generate_args(bad, drafters[TARGET]))
    assert_clean_error(rc, err)


def test_drafter_config_is_not_json(capsys, model_dirs, drafters, work):
    bad = edited_copy(drafters[TARGET], work / "bad-json")
    with open(os.path.join(bad, "config.json"), "w") as f:
        f.write("{not json")
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], bad))
    assert_clean_error(rc, err, "drafter")


# ----- missing files ----------------------------------------------------------------------------------

def test_missing_target_directory(capsys, drafters, work):
    rc, _, err = cli(capsys, *generate_args(str(work / "no-such-target"), drafters[TARGET]))
    assert_clean_error(rc, err, "target")


@pytest.mark.parametrize("missing,word", [("config.json", "config.json"), ("model.safetensors", "safetensors")])
def test_target_without_a_file(missing, word, capsys, model_dirs, drafters, work):
    path = work / f"no-{missing}"
    shutil.copytree(model_dirs[TARGET], path, dirs_exist_ok=True)
    os.remove(path / missing)
    rc, _, err = cli(capsys, *generate_args(str(path), drafters[TARGET]))
    assert_clean_error(rc, err, word)


@pytest.mark.parametrize("family", ["qwen3", "llama"])
def test_target_without_tokenizer(family, capsys, model_dirs, drafters, work):
    """Config and weights but no tokenizer files: the error must say the tokenizer is missing."""
    path = work / f"no-tokenizer-{family}"
    path.mkdir(exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(model_dirs[family], name), path / name)
    rc, _, err = cli(capsys, *generate_args(str(path), drafters[family]))
    assert_clean_error(rc, err, "tokenizer")


def test_missing_drafter_directory(capsys, model_dirs, work):
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], str(work / "no-such-drafter")))
    assert_clean_error(rc, err, "drafter")


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_drafter_without_a_file(missing, capsys, model_dirs, drafters, work):
    path = edited_copy(drafters[TARGET], work / f"drafter-without-{missing}")
    os.remove(os.path.join(path, missing))
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], path))
    assert_clean_error(rc, err, missing)


# ----- bad generation settings ------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", "   \n"])
def test_empty_prompt(prompt, capsys, model_dirs, drafters):
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], drafters[TARGET], prompt=prompt))
    assert_clean_error(rc, err, "empty")


def test_empty_prompt_file(capsys, model_dirs, drafters, work):
    path = work / "empty.txt"
    path.write_text("")
    rc, _, err = cli(capsys, "generate", "--target", model_dirs[TARGET], "--drafter", drafters[TARGET],
                     "--prompt-file", path)
    assert_clean_error(rc, err, "empty")


@pytest.mark.parametrize("option,value,word", [
    ("--budget", "0", "budget"),
    ("--budget", "-3", "budget"),
    ("--temperature", "-0.5", "temperature"),
    ("--top-p", "0", "top-p"),
    ("--top-p", "1.5", "top-p"),
    ("--top-k", "-2", "top-k"),
    ("--max-new-tokens", "0", "max-new-tokens"),
])
def test_bad_generation_setting(option, value, word, capsys, model_dirs, drafters):
    rc, out, err = cli(capsys, *generate_args(model_dirs[TARGET], drafters[TARGET], option, value))
    assert_clean_error(rc, err, word)
    assert out == ""


def test_prompt_longer_than_the_context(capsys, model_dirs, drafters):
    rc, _, err = cli(capsys, *generate_args(model_dirs["short_context"], drafters["short_context"],
                                            prompt="x" * 60))
    assert_clean_error(rc, err, "context")


def test_prompt_exactly_filling_the_context(capsys, model_dirs, drafters):
    rc, _, err = cli(capsys, *generate_args(model_dirs["short_context"], drafters["short_context"],
                                            prompt="x" * 48))
    assert_clean_error(rc, err, "context")


def test_api_errors_are_ddtree_errors(make_engine):
    from ddtree.errors import DDTreeError

    engine = make_engine(TARGET)
    for kwargs in (dict(method="beam"), dict(budget=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(DDTreeError):
            engine.generate([1, 2, 3], max_new_tokens=2, **kwargs)
    for prompt in ([], "", "  "):
        with pytest.raises(DDTreeError):
            engine.generate(prompt, max_new_tokens=2)
    with pytest.raises(DDTreeError):
        engine.generate([1] * engine.context_limit, max_new_tokens=2)


# ----- init-drafter and drafter configs -----------------------------------------------------------------

PUBLISHED_KEYS = ["input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                  "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                  "self_attn.q_norm.weight", "self_attn.k_norm.weight", "mlp.gate_proj.weight",
                  "mlp.up_proj.weight", "mlp.down_proj.weight"]


def test_init_drafter_writes_the_published_format(capsys, model_dirs, targets, work):
    out = work / "init-2"
    rc, stdout, err = cli(capsys, "init-drafter", "--target", model_dirs[TARGET], "--layers", 2, "--out", out)
    assert rc == 0 and "Traceback" not in err
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    target_cfg = targets[TARGET].model.cfg
    assert config["model_type"] == "qwen3" and config["architectures"] == ["DFlashDraftModel"]
    assert config["block_size"] == 16
    assert config["num_target_layers"] == target_cfg.num_layers
    assert config["num_hidden_layers"] == 2
    assert config["hidden_size"] == target_cfg.hidden_size and config["vocab_size"] == target_cfg.vocab_size
    ids = config["dflash_config"]["target_layer_ids"]
    assert ids == default_target_layer_ids(target_cfg.num_layers, 2)
    assert all(0 <= i < target_cfg.num_layers for i in ids)
    mask = config["dflash_config"]["mask_token_id"]
    assert isinstance(mask, int) and 0 <= mask < target_cfg.vocab_size
    assert mask not in targets[TARGET].eos_token_ids

    weights = load_file(str(out / "model.safetensors"))
    hidden = target_cfg.hidden_size
    expected = {"fc.weight", "hidden_norm.weight", "norm.weight"} | {
        f"layers.{i}.{k}" for i in range(2) for k in PUBLISHED_KEYS}
    assert set(weights) == expected
    assert weights["fc.weight"].shape == (hidden, len(ids) * hidden)

    drafter = load_drafter(str(out))
    assert drafter.cfg.block_size == 16 and drafter.cfg.target_layer_ids == ids
    assert drafter.cfg.mask_token_id == mask and drafter.cfg.num_layers == 2
    for name, tensor in drafter.state_dict().items():
        assert torch.equal(tensor, weights[name])


def test_init_drafter_options(capsys, model_dirs, work):
    out = work / "init-options"
    rc, _, _ = cli(capsys, "init-drafter", "--target", model_dirs[TARGET], "--layers", 3, "--block-size", 10,
                   "--target-layer-ids", "0,1,3", "--mask-token-id", 100, "--seed", 3, "--out", out)
    assert rc == 0
    drafter = load_drafter(str(out))
    assert drafter.cfg.block_size == 10 and drafter.cfg.target_layer_ids == [0, 1, 3]
    assert drafter.cfg.mask_token_id == 100 and drafter.cfg.num_layers == 3


def test_two_layer_init_drafter_generates(capsys, model_dirs, work):
    """The default layer ids of a 2-layer drafter on a 4-layer target are [1, 1] (evenly spaced over
    1..N-3); the drafter must still run: features for each listed layer, in the listed order."""
    out = work / "init-2-run"
    assert cli(capsys, "init-drafter", "--target", model_dirs[TARGET], "--layers", 2, "--out", out)[0] == 0
    rc, stdout, err = cli(capsys, *generate_args(model_dirs[TARGET], str(out), "--json"))
    assert rc == 0, err
    assert json.loads(stdout)["num_new_tokens"] == 4


def test_default_target_layer_ids_rule():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # the published Qwen3-8B drafter
    assert default_target_layer_ids(30, 1) == [15]
    assert default_target_layer_ids(4, 1) == [2]
    assert default_target_layer_ids(28, 3) == [1, 13, 25]


def test_config_with_rope_parameters_nested_block_size_and_default_layers(model_dirs, drafters, work, targets):
    src = drafters[TARGET]  # 1 layer, block 8
    path = edited_copy(src, work / "variant", rope_theta=None,
                       rope_parameters={"rope_type": "default", "rope_theta": 5000.0},
                       block_size=None, **{"dflash_config.block_size": 8, "dflash_config.target_layer_ids": None})
    raw = json.loads(open(os.path.join(path, "config.json")).read())
    assert "rope_theta" not in raw and "block_size" not in raw and "target_layer_ids" not in raw["dflash_config"]
    drafter = load_drafter(path)
    n = targets[TARGET].model.cfg.num_layers
    assert drafter.cfg.block_size == 8
    assert drafter.cfg.target_layer_ids == [n // 2]
    head_dim = drafter.cfg.head_dim
    expected = 1.0 / (5000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    assert torch.allclose(drafter.rotary.inv_freq, expected)


def test_published_style_config_parses():
    raw = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": 4096,
           "intermediate_size": 12288, "num_hidden_layers": 5, "num_attention_heads": 32,
           "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-6, "vocab_size": 151936,
           "max_position_embeddings": 40960, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000},
           "num_target_layers": 36, "dflash_config": {"mask_token_id": 151669, "block_size": 16}}
    cfg = DrafterConfig.from_json(raw)
    assert cfg.block_size == 16 and cfg.mask_token_id == 151669
    assert cfg.target_layer_ids == [1, 9, 17, 25, 33] and cfg.num_target_layers == 36
    assert cfg.rope_parameters["rope_theta"] == 1000000


def test_shipped_config_parses():
    from ddtree.loading import CONFIGS_DIR

    with open(os.path.join(CONFIGS_DIR, "qwen3-8b-dflash-b16", "config.json")) as f:
        cfg = DrafterConfig.from_json(json.load(f))
    assert cfg.target_layer_ids == [1, 9, 17, 25, 33] and cfg.block_size == 16 and cfg.output_multiplier == 1.0


def test_a_sliding_layer_is_named_by_its_index():
    raw = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 300,
           "block_size": 8, "dflash_config": {"mask_token_id": 3, "target_layer_ids": [1]}, "sliding_window": 16,
           "layer_types": ["full_attention", "full_attention", "sliding_attention", "full_attention"]}
    with pytest.raises(DDTreeError, match="layer_types has 'sliding_attention' \\(layer 2\\)"):
        DrafterConfig.from_json(raw)


NEUTRAL_FIELDS = {"architectures": ["DFlashDraftModel"], "layer_types": ["full_attention"], "use_sliding_window": False,
                  "sliding_window": 4096, "max_window_layers": 28, "attention_dropout": 0.0, "is_causal": False,
                  "attention_bias": False, "hidden_act": "silu", "input_embedding_scale": 1.0,
                  "output_multiplier": 1.0, "final_logit_softcapping": None}


def test_published_fields_at_neutral_values_keep_loading(capsys, model_dirs, drafters, work):
    path = edited_copy(drafters[TARGET], work / "neutral", **NEUTRAL_FIELDS)
    assert load_drafter(path).cfg == load_drafter(drafters[TARGET]).cfg
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], path))
    assert rc == 0, err


def test_scale_fields_are_read_from_dflash_config_first():
    raw = {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "block_size": 4,
           "output_multiplier": 3.0, "final_logit_softcapping": -1.0,
           "dflash_config": {"mask_token_id": 3, "target_layer_ids": [1], "block_size": 8, "input_embedding_scale": 2}}
    cfg = DrafterConfig.from_json(raw)
    assert (cfg.block_size, cfg.input_embedding_scale, cfg.output_multiplier) == (8, 2.0, 3.0)
    assert cfg.final_logit_softcapping is None  # z-lab caps only with a positive value
    assert DrafterConfig.from_json(cfg.to_json()) == cfg


def test_input_embedding_scale_multiplies_the_block_embeddings(drafters, work):
    plain = load_drafter(drafters[TARGET])
    scaled = load_drafter(edited_copy(drafters[TARGET], work / "embedding-scale", **{"dflash_config.input_embedding_scale": 2.5}))
    cfg, generator = plain.cfg, torch.Generator().manual_seed(0)
    embeds = torch.randn(1, cfg.block_size, cfg.hidden_size, generator=generator)
    features = torch.randn(1, 5, len(cfg.target_layer_ids) * cfg.hidden_size, generator=generator)
    block_positions, context_positions = torch.arange(5, 5 + cfg.block_size)[None], torch.arange(5)[None]
    with torch.no_grad():
        expected = plain(2.5 * embeds, block_positions, features, context_positions)
        torch.testing.assert_close(scaled(embeds, block_positions, features, context_positions), expected)


def test_logit_scales_shape_the_drafts_and_keep_decoding_lossless(drafters, model_dirs, work, monkeypatch):
    import ddtree
    from ddtree.drafter import Drafter

    path = edited_copy(drafters[TARGET], work / "logit-scales", output_multiplier=0.5, final_logit_softcapping=3.0)
    drafter = load_drafter(path)
    logits = torch.linspace(-20, 20, 9)
    torch.testing.assert_close(drafter.scale_logits(logits), 3.0 * torch.tanh(0.5 * logits / 3.0))
    scaled = []
    real = Drafter.scale_logits
    monkeypatch.setattr(Drafter, "scale_logits", lambda self, x: scaled.append(x.shape) or real(self, x))
    engine = ddtree.load(model_dirs[TARGET], path, device="cpu")
    expected = engine.generate("hello there", method="ar", max_new_tokens=12).token_ids
    assert engine.generate("hello there", method="ddtree", budget=8, max_new_tokens=12).token_ids == expected
    assert scaled  # the draft stage's log-probs came through the scales


def test_bundled_drafter_is_found_by_alias_and_by_a_local_copy_of_the_model():
    from ddtree.api import BUNDLED_DRAFTERS, RANDOM_DRAFTER, bundled_drafter

    bundled = BUNDLED_DRAFTERS["smollm2-135m-instruct"]
    assert bundled_drafter("smollm2-135m-instruct", "anything") == bundled
    assert bundled_drafter("/tmp/x/SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1.gguf") == bundled
    assert bundled_drafter("/models/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct") == bundled
    assert bundled_drafter("/models/SmolLM2-135M", "SmolLM2-135M") == RANDOM_DRAFTER
    assert bundled_drafter("/models/SmolLM2-135M-Instruct-v2", "SmolLM2-135M-Instruct-v2") == RANDOM_DRAFTER


# ----- broken files and options (issue 23): one line each, no traceback --------------------------------

def spoiled_weights(directory: str, how: str) -> None:
    path = os.path.join(directory, "model.safetensors")
    data = open(path, "rb").read()
    spoiled = {"truncated": data[: len(data) // 3], "random": os.urandom(4096), "empty": b""}[how]
    with open(path, "wb") as f:
        f.write(spoiled)


@pytest.mark.parametrize("how", ["truncated", "random", "empty"])
@pytest.mark.parametrize("whose", ["target", "drafter"])
def test_unreadable_safetensors(how, whose, capsys, model_dirs, drafters, work):
    target = edited_copy(model_dirs[TARGET], work / f"target-{how}") if whose == "target" else model_dirs[TARGET]
    drafter = edited_copy(drafters[TARGET], work / f"drafter-{how}") if whose == "drafter" else drafters[TARGET]
    spoiled_weights(target if whose == "target" else drafter, how)
    rc, _, err = cli(capsys, *generate_args(target, drafter))
    assert_clean_error(rc, err, whose, "safetensors")


@pytest.mark.parametrize("config,word", [
    ([1, 2], "json object"),
    ({"dflash_config": "oops"}, "dflash_config"),
    ({"block_size": 1}, "block_size"),
    ({"block_size": "8"}, "block_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}, "dynamic"),
    # published fields that change what the drafter computes (z-lab/dflash dflash/model.py)
    ({"architectures": ["DFlash2DraftModel"]}, "architectures"),
    ({"architectures": ["MuseGlimmerAssistantModel"]}, "architectures"),
    ({"layer_types": ["sliding_attention"]}, "'sliding_attention' (layer 0)"),
    ({"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 0}, "'sliding_attention' (layer 0)"),
    ({"is_causal": True}, "is_causal"),
    ({"attention_bias": True}, "attention_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"input_embedding_scale": float("nan")}, "input_embedding_scale"),
    ({"output_multiplier": "2"}, "output_multiplier"),
    ({"dflash_config": {"mask_token_id": 3, "final_logit_softcapping": True}}, "final_logit_softcapping"),
])
def test_unusable_drafter_configs(config, word, capsys, model_dirs, drafters, work):
    bad = edited_copy(drafters[TARGET], work / "bad-config")
    path = os.path.join(bad, "config.json")
    if isinstance(config, dict):
        config = json.load(open(path)) | config
    with open(path, "w") as f:
        json.dump(config, f)
    rc, _, err = cli(capsys, *generate_args(model_dirs[TARGET], bad))
    assert_clean_error(rc, err, word)


def test_prompt_file_that_is_not_utf8(capsys, model_dirs, drafters, work):
    path = work / "latin1.txt"
    path.write_bytes(b"caf\xe9 \xff")
    rc, _, err = cli(capsys, "generate", "--target", model_dirs[TARGET], "--drafter", drafters[TARGET],
                     "--prompt-file", path, "--device", "cpu")
    assert_clean_error(rc, err, "utf-8")


@pytest.mark.parametrize("device", ["tpu", "cuda:banana"])
def test_unknown_device(device, capsys, model_dirs, drafters):
    rc, _, err = cli(capsys, "generate", "--target", model_dirs[TARGET], "--drafter", drafters[TARGET],
                     "--prompt", "hi", "--device", device)
    assert_clean_error(rc, err, "device")


def test_cache_directory_that_is_a_file(capsys, work, monkeypatch):
    from ddtree.loading import convert_gguf

    blocker = work / "cache-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DDTREE_CACHE", str(blocker))
    gguf = work / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(Exception) as raised:
        convert_gguf(str(gguf))
    assert "DDTREE_CACHE" in str(raised.value) and type(raised.value).__name__ == "DDTreeError"


@pytest.mark.parametrize("command", ["bench", "profile"])
def test_unwritable_out_is_refused_before_the_run(command, capsys, model_dirs, drafters, work):
    rc, _, err = cli(capsys, command, "--target", model_dirs[TARGET], "--drafter", drafters[TARGET],
                     "--device", "cpu", "--out", work)  # a directory
    assert_clean_error(rc, err, "--out")


def test_loadtest_against_a_server_that_is_not_ours(capsys):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Plain(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>hello</html>")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Plain)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        rc, _, err = cli(capsys, "loadtest", "--url", f"http://127.0.0.1:{server.server_port}", "--seconds", "1")
    finally:
        server.shutdown()
    assert_clean_error(rc, err, "openai-compatible")
