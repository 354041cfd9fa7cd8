"""The HTTP layer: a FastAPI app that parses, checks, hands requests to the scheduler and streams back.

    GET  /                       the chat page (static/index.html, with its CSS and JavaScript)
    GET  /health                 {"status": "ok", "active": ..., "waiting": ...}, and with a draft model
                                 "draft": {"rounds": ..., "drafted": ..., "accepted": ...} so far
    GET  /v1/models              the one model served
    POST /v1/completions         OpenAI's completions, streamed as server-sent events with "stream": true
    POST /v1/chat/completions    OpenAI's chat completions, the same

Everything about requests and responses is in api.py, the batching in scheduler.py; this module only
moves bytes: authentication (`Authorization: Bearer KEY` when the server has a key; 401 otherwise), the
body size limit (413), JSON (400), a full queue (429 with Retry-After), errors in OpenAI's shape, client
disconnects (a stream's sequences are cancelled as soon as sending to it fails; a waiting plain request
polls for the disconnect), and one log line per request: status, tokens and latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama_mini.serve.api import (
    APIError,
    ChatCompletionRequest,
    ChoiceText,
    CompletionRequest,
    Plan,
    Served,
    new_id,
    now,
    parse_request,
    usage,
)
from llama_mini.serve.scheduler import (
    Finished,
    NewToken,
    PromptScored,
    QueueFull,
    Scheduler,
    Sequence,
    TokenLogprobs,
)

__all__ = ["DEFAULT_MAX_BODY_BYTES", "create_app"]

log = logging.getLogger("llama_mini.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON: far more text than any context we serve
RETRY_AFTER_SECONDS = 1
DISCONNECT_POLL_SECONDS = 0.25  # how often a plain (non-streamed) request checks that its client is there
STATIC = "llama_mini.serve.static"


def create_app(
    served: Served,
    scheduler: Scheduler,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The app for `served` (model and tokenizer) and `scheduler` (started with the app, stopped after it)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="llama-mini", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(RequestLog)
    app.state.scheduler, app.state.served = scheduler, served  # for the command's shutdown and for tests

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if error.status in (429, 503) else None
        if error.status == 401:
            headers = {"WWW-Authenticate": "Bearer"}
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(APIError(error.status_code, message, kind).body(), status_code=error.status_code)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer KEY' with the server's key",
                type="authentication_error",
                code="invalid_api_key",
            )

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_static_text("index.html"))

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        # Only the page's own files, by exact name: a request can never name another file.
        media = PAGE_FILES.get(name)
        if media is None:
            raise APIError(404, f"no static file {name!r}", type="not_found_error")
        return Response(_static_text(name), media_type=media)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        state = {"status": "ok", "active": scheduler.active, "waiting": scheduler.waiting}
        if scheduler.draft is not None:  # how much the draft helps: accepted / drafted, tokens per round
            counts = scheduler.rounds, scheduler.drafted, scheduler.accepted
            state["draft"] = dict(zip(("rounds", "drafted", "accepted"), counts, strict=True))
        return state

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        authorize(request)
        return served.models()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        authorize(request)
        body = parse_request(CompletionRequest, await _read_json(request, max_body_bytes))
        plan = served.plan_completion(body)
        return await _respond(request, served, scheduler, plan, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = parse_request(ChatCompletionRequest, await _read_json(request, max_body_bytes))
        plan = served.plan_chat(body)
        return await _respond(request, served, scheduler, plan, body)

    return app


PAGE_FILES = {"chat.css": "text/css", "chat.js": "text/javascript"}


def _static_text(name: str) -> str:
    return resources.files(STATIC).joinpath(name).read_text(encoding="utf-8")


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: 413 past `limit` bytes (by Content-Length, or counted as it arrives), 400 when
    it is not JSON."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"the request body is not valid JSON ({error})") from None


# ---------------------------------------------------------------------------------------------------------
# One request's choices: scheduler events in, OpenAI responses out
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Choice:
    text: ChoiceText
    token_ids: list[int] = field(default_factory=list)
    scores: list[TokenLogprobs | None] = field(default_factory=list)
    prompt_scores: tuple[TokenLogprobs | None, ...] = ()
    finish_reason: str | None = None
    error: str = ""  # the scheduler's message when finish_reason is "error"
    closed: bool = False  # a stream has sent the choice's last chunk


class Job:
    """The sequences of one request in the scheduler, and the queue their events arrive on."""

    def __init__(self, scheduler: Scheduler, plan: Plan):
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

        def emitter(index: int):
            return lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        try:
            self.sequences: list[Sequence] = scheduler.submit_many(
                plan.sequences, [emitter(i) for i in range(len(plan.sequences))]
            )
        except QueueFull as error:
            raise APIError(429, str(error), type="rate_limit_error", code="queue_full") from None
        self.open = len(self.sequences)

    def cancel(self) -> None:
        for sequence in self.sequences:
            sequence.cancel()


async def _respond(request: Request, served: Served, scheduler: Scheduler, plan: Plan, body: Any) -> Response:
    state = request.state
    state.prompt_tokens = sum(len(prompt) for prompt in plan.prompts)
    state.completion_tokens = 0
    job = Job(scheduler, plan)
    choices = [
        Choice(served.choice_text(plan, plan.prompts[index // plan.n]))
        for index in range(len(plan.sequences))
    ]
    if body.stream:
        chunks = _stream_chunks(served, plan, body, job, choices, state)
        return EventStream(_sse(chunks), job)
    try:
        checked = time.monotonic()
        while job.open:
            try:
                index, event = await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL_SECONDS)
                _apply(job, choices, index, event, state)
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - checked >= DISCONNECT_POLL_SECONDS:  # also while tokens keep coming
                checked = time.monotonic()
                if await request.is_disconnected():
                    state.status_note = "client went away"
                    return Response(status_code=499)
    finally:
        job.cancel()
    _raise_failure(choices)
    if plan.chat:
        return JSONResponse(_chat_response(served, plan, choices, state))
    return JSONResponse(_completion_response(served, plan, body, choices, state))


def _apply(job: Job, choices: list[Choice], index: int, event: Any, state: Any) -> str:
    """Record one event of choice `index`; return the text it lets the client see now."""
    choice = choices[index]
    if isinstance(event, PromptScored):
        choice.prompt_scores = event.logprobs
        return ""
    if isinstance(event, Finished):
        job.open -= 1
        if choice.finish_reason is None:  # a stop string may have finished it already
            choice.finish_reason = "error" if event.reason == "error" else event.reason
            choice.error = event.message
        return choice.text.finish() if choice.finish_reason != "error" else ""
    if choice.finish_reason is not None:  # tokens after a stop string (the sequence is being cancelled)
        return ""
    assert isinstance(event, NewToken)
    choice.token_ids.append(event.token_id)
    choice.scores.append(event.logprobs)
    state.completion_tokens += 1
    shown = choice.text.push(event.token_id)
    if choice.text.stopped:
        choice.finish_reason = "stop"
        job.sequences[index].cancel()
    return shown


def _raise_failure(choices: list[Choice]) -> None:
    for choice in choices:
        if choice.finish_reason == "error":
            raise APIError(500, f"generation failed: {choice.error}", type="server_error")
        if choice.finish_reason == "cancelled":  # the server is shutting down
            raise APIError(503, "the server is shutting down", type="server_error")


def _completion_response(
    served: Served, plan: Plan, body: CompletionRequest, choices: list[Choice], state: Any
) -> dict[str, Any]:
    out = []
    for index, choice in enumerate(choices):
        prompt_index = index // plan.n
        prompt_text = plan.prompt_texts[prompt_index] if body.echo else ""
        logprobs = None
        if body.logprobs is not None:
            ids, scores = list(choice.token_ids), list(choice.scores)
            if body.echo:
                ids = plan.prompts[prompt_index] + ids
                scores = list(choice.prompt_scores) + scores
            logprobs = served.completion_logprobs(ids, scores, 0)
        out.append(
            {
                "index": index,
                "text": prompt_text + choice.text.text,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
            }
        )
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": served.model_id,
        "choices": out,
        "usage": usage(state.prompt_tokens, state.completion_tokens),
    }


def _chat_response(served: Served, plan: Plan, choices: list[Choice], state: Any) -> dict[str, Any]:
    out = []
    for index, choice in enumerate(choices):
        logprobs = None
        if plan.sequences[index].top_logprobs is not None:
            logprobs = served.chat_logprobs(choice.token_ids, choice.scores)
        out.append(
            {
                "index": index,
                "message": {"role": "assistant", "content": choice.text.text},
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
            }
        )
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": served.model_id,
        "choices": out,
        "usage": usage(state.prompt_tokens, state.completion_tokens),
    }


async def _stream_chunks(
    served: Served, plan: Plan, body: Any, job: Job, choices: list[Choice], state: Any
) -> AsyncIterator[dict[str, Any]]:
    """The chunks of a streamed response, in OpenAI's format for the endpoint."""
    response_id, created = new_id("chatcmpl" if plan.chat else "cmpl"), now()
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    kind = "chat.completion.chunk" if plan.chat else "text_completion"

    def chunk(index: int, text: str | None, finish_reason: str | None, logprobs=None, first=False):
        if plan.chat:
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text is not None:
                delta["content"] = text
            item = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            item = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        out = {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": served.model_id,
            "choices": [item],
        }
        if include_usage:
            out["usage"] = None
        return out

    offsets = [0] * len(choices)
    for index in range(len(choices)):
        if plan.chat:
            yield chunk(index, "", None, first=True)
        elif body.echo and body.logprobs is None:  # with logprobs, the prompt comes with its scores below
            offsets[index] = len(plan.prompt_texts[index // plan.n])
            yield chunk(index, plan.prompt_texts[index // plan.n], None)
    while job.open:
        index, event = await job.queue.get()
        choice = choices[index]
        scored = len(choice.token_ids)
        shown = _apply(job, choices, index, event, state)
        if isinstance(event, PromptScored) and body.echo:
            prompt_index = index // plan.n
            logprobs = None
            if body.logprobs is not None:
                logprobs = served.completion_logprobs(plan.prompts[prompt_index], list(event.logprobs), 0)
            text = plan.prompt_texts[prompt_index]
            offsets[index] = len(text)
            yield chunk(index, text, None, logprobs)
            continue
        logprobs = None
        if isinstance(event, NewToken) and event.logprobs is not None and len(choice.token_ids) > scored:
            if plan.chat:
                logprobs = served.chat_logprobs([event.token_id], [event.logprobs])
            else:
                logprobs = served.completion_logprobs([event.token_id], [event.logprobs], offsets[index])
        if shown or logprobs is not None:
            offsets[index] += len(shown)
            yield chunk(index, shown, None, logprobs)
        if choice.finish_reason is not None and not choice.closed:
            choice.closed = True
            if choice.finish_reason == "error":
                raise APIError(500, f"generation failed: {choice.error}", type="server_error")
            if choice.finish_reason == "cancelled":
                raise APIError(503, "the server is shutting down", type="server_error")
            yield chunk(index, None if plan.chat else "", choice.finish_reason)
    if include_usage:
        yield {
            "id": response_id,
            "object": kind,
            "created": created,
            "model": served.model_id,
            "choices": [],
            "usage": usage(state.prompt_tokens, state.completion_tokens),
        }


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events: `data: {json}` per chunk, then `data: [DONE]`; an error mid-stream is sent as an
    event with OpenAI's error object (the status line has gone out already)."""
    try:
        async for item in chunks:
            yield b"data: " + json.dumps(item, ensure_ascii=False).encode() + b"\n\n"
    except APIError as error:
        yield b"data: " + json.dumps(error.body()).encode() + b"\n\n"
    yield b"data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A server-sent event stream whose job is cancelled whenever the response ends: finished, failed, or
    cut off by a client that went away (sending to it fails)."""

    def __init__(self, content: AsyncIterator[bytes], job: Job):
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.job = job

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.job.cancel()
            await self.body_iterator.aclose()


class RequestLog:
    """ASGI middleware: one log line per request, when its response has been sent: client, method, path,
    status, prompt and completion tokens (set by the handler on request.state), latency."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = scope.setdefault("state", {})
        status = [0]

        async def logged_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, logged_send)
        finally:
            client = scope.get("client") or ("-", 0)
            tokens = ""
            if "prompt_tokens" in state:
                tokens = (
                    f" prompt_tokens={state['prompt_tokens']} completion_tokens={state['completion_tokens']}"
                )
            note = f" ({state['status_note']})" if "status_note" in state else ""
            log.info(
                '%s "%s %s" %s%s %.3fs%s',
                client[0],
                scope["method"],
                scope["path"],
                status[0] or "-",
                tokens,
                time.perf_counter() - start,
                note,
            )
