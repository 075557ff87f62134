"""``SpecEngine``: the verifier deployment of bd-ray's Serve application.

Replicas under ``autoscaling_config``. Each replica holds the verifier (full KV caches) **and its
own drafter in the same process**, and runs the speculative loop
(:class:`bd_ray.speculative.engine.SpeculativeGenerator`) for the requests routed to it: an
:class:`bd_ray.serve.protocol.EngineRequest` in, a stream of events out (:meth:`SpecEngine.generate`).

Why the drafter is paired in-process with each verifier replica (and not a separate deployment):

* Per-request state must live in exactly one verifier replica and one drafter replica for the
  request's life. With a separate drafter deployment, every request would need sticky routing to
  one drafter replica (Serve routes each call independently; affinity needs a per-request handle
  pinned to a replica or multiplexing tricks) and a leak-free protocol to free the remote sparse
  cache on every exit path (finish, error, client disconnect, replica death).
* Cost: drafting is γ sequential drafter forwards per cycle. A remote call costs serialisation +
  scheduling, milliseconds, comparable to a drafter forward of a small model, so a remote drafter
  would eat most of the speedup. In-process, drafting is a function call.
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
"""

import asyncio
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Iterator

from ray import serve

from bd_ray.config.serve import ServeAppConfig
from bd_ray.serve.metrics import EngineMetrics
from bd_ray.serve.protocol import EngineRequest, error_body

__all__ = ["SpecEngine", "spec_metrics_dict"]

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
        speculative, gamma, kv_budget ("full" or tokens), prompt_tokens, tokens, age_s}], "totals": {started,
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
    def _make_stream(self, req: EngineRequest) -> Iterator:
        from bd_ray.speculative.engine import ARGenerator, SpeculativeGenerator

        # attn_implementation=None: keep the attention the replica loaded (model.drafter_attn)
        if req.speculative:
            if self.drafter is None:
                raise ValueError("speculative decoding requested but this deployment has no drafter")
            gen = SpeculativeGenerator(self.verifier, self.drafter, self.tokenizer, req.spec, attn_implementation=None)
            return gen.stream(req.prompt_ids, req.sampling)
        return ARGenerator(self.verifier, self.tokenizer, prefill_chunk=req.spec.prefill_chunk,
                           attn_implementation=None).stream(req.prompt_ids, req.sampling)

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

    async def generate(self, req: EngineRequest) -> AsyncIterator[dict]:
        """Run one request; an async generator of events (called with ``handle.options(stream=True)``).

        Args:
            req: the request, complete (defaults filled in by the ingress); registered under
                ``req.engine_id``.

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

        rid = req.engine_id
        speculative = req.speculative
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            it = self._make_stream(req)
        except ValueError as exc:
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
                self.metrics.finished(speculative, finish, len(req.prompt_ids), n_tokens,
                                      time.perf_counter() - t0, ttft, None)
            # Close the stream on the model thread (after any step in flight), then release.
            fut = self._executor.submit(_close, it)
            fut.add_done_callback(lambda _f, rid=rid, outcome=outcome: self._release(rid, outcome))

    def __del__(self) -> None:
        ex = getattr(self, "_executor", None)
        if ex is not None:
            ex.shutdown(wait=False, cancel_futures=True)
