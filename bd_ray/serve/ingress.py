"""``OpenAIIngress``: the OpenAI-compatible HTTP front of bd-ray's Serve application.

FastAPI through ``@serve.ingress``: ``/v1/completions``, ``/v1/chat/completions``,
``/v1/models``, ``/health``, ``/debug/engine``. It reads and validates the body
(:mod:`bd_ray.serve.protocol`), translates it into an :class:`~bd_ray.serve.protocol.EngineRequest`
(:mod:`bd_ray.serve.payload`: tokenization, chat template, context limit, defaults), calls the
:class:`~bd_ray.serve.engine.SpecEngine` through a streaming ``DeploymentHandle`` that survives
replica deaths (:mod:`bd_ray.serve.resilience`), and answers with a completion, a server-sent
event stream, or OpenAI error JSON.

Overload: beyond ``max_ongoing_requests`` per replica the ingress's handle queues up to
``max_queued_requests`` requests; beyond that Serve raises ``BackPressureError`` and the ingress
answers 503 with ``Retry-After`` (OpenAI error JSON). A request that cannot start within
``ingress.first_chunk_timeout_s`` also gets 503: never a hung request.
"""

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from bd_ray.config.serve import ServeAppConfig
from bd_ray.serve.logprobs import LogprobFormatter
from bd_ray.serve.metrics import IngressMetrics
from bd_ray.serve.payload import build_engine_request
from bd_ray.serve.protocol import (ChatCompletionRequest, CompletionRequest, EngineRequest, RequestError, error_body,
                                   max_request_bytes, validation_error_body)
from bd_ray.serve.resilience import ReplicaDiedError, ResilientCall, cancel_call, is_replica_failure

__all__ = ["OpenAIIngress", "fastapi_app", "REPLICA_HEADER"]

log = logging.getLogger("ray.serve")

fastapi_app = FastAPI(title="bd-ray", description="OpenAI-compatible speculative decoding server (BudgetDraft)")


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    loc = ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else "body"
    return JSONResponse(error_body(f"invalid request: {exc.errors()}", param=loc, code="invalid_value"),
                        status_code=400)


def _response(err: RequestError) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


@dataclass
class _Output:
    """How one request's response is shaped: its id, route, prompt tokens, logprobs k, echo text."""

    rid: str
    chat: bool
    prompt_tokens: int
    k: int | None
    echo: str = ""
    include_usage: bool = False


# Response header naming the engine replica that served (streams: started) the request.
REPLICA_HEADER = "X-BD-Ray-Replica"


