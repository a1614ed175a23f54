"""`ddtree loadtest`: N concurrent streaming clients against a running server for M seconds.

Each client sends one chat request after another; for each it records the time to the first
content chunk and to the end, and the completion tokens the server reports. The summary gives
throughput (requests and tokens per second over the whole run) and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import httpx


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    started = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            await response.aread()
            return {"status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[len("data: "):])
            if first is None and any(c.get("delta", {}).get("content") for c in event.get("choices", [])):
                first = time.perf_counter()
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    ended = time.perf_counter()
    return {"status": 200, "ttft": (first or ended) - started, "total": ended - started, "tokens": tokens}


async def client_loop(client: httpx.AsyncClient, url: str, body: dict, deadline: float, records: list) -> None:
    while time.perf_counter() < deadline:
        try:
            records.append(await one_request(client, url, body))
        except httpx.HTTPError as exc:
            records.append({"status": f"failed: {exc.__class__.__name__}"})


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    if len(values) == 1:
        return {"p50": values[0], "p90": values[0], "p99": values[0]}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": cuts[49], "p90": cuts[89], "p99": cuts[98]}


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
        "url": url, "model": model, "clients": clients, "seconds": wall, "max_tokens": max_tokens,
        "requests": len(done), "errors": len(records) - len(done),
        "requests_per_second": len(done) / wall, "tokens_per_second": sum(r["tokens"] for r in done) / wall,
        "time_to_first_token": percentiles([r["ttft"] for r in done]),
        "latency": percentiles([r["total"] for r in done]),
        "statuses": sorted({str(r["status"]) for r in records}),
    }


def summary_table(result: dict) -> str:
    ttft, total = result["time_to_first_token"], result["latency"]
    rows = [
        ("clients", str(result["clients"])), ("wall seconds", f"{result['seconds']:.1f}"),
        ("requests (errors)", f"{result['requests']} ({result['errors']})"),
        ("requests/s", f"{result['requests_per_second']:.2f}"), ("tokens/s", f"{result['tokens_per_second']:.1f}"),
    ]
    for name, values in (("time to first token", ttft), ("latency", total)):
        if values:
            rows.append((f"{name} p50 / p90 / p99 (s)", " / ".join(f"{values[k]:.2f}" for k in ("p50", "p90", "p99"))))
    return "\n".join(["| figure | value |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows]) + "\n"
