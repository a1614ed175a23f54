"""`--matmul-dtype`: the layers' matrix products with bfloat16 weights for a float32 model on the CPU (AMX).
Activations, attention and the target's logits stay float32; the draft's logits come from a bfloat16 head."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

import ddtree
from ddtree.api import pick_matmul_dtype
from ddtree.cli import main
from ddtree.errors import DDTreeError
from ddtree.model import BF16Linear

from conftest import random_prompts

TARGET = "qwen3"
CPU = torch.device("cpu")


def test_auto_gives_bf16_products_only_to_a_float32_model_on_a_cpu_with_amx(monkeypatch):
    assert pick_matmul_dtype("auto", CPU, torch.float32) == torch.float32  # (conftest: no AMX)
    assert pick_matmul_dtype(None, CPU, torch.float32) == torch.float32
    monkeypatch.setattr("ddtree.api.amx_available", lambda: True)
    assert pick_matmul_dtype("auto", CPU, torch.float32) == torch.bfloat16
    assert pick_matmul_dtype("auto", CPU, torch.bfloat16) == torch.bfloat16
    assert pick_matmul_dtype("auto", torch.device("cuda"), torch.float32) == torch.float32
    assert pick_matmul_dtype("float32", CPU, torch.float32) == torch.float32
    assert pick_matmul_dtype("bfloat16", CPU, torch.float32) == torch.bfloat16
    with pytest.raises(DDTreeError, match="only a float32 model on the CPU"):
        pick_matmul_dtype("bfloat16", torch.device("cuda"), torch.float32)
    with pytest.raises(DDTreeError, match="only a float32 model on the CPU"):
        pick_matmul_dtype("float32", CPU, torch.bfloat16)


def test_a_bf16_linear_rounds_its_weight_and_input_and_answers_in_float32():
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 10)
    x = torch.randn(5, 24)
    products = BF16Linear(linear)
    expected = F.linear(x.bfloat16(), linear.weight.bfloat16(), linear.bias.bfloat16()).float()
    assert products(x).dtype == torch.float32 and torch.equal(products(x), expected)
    assert not torch.equal(products(x), linear(x))  # (the rounding is real)


def test_bf16_products_keep_the_targets_logits_float32_and_decode(model_dirs, monkeypatch):
    """The layers' weights become bfloat16; the target's head stays float32 (unrounded logits from the head);
    the drafter proposes from a bfloat16 copy of the rows it drafts; every method decodes, the chain and trees
    mostly as `ar` does with the same products (a near-tie may round the other way); the calibration is its own."""
    plain = ddtree.load(model_dirs[TARGET], "random", "cpu", "float32", quiet=True)
    engine = ddtree.load(model_dirs[TARGET], "random", "cpu", "float32", quiet=True, matmul_dtype="bfloat16",
                         draft_vocab=200)
    model, drafter = engine.model, engine.drafter
    assert model.bf16_products and not plain.model.bf16_products
    assert {type(m) for m in model.layers.modules() if isinstance(m, (BF16Linear, torch.nn.Linear))} == {BF16Linear}
    assert model.lm_head.weight.dtype == torch.float32 and drafter.fc.weight.dtype == torch.float32
    assert drafter.head.dtype == torch.bfloat16 and len(drafter.head) == len(drafter.vocabulary) == 200
    hidden = torch.randn(3, model.cfg.hidden_size)
    assert torch.equal(model.logits(hidden), F.linear(hidden, model.lm_head.weight))
    draft = drafter.logits(model, hidden)
    assert draft.dtype == torch.float32 and draft.shape == (3, 200)
    assert torch.allclose(draft, F.linear(hidden, model.lm_head.weight[drafter.vocabulary]), atol=0.05)
    assert engine.calibration_key() != plain.calibration_key() and plain.exact and not engine.exact
    shared = total = 0
    prompts = random_prompts(4, model.cfg.vocab_size, seed=3, min_len=4, max_len=20)
    for prompt in prompts:
        ar = engine.generate(prompt, method="ar", max_new_tokens=24).token_ids
        for method, budget in (("dflash", None), ("ddtree", 8)):
            out = engine.generate(prompt, method=method, budget=budget, max_new_tokens=24).token_ids
            shared += next((i for i, (a, b) in enumerate(zip(out, ar)) if a != b), min(len(out), len(ar)))
            total += len(ar)
    assert shared >= 0.75 * total
    for budget in (8, "auto"):  # (batched: padded trees, and one shared budget verified packed)
        batch = engine.generate_batch(prompts, method="ddtree", budget=budget, max_new_tokens=12, slots=2)
        assert len(batch) == len(prompts) and all(0 < r.num_new_tokens <= 12 for r in batch)


def test_matmul_dtype_option(model_dirs, capsys):
    assert main(["generate", "--target", model_dirs[TARGET], "--drafter", "random", "--prompt", "hi",
                 "--max-new-tokens", "4", "--matmul-dtype", "bfloat16", "--json"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["generate", "--target", model_dirs[TARGET], "--prompt", "hi", "--matmul-dtype", "half"])
    assert "invalid choice" in capsys.readouterr()[1]
    assert main(["generate", "--target", model_dirs[TARGET], "--drafter", "random", "--prompt", "hi",
                 "--dtype", "bfloat16", "--matmul-dtype", "float32"]) != 0
    assert "only a float32 model on the CPU" in capsys.readouterr()[1]


def test_compare_says_why_outputs_differ_when_not_exact(capsys):
    from ddtree.cli import print_generation
    from ddtree.results import GenerationResult

    def result(ids, method):
        return GenerationResult(text="x", token_ids=ids, prompt_tokens=3, acceptance_lengths=[1] * len(ids),
                                seconds=0.01, stage_seconds={}, finish_reason="length", method=method, budget=None)
    print_generation(result([1, 2, 3], "ddtree"), result([1, 2, 3], "ar"), exact=True)
    assert "(identical output)" in capsys.readouterr()[1]
    print_generation(result([1, 2, 4], "ddtree"), result([1, 2, 3], "ar"), exact=True)
    assert "(OUTPUTS DIFFER)" in capsys.readouterr()[1]
    print_generation(result([1, 2, 4], "ddtree"), result([1, 2, 3], "ar"), exact=False)
    assert "differ from token 2: a near-tie rounded differently in bfloat16" in capsys.readouterr()[1]
