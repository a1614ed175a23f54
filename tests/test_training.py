"""The training pipeline on a tiny target: regenerate, train, checkpoint, resume; and the data hygiene."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from ddtree.cli import main
from ddtree.data import SequenceFile, remove_overlap, user_turns
from ddtree.drafter import load_drafter
from ddtree.train import loss_weights, make_batch, target_log_probs, target_pass, weighted_loss

TARGET = "qwen3"


def test_overlap_filter_drops_prompts_sharing_an_eight_gram():
    forbidden = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many in May."]
    prompts = ["Natalia sold clips to 48 of her friends in April and then she went home.",  # shares 8 words
               "Natalia sold pencils in April.", "Write a poem about the sea."]
    kept, dropped = remove_overlap(prompts, forbidden)
    assert kept == prompts[1:] and dropped == 1


def test_sharegpt_first_and_later_user_turns():
    talk = {"conversations": [{"from": "human", "value": " Plan a trip to Rome. "}, {"from": "gpt", "value": "..."},
                              {"from": "human", "value": "continue"}, {"from": "gpt", "value": "..."},
                              {"from": "human", "value": "Now make it three days shorter, please."}]}
    assert user_turns(talk, min_later_chars=20) == (["Plan a trip to Rome."], ["Now make it three days shorter, please."])
    opened_by_model = {"conversations": [{"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "Tell me a joke about cats."}]}
    assert user_turns(opened_by_model, min_later_chars=20) == ([], ["Tell me a joke about cats."])


def test_regenerated_responses_are_the_targets_greedy_output(model_dirs, make_engine, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    texts = ["Tell me a story.", "Count to five.", "Hi"]
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    out = tmp_path / "data.npz"
    assert main(["regenerate", "--target", model_dirs[TARGET], "--prompts", str(prompts), "--out", str(out),
                 "--max-new-tokens", "12", "--batch-size", "2"]) == 0
    sequences, starts = SequenceFile.load([str(out)])
    engine = make_engine(TARGET)
    for text, seq, start in zip(texts, sequences, starts):
        prompt = engine.encode(text, chat=True)
        assert seq[:start].tolist() == prompt
        expected = engine.generate(prompt, method="ar", max_new_tokens=12).token_ids
        assert seq[start:].tolist() == expected


def test_training_blocks_see_only_context_before_their_anchor():
    rng = np.random.default_rng(0)
    seqs = [np.arange(100, 140), np.arange(200, 220)]
    batch = make_batch(seqs, [10, 5], anchors_per_seq=4, block_size=4, mask_id=7, rng=rng, device="cpu")
    width = batch.ids.shape[1]
    for row in range(2):
        for j in range(4):
            anchor = int(batch.block_positions[row, j * 4])
            block_ids = batch.block_ids[row, j * 4:(j + 1) * 4].tolist()
            assert block_ids == [int(batch.ids[row, anchor]), 7, 7, 7]
            mask = batch.mask[row, 0, j * 4]
            assert mask[:width].nonzero().flatten().tolist() == list(range(anchor))
            assert mask[width:].nonzero().flatten().tolist() == list(range(j * 4, (j + 1) * 4))
            labels = batch.labels[row, j].tolist()
            truth = [int(batch.ids[row, p]) if p < len(seqs[row]) else -100 for p in range(anchor + 1, anchor + 4)]
            assert labels == truth


def test_expected_acceptance_is_the_chain_product_and_its_term_favours_early_positions():
    # One block of 3 labels, the last missing (the sequence ended): p = 0.5, 0.25 on the true tokens.
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.25, 0.75, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    logits = probs.clamp(min=1e-30).log()[None, None].requires_grad_(True)
    labels = torch.tensor([[[0, 0, -100]]])
    weights = loss_weights(4, None)
    _, stats = weighted_loss(logits, labels, weights)
    assert stats["expected_accept"] == pytest.approx(0.5 + 0.5 * 0.25)
    ce_only, _ = weighted_loss(logits, labels, weights)
    with_term, _ = weighted_loss(logits, labels, weights, accept_weight=1.0)
    assert with_term.item() == pytest.approx(ce_only.item() - (0.5 + 0.125) / 2)
    # The term's gradient pushes the first position (which gates both) harder than the second.
    (term_grad,) = torch.autograd.grad(with_term - ce_only, logits)
    first, second = -term_grad[0, 0, 0, 0], -term_grad[0, 0, 1, 0]
    assert first > second > 0 and term_grad[0, 0, 2].abs().sum() == 0


def test_distillation_term_is_the_kl_from_the_target_and_pulls_toward_it():
    """distill=1: the loss is the position-weighted KL(target || drafter), zero where the drafter equals
    the target; distill=0: cross-entropy alone; its gradient raises the drafter's share of a token the
    target likes but the label is not."""
    teacher = torch.log_softmax(torch.tensor([[[[2.0, 1.5, -1.0, 0.0], [0.0, 0.0, 3.0, 0.0]]]]), dim=-1)
    labels = torch.tensor([[[0, 2]]])
    weights = loss_weights(3, None)
    same, _ = weighted_loss(teacher.clone(), labels, weights, teacher=teacher, distill=1.0)
    assert same.item() == pytest.approx(0.0, abs=1e-6)
    logits = torch.zeros(1, 1, 2, 4, requires_grad=True)
    kl = (teacher.exp() * (teacher - torch.log_softmax(logits.detach(), -1))).sum(-1)[0, 0]
    distilled, _ = weighted_loss(logits, labels, weights, teacher=teacher, distill=1.0)
    assert distilled.detach().item() == pytest.approx(float((kl * weights).sum() / weights.sum()))
    plain, _ = weighted_loss(logits, labels, weights)
    unmixed, _ = weighted_loss(logits, labels, weights, teacher=teacher, distill=0.0)
    assert unmixed.detach().item() == pytest.approx(plain.detach().item())
    (grad,) = torch.autograd.grad(distilled, logits)
    assert grad[0, 0, 0, 1] < 0 < grad[0, 0, 0, 2]  # token 1 (liked, not the label) up; token 2 down


def test_target_log_probs_are_the_targets_next_token_predictions_at_each_block_position(make_engine):
    engine = make_engine(TARGET)
    drafter = engine.drafter
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 250, size=n) for n in (30, 22)]
    size = drafter.cfg.block_size
    batch = make_batch(seqs, [4, 4], 3, size, drafter.cfg.mask_token_id, rng, "cpu")
    hidden, _ = target_pass(engine.target, drafter, batch.ids)
    teacher = target_log_probs(engine.target, hidden, batch, size)
    assert teacher.shape == (2, 3, size - 1, engine.model.cfg.vocab_size)
    checked = 0
    for row, seq in enumerate(seqs):
        full = torch.log_softmax(engine.model.logits(hidden[row]).float(), -1)
        for block in range(3):
            anchor = int(batch.block_positions[row, block * size])
            for k in range(1, size):
                if batch.labels[row, block, k - 1] >= 0:
                    assert torch.allclose(teacher[row, block, k - 1], full[anchor + k - 1])
                    assert anchor + k < len(seq)
                    checked += 1
    assert checked >= 2 * 3 * (size - 1) // 2


def test_train_checkpoint_and_resume(model_dirs, tmp_path):
    rng = np.random.default_rng(1)
    sequences = [rng.integers(3, 250, size=int(rng.integers(20, 40))).tolist() for _ in range(24)]
    data = tmp_path / "data.npz"
    SequenceFile.save(str(data), sequences, [5] * len(sequences))
    out = tmp_path / "drafter"
    common = ["train-drafter", "--target", model_dirs[TARGET], "--data", str(data), "--out", str(out),
              "--layers", "1", "--block-size", "8", "--batch-size", "4", "--anchors", "4", "--eval-every", "4",
              "--save-every", "4", "--eval-sequences", "4", "--eval-budgets", "4,16", "--accept-loss", "0.5",
              "--distill", "0.5"]
    assert main([*common, "--epochs", "1"]) == 0
    drafter = load_drafter(str(out))
    assert drafter.cfg.block_size == 8 and drafter.cfg.num_layers == 1
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    evals = [r for r in rows if "chain_tau" in r]
    assert evals and all(r["chain_tau"] >= 1 and r["tree_tau_16"] >= r["tree_tau_4"] >= 1 for r in evals)
    assert all(np.isfinite(r["loss"]) and 0 <= r["expected_accept"] <= 7 for r in rows)
    state = torch.load(out / "train_state.pt", weights_only=False)
    first_steps = state["step"]
    assert main([*common, "--epochs", "2", "--resume", "--max-minutes", "0"]) == 0  # one step, then out of time
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == first_steps + 1
    assert main([*common, "--epochs", "2", "--resume"]) == 0
    assert torch.load(out / "train_state.pt", weights_only=False)["step"] == 2 * first_steps
    assert os.path.getsize(out / "model.safetensors") > 0


@pytest.mark.parametrize("bad,says", [(["--data", "missing.npz"], "not found"), (["--distill", "1.5"], "between 0 and 1")])
def test_train_with_bad_input_is_a_clean_error(model_dirs, tmp_path, capsys, bad, says):
    data = tmp_path / "data.npz"
    SequenceFile.save(str(data), [list(range(3, 40))] * 4, [5] * 4)
    rc = main(["train-drafter", "--target", model_dirs[TARGET], "--out", str(tmp_path / "d"), "--data", str(data), *bad])
    assert rc == 2 and says in capsys.readouterr().err


def test_sampled_regeneration_is_seeded_and_differs_from_greedy(model_dirs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["Tell me a story.", "Count to five.", "Hi"]))
    runs = {}
    for name, options in {"greedy": [], "a": ["--temperature", "1", "--seed", "3"],
                          "b": ["--temperature", "1", "--seed", "3"], "c": ["--temperature", "1", "--seed", "4"]}.items():
        out = tmp_path / f"{name}.npz"
        assert main(["regenerate", "--target", model_dirs[TARGET], "--prompts", str(prompts), "--out", str(out),
                     "--max-new-tokens", "12", "--batch-size", "2", *options]) == 0
        runs[name] = [s.tolist() for s in SequenceFile.load([str(out)])[0]]
    assert runs["a"] == runs["b"]  # the seed decides
    assert runs["a"] != runs["greedy"] and runs["a"] != runs["c"]


def test_regeneration_and_training_under_torchrun(model_dirs, tmp_path):
    """Two processes (gloo, CPU): regeneration shares out the prompts and gives what one process gives;
    training splits every batch over both and rank 0 writes the checkpoint."""
    import subprocess
    import sys

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in ["Tell me a story.", "Count to five.", "Hi"]))
    regen = ["regenerate", "--target", model_dirs[TARGET], "--prompts", str(prompts), "--max-new-tokens", "12",
             "--batch-size", "2", "--device", "cpu"]
    assert main([*regen, "--out", str(tmp_path / "one.npz")]) == 0
    env = os.environ | {"OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ddtree.cli"]

    def run(args):
        done = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=600, env=env)
        if done.returncode != 0 and "terminate called without an active exception" in done.stderr:
            # About once in ten full test runs a gloo rank aborts in its C++ teardown after the work and
            # the barrier are done (the C++ runtime's message for a thread object destroyed while still
            # running; not root-caused, and twelve runs of this test alone passed): run once more, so
            # that only a repeatable failure fails the test.
            done = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[:3000]
        return done

    run([*regen, "--out", str(tmp_path / "two.npz")])
    one, two = (SequenceFile.load([str(tmp_path / f"{n}.npz")]) for n in ("one", "two"))
    assert [s.tolist() for s in one[0]] == [s.tolist() for s in two[0]] and one[1] == two[1]
    out = tmp_path / "drafter"
    train = ["train-drafter", "--target", model_dirs[TARGET], "--data", str(tmp_path / "two.npz"), "--out", str(out),
             "--device", "cpu", "--layers", "1", "--block-size", "8", "--batch-size", "2", "--anchors", "4",
             "--epochs", "2", "--eval-every", "2", "--save-every", "2", "--eval-sequences", "1", "--eval-budgets", "4"]
    done = run(train)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rows and all(np.isfinite(r["loss"]) for r in rows) and any("chain_tau" in r for r in rows)
    assert load_drafter(str(out)).cfg.block_size == 8
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2  # 2 epochs of 1 step (3 sequences, 1 held out)
