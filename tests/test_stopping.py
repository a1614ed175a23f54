"""Stopping: end tokens, stop strings, the token limit and the context limit, for every method,
including rounds that commit many tokens at once (the oracle drafter)."""

from __future__ import annotations

import pytest

from ddtree.stopping import StopChecker

from conftest import EOS_ID, Oracle, engine_with_eos, random_prompts

METHODS = [("ar", 1), ("dflash", 1), ("ddtree", 4), ("ddtree", 64)]
METHOD_IDS = [f"{m}{b if m == 'ddtree' else ''}" for m, b in METHODS]
FAMILY = "qwen3"
NEW = 64


# ----- StopChecker alone ------------------------------------------------------------------------------

def checker(tokenizer, stops=(), max_new=100, eos=(EOS_ID,)):
    return StopChecker(tokenizer, set(eos), list(stops), max_new)


def enc(tokenizer, text):
    return tokenizer.encode(text)


def test_checker_eos_is_kept_and_ends_the_burst(tokenizer):
    c = checker(tokenizer)
    chunk = c.push(enc(tokenizer, "ab") + [EOS_ID] + enc(tokenizer, "cd"))
    assert chunk.token_ids == enc(tokenizer, "ab") + [EOS_ID]
    assert chunk.finish_reason == "stop" and chunk.text == "ab"


def test_checker_token_limit_cuts_a_burst(tokenizer):
    c = checker(tokenizer, max_new=5)
    first = c.push(enc(tokenizer, "abc"))
    assert first.finish_reason is None and first.token_ids == enc(tokenizer, "abc")
    second = c.push(enc(tokenizer, "defg"))
    assert second.token_ids == enc(tokenizer, "de") and second.finish_reason == "length"
    assert first.text + second.text == "abcde"


def test_checker_stop_string_across_bursts(tokenizer):
    c = checker(tokenizer, stops=["lo w"])
    a = c.push(enc(tokenizer, "hel"))
    assert a.text == "he"  # "l" might begin the stop string: held back
    b = c.push(enc(tokenizer, "lo world"))
    assert b.finish_reason == "stop"
    assert b.token_ids == enc(tokenizer, "lo w")  # nothing after the token that completed the stop
    assert a.text + b.text == "hel"
    assert c.tokens == enc(tokenizer, "hello w")


def test_checker_earliest_of_several_stop_strings(tokenizer):
    c = checker(tokenizer, stops=["xyz", "b", "cd"])
    chunk = c.push(enc(tokenizer, "aacdbxyz"))
    assert chunk.finish_reason == "stop"
    assert chunk.token_ids == enc(tokenizer, "aacd") and chunk.text == "aa"


def test_checker_held_back_text_is_released(tokenizer):
    c = checker(tokenizer, stops=["ab"], max_new=3)
    x = c.push(enc(tokenizer, "xa"))
    assert x.text == "x"  # "a" might begin "ab": held back
    y = c.push(enc(tokenizer, "aq"))  # "xaa": the first "a" cannot; the limit then ends it all
    assert y.token_ids == enc(tokenizer, "a") and y.finish_reason == "length"
    assert x.text + y.text == "xaa"


def test_checker_multibyte_character_waits_for_all_its_bytes(tokenizer):
    c = checker(tokenizer)
    ids = enc(tokenizer, "é€")
    assert len(ids) == 5
    texts = [c.push([i]).text for i in ids]
    assert texts == ["", "é", "", "", "€"]
    assert c.finish("length").text == ""


def test_checker_finish_flushes_everything(tokenizer):
    c = checker(tokenizer, stops=["zq"])
    assert c.push(enc(tokenizer, "abz")).text == "ab"
    chunk = c.finish("length")
    assert chunk.text == "z" and chunk.finish_reason == "length"


# ----- end to end ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(FAMILY, layers=1, block_size=16)


@pytest.fixture(scope="module")
def refs(engine):
    """Prompts whose greedy output runs the full NEW + 16 tokens (no end token), with that output."""
    out = []
    for prompt in random_prompts(12, engine.model.cfg.vocab_size, seed=21, max_len=30):
        ids = engine.generate(prompt, method="ar", max_new_tokens=NEW + 16).token_ids
        if len(ids) == NEW + 16:
            out.append((prompt, ids))
    assert len(out) >= 4
    return out[:4]


@pytest.fixture
def oracle(refs, monkeypatch):
    """Rounds accept long paths: the true continuation on top (a chain finds all of it)."""
    table = dict((tuple(p), r) for p, r in refs)

    def continuation(prefix, n):
        for prompt, ref in table.items():
            done = len(prefix) - len(prompt)
            if tuple(prefix[:len(prompt)]) == prompt and list(prefix[len(prompt):]) == ref[:done]:
                return ref[done:done + n]
        return None

    return Oracle(continuation, masses=(0.9, 0.05)).install(monkeypatch)


def generate(engine, prompt, method, budget, **kwargs):
    return engine.generate(prompt, method=method, budget=budget, **kwargs)


