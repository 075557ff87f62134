"""Application builder: ``serve run serve_configs/default.yaml`` / ``serve deploy`` entry point.

``import_path: bd_ray.serve.app:build_app`` with the :class:`bd_ray.config.serve.ServeAppConfig`
tree under ``args:`` (Ray Serve's "application builder" pattern, as Ray Serve LLM's
``build_openai_app``). From Python::

    from ray import serve
    from bd_ray.serve.app import build_app
    serve.run(build_app({"model": {"verifier": "smollm2-135m", "drafter": "from-verifier:4"}}))
"""

from __future__ import annotations

from typing import Any, Mapping

from ray.serve import Application

from bd_ray.config.serve import ServeAppConfig, load_serve_config

__all__ = ["build_app", "engine_options", "ingress_options", "actor_resources"]


def actor_resources(num_cpus: float, num_gpus: float, memory: int | None,
                    resources: Mapping[str, float]) -> dict[str, Any]:
    """The resource part of Serve's ``ray_actor_options``: CPUs, GPUs, ``memory`` (bytes) and
    custom ``resources``; unset memory / empty resources are left out (Ray's defaults: none)."""
    out: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if memory is not None:
        out["memory"] = memory
    if resources:
        out["resources"] = dict(resources)
    return out


def engine_options(cfg: ServeAppConfig) -> dict[str, Any]:
    """``SpecEngine.options(...)`` for a config: resources, concurrency limits, autoscaling."""
    e = cfg.engine
    return {
        "autoscaling_config": e.autoscaling.to_serve(),
        "max_ongoing_requests": e.max_ongoing_requests,
        "max_queued_requests": e.max_queued_requests,
        "ray_actor_options": actor_resources(e.num_cpus, e.num_gpus, e.memory, e.resources),
        "health_check_period_s": e.health_check_period_s,
        "graceful_shutdown_timeout_s": e.graceful_shutdown_timeout_s,
        "backpressure_config": {"status_code": 503, "retry_after_s": cfg.ingress.retry_after_s},
    }


def ingress_options(cfg: ServeAppConfig) -> dict[str, Any]:
    """``OpenAIIngress.options(...)``: CPU only; overload beyond its own limit is Serve's 503 + Retry-After."""
    i = cfg.ingress
    return {
        "num_replicas": i.num_replicas,
        "max_ongoing_requests": i.max_ongoing_requests,
        "ray_actor_options": actor_resources(i.num_cpus, 0.0, i.memory, {}),
        "backpressure_config": {"status_code": 503, "retry_after_s": i.retry_after_s},
    }


def build_app(args: Mapping[str, Any] | ServeAppConfig | None = None) -> Application:
    """Build the bd-ray OpenAI application (ingress -> autoscaled speculative engine).

    Args:
        args: the serve config tree (YAML ``args:``), optionally with ``overrides`` (list of
            ``section.key=value``), or a :class:`ServeAppConfig`; ``None`` = defaults (embedded
            SmolLM2-135M verifier, drafter from its first 4 layers, CPU).

    Returns:
        A bound Serve ``Application`` for ``serve.run`` / ``serve run`` / ``serve deploy``.

    Raises:
        bd_ray.config.ConfigError: invalid args (the message names each offending dotted field).
    """
    from bd_ray.serve.engine import SpecEngine
    from bd_ray.serve.ingress import OpenAIIngress

    cfg = args if isinstance(args, ServeAppConfig) else load_serve_config(args)
    tree = cfg.model_dump()
    engine = SpecEngine.options(**engine_options(cfg)).bind(tree)
    return OpenAIIngress.options(**ingress_options(cfg)).bind(engine, tree)
