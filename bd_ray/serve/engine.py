"""``SpecEngine``: the verifier deployment of bd-ray's Serve application.

Replicas under ``autoscaling_config``. Each replica holds the verifier (full KV caches) **and its
own drafter in the same process**, and one continuous-batching engine
(:class:`bd_ray.speculative.batch.BatchEngine`) over them: every request routed to the replica
becomes a row of that engine (an :class:`bd_ray.serve.protocol.EngineRequest` in, a stream of
events out: :meth:`SpecEngine.generate`).

Why the drafter is paired in-process with each verifier replica (and not a separate deployment):

* Per-request state must live in exactly one verifier replica and one drafter replica for the
  request's life. With a separate drafter deployment, every request would need sticky routing to
  one drafter replica and a leak-free protocol to free the remote sparse cache on every exit path
  (finish, error, client disconnect, replica death).
* Cost: drafting is γ sequential drafter forwards per step. A remote call costs serialisation +
  scheduling, milliseconds, comparable to a drafter forward of a small model, so a remote drafter
  would eat most of the speedup. In-process, drafting is a function call.
* The drafter is small by design (sparse KV, few layers): pairing adds little memory to a verifier
  replica, and both run ``bd_ray_sparse`` attention (Triton on CUDA, the stacked-heads flash path on
  CPU).
* Autoscaling then scales (verifier + drafter) pairs together, which is what throughput needs.

Concurrency inside a replica: up to ``max_ongoing_requests`` requests are routed here. One model
thread (:class:`bd_ray.serve.stepper.EngineStepper`) steps the engine continuously while any exist:
each step admits waiting rows within ``max_num_seqs`` and ``kv_cache_bytes`` (the rest wait in the
engine's queue), runs a prefill chunk (so a long prompt never freezes the streams already decoding)
and one batched draft/verify step over every decoding row, γ chosen per row by the batch
speculation policy. The asyncio event loop only submits rows, streams their chunks and cancels
them: a client disconnect cancels the Serve call, which drops the row before the next step and
frees its slot in both caches at once. ``SpecEngine.stats`` (also ``GET /debug/engine`` and
``/health``) reports live requests and the engine's rows, queue, cache bytes and batch counters.
"""

import asyncio
import logging
import os
import threading
import time
from typing import Any, AsyncIterator

from ray import serve

from bd_ray.config import budget_tokens
from bd_ray.config.serve import ServeAppConfig
from bd_ray.serve.metrics import EngineMetrics
from bd_ray.serve.protocol import EngineRequest, error_body
from bd_ray.serve.stepper import EngineStepper

__all__ = ["SpecEngine", "spec_metrics_dict"]

log = logging.getLogger("ray.serve")


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is visible to this replica "
                           "(set engine.num_gpus >= 1, or model.device: cpu)")
    return name


def _count_kv_caches() -> int:
    """KV caches holding entries in this process (after a full GC): ``transformers`` ``Cache``
    objects, the engine's ragged caches only while they hold storage (they persist, empty, between
    requests)."""
    import gc

    from transformers.cache_utils import Cache

    from bd_ray.speculative.ragged_cache import RaggedKVCache

    gc.collect()
    return sum(1 for o in gc.get_objects()
               if isinstance(o, Cache) and not (isinstance(o, RaggedKVCache) and o.nbytes == 0))


