"""A simulated autoscaling Ray cluster on one machine, to try bd-ray's cluster configs without a cluster.

Ray ships a ``fake_multinode`` node provider for exactly this (``ray/autoscaler/_private/
fake_multi_node``): the head is a normal ``ray start --head`` whose autoscaler (``monitor.py``)
"launches" a worker node by starting another raylet on the same machine, with the resources its
node type declares, and "terminates" it by killing that raylet. Scheduling, placement groups,
resource demands, idle timeouts and Serve/Train behaviour are Ray's own; only the machines are
simulated (all nodes share the CPUs, RAM and file system of this machine).

Known in Ray 2.60 and handled here:

* ``ray.cluster_utils.AutoscalingCluster`` reads a base YAML the wheel does not ship and runs
  ``ray stop --force`` (which kills every Ray cluster of the machine). :class:`SimCluster` starts
  the head itself from a complete cluster config (``serve_configs/sim_cluster.yaml``), on free
  ports and in its own temp dir and process group, and stops only the processes it started.
* The fake provider cannot start a node whose type declares ``memory`` (it passes it as a custom
  resource, which Ray rejects); :class:`SimNodeProvider` drops it at launch (the simulated node then
  advertises this machine's memory), so node types can declare memory as real ones do and the
  autoscaler plans with it.
* Token auth: every process of the cluster and the driver must agree on ``RAY_AUTH_MODE``;
  :class:`SimCluster` sets it (the driver's value, else ``disabled``) in its own environment and
  the cluster's.

Use (a driver connects with ``ray.init(address=cluster.address)``)::

    with SimCluster("serve_configs/sim_cluster.yaml") as cluster:
        ray.init(address=cluster.address)
        ...
        ray.shutdown()

:func:`bd_ray.testing.load_timeline.serve_load_timeline` drives a Serve application on it through
scale-up under load and scale-down when idle (``benchmarks/autoscaling_timeline.py``,
``tests/test_cluster_configs.py``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

from bd_ray.testing.ports import free_port

__all__ = ["SimNodeProvider", "SimCluster", "wait_for", "worker_nodes", "head_node_id", "serve_replicas",
           "actor_nodes"]

HEAD_RESOURCE = "node:__internal_head__"
ALL_INTERFACES = ""  # Ray binds its ports on the node IP, so they must be free on every interface


class SimNodeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider, except that a node type may declare ``memory``.

    The autoscaler plans with the declared ``memory``; the launched (simulated) node advertises
    the memory Ray detects on this machine, which is more than any node type here declares.
    Configure with ``provider: {type: external, module: bd_ray.testing.sim_cluster.SimNodeProvider}``.
    """

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        resources = {k: v for k, v in resources.items() if k != "memory"}
        return super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class SimCluster:
    """A ``fake_multinode`` Ray cluster: started from a cluster-launcher-style YAML, stopped completely.

    Args:
        config: path to the cluster YAML, or the loaded dict (``serve_configs/sim_cluster.yaml``).
            The head's resources are its ``head_node_type``'s ``resources`` (``CPU``, ``GPU``,
            ``memory``, ``object_store_memory`` go to the matching ``ray start`` flags, the rest to
            ``--resources``). ``provider.gcs_address`` is filled in at start.
        env: extra environment for every process of the cluster (e.g. Serve's metric intervals).
        start_timeout_s: limit for ``ray start --head`` (seconds).

    Attributes:
        address: ``host:port`` of the head's GCS, for ``ray.init(address=...)`` (after :meth:`start`).
        temp_dir: the cluster's own Ray temp dir (sessions, logs), removed by :meth:`stop`.

    ``start`` raises ``RuntimeError`` (with the tail of ``ray start``'s output) when the head does not
    come up. ``stop`` is idempotent and safe after a failed start; the context manager always calls it.
    """

    def __init__(self, config: str | Path | Mapping[str, Any], env: Mapping[str, str] | None = None,
                 start_timeout_s: float = 120.0) -> None:
        if isinstance(config, (str, Path)):
            config = yaml.safe_load(Path(config).read_text())
        self.config: dict[str, Any] = copy.deepcopy(dict(config))
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.address: str | None = None
        self.temp_dir: str | None = None
        self._pgid: int | None = None
        self._saved_auth_mode: str | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def auth_mode(self) -> str:
        """The ``RAY_AUTH_MODE`` the cluster and its driver use: the driver's if set, else ``disabled``."""
        return os.environ.get("RAY_AUTH_MODE") or "disabled"

    def start(self) -> "SimCluster":
        """Start the head (its autoscaler then launches and removes simulated worker nodes).

        Sets ``RAY_AUTH_MODE`` in this process too until :meth:`stop` (see the module docstring), so
        call it before ``ray.init``. Returns ``self``.
        """
        from ray._private.services import get_node_ip_address

        cfg = self.config
        head = cfg["available_node_types"][cfg["head_node_type"]]
        res = {k: v for k, v in (head.get("resources") or {}).items()}
        # A short root: Ray's unix socket paths live under it (108-byte limit).
        self.temp_dir = tempfile.mkdtemp(prefix="bdsim_", dir="/tmp")
        ip = get_node_ip_address()
        port = free_port(ALL_INTERFACES)
        cfg["provider"]["gcs_address"] = f"{ip}:{port}"
        cfg_path = os.path.join(self.temp_dir, "autoscaling.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(cfg, f)
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={self.temp_dir}",
               f"--autoscaling-config={cfg_path}", "--include-dashboard=false", "--disable-usage-stats",
               *(f"--{flag}={free_port(ALL_INTERFACES)}" for flag in (
                   "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
                   "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")),
               f"--num-cpus={int(res.pop('CPU', 0))}", f"--num-gpus={int(res.pop('GPU', 0))}"]
        if "memory" in res:
            cmd.append(f"--memory={int(res.pop('memory'))}")
        if "object_store_memory" in res:
            cmd.append(f"--object-store-memory={int(res.pop('object_store_memory'))}")
        if res:
            cmd.append(f"--resources={json.dumps(res)}")
        mode = self.auth_mode()
        self._saved_auth_mode = os.environ.get("RAY_AUTH_MODE")
        os.environ["RAY_AUTH_MODE"] = mode
        env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
               "RAY_AUTH_MODE": mode, **self.env}
        env.pop("RAY_ADDRESS", None)
        # Own session = own process group, inherited by the head's services, the autoscaler and the
        # simulated nodes' raylets; Ray workers start sessions of their own and are found as their
        # descendants. stop() ends exactly these processes.
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        self._pgid = proc.pid
        try:
            out, _ = proc.communicate(timeout=self.start_timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"ray start --head did not finish within {self.start_timeout_s:.0f} s") from None
        if proc.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start --head failed (exit {proc.returncode}):\n{out[-3000:]}")
        self.address = f"{ip}:{port}"
        return self

    def _own_processes(self) -> list:
        """psutil handles of this cluster's live processes: its process group, their descendants
        (Ray workers run in sessions of their own) and anything naming its temp dir; zombies left out."""
        import psutil

        procs = {}
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if os.getpgid(p.pid) == self._pgid or (
                        self.temp_dir and any(self.temp_dir in a for a in (p.info["cmdline"] or []))):
                    procs[p.pid] = p
                    for c in p.children(recursive=True):
                        procs.setdefault(c.pid, c)
            except (psutil.Error, OSError, TypeError):
                continue
        procs.pop(os.getpid(), None)
        return [p for p in procs.values() if _alive(p)]

    def stop(self, grace_s: float = 10.0) -> None:
        """Disconnect this driver if connected, end every process of this cluster (SIGTERM, then
        SIGKILL after ``grace_s`` seconds) and remove its temp dir. Other Ray clusters are never
        touched: only this cluster's process group, their descendants and processes naming its temp dir."""
        import ray

        if ray.is_initialized():
            ray.shutdown()
        if self._pgid is not None:
            for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
                procs = self._own_processes()
                if not procs:
                    break
                for p in procs:
                    try:
                        p.send_signal(sig)
                    except Exception:  # gone meanwhile
                        pass
                deadline = time.time() + wait
                while any(_alive(p) for p in procs) and time.time() < deadline:
                    time.sleep(0.2)
            self._pgid = None
        try:
            from ray._private.services import find_gcs_addresses

            find_gcs_addresses.cache_clear()
        except Exception:  # an older Ray without the cache: nothing to clear
            pass
        if self.temp_dir:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
            # the driver's RAY_AUTH_MODE as it was before start()
            if self._saved_auth_mode is None:
                os.environ.pop("RAY_AUTH_MODE", None)
            else:
                os.environ["RAY_AUTH_MODE"] = self._saved_auth_mode
        self.address = None

    def __enter__(self) -> "SimCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- introspection (from a connected driver) --------------------------------------------------


