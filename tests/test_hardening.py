"""What careless or hostile clients do to the server and the engine (issue 23): each case answers with the
expected status or a one-line error, and nothing wedges, leaks or crashes."""

from __future__ import annotations

import gc
import json
import socket
import time
import weakref

import httpx
import pytest

from ddtree.options import Decoding
from test_server import (
    PROMPTS, GatedEngine, RunningServer, SlowEngine, chat_reference, error_of, metric, run_threads,
)

TARGET = "llama"


@pytest.fixture(scope="module")
def engine(make_engine):
    return make_engine(TARGET, layers=1, block_size=8)


@pytest.fixture(scope="module")
def guarded(engine):
    running = RunningServer(engine, decoding=Decoding("ddtree", 8), max_budget=64, max_body_bytes=20_000,
                            api_key="sesame", allowed_hosts=("localhost", "127.0.0.1"))
    yield running
    running.stop()


def post(running, path="/v1/chat/completions", key="sesame", **kwargs):
    headers = {"authorization": f"Bearer {key}"} | kwargs.pop("headers", {})
    return httpx.post(f"{running.url}{path}", headers=headers, timeout=60, **kwargs)


def chat_body(running, **fields) -> dict:
    return {"model": running.settings.model_name, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": PROMPTS[0]}]} | fields


def test_budgets_past_the_servers_cap_are_refused_at_once(guarded):
    for budget in (65, 4096, 10**9):
        started = time.time()
        response = post(guarded, json=chat_body(guarded, budget=budget))
        assert error_of(response, 400)["param"] == "budget" and time.time() - started < 5
    assert post(guarded, json=chat_body(guarded, budget=64)).status_code == 200
    assert httpx.get(f"{guarded.url}/health").json()["status"] in ("ok", "busy")


def test_the_engine_refuses_budgets_past_its_own_limit(engine):
    from ddtree.errors import DDTreeError

    with pytest.raises(DDTreeError, match="4096"):
        engine.generate([1, 2, 3], method="ddtree", budget=100_000, max_new_tokens=2)


def test_a_grown_workspace_is_freed_at_once(engine):
    """No reference cycle keeps old buffers alive until a cyclic collection."""
    engine.workspace = engine.stages = None
    engine.generate([1, 2, 3], method="ddtree", budget=8, max_new_tokens=4)
    old = weakref.ref(engine.workspace)
    gc.disable()
    try:
        engine.generate([1, 2, 3], method="ddtree", budget=40, max_new_tokens=4)  # more rows: a new workspace
        assert old() is None
    finally:
        gc.enable()


def test_tiny_temperatures_answer_greedily(guarded, engine):
    for temperature in (1e-40, 1e-300):
        reply = post(guarded, json=chat_body(guarded, temperature=temperature)).json()
        assert reply["choices"][0]["message"]["content"] == chat_reference(engine, PROMPTS[0], 8, budget=8).text


def test_bodies_past_the_limit_get_413_declared_or_chunked(guarded):
    big = json.dumps(chat_body(guarded, messages=[{"role": "user", "content": "x" * 30_000}])).encode()
    assert error_of(post(guarded, content=big, headers={"content-type": "application/json"}), 413)
    chunks = (big[i:i + 4096] for i in range(0, len(big), 4096))  # no content-length: chunked
    assert error_of(post(guarded, content=chunks, headers={"content-type": "application/json"}), 413)


def test_keys_hosts_and_the_docs(guarded):
    assert error_of(post(guarded, key="wrong", json=chat_body(guarded)), 401)["code"] == "invalid_api_key"
    assert error_of(httpx.get(f"{guarded.url}/v1/models"), 401)
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # health stays open
    rebound = post(guarded, json=chat_body(guarded), headers={"host": "attacker.example"})
    assert "attacker.example" in error_of(rebound, 400)["message"]
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert error_of(httpx.get(f"{guarded.url}{path}"), 404)


def test_framework_errors_are_in_openais_shape(guarded):
    assert error_of(httpx.get(f"{guarded.url}/v1/nothing-here"), 404)["type"] == "not_found_error"
    assert error_of(httpx.get(f"{guarded.url}/v1/chat/completions", headers={"authorization": "Bearer sesame"}), 405)
    assert error_of(post(guarded, content=b"{not json", headers={"content-type": "application/json"}), 400)


def test_undecodable_text_and_failing_templates_are_400(guarded, engine, monkeypatch):
    surrogate = '{"model": "%s", "max_tokens": 4, "messages": [{"role": "user", "content": "a\\ud800b"}]}'
    response = post(guarded, content=(surrogate % guarded.settings.model_name).encode(),
                    headers={"content-type": "application/json"})
    assert "tokenized" in error_of(response, 400)["message"]

    def broken(*args, **kwargs):
        from jinja2 import TemplateError
        raise TemplateError("no such filter")

    monkeypatch.setattr(engine.tokenizer, "apply_chat_template", broken)
    assert "no such filter" in error_of(post(guarded, json=chat_body(guarded)), 400)["message"]


def test_compatibility_developer_role_model_lookup_top_k_off_and_no_content_type(guarded, engine):
    body = chat_body(guarded, top_k=-1, messages=[{"role": "developer", "content": "Be brief."},
                                                   {"role": "user", "content": PROMPTS[1]}])
    assert post(guarded, json=body).status_code == 200
    name = guarded.settings.model_name
    assert httpx.get(f"{guarded.url}/v1/models/{name}", headers={"authorization": "Bearer sesame"}).json()["id"] == name
    assert error_of(httpx.get(f"{guarded.url}/v1/models/other", headers={"authorization": "Bearer sesame"}), 404)
    untyped = post(guarded, content=json.dumps(chat_body(guarded)).encode())  # no content-type header at all
    assert untyped.status_code == 200, untyped.text


def test_latency_histogram_is_observed(guarded):
    post(guarded, json=chat_body(guarded))
    text = httpx.get(f"{guarded.url}/metrics", headers={"authorization": "Bearer sesame"}).text
    count = next(float(line.split()[-1]) for line in text.splitlines() if line.startswith("ddtree_request_seconds_count"))
    assert count >= 1


def test_a_non_streaming_client_that_leaves_is_cancelled(engine):
    """The connection is checked while chunks keep arriving, not only when they pause."""
    running = RunningServer(SlowEngine(engine))
    try:
        body = {"model": running.settings.model_name, "max_tokens": engine.context_limit // 2, "temperature": 0,
                "method": "ar", "messages": [{"role": "user", "content": PROMPTS[0]}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=0.6)
        deadline = time.time() + 10
        while metric(running, "ddtree_cancelled_generations_total") == 0:
            assert time.time() < deadline, "the abandoned generation went on"
            time.sleep(0.05)
    finally:
        running.stop()


def test_clients_that_leave_the_queue_give_their_place_up(engine):
    gated = GatedEngine(engine)
    running = RunningServer(gated, max_queue=1)
    body = {"model": running.settings.model_name, "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": PROMPTS[2]}]}
    try:
        with httpx.Client(timeout=60) as first:
            pending = first.build_request("POST", f"{running.url}/v1/chat/completions", json=body)
            import threading
            held = threading.Thread(target=lambda: first.send(pending))
            held.start()
            assert gated.started.wait(10)  # the first runs, held at the gate
            with pytest.raises(httpx.ReadTimeout):  # the second queues, then its client leaves
                httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=0.8)
            time.sleep(0.5)  # (its handler notices within CHECK_EVERY)
            assert httpx.get(f"{running.url}/health").json()["queue_depth"] == 1
            third = []
            waiter = threading.Thread(target=lambda: third.append(httpx.post(
                f"{running.url}/v1/chat/completions", json=body, timeout=60)))
            waiter.start()
            time.sleep(0.5)
            gated.gate.set()
            waiter.join(60)
            held.join(60)
        assert third and third[0].status_code == 200  # not 503: the leaver's place was free
    finally:
        gated.gate.set()
        running.stop()


