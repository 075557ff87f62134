"""Prometheus metrics of the bd-ray server, through Ray's metrics API (``ray.util.metrics``).

Ray exports them on every node's metrics endpoint (``ray start --metrics-export-port``) with the
``ray_`` prefix, e.g. ``ray_bd_ray_generation_tokens_total``. Names and meanings follow vLLM's
``vllm:*`` metrics where one exists (``time_to_first_token_seconds``,
``time_per_output_token_seconds``, ``spec_decode_*``) so existing dashboards map one to one.

Tags: ``model`` (served id) and ``speculative`` (``"true"``/``"false"``) on the engine metrics;
``route`` and ``status`` on the ingress request counter. Recording never raises: a metrics
failure must not fail a request.
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["EngineMetrics", "IngressMetrics", "TTFT_BUCKETS_S", "TPOT_BUCKETS_S"]

log = logging.getLogger(__name__)

# Bucket edges in seconds (vLLM's, extended down for tiny models and up for CPU prefills).
TTFT_BUCKETS_S = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                  7.5, 10.0, 20.0, 40.0, 80.0]
TPOT_BUCKETS_S = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                  0.5, 0.75, 1.0, 2.5]
ALPHA_BUCKETS = [0.05 * i for i in range(1, 20)]
TAU_BUCKETS = [1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 12.0, 16.0, 32.0]


def _safe(fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001 -- metrics never fail a request
            log.debug("metrics recording failed", exc_info=True)
    return wrapper


class EngineMetrics:
    """Per-replica engine metrics (one instance per engine replica).

    * ``bd_ray_requests_total{model,speculative,finish_reason}``: finished requests
      (``finish_reason`` = ``stop``/``length``/``error``/``cancelled``);
    * ``bd_ray_prompt_tokens_total``, ``bd_ray_generation_tokens_total``: tokens;
    * ``bd_ray_spec_decode_drafted_tokens_total``, ``bd_ray_spec_decode_accepted_tokens_total``;
    * ``bd_ray_spec_decode_acceptance_rate`` (histogram of per-request α),
      ``bd_ray_spec_decode_mean_accepted_length`` (histogram of per-request τ);
    * ``bd_ray_time_to_first_token_seconds`` (histogram, from the engine receiving the request);
    * ``bd_ray_time_per_output_token_seconds`` (histogram, (total - TTFT) / (tokens - 1));
    * ``bd_ray_live_requests`` (gauge: requests holding KV state in this replica).
    """

    def __init__(self, model: str) -> None:
        from ray.util.metrics import Counter, Gauge, Histogram

        self.model = model
        tags = ("model", "speculative")
        self.requests = Counter("bd_ray_requests_total", "finished requests",
                                tag_keys=tags + ("finish_reason",))
        self.prompt_tokens = Counter("bd_ray_prompt_tokens_total", "prompt tokens processed", tag_keys=tags)
        self.generation_tokens = Counter("bd_ray_generation_tokens_total", "tokens generated", tag_keys=tags)
        self.drafted = Counter("bd_ray_spec_decode_drafted_tokens_total", "draft tokens proposed", tag_keys=tags)
        self.accepted = Counter("bd_ray_spec_decode_accepted_tokens_total", "draft tokens accepted", tag_keys=tags)
        self.alpha = Histogram("bd_ray_spec_decode_acceptance_rate", "per-request acceptance rate alpha",
                               boundaries=ALPHA_BUCKETS, tag_keys=tags)
        self.tau = Histogram("bd_ray_spec_decode_mean_accepted_length",
                             "per-request tau = tokens per verifier forward", boundaries=TAU_BUCKETS, tag_keys=tags)
        self.ttft = Histogram("bd_ray_time_to_first_token_seconds", "time to first token (s)",
                              boundaries=TTFT_BUCKETS_S, tag_keys=tags)
        self.tpot = Histogram("bd_ray_time_per_output_token_seconds", "time per output token after the first (s)",
                              boundaries=TPOT_BUCKETS_S, tag_keys=tags)
        self.live = Gauge("bd_ray_live_requests", "requests holding KV caches in this replica", tag_keys=("model",))

    def _tags(self, speculative: bool) -> dict[str, str]:
        return {"model": self.model, "speculative": "true" if speculative else "false"}

    @_safe
    def first_token(self, speculative: bool, ttft_s: float) -> None:
        self.ttft.observe(ttft_s, tags=self._tags(speculative))

    @_safe
    def finished(self, speculative: bool, finish_reason: str, prompt_tokens: int, completion_tokens: int,
                 total_s: float, ttft_s: float | None, spec: dict[str, Any] | None) -> None:
        """Record one finished (or failed/cancelled) request; times in seconds."""
        tags = self._tags(speculative)
        self.requests.inc(1, tags={**tags, "finish_reason": finish_reason})
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, tags=tags)
        if completion_tokens:
            self.generation_tokens.inc(completion_tokens, tags=tags)
        if ttft_s is not None and completion_tokens > 1:
            self.tpot.observe((total_s - ttft_s) / (completion_tokens - 1), tags=tags)
        if spec and spec.get("drafted"):
            self.drafted.inc(spec["drafted"], tags=tags)
            if spec.get("accepted"):
                self.accepted.inc(spec["accepted"], tags=tags)
            self.alpha.observe(spec["alpha"], tags=tags)
            self.tau.observe(spec["tau"], tags=tags)

    @_safe
    def set_live(self, n: int) -> None:
        self.live.set(n, tags={"model": self.model})


class IngressMetrics:
    """``bd_ray_http_requests_total{route,status}``: HTTP requests answered by the ingress."""

    def __init__(self) -> None:
        from ray.util.metrics import Counter

        self.http = Counter("bd_ray_http_requests_total", "HTTP requests by route and status code",
                            tag_keys=("route", "status"))

    @_safe
    def request(self, route: str, status: int) -> None:
        self.http.inc(1, tags={"route": route, "status": str(status)})
