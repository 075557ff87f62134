"""Every bd-ray job finds its Ray cluster by one rule (bd_ray/ray_connect.py), checked on real Ray
instances: a job inside ``ray job submit`` (``RAY_ADDRESS`` set) joins that cluster even though
its config names CPUs for a local one (Ray refuses ``num_cpus`` when connecting: the teacher-targets
job used to crash there), and a job started by hand gets a private instance of its own size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

PROBE = """
import json, sys, ray
from bd_ray.ray_connect import connect
connect(None if sys.argv[1] == "null" else sys.argv[1], int(sys.argv[2]), {"BD_RAY_PROBE": "1"})
print(json.dumps({"cpus": ray.cluster_resources().get("CPU"), "gcs": ray.get_runtime_context().gcs_address}))
"""


def _probe(address: str, num_cpus: int, env: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, address, str(num_cpus)], env=env, cwd=os.getcwd(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # starts three Ray instances
def test_jobs_join_ray_address_else_start_a_private_instance():
    import ray

    ray.init(address="local", num_cpus=3, include_dashboard=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        joined = _probe("null", 4, {**env, "RAY_ADDRESS": gcs})       # inside `ray job submit`
        assert joined == {"cpus": 3.0, "gcs": gcs}
        private = _probe("null", 2, env)                                 # started by hand
        assert private["cpus"] == 2.0 and private["gcs"] != gcs
        forced = _probe("local", 1, {**env, "RAY_ADDRESS": gcs})        # 'local' wins over RAY_ADDRESS
        assert forced["cpus"] == 1.0 and forced["gcs"] != gcs
    finally:
        ray.shutdown()


def test_connect_leaves_an_initialized_ray_alone():
    import ray

    from bd_ray.ray_connect import connect

    ray.init(address="local", num_cpus=1, include_dashboard=False)
    try:
        gcs = ray.get_runtime_context().gcs_address
        connect("ray://nowhere:1", 8, {})
        assert ray.get_runtime_context().gcs_address == gcs
    finally:
        ray.shutdown()