def test_half_open_connections_are_closed(engine, monkeypatch):
    import ddtree.server as server_module

    monkeypatch.setattr(server_module, "HEADER_TIMEOUT", 0.5)
    running = RunningServer(engine, http=server_module.HeaderTimeoutProtocol)
    try:
        host, port = running.url.removeprefix("http://").split(":")
        idle = socket.create_connection((host, int(port)))
        idle.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")  # headers never finished
        idle.settimeout(5)
        assert idle.recv(100) == b""  # closed by the server
        assert httpx.get(f"{running.url}/health").status_code == 200
    finally:
        running.stop()


def test_a_calibration_that_cannot_be_stored_is_kept_in_memory(engine, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("DDTREE_CACHE", str(blocker))
    costs = engine.calibration([1], force=True)
    assert costs[1].sizes and "could not be stored" in capsys.readouterr().err


def test_mixed_load_of_normal_oversized_leaving_and_invalid_clients(engine):
    """16 clients for 8 s: normal replies stay exact, no 5xx, and /health is honest throughout."""
    import random
    import threading

    running = RunningServer(engine, decoding=Decoding("ddtree", 8), max_budget=64, max_body_bytes=20_000)
    name, url = running.settings.model_name, running.url
    want = {p: chat_reference(engine, p, 6, budget=8).text for p in PROMPTS}
    statuses, wrong, health = [], [], []
    deadline = time.time() + 8

    def client(seed):
        rng = random.Random(seed)
        while time.time() < deadline:
            kind, prompt = rng.choice(["normal", "normal", "oversized", "leaving", "invalid"]), rng.choice(PROMPTS)
            body = {"model": name, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
            try:
                if kind == "oversized":
                    body["messages"][0]["content"] = "y" * 30_000
                elif kind == "invalid":
                    body["budget"] = 10**9
                response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.05 if kind == "leaving" else 60)
            except httpx.TimeoutException:
                continue
            statuses.append(response.status_code)
            if kind == "normal" and response.json()["choices"][0]["message"]["content"] != want[prompt]:
                wrong.append(prompt)

    def watch():
        while time.time() < deadline:
            health.append(httpx.get(f"{url}/health", timeout=10).json()["status"])
            time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)] + [threading.Thread(target=watch)]
    run_threads(threads, running)
    assert statuses and not wrong and all(s < 500 for s in statuses), sorted(set(statuses))
    assert {200, 400, 413} <= set(statuses) and set(health) <= {"ok", "busy"} and "busy" in health


