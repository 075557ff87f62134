"""How every bd-ray job finds its Ray cluster: one rule for training, evaluation and teacher targets.

``run.ray_address`` (``ray_address`` for jobs/teacher_targets.py):

* ``null`` (default): the cluster in ``RAY_ADDRESS`` when it is set (``ray job submit`` sets it, so
  a submitted job runs on the cluster it was submitted to), else a new private Ray instance on this
  machine with ``ray_num_cpus`` logical CPUs. A job started by hand never joins another cluster
  silently: on a development box that is often a ``serve run`` / ``ray start --head`` instance
  whose replicas hold the CPUs the job would wait for.
* ``"auto"``: the ``ray start`` cluster on this machine (Ray's ``address="auto"``); raises
  ``ConnectionError`` if there is none.
* ``"local"``: always a new private instance, even inside ``ray job submit``.
* ``"host:port"`` / ``"ray://host:10001"``: that cluster.

``ray_num_cpus`` is only used when a new instance is started (Ray refuses ``num_cpus`` when
connecting to an existing cluster).

Output: quiet unless ``--verbose`` / ``BD_RAY_VERBOSE=1`` (:mod:`bd_ray.logs`): Ray's progress bars
and worker output go to a log file, bd-ray's progress lines stay on the console.
"""

from __future__ import annotations

import os
from typing import Any

from bd_ray import logs

__all__ = ["connect", "init_kwargs"]


def init_kwargs(address: str | None, num_cpus: int | None, env_vars: dict[str, str] | None = None) -> dict[str, Any]:
    """The ``ray.init`` keyword arguments :func:`connect` uses (the rule of the module docstring).

    Workers get ``env_vars`` plus, unless verbose, :func:`bd_ray.logs.quiet_env`. The driver keeps
    ``log_to_driver=True`` (Ray streams worker output to it) in both modes: when quiet,
    :func:`bd_ray.logs.quiet_ray` decides what of it reaches the console.
    """
    runtime_env = {"env_vars": {**logs.quiet_env(), **dict(env_vars or {})}}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"
    kw: dict[str, Any] = {"address": address, "runtime_env": runtime_env, "log_to_driver": True}
    if address == "local":
        kw["num_cpus"] = num_cpus
    return kw   # address None: RAY_ADDRESS


def connect(address: str | None, num_cpus: int | None, env_vars: dict[str, str] | None = None) -> None:
    """``ray.init`` by the rule in the module docstring (:func:`init_kwargs`), then quiet output
    (:func:`bd_ray.logs.quiet_ray`); does nothing if Ray is already initialized.

    Args:
        address: ``run.ray_address`` (see above).
        num_cpus: logical CPUs of a newly started instance (``None`` = all cores).
        env_vars: environment of the job's workers (``runtime_env["env_vars"]``), e.g.
            ``OMP_NUM_THREADS``.

    Raises:
        ConnectionError: ``address`` names a cluster that cannot be reached.
    """
    import ray

    if ray.is_initialized():
        return
    kw = init_kwargs(address, num_cpus, env_vars)
    logs.quiet_ray_logging()
    ray.init(**kw)
    logs.quiet_ray()
