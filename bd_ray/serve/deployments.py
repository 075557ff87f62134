"""Ray Serve deployments of bd-ray: an autoscaled speculative engine behind an OpenAI ingress.

Two deployments (Ray Serve LLM's ``LLMServer`` + ``OpenAiIngress`` split):

``SpecEngine`` (the verifier deployment)
    Replicas under ``autoscaling_config``. Each replica holds the verifier (full KV caches) **and
    its own drafter in the same process**, and runs the speculative loop
    (:class:`bd_ray.speculative.engine.SpeculativeGenerator`) for the requests routed to it.

``OpenAIIngress``
    FastAPI through ``@serve.ingress``: ``/v1/completions``, ``/v1/chat/completions``,
    ``/v1/models``, ``/health``, ``/debug/engine``. It validates, tokenizes (chat template),
    checks the context limit, and calls the engine through a streaming ``DeploymentHandle``.

Why the drafter is paired in-process with each verifier replica (and not a separate deployment):

* Per-request state must live in exactly one verifier replica and one drafter replica for the
  request's life. With a separate drafter deployment, every request would need sticky routing to
  one drafter replica (Serve routes each call independently; affinity needs a per-request handle
  pinned to a replica or multiplexing tricks) and a leak-free protocol to free the remote sparse
  cache on every exit path (finish, error, client disconnect, replica death).
* Cost: drafting is γ sequential drafter forwards per cycle. A remote call costs ~1-3 ms on these
  CPUs (serialisation + scheduling), comparable to a drafter forward of a small model, so a remote
  drafter would eat most of the speedup. In-process, drafting is a function call.
* The drafter is small by design (sparse KV, few layers): pairing adds little memory to a verifier
  replica, and on a GPU both share the device (the drafter runs the Triton sparse attention,
  ``bd_ray_sparse``; the torch reference path / ``sdpa`` on CPU).
* Autoscaling then scales (verifier + drafter) pairs together, which is what throughput needs.

So a request's whole state (verifier full cache, drafter sparse cache, sampler RNG, stop checker)
is the Python generator returned by ``SpeculativeGenerator.stream`` inside one engine replica.
It is registered in the replica's live-request table when the request starts and released (the
generator is closed on the model thread, dropping both caches) when the request finishes, fails,
or is cancelled because its client disconnected (Serve cancels the ingress request, which cancels
the downstream engine call). ``SpecEngine.stats`` (also ``GET /debug/engine`` and ``/health``)
reports the live count.

Concurrency inside a replica: up to ``max_ongoing_requests`` requests are in flight; their model
work runs on **one** model thread, one engine step (a prefill + first token, or one speculation
cycle) at a time, in FIFO order, so concurrent requests interleave cycle by cycle (time slicing,
no batching) and the event loop stays free to stream, accept and cancel. One thread also keeps
forwards of the shared model objects serialised (query capture for ``snapkv`` patches the model
config for the duration of a prefill, which is not safe alongside another forward).

Overload: beyond ``max_ongoing_requests`` per replica the ingress's handle queues up to
``max_queued_requests`` requests; beyond that Serve raises ``BackPressureError`` and the ingress
answers 503 with ``Retry-After`` (OpenAI error JSON). A request that cannot start within
``ingress.first_chunk_timeout_s`` also gets 503: never a hung request.
"""

import asyncio
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve

from bd_ray.serve.protocol import (ChatCompletionRequest, CompletionRequest, error_body, max_request_bytes,
                                   validation_error_body)
from bd_ray.config.serve import ServeAppConfig

__all__ = ["SpecEngine", "OpenAIIngress", "fastapi_app"]

log = logging.getLogger("ray.serve")

_DONE = object()


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible to this replica "
                           "(set engine.num_gpus >= 1, or model.device: cpu)")
    return name


def _next(it: Iterator) -> Any:
    try:
        return next(it)
    except StopIteration:
        return _DONE


def _close(it: Iterator) -> None:
    close = getattr(it, "close", None)
    if close is not None:
        close()


def _count_kv_caches() -> int:
    """Live ``transformers`` KV ``Cache`` objects in this process (after a full GC)."""
    import gc

    from transformers.cache_utils import Cache

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, Cache))