def test_the_workspace_shrinks_after_an_outlier(engine, monkeypatch):
    import ddtree.engine as engine_module

    monkeypatch.setitem(engine_module.SHRINK_FLOOR, "rows", 32)
    monkeypatch.setattr(engine, "prepared", (0, 0))  # (an engine other tests prepared)
    engine.workspace = engine.stages = None
    reference = engine.generate([5, 6, 7], method="ddtree", budget=8, max_new_tokens=6).token_ids
    engine.generate([5, 6, 7], method="ddtree", budget=200, max_new_tokens=6)  # an outlier: 201 rows
    outlier = engine.workspace
    assert outlier.max_rows > 200
    for _ in range(engine_module.SHRINK_AFTER - 1):  # (traffic that mixes sizes keeps it)
        assert engine.generate([5, 6, 7], method="ddtree", budget=8, max_new_tokens=6).token_ids == reference
        assert engine.workspace is outlier
    engine.generate([5, 6, 200], method="ddtree", budget=200, max_new_tokens=6)  # (the outlier again: a new row)
    for _ in range(engine_module.SHRINK_AFTER):
        assert engine.generate([5, 6, 7], method="ddtree", budget=8, max_new_tokens=6).token_ids == reference
    assert engine.workspace.max_rows < 50  # made again at the request's size


def test_a_prepared_workspace_is_kept_for_smaller_requests(engine, monkeypatch):
    """What `prepare` made room for stays: methods run in turns (a bench of budgets 16 to 1024) keep their
    graphs instead of remaking the workspace at every turn."""
    import ddtree.engine as engine_module
    from ddtree.options import Decoding

    monkeypatch.setitem(engine_module.SHRINK_FLOOR, "rows", 32)
    engine.workspace = engine.stages = None
    monkeypatch.setattr(engine, "prepared", (0, 0))  # (an engine other tests prepared)
    engine.prepare(Decoding(method="ddtree", budget=200), context=64)
    kept = engine.workspace
    assert kept.max_rows > 200
    engine.prepare(Decoding(method="ddtree", budget=8), context=64)
    engine.generate([5, 6, 7], method="ddtree", budget=8, max_new_tokens=6)
    assert engine.workspace is kept
    engine.generate([5, 6, 7], method="ddtree", budget=1000, max_new_tokens=6)  # an outlier past it
    for _ in range(engine_module.SHRINK_AFTER):
        engine.generate([5, 6, 7], method="ddtree", budget=8, max_new_tokens=6)
    assert 200 < engine.workspace.max_rows < 1000  # made again, at the prepared size, not the request's
