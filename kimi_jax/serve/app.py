"""The OpenAI-compatible HTTP API over one :class:`~kimi_jax.inference.engine.Engine`.

``create_app(model, tokenizer, ...)`` returns a FastAPI app with ``POST /v1/chat/completions``,
``POST /v1/completions``, ``GET /v1/models``, ``GET /health`` and ``GET /metrics``
(Prometheus). The engine runs on one thread (:class:`~kimi_jax.serve.worker.EngineWorker`);
each HTTP request waits on its own queue. Errors are OpenAI error objects: 400 for a bad
request, 429 (``Retry-After``) when too many requests wait, 503 when the engine has stopped.
A client that disconnects ends its request and frees its slot.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import prometheus_client
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from kimi_jax.chat.tokenizer import Tokenizer
from kimi_jax.inference.engine import Engine
from kimi_jax.inference.sampling import RECOMMENDED_SAMPLING
from kimi_jax.media.placeholders import (
    conversation_media,
    expand_media_placeholders,
    insert_video_chunks,
    preprocess_conversation_media,
)
from kimi_jax.media.preprocess import PreprocessConfig
from kimi_jax.model.kimi import Kimi
from kimi_jax.serve.grammar import ToolGrammar
from kimi_jax.serve.stream import Delta, OutputStream
from kimi_jax.serve.worker import Busy, EngineWorker, Job, Unavailable

MAX_STOP_STRINGS = 4
DISCONNECT_POLL_S = 0.5
"""How often a waiting non-streaming request checks that its client is still there."""


class APIError(Exception):
    """An error answered as an OpenAI error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after = status, message, param, retry_after
        self.kind = kind or {400: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}.get(
            status, "server_error")

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return JSONResponse(body, status_code=self.status, headers=headers)


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None
    top_k: int | None = None


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    max_completion_tokens: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str]
    echo: bool = False


def _check_common(body: _Common, max_new: int | None) -> None:
    if body.n != 1:
        raise APIError(400, f"n must be 1, got {body.n}", param="n")
    if body.temperature is not None and not body.temperature >= 0:
        raise APIError(400, f"temperature must be >= 0, got {body.temperature}", param="temperature")
    if body.top_p is not None and not 0 < body.top_p <= 1:
        raise APIError(400, f"top_p must be in (0, 1], got {body.top_p}", param="top_p")
    if body.top_k is not None and body.top_k < 0:
        raise APIError(400, f"top_k must be >= 0 (0 = off), got {body.top_k}", param="top_k")
    if max_new is not None and max_new < 1:
        raise APIError(400, f"max_tokens must be >= 1, got {max_new}", param="max_tokens")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError(400, f"{name} is not supported (only 0)", param=name)
    if body.logprobs:
        raise APIError(400, "logprobs are not supported", param="logprobs")
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    if body.seed is not None and not 0 <= body.seed < 2**32:
        raise APIError(400, f"seed must be in [0, 2**32), got {body.seed}", param="seed")
    stops = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"at most {MAX_STOP_STRINGS} stop strings, got {len(stops)}", param="stop")


def _stops(body: _Common) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else list(body.stop or [])


