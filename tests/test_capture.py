"""Ahead-of-time graph capture (`Engine.prepare`): every graph a generation replays must already be
captured, so no request (and no benchmark) pays for a capture mid-stream. CUDA graphs need a GPU, so
here the graph cache is replaced by one that records which stage shapes are captured and which run."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ddtree.options import Decoding, GenerationOptions
from ddtree.sampling import SamplingParams
from ddtree.workspace import Graphs, buckets

TARGET = "qwen3"


class RecordingGraphs(Graphs):
    """Enabled like a CUDA graph cache, but stages run eagerly; keeps the keys captured and the keys run."""

    def __init__(self):
        super().__init__(torch.device("cpu"))
        self.enabled = True
        self.used: set[tuple] = set()

    def capture(self, key, stage, repeatable=True):
        if key not in self.captured:
            if repeatable:
                stage()
            self.captured[key] = key
        return key

    def run(self, key, stage, repeatable=True):
        self.used.add(key)
        stage()


class HostDataRefused(TorchDispatchMode):
    """Fails on a tensor made from host data (a Python number assigned into a tensor, torch.tensor(...)):
    inside a CUDA graph capture that is a host-to-device copy, which the capture refuses."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        assert func is not torch.ops.aten.lift_fresh.default, "a stage copies host data onto the device"
        return func(*args, **(kwargs or {}))


class ReplayingGraphs(Graphs):
    """CUDA graphs' semantics on the CPU: a key runs the work first captured under it, whatever function
    the caller passes later. A repeatable stage (running it twice equals once) also runs the caller's
    function afterwards, and the workspace must come out the same: one key, one piece of work. A stage
    may not copy host data (`HostDataRefused`)."""

    def __init__(self, engine):
        super().__init__(torch.device("cpu"))
        self.enabled, self.engine = True, engine

    def capture(self, key, stage, repeatable=True):
        return self.captured.setdefault(key, stage)

    def run(self, key, stage, repeatable=True):
        with HostDataRefused():
            self.capture(key, stage, repeatable)()
        if repeatable:
            replayed = self.state()
            stage()
            assert all(torch.equal(a, b) for a, b in zip(replayed, self.state())), f"two stages share {key}"

    def state(self) -> list[torch.Tensor]:
        ws = self.engine.workspace
        holders = [ws, ws.sampling, *ws.trees.values()]
        return [value.clone() for holder in holders for value in vars(holder).values() if isinstance(value, torch.Tensor)]


