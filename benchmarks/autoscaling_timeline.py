#!/usr/bin/env python
"""Autoscaling on a simulated cluster: the scale-up / scale-down timeline of Serve and Train.

Starts the simulated cluster of ``serve_configs/sim_cluster.yaml`` (Ray's fake_multinode provider,
:mod:`bd_ray.testing.sim_cluster`: a head with room for one engine replica and simulated worker nodes
with one ``sim_gpu`` each), then

1. Serve: the bd-ray app on tiny random-weight models (``bd_ray.testing.tiny``), engine replicas asking
   for ``sim_gpu: 1`` + CPU + memory, autoscaled 1..``--max-replicas``; ``--clients`` concurrent
   clients on 127.0.0.1 until the extra replicas run on new nodes; then idle until replicas and
   nodes are released;
2. Train (unless ``--skip-train``): ``bd_ray.train.driver.run_ray`` on a tiny world with
   ``--train-workers`` workers asking for ``sim_gpu: 1`` each (DeepSpeed ZeRO-3 teacher sharded
   across them), so the autoscaler adds nodes before training starts;

prints the timeline and writes it as JSON (default ``results/autoscaling/timeline.json``).
``tests/test_cluster_configs.py`` runs the same functions and asserts on their results.

    OMP_NUM_THREADS=1 python benchmarks/autoscaling_timeline.py [--out PATH] [--skip-train]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]

from bd_ray.testing.load_timeline import Timeline, serve_load_timeline  # noqa: E402
from bd_ray.testing.sim_cluster import SimCluster, actor_nodes, head_node_id, wait_for, worker_nodes  # noqa: E402

SIM_CONFIG = REPO / "serve_configs" / "sim_cluster.yaml"
APP = "bd-sim"
MiB = 1 << 20
# Fast Serve autoscaling metrics (seconds) for every process of the cluster, and 1 torch thread.
CLUSTER_ENV = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # CPU is scarce here: no idle Ray workers started ahead of demand, autoscaler rounds every 2 s
    "RAY_prestart_worker_first_driver": "0",
    "RAY_enable_worker_prestart": "0",
    "AUTOSCALER_UPDATE_INTERVAL_S": "2",
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",   # see TRAIN_DRIVER_ENV
}
# The training driver's environment during run_train (restored after; Ray Train and Ray Data read
# these in the driver):
TRAIN_DRIVER_ENV = {
    # Ray Train (v2) waits 60 s for its placement group, then tears it down and retries; a node that
    # boots slowly (an overloaded machine here, minutes for a cloud node) should not cost a retry.
    "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300",
    # Ray Data 2.60's parquet reader starts 32 footer-reader actors (1 CPU each to schedule): 32
    # processes for one small file, and a pending demand the autoscaler adds nodes for.
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
}
PAYLOAD = {"model": "tiny", "prompt": "It is a truth universally acknowledged, that a single man",
           "max_tokens": 16, "temperature": 0}


def app_args(vdir: Path, ddir: Path, max_replicas: int) -> dict:
    """Serve app args (``ServeAppConfig``): engine replicas need ``sim_gpu: 1`` (the head has one)."""
    return {
        "model": {"name": "tiny", "verifier": str(vdir), "drafter": str(ddir), "device": "cpu",
                  "max_model_len": 256, "torch_threads": 1},
        "spec": {"gamma": 3, "budget": 48, "policy": {"name": "chunk_topk", "chunk_size": 8, "recent": 8}},
        "defaults": {"max_tokens": 16, "temperature": 0.0},
        # Batched replicas sized for a simulated node's half CPU and tiny models: 4 rows per forward
        # within 32 MiB of KV cache (a 256-token row of the tiny models takes well under 1 MiB), 8
        # ongoing per replica. target_ongoing_requests stays 1 so that a couple of clients already
        # force the scale-up this timeline is about (a real CPU node: about max_num_seqs / 2).
        "engine": {"num_cpus": 0.5, "memory": 256 * MiB, "resources": {"sim_gpu": 1},
                   "max_num_seqs": 4, "kv_cache_bytes": 32 * MiB,
                   "max_ongoing_requests": 8, "max_queued_requests": 16, "health_check_period_s": 2,
                   "graceful_shutdown_timeout_s": 5,
                   "autoscaling": {"min_replicas": 1, "max_replicas": max_replicas, "target_ongoing_requests": 1,
                                   "upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2,
                                   "metrics_interval_s": 0.5}},
        "ingress": {"num_cpus": 0.1, "memory": 64 * MiB, "retry_after_s": 1, "first_chunk_timeout_s": 60},
    }


def start_cluster(attempts: int = 2) -> SimCluster:
    """Start the simulated cluster and connect this driver to it (``cluster.stop()`` undoes both).

    A head that times out while the machine is overloaded is
    stopped and started again, up to ``attempts`` times; the last failure is raised.
    """
    import ray

    if ray.is_initialized():  # a session left by an earlier test in this process would block ray.init
        print("[sim] disconnecting an existing Ray session first")
        ray.shutdown()
    for attempt in range(1, attempts + 1):
        cluster = SimCluster(SIM_CONFIG, env=CLUSTER_ENV)
        try:
            cluster.start()
            ray.init(address=cluster.address, log_to_driver=False)
            return cluster
        except BaseException as err:
            cluster.stop()
            if attempt == attempts or not isinstance(err, RuntimeError):
                raise
            print(f"[sim] cluster start failed (attempt {attempt}/{attempts}), retrying: {str(err)[-300:]}")
    raise AssertionError("unreachable")


def run_serve(model_root: Path, clients: int = 4, max_replicas: int = 3, log=print) -> dict:
    """Deploy the app (HTTP on 127.0.0.1, proxy on the head only), load it, let it idle; the timeline.

    ``max_replicas - 1`` extra replicas need as many simulated worker nodes (one ``sim_gpu`` each).
    """
    from bd_ray.testing.serve import local_serve_app
    from bd_ray.testing.tiny import write_serve_models

    vdir, ddir = write_serve_models(model_root, drafter_layers=2)
    t0 = time.time()
    with local_serve_app(app_args(vdir, ddir, max_replicas), APP, proxy_location="HeadOnly") as url:
        log(f"[sim] app up in {time.time() - t0:.1f} s on {url}")
        out = serve_load_timeline(url, APP, PAYLOAD, clients=clients, min_replicas=1,
                                  max_replicas=max_replicas, expect_worker_nodes=max_replicas - 1, log=log)
    out["config"] = {"clients": clients, "max_replicas": max_replicas,
                     "engine": app_args(vdir, ddir, max_replicas)["engine"]}
    return out


def train_config(root: Path, num_workers: int = 2):
    """A tiny ``TrainJobConfig`` (data under ``root``): ``num_workers`` workers, each asking for 1 CPU,
    512 MiB and ``sim_gpu: 1``; DeepSpeed ZeRO-3 teacher sharded across them; 2 steps, no eval/export."""
    from bd_ray.config.train import TrainJobConfig

    return TrainJobConfig.model_validate({
        "models": {"verifier": str(root / "verifier"), "drafter_layers": 1},
        "data": {"source": str(root / "corpus.parquet"), "prefix_len": 96, "continuation_len": 16,
                 "tokenizer_num_cpus": 0.25},
        "loss": {"budgets": {32: 0.5, 48: 0.5}, "policy": {"chunk_size": 8, "recent": 8},
                 "logits_chunk": 8, "prefill_chunk": 32},
        "optim": {"lr": 3e-3, "warmup_steps": 1, "max_steps": 2},
        "deepspeed": {"zero_stage": 2, "teacher_shard": "zero3", "teacher_persistence_threshold": 0},
        "run": {"name": "sim", "output_dir": str(root / "runs"), "num_workers": num_workers,
                "cpus_per_worker": 1, "memory_per_worker": 512 * MiB, "resources_per_worker": {"sim_gpu": 1},
                "eval_every": 1000, "checkpoint_every": 1000, "log_every": 1000, "export": False,
                "check_teacher_dense": True},
    })


def run_train(root: Path, num_workers: int = 2, log=print) -> dict:
    """``run_ray`` with ``num_workers`` workers asking for ``sim_gpu: 1`` each; timeline + placement."""
    from bd_ray.testing.tiny import write_tiny_world

    from bd_ray.train.driver import run_ray

    cfg = train_config(root, num_workers)
    write_tiny_world(root, cfg.data.window_len)
    tl = Timeline()
    head = head_node_id()
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            n = worker_nodes()
            tl.sample(worker_nodes=len(n))
            if n:
                tl.mark("first_node_up")
            if len(n) >= num_workers - 1:
                tl.mark("nodes_up")
            time.sleep(0.5)

    wait_for(lambda: not worker_nodes(), 120, "no worker nodes before training")
    saved = {k: os.environ.get(k) for k in TRAIN_DRIVER_ENV}
    os.environ.update(TRAIN_DRIVER_ENV)
    tl.start()
    tl.mark("train_start")
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        summary = run_ray(cfg, log=log, eval_windows_override=[])
    finally:
        tl.mark("train_end")
        stop.set()
        th.join(timeout=5)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    workers = actor_nodes("RayTrainWorker")
    metrics = json.loads((Path(summary["out_dir"]) / "metrics.json").read_text())

    def down() -> bool:
        n = worker_nodes()
        tl.sample(worker_nodes=len(n))
        return not n

    try:
        wait_for(down, 120, "training nodes released")
        tl.mark("nodes_down")
    except TimeoutError as err:
        log(f"[sim] {err}")
    return {
        "events": dict(sorted(tl.events.items(), key=lambda kv: kv[1])),
        "samples": tl.samples,
        "head_node_id": head,
        "worker_nodes_of_train_workers": [w["node_id"] for w in workers],
        "finished": metrics.get("finished"), "step": metrics.get("step"), "world_size": metrics.get("world_size"),
        "teacher_param_fraction_local": metrics.get("teacher_param_fraction_local"),
        "teacher_dense_max_abs_diff": metrics.get("teacher_dense_max_abs_diff"),
        "config": {"num_workers": num_workers, "worker_resources": cfg.run.worker_resources()},
    }


def print_timeline(name: str, events: dict) -> None:
    """One line per event: seconds since the scenario started."""
    print(f"{name}:")
    for k, v in events.items():
        print(f"  {v:7.1f} s  {k}")


def main(argv=None) -> int:
    """Run the simulated-cluster scenarios, print the timelines, write the JSON; exit code 0."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "results" / "autoscaling" / "timeline.json"))
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-replicas", type=int, default=3)
    ap.add_argument("--train-workers", type=int, default=2)
    ap.add_argument("--skip-train", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.time()
    result: dict = {"cluster_config": str(SIM_CONFIG.relative_to(REPO)), "machine": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}}
    with tempfile.TemporaryDirectory(prefix="bd_autoscale_") as tmp:
        cluster = start_cluster()
        try:
            result["cluster_start_s"] = round(time.time() - t0, 1)
            result["serve"] = run_serve(Path(tmp) / "models", args.clients, args.max_replicas)
            print_timeline("serve", result["serve"]["events"])
            if not args.skip_train:
                result["train"] = run_train(Path(tmp) / "train", args.train_workers)
                print_timeline("train", result["train"]["events"])
        finally:
            cluster.stop()
    result["total_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=str))
    print(f"requests: {result['serve']['requests']['ok']} ok, {result['serve']['requests']['failed']} failed; "
          f"total {result['total_s']} s; wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