def spec_metrics_dict(result: dict) -> dict:
    """bd-ray's ``spec_metrics`` response object from a ``GenerationResult.as_dict()``.

    Keys: ``speculative``, ``drafted``, ``accepted``, ``cycles``, ``alpha`` (acceptance rate),
    ``tau`` (mean accepted length: tokens per verifier forward), ``per_position`` (acceptance of
    the k-th draft, k = 1..γ), ``fallback_reason`` (why a speculative request ran plain decoding),
    ``adaptive`` (what the adaptive γ controller did, or null with a fixed γ).
    """
    m = result["spec_metrics"]
    return {
        "speculative": result["speculative"],
        "drafted": m["drafted"],
        "accepted": m["accepted"],
        "cycles": m["cycles"],
        "alpha": m["acceptance_rate"],
        "tau": m["mean_accepted_length"],
        "per_position": m["per_position_acceptance"],
        "fallback_reason": result.get("fallback_reason"),
        "adaptive": result.get("adaptive"),
    }


# =============================================================================================
# Engine: verifier + paired drafter, one per replica
# =============================================================================================


@serve.deployment(name="SpecEngine")
class SpecEngine:
    """One replica of the verifier deployment: verifier (full KV) + in-process drafter (sparse KV).

    Args:
        config: a :class:`bd_ray.config.serve.ServeAppConfig` as a dict (``model_dump()``).

    Raises (at replica start, so ``serve run``/``deploy`` report DEPLOY_FAILED with the reason):
        FileNotFoundError: unknown model name or path; ``TokenizerMismatchError``: drafter and
        verifier tokenizers differ; ``RuntimeError``: ``device: cuda`` without a visible GPU.
    """

    def __init__(self, config: dict) -> None:
        import torch

        from bd_ray import models

        self.cfg = ServeAppConfig.model_validate(config)
        m = self.cfg.model
        if m.torch_threads:
            torch.set_num_threads(m.torch_threads)
        self.device = _resolve_device(m.device)
        dtype = getattr(torch, m.dtype)
        self.verifier, self.tokenizer = models.load_verifier(m.verifier, dtype=dtype, device=self.device)
        self.drafter = None
        self.drafter_attn = None
        if m.drafter:
            attn = m.drafter_attn
            if attn == "auto":
                attn = "bd_ray_sparse" if self.device == "cuda" else "sdpa"
            if attn == "bd_ray_sparse":
                import bd_ray.attention  # noqa: F401  (registers the attention implementation)
            from_verifier = m.drafter.startswith("from-verifier:")
            self.drafter, _ = models.load_drafter(
                m.drafter, self.tokenizer, dtype=dtype, device=self.device, verifier=self.verifier,
                attn_implementation=None if from_verifier else attn)
            self.drafter.requires_grad_(False)
            if from_verifier and attn != getattr(self.drafter.config, "_attn_implementation", None):
                self.drafter.set_attn_implementation(attn)
            self.drafter_attn = attn
        from bd_ray.speculative.engine import max_positions

        limit = max_positions(self.verifier)
        if m.max_model_len is not None:
            limit = m.max_model_len if limit is None else min(limit, m.max_model_len)
        self.max_model_len = limit
        # One model thread: engine steps of all requests run here, FIFO (see module docstring).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bd-ray-model")
        self._lock = threading.Lock()
        self._live: dict[str, dict[str, Any]] = {}
        self._totals = {"started": 0, "finished": 0, "failed": 0, "cancelled": 0}
        from bd_ray.serve.metrics import EngineMetrics

        self.metrics = EngineMetrics(m.name)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 -- outside Serve (unit use)
            self.replica_id = f"local-{os.getpid()}"
        log.info("SpecEngine %s ready: verifier=%s drafter=%s (%s) device=%s max_model_len=%s",
                 self.replica_id, m.verifier, m.drafter, self.drafter_attn, self.device, self.max_model_len)

    # ---- introspection ------------------------------------------------------------------------
    async def stats(self, deep: bool = False) -> dict:
        """This replica's state: live requests (each holds a verifier and a drafter cache), totals.

        Returns ``{"replica_id", "pid", "rss_bytes", "live_requests", "live": [{request_id,
        speculative, gamma, kv_budget, prompt_tokens, tokens, age_s}], "totals": {started,
        finished, failed, cancelled}, "device", "max_model_len", "drafter"}``; ``rss_bytes`` is the
        replica process's resident memory (bytes). With ``deep`` (slow: a full garbage collection
        and heap scan, ~0.1 s) also ``"kv_caches"``: the number of live KV-cache objects
        (``transformers`` ``Cache`` instances) in the process, counted independently of the
        live-request table, so a cache leaked by any code path shows up here.
        """
        import psutil

        now = time.perf_counter()
        with self._lock:
            live = [{**{k: v for k, v in r.items() if k != "t0"}, "age_s": now - r["t0"]} for r in self._live.values()]
            totals = dict(self._totals)
        out = {"replica_id": self.replica_id, "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss,
               "live_requests": len(live), "live": live, "totals": totals,
               "device": self.device, "max_model_len": self.max_model_len, "drafter": self.cfg.model.drafter,
               "drafter_attn": self.drafter_attn}
        if deep:
            out["kv_caches"] = await asyncio.get_running_loop().run_in_executor(None, _count_kv_caches)
        return out

    async def describe(self) -> dict:
        """Static facts the ingress needs: context limit, whether a drafter is loaded."""
        return {"max_model_len": self.max_model_len, "has_drafter": self.drafter is not None}

    def check_health(self) -> None:
        """Serve health check: the model thread must be alive (raises ``RuntimeError`` if shut down)."""
        if self._executor._shutdown:  # noqa: SLF001
            raise RuntimeError("model thread is shut down")

    # ---- generation ---------------------------------------------------------------------------
    def _make_stream(self, req: dict) -> tuple[Iterator, bool]:
        from bd_ray.config import SamplingConfig, SparsePolicyConfig, SpecConfig
        from bd_ray.speculative.engine import ARGenerator, SpeculativeGenerator

        sampling = SamplingConfig(**req["sampling"])
        prefill_chunk = self.cfg.spec.prefill_chunk
        if req["speculative"]:
            if self.drafter is None:
                raise ValueError("speculative decoding requested but this deployment has no drafter")
            spec = SpecConfig(gamma=req["gamma"], budget=req["kv_budget"],
                              policy=SparsePolicyConfig(**req["sparse_policy"]), prefill_chunk=prefill_chunk,
                              adaptive=self.cfg.spec.adaptive)
            # attn_implementation=None: keep the attention the replica loaded (model.drafter_attn)
            gen = SpeculativeGenerator(self.verifier, self.drafter, self.tokenizer, spec, attn_implementation=None)
            return gen.stream(req["prompt_ids"], sampling), True
        return ARGenerator(self.verifier, self.tokenizer, prefill_chunk=prefill_chunk,
                           attn_implementation=None).stream(
            req["prompt_ids"], sampling), False

    def _register(self, rid: str, req: dict) -> None:
        with self._lock:
            self._live[rid] = {"request_id": rid, "speculative": req["speculative"], "gamma": req.get("gamma"),
                               "kv_budget": req.get("kv_budget"), "prompt_tokens": len(req["prompt_ids"]),
                               "tokens": 0, "t0": time.perf_counter()}
            self._totals["started"] += 1
            n = len(self._live)
        self.metrics.set_live(n)

    def _release(self, rid: str, outcome: str) -> None:
        with self._lock:
            self._live.pop(rid, None)
            self._totals[outcome] += 1
            n = len(self._live)
        self.metrics.set_live(n)

    async def generate(self, req: dict) -> AsyncIterator[dict]:
        """Run one request; an async generator of events (called with ``handle.options(stream=True)``).

        Args:
            req: ``{"request_id", "prompt_ids": [int], "sampling": SamplingConfig fields,
                "speculative": bool, "gamma": int, "kv_budget": int | None, "sparse_policy": dict}``.

        Yields:
            ``{"type": "chunk", "token_ids", "text", "replica_id"}`` per engine step (a speculation
            cycle emits 1..γ+1 tokens), then ``{"type": "final", "text", "result":
            GenerationResult.as_dict(), "spec_metrics", "ttft_s", "total_s", "replica_id"}``; or,
            instead of further events,
            ``{"type": "error", "status": 400|500, "error": OpenAI error object}`` (invalid
            parameters, context limit, an engine failure). Never raises for a request's fault.

        The request's caches are released when this generator ends for any reason, cancellation
        (client disconnect) included: the stream is closed on the model thread after any step in
        flight, then the request leaves the live table.
        """
        from bd_ray.speculative.engine import ContextLengthError

        rid = str(req.get("request_id") or uuid.uuid4().hex)
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            it, speculative = self._make_stream(req)
        except (ValueError, ValidationError) as exc:
            yield {"type": "error", "status": 400, "error": error_body(str(exc), code="invalid_value")}
            return
        self._register(rid, req)
        # outcome is fixed before a terminal event is yielded: the consumer may cancel right after it.
        outcome, ttft, n_tokens, finish = None, None, 0, "error"
        try:
            while True:
                try:
                    chunk = await loop.run_in_executor(self._executor, _next, it)
                except ContextLengthError as exc:
                    outcome = "failed"
                    yield {"type": "error", "status": 400,
                           "error": error_body(str(exc), param="max_tokens", code="context_length_exceeded")}
                    return
                except ValueError as exc:
                    outcome = "failed"
                    yield {"type": "error", "status": 400, "error": error_body(str(exc), code="invalid_value")}
                    return
                except Exception as exc:  # noqa: BLE001
                    outcome = "failed"
                    log.exception("request %s failed in the engine", rid)
                    yield {"type": "error", "status": 500,
                           "error": error_body(f"engine error: {type(exc).__name__}: {exc}", type="server_error",
                                               code="engine_error")}
                    return
                if chunk is _DONE:
                    outcome = outcome or "finished"
                    return
                if chunk.token_ids:
                    n_tokens += len(chunk.token_ids)
                    with self._lock:
                        if rid in self._live:
                            self._live[rid]["tokens"] = n_tokens
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                        self.metrics.first_token(speculative, ttft)
                if chunk.result is not None:
                    result = chunk.result.as_dict()
                    spec = spec_metrics_dict(result)
                    total = time.perf_counter() - t0
                    finish = result["finish_reason"]
                    outcome = "finished"
                    self.metrics.finished(speculative, finish, result["prompt_tokens"], result["completion_tokens"],
                                          total, ttft, spec)
                    yield {"type": "final", "token_ids": chunk.token_ids, "text": chunk.text, "result": result,
                           "spec_metrics": spec, "ttft_s": ttft, "total_s": total, "replica_id": self.replica_id}
                    return
                yield {"type": "chunk", "token_ids": chunk.token_ids, "text": chunk.text, "replica_id": self.replica_id}
        except (asyncio.CancelledError, GeneratorExit):
            if outcome is None:
                outcome, finish = "cancelled", "cancelled"
            raise
        finally:
            outcome = outcome or "failed"
            if outcome != "finished":
                self.metrics.finished(speculative, finish, len(req["prompt_ids"]), n_tokens,
                                      time.perf_counter() - t0, ttft, None)
            # Close the stream on the model thread (after any step in flight), then release.
            fut = self._executor.submit(_close, it)
            fut.add_done_callback(lambda _f, rid=rid, outcome=outcome: self._release(rid, outcome))

    def __del__(self) -> None:
        ex = getattr(self, "_executor", None)
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)