class Server:
    """The state behind the app: the engine's worker, the tokenizer, the grammar and the metrics."""

    def __init__(
        self, model: Kimi, tokenizer: Tokenizer, *, name: str, max_slots: int, max_length: int,
        prefill_chunk: int, max_queue: int, cache_dtype: Any, preprocessor: PreprocessConfig | None,
        stop_ids: Sequence[int],
    ):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.preprocessor = preprocessor or PreprocessConfig.default()
        self.stop_ids = sorted(set(stop_ids) | set(tokenizer.stop_ids))
        engine = Engine(model, max_slots=max_slots, max_length=max_length, prefill_chunk=prefill_chunk,
                        cache_dtype=cache_dtype)
        self.max_length = engine.max_length
        self.grammar = ToolGrammar(tokenizer)
        self.worker = EngineWorker(engine, max_queue=max_queue)
        self.created = int(time.time())
        r = self.registry = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter("kimi_jax_requests", "HTTP requests answered", ["endpoint", "status"],
                                                  registry=r)
        self.prompt_tokens = prometheus_client.Counter("kimi_jax_prompt_tokens", "Prompt tokens", registry=r)
        self.generated_tokens = prometheus_client.Counter("kimi_jax_generated_tokens", "Generated tokens", registry=r)
        self.ttft = prometheus_client.Histogram("kimi_jax_time_to_first_token_seconds", "Time to first token",
                                                registry=r)
        self.itl = prometheus_client.Histogram(
            "kimi_jax_inter_token_latency_seconds", "Time between tokens", registry=r,
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, float("inf")))
        self.latency = prometheus_client.Histogram("kimi_jax_request_latency_seconds", "Request latency", registry=r)
        held = prometheus_client.Gauge("kimi_jax_requests_held", "Requests running or waiting", registry=r)
        held.set_function(lambda: self.worker.load()[0])
        waiting = prometheus_client.Gauge("kimi_jax_queue_length", "Requests waiting for a slot", registry=r)
        waiting.set_function(lambda: max(self.worker.load()[0] - max_slots, 0))
        used = prometheus_client.Gauge("kimi_jax_slots_used", "Slots holding a request", registry=r)
        used.set_function(lambda: min(self.worker.load()[0], max_slots))
        prometheus_client.Gauge("kimi_jax_slots", "Engine slots", registry=r).set(max_slots)

    # ---- prompts

    def encode_chat(self, body: ChatRequest, thinking: bool) -> tuple[list[int], tuple | None]:
        """The prompt ids (media placeholders expanded) and media of a chat request."""
        try:
            media = conversation_media(body.messages, self.preprocessor)
            ids = self.tokenizer.encode_chat(body.messages, tools=body.tools, thinking=thinking,
                                             postprocess=lambda text: insert_video_chunks(text, media))
            if not media:
                return ids, None
            vision = self.model.vision_config
            if vision is None:
                raise ValueError("the model has no vision tower: images and videos cannot be read")
            pixels, grids = preprocess_conversation_media(media, self.preprocessor)
            ids = expand_media_placeholders(ids, grids, placeholder_id=self.model.config.media_placeholder_token_id,
                                            merge_kernel_size=vision.merge_kernel_size)
            return np.asarray(ids).tolist(), (pixels, grids)
        except (ValueError, TypeError, KeyError) as e:
            raise APIError(400, f"invalid messages: {e}", param="messages") from None

    def check_length(self, ids: list[int], max_new: int | None) -> int:
        """The token budget of a prompt of ``ids``: ``max_new`` or the rest of the context."""
        room = self.max_length - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens; this server's context is {self.max_length} "
                                "tokens, which leaves no room for a reply", param="messages")
        return min(max_new or room, room + 1)

    # ---- running a job

    def submit(self, ids: list[int], *, max_new: int, temperature: float, top_p: float, top_k: int | None,
               seed: int | None, media: tuple | None = None, constraint=None) -> Job:
        job = Job(None, asyncio.get_running_loop())

        def start(engine: Engine):
            return engine.submit(
                ids, max_new_tokens=max_new, temperature=temperature, top_p=top_p, top_k=top_k or 0,
                seed=seed if seed is not None else int(uuid.uuid4().int % 2**32), stop_ids=self.stop_ids,
                on_token=lambda t: job.push("token", t), constraint=constraint,
                pixel_values=None if media is None else media[0], grid_thws=None if media is None else media[1],
            )

        job.submit = start
        try:
            self.worker.submit(job)
        except Busy as e:
            raise APIError(429, str(e), retry_after=1) from None
        except Unavailable as e:
            raise APIError(503, str(e), retry_after=5) from None
        self.prompt_tokens.inc(len(ids))
        return job

    async def events(self, job: Job, request: Request) -> AsyncIterator[tuple[str, Any]]:
        """The job's events; cancels the job if the client goes away or the consumer stops early."""
        last = None
        try:
            while True:
                try:
                    kind, value = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if kind == "token":
                    now = time.perf_counter()
                    if last is None:
                        self.ttft.observe(now - job.submitted_at)
                    else:
                        self.itl.observe(now - last)
                    last = now
                    self.generated_tokens.inc()
                yield kind, value
                if kind != "token":
                    self.latency.observe(time.perf_counter() - job.submitted_at)
                    return
        finally:
            self.worker.cancel(job)


