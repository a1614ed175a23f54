"""Packed rows (several sequences' tree rows one after another, no padding between them) through the
target: each row's hidden state, features and cached keys and values equal the padded layout's."""

from __future__ import annotations

import pytest
import torch

from ddtree.model import Packing, causal_mask
from ddtree.tree import ancestor_mask


def random_parents(width: int, generator: torch.Generator) -> torch.Tensor:
    """A random tree of `width` rows, parents first (row 0, the root, its own parent)."""
    return torch.tensor([0] + [int(torch.randint(j, (1,), generator=generator)) for j in range(1, width)])


@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen3_moe"])
def test_packed_rows_equal_padded_rows(targets, family):
    check_packed_rows(targets[family].model)


def test_packed_rows_equal_padded_rows_under_a_sliding_window(tmp_path, tokenizer):
    """A window of 4 positions: shorter than the prompts, so the padded layout's positions decide what each row sees."""
    import transformers

    from ddtree.loading import load_target

    config = transformers.MistralConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                                        max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = load_target(str(tmp_path)).model
    assert model.cfg.sliding_window == 4
    check_packed_rows(model)


def check_packed_rows(model) -> None:
    generator = torch.Generator().manual_seed(3)
    committed, used, width, capacity = [5, 9, 7], [6, 1, 4], 6, 64
    count, vocab = len(committed), model.cfg.vocab_size
    caches = [model.new_cache(capacity, count) for _ in range(2)]
    with torch.inference_mode():
        for b, length in enumerate(committed):
            prompt = torch.randint(vocab, (1, length), generator=generator)
            for cache in caches:
                model(prompt, torch.arange(length)[None], causal_mask(length, 0, "cpu"), cache.sequences(b, b + 1), 0)
        parents = torch.stack([random_parents(width, generator) for _ in range(count)])
        tree_mask = torch.stack([ancestor_mask(p, width) for p in parents])
        depths = tree_mask.sum(-1) - 1
        ids = torch.randint(vocab, (count, width), generator=generator)
        starts = torch.tensor(committed)[:, None]
        positions, slots = starts + depths, starts + torch.arange(width)
        attend = 32
        mask = (torch.arange(attend) < starts)[:, None, :].expand(count, width, attend).clone()
        mask.scatter_(2, slots[:, None, :].expand(count, width, width), tree_mask)
        taps = (0, model.cfg.num_layers - 1)
        hidden, features = model(ids, positions, mask[:, None], caches[0], slots, taps)
        packing = Packing.of(torch.tensor(used), sum(used) + 2, positions, slots)  # two rows of padding
        packed_hidden, packed_features = model(packing.packed(ids), packing.packed(positions), mask[:, None], caches[1],
                                               packing=packing, taps=taps)
    assert packed_hidden.shape == (1, sum(used) + 2, model.cfg.hidden_size)
    for b in range(count):
        rows = slice(0, used[b])
        torch.testing.assert_close(packing.padded(packed_hidden)[b, rows], hidden[b, rows], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(packing.padded(packed_features)[b, rows], features[b, rows], rtol=1e-5, atol=1e-5)
        written = slice(committed[b], committed[b] + used[b])
        torch.testing.assert_close(caches[1].kv[:, :, b, :, written], caches[0].kv[:, :, b, :, written], rtol=1e-5, atol=1e-5)
        before = slice(0, committed[b])  # the prompts' rows, untouched
        assert torch.equal(caches[1].kv[:, :, b, :, before], caches[0].kv[:, :, b, :, before])
    # padding wrote one slot past the first sequence's padded rows, nowhere else
    padding = committed[0] + width
    assert caches[1].kv[:, :, 0, :, padding].abs().sum() > 0 and caches[0].kv[:, :, 0, :, padding].abs().sum() == 0


def test_a_packing_places_each_sequence_s_rows_one_after_another():
    positions = torch.tensor([[10, 11, 11, 12], [3, 4, 5, 6], [7, 8, 8, 8]])
    rows = torch.tensor([[10, 11, 12, 13], [3, 4, 5, 6], [7, 8, 9, 10]])
    packing = Packing.of(torch.tensor([2, 1, 3]), 8, positions, rows)
    assert packing.pack[:6].tolist() == [0, 1, 4, 8, 9, 10]  # (flat places in the padded layout)
    assert packing.unpack.tolist() == [[0, 1, 0, 0], [2, 2, 2, 2], [3, 4, 5, 3]]
    assert packing.slots.sequence.tolist() == [0, 0, 1, 2, 2, 2, 0, 0]
    assert packing.slots.slot.tolist() == [10, 11, 3, 7, 8, 9, 14, 14]  # padding: past sequence 0's rows
    assert packing.packed(positions)[0].tolist()[:6] == [10, 11, 3, 7, 8, 8]
