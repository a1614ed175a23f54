"""`ddtree serve`: an OpenAI-compatible HTTP server over one engine.

One worker thread owns the engine and runs one generation at a time, in arrival order; HTTP
handlers validate a request, queue it and relay its chunks. A full queue answers 503 with
Retry-After, a client that goes away cancels its generation at the next round, and every bad
request gets a 4xx in OpenAI's error shape. FastAPI (with uvicorn) serves; prometheus_client
renders /metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import resource
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from .generation import BatchRequest, BatchRunner
from .engine import Engine
from .errors import DDTreeError
from .options import Decoding, GenerationOptions
from .sampling import SamplingParams

DEFAULT_MAX_TOKENS = 512
CHECK_EVERY = 0.25  # seconds between checks that a non-streaming client is still connected
STUCK_AFTER = 120.0  # seconds without a round's outcome after which /health calls the engine stuck
HEADER_TIMEOUT = 10.0  # seconds a connection has to send a request's headers
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
log = logging.getLogger("ddtree.server")


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


# ----- request bodies -------------------------------------------------------------------------------

Number = StrictFloat | StrictInt


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]  # (developer: OpenAI's newer name for system)
    content: StrictStr | list[dict]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: StrictBool = False


class GenerationRequest(BaseModel):
    """Fields both endpoints share; `method`, `budget` and `top_k` are ddtree's extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: Number = 1.0
    top_p: Number = 1.0
    top_k: StrictInt = 0
    seed: StrictInt | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = 1
    user: StrictStr | None = None
    presence_penalty: Number = 0.0
    frequency_penalty: Number = 0.0
    logprobs: StrictBool | StrictInt | None = None
    method: Literal["ar", "dflash", "ddtree"] | None = None
    budget: StrictInt | Literal["auto"] | None = None


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None


class CompletionRequest(GenerationRequest):
    prompt: StrictStr | list[StrictInt] | list[StrictStr]


# ----- the worker -----------------------------------------------------------------------------------


@dataclass
class Job:
    """One request's generation: what to run, where its chunks go, and whether its client left."""

    ids: list[int]
    options: GenerationOptions
    loop: asyncio.AbstractEventLoop
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    queued_at: float = field(default_factory=time.perf_counter)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, kind: str, payload) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))


