"""Ray resource declarations shared by the Serve and Train configs (what a replica or worker needs).

Ray schedules an actor only on a node that has every resource it asks for, and the Ray autoscaler
adds a node of a type that has them when none has room (Ray docs, "Resources" and "Autoscaling").
So each bd-ray process that does heavy work declares what it needs:

* ``num_cpus`` / ``num_gpus`` (or ``cpus_per_worker`` / ``use_gpu`` for Train workers): logical
  CPUs and GPUs;
* ``memory``: bytes of RAM, Ray's ``memory`` resource: a scheduling reservation (a node advertises
  about 70 % of its RAM by default, the rest goes to the object store), not a limit Ray enforces.
  Written as an integer (bytes) or with a unit, as Kubernetes and Ray users write it:
  ``12GiB`` / ``12Gi`` (binary, 12 * 2**30) or ``12GB`` / ``12G`` (decimal, 12 * 10**9)
  (:func:`parse_memory_bytes`);
* ``resources``: custom resources, e.g. ``{"gpu_a10g": 1}``, which a node (group) advertises with
  ``ray start --resources`` / KubeRay ``rayStartParams.resources`` / the cluster launcher's
  ``available_node_types.<type>.resources``. bd-ray's cluster configs use one named after the GPU
  kind, so replicas land on, and the autoscaler adds, nodes with that GPU.

:data:`CustomResources` and :data:`MemoryBytes` are the pydantic field types; a bad value is a
``ValueError`` that pydantic reports under the field's dotted name (``engine.resources``).
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BeforeValidator, Field

__all__ = ["RESERVED_RESOURCES", "check_custom_resources", "parse_memory_bytes", "CustomResources", "MemoryBytes"]

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

# Unit -> bytes, keys upper-cased (units are matched case-insensitively). Decimal units (KB, MB, GB,
# TB; K, M, G, T as Kubernetes writes them) are powers of 1000, binary ones (KiB..TiB; Ki..Ti) of 1024,
# as in Kubernetes quantities and IEC units.
_MEMORY_UNITS = {"": 1, "B": 1}
for _i, _p in enumerate("KMGT", start=1):
    _MEMORY_UNITS.update({_p: 1000 ** _i, _p + "B": 1000 ** _i, _p + "I": 1024 ** _i, _p + "IB": 1024 ** _i})
_MEMORY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_memory_bytes(value: Any) -> Any:
    """Turn a memory size with a unit into bytes: ``"12GiB"`` / ``"12Gi"`` -> 12 * 2**30,
    ``"20GB"`` / ``"20G"`` -> 20 * 10**9, ``"512MiB"``, ``"1.5GiB"``, ``"4096"``.

    Units (case-insensitive): ``B``; decimal ``KB MB GB TB`` (``K M G T``); binary ``KiB MiB GiB
    TiB`` (``Ki Mi Gi Ti``). A fractional amount is rounded down to whole bytes. Anything that is
    not a string (an int, ``None``) is returned unchanged for pydantic's own int check.

    Returns:
        bytes (``int``) for a string, else ``value``.

    Raises:
        ValueError: a string that is not a number with one of these units; the message lists them.
    """
    if not isinstance(value, str):
        return value
    m = _MEMORY_RE.match(value)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _MEMORY_UNITS:
        raise ValueError(f"must be bytes: an integer or a number with a unit (B, KB/KiB, MB/MiB, GB/GiB, TB/TiB, "
                         f"or Kubernetes' K/Ki, M/Mi, G/Gi, T/Ti), e.g. 12GiB")
    # Decimal, not float: "1.1GB" is exactly 1,100,000,000 bytes (the regex admits only plain decimals)
    return int(Decimal(m.group(1)) * _MEMORY_UNITS[unit])


MemoryBytes = Optional[Annotated[int, BeforeValidator(parse_memory_bytes), Field(ge=1)]]
"""Bytes of Ray's ``memory`` resource, an int or a string with a unit (:func:`parse_memory_bytes`);
``None`` = none reserved."""
