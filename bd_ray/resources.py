"""Ray resource declarations shared by the Serve and Train configs (what a replica or worker needs).

Ray schedules an actor only on a node that has every resource it asks for, and the Ray autoscaler
adds a node of a type that has them when none has room (Ray docs, "Resources" and "Autoscaling").
So each bd-ray process that does heavy work declares what it needs:

* ``num_cpus`` / ``num_gpus`` (or ``cpus_per_worker`` / ``use_gpu`` for Train workers): logical
  CPUs and GPUs;
* ``memory``: bytes of RAM, Ray's ``memory`` resource: a scheduling reservation (a node advertises
  about 70 % of its RAM by default, the rest goes to the object store), not a limit Ray enforces;
* ``resources``: custom resources, e.g. ``{"gpu_a10g": 1}``, which a node (group) advertises with
  ``ray start --resources`` / KubeRay ``rayStartParams.resources`` / the cluster launcher's
  ``available_node_types.<type>.resources``. bd-ray's cluster configs use one named after the GPU
  kind, so replicas land on, and the autoscaler adds, nodes with that GPU.

:data:`CustomResources` and :data:`MemoryBytes` are the pydantic field types; a bad value is a
``ValueError`` that pydantic reports under the field's dotted name (``engine.resources``).
"""

from __future__ import annotations

import math
from typing import Annotated, Optional

from pydantic import AfterValidator, Field

__all__ = ["RESERVED_RESOURCES", "check_custom_resources", "CustomResources", "MemoryBytes"]

#: resources with their own fields (Ray rejects them inside ``resources`` too)
RESERVED_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def check_custom_resources(value: dict[str, float]) -> dict[str, float]:
    """Validate a custom-resource dict (name -> amount) the way Ray will accept it.

    Rules (Ray's): names are non-empty, without surrounding whitespace, and not one of
    :data:`RESERVED_RESOURCES` (those have their own fields); amounts are finite and > 0, and an
    amount above 1 is a whole number (Ray allows fractions only below 1).

    Returns:
        ``value`` unchanged.

    Raises:
        ValueError: the first offending entry, named.
    """
    for name, amount in value.items():
        if not name or name.strip() != name:
            raise ValueError(f"resource name {name!r} must be non-empty without surrounding spaces")
        if name in RESERVED_RESOURCES:
            raise ValueError(f"{name!r} is not a custom resource: CPUs, GPUs and memory have their own fields "
                             f"(num_cpus/num_gpus/memory for Serve, cpus_per_worker/use_gpu/memory_per_worker "
                             f"for Train; Ray reserves {', '.join(RESERVED_RESOURCES)})")
        if not math.isfinite(amount) or amount <= 0:
            raise ValueError(f"amount of {name!r} must be a finite number > 0, got {amount}")
        if amount > 1 and amount != int(amount):
            raise ValueError(f"amount of {name!r} above 1 must be a whole number (Ray's rule), got {amount}")
    return value


CustomResources = Annotated[dict[str, float], AfterValidator(check_custom_resources)]
"""Custom Ray resources (name -> amount) a replica or worker asks for; validated by :func:`check_custom_resources`."""

MemoryBytes = Optional[Annotated[int, Field(ge=1)]]
"""Bytes of Ray's ``memory`` resource; ``None`` = none reserved."""