def head_node_id() -> str:
    """Node id of the head (the node with Ray's ``node:__internal_head__`` resource).

    Raises:
        RuntimeError: no alive head in ``ray.nodes()``.
    """
    import ray

    for n in ray.nodes():
        if n["Alive"] and HEAD_RESOURCE in n["Resources"]:
            return n["NodeID"]
    raise RuntimeError("no alive head node in ray.nodes()")


def worker_nodes() -> list[str]:
    """Ids of the alive non-head nodes (the simulated workers the autoscaler launched)."""
    import ray

    return sorted(n["NodeID"] for n in ray.nodes() if n["Alive"] and HEAD_RESOURCE not in n["Resources"])


def serve_replicas(app: str, deployment: str) -> list[dict]:
    """``[{"replica_id", "state", "node_id"}]`` of one Serve deployment, from the Serve controller
    (the data behind ``serve status`` and the dashboard's Serve page; internal client API)."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    dep = details["applications"].get(app, {}).get("deployments", {}).get(deployment, {})
    return [{"replica_id": r.get("replica_id"), "state": str(r.get("state")), "node_id": r.get("node_id")}
            for r in dep.get("replicas", [])]


def actor_nodes(class_name: str) -> list[dict]:
    """``[{"actor_id", "state", "node_id"}]`` of every actor (alive or dead) whose class name is
    ``class_name``, from the GCS actor table (``ray._private.state.actors``, a debugging API that
    needs no dashboard); e.g. ``RayTrainWorker`` for Ray Train workers."""
    from ray._private.state import actors

    return [{"actor_id": aid, "state": a["State"], "node_id": a["Address"]["NodeID"]}
            for aid, a in actors().items() if a["ActorClassName"] == class_name]


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.5,
             on_poll: Callable[[], None] | None = None) -> Any:
    """Poll ``predicate`` until it returns a truthy value (returned), calling ``on_poll`` each round.

    Raises:
        TimeoutError: not true within ``timeout_s`` seconds; the message names ``what``.
    """
    deadline = time.time() + timeout_s
    while True:
        if on_poll is not None:
            on_poll()
        value = predicate()
        if value:
            return value
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)