async def _decoded(server, job: Job, request: Request, stream: OutputStream) -> AsyncIterator[tuple[str, Any]]:
    """The job's tokens through ``stream``: ``("delta", what the token added)`` for each, then
    ``("done", the engine's finish reason)`` or ``("error", message)``; a stop string ends it
    early (``("done", None)``) and cancels the job, whose remaining tokens are not needed."""
    async for kind, value in server.events(job, request):
        if kind != "token":
            yield kind, value
            return
        yield "delta", stream.feed(value)
        if stream.stopped:
            server.worker.cancel(job)
            yield "done", None
            return


async def _collect(decoded: AsyncIterator[tuple[str, Any]]) -> tuple[int, str | None]:
    """Runs :func:`_decoded` to its end for a non-streaming reply: (tokens, finish reason);
    an engine error becomes a 503."""
    count = 0
    async for kind, value in decoded:
        if kind == "error":
            raise APIError(503, value, retry_after=5)
        if kind == "done":
            return count, value
        count += 1
    return count, None


def _sse_error(message: str) -> str:
    return _sse({"error": {"message": message, "type": "service_unavailable", "code": 503}})


def _finish_reason(stream: OutputStream, engine_reason: str | None) -> str:
    if stream.calls and engine_reason != "length":
        return "tool_calls"
    return "length" if engine_reason == "length" and not stream.stopped else "stop"


