"""bd-ray's typed configuration: one package, one naming scheme, one loader pattern.

- :mod:`bd_ray.config.base`: strict models, :class:`ConfigError` / :class:`FieldError`, YAML loading
  with ``--set section.key=value`` overrides (:func:`load_config`).
- :mod:`bd_ray.config.decoding`: what every decoding path shares (sparse policy, sampling, γ, the one KV
  budget type :data:`Budget`).
- :mod:`bd_ray.config.resources`: Ray resource fields (memory with units, custom resources).
- :mod:`bd_ray.config.train`, :mod:`bd_ray.config.evaluate`, :mod:`bd_ray.config.serve`: one job
  config each, named ``<Job>JobConfig`` / ``ServeAppConfig`` with sections ``<Job><Section>Config``
  and loaded by ``load_<job>_config``.

The job modules are imported from their own module (they pull in ``bd_ray.sparse`` for budget
rules); this package re-exports only the shared pieces.
"""

from bd_ray.config.base import ConfigError, FieldError, StrictModel, apply_overrides, load_config
from bd_ray.config.decoding import (FULL_BUDGET, Budget, PolicyName, SamplingConfig, SparsePolicyConfig, SpecConfig,
                                   budget_tokens, check_budget, parse_budget)

__all__ = ["ConfigError", "FieldError", "StrictModel", "apply_overrides", "load_config",
           "PolicyName", "SamplingConfig", "SparsePolicyConfig", "SpecConfig",
           "Budget", "FULL_BUDGET", "parse_budget", "check_budget", "budget_tokens"]
