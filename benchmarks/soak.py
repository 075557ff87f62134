#!/usr/bin/env python
"""Bounded soak of the bd-ray OpenAI server: mixed requests for N seconds, memory and cache checks.

Runs on this machine only (127.0.0.1). Either starts a private Ray cluster + Serve application
itself (default: ``serve_configs/default.yaml``, the embedded SmolLM2-135M verifier with a
4-layer self-drafter; ``--tiny``: random-weight tiny models, seconds to start), or soaks a server
that already runs here (``--url``).

    python benchmarks/soak.py                                   # 300 s, default config, 2 replicas
    python benchmarks/soak.py --tiny --duration 60
    python benchmarks/soak.py --url http://127.0.0.1:8000 --duration 600

The load: ``--concurrency`` clients in a loop, each request drawn (seeded) from a mix of
completions and chat, streaming and not, speculative (various gamma / KV budget / sparse policy)
and plain decoding, greedy and seeded sampling, stop strings, clients that disconnect mid-stream,
and invalid requests that must get a 4xx. Every ``--round`` seconds the load pauses until the
server is idle, and every engine replica is asked (``GET /debug/engine?deep=true``) for its
resident memory (RSS), its live requests and its live KV-cache objects (counted by a heap scan in
the replica, independently of its bookkeeping); during load, RSS and live requests are sampled
every ``--sample-every`` seconds.

Pass criteria (``checks`` in the output; exit code 1 when one fails): no 5xx, no timeout, no
transport error, no unexpected status; at every idle point zero live requests and zero live KV
caches on every replica; each replica's idle RSS at the end within ``--rss-tolerance-mib`` MiB
(or 10 %, whichever is larger) of its idle RSS after warm-up.

Output: ``results/soak/soak.json`` (``--out``): the settings, request counts per kind and
outcome, latency percentiles, the idle-point and in-load samples per replica, and the checks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PROMPTS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune",
    "In the beginning God created the heaven and the earth. And the earth was without form",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little money",
    "However little known the feelings or views of such a man may be on his first entering",
]

# kind -> weight of the mix
MIX = {
    "completion": 3, "completion_stream": 3, "chat": 2, "chat_stream": 2, "plain_decoding": 1,
    "sampled_seeded": 1, "stop_strings": 1, "disconnect": 1, "invalid": 2,
}


def make_request(rng: random.Random, kind: str, model: str, max_tokens: int,
                 max_prompt_chars: int = 1 << 30) -> tuple[str, dict | bytes]:
    """(route, JSON body or raw bytes) of one request of ``kind`` (see :data:`MIX`); the prompt is
    1-4 copies of a sentence (sparse caches get cut), at most ``max_prompt_chars`` characters
    (ASCII text: at least one character per token, so it fits a context of that many tokens)."""
    base = rng.choice(PROMPTS)
    reps = rng.randint(1, 4)
    while reps > 1 and len(base) * reps + reps - 1 > max_prompt_chars:
        reps -= 1
    prompt = " ".join([base] * reps)
    n = rng.randint(max(1, max_tokens // 4), max_tokens)
    spec = rng.choice([{}, {"gamma": rng.randint(1, 6)}, {"kv_budget": rng.choice([48, 64, "full"])},
                       {"gamma": 3, "kv_budget": 24, "sparse_policy": "streaming"},
                       {"gamma": 2, "kv_budget": 32, "sparse_policy": {"name": "snapkv", "window": 4, "sink": 2}}])
    body: dict[str, Any] = {"model": model, "max_tokens": n, "temperature": 0, **spec}
    if kind in ("chat", "chat_stream"):
        body.pop("model")
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], **{
            k: v for k, v in body.items() if k != "model"}}
        body["stream"] = kind == "chat_stream"
        return "/v1/chat/completions", body
    body["prompt"] = prompt
    if kind == "completion_stream" or kind == "disconnect":
        body["stream"] = True
    if kind == "plain_decoding":
        body = {"model": model, "prompt": prompt, "max_tokens": n, "speculative": False, "temperature": 0}
    elif kind == "sampled_seeded":
        body.update(temperature=0.8, top_p=0.95, seed=rng.randint(0, 1000))
    elif kind == "stop_strings":
        body.update(stop=[" the", ".", "\n"], temperature=0)
    elif kind == "invalid":
        bad = rng.choice([
            {**body, "temperature": -1}, {**body, "max_tokens": 0}, {**body, "gamma": 10_000},
            {**body, "prompt": ""}, {**body, "frobnicate": True}, {**body, "top_p": 7},
            b'{"prompt": "unterminated', b"\xff\xfe not utf-8",
        ])
        return "/v1/completions", bad
    return "/v1/completions", body


class Soak:
    """The load generator and the checks (see the module docstring)."""

    def __init__(self, url: str, duration_s: float, concurrency: int, round_s: float, warmup_s: float,
                 sample_every_s: float, max_tokens: int, model: str, seed: int, replicas: int | None,
                 rss_tolerance_mib: float, request_timeout_s: float = 120.0, log=print) -> None:
        self.url = url.rstrip("/")
        self.duration_s, self.concurrency, self.round_s = duration_s, concurrency, round_s
        self.warmup_s, self.sample_every_s, self.max_tokens = warmup_s, sample_every_s, max_tokens
        self.model, self.replicas, self.rss_tol = model, replicas, rss_tolerance_mib
        self.timeout = request_timeout_s
        self.max_prompt_chars = 1 << 30  # set from the server's max_model_len in run()
        self.rng = random.Random(seed)
        self.log = log
        self.counts: dict[str, dict[str, int]] = {}
        self.latency: dict[str, list[float]] = {}
        self.failures: list[dict] = []
        self.idle_points: list[dict] = []
        self.load_samples: list[dict] = []

    # ---- requests --------------------------------------------------------------------------
    def _count(self, kind: str, outcome: str) -> None:
        self.counts.setdefault(kind, {}).setdefault(outcome, 0)
        self.counts[kind][outcome] += 1

    async def _one(self, client, kind: str) -> None:
        import httpx

        route, body = make_request(self.rng, kind, self.model, self.max_tokens, self.max_prompt_chars)
        t0 = time.perf_counter()
        kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
            else {"json": body}
        try:
            if isinstance(body, dict) and body.get("stream"):
                async with client.stream("POST", self.url + route, timeout=self.timeout, **kw) as r:
                    if r.status_code != 200:
                        await r.aread()
                        return self._status(kind, r.status_code, r.text, t0)
                    events = 0
                    async for line in r.aiter_lines():
                        if not line:
                            continue
                        events += 1
                        if kind == "disconnect" and events >= 2:
                            break  # leave mid-stream: the server must free the request's caches
                        data = line.removeprefix("data: ")
                        if data != "[DONE]" and '"error"' in data[:12]:
                            self.failures.append({"kind": kind, "error_event": data[:300]})
                            return self._count(kind, "error_event")
                self.latency.setdefault(kind, []).append(time.perf_counter() - t0)
                return self._count(kind, "disconnected" if kind == "disconnect" else "ok")
            r = await client.post(self.url + route, timeout=self.timeout, **kw)
            return self._status(kind, r.status_code, r.text, t0)
        except httpx.TimeoutException:
            self.failures.append({"kind": kind, "error": "timeout", "after_s": time.perf_counter() - t0})
            self._count(kind, "timeout")
        except Exception as exc:  # noqa: BLE001 -- every transport failure is a soak failure
            self.failures.append({"kind": kind, "error": f"{type(exc).__name__}: {exc}"[:300]})
            self._count(kind, "transport_error")

    def _status(self, kind: str, status: int, text: str, t0: float) -> None:
        expected = (400 <= status < 500) if kind == "invalid" else status == 200
        if expected:
            self.latency.setdefault(kind, []).append(time.perf_counter() - t0)
            self._count(kind, "ok" if status == 200 else "rejected_4xx")
            return
        self.failures.append({"kind": kind, "status": status, "body": text[:300]})
        self._count(kind, f"http_{status}")

    async def _client_loop(self, client, stop_at: float) -> None:
        kinds, weights = list(MIX), list(MIX.values())
        while time.monotonic() < stop_at:
            await self._one(client, self.rng.choices(kinds, weights)[0])

    # ---- replica state ---------------------------------------------------------------------
    async def _engine_stats(self, client, deep: bool) -> dict[str, dict]:
        """Latest stats per replica id, asking until every expected replica answered (bounded)."""
        import httpx

        seen: dict[str, dict] = {}
        want = self.replicas or 1
        for _ in range(max(6, 6 * want)):
            try:
                r = await client.get(f"{self.url}/debug/engine", params={"deep": str(deep).lower()}, timeout=60)
                s = r.json()
                seen[s["replica_id"]] = s
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                self.failures.append({"kind": "stats", "error": f"{type(exc).__name__}: {exc}"[:200]})
            if len(seen) >= want and self.replicas is not None:
                break
        return seen

    async def _idle_point(self, client, label: str) -> dict:
        """Wait until no request is live, then a deep sample of every replica."""
        deadline = time.monotonic() + 60
        while True:
            stats = await self._engine_stats(client, deep=False)
            if all(s["live_requests"] == 0 for s in stats.values()) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)  # cancelled streams release their caches on the model thread
        stats = await self._engine_stats(client, deep=True)
        point = {"label": label, "t": time.monotonic() - self.t_start, "replicas": {
            rid: {"pid": s["pid"], "rss_mib": s["rss_bytes"] / 2**20, "live_requests": s["live_requests"],
                  "kv_caches": s["kv_caches"], "totals": s["totals"]} for rid, s in stats.items()}}
        self.idle_points.append(point)
        self.log(f"[soak] idle {label} t={point['t']:.0f}s " + "  ".join(
            f"{rid[-6:]}: rss {v['rss_mib']:.0f} MiB live {v['live_requests']} caches {v['kv_caches']}"
            for rid, v in point["replicas"].items()))
        return point

    async def _sampler(self, client, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            stats = await self._engine_stats(client, deep=False)
            self.load_samples.append({"t": time.monotonic() - self.t_start, "replicas": {
                rid: {"rss_mib": s["rss_bytes"] / 2**20, "live_requests": s["live_requests"]}
                for rid, s in stats.items()}})
            await asyncio.sleep(self.sample_every_s)

    async def _load(self, client, seconds: float) -> None:
        stop_at = time.monotonic() + seconds
        await asyncio.gather(self._sampler(client, stop_at),
                             *(self._client_loop(client, stop_at) for _ in range(self.concurrency)))

    async def run(self) -> dict:
        """Warm-up, then load rounds separated by idle points, until ``duration_s`` is used up."""
        import httpx

        self.t_start = time.monotonic()
        limits = httpx.Limits(max_connections=self.concurrency + 4)
        async with httpx.AsyncClient(limits=limits) as client:
            models = (await client.get(f"{self.url}/v1/models", timeout=60)).json()["data"]
            limit = models[0].get("max_model_len")
            if limit:  # room for max_tokens and a chat template's markup
                self.max_prompt_chars = max(1, int(limit) - self.max_tokens - 32)
            if self.replicas is None:  # discover the replicas of a server we did not start
                self.replicas = len(await self._engine_stats(client, deep=False)) or 1
            await self._load(client, self.warmup_s)
            await self._idle_point(client, "after warm-up")
            end = self.t_start + self.duration_s
            r = 0
            while time.monotonic() < end - 1:
                r += 1
                await self._load(client, min(self.round_s, end - time.monotonic()))
                await self._idle_point(client, f"round {r}")
        return self.report()

    # ---- verdict ---------------------------------------------------------------------------
    def report(self) -> dict:
        checks: dict[str, Any] = {}
        checks["no_failed_requests"] = not self.failures
        checks["idle_live_requests_zero"] = all(v["live_requests"] == 0 for p in self.idle_points
                                                for v in p["replicas"].values())
        checks["idle_kv_caches_zero"] = all(v["kv_caches"] == 0 for p in self.idle_points
                                            for v in p["replicas"].values())
        rss = {}
        first, last = self.idle_points[0]["replicas"], self.idle_points[-1]["replicas"]
        for rid in sorted(set(first) & set(last)):
            a, b = first[rid]["rss_mib"], last[rid]["rss_mib"]
            tol = max(self.rss_tol, 0.10 * a)
            rss[rid] = {"after_warmup_mib": round(a, 1), "end_mib": round(b, 1), "growth_mib": round(b - a, 1),
                        "tolerance_mib": round(tol, 1), "flat": b - a <= tol,
                        "idle_series_mib": [round(p["replicas"][rid]["rss_mib"], 1) for p in self.idle_points
                                            if rid in p["replicas"]]}
        checks["rss_flat"] = bool(rss) and all(v["flat"] for v in rss.values())
        checks["every_replica_sampled"] = len(last) >= (self.replicas or 1)
        total = sum(sum(c.values()) for c in self.counts.values())
        def pct(v: list[float], q: float) -> float:  # nearest-rank percentile
            return round(sorted(v)[min(len(v) - 1, max(0, math.ceil(q * len(v)) - 1))], 3)

        lat = {k: {"n": len(v), "p50_s": round(statistics.median(v), 3), "p95_s": pct(v, 0.95),
                   "max_s": round(max(v), 3)} for k, v in self.latency.items() if v}
        return {"url": self.url, "duration_s": round(time.monotonic() - self.t_start, 1),
                "settings": {"concurrency": self.concurrency, "round_s": self.round_s, "warmup_s": self.warmup_s,
                             "max_tokens": self.max_tokens, "replicas": self.replicas, "mix": MIX},
                "requests_total": total, "requests": self.counts, "latency": lat, "rss": rss,
                "failures": self.failures[:50], "idle_points": self.idle_points,
                "load_samples": self.load_samples, "checks": checks, "passed": all(checks.values())}


def run_soak(url: str, duration_s: float = 300.0, concurrency: int = 4, round_s: float = 60.0,
             warmup_s: float = 15.0, sample_every_s: float = 2.0, max_tokens: int = 48, model: str | None = None,
             seed: int = 0, replicas: int | None = None, rss_tolerance_mib: float = 64.0, log=print) -> dict:
    """Soak the server at ``url`` (must be on this machine) for about ``duration_s`` seconds.

    Args:
        url: server base URL, e.g. ``http://127.0.0.1:8000``.
        duration_s: total wall time (warm-up included), seconds.
        concurrency: clients sending requests back to back.
        round_s: seconds of load between two idle points (deep replica samples).
        warmup_s: seconds of load before the baseline idle point.
        sample_every_s: in-load sampling period of RSS / live requests, seconds.
        max_tokens: upper bound of each request's ``max_tokens``.
        model: the served model id (default: the first of ``GET /v1/models``).
        seed: seeds the request mix (the same seed sends the same sequence of request kinds).
        replicas: engine replicas expected (None = discovered by sampling).
        rss_tolerance_mib: allowed idle RSS growth per replica (or 10 %, the larger), MiB.

    Returns the report dict (``passed``, ``checks``, counts, samples); see the module docstring.
    """
    import httpx

    if model is None:
        model = httpx.get(url.rstrip("/") + "/v1/models", timeout=30).json()["data"][0]["id"]
    soak = Soak(url, duration_s, concurrency, round_s, warmup_s, sample_every_s, max_tokens, model, seed,
                replicas, rss_tolerance_mib, log=log)
    return asyncio.run(soak.run())


def _tiny_args(root: Path) -> dict:
    """Serve args for random-weight tiny models written under ``root`` (a 4-layer verifier, a drafter
    of its first 3 layers, a byte-level BPE tokenizer with a chat template)."""
    from bd_ray.testing.tiny import serve_app_args, write_serve_models

    vdir, ddir = write_serve_models(root)
    return serve_app_args(vdir, ddir)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="soak a server already running on this machine (no cluster is started)")
    ap.add_argument("--config", default=str(REPO / "serve_configs" / "default.yaml"),
                    help="Serve config whose first application is started (ignored with --url/--tiny)")
    ap.add_argument("--tiny", action="store_true", help="start the app on random-weight tiny models")
    ap.add_argument("--replicas", type=int, default=2, help="engine replicas when starting the app (fixed)")
    ap.add_argument("--duration", type=float, default=300.0, help="seconds (default 300)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--round", type=float, default=60.0, help="seconds of load between idle points")
    ap.add_argument("--warmup", type=float, default=15.0)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--rss-tolerance-mib", type=float, default=64.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "results" / "soak" / "soak.json"))
    args = ap.parse_args(argv)

    with contextlib.ExitStack() as stack:
        if args.url:
            url, replicas, source = args.url, None, args.url
        else:
            import tempfile

            import yaml

            from bd_ray.testing.serve import local_serve_app

            if args.tiny:
                app_args, source = _tiny_args(Path(tempfile.mkdtemp(prefix="bd_ray_soak_"))), "tiny random models"
            else:
                app_args = yaml.safe_load(Path(args.config).read_text())["applications"][0]["args"]
                source = args.config
            app_args.setdefault("engine", {})["autoscaling"] = {
                **app_args["engine"].get("autoscaling", {}), "min_replicas": args.replicas,
                "max_replicas": args.replicas, "initial_replicas": args.replicas}
            app_args["engine"]["num_cpus"] = min(float(app_args["engine"].get("num_cpus", 1)), 0.5)
            t0 = time.time()
            url = stack.enter_context(local_serve_app(app_args, "soak"))
            print(f"[soak] app up in {time.time() - t0:.0f}s ({source}), {args.replicas} engine replicas", flush=True)
            replicas = args.replicas
        report = run_soak(url, duration_s=args.duration, concurrency=args.concurrency, round_s=args.round,
                          warmup_s=args.warmup, max_tokens=args.max_tokens, seed=args.seed, replicas=replicas,
                          rss_tolerance_mib=args.rss_tolerance_mib)
    report["server"] = source
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"[soak] {report['requests_total']} requests in {report['duration_s']} s; checks {report['checks']}; "
          f"wrote {out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