class Scheduler:
    """Runs queued jobs on the engine in its own thread, up to `max_batch` at once (`BatchRunner`): a job
    joins the running batch at the next round boundary, first come first served, and leaves when it
    finishes or its client goes away. Only live requests hold a place in the queue: a job whose client
    left gives its place up at once. `context`: the tokens per sequence the batch's buffers are first made
    for (a longer request waits until the batch is empty, which then grows)."""

    def __init__(self, engine: Engine, max_queue: int, on_done, max_batch: int = 1, context: int = 2048):
        self.engine, self.max_queue, self.on_done = engine, max_queue, on_done
        self.max_batch, self.context = max_batch, context
        self.pending: deque[Job] = deque()
        self.ready = threading.Condition()
        self.closing = False
        self.runner: BatchRunner | None = None
        self.running: dict[BatchRequest, Job] = {}
        self.batch_size = 0  # requests in the latest round
        self.progress_at: float | None = None  # while jobs run: when the batch last made progress
        self.thread = threading.Thread(target=self.work, name="ddtree-engine", daemon=True)
        self.thread.start()

    @property
    def waiting(self) -> int:
        with self.ready:  # (read from the event loop while the engine thread takes jobs)
            return sum(not job.cancelled.is_set() for job in self.pending)

    @property
    def depth(self) -> int:
        """Requests waiting or running."""
        return self.waiting + len(self.running)

    def health(self) -> str:
        """ok (idle), busy, or stuck (a round has taken longer than anything should)."""
        since = self.progress_at
        if since is None:
            return "busy" if self.waiting else "ok"
        return "stuck" if time.monotonic() - since > STUCK_AFTER else "busy"

    def submit(self, job: Job) -> None:
        with self.ready:
            if self.closing:
                raise APIError(503, "the server is shutting down", kind="server_error", code="shutting_down")
            self.pending = deque(j for j in self.pending if not j.cancelled.is_set())
            if len(self.pending) >= self.max_queue:
                raise APIError(503, "the server is busy: its queue is full; retry shortly", kind="server_error",
                               code="queue_full", headers={"Retry-After": "1"})
            self.pending.append(job)
            self.ready.notify()

    def close(self) -> None:
        """Finishes every queued job whose client is still there, then stops the thread."""
        with self.ready:
            self.closing = True
            self.ready.notify()
        self.thread.join()

    def work(self) -> None:
        while (jobs := self.take()) is not None:
            for job in jobs:
                self.start(job)
            if self.running:
                self.step()
            self.progress_at = time.monotonic() if self.running else None

    def take(self) -> list[Job] | None:
        """The waiting jobs that join the batch now (as many as it has room for); waits while there is
        nothing to do, and None once closing with nothing left."""
        with self.ready:
            while not self.pending and not self.running and not self.closing:
                self.ready.wait()
            if not self.pending and not self.running:
                return None
            jobs = []
            while self.pending and len(self.running) + len(jobs) < self.max_batch:
                job = self.pending.popleft()
                if not job.cancelled.is_set():
                    jobs.append(job)
            return jobs

    def start(self, job: Job) -> None:
        """The job into the batch, or back to the queue's front until the batch is empty when it needs
        more room than the batch's buffers have."""
        try:
            runner = self.runner_for(job)
            if runner is None:
                with self.ready:
                    self.pending.appendleft(job)
                return
            self.running[runner.add(job.ids, job.options)] = job
        except DDTreeError as exc:
            job.send("error", APIError(400, str(exc)))

    def runner_for(self, job: Job) -> BatchRunner | None:
        """The batch the job joins: the running one if it has room (and auto, if asked for, is calibrated for
        it), else a new one once the running one is empty (None until then)."""
        ready = self.engine.auto_ready(job.options.decoding, self.max_batch)
        if self.runner is not None and self.runner.owns and ready and self.runner.fits(job.ids, job.options):
            return self.runner
        if self.running:
            return None
        method = self.engine.method_for(job.options.decoding)
        needed = self.engine.tokens_held(len(job.ids), job.options.max_new_tokens, method.block)
        rows = max(method.rows, self.runner.ws.max_rows if self.runner else 1)
        self.runner = self.engine.runner(self.max_batch, max(self.context, needed), rows)
        return self.runner

    def step(self) -> None:
        """One round (with the joins before it); its chunks to their jobs; jobs whose client left, out."""
        self.progress_at = time.monotonic()
        self.batch_size = len(self.running)
        try:
            for request, chunk in self.runner.step():
                self.progress_at = time.monotonic()
                self.running[request].send("chunk", chunk)
                if chunk.finish_reason is not None:
                    self.finish(request)
        except Exception as exc:  # noqa: BLE001 - the batch's failure must not stop the server
            self.fail_all(exc)
            return
        for request, job in list(self.running.items()):
            if job.cancelled.is_set():
                self.runner.cancel(request)
                self.finish(request)

    def finish(self, request: BatchRequest) -> None:
        job = self.running.pop(request)
        lengths = [chunk.acceptance_length for chunk in request.chunks if chunk.acceptance_length is not None]
        stats = {"seconds": time.perf_counter() - job.queued_at, "acceptance_lengths": lengths,
                 "tokens": sum(len(chunk.token_ids) for chunk in request.chunks),
                 "cancelled": job.cancelled.is_set(), "budget": request.options.decoding.budget,
                 "decoding_seconds": time.perf_counter() - request.started}
        self.on_done(stats)
        job.send("done", stats)

    def fail_all(self, exc: Exception) -> None:
        """A failed round: every running job gets the error (400 for a request the engine refused)."""
        if not isinstance(exc, DDTreeError):
            log.error("a decoding round failed", exc_info=exc)
        for request, job in self.running.items():
            error = (APIError(400, str(exc)) if isinstance(exc, DDTreeError) else
                     APIError(500, f"the generation failed (request {job.request_id})", kind="server_error"))
            job.send("error", error)
        self.running.clear()
        self.runner.abandon()
        self.runner = None  # (made again for the next job: nothing of this batch's state is trusted)


