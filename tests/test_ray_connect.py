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


QUIET_PROBE = """
import json, time, ray
from bd_ray.ray_connect import connect
from ray._private import worker
connect("local", 1, {})

@ray.remote
def chatter():
    print("noise from a worker", flush=True)
    print("[bd-ray] progress from a worker", flush=True)
    return 1

ray.get(chatter.remote())
time.sleep(3)  # worker output reaches the driver asynchronously
print(json.dumps({"handlers": [n for n, _ in worker.global_worker_stdstream_dispatcher.handlers]}), flush=True)
ray.shutdown()
"""


def test_init_kwargs_quiet_and_verbose(monkeypatch):
    from bd_ray import logs
    from bd_ray.cli import job_parser, load_job_config
    from bd_ray.ray_connect import init_kwargs

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(logs.VERBOSE_ENV, "0")
    quiet = init_kwargs(None, 2, {"A": "1"})
    assert quiet["address"] == "local" and quiet["num_cpus"] == 2
    assert quiet["runtime_env"]["env_vars"] == {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "A": "1"}
    # --verbose on any job's command line flips it (the job's config loader sets BD_RAY_VERBOSE)
    args = job_parser("doc", "M", "a=1").parse_args(["--verbose"])
    assert load_job_config(args, lambda path, ov: "cfg") == ("cfg", None)
    assert logs.is_verbose()
    assert init_kwargs(None, 2, {"A": "1"})["runtime_env"]["env_vars"] == {"A": "1"}


@pytest.mark.slow  # starts two Ray instances
def test_quiet_by_default_and_verbose_shows_ray_output(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "BD_RAY_VERBOSE")}
    env["BD_RAY_LOG_DIR"] = str(tmp_path / "logs")
    quiet = subprocess.run([sys.executable, "-c", QUIET_PROBE], env=env, capture_output=True, text=True, timeout=180)
    assert quiet.returncode == 0, quiet.stderr[-2000:]
    assert "[bd-ray] progress from a worker" in quiet.stdout
    assert "noise from a worker" not in quiet.stdout + quiet.stderr
    assert json.loads(quiet.stdout.strip().splitlines()[-1])["handlers"] == ["bd_ray_quiet"]
    (log,) = (tmp_path / "logs").iterdir()
    assert str(log) in quiet.stdout  # the path is printed once
    text = log.read_text()
    assert "noise from a worker" in text and "progress from a worker" in text

    verbose = subprocess.run([sys.executable, "-c", QUIET_PROBE], env={**env, "BD_RAY_VERBOSE": "1"},
                             capture_output=True, text=True, timeout=180)
    assert verbose.returncode == 0, verbose.stderr[-2000:]
    assert "noise from a worker" in verbose.stdout
    assert json.loads(verbose.stdout.strip().splitlines()[-1])["handlers"] == ["ray_print_logs"]