# =============================================================================================
# Ingress: OpenAI-compatible HTTP API
# =============================================================================================

fastapi_app = FastAPI(title="bd-ray", description="OpenAI-compatible speculative decoding server (BudgetDraft)")


@fastapi_app.exception_handler(RequestValidationError)
async def _validation_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    loc = ".".join(str(p) for p in exc.errors()[0]["loc"]) if exc.errors() else "body"
    return JSONResponse(error_body(f"invalid request: {exc.errors()}", param=loc, code="invalid_value"),
                        status_code=400)


def _error(status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type=type, param=param, code=code), status_code=status,
                        headers=headers)


class _HTTPError(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _cancel(gen: Any) -> None:
    """Best-effort cancel of a handle call (Serve re-raises a stored assignment error, e.g.
    ``BackPressureError``, from ``cancel()``; the call is over either way)."""
    try:
        gen.cancel()
    except Exception:  # noqa: BLE001
        pass


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


# Response header naming the engine replica that served (streams: started) the request.
REPLICA_HEADER = "X-BD-Ray-Replica"
# Replica deaths a request survives by being restarted from its prompt on another replica.
MAX_REPLICA_RESTARTS = 3
# Temperatures below this are greedy (vLLM's _SAMPLING_EPS): dividing logits by a denormal
# temperature would overflow to inf and make the probabilities NaN.
GREEDY_TEMPERATURE_EPS = 1e-5


def _is_replica_failure(exc: BaseException) -> bool:
    """True when ``exc`` (or its cause) says the engine replica process is gone (killed, crashed,
    its node died, or it is unreachable), as opposed to an error of the request itself."""
    from ray.exceptions import NodeDiedError, RayActorError, WorkerCrashedError

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, (RayActorError, WorkerCrashedError, NodeDiedError)):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return False