def spec_metrics_dict(result: dict) -> dict:
    """bd-ray's ``spec_metrics`` response object from a ``GenerationResult.as_dict()``.

    Keys: ``mode`` (how the tokens after the first were decoded: ``speculative`` = every step
    verified drafts, ``plain`` = none did, ``mixed``) and ``mode_reason`` (why some or all steps
    were plain); ``speculative`` (true when any draft was verified: never true over 0 drafted
    tokens); ``drafted``, ``accepted``, ``cycles``, ``alpha`` (acceptance rate), ``tau`` (mean
    accepted length: tokens per verifier forward), ``per_position`` (acceptance of the k-th draft,
    k = 1..γ), ``kv_budget`` (the drafter KV budget the request ran at, tokens; null = full cache
    or no drafter), ``fallback_reason`` (why a speculative request ran plain decoding),
    ``adaptive`` (what the request's γ controller did, or null with a fixed γ).
    """
    m = result["spec_metrics"]
    return {
        "mode": result.get("mode", "plain"),
        "mode_reason": result.get("mode_reason"),
        "speculative": result.get("mode", "plain") != "plain" and m["drafted"] > 0,
        "drafted": m["drafted"],
        "accepted": m["accepted"],
        "cycles": m["cycles"],
        "alpha": m["acceptance_rate"],
        "tau": m["mean_accepted_length"],
        "per_position": m["per_position_acceptance"],
        "kv_budget": result.get("budget"),
        "fallback_reason": result.get("fallback_reason"),
        "adaptive": result.get("adaptive"),
    }


