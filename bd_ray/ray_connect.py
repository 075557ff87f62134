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
"""

from __future__ import annotations

import os

__all__ = ["connect"]


def connect(address: str | None, num_cpus: int | None, env_vars: dict[str, str] | None = None) -> None:
    """``ray.init`` by the rule in the module docstring; does nothing if Ray is already initialized.

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
    runtime_env = {"env_vars": dict(env_vars or {})}
    if address is None and not os.environ.get("RAY_ADDRESS"):
        address = "local"
    if address == "local":
        ray.init(address="local", num_cpus=num_cpus, runtime_env=runtime_env)
    else:
        ray.init(address=address, runtime_env=runtime_env)   # None here: RAY_ADDRESS