class ReplicaDiedError(RuntimeError):
    """The replica running a streaming request died after part of the output was sent, and the
    request could not be resumed identically elsewhere."""

    def __init__(self, message: str, tokens_sent: int) -> None:
        super().__init__(message)
        self.tokens_sent = tokens_sent


class _ResilientCall:
    """One streaming engine call that survives the death of its engine replica.

    Iterated like the ``DeploymentResponseGenerator`` it wraps (``__anext__``, ``cancel``). When
    the replica dies (:func:`_is_replica_failure`), the request is started again from its prompt
    (Serve routes it to a live replica), at most :data:`MAX_REPLICA_RESTARTS` times:

    * nothing handed on yet: restarted silently;
    * ``discard=True`` (a non-streaming response, nothing sent to the client): restarted and a
      ``{"type": "reset"}`` event tells the collector to drop what it gathered;
    * a stream that already sent tokens, when its output is reproducible (greedy, or seeded):
      restarted; the regenerated tokens and text must equal what was sent (checked), are skipped,
      and streaming continues where it stopped. Any difference, or a non-reproducible stream,
      raises :class:`ReplicaDiedError`: the client gets a clear error, never spliced text.
    """

    def __init__(self, engine: Any, payload: dict, reproducible: bool, discard: bool) -> None:
        self._engine, self._payload = engine, payload
        self._reproducible, self._discard = reproducible, discard
        self.restarts = 0
        self._sent_ids: list[int] = []
        self._sent_text = ""
        self._replay: tuple[list[int], str] | None = None
        self._r_ids: list[int] = []
        self._r_text = ""
        self._gen = self._start()

    def _start(self):
        payload = self._payload
        if self.restarts:  # a distinct engine-side id: the old call may linger on a live-but-unreachable replica
            payload = {**payload, "request_id": f"{payload.get('request_id')}-r{self.restarts}"}
        return self._engine.options(stream=True).generate.remote(payload)

    def cancel(self) -> None:
        _cancel(self._gen)

    def __aiter__(self) -> "_ResilientCall":
        return self

    async def __anext__(self) -> dict:
        while True:
            try:
                ev = await self._gen.__anext__()
            except (StopAsyncIteration, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001
                if not _is_replica_failure(exc):
                    raise
                n_sent = len(self._sent_ids)
                sent = bool(self._sent_ids or self._sent_text)
                if self.restarts >= MAX_REPLICA_RESTARTS:
                    raise ReplicaDiedError(
                        f"the engine replica serving this request died ({type(exc).__name__}) and "
                        f"{self.restarts} restarts from the prompt failed too; retry the request later",
                        n_sent) from exc
                if sent and not self._discard and not self._reproducible:
                    raise ReplicaDiedError(
                        f"the engine replica serving this request died ({type(exc).__name__}) after "
                        f"{n_sent} tokens were streamed; the text streamed so far is correct but "
                        "incomplete, and a sampled request without a seed cannot be resumed "
                        "identically. Retry the request.", n_sent) from exc
                self.restarts += 1
                log.warning("request %s: engine replica died (%s) after %d tokens; restarting it from the "
                            "prompt (restart %d)", self._payload.get("request_id"), type(exc).__name__, n_sent,
                            self.restarts)
                _cancel(self._gen)
                self._gen = self._start()
                if sent and self._discard:
                    self._sent_ids, self._sent_text = [], ""
                    return {"type": "reset"}
                if sent:
                    self._replay = (list(self._sent_ids), self._sent_text)
                    self._r_ids, self._r_text = [], ""
                continue
            if ev["type"] in ("chunk", "final"):
                if self._replay is not None:
                    ev = self._skip_replayed(ev)
                    if ev is None:
                        continue
                self._sent_ids += list(ev.get("token_ids") or [])
                self._sent_text += ev.get("text") or ""
            if ev["type"] == "final":
                ev = {**ev, "spec_metrics": {**ev["spec_metrics"], "replica_restarts": self.restarts}}
            return ev

    def _skip_replayed(self, ev: dict) -> dict | None:
        """While re-generating the already-sent prefix: check it matches, hide it, return the rest."""
        want_ids, want_text = self._replay
        self._r_ids += list(ev.get("token_ids") or [])
        self._r_text += ev.get("text") or ""
        k, m = min(len(self._r_ids), len(want_ids)), min(len(self._r_text), len(want_text))
        if self._r_ids[:k] != want_ids[:k] or self._r_text[:m] != want_text[:m]:
            raise ReplicaDiedError(
                f"the engine replica serving this request died after {len(want_ids)} tokens were streamed, "
                "and the restarted request diverged from the streamed text; the text streamed so far is "
                "correct but incomplete. Retry the request.", len(want_ids))
        caught_up = len(self._r_ids) >= len(want_ids) and len(self._r_text) >= len(want_text)
        if not caught_up:
            if ev["type"] == "final":
                raise ReplicaDiedError(
                    "the restarted request ended before reproducing the streamed text; the text "
                    "streamed so far is correct but incomplete. Retry the request.", len(want_ids))
            return None
        self._replay = None
        return {**ev, "token_ids": self._r_ids[len(want_ids):], "text": self._r_text[len(want_text):]}


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
        from bd_ray.serve.metrics import IngressMetrics

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
            return _error(503, f"engine unavailable: {type(exc).__name__}: {exc}", type="server_error",
                          code="engine_unavailable", headers={"Retry-After": self._retry_after()})
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

        Raises ``_HTTPError``: 413 for a larger body (declared or streamed), 400 for a body that
        is not UTF-8 or not JSON (the message says where)."""
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        too_big = (f"request body is larger than the limit of {limit} bytes "
                   f"(a prompt of max_model_len={self.max_model_len} tokens fits well within it)")
        if declared.isdigit() and int(declared) > limit:
            raise _HTTPError(_error(413, too_big.replace("larger than", f"{int(declared)} bytes, over"),
                                    code="request_too_large"))
        buf = bytearray()
        async for part in request.stream():
            buf += part
            if len(buf) > limit:
                raise _HTTPError(_error(413, too_big, code="request_too_large"))
        try:
            text = bytes(buf).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _HTTPError(_error(400, f"request body is not valid UTF-8: byte 0x{buf[exc.start]:02x} at offset "
                                         f"{exc.start}", code="invalid_json"))
        try:
            return json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise _HTTPError(_error(400, f"request body is not valid JSON: {str(exc)[:200]}", code="invalid_json"))

    async def _serve(self, request: Request, chat: bool):
        route = "chat" if chat else "completions"
        try:
            body = await self._read_json(request)
            if not isinstance(body, dict):
                raise _HTTPError(_error(400, "request body must be a JSON object", code="invalid_json"))
            try:
                parsed = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
            except ValidationError as err:
                raise _HTTPError(JSONResponse(validation_error_body(err), status_code=400))
            payload, prompt_tokens = self._build_payload(parsed, chat)
            response = await self._run(parsed, payload, prompt_tokens, chat)
        except _HTTPError as err:
            response = err.response
        self.metrics.request(route, response.status_code)
        return response

    def _build_payload(self, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> tuple[dict, int]:
        cfg = self.cfg
        if req.model is not None and req.model not in self.model_ids:
            raise _HTTPError(_error(404, f"The model `{req.model}` does not exist. Served models: "
                                         f"{self.model_ids}", param="model", code="model_not_found"))
        bad = req.unsupported()
        if bad:
            raise _HTTPError(_error(400, f"{bad} is not supported by bd-ray (only its default/off value)",
                                    param=bad, code="unsupported_parameter"))
        stops = req.stop_list()
        if len(stops) > cfg.ingress.max_stop_strings:
            raise _HTTPError(_error(400, f"at most {cfg.ingress.max_stop_strings} stop strings, got {len(stops)}",
                                    param="stop", code="invalid_value"))
        # ---- prompt -> ids
        if chat:
            if not getattr(self.tokenizer, "chat_template", None):
                raise _HTTPError(_error(400, "this model has no chat template; use /v1/completions or set "
                                             "model.chat_template in the serve config", param="messages",
                                        code="no_chat_template"))
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:
                text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            except Exception as exc:  # noqa: BLE001 -- template errors are the caller's (e.g. role order)
                raise _HTTPError(_error(400, f"chat template failed: {exc}", param="messages", code="invalid_value"))
            prompt_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            prompt_field = "messages"
        else:
            prompt = req.prompt
            if isinstance(prompt, str):
                prompt_ids = self.tokenizer(prompt)["input_ids"]
            else:
                prompt_ids = [int(t) for t in prompt]
                vocab = len(self.tokenizer)
                if any(not 0 <= t < vocab for t in prompt_ids):
                    raise _HTTPError(_error(400, f"prompt token ids must lie in [0, {vocab})", param="prompt",
                                            code="invalid_value"))
            prompt_field = "prompt"
        n_prompt = len(prompt_ids)
        if n_prompt == 0:
            raise _HTTPError(_error(400, "prompt is empty after tokenization", param=prompt_field, code="invalid_value"))
        # ---- length
        limit = self.max_model_len
        max_tokens = req.effective_max_tokens() if chat else req.max_tokens
        if limit is not None and n_prompt >= limit:
            raise _HTTPError(_error(
                400, f"This model's maximum context length is {limit} tokens. However, your prompt has "
                     f"{n_prompt} tokens, leaving no room for a completion. Please reduce the length of the "
                     f"{prompt_field}.", param=prompt_field, code="context_length_exceeded"))
        if max_tokens is None:
            max_tokens = cfg.defaults.max_tokens if limit is None else min(cfg.defaults.max_tokens, limit - n_prompt)
        elif limit is not None and n_prompt + max_tokens > limit:
            raise _HTTPError(_error(
                400, f"This model's maximum context length is {limit} tokens. However, you requested "
                     f"{n_prompt + max_tokens} tokens ({n_prompt} in the {prompt_field}, {max_tokens} for the "
                     f"completion). Please reduce the length of the {prompt_field} or max_tokens.",
                param="max_tokens", code="context_length_exceeded"))
        # ---- speculative parameters
        spec = cfg.spec
        speculative = spec.speculative if req.speculative is None else req.speculative
        gamma = spec.gamma if req.gamma is None else req.gamma
        if gamma > spec.max_gamma:
            raise _HTTPError(_error(400, f"gamma must be <= {spec.max_gamma} (serve config spec.max_gamma), "
                                         f"got {gamma}", param="gamma", code="invalid_value"))
        budget = spec.kv_budget if req.kv_budget is None else (None if req.kv_budget == "full" else req.kv_budget)
        policy = spec.sparse_policy
        if isinstance(req.sparse_policy, str):
            policy = policy.model_copy(update={"name": req.sparse_policy})
        elif req.sparse_policy is not None:
            policy = req.sparse_policy
        if speculative and budget is not None and budget < n_prompt:
            from bd_ray.sparse import min_budget

            need = min_budget(policy, n_prompt)
            if budget < need:
                raise _HTTPError(_error(400, f"kv_budget {budget} is below the minimum {need} for sparse policy "
                                             f"{policy.name} at prompt length {n_prompt}", param="kv_budget",
                                        code="invalid_value"))
        temperature = cfg.defaults.temperature if req.temperature is None else req.temperature
        if temperature < GREEDY_TEMPERATURE_EPS:
            temperature = 0.0
        top_p = cfg.defaults.top_p if req.top_p is None else req.top_p
        top_k = cfg.defaults.top_k if req.top_k is None else max(req.top_k, 0)
        payload = {
            "request_id": uuid.uuid4().hex,
            "prompt_ids": prompt_ids,
            "sampling": {"temperature": temperature, "top_p": top_p, "top_k": top_k, "max_new_tokens": max_tokens,
                         "seed": req.seed, "stop": stops, **({"eos_token_ids": []} if req.ignore_eos else {})},
            "speculative": speculative,
            "gamma": gamma,
            "kv_budget": budget,
            "sparse_policy": policy.model_dump(),
        }
        return payload, n_prompt

    async def _run(self, req, payload: dict, prompt_tokens: int, chat: bool):
        sampling = payload["sampling"]
        reproducible = sampling["temperature"] == 0.0 or sampling["seed"] is not None
        try:
            gen = _ResilientCall(self.engine, payload, reproducible=reproducible, discard=not req.stream)
        except Exception as exc:  # noqa: BLE001 -- e.g. BackPressureError raised at assignment
            raise _HTTPError(self._engine_exception(exc))
        try:
            first = await asyncio.wait_for(gen.__anext__(), self.cfg.ingress.first_chunk_timeout_s)
        except asyncio.TimeoutError:
            _cancel(gen)
            raise _HTTPError(_error(503, f"the request could not start within {self.cfg.ingress.first_chunk_timeout_s}"
                                         f" s (server overloaded); retry later", type="server_error",
                                    code="overloaded", headers={"Retry-After": self._retry_after()}))
        except asyncio.CancelledError:
            _cancel(gen)
            raise
        except StopAsyncIteration:
            raise _HTTPError(_error(500, "engine ended the request without output", type="server_error"))
        except Exception as exc:  # noqa: BLE001
            _cancel(gen)
            raise _HTTPError(self._engine_exception(exc))
        if first["type"] == "error":
            raise _HTTPError(JSONResponse(first["error"], status_code=first["status"]))
        rid = ("chatcmpl-" if chat else "cmpl-") + payload["request_id"]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            # X-BD-Ray-Replica: the engine replica that started the request (diagnostics, fault tests)
            return StreamingResponse(self._stream(gen, first, rid, chat, prompt_tokens, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                              REPLICA_HEADER: str(first.get("replica_id", ""))})
        return await self._collect(gen, first, rid, chat, prompt_tokens)

    def _engine_exception(self, exc: Exception) -> JSONResponse:
        from ray.serve.exceptions import BackPressureError

        cause = getattr(exc, "cause", None)
        if isinstance(exc, BackPressureError) or isinstance(cause, BackPressureError):
            return _error(503, f"server overloaded: {getattr(exc, 'message', exc)} Retry later.",
                          type="server_error", code="overloaded", headers={"Retry-After": self._retry_after()})
        name = type(exc).__name__
        if isinstance(exc, ReplicaDiedError):
            return _error(503, str(exc), type="server_error", code="engine_replica_died",
                          headers={"Retry-After": self._retry_after()})
        if "Unavailable" in name or _is_replica_failure(exc):
            return _error(503, f"engine unavailable: {name}: {str(exc)[:300]}", type="server_error",
                          code="engine_unavailable", headers={"Retry-After": self._retry_after()})
        log.exception("engine call failed")
        return _error(500, f"engine error: {name}: {exc}", type="server_error", code="engine_error")

    def _usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    async def _collect(self, gen, first: dict, rid: str, chat: bool, prompt_tokens: int) -> JSONResponse:
        texts: list[str] = []
        ev = first
        try:
            while True:
                if ev["type"] == "error":
                    return JSONResponse(ev["error"], status_code=ev["status"])
                if ev["type"] == "reset":  # the replica died; the request restarted from its prompt
                    texts.clear()
                    ev = await gen.__anext__()
                    continue
                texts.append(ev["text"])
                if ev["type"] == "final":
                    break
                ev = await gen.__anext__()
        except StopAsyncIteration:
            return _error(500, "engine ended the request without a final result", type="server_error")
        except asyncio.CancelledError:
            _cancel(gen)
            raise
        except Exception as exc:  # noqa: BLE001
            return self._engine_exception(exc)
        result = ev["result"]
        text = "".join(texts)
        choice: dict[str, Any] = {"index": 0, "finish_reason": result["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.cfg.model.name, "choices": [choice],
                "usage": self._usage(prompt_tokens, result["completion_tokens"]),
                "spec_metrics": ev["spec_metrics"]}
        return JSONResponse(body, headers={REPLICA_HEADER: str(ev.get("replica_id", ""))})

    async def _stream(self, gen, first: dict, rid: str, chat: bool, prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[bytes]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"
        model = self.cfg.model.name

        def chunk(text: str | None, finish: str | None, role: bool = False, **extra: Any) -> bytes:
            if chat:
                delta: dict[str, Any] = {}
                if role:
                    delta["role"] = "assistant"
                if text is not None:
                    delta["content"] = text
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], **extra})

        ev = first
        try:
            if chat:
                yield chunk("", None, role=True)
            while True:
                if ev["type"] == "error":
                    yield _sse(ev["error"])
                    break
                if ev["type"] == "final":
                    result = ev["result"]
                    usage = self._usage(prompt_tokens, result["completion_tokens"])
                    if ev["text"]:
                        yield chunk(ev["text"], None)
                    yield chunk(None if chat else "", result["finish_reason"], usage=usage,
                                spec_metrics=ev["spec_metrics"])
                    if include_usage:
                        yield _sse({"id": rid, "object": obj, "created": created, "model": model, "choices": [],
                                    "usage": usage, "spec_metrics": ev["spec_metrics"]})
                    break
                if ev["text"]:
                    yield chunk(ev["text"], None)
                try:
                    ev = await gen.__anext__()
                except StopAsyncIteration:
                    yield _sse(error_body("engine ended the stream without a final result", type="server_error"))
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001
                    yield _sse(json.loads(self._engine_exception(exc).body))
                    break
            yield b"data: [DONE]\n\n"
        finally:
            # Client gone or stream done: cancel the engine call (frees the request's caches at once).
            _cancel(gen)