@pytest.fixture
def engine(make_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DDTREE_CACHE", str(tmp_path))  # (the calibration's home)
    built = make_engine(TARGET, layers=1, block_size=8)
    plain, built.graphs, built.autos, built.workspace = built.graphs, RecordingGraphs(), None, None
    yield built
    built.graphs, built.autos, built.workspace = plain, None, None


@pytest.mark.parametrize("method, budget", [("ar", None), ("dflash", None), ("ddtree", 12), ("ddtree", "auto")])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_prepare_captures_every_graph_a_generation_replays(engine, method, budget, temperature):
    from conftest import random_prompts

    prompts = random_prompts(3, engine.model.cfg.vocab_size, seed=5, min_len=2, max_len=60)
    new_tokens = 70  # past two 32-slot attention buckets beyond the longest prompt
    context = max(map(len, prompts)) + new_tokens
    count = engine.prepare(Decoding(method, budget), context, SamplingParams(temperature))
    assert count == len(engine.graphs.captured) > 0
    ahead = set(engine.graphs.captured)
    engine.graphs.used.clear()  # auto's first use calibrates, through graphs of its own
    for prompt in prompts:
        out = engine.generate(prompt, method=method, budget=budget, max_new_tokens=new_tokens,
                              temperature=temperature, seed=0)
        assert out.num_new_tokens == new_tokens or temperature > 0  # (a sample may end early)
    assert engine.graphs.used, "the generation ran no stage through the graph cache"
    assert engine.graphs.used <= ahead, sorted(map(str, engine.graphs.used - ahead))
    assert set(engine.graphs.captured) == ahead  # and nothing was captured during the generations
    assert engine.prepare(Decoding(method, budget), context, SamplingParams(temperature)) == 0  # all there
    # every sampling value of a mode replays the same graphs
    assert engine.prepare(Decoding(method, budget), context, SamplingParams(temperature * 0.7)) == 0


def test_prepare_keeps_the_output(engine):
    from conftest import random_prompts

    prompt = random_prompts(1, engine.model.cfg.vocab_size, seed=9, min_len=20, max_len=20)[0]
    expected = engine.generate(prompt, method="ar", max_new_tokens=40).token_ids
    engine.prepare(Decoding("ddtree", "auto"), 200)
    assert engine.generate(prompt, method="ddtree", budget="auto", max_new_tokens=40).token_ids == expected


def test_methods_sharing_an_engine_never_share_a_graph(engine):
    """dflash's chain and a ddtree tree of block - 1 nodes (7 here) have the same rows, but not the same
    draft (a chain keeps only its tokens), tree stage or buffers: their graphs must not be confused, either way."""
    from conftest import random_prompts

    engine.graphs = ReplayingGraphs(engine)
    prompts = random_prompts(2, engine.model.cfg.vocab_size, seed=3, min_len=5, max_len=30)
    expected = [engine.generate(p, method="ar", max_new_tokens=20).token_ids for p in prompts]
    for method, budget in [("dflash", None), ("ddtree", 7), ("ddtree", "auto"), ("dflash", None), ("ddtree", 12),
                           ("ar", None)]:
        for prompt, want in zip(prompts, expected):
            assert engine.generate(prompt, method=method, budget=budget, max_new_tokens=20).token_ids == want
    options = [GenerationOptions.of(method=m, budget=b, max_new_tokens=20, temperature=t, seed=1)  # and batched
               for m, b, t in (("dflash", None, 1.0), ("ddtree", "auto", 0.0), ("ar", None, 0.0), ("ddtree", 7, 0.0))]
    batch = engine.generate_batch([prompts[0], prompts[1], prompts[1], prompts[0]], options)
    assert [r.token_ids for r in batch][1:] == [expected[1], expected[1], expected[0]]
    shared = engine.generate_batch([prompts[0], prompts[1], prompts[1]], method="ddtree", budget="auto",
                                   max_new_tokens=20)  # one budget for the batch: its pool, share and packed verify
    assert [r.token_ids for r in shared] == [expected[0], expected[1], expected[1]]


def test_buckets_are_every_shape_between_the_ends():
    attend = lambda rows: min(-(-rows // 32) * 32, 300)  # noqa: E731
    assert buckets(attend, 5, 130, 32) == [32, 64, 96, 128, 160]
    assert buckets(attend, 40, 40, 32) == [64]
    assert buckets(attend, 250, 900, 32) == [256, 288, 300]


def test_auto_running_rounds_ahead_gives_the_same_tokens(engine, monkeypatch):
    from conftest import random_prompts

    for prompt in random_prompts(3, engine.model.cfg.vocab_size, seed=4, min_len=5, max_len=30):
        expected = engine.generate(prompt, method="ar", max_new_tokens=50).token_ids
        monkeypatch.setattr(engine, "run_ahead", True)
        assert engine.generate(prompt, method="ddtree", budget="auto", max_new_tokens=50).token_ids == expected
        monkeypatch.setattr(engine, "run_ahead", False)


def test_a_padded_prefill_gives_the_tokens_of_an_unpadded_one(engine):
    """With graphs, prompts run padded to a graph shape; the padding must change nothing."""
    from conftest import random_prompts

    prompts = random_prompts(3, engine.model.cfg.vocab_size, seed=2, min_len=3, max_len=50)
    outputs = {}
    for padded in (False, True):
        engine.graphs.enabled, engine.workspace = padded, None  # the workspace fixes its padding when made
        outputs[padded] = [engine.generate(p, method=method, budget=budget, max_new_tokens=30).token_ids
                           for p in prompts for method, budget in (("ar", None), ("dflash", None), ("ddtree", 12))]
        assert (engine.workspace.prefill_rows(7) > 7) == padded
        engine.generate(prompts[0], method="ddtree", budget=12, max_new_tokens=2)  # the prefill and the first draft
        outputs[padded].append(engine.workspace.log_probs.clone())
    assert outputs[True][:-1] == outputs[False][:-1]
    torch.testing.assert_close(outputs[True][-1], outputs[False][-1], rtol=1e-4, atol=1e-4)


def test_every_tree_stage_reads_log_probabilities(engine, monkeypatch):
    """A capture's warm-up runs a tree stage on whatever the last draft left: bench prepares ar, dflash and
    two tree sizes in turn, twice over (growing the workspace drops the graphs). A chain's draft keeping
    raw logits in the trees' buffer once fed the tree kernel positive scores, children outranked their
    parents and it read unset parent links: an illegal instruction on the H100 (issue 18)."""
    from ddtree.stages import Stages

    read = []
    build_tree = Stages.build_tree

    def recording(self, count, index, kind, plan, *args):
        if plan is not None:
            read.append(self.ws.log_probs[index, :plan.depth].clone())
        build_tree(self, count, index, kind, plan, *args)

    monkeypatch.setattr(Stages, "build_tree", recording)
    for _ in range(2):
        for method, budget in [("ar", None), ("dflash", None), ("ddtree", 8), ("ddtree", 12)]:
            engine.prepare(Decoding(method, budget), 100)
    assert read, "no tree stage was warmed up"
    assert all(not (lp > 0).any() and not lp.isnan().any() for lp in read)