def printable(tokenizer, token):
    text = tokenizer.decode([token])
    return len(text) == 1 and 32 <= ord(text) < 127


@pytest.mark.parametrize("method,budget", METHODS, ids=METHOD_IDS)
def test_max_new_tokens_exact_even_mid_burst(method, budget, engine, refs, oracle):
    for limit in (1, 2, 3, 7, 16, 17, 40):
        for prompt, ref in refs[:2]:
            result = generate(engine, prompt, method, budget, max_new_tokens=limit)
            assert result.token_ids == ref[:limit]
            assert result.finish_reason == "length"
            assert result.text == engine.tokenizer.decode(ref[:limit], skip_special_tokens=True)
    if method != "ar":
        assert max(result.acceptance_lengths) > 3  # long bursts really were cut


@pytest.mark.parametrize("method,budget", METHODS, ids=METHOD_IDS)
def test_stops_at_end_token(method, budget, engine, refs, oracle):
    for prompt, ref in refs:
        # an end token that first appears well inside the output (often in the middle of a burst)
        k = next(i for i in range(5, NEW) if ref[i] not in ref[:i])
        eos_engine = engine_with_eos(engine, {ref[k], EOS_ID})
        result = generate(eos_engine, prompt, method, budget, max_new_tokens=NEW)
        assert result.token_ids == ref[:k + 1]
        assert result.finish_reason == "stop"
        assert result.text == engine.tokenizer.decode(ref[:k + 1], skip_special_tokens=True)


def stop_cases(tokenizer, ref):
    """(stop string, index of the token completing it) pairs whose first occurrence is where we put it."""
    full = tokenizer.decode(ref, skip_special_tokens=True)
    cases = []
    for k in range(3, NEW - 1):
        for width in (1, 2):
            if all(printable(tokenizer, t) for t in ref[k:k + width]):
                stop = tokenizer.decode(ref[k:k + width])
                if full.find(stop) == len(tokenizer.decode(ref[:k], skip_special_tokens=True)):
                    cases.append((stop, k + width - 1, k))
    return cases


@pytest.mark.parametrize("method,budget", METHODS, ids=METHOD_IDS)
def test_stops_at_stop_string(method, budget, engine, refs, oracle):
    tok = engine.tokenizer
    checked = 0
    for prompt, ref in refs:
        for stop, last, first in stop_cases(tok, ref)[:3]:
            result = generate(engine, prompt, method, budget, max_new_tokens=NEW, stop=[stop, "\x00never"])
            assert result.finish_reason == "stop"
            assert result.token_ids == ref[:last + 1], "tokens up to and including the one completing the stop"
            assert result.text == tok.decode(ref[:first], skip_special_tokens=True)
            assert stop not in result.text
            streamed = list(engine.stream(prompt, method=method, budget=budget, max_new_tokens=NEW, stop=[stop]))
            assert "".join(c.text for c in streamed) == result.text
            assert [t for c in streamed for t in c.token_ids] == result.token_ids
            checked += 1
    assert checked >= 4


@pytest.mark.parametrize("method,budget", METHODS, ids=METHOD_IDS)
def test_stop_settings_that_never_fire_change_nothing(method, budget, engine, refs, oracle):
    tok = engine.tokenizer
    for prompt, ref in refs[:2]:
        full = tok.decode(ref[:NEW], skip_special_tokens=True)
        # the last character could begin this stop string: held back while streaming, released at the end
        stop = full[-1] + "\x00\x01"
        result = generate(engine, prompt, method, budget, max_new_tokens=NEW, stop=[stop, "\x02\x03"])
        assert result.token_ids == ref[:NEW] and result.text == full and result.finish_reason == "length"
        streamed = list(engine.stream(prompt, method=method, budget=budget, max_new_tokens=NEW, stop=[stop]))
        assert "".join(c.text for c in streamed) == full


@pytest.mark.parametrize("method,budget", METHODS, ids=METHOD_IDS)
def test_streamed_text_equals_final_text(method, budget, engine, refs):
    for prompt, _ in refs[:2]:
        chunks = list(engine.stream(prompt, method=method, budget=budget, max_new_tokens=40))
        result = generate(engine, prompt, method, budget, max_new_tokens=40)
        assert "".join(c.text for c in chunks) == result.text
        assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert chunks[-1].finish_reason == "length" and all(c.finish_reason is None for c in chunks[:-1])


# ----- the context limit -----------------------------------------------------------------------------

CONTEXT_METHODS = [("ar", 1), ("dflash", 1), ("ddtree", 1), ("ddtree", 4), ("ddtree", 64)]


@pytest.mark.parametrize("method,budget", CONTEXT_METHODS,
                         ids=[f"{m}{b if m == 'ddtree' else ''}" for m, b in CONTEXT_METHODS])