@serve.deployment(name="OpenAIIngress")
@serve.ingress(fastapi_app)
class OpenAIIngress:
    """OpenAI-compatible HTTP front (OpenAI API shapes; vLLM / Ray Serve LLM server behaviour).

    Args:
        engine: handle to the :class:`SpecEngine` deployment.
        config: a :class:`bd_ray.config.serve.ServeAppConfig` as a dict.

    Status codes: 200; 400 invalid parameter (``param`` names the field) or prompt + max_tokens
    beyond the context limit (the message names the limit, ``code`` =
    ``context_length_exceeded``); 404 unknown model (``code`` = ``model_not_found``); 503 with
    ``Retry-After`` when the engine queue is full or a request cannot start in time; 500 engine
    failure. All bodies are OpenAI error JSON.
    """

    def __init__(self, engine: Any, config: dict) -> None:
        from bd_ray import models

        self.engine = engine
        self.cfg = ServeAppConfig.model_validate(config)
        m = self.cfg.model
        self.tokenizer = models.load_tokenizer(m.verifier)
        if m.chat_template:
            self.tokenizer.chat_template = m.chat_template
        self.model_ids = [m.name, *m.aliases]
        self.created = int(time.time())
        self.max_model_len = self._config_limit()
        self.max_body_bytes = max_request_bytes(self.max_model_len)
        self.metrics = IngressMetrics()

    def _config_limit(self) -> int | None:
        from transformers import AutoConfig

        from bd_ray.models import resolve_model_path

        cfg = AutoConfig.from_pretrained(resolve_model_path(self.cfg.model.verifier), local_files_only=True)
        limit = getattr(cfg.get_text_config(), "max_position_embeddings", None)
        if self.cfg.model.max_model_len is not None:
            limit = self.cfg.model.max_model_len if limit is None else min(limit, self.cfg.model.max_model_len)
        return limit

    # ---- routes -------------------------------------------------------------------------------
    @fastapi_app.get("/health")
    async def health(self) -> JSONResponse:
        """200 ``{"status": "ok", "engine": SpecEngine.stats of one replica}``; 503 if the engine does not answer in 10 s."""
        try:
            stats = await asyncio.wait_for(self.engine.stats.remote(), 10.0)
        except Exception as exc:  # noqa: BLE001
            return _response(RequestError(503, f"engine unavailable: {type(exc).__name__}: {exc}",
                                          type="server_error", code="engine_unavailable",
                                          headers={"Retry-After": self._retry_after()}))
        return JSONResponse({"status": "ok", "model": self.cfg.model.name, "engine": stats})

    @fastapi_app.get("/debug/engine")
    async def debug_engine(self, deep: bool = False) -> JSONResponse:
        """The engine replica's live-request table, pid and RSS (``SpecEngine.stats``; one replica
        per call); ``?deep=true`` adds its count of live KV-cache objects (a heap scan, slow)."""
        return JSONResponse(await self.engine.stats.remote(deep=deep))

    @fastapi_app.get("/v1/models")
    async def list_models(self) -> JSONResponse:
        """OpenAI model list: the served id and its aliases, with ``max_model_len`` (vLLM)."""
        data = [{"id": mid, "object": "model", "created": self.created, "owned_by": "bd-ray",
                 "root": self.cfg.model.verifier, "max_model_len": self.max_model_len} for mid in self.model_ids]
        return JSONResponse({"object": "list", "data": data})

    @fastapi_app.post("/v1/completions")
    async def completions(self, request: Request):
        """OpenAI ``POST /v1/completions`` (streaming with ``stream: true``)."""
        return await self._serve(request, chat=False)

    @fastapi_app.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        """OpenAI ``POST /v1/chat/completions`` (streaming with ``stream: true``)."""
        return await self._serve(request, chat=True)

    # ---- request handling ---------------------------------------------------------------------
    def _retry_after(self) -> str:
        return str(max(1, int(round(self.cfg.ingress.retry_after_s))))

    async def _read_json(self, request: Request) -> Any:
        """The request body as JSON, read at most ``self.max_body_bytes`` bytes far.

        Raises ``RequestError``: 413 for a larger body (declared or streamed), 400 for a body that
        is not UTF-8 or not JSON (the message says where)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = (f"request body is larger than the limit of {limit} bytes "
                   f"(a prompt of max_model_len={self.max_model_len} tokens fits well within it)")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, too_big.replace("larger than", f"{int(declared)} bytes, over"),
                               code="request_too_large")
        buf = bytearray()
        async for part in request.stream():
            buf += part
            if len(buf) > limit:
                raise RequestError(413, too_big, code="request_too_large")
        try:
            text = bytes(buf).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(400, f"request body is not valid UTF-8: byte 0x{buf[exc.start]:02x} at offset "
                                    f"{exc.start}", code="invalid_json") from None
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise RequestError(400, f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json") from None

    async def _serve(self, request: Request, chat: bool):
        route = "chat" if chat else "completions"
        try:
            body = await self._read_json(request)
            if not isinstance(body, dict):
                raise RequestError(400, "request body must be a JSON object", code="invalid_json")
            try:
                parsed = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
            except ValidationError as err:
                raise RequestError(400, "invalid request", body=validation_error_body(err)) from None
            engine_req = build_engine_request(parsed, self.cfg, self.tokenizer, self.model_ids, self.max_model_len)
            response = await self._run(parsed, engine_req, chat)
        except RequestError as err:
            response = _response(err)
        self.metrics.request(route, response.status_code)
        return response

    async def _run(self, req: CompletionRequest | ChatCompletionRequest, request: EngineRequest, chat: bool):
        # n > 1: one engine call (one row of a batch) per choice, each surviving replica deaths alone
        reqs = [request] if req.n == 1 else [request.choice(i) for i in range(req.n)]
        gens: list[ResilientCall] = []

        def cancel_all() -> None:
            for g in gens:
                cancel_call(g)

        try:
            for r in reqs:
                gens.append(ResilientCall(self.engine, r, reproducible=r.reproducible, discard=not req.stream))
        except Exception as exc:  # noqa: BLE001 -- e.g. BackPressureError raised at assignment
            cancel_all()
            raise self._engine_exception(exc) from None
        try:
            firsts = await asyncio.wait_for(asyncio.gather(*(g.__anext__() for g in gens)),
                                            self.cfg.ingress.first_chunk_timeout_s)
        except asyncio.TimeoutError:
            cancel_all()
            raise RequestError(503, f"the request could not start within {self.cfg.ingress.first_chunk_timeout_s}"
                                    f" s (server overloaded); retry later", type="server_error",
                               code="overloaded", headers={"Retry-After": self._retry_after()}) from None
        except asyncio.CancelledError:
            cancel_all()
            raise
        except StopAsyncIteration:
            cancel_all()
            raise RequestError(500, "engine ended the request without output", type="server_error") from None
        except Exception as exc:  # noqa: BLE001
            cancel_all()
            raise self._engine_exception(exc) from None
        for first in firsts:
            if first["type"] == "error":
                cancel_all()
                raise RequestError(first["status"], "engine error", body=first["error"])
        out = _Output(rid=("chatcmpl-" if chat else "cmpl-") + request.request_id, chat=chat,
                      prompt_tokens=len(request.prompt_ids), k=request.logprobs,
                      echo=self._echo_text(req, request) if not chat and req.echo else "")
        if req.stream:
            out.include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # X-BD-Ray-Replica: the engine replica that started the request (diagnostics, fault tests)
            return StreamingResponse(self._stream(gens, firsts, out), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              REPLICA_HEADER: str(firsts[0].get("replica_id", ""))})
        try:
            choices = await asyncio.gather(*(self._collect(g, f) for g, f in zip(gens, firsts)))
        except asyncio.CancelledError:
            cancel_all()
            raise
        for c in choices:
            if isinstance(c, JSONResponse):
                cancel_all()
                return c
        return self._completion(out, choices)

    def _echo_text(self, req: CompletionRequest, request: EngineRequest) -> str:
        return req.prompt if isinstance(req.prompt, str) else self.tokenizer.decode(request.prompt_ids)

    def _engine_exception(self, exc: Exception) -> RequestError:
        """The OpenAI error for a failed engine call: 503 + ``Retry-After`` for overload and lost
        replicas, 500 otherwise."""
        from ray.serve.exceptions import BackPressureError

        retry = {"Retry-After": self._retry_after()}
        cause = getattr(exc, "cause", None)
        if isinstance(exc, BackPressureError) or isinstance(cause, BackPressureError):
            return RequestError(503, f"server overloaded: {getattr(exc, 'message', exc)} Retry later.",
                                type="server_error", code="overloaded", headers=retry)
        name = type(exc).__name__
        if isinstance(exc, ReplicaDiedError):
            return RequestError(503, str(exc), type="server_error", code="engine_replica_died", headers=retry)
        if "Unavailable" in name or is_replica_failure(exc):
            return RequestError(503, f"engine unavailable: {name}: {str(exc)[:300]}", type="server_error",
                                code="engine_unavailable", headers=retry)
        log.exception("engine call failed")
        return RequestError(500, f"engine error: {name}: {exc}", type="server_error", code="engine_error")

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _collect(self, gen, first: dict) -> dict | JSONResponse:
        """One choice's events gathered: ``{"text", "logprobs" (entries), "final" (the final event)}``,
        or the error response."""
        texts: list[str] = []
        entries: list[dict] = []
        ev = first
        try:
            while True:
                if ev["type"] == "error":
                    return JSONResponse(ev["error"], status_code=ev["status"])
                if ev["type"] == "reset":  # the replica died; the request restarted from its prompt
                    texts.clear()
                    entries.clear()
                    ev = await gen.__anext__()
                    continue
                texts.append(ev["text"])
                entries += ev.get("logprobs") or []
                if ev["type"] == "final":
                    break
                ev = await gen.__anext__()
        except StopAsyncIteration:
            return _response(RequestError(500, "engine ended the request without a final result",
                                          type="server_error"))
        except asyncio.CancelledError:
            cancel_call(gen)
            raise
        except Exception as exc:  # noqa: BLE001
            return _response(self._engine_exception(exc))
        return {"text": "".join(texts), "logprobs": entries, "final": ev}

    def _completion(self, out: _Output, choices: list[dict]) -> JSONResponse:
        body_choices = []
        completion_tokens = 0
        for i, c in enumerate(choices):
            result = c["final"]["result"]
            completion_tokens += result["completion_tokens"]
            lp = None
            if out.k is not None:
                lp = LogprobFormatter(self.tokenizer, out.chat, len(out.echo)).format(c["logprobs"])
            choice: dict[str, Any] = {"index": i, "finish_reason": result["finish_reason"], "logprobs": lp}
            if out.chat:
                choice["message"] = {"role": "assistant", "content": c["text"]}
            else:
                choice["text"] = out.echo + c["text"]
            body_choices.append(choice)
        spec = [c["final"]["spec_metrics"] for c in choices]
        body = {"id": out.rid, "object": "chat.completion" if out.chat else "text_completion",
                "created": int(time.time()), "model": self.cfg.model.name, "choices": body_choices,
                "usage": self._usage(out.prompt_tokens, completion_tokens),
                "spec_metrics": spec[0] if len(spec) == 1 else spec}
        return JSONResponse(body, headers={REPLICA_HEADER: str(choices[0]["final"].get("replica_id", ""))})

    async def _stream(self, gens: list, firsts: list[dict], out: _Output) -> AsyncIterator[bytes]:
        created = int(time.time())
        obj = "chat.completion.chunk" if out.chat else "text_completion"
        model = self.cfg.model.name
        formatters = [LogprobFormatter(self.tokenizer, out.chat, len(out.echo)) for _ in gens]

        def chunk(i: int, text: str | None, finish: str | None, role: bool = False, entries: list | None = None,
                  **extra: Any) -> bytes:
            lp = formatters[i].format(entries or []) if out.k is not None and entries is not None else None
            if out.chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
            return _sse({"id": out.rid, "object": obj, "created": created, "model": model, "choices": [choice],
                         **extra})

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int) -> None:
            ev = firsts[i]
            try:
                while True:
                    await queue.put((i, ev))
                    if ev["type"] in ("final", "error"):
                        return
                    ev = await gens[i].__anext__()
            except StopAsyncIteration:
                await queue.put((i, {"type": "error", "error": error_body(
                    "engine ended the stream without a final result", type="server_error")}))
            except Exception as exc:  # noqa: BLE001
                await queue.put((i, {"type": "error", "error": self._engine_exception(exc).body}))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(gens))]
        try:
            for i in range(len(gens)):
                if out.chat:
                    yield chunk(i, "", None, role=True)
                elif out.echo:
                    yield chunk(i, out.echo, None)
            done, completion_tokens, specs = 0, 0, []
            while done < len(gens):
                i, ev = await queue.get()
                if ev["type"] == "error":
                    yield _sse(ev["error"])
                    done += 1
                elif ev["type"] == "final":
                    result = ev["result"]
                    completion_tokens += result["completion_tokens"]
                    specs.append(ev["spec_metrics"])
                    if ev["text"] or ev.get("logprobs"):
                        yield chunk(i, ev["text"], None, entries=ev.get("logprobs") or [])
                    yield chunk(i, None if out.chat else "", result["finish_reason"],
                                usage=self._usage(out.prompt_tokens, result["completion_tokens"]),
                                spec_metrics=ev["spec_metrics"])
                    done += 1
                elif ev["type"] == "chunk" and (ev["text"] or ev.get("logprobs")):
                    yield chunk(i, ev["text"], None, entries=ev.get("logprobs") or [])
            if out.include_usage and specs:
                yield _sse({"id": out.rid, "object": obj, "created": created, "model": model, "choices": [],
                            "usage": self._usage(out.prompt_tokens, completion_tokens),
                            "spec_metrics": specs[0] if len(specs) == 1 else specs})
            yield b"data: [DONE]\n\n"
        finally:
            # Client gone or stream done: cancel the engine calls (frees the requests' rows at once).
            for t in tasks:
                t.cancel()
            for g in gens:
                cancel_call(g)