# ----- metrics ----------------------------------------------------------------------------------------


class Metrics:
    def __init__(self, scheduler_depth, batch_size):
        self.total_tokens = self.total_rounds = 0
        self.registry = CollectorRegistry()
        self.requests = Counter("ddtree_requests", "Requests received, by endpoint", ["endpoint"],
                                registry=self.registry)
        self.errors = Counter("ddtree_request_errors", "Requests answered with an error, by status", ["status"],
                              registry=self.registry)
        self.tokens = Counter("ddtree_generated_tokens", "Tokens generated", registry=self.registry)
        self.rounds = Counter("ddtree_decoding_rounds", "Decoding rounds (one target forward each)",
                              registry=self.registry)
        self.cancelled = Counter("ddtree_cancelled_generations", "Generations stopped because the client left",
                                 registry=self.registry)
        self.acceptance = Gauge("ddtree_mean_acceptance_length", "Tokens per round over all requests so far",
                                registry=self.registry)
        self.speed = Gauge("ddtree_tokens_per_second", "Generation speed of the latest finished request",
                           registry=self.registry)
        self.latency = Histogram("ddtree_request_seconds", "Time from queueing to the last token",
                                 registry=self.registry)
        depth = Gauge("ddtree_queue_depth", "Requests waiting or running", registry=self.registry)
        depth.set_function(scheduler_depth)
        batch = Gauge("ddtree_batch_size", "Requests decoding together in the latest round", registry=self.registry)
        batch.set_function(batch_size)

    def record(self, stats: dict) -> None:
        accepted, rounds = sum(stats["acceptance_lengths"]), len(stats["acceptance_lengths"])
        tokens = stats["tokens"]  # (the first comes from the prefill, not from a round)
        self.tokens.inc(tokens)
        self.rounds.inc(rounds)
        if stats["cancelled"]:
            self.cancelled.inc()
        self.total_tokens += accepted
        self.total_rounds += rounds
        if self.total_rounds:
            self.acceptance.set(self.total_tokens / self.total_rounds)
        if stats["decoding_seconds"] > 0:
            self.speed.set(tokens / stats["decoding_seconds"])
        self.latency.observe(stats["seconds"])


# ----- the app ----------------------------------------------------------------------------------------


@dataclass
class ServerSettings:
    model_name: str
    decoding: Decoding = field(default_factory=Decoding)  # for requests that name no method or budget
    max_queue: int = 64
    max_budget: int = 256  # the largest tree a request may ask for
    max_body_bytes: int = 4 << 20
    api_key: str | None = None  # when set, /v1 and /metrics want "Authorization: Bearer <key>"
    allowed_hosts: tuple[str, ...] | None = None  # Host header names answered (None: any)
    max_batch: int = 1  # requests decoding at once
    context: int = 2048  # tokens per sequence the batch's buffers are first made for


def create_app(engine: Engine, settings: ServerSettings) -> FastAPI:
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["scheduler"] = Scheduler(engine, settings.max_queue, lambda stats: state["metrics"].record(stats),
                                       settings.max_batch, settings.context)
        state["metrics"] = Metrics(lambda: state["scheduler"].depth, lambda: state["scheduler"].batch_size)
        yield
        await asyncio.to_thread(state["scheduler"].close)

    app = FastAPI(title="ddtree", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestGuard, settings=settings)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        state["metrics"].errors.labels(str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return await api_error(request, validation_error(exc))

    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, exc: HTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return await api_error(request, APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                                                 kind=kind, headers=exc.headers))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        reference = uuid.uuid4().hex
        log.exception("%s %s failed (reference %s)", request.method, request.url.path, reference)
        return await api_error(request, APIError(500, f"internal error (reference {reference})", kind="server_error"))

    authorised = [Depends(api_key_check(settings))]
    add_status_routes(app, state, settings, authorised)
    add_generation_routes(app, state, engine, settings, authorised)
    return app


def api_key_check(settings: ServerSettings):
    """A dependency that refuses a request without the server's API key (a constant-time comparison)."""
    async def check(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
            raise APIError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                           kind="invalid_request_error", code="invalid_api_key")
    return check