def _delta_json(delta: Delta) -> list[dict[str, Any]]:
    """The OpenAI chat deltas for one :class:`Delta` (reasoning, content, then tool-call pieces)."""
    out: list[dict[str, Any]] = []
    if delta.reasoning:
        out.append({"reasoning_content": delta.reasoning, "reasoning": delta.reasoning})
    if delta.content:
        out.append({"content": delta.content})
    for call in delta.calls:
        piece: dict[str, Any] = {"index": call.index, "function": {"arguments": call.arguments}}
        if call.id is not None:
            piece.update(id=call.id, type="function")
            piece["function"]["name"] = call.name
        out.append({"tool_calls": [piece]})
    return out


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(
    model: Kimi, tokenizer: Tokenizer, *, served_model_name: str = "kimi-k2.5", max_slots: int = 8,
    max_length: int = 4096, prefill_chunk: int = 256, max_queue: int = 64, cache_dtype: Any = "bfloat16",
    preprocessor: PreprocessConfig | None = None, stop_ids: Sequence[int] = (),
) -> FastAPI:
    """The server's FastAPI app; ``app.state.server`` is its :class:`Server` (call
    ``app.state.server.worker.stop()`` when done). ``max_queue`` requests may wait beyond the
    ``max_slots`` being decoded; ``stop_ids`` end every reply besides the tokenizer's own."""
    server = Server(model, tokenizer, name=served_model_name, max_slots=max_slots, max_length=max_length,
                    prefill_chunk=prefill_chunk, max_queue=max_queue, cache_dtype=cache_dtype,
                    preprocessor=preprocessor, stop_ids=stop_ids)
    app = FastAPI(title="kimi-jax", docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        server.requests.labels(request.url.path, str(e.status)).inc()
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}" for err in e.errors()
        )
        return await api_error(request, APIError(400, f"invalid request: {problems}"))

    @app.exception_handler(Exception)
    async def internal(request: Request, e: Exception):
        return await api_error(request, APIError(500, f"internal error: {type(e).__name__}: {e}"))

    def check_model(name: str) -> None:
        if name != server.name:
            raise APIError(400, f"model {name!r} is not served here; this server serves {server.name!r}",
                           param="model", kind="invalid_request_error")

    @app.get("/health")
    async def health():
        if not server.worker.alive:
            raise APIError(503, server.worker.error or "the engine has stopped", retry_after=5)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(prometheus_client.generate_latest(server.registry),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": server.created,
                                            "owned_by": "kimi-jax", "max_model_len": server.max_length}]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        check_model(body.model)
        max_new = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        _check_common(body, max_new)
        if body.top_logprobs:
            raise APIError(400, "top_logprobs is not supported", param="top_logprobs")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, "response_format other than text is not supported", param="response_format")
        kwargs = body.chat_template_kwargs or {}
        thinking = kwargs.get("thinking", kwargs.get("enable_thinking", True)) is not False
        if body.thinking is not None:
            if body.thinking.get("type") not in ("enabled", "disabled"):
                raise APIError(400, "thinking.type must be 'enabled' or 'disabled'", param="thinking")
            thinking = body.thinking["type"] == "enabled"
        defaults = RECOMMENDED_SAMPLING["thinking" if thinking else "instant"]
        constraint = None
        if body.tools:
            try:
                constraint = server.grammar.constraint(body.tools, body.tool_choice or "auto", thinking=thinking,
                                                       parallel=body.parallel_tool_calls)
            except ValueError as e:
                raise APIError(400, str(e), param="tools") from None
        elif body.tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        ids, media = await run_in_threadpool(server.encode_chat, body, thinking)
        budget = server.check_length(ids, max_new)
        job = server.submit(
            ids, max_new=budget, seed=body.seed, media=media, constraint=constraint, top_k=body.top_k,
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
        )
        server.requests.labels("/v1/chat/completions", "200").inc()
        stream = OutputStream(server.tokenizer, thinking=thinking, stop=_stops(body))
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        if not body.stream:
            count, reason = await _collect(_decoded(server, job, request, stream))
            stream.close()
            message: dict[str, Any] = {"role": "assistant", "content": stream.content or (None if stream.calls else "")}
            if stream.reasoning:
                message["reasoning_content"] = message["reasoning"] = stream.reasoning
            if stream.calls:
                message["tool_calls"] = [{"id": c.id, "type": "function",
                                          "function": {"name": c.name, "arguments": c.arguments}} for c in stream.calls]
            return {"id": reply_id, "object": "chat.completion", "created": created, "model": server.name,
                    "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(stream, reason),
                                 "logprobs": None}],
                    "usage": usage(count)}

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return _sse({"id": reply_id, "object": "chat.completion.chunk", "created": created, "model": server.name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]})

        async def sse():
            yield chunk({"role": "assistant", "content": ""})
            count, reason = 0, None
            async for kind, value in _decoded(server, job, request, stream):
                if kind == "error":
                    yield _sse_error(value)
                    return
                if kind == "done":
                    reason = value
                    break
                count += 1
                for piece in _delta_json(value):
                    yield chunk(piece)
            for piece in _delta_json(stream.close()):
                yield chunk(piece)
            yield chunk({}, _finish_reason(stream, reason))
            if include_usage:
                yield _sse({"id": reply_id, "object": "chat.completion.chunk", "created": created,
                            "model": server.name, "choices": [], "usage": usage(count)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        max_new = 16 if body.max_tokens is None else body.max_tokens
        _check_common(body, max_new)
        if body.echo:
            raise APIError(400, "echo is not supported", param="echo")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = server.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not ids or min(ids) < 0 or max(ids) >= server.model.config.text.vocab_size:
                raise APIError(400, "prompt token ids must be a non-empty list of ids within the vocabulary",
                               param="prompt")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        budget = server.check_length(ids, max_new)
        job = server.submit(ids, max_new=budget, seed=body.seed, top_k=body.top_k,
                            temperature=1.0 if body.temperature is None else body.temperature,
                            top_p=1.0 if body.top_p is None else body.top_p)
        server.requests.labels("/v1/completions", "200").inc()
        stream = OutputStream(server.tokenizer, thinking=False, stop=_stops(body))
        reply_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def finish(reason: str | None) -> str:
            return "length" if reason == "length" and not stream.stopped else "stop"

        def usage(n: int) -> dict[str, int]:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def body_of(text: str, reason: str | None, n: int | None = None) -> dict[str, Any]:
            out = {"id": reply_id, "object": "text_completion", "created": created, "model": server.name,
                   "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}
            if n is not None:
                out["usage"] = usage(n)
            return out

        if not body.stream:
            count, reason = await _collect(_decoded(server, job, request, stream))
            stream.close()
            return body_of(stream.content, finish(reason), count)

        include_usage = bool((body.stream_options or {}).get("include_usage"))

        async def sse():
            count, reason = 0, None
            async for kind, value in _decoded(server, job, request, stream):
                if kind == "error":
                    yield _sse_error(value)
                    return
                if kind == "done":
                    reason = value
                    break
                count += 1
                if value.content:
                    yield _sse(body_of(value.content, None))
            rest = stream.close().content
            yield _sse(body_of(rest, finish(reason)))
            if include_usage:
                yield _sse({"id": reply_id, "object": "text_completion", "created": created, "model": server.name,
                            "choices": [], "usage": usage(count)})
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app