def test_context_limit_ends_with_length(method, budget, make_engine):
    engine = make_engine("short_context", layers=1, block_size=8)
    limit = engine.context_limit
    assert limit == 48
    for length in (1, 9, 30, 44, 46, 47):
        prompt = random_prompts(1, engine.model.cfg.vocab_size, seed=length, min_len=length, max_len=length)[0]
        expected = generate(engine, prompt, "ar", 1, max_new_tokens=100)
        result = generate(engine, prompt, method, budget, max_new_tokens=100)
        assert result.token_ids == expected.token_ids
        assert result.finish_reason == expected.finish_reason
        assert result.text == engine.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if expected.finish_reason == "length":
            assert length + len(result.token_ids) == limit


@pytest.mark.parametrize("method,budget", [("dflash", 1), ("ddtree", 8), ("ddtree", 64)],
                         ids=["dflash", "ddtree8", "ddtree64"])
def test_context_limit_with_long_accepted_paths(method, budget, make_engine, monkeypatch):
    """Near the end of the context, rounds that would accept whole blocks are cut to what fits."""
    engine = make_engine("short_context", layers=1, block_size=8)
    prompts = random_prompts(3, engine.model.cfg.vocab_size, seed=5, min_len=3, max_len=20)
    refs = {tuple(p): generate(engine, p, "ar", 1, max_new_tokens=100).token_ids for p in prompts}

    def continuation(prefix, n):
        for prompt, ref in refs.items():
            done = len(prefix) - len(prompt)
            if tuple(prefix[:len(prompt)]) == prompt and list(prefix[len(prompt):]) == ref[:done]:
                return ref[done:done + n]
        return None

    Oracle(continuation, masses=(0.9, 0.05)).install(monkeypatch)
    for prompt in prompts:
        result = generate(engine, prompt, method, budget, max_new_tokens=100)
        assert result.token_ids == refs[tuple(prompt)]
        assert result.mean_acceptance > 2


# ----- rounds launched before the last one is read (on by default on a GPU) ------------------------------

@pytest.mark.parametrize("method,budget", [("ar", 1), ("dflash", 1), ("ddtree", 4), ("ddtree", 64)],
                         ids=["ar", "dflash", "ddtree4", "ddtree64"])
def test_running_rounds_ahead_changes_nothing(method, budget, make_engine, monkeypatch):
    """The same tokens and finish reasons, greedy and sampled, at the token limit, a stop string and the
    context's end, as reading every round before launching the next."""
    engine = make_engine("short_context", layers=1, block_size=8)
    vocab = engine.model.cfg.vocab_size
    for length, max_new, temperature in [(1, 100, 0.0), (9, 5, 0.0), (30, 100, 1.0), (44, 100, 0.0), (47, 3, 1.0),
                                         (12, 17, 1.0)]:
        prompt = random_prompts(1, vocab, seed=length, min_len=length, max_len=length)[0]
        results = []
        for ahead in (False, True):
            monkeypatch.setattr(engine, "run_ahead", ahead)
            results.append(generate(engine, prompt, method, budget, max_new_tokens=max_new,
                                    temperature=temperature, seed=7))
        plain, ahead = results
        assert (ahead.token_ids, ahead.finish_reason) == (plain.token_ids, plain.finish_reason), (length, max_new)
        assert ahead.acceptance_lengths == plain.acceptance_lengths
    monkeypatch.setattr(engine, "run_ahead", False)
    prompt = random_prompts(1, vocab, seed=3, min_len=6, max_len=6)[0]
    whole = generate(engine, prompt, method, budget, max_new_tokens=30)
    stop = engine.tokenizer.decode(whole.token_ids[10:12])
    expected = generate(engine, prompt, method, budget, max_new_tokens=30, stop=[stop])
    monkeypatch.setattr(engine, "run_ahead", True)
    assert generate(engine, prompt, method, budget, max_new_tokens=30, stop=[stop]).token_ids == expected.token_ids


def metaspace_tokenizer():
    """Words with SentencePiece's leading-space marker, whose decoder drops the first token's space: the
    case a windowed decode must not lose."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["▁the", "▁cat", "▁sat", "▁on", "▁mat", ".", ",", "▁a", "s", "▁", "<unk>"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_incremental_text_is_the_whole_decode_after_every_burst(tokenizer, kind):
    """The checker decodes only each burst and a few tokens before it; after every burst its text is the
    whole answer's decode, multi-byte characters arriving byte by byte included, and the chunks join to it."""
    import random

    tok = tokenizer if kind == "byte-level" else metaspace_tokenizer()
    sample = "the cat sat, on a mat. " * 6 + ("Ünïcödé ✓ 猫 🐈 ok" if kind == "byte-level" else "")
    ids = tok.encode(sample)
    rng = random.Random(0)
    for trial in range(5):
        c, shown, at = checker(tok, max_new=len(ids)), "", 0
        while at < len(ids):
            burst = ids[at:at + rng.randint(1, 5)]
            at += len(burst)
            shown += c.push(burst).text
            assert c.text() == tok.decode(ids[:at], skip_special_tokens=True)
        assert shown == tok.decode(ids, skip_special_tokens=True)
