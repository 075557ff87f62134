"""Typed configuration of the OpenAI-compatible Serve application (``bd_ray.serve.app:build_app``).

YAML in (the ``args:`` block of a Serve config file, see ``serve_configs/default.yaml``), validated
pydantic out. Every section forbids unknown keys, so a typo fails at deploy time naming the dotted
field (``engine.autoscaling.max_replicas``), as everywhere else in bd-ray (:mod:`bd_ray.config`).

Sections:

* ``model``: what is served: the verifier, the drafter, dtype/device, the served model id and the
  context limit.
* ``spec``: the engine's own :class:`bd_ray.config.SpecConfig` (``gamma``, ``budget``, ``policy``,
  ``prefill_chunk``, ``adaptive``): what a request decodes with unless it overrides ``gamma``, the
  KV budget (request field ``kv_budget``) or the policy (``sparse_policy``). ``adaptive`` (the
  batch speculation policy) is on by default, as in every entry point; a request's ``gamma`` is
  a fixed γ (an explicit choice).
* ``speculation``: the serve-only part: whether requests speculate by default (``enabled``) and
  the largest γ a request may ask for (``max_gamma``).
* ``defaults``: OpenAI sampling defaults (``max_tokens``, ``temperature``, ``top_p``, ``top_k``).
* ``engine``: the engine deployment (the autoscaled verifier replicas, each with its paired
  drafter and one continuous-batching engine): resources, batching (``max_num_seqs``,
  ``kv_cache_bytes``, ``disable_spec_above``, ``elastic_budget``), ``max_ongoing_requests`` / ``max_queued_requests``,
  ``autoscaling`` (the fields of Ray Serve's ``AutoscalingConfig`` that matter here).
* ``ingress``: the FastAPI ingress deployment: resources, concurrency, ``Retry-After``, timeouts.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Mapping

from pydantic import Field, ValidationError, model_validator

from bd_ray.config.base import ConfigError, FieldError, StrictModel, _format_validation_error, apply_overrides
from bd_ray.config.decoding import ElasticBudgetConfig, SpecConfig, check_budget
from bd_ray.config.resources import CustomResources, MemoryBytes
from bd_ray.sparse import min_budget_any_length

__all__ = [
    "ServeModelsConfig",
    "ServeSpeculationConfig",
    "ServeRequestConfig",
    "AutoscalingConfig",
    "ServeEngineConfig",
    "IngressConfig",
    "ServeAppConfig",
    "load_serve_config",
]


class ServeModelsConfig(StrictModel):
    """What one application serves.

    ``verifier`` / ``drafter`` accept what :func:`bd_ray.models.load_verifier` /
    :func:`bd_ray.models.load_drafter` accept: an embedded name (``smollm2-135m``), a local HF
    checkpoint directory, or for the drafter a shipped drafter name (``drafters/README.md``) or
    ``from-verifier:N`` (the verifier's first N layers).
    ``drafter: null`` serves plain decoding only (requests asking for ``speculative: true`` then get
    400). ``max_model_len`` (tokens, prompt + completion) defaults to the verifier's
    ``max_position_embeddings``; a smaller value caps it (vLLM's ``--max-model-len``).
    ``drafter_attn: auto`` selects ``bd_ray_sparse`` (:mod:`bd_ray.attention`: the Triton kernel on
    CUDA, torch's fused flash kernel with stacked query heads on CPU, the faster path measured
    there: results/speed/); the verifier always runs ``bd_ray_sparse``. ``torch_threads: null`` =
    the CPUs an engine replica reserves (``engine.num_cpus``, at least 1).
    """

    name: str = Field("smollm2-135m", min_length=1, description="served model id (the OpenAI `model` field)")
    aliases: list[str] = Field(default_factory=list, description="other ids accepted in requests")
    verifier: str = "smollm2-135m"
    drafter: str | None = "from-verifier:4"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    drafter_attn: Literal["auto", "sdpa", "eager", "bd_ray_sparse"] = "auto"
    max_model_len: int | None = Field(None, ge=2, description="context limit in tokens (prompt + max_tokens)")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's")
    torch_threads: int | None = Field(None, ge=1, le=256, description="torch intra-op threads per engine "
                                      "replica; null = engine.num_cpus (at least 1)")


class ServeSpeculationConfig(StrictModel):
    """Serve-only speculative settings (the engine's own ones are the ``spec`` section, a
    :class:`bd_ray.config.SpecConfig`)."""

    enabled: bool = Field(True, description="default of a request's `speculative` field")
    max_gamma: int = Field(16, ge=1, le=128, description="largest gamma a request may ask for")


class ServeRequestConfig(StrictModel):
    """OpenAI sampling defaults for fields a request leaves out (OpenAI's own defaults for temperature/top_p)."""

    max_tokens: int = Field(128, ge=1, description="completion tokens when the request sets none "
                                                   "(capped to what the context limit leaves)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="0 = no top-k filter (vLLM extension)")


class AutoscalingConfig(StrictModel):
    """Ray Serve ``autoscaling_config`` of the engine deployment (same names and meaning as Serve's)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(16.0, gt=0, description="ongoing requests per replica Serve aims "
                                           "for (a batched replica decodes many at once)")
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0)
    metrics_interval_s: float | None = Field(None, gt=0, description="deprecated in Serve; set only when "
                                             "look_back_period_s < 10 s (Serve warns otherwise)")

    @model_validator(mode="after")
    def _ordered(self) -> "AutoscalingConfig":
        if self.min_replicas > self.max_replicas:
            raise FieldError("min_replicas", f"must be <= max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise FieldError("initial_replicas", f"must lie in [min_replicas, max_replicas] = "
                                                 f"[{self.min_replicas}, {self.max_replicas}]")
        return self

    def to_serve(self) -> dict[str, Any]:
        """The dict Ray Serve's ``autoscaling_config`` option takes."""
        out = self.model_dump()
        for key in ("initial_replicas", "metrics_interval_s"):
            if out[key] is None:
                out.pop(key)
        return out


class ServeEngineConfig(StrictModel):
    """The engine deployment: verifier replicas (full KV caches) each paired with an in-process drafter.

    Batching (:class:`bd_ray.speculative.batch.BatchEngine`): a replica decodes up to
    ``max_num_seqs`` requests together, one forward per step, while their caches fit
    ``kv_cache_bytes`` (bytes, or with a unit: ``2GiB``; null = no limit); up to
    ``max_ongoing_requests`` requests are routed to a replica, those beyond admission wait in its
    queue (so ``max_ongoing_requests`` >= ``max_num_seqs``); up to ``max_queued_requests`` more wait
    in the ingress's handle queue; beyond that the ingress answers 503 with ``Retry-After``
    (``-1`` = unbounded, Serve's convention). ``disable_spec_above``: adaptive requests never
    speculate with more decoding rows than this, one joining more rows than this is admitted
    plainly, without a drafter prefill, and deferred drafter prefills wait (vLLM's
    ``disable_by_batch_size``; null = the batch policy decides from measured costs alone).
    ``max_num_batched_tokens`` (vLLM's name): tokens one step computes while decoding rows
    outnumber prefilling ones, their 1 + γ each and the rest prompt tokens of chunked prefill, so
    a long prompt's prefill slows the streams beside it by about that many tokens' time per step;
    while as many rows prefill as decode (a burst: the queue is the bottleneck) and when it is
    null, a step prefills a whole ``spec.prefill_chunk``. ``elastic_budget`` (off by default): under memory
    pressure, new rows run at a lower drafter KV budget (down to ``floor``) instead of waiting
    (:class:`bd_ray.config.decoding.ElasticBudgetConfig`).

    Placement (``ray_actor_options``): ``num_cpus``, ``num_gpus``, ``memory`` (bytes, Ray's
    ``memory`` resource) and custom ``resources`` (e.g. ``{"gpu_a10g": 1}`` for a GPU kind) are
    what one replica (verifier + its in-process drafter) needs; a replica that fits on no node is
    what makes the Ray autoscaler add one (``serve_configs/cluster.yaml``, ``bd_ray.config.resources``).
    """

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: MemoryBytes = Field(None, description="RAM reserved per replica (Ray's `memory` resource, a "
                                "scheduling reservation): bytes, or with a unit (12GiB, 12Gi, 12GB); null = none")
    resources: CustomResources = Field(default_factory=dict, description="custom Ray resources per replica, "
                                       "e.g. {gpu_a10g: 1}")
    max_num_seqs: int | None = Field(None, ge=1, description="requests decoded together per replica; "
                                     "null = max_ongoing_requests (every request routed here joins the batch)")
    kv_cache_bytes: MemoryBytes = Field(None, description="KV-cache memory per replica (both models' caches "
                                        "and in-flight prefills): bytes, or with a unit (2GiB); null = no limit")
    disable_spec_above: int | None = Field(None, ge=1, description="adaptive requests decode plainly with more "
                                           "decoding rows than this (one joining more rows skips its drafter "
                                           "prefill); null = the batch policy decides")
    max_num_batched_tokens: int | None = Field(None, ge=1, le=1 << 20, description="tokens a step computes while "
                                               "decoding rows outnumber prefilling ones (their 1 + gamma "
                                               "each, the rest prefill); null = spec.prefill_chunk of "
                                               "prefill every step")
    elastic_budget: ElasticBudgetConfig = Field(default_factory=ElasticBudgetConfig)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=-1)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    health_check_period_s: float = Field(10.0, gt=0)
    graceful_shutdown_timeout_s: float = Field(20.0, ge=0)

    @model_validator(mode="after")
    def _room_for_a_batch(self) -> "ServeEngineConfig":
        if self.max_num_seqs is not None and self.max_ongoing_requests < self.max_num_seqs:
            raise FieldError("max_ongoing_requests", f"must be >= max_num_seqs ({self.max_num_seqs}): a replica "
                                                     "is never sent more requests than this, so the batch could "
                                                     "never fill")
        return self

    def batch_rows(self) -> int:
        """Rows a replica decodes together: ``max_num_seqs``, or ``max_ongoing_requests`` when unset."""
        return self.max_num_seqs or self.max_ongoing_requests

    def threads(self) -> int:
        """torch threads of a replica when ``model.torch_threads`` is unset: the CPUs it reserves."""
        return max(1, int(self.num_cpus))


class IngressConfig(StrictModel):
    """The FastAPI ingress deployment (OpenAI routes): cheap, CPU only, many concurrent connections."""

    num_cpus: float = Field(0.25, ge=0)
    memory: MemoryBytes = Field(None, description="RAM reserved per ingress replica: bytes, or with a unit "
                                "(1GiB); null = none")
    num_replicas: int = Field(1, ge=1)
    max_ongoing_requests: int = Field(256, ge=1)
    retry_after_s: float = Field(1.0, ge=0, description="Retry-After sent with 503 on overload (s)")
    first_chunk_timeout_s: float = Field(300.0, gt=0, description="queue wait + prefill limit before 503 (s)")
    max_stop_strings: int = Field(8, ge=0)


class ServeAppConfig(StrictModel):
    """Everything ``build_app`` needs; ``serve_configs/*.yaml`` put it under ``applications[].args``."""

    model: ServeModelsConfig = Field(default_factory=ServeModelsConfig)
    spec: SpecConfig = Field(default_factory=SpecConfig)
    speculation: ServeSpeculationConfig = Field(default_factory=ServeSpeculationConfig)
    defaults: ServeRequestConfig = Field(default_factory=ServeRequestConfig)
    engine: ServeEngineConfig = Field(default_factory=ServeEngineConfig)
    ingress: IngressConfig = Field(default_factory=IngressConfig)

    @model_validator(mode="after")
    def _spec_fits_every_request(self) -> "ServeAppConfig":
        if self.spec.gamma > self.speculation.max_gamma:
            raise FieldError("spec.gamma", f"must be <= speculation.max_gamma ({self.speculation.max_gamma})")
        try:
            # caught at deploy time: otherwise every prompt longer than the budget gets a 400
            check_budget(self.spec.budget, min_budget_any_length(self.spec.policy), self.spec.policy.name,
                         "for prompts longer than the budget")
        except ValueError as exc:
            raise FieldError("spec.budget", f"{exc}; raise spec.budget or lower the policy's mandatory "
                                            "positions") from None
        return self


def load_serve_config(args: Mapping[str, Any] | None) -> ServeAppConfig:
    """Validate the ``args`` of a Serve application into a :class:`ServeAppConfig`.

    ``args`` is the config tree itself, optionally with ``overrides: ["spec.gamma=6", ...]``
    (``--set`` syntax of :func:`bd_ray.config.apply_overrides`, value parsed as YAML), so
    ``serve run serve_configs/default.yaml`` and ``serve run bd_ray.serve.app:build_app
    spec.gamma=6``-style CLI args both work (CLI ``key=value`` args arrive as dotted top-level keys
    and are applied as overrides too).

    Raises:
        ConfigError: unknown keys, wrong types or out-of-range values, each named by dotted path.
    """
    tree: dict[str, Any] = {}
    overrides: list[str] = []
    for key, value in copy.deepcopy(dict(args or {})).items():
        if key == "overrides":
            if not isinstance(value, (list, tuple)):
                raise ConfigError("args.overrides must be a list of 'section.key=value' strings")
            overrides.extend(str(v) for v in value)
        elif "." in key:  # `serve run ... spec.gamma=6` passes {"spec.gamma": "6"}
            overrides.append(f"{key}={value}")
        else:
            tree[key] = value
    apply_overrides(tree, overrides)
    try:
        return ServeAppConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, "serve app args")) from None