class RequestGuard:
    """ASGI middleware in front of every route: the Host header must be one this server answers to (a web
    page cannot reach a loopback server through DNS rebinding), a body may be at most `max_body_bytes`
    (413 before it is read in full), and a body without a content type is taken as JSON."""

    def __init__(self, app, settings: ServerSettings):
        self.app, self.settings = app, settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        host = headers.get(b"host", b"").decode("latin-1")
        name = host.rsplit(":", 1)[0].strip("[]") if not host.startswith("[") else host[1:host.find("]")]
        if self.settings.allowed_hosts is not None and name not in self.settings.allowed_hosts:
            return await APIError(400, f"this server does not answer for the host {host!r}").response()(scope, receive,
                                                                                                        send)
        limit, length = self.settings.max_body_bytes, headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return await body_too_large(limit)(scope, receive, send)
        if scope["method"] == "POST" and b"content-type" not in headers:  # every body here is JSON
            scope = dict(scope, headers=[*scope["headers"], (b"content-type", b"application/json")])
        if length is None:  # a chunked body: read up to the limit here, then hand it on whole
            body = b""
            while True:
                message = await receive()
                body += message.get("body", b"")
                if len(body) > limit:
                    return await body_too_large(limit)(scope, receive, send)
                if message["type"] != "http.request" or not message.get("more_body"):
                    break
            receive = replay(body, receive)
        await self.app(scope, receive, send)


def replay(body: bytes, receive):
    """A receive callable that gives `body` first, then whatever the connection says next (a disconnect)."""
    given = False

    async def again():
        nonlocal given
        if given:
            return await receive()
        given = True
        return {"type": "http.request", "body": body, "more_body": False}
    return again


def body_too_large(limit: int) -> JSONResponse:
    return APIError(413, f"the request body is larger than this server takes ({limit} bytes)").response()


