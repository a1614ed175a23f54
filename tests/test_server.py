"""The OpenAI-compatible server on loopback, driven by the real `openai` client and by raw HTTP."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from ddtree.loadtest import run as run_loadtest
from ddtree.options import Decoding
from ddtree.server import ServerSettings, create_app

TARGET = "llama"
PROMPTS = ["Tell me about the sea.", "What is two plus two?", "Name three colours.", "Say something kind."]


class RunningServer:
    """A uvicorn server in a background thread on a free loopback port."""

    def __init__(self, engine, http="auto", **settings):
        self.settings = ServerSettings(engine.target.name, **settings)
        self.server = uvicorn.Server(uvicorn.Config(create_app(engine, self.settings), host="127.0.0.1", port=0,
                                                    log_level="warning", http=http))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(TARGET, layers=1, block_size=8)


@pytest.fixture(scope="module")
def server(engine):
    running = RunningServer(engine, decoding=Decoding("ddtree", 8))
    yield running
    running.stop()


def run_threads(threads: list, running: RunningServer) -> None:
    """Starts the clients' threads, waits for them (two minutes at most), then stops the server."""
    try:
        for thread in threads:
            if thread.ident is None:  # (one may have started already)
                thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        running.stop()


def chat_reference(engine, prompt, max_tokens, **kwargs):
    return engine.generate([{"role": "user", "content": prompt}], max_new_tokens=max_tokens, **kwargs)


@pytest.mark.parametrize("method", ["ddtree", "ar"])
def test_chat_equals_generate_streamed_or_not(server, engine, method):
    client = server.client()
    for prompt in PROMPTS[:2]:
        want = chat_reference(engine, prompt, 24, method=method, budget=8)
        reply = client.chat.completions.create(model=server.settings.model_name, max_tokens=24, temperature=0,
                                               messages=[{"role": "user", "content": prompt}],
                                               extra_body={"method": method})
        assert reply.choices[0].message.content == want.text
        assert reply.choices[0].finish_reason == want.finish_reason
        assert reply.usage.completion_tokens == len(want.token_ids)
        assert reply.usage.prompt_tokens == want.prompt_tokens
        summary = reply.model_extra["ddtree"]
        assert summary["method"] == method and summary["rounds"] == want.rounds
        assert summary["budget"] == (8 if method == "ddtree" else None)
        pieces = list(client.chat.completions.create(model=server.settings.model_name, max_tokens=24, temperature=0,
                                                     messages=[{"role": "user", "content": prompt}], stream=True,
                                                     extra_body={"method": method}))
        assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == want.text
        assert pieces[0].choices[0].delta.role == "assistant"
        assert pieces[-1].choices[0].finish_reason == want.finish_reason


def test_completion_equals_generate_streamed_or_not(server, engine):
    client = server.client()
    prompt = "Once upon a time"
    want = engine.generate(prompt, max_new_tokens=20, budget=8)
    reply = client.completions.create(model=server.settings.model_name, prompt=prompt, max_tokens=20, temperature=0)
    assert reply.choices[0].text == want.text and reply.usage.completion_tokens == len(want.token_ids)
    pieces = list(client.completions.create(model=server.settings.model_name, prompt=prompt, max_tokens=20,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want.text
    assert pieces[-1].usage.completion_tokens == len(want.token_ids)
    ids = engine.encode(prompt)
    by_ids = client.completions.create(model=server.settings.model_name, prompt=ids, max_tokens=20, temperature=0)
    assert by_ids.choices[0].text == want.text


def test_sampling_with_a_seed_repeats(server):
    client = server.client()
    ask = dict(model=server.settings.model_name, max_tokens=16, temperature=0.9, top_p=0.95, seed=7,
               messages=[{"role": "user", "content": PROMPTS[2]}])
    first, again = (client.chat.completions.create(**ask).choices[0].message.content for _ in range(2))
    assert first == again


def test_32_concurrent_requests_each_get_their_own_output(server, engine):
    jobs = [(PROMPTS[i % len(PROMPTS)], 6 + i % 9, ["ar", "dflash", "ddtree"][i % 3]) for i in range(32)]
    wants = [chat_reference(engine, p, n, method=m, budget=8).text for p, n, m in jobs]

    async def ask_all():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.create(
            model=server.settings.model_name, max_tokens=n, temperature=0, messages=[{"role": "user", "content": p}],
            extra_body={"method": m}) for p, n, m in jobs))
        return [r.choices[0].message.content for r in replies]

    assert asyncio.run(ask_all()) == wants


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    return error


