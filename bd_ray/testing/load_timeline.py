"""A Serve application under load on the simulated cluster: scale up, hold, scale down, timed.

:func:`serve_load_timeline` drives the load (``clients`` threads POSTing back to back) and records,
in a :class:`Timeline`, when replicas and simulated worker nodes came and went
(``benchmarks/autoscaling_timeline.py``, ``tests/test_cluster_configs.py``).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Callable

from bd_ray.testing.sim_cluster import head_node_id, serve_replicas, wait_for, worker_nodes

__all__ = ["Timeline", "serve_load_timeline"]


class Timeline:
    """Named events (seconds since :meth:`start`, first occurrence wins) plus periodic samples."""

    def __init__(self) -> None:
        self.t0 = time.time()
        self.events: dict[str, float] = {}
        self.samples: list[dict] = []

    def start(self) -> None:
        """Reset the clock (t = 0 now)."""
        self.t0 = time.time()

    def now(self) -> float:
        """Seconds since :meth:`start`."""
        return round(time.time() - self.t0, 2)

    def mark(self, name: str) -> None:
        """Record event ``name`` at the current time unless it was recorded before."""
        self.events.setdefault(name, self.now())

    def sample(self, **state: Any) -> None:
        """Append ``{"t": now, **state}`` to the samples."""
        self.samples.append({"t": self.now(), **state})


def _post(url: str, payload: dict, timeout_s: float) -> tuple[int, str]:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            resp.read()
            return resp.status, ""
    except urllib.error.HTTPError as err:
        return err.code, err.read()[:200].decode(errors="replace")
    except Exception as err:  # connection reset, timeout: a failed request, reported as such
        return 0, repr(err)[:200]


def serve_load_timeline(base_url: str, app: str, payload: dict, *, deployment: str = "SpecEngine",
                        clients: int = 4, min_replicas: int = 1, max_replicas: int = 2,
                        expect_worker_nodes: int = 1, up_timeout_s: float = 150.0, hold_s: float = 2.0,
                        down_timeout_s: float = 120.0, request_timeout_s: float = 60.0, poll_s: float = 0.5,
                        log: Callable[[str], None] = print) -> dict:
    """Scale a running Serve app up under load and down when idle; return the measured timeline.

    Steps: wait for ``min_replicas`` running replicas and no worker nodes; start ``clients`` threads
    that POST ``payload`` to ``base_url + "/v1/completions"`` back to back (bounded concurrency, on
    whatever host ``base_url`` names, e.g. 127.0.0.1); poll replicas (``serve_replicas``) and nodes
    (``worker_nodes``) every ``poll_s`` until ``max_replicas`` replicas run and
    ``expect_worker_nodes`` worker nodes are alive, keep the load ``hold_s`` more seconds so the new
    replicas serve; stop the load; wait until only ``min_replicas`` replicas remain, then until no
    worker node is left.

    Returns:
        ``{"events": {name: seconds since load start}, "samples": [...], "requests": {"ok",
        "failed", "failures", "served_after_scale_up"}, "peak": {"replicas": [...], "worker_nodes":
        [...]}, "head_node_id", "scaled_up", "scaled_down"}``. Events: ``load_start``,
        ``first_node_up``, ``nodes_up``, ``first_replica_up``, ``replicas_up``, ``load_end``,
        ``replicas_down``, ``nodes_down`` (missing when it did not happen in time).

    Raises:
        TimeoutError: the app was not at ``min_replicas`` with no worker nodes at the start.
    """
    tl = Timeline()
    head = head_node_id()

    def snapshot() -> dict:
        reps = serve_replicas(app, deployment)
        return {"replicas": reps, "running": sum(r["state"].endswith("RUNNING") for r in reps),
                "worker_nodes": worker_nodes()}

    def settled() -> bool:
        s = snapshot()
        return len(s["replicas"]) == min_replicas and s["running"] == min_replicas and not s["worker_nodes"]

    wait_for(settled, 120, f"{min_replicas} running replica(s) and no worker nodes before the load")
    url = base_url.rstrip("/") + "/v1/completions"
    stop = threading.Event()
    results: list[dict] = []

    def client() -> None:
        while not stop.is_set():
            t = tl.now()
            status, err = _post(url, payload, request_timeout_s)
            results.append({"t": t, "t_end": tl.now(), "status": status, "error": err})

    tl.start()
    tl.mark("load_start")
    log(f"[sim] load: {clients} clients on {url}")
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for th in threads:
        th.start()
    peak: dict = {}
    try:
        while True:
            s = snapshot()
            tl.sample(running=s["running"], replicas=len(s["replicas"]), worker_nodes=len(s["worker_nodes"]),
                      replica_nodes=[r["node_id"] for r in s["replicas"] if r["state"].endswith("RUNNING")])
            if s["worker_nodes"]:
                tl.mark("first_node_up")
            if len(s["worker_nodes"]) >= expect_worker_nodes:
                tl.mark("nodes_up")
            if s["running"] > min_replicas:
                tl.mark("first_replica_up")
            if s["running"] >= max_replicas:
                tl.mark("replicas_up")
                peak = {"replicas": s["replicas"], "worker_nodes": s["worker_nodes"]}
            if "replicas_up" in tl.events and "nodes_up" in tl.events and \
                    tl.now() - tl.events["replicas_up"] >= hold_s:
                break
            if tl.now() > up_timeout_s:
                log(f"[sim] scale-up not complete after {up_timeout_s:.0f} s: {s}")
                peak = peak or {"replicas": s["replicas"], "worker_nodes": s["worker_nodes"]}
                break
            time.sleep(poll_s)
    finally:
        tl.mark("load_end")
        stop.set()
        for th in threads:
            th.join(timeout=request_timeout_s + 5)
    log(f"[sim] load ended at {tl.events['load_end']:.1f} s; {len(results)} requests")

    def poll_down() -> None:
        s = snapshot()
        tl.sample(running=s["running"], replicas=len(s["replicas"]), worker_nodes=len(s["worker_nodes"]),
                  replica_nodes=[r["node_id"] for r in s["replicas"] if r["state"].endswith("RUNNING")])
        if len(s["replicas"]) <= min_replicas and s["running"] == min_replicas:
            tl.mark("replicas_down")
        if "replicas_down" in tl.events and not s["worker_nodes"]:
            tl.mark("nodes_down")

    try:
        wait_for(lambda: "nodes_down" in tl.events, down_timeout_s, "replicas and nodes released",
                 interval_s=poll_s, on_poll=poll_down)
    except TimeoutError as err:
        log(f"[sim] {err}")
    up_t = tl.events.get("replicas_up")
    ok = [r for r in results if r["status"] == 200]
    failed = [r for r in results if r["status"] != 200]
    return {
        "events": dict(sorted(tl.events.items(), key=lambda kv: kv[1])),
        "samples": tl.samples,
        "requests": {"ok": len(ok), "failed": len(failed), "failures": failed[:10],
                     "served_after_scale_up": sum(1 for r in ok if up_t is not None and r["t"] >= up_t)},
        "peak": peak,
        "head_node_id": head,
        "scaled_up": "replicas_up" in tl.events and "nodes_up" in tl.events,
        "scaled_down": "nodes_down" in tl.events,
    }