def add_status_routes(app: FastAPI, state: dict, settings: ServerSettings, authorised: list) -> None:
    """/health, /metrics and /v1/models."""
    @app.get("/health")
    async def health():
        status = state["scheduler"].health()
        return JSONResponse({"status": status, "queue_depth": state["scheduler"].depth},
                            status_code=503 if status == "stuck" else 200)

    @app.get("/metrics", dependencies=authorised)
    async def metrics():
        return PlainTextResponse(generate_latest(state["metrics"].registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    model = {"id": settings.model_name, "object": "model", "created": 0, "owned_by": "ddtree"}

    @app.get("/v1/models", dependencies=authorised)
    async def models():
        return {"object": "list", "data": [model]}

    @app.get("/v1/models/{model_id:path}", dependencies=authorised)
    async def one_model(model_id: str):
        if model_id != settings.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {settings.model_name!r}",
                           "model", "model_not_found")
        return model


def add_generation_routes(app: FastAPI, state: dict, engine: Engine, settings: ServerSettings,
                          authorised: list) -> None:
    """/v1/chat/completions and /v1/completions: validate, queue, relay."""
    @app.post("/v1/chat/completions", dependencies=authorised)
    async def chat(body: ChatRequest, request: Request):
        state["metrics"].requests.labels("chat").inc()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        ids = await encoded(engine, messages, "messages")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        return await respond(body, request, ids, max_tokens, chat=True)

    @app.post("/v1/completions", dependencies=authorised)
    async def completions(body: CompletionRequest, request: Request):
        state["metrics"].requests.labels("completions").inc()
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        ids = await encoded(engine, prompt, "prompt")
        if any(not 0 <= t < engine.model.cfg.vocab_size for t in ids):
            raise APIError(400, f"token ids must be in 0..{engine.model.cfg.vocab_size - 1}", "prompt")
        return await respond(body, request, ids, body.max_tokens, chat=False)

    async def respond(body: GenerationRequest, request: Request, ids: list[int], max_tokens: int | None,
                      chat: bool):
        job = Job(ids, generation_options(body, ids, max_tokens, engine, settings), asyncio.get_running_loop())
        state["scheduler"].submit(job)
        reply = Reply(body, chat, len(ids), job.options)
        if body.stream:
            return StreamingResponse(stream_events(job, reply, state["metrics"]), media_type="text/event-stream")
        return await collect(job, reply, request)


async def encoded(engine: Engine, prompt, param: str) -> list[int]:
    """The prompt's token ids, tokenized off the event loop (a long prompt must not stall every connection)."""
    try:
        return await asyncio.to_thread(engine.encode, prompt)
    except DDTreeError as exc:
        raise APIError(400, str(exc), param) from None


def validation_error(exc: RequestValidationError) -> APIError:
    """pydantic's first complaint, as one sentence naming the field."""
    error = exc.errors()[0]
    where = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(where) or None
    if error.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    if error.get("type") == "extra_forbidden":
        return APIError(400, f"unrecognized request argument: {param}", param)
    if error.get("type") == "missing":
        return APIError(400, f"missing required field: {param}", param)
    return APIError(400, f"invalid value for {param}: {error.get('msg', 'invalid')}", param)


def generation_options(body: GenerationRequest, ids: list[int], max_tokens: int | None, engine: Engine,
                       settings: ServerSettings) -> GenerationOptions:
    """A request's generation options, or an APIError saying what to change."""
    check_supported(body, settings)
    max_tokens = checked_max_tokens(body, len(ids), max_tokens, engine.context_limit)
    if not 0 <= body.temperature <= 2:
        raise APIError(400, f"temperature must be between 0 and 2, got {body.temperature}", "temperature")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4:
        raise APIError(400, "at most 4 stop sequences", "stop")
    method = body.method or settings.decoding.method
    if method != "ar" and engine.drafter is None:
        raise APIError(400, f"method {method!r} needs a drafter, and this server has none", "method")
    budget = body.budget if body.budget is not None else settings.decoding.budget if method == "ddtree" else None
    if isinstance(budget, int) and budget > settings.max_budget:
        raise APIError(400, f"budget {budget} is over this server's limit of {settings.max_budget} nodes", "budget")
    try:
        decoding = Decoding(method, budget)
    except DDTreeError as exc:
        raise APIError(400, str(exc), "budget") from None
    try:
        sampling = SamplingParams(body.temperature, body.top_k, body.top_p)
        return GenerationOptions(decoding, sampling, max_tokens, body.seed, tuple(stops))
    except DDTreeError as exc:
        raise APIError(400, str(exc)) from None


def check_supported(body: GenerationRequest, settings: ServerSettings) -> None:
    """OpenAI's fields this server does not serve, each refused by name."""
    if body.model != settings.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {settings.model_name!r}",
                       "model", "model_not_found")
    if body.n != 1:
        raise APIError(400, "n must be 1: one choice per request is supported", "n")
    if body.logprobs not in (None, False, 0):
        raise APIError(400, "logprobs are not supported", "logprobs")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) != 0:
            raise APIError(400, f"{name} is not supported (it would change the target's distribution)", name)


def checked_max_tokens(body: GenerationRequest, prompt_tokens: int, max_tokens: int | None, limit: int) -> int:
    """The answer's token limit: as asked, or as much as the context leaves (at most DEFAULT_MAX_TOKENS)."""
    room = limit - prompt_tokens
    where = "messages" if isinstance(body, ChatRequest) else "prompt"
    if room < 1:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens; the model's context holds {limit}", where,
                       "context_length_exceeded")
    if max_tokens is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if max_tokens > room:
        raise APIError(400, f"max_tokens {max_tokens} is past the context: the prompt has {prompt_tokens} tokens and "
                            f"the context holds {limit}, so at most {room}", "max_tokens", "context_length_exceeded")
    return max_tokens


