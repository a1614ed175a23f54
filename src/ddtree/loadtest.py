"""`ddtree loadtest`: N concurrent streaming clients against a running server for M seconds.

Each client sends one chat request after another; for each it records the time to the first
content chunk and to the end, the completion tokens the server reports and the reply. The summary gives
throughput (requests and tokens per second over the whole run), latency percentiles and how many
different replies came (one, at temperature 0: the same prompt gets the same answer however the
server batches it). Several client counts run one after the other (`runs`).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import httpx

from .results import percentiles


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    started = time.perf_counter()
    first, tokens, text = None, 0, []
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if "error" in event:  # (a failure after the stream began: its status was already 200)
                return {"status": f"error event: {event['error'].get('type')}"}
            content = "".join(c.get("delta", {}).get("content") or "" for c in event.get("choices", []))
            if content and first is None:
                first = time.perf_counter()
            text.append(content)
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return {"status": 200, "ttft": (first or ended) - started, "total": ended - started, "tokens": tokens,
            "text": "".join(text)}


async def client_loop(client: httpx.AsyncClient, url: str, body: dict, deadline: float, records: list) -> None:
    while time.perf_counter() < deadline:
        try:
            records.append(await one_request(client, url, body))
        except httpx.HTTPError as exc:
            records.append({"status": f"failed: {exc.__class__.__name__}"})


async def run(url: str, model: str | None, clients: int, seconds: float, prompt: str, max_tokens: int,
              extra: dict) -> dict:
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10)) as client:
        if model is None:
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}} | extra
        records: list[dict] = []
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, url, body, started + seconds, records) for _ in range(clients)))
        wall = time.perf_counter() - started
    done = [r for r in records if r["status"] == 200]
    return {
        "url": url, "model": model, "prompt": prompt, "clients": clients, "seconds": wall, "max_tokens": max_tokens,
        "requests": len(done), "errors": len(records) - len(done),
        "requests_per_second": len(done) / wall, "tokens_per_second": sum(r["tokens"] for r in done) / wall,
        "time_to_first_token": percentiles([r["ttft"] for r in done]),
        "latency": percentiles([r["total"] for r in done]),
        "statuses": sorted({str(r["status"]) for r in records}),
        "distinct_replies": len({r["text"] for r in done}),
        "replies": dict(Counter(r["text"] for r in done).most_common()),  # each reply, with how many got it
    }


async def run_levels(url: str, model: str | None, levels: list[int], seconds: float, prompt: str, max_tokens: int,
                     extra: dict) -> dict:
    """`run` at each client count in turn: one result, or {"runs": [...]} for several."""
    runs = [await run(url, model, clients, seconds, prompt, max_tokens, extra) for clients in levels]
    return runs[0] if len(runs) == 1 else {"runs": runs}


def summary_table(result: dict) -> str:
    """A table of figures, a column per client count."""
    runs = result.get("runs", [result])
    spread = lambda values: " / ".join(f"{values[k]:.2f}" for k in ("p50", "p90", "p99")) if values else ""  # noqa: E731
    rows = [
        ("clients", lambda r: str(r["clients"])), ("wall seconds", lambda r: f"{r['seconds']:.1f}"),
        ("requests (errors)", lambda r: f"{r['requests']} ({r['errors']})"),
        ("requests/s", lambda r: f"{r['requests_per_second']:.2f}"), ("tokens/s", lambda r: f"{r['tokens_per_second']:.1f}"),
        ("time to first token p50 / p90 / p99 (s)", lambda r: spread(r["time_to_first_token"])),
        ("latency p50 / p90 / p99 (s)", lambda r: spread(r["latency"])),
        ("different replies", lambda r: str(r["distinct_replies"])),
    ]
    lines = ["| figure |" + " value |" * len(runs), "| --- |" + " --- |" * len(runs)]
    lines += [f"| {name} | " + " | ".join(cell(r) for r in runs) + " |" for name, cell in rows]
    return "\n".join(lines) + "\n"