@serve.deployment(name="SpecEngine")
class SpecEngine:
    """One replica of the verifier deployment: verifier (full KV) + in-process drafter (sparse KV),
    batched by one :class:`bd_ray.speculative.batch.BatchEngine`.

    Args:
        config: a :class:`bd_ray.config.serve.ServeAppConfig` as a dict (``model_dump()``).

    Raises (at replica start, so ``serve run``/``deploy`` report DEPLOY_FAILED with the reason):
        FileNotFoundError: unknown model name or path; ``TokenizerMismatchError``: drafter and
        verifier tokenizers differ; ``RuntimeError``: ``device: cuda`` without a visible GPU.
    """

    def __init__(self, config: dict) -> None:
        import torch

        from bd_ray import models
        from bd_ray.speculative.batch import BatchEngine, BatchOptions
        from bd_ray.speculative.engine import DEFAULT_ATTENTION, default_eos, max_positions, use_attention

        self.cfg = ServeAppConfig.model_validate(config)
        m, e = self.cfg.model, self.cfg.engine
        torch.set_num_threads(m.torch_threads or e.threads())
        self.device = _resolve_device(m.device)
        dtype = getattr(torch, m.dtype)
        self.verifier, self.tokenizer = models.load_verifier(m.verifier, dtype=dtype, device=self.device)
        use_attention(self.verifier, DEFAULT_ATTENTION)
        self.drafter = None
        self.drafter_attn = None
        if m.drafter:
            attn = DEFAULT_ATTENTION if m.drafter_attn == "auto" else m.drafter_attn
            if attn == "bd_ray_sparse":
                import bd_ray.attention  # noqa: F401  (registers the attention implementation)
            from_verifier = m.drafter.startswith("from-verifier:")
            self.drafter, _ = models.load_drafter(
                m.drafter, self.tokenizer, dtype=dtype, device=self.device, verifier=self.verifier,
                attn_implementation=None if from_verifier else attn)
            self.drafter.requires_grad_(False)
            use_attention(self.drafter, attn)
            self.drafter_attn = attn
        limit = max_positions(self.verifier)
        if m.max_model_len is not None:
            limit = m.max_model_len if limit is None else min(limit, m.max_model_len)
        self.max_model_len = limit
        # The engine's γ is the largest a request may ask for: each row caps at its own γ.
        spec = self.cfg.spec.model_copy(update={"gamma": self.cfg.speculation.max_gamma})
        options = BatchOptions(max_num_seqs=e.batch_rows(), kv_cache_bytes=e.kv_cache_bytes,
                               disable_above=e.disable_spec_above, elastic_budget=e.elastic_budget,
                               max_num_batched_tokens=e.max_num_batched_tokens)
        self.engine = BatchEngine(self.verifier, self.drafter, self.tokenizer, spec, options,
                                  eos_token_ids=default_eos(self.tokenizer, self.verifier))
        self.stepper = EngineStepper(self.engine)
        self._lock = threading.Lock()
        self._live: dict[str, dict[str, Any]] = {}
        self._totals = {"started": 0, "finished": 0, "failed": 0, "cancelled": 0}
        self.metrics = EngineMetrics(m.name)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 -- outside Serve (unit use)
            self.replica_id = f"local-{os.getpid()}"
        log.info("SpecEngine %s ready: verifier=%s drafter=%s (%s) device=%s max_model_len=%s max_num_seqs=%d "
                 "kv_cache_bytes=%s threads=%d", self.replica_id, m.verifier, m.drafter, self.drafter_attn,
                 self.device, self.max_model_len, e.batch_rows(), e.kv_cache_bytes, torch.get_num_threads())

    # ---- introspection ------------------------------------------------------------------------
    async def stats(self, deep: bool = False) -> dict:
        """This replica's state: live requests, the batched engine, totals.

        Returns ``{"replica_id", "pid", "rss_bytes", "live_requests", "live": [{request_id,
        speculative, gamma, kv_budget ("full" or tokens), prompt_tokens, tokens, age_s}], "totals":
        {started, finished, failed, cancelled}, "engine": {live_rows, waiting, cache_bytes,
        peak_cache_bytes, elastic_lowered, cost_prior, steps, rows_per_step, tokens_per_step, max_rows,
        gamma_chosen, last_reason, decode_tokens, decode_s, decode_tokens_per_s, prefill_s, policy},
        "device", "max_model_len", "drafter", "drafter_attn"}``; ``rss_bytes`` is the replica process's
        resident memory (bytes); ``engine`` is :meth:`BatchEngine.stats` as of its latest step
        (``live_rows``: rows holding cache slots, ``cache_bytes``: bytes both caches hold,
        ``peak_cache_bytes``: the most they and in-flight prefills held, bounded by
        ``kv_cache_bytes``; ``decode_tokens_per_s``: tokens emitted by decode steps per second of
        decode steps, all rows summed, prefill excluded; ``policy``: per batch-size bucket, the
        batch speculation policy's steps by γ, plain-step and per-γ costs in ms, judgement, last
        reason and drafter prefills skipped, :class:`bd_ray.speculative.batch_policy.BatchStats`). With
        ``deep`` (slow: a full garbage collection and heap scan, ~0.1 s) also ``"kv_caches"``: KV
        caches holding entries in the process, counted independently of the live-request table, so
        a cache leaked by any code path shows up here.
        """
        import psutil

        now = time.perf_counter()
        with self._lock:
            live = [{**{k: v for k, v in r.items() if k != "t0"}, "age_s": now - r["t0"]} for r in self._live.values()]
            totals = dict(self._totals)
        out = {"replica_id": self.replica_id, "pid": os.getpid(), "rss_bytes": psutil.Process().memory_info().rss,
               "live_requests": len(live), "live": live, "totals": totals, "engine": self.stepper.stats(),
               "device": self.device, "max_model_len": self.max_model_len, "drafter": self.cfg.model.drafter,
               "drafter_attn": self.drafter_attn}
        if deep:
            out["kv_caches"] = await asyncio.get_running_loop().run_in_executor(None, _count_kv_caches)
        return out

    async def describe(self) -> dict:
        """Static facts the ingress needs: context limit, whether a drafter is loaded."""
        return {"max_model_len": self.max_model_len, "has_drafter": self.drafter is not None}

    def check_health(self) -> None:
        """Serve health check: the model thread must be alive (raises ``RuntimeError`` if not)."""
        if not self.stepper.alive:
            raise RuntimeError("model thread is not running")

    # ---- generation ---------------------------------------------------------------------------
    def _new_row(self, req: EngineRequest):
        from bd_ray.speculative.batch import new_row
        from bd_ray.speculative.rows import RowRequest

        if req.speculative and self.drafter is None:
            raise ValueError("speculative decoding requested but this deployment has no drafter")
        spec = req.spec
        row_req = RowRequest(list(req.prompt_ids), req.sampling, speculative=req.speculative, gamma=spec.gamma,
                             budget=budget_tokens(spec.budget), policy=spec.policy, adaptive=spec.adaptive,
                             logprobs=req.logprobs)
        return new_row(self.engine, row_req)

    def _register(self, rid: str, req: EngineRequest) -> None:
        with self._lock:
            self._live[rid] = {"request_id": rid, "speculative": req.speculative, "gamma": req.spec.gamma,
                               "kv_budget": req.spec.budget, "prompt_tokens": len(req.prompt_ids),
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

    @staticmethod
    def _error_event(exc: BaseException) -> dict:
        from bd_ray.speculative.engine import ContextLengthError

        if isinstance(exc, ContextLengthError):
            return {"type": "error", "status": 400,
                    "error": error_body(str(exc), param="max_tokens", code="context_length_exceeded")}
        if isinstance(exc, ValueError):
            return {"type": "error", "status": 400, "error": error_body(str(exc), code="invalid_value")}
        return {"type": "error", "status": 500,
                "error": error_body(f"engine error: {type(exc).__name__}: {exc}", type="server_error",
                                    code="engine_error")}

    async def generate(self, req: EngineRequest) -> AsyncIterator[dict]:
        """Run one request as a row of the replica's batch; an async generator of events (called
        with ``handle.options(stream=True)``).

        Args:
            req: the request, complete (defaults filled in by the ingress); registered under
                ``req.engine_id``.

        Yields:
            ``{"type": "chunk", "token_ids", "text", "logprobs", "replica_id"}`` per engine step
            that released tokens (a speculation step emits 1..γ+1; ``logprobs``: one entry per
            token id when asked for, else null), then ``{"type": "final", "token_ids", "text",
            "logprobs", "result": GenerationResult.as_dict(), "spec_metrics", "ttft_s", "total_s",
            "replica_id"}``; or, instead of further events, ``{"type": "error", "status": 400|500,
            "error": OpenAI error object}`` (invalid parameters, context limit, a request larger
            than ``kv_cache_bytes``, an engine failure). Never raises for a request's fault.

        The row is cancelled when this generator ends for any reason, cancellation (client
        disconnect) included: it leaves the batch before the next engine step, freeing its slot
        in both caches, then the request leaves the live table.
        """
        rid = req.engine_id
        speculative = req.speculative
        t0 = time.perf_counter()
        try:
            row = self._new_row(req)
        except ValueError as exc:
            yield self._error_event(exc)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self._register(rid, req)
        self.stepper.submit(row, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        # outcome is fixed before a terminal event is yielded: the consumer may cancel right after it.
        outcome, ttft, n_tokens, finish = None, None, 0, "error"
        try:
            while True:
                chunk = await queue.get()
                if isinstance(chunk, BaseException):
                    outcome = "failed"
                    if not isinstance(chunk, ValueError):
                        log.error("request %s failed in the engine: %r", rid, chunk)
                    yield self._error_event(chunk)
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
                    yield {"type": "final", "token_ids": chunk.token_ids, "text": chunk.text,
                           "logprobs": chunk.logprobs, "result": result, "spec_metrics": spec, "ttft_s": ttft,
                           "total_s": total, "replica_id": self.replica_id}
                    return
                yield {"type": "chunk", "token_ids": chunk.token_ids, "text": chunk.text, "logprobs": chunk.logprobs,
                       "replica_id": self.replica_id}
        except (asyncio.CancelledError, GeneratorExit):
            if outcome is None:
                outcome, finish = "cancelled", "cancelled"
            raise
        finally:
            outcome = outcome or "failed"
            if outcome != "finished":
                self.stepper.cancel(row)
                self.metrics.finished(speculative, finish, len(req.prompt_ids), n_tokens,
                                      time.perf_counter() - t0, ttft, None)
            self._release(rid, outcome)

    def __del__(self) -> None:
        stepper = getattr(self, "stepper", None)
        if stepper is not None:
            stepper.stop()