BAD_CHATS = [
    ({"messages": [{"role": "user", "content": "hi"}]}, "model"),
    ({"model": "@", "messages": []}, "messages"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10 ** 6}, "max_tokens"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, None),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "presence_penalty": 0.5}, "presence_penalty"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "logprobs": True}, "logprobs"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "tools": []}, "tools"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "method": "beam"}, "method"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "budget": 0}, "budget"),
    ({"model": "@", "messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
    ({"model": "@", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
]


@pytest.mark.parametrize("body,param", BAD_CHATS, ids=[p or "top_p" for _, p in BAD_CHATS])
def test_bad_chat_requests_get_400_in_openai_shape(server, body, param):
    body = {k: (server.settings.model_name if v == "@" else v) for k, v in body.items()}
    error = error_of(httpx.post(f"{server.url}/v1/chat/completions", json=body), 400)
    if param is not None:
        assert error["param"] == param


def test_other_bad_requests(server, engine):
    name = server.settings.model_name
    url = f"{server.url}/v1/chat/completions"
    error = error_of(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert "JSON" in error["message"]
    error = error_of(httpx.post(url, json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert error["code"] == "model_not_found" and "gpt-9" in error["message"]
    long_prompt = "x" * (engine.context_limit * 2)
    error = error_of(httpx.post(f"{server.url}/v1/completions", json={"model": name, "prompt": long_prompt}), 400)
    assert error["code"] == "context_length_exceeded"
    error_of(httpx.post(f"{server.url}/v1/completions", json={"model": name, "prompt": ["a", "b"]}), 400)
    error_of(httpx.post(f"{server.url}/v1/completions", json={"model": name, "prompt": [10 ** 7]}), 400)
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], n=3)
    # the server still answers correctly afterwards
    reply = server.client().chat.completions.create(model=name, max_tokens=8, temperature=0,
                                                    messages=[{"role": "user", "content": PROMPTS[0]}])
    assert reply.choices[0].message.content == chat_reference(engine, PROMPTS[0], 8, budget=8).text


def metric(server, name: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_health_models_and_metrics(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [server.settings.model_name]
    server.client().chat.completions.create(model=server.settings.model_name, max_tokens=8, temperature=0,
                                            messages=[{"role": "user", "content": PROMPTS[1]}])
    assert metric(server, "ddtree_requests_total") >= 1
    assert metric(server, "ddtree_generated_tokens_total") >= 8
    assert metric(server, "ddtree_mean_acceptance_length") >= 1
    assert metric(server, "ddtree_tokens_per_second") > 0
    assert metric(server, "ddtree_queue_depth") == 0
    assert metric(server, "ddtree_batch_size") == 1  # the latest round's requests


class SlowEngine:
    """The engine, but every chunk of its batches takes 50 ms more: a generation that is still running
    when its client hangs up."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def runner(self, *args):
        return SlowRunner(self.engine.runner(*args))


class SlowRunner:
    """A batch whose chunks arrive 50 ms apart; otherwise the engine's."""

    def __init__(self, runner):
        self.runner = runner

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def step(self):
        for event in self.runner.step():
            time.sleep(0.05)
            yield event


def test_a_client_that_leaves_mid_stream_cancels_and_the_next_is_served(engine):
    running = RunningServer(SlowEngine(engine))
    try:
        body = {"model": running.settings.model_name, "max_tokens": engine.context_limit // 2, "temperature": 0,
                "stream": True, "method": "ar", "messages": [{"role": "user", "content": PROMPTS[0]}]}
        with httpx.stream("POST", f"{running.url}/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # one event, then hang up
        deadline = time.time() + 20
        while metric(running, "ddtree_cancelled_generations_total") == 0:
            assert time.time() < deadline, "the abandoned generation was not cancelled"
            time.sleep(0.05)
        reply = running.client().chat.completions.create(model=running.settings.model_name, max_tokens=10,
                                                         temperature=0, messages=[{"role": "user", "content": PROMPTS[3]}])
    finally:
        running.stop()
    assert reply.choices[0].message.content == chat_reference(engine, PROMPTS[3], 10).text


class GatedEngine:
    """The engine, but every round of its batches waits for `gate` before it runs."""

    def __init__(self, engine):
        self.engine, self.gate, self.started = engine, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def runner(self, *args):
        return GatedRunner(self.engine.runner(*args), self)


class GatedRunner:
    def __init__(self, runner, gated: GatedEngine):
        self.runner, self.gated = runner, gated

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def step(self):
        self.gated.started.set()
        assert self.gated.gate.wait(30)
        yield from self.runner.step()


def test_full_queue_answers_503_and_shutdown_finishes_requests_in_flight(engine):
    gated = GatedEngine(engine)
    running = RunningServer(gated, max_queue=1)
    name = running.settings.model_name
    body = {"model": name, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": PROMPTS[1]}]}
    results = []
    threads = [threading.Thread(target=lambda: results.append(httpx.post(
        f"{running.url}/v1/chat/completions", json=body, timeout=60))) for _ in range(2)]
    try:
        threads[0].start()
        assert gated.started.wait(10)  # the first runs (held at the gate)
        threads[1].start()  # the second waits in the queue
        deadline = time.time() + 10
        while httpx.get(f"{running.url}/health").json()["queue_depth"] < 2:
            assert time.time() < deadline
            time.sleep(0.02)
        third = httpx.post(f"{running.url}/v1/chat/completions", json=body)
        assert error_of(third, 503)["code"] == "queue_full" and third.headers["retry-after"] == "1"
        running.server.should_exit = True  # shut down with two requests in flight
        time.sleep(0.2)
        gated.gate.set()
        for thread in threads:
            thread.join(60)
    finally:
        gated.gate.set()
        running.stop()
    want = chat_reference(engine, PROMPTS[1], 8, budget=None).text
    assert [r.status_code for r in results] == [200, 200]
    assert [r.json()["choices"][0]["message"]["content"] for r in results] == [want, want]


def test_loadtest_reports_throughput_and_latency(server, engine):
    result = asyncio.run(run_loadtest(server.url, None, clients=3, seconds=2, prompt=PROMPTS[0], max_tokens=8,
                                      extra={}))
    assert result["requests"] >= 3 and result["errors"] == 0
    assert result["tokens_per_second"] > 0
    assert 0 < result["time_to_first_token"]["p50"] <= result["latency"]["p50"] <= result["latency"]["p99"]
    assert result["distinct_replies"] == 1  # one prompt at temperature 0
    assert result["replies"] == {chat_reference(engine, PROMPTS[0], 8, budget=8).text: result["requests"]}  # its solo reply


def test_a_failed_round_reaches_streaming_clients_and_the_loadtest_counts_it(server, monkeypatch):
    """A round that fails after a stream began ends that stream with an error event, which the loadtest counts
    as an error (not a reply of no text); the server answers the next request."""
    from ddtree.generation import BatchRunner

    def failing(runner, **options):
        raise RuntimeError("a kernel failed")

    monkeypatch.setattr(BatchRunner, "launch", failing)
    result = asyncio.run(run_loadtest(server.url, None, clients=2, seconds=1, prompt=PROMPTS[0], max_tokens=8, extra={}))
    assert result["requests"] == 0 and result["errors"] >= 2 and result["statuses"] == ["error event: server_error"]
    monkeypatch.undo()
    result = asyncio.run(run_loadtest(server.url, None, clients=1, seconds=1, prompt=PROMPTS[0], max_tokens=8, extra={}))
    assert result["requests"] >= 1 and result["errors"] == 0


def test_loadtest_runs_several_client_counts(server, capsys):
    from ddtree.cli import main

    assert main(["loadtest", "--url", server.url, "--clients", "1,2", "--seconds", "1", "--max-tokens", "4"]) == 0
    table = capsys.readouterr().out
    assert "| clients | 1 | 2 |" in table and "| different replies | 1 | 1 |" in table


def test_smollm2_end_to_end(smollm2_target):
    """The embedded pair behind the server answers exactly what `ddtree generate` answers."""
    import os

    import torch

    from ddtree.api import BUNDLED_DRAFTERS, SMOLLM2_ALIAS, load_drafter
    from ddtree.engine import Engine

    path = BUNDLED_DRAFTERS[SMOLLM2_ALIAS]
    if not os.path.isdir(path):
        pytest.skip("no bundled SmolLM2 drafter in this checkout")
    engine = Engine(smollm2_target, load_drafter(path), torch.device("cpu"), torch.float32)
    running = RunningServer(engine)
    try:
        question = "What is 12 plus 30? Answer briefly."
        reply = running.client().chat.completions.create(model=running.settings.model_name, max_tokens=16,
                                                         temperature=0,
                                                         messages=[{"role": "user", "content": question}])
    finally:
        running.stop()
    want = chat_reference(engine, question, 16)
    assert reply.choices[0].message.content == want.text
    assert reply.model_extra["ddtree"]["mean_acceptance"] > 1
