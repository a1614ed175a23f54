"""Long prompts: the prefill runs in chunks (the mask and activations stay a chunk's size), and decoding
after a chunked prefill is exactly decoding after a whole one."""

from __future__ import annotations

import pytest

from ddtree import stages
from ddtree.stages import PREFILL_CHUNK, prefill_chunks
from ddtree.workspace import PREFILL_STEP


@pytest.mark.parametrize("rows", [1, 100, PREFILL_CHUNK, PREFILL_CHUNK + 1, PREFILL_CHUNK + PREFILL_STEP,
                                  3 * PREFILL_CHUNK - 5, 8192, 32768])
def test_chunks_cover_the_prompt_and_end_with_its_last_step(rows):
    chunks = prefill_chunks(rows)
    assert chunks[0][0] == 0 and chunks[-1][1] == rows
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert all(end - start <= PREFILL_CHUNK + PREFILL_STEP for start, end in chunks)
    assert len(chunks) == 1 or chunks[-1][1] - chunks[-1][0] >= PREFILL_STEP  # padding never fills the last chunk


def test_a_chunked_prefill_decodes_as_a_whole_one(make_engine, monkeypatch):
    engine = make_engine("qwen3", layers=1, block_size=8)
    prompt = [(7 * i + 3) % 250 for i in range(300)]
    whole = {method: engine.generate(prompt, method=method, budget=12, max_new_tokens=24).token_ids
             for method in ("ar", "ddtree")}
    monkeypatch.setattr(stages, "PREFILL_CHUNK", 32)
    monkeypatch.setattr(stages, "PREFILL_STEP", 32)
    assert len(prefill_chunks(300)) == 9
    for method, expected in whole.items():
        assert engine.generate(prompt, method=method, budget=12, max_new_tokens=24).token_ids == expected
    assert whole["ar"] == whole["ddtree"]