class Reply:
    """Builds OpenAI response objects for one request."""

    def __init__(self, body: GenerationRequest, chat: bool, prompt_tokens: int, options: GenerationOptions):
        self.body, self.chat, self.prompt_tokens, self.options = body, chat, prompt_tokens, options
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.completion_tokens = 0

    def envelope(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.body.model}

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def acceptance(self, stats: dict) -> dict:
        lengths = stats["acceptance_lengths"]
        return {"method": self.options.decoding.method, "budget": stats["budget"], "rounds": len(lengths),
                "mean_acceptance": sum(lengths) / len(lengths) if lengths else 0.0,
                "tokens_per_second": (self.completion_tokens / stats["decoding_seconds"]
                                      if stats["decoding_seconds"] > 0 else 0.0)}

    def whole(self, text: str, finish: str | None, stats: dict) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion" if self.chat else "text_completion"
        return self.envelope(kind) | {"choices": [choice], "usage": self.usage(), "ddtree": self.acceptance(stats)}

    def piece(self, text: str | None, finish: str | None, first: bool = False) -> dict:
        if self.chat:
            delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return self.envelope("chat.completion.chunk") | {"choices": [choice]}
        return self.envelope("text_completion") | {"choices": [{"index": 0, "text": text or "", "logprobs": None,
                                                                "finish_reason": finish}]}


async def next_event(job: Job):
    """The job's next event, or ("wait", None) when none came within CHECK_EVERY seconds."""
    try:
        return await asyncio.wait_for(job.events.get(), timeout=CHECK_EVERY)
    except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
        return "wait", None


async def collect(job: Job, reply: Reply, request: Request):
    """A non-streaming reply: the chunks gathered, the client's connection checked every CHECK_EVERY seconds
    (chunks or not), so a client that leaves stops its generation."""
    text, finish, checked = [], None, time.monotonic()
    try:
        while True:
            kind, payload = await next_event(job)
            if time.monotonic() - checked >= CHECK_EVERY:
                checked = time.monotonic()
                if await request.is_disconnected():
                    return PlainTextResponse("", status_code=499)
            if kind == "error":
                raise payload
            if kind == "done":
                return JSONResponse(reply.whole("".join(text), finish, payload))
            if kind == "chunk":
                text.append(payload.text)
                reply.completion_tokens += len(payload.token_ids)
                finish = payload.finish_reason or finish
    finally:
        job.cancelled.set()  # a no-op once done; a client gone or a task cancelled at shutdown stops the work


async def stream_events(job: Job, reply: Reply, metrics: Metrics) -> AsyncIterator[str]:
    """Server-sent events: a chunk per round, a last chunk with the finish reason, then [DONE]. When the
    client goes away the response task is cancelled here, which cancels the generation."""
    first, finish = True, None
    try:
        while True:
            kind, payload = await next_event(job)
            if kind == "wait":
                continue
            if kind == "error":
                metrics.errors.labels(str(payload.status)).inc()
                yield sse({"error": {"message": payload.message, "type": payload.kind, "param": payload.param,
                                     "code": payload.code}})
                break
            if kind == "done":
                yield sse(reply.piece(None, finish or "stop") | {"ddtree": reply.acceptance(payload)})
                if reply.body.stream_options and reply.body.stream_options.include_usage:
                    kind = "chat.completion.chunk" if reply.chat else "text_completion"
                    yield sse(reply.envelope(kind) | {"choices": [], "usage": reply.usage()})
                break
            reply.completion_tokens += len(payload.token_ids)
            finish = payload.finish_reason or finish
            if payload.text or first:
                yield sse(reply.piece(payload.text, None, first))
                first = False
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()  # a no-op once the job is done


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, but a connection has HEADER_TIMEOUT seconds to send a request's headers
    (after it opens, or after its last response): half-open connections cannot hold the server."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.header_timer = self.loop.call_later(HEADER_TIMEOUT, self.headers_late)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.header_timer.cancel()
        self.header_timer = self.loop.call_later(HEADER_TIMEOUT, self.headers_late)

    def connection_lost(self, exc) -> None:
        self.header_timer.cancel()
        super().connection_lost(exc)

    def headers_late(self) -> None:
        waiting = self.cycle is None or self.cycle.response_complete
        if waiting and not self.transport.is_closing():
            self.transport.close()


def serve(engine: Engine, settings: ServerSettings, host: str, port: int, max_connections: int = 1024) -> None:
    # room for the connections the server takes, so that accepting never fails for want of descriptors
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * max_connections + 256)), hard))
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info", timeout_graceful_shutdown=60,
                limit_concurrency=max_connections, timeout_keep_alive=5, http=HeaderTimeoutProtocol)
