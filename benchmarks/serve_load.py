"""Load benchmark of the bd-ray OpenAI server (127.0.0.1 only): continuous batching and speculation.

Cells: for each server *build variant* (``batched``: the config's ``max_num_seqs``; ``unbatched``:
``max_num_seqs: 1``, one request decoded at a time, the old behaviour) on the same code, each
concurrency C in ``--concurrency`` (default 1 4 8 16) and speculation off / on (the batch policy:
no request ``gamma``), C closed-loop clients each send ``--requests-per-client`` streaming greedy
``/v1/completions`` requests of held-out prompts (``--prompt-tokens``, default 2048 tokens of the
corpus's test split, :func:`bd_ray.evaluate.prompts.select_prompts`) for ``--max-tokens`` (128)
tokens. ``--repeats R`` runs each concurrency's off / on pair R times in ABBA order (off, on; on,
off; off, on; ...) so a drift over the run weighs both alike; each cell keeps its ``repeat``.

Reported per cell (like vLLM's ``benchmark_serving``): aggregate output tokens/s over the cell's
wall time (end to end, prefills included) and of decoding (tokens after each request's first over
the time any request was decoding: :func:`_decode_rate`), p50/p99 TTFT and TPOT, mean α / τ, and
what the batch policy chose (``spec_metrics.mode`` counts and reasons). From the server's
``/debug/engine`` (read before and after each cell: :func:`engine_cell`): the engine's own decode
throughput over the cell (``engine_decode_tokens_per_s``: tokens of decode steps per second of
decode steps, all rows summed, prefill excluded) and the batch policy's per-bucket table with the
cell's share of each bucket (:func:`bucket_delta`: steps by γ, ``mean_rows`` per step and
``decode_tokens_per_s`` at that batch size, plain-step and per-γ costs, judgement and reason,
drafter prefills skipped).

Summary, per variant: spec on/off ratios per concurrency (end-to-end and engine decode tokens/s)
as the mean [min, max] over the R pairs; the AR scaling (speculation off, largest C / smallest C
of the means over repeats); and a second reading of the issue's "AR decode throughput at 16
clients >= 4x 1 client": engine decode tokens/s at the largest batch-size bucket with >= 20 steps
over bucket 1's (speculation-off cells, buckets summed over concurrencies and repeats).

``--late-joiner``: 8 streams decode, a ``--late-long``-token prompt (4096) arrives, and a
``--late-short``-token prompt (100) arrives during its prefill. Reported: the short and long
requests' TTFT; the 8 streams' inter-chunk gaps (p50 of all, p50 and p99 of those during the long
prefill, p99 during / p50 all and p99 during / p50 during: the issue's target <= 2); from the
engine's prefill counters over the scenario, ``prefill_s_per_token`` (both models' pieces),
``prefill_tokens_per_step``, ``chunk_s`` (``spec.prefill_chunk`` tokens at that rate; ``--url``
mode: ``--prefill-chunk``, 512) and ``short_ttft_over_chunk`` (the issue's target <= 2).
``--late-repeats K`` runs it K times a few seconds apart (streams restarted) and reports each run
and the median of each figure.

``--elastic``: the elastic draft budget (``engine.elastic_budget``) off and on, each on its own
server with a tight ``--elastic-kv-bytes`` (for the tiny models by default: ``--elastic-rows``
rows of the prompts at the full drafter budget plus one prefill): a burst of ``--elastic-burst``
requests, reporting the most rows decoded at once (admitted requests), rows whose budget was
lowered, the budgets requests ran at (``spec_metrics.kv_budget``), mean acceptance α and tokens/s.

``--smoke``: the tiny random models, short prompts, C in {1, 4}, both variants, the late joiner
scaled down: checks the harness end to end in a few minutes. Examples::

    python benchmarks/serve_load.py --smoke
    python benchmarks/serve_load.py --smoke --repeats 2 --elastic
    python benchmarks/serve_load.py --start default --repeats 2 --late-joiner --late-repeats 3 \\
        --out results/serving/serve_load.json

Raises ``SystemExit`` for a URL that is not on 127.0.0.1/localhost.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
BUCKET_KEYS = ("rows", "decode_tokens", "decode_s")   # raw sums of a policy bucket, deltas per cell
PREFILL_KEYS = ("prefill_s", "prefill_tokens", "prefill_steps")   # engine counters, late joiner
MIN_BUCKET_STEPS = 20   # the largest batch-size bucket the summary compares with bucket 1 needs this many steps
LATE_PAUSE_S = 3.0   # idle seconds between late-joiner runs (the previous run's rows drain)


def pct(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0..100, nearest rank) of ``xs``; ``None`` when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


async def one_request(client, url: str, body: dict) -> dict:
    """Send one streaming completion; returns timings (s), token count, status, spec metrics."""
    t0 = time.perf_counter()
    first = last = None
    usage, spec, status = None, None, 0
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as resp:
            status = resp.status_code
            if status != 200:
                await resp.aread()
                return {"status": status, "t0": t0, "t_end": time.perf_counter()}
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    return {"status": 500, "t0": t0, "t_end": time.perf_counter()}
                now = time.perf_counter()
                if obj["choices"] and obj["choices"][0].get("text"):
                    first = first or now
                    last = now
                if obj.get("usage"):
                    usage, spec = obj["usage"], obj.get("spec_metrics")
    except Exception as exc:  # noqa: BLE001 -- counted as a failed request
        return {"status": -1, "error": repr(exc), "t0": t0, "t_end": time.perf_counter()}
    n = usage["completion_tokens"] if usage else 0
    return {"status": status, "t0": t0, "t_end": time.perf_counter(), "ttft": (first - t0) if first else None,
            "tpot": ((last - first) / (n - 1)) if first and n > 1 else None, "tokens": n, "spec": spec}


async def engine_stats(client, url: str) -> dict | None:
    """The engine counters of one replica (``/debug/engine``'s ``engine``), ``None`` if unreadable."""
    try:
        resp = await client.get(url + "/debug/engine", timeout=30)
        return resp.json().get("engine") if resp.status_code == 200 else None
    except Exception:  # noqa: BLE001 -- a cell's figures do not depend on it
        return None


def _rate(num: float | None, den: float | None) -> float | None:
    """``num / den``; ``None`` when either is missing or ``den`` is not positive."""
    return num / den if num is not None and den is not None and den > 0 else None


def engine_delta(before: dict | None, after: dict | None, keys) -> dict:
    """``after[k] - before[k]`` for each of ``keys`` between two reads of ``/debug/engine`` (its
    ``engine`` dicts, or the same sub-dict of both: a policy bucket, its steps by γ). A key
    ``before`` lacks counts from 0 (a bucket first used in between); one ``after`` lacks (an engine
    without that counter) or an unreadable read gives ``None``."""
    if before is None or after is None:
        return {k: None for k in keys}
    return {k: after[k] - before.get(k, 0) if k in after else None for k in keys}


def bucket_delta(old: dict, row: dict) -> dict:
    """One policy bucket's share of a cell: ``row`` (the later read) with ``steps`` (by γ, nonzero
    only), ``rows``, ``decode_tokens`` and ``decode_s`` counted since ``old`` (the earlier read,
    ``{}`` for a new bucket), plus ``mean_rows`` (rows per step) and ``decode_tokens_per_s``."""
    steps = {g: n for g, n in engine_delta(old.get("steps", {}), row["steps"], row["steps"]).items() if n}
    d = engine_delta(old, row, BUCKET_KEYS)
    return {**row, "steps": steps, **d, "mean_rows": _rate(d["rows"], sum(steps.values())),
            "decode_tokens_per_s": _rate(d["decode_tokens"], d["decode_s"])}


def engine_cell(before: dict | None, after: dict | None) -> dict:
    """The cell's share of the engine counters: decode throughput (tokens of decode steps /
    seconds of decode steps between the two reads), decode and prefill seconds, and the policy
    table as of ``after`` with each bucket's counters taken within the cell (:func:`bucket_delta`;
    buckets with no step and no skipped drafter prefill in the cell are left out)."""
    d = engine_delta(before, after, ("decode_tokens", "decode_s", "prefill_s"))
    if d["decode_s"] is None:
        return {"engine_decode_tokens_per_s": None, "engine_decode_s": None, "engine_prefill_s": None,
                "policy": None}
    old, policy = before.get("policy", {}), {}
    for bucket, row in after.get("policy", {}).items():
        cell = bucket_delta(old.get(bucket, {}), row)
        if cell["steps"] or row["drafter_prefills_skipped"] != old.get(bucket, {}).get("drafter_prefills_skipped", 0):
            policy[bucket] = cell
    return {"engine_decode_tokens_per_s": _rate(d["decode_tokens"], d["decode_s"]), "engine_decode_s": d["decode_s"],
            "engine_prefill_s": d["prefill_s"], "policy": policy}


def _decode_rate(ok: list[dict]) -> float | None:
    """Tokens after each request's first over the time any request was decoding (the union of
    their [first token, end] intervals): decode throughput, prefill-only stretches excluded."""
    spans = sorted((r["t0"] + r["ttft"], r["t_end"]) for r in ok if r.get("ttft") is not None)
    busy, end = 0.0, float("-inf")
    for a, b in spans:
        busy += max(0.0, b - max(a, end))
        end = max(end, b)
    tokens = sum(r["tokens"] - 1 for r in ok if r.get("ttft") is not None)
    return tokens / busy if busy > 0 else None


async def run_cell(url: str, concurrency: int, speculative: bool, prompts: list[list[int]], args) -> dict:
    """One cell: ``concurrency`` closed-loop clients over ``prompts`` (token ids, round robin)."""
    import httpx

    deadline = time.perf_counter() + args.max_cell_s
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    counter = iter(range(1 << 30))
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as client:
        async def worker():
            for _ in range(args.requests_per_client):
                if time.perf_counter() > deadline:
                    return
                body = {"prompt": prompts[next(counter) % len(prompts)], "max_tokens": args.max_tokens,
                        "temperature": 0, "stream": True, "speculative": speculative, "ignore_eos": True}
                results.append(await one_request(client, url, body))

        before = await engine_stats(client, url)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        engine = engine_cell(before, await engine_stats(client, url))
    ok = [r for r in results if r["status"] == 200 and r.get("tokens")]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tpot = [r["tpot"] for r in ok if r.get("tpot") is not None]
    specs = [r["spec"] for r in ok if r.get("spec")]
    drafted = [s for s in specs if s.get("drafted")]
    modes: dict[str, int] = {}
    budgets: dict[str, int] = {}
    for s in specs:
        modes[s.get("mode", "?")] = modes.get(s.get("mode", "?"), 0) + 1
        budgets[str(s.get("kv_budget"))] = budgets.get(str(s.get("kv_budget")), 0) + 1
    return {
        "concurrency": concurrency, "speculative": speculative, "requests": len(results), "ok": len(ok),
        "rejected_503": sum(r["status"] == 503 for r in results), "wall_s": wall,
        "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "decode_tokens_per_s": _decode_rate(ok),
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
        "alpha_mean": statistics.fmean(s["alpha"] for s in drafted) if drafted else None,
        "tau_mean": statistics.fmean(s["tau"] for s in drafted) if drafted else None,
        "modes": modes, "kv_budgets": budgets, "mode_reasons": sorted({s.get("mode_reason") or "" for s in specs} - {""})[:3],
        **engine,
    }


async def _chunk_times(client, url: str, body: dict, out: dict) -> None:
    """Stream one request, recording the arrival time of every text chunk in ``out["times"]``."""
    out["t0"], out["times"] = time.perf_counter(), []
    async with client.stream("POST", url + "/v1/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                obj = json.loads(line[6:])
                if obj.get("choices") and obj["choices"][0].get("text"):
                    out["times"].append(time.perf_counter())


async def _late_streams(c, url: str, streams: list[list[int]], long: list[int], short: list[int], args):
    """Run the scenario once on client ``c``; returns the streams' chunk times and the long and
    short requests' (``{"t0", "times"}`` each, :func:`_chunk_times`)."""
    base = {"temperature": 0, "stream": True, "ignore_eos": True}
    outs = [{} for _ in streams]
    tasks = [asyncio.create_task(_chunk_times(c, url, {**base, "prompt": p, "max_tokens": args.late_stream_tokens}, o))
             for p, o in zip(streams, outs)]
    while not all(len(o.get("times", [])) >= 2 for o in outs):
        await asyncio.sleep(0.01)
    lo, sh = {}, {}
    t_long = asyncio.create_task(_chunk_times(c, url, {**base, "prompt": long, "max_tokens": 4}, lo))
    await asyncio.sleep(args.late_short_delay_s)
    t_short = asyncio.create_task(_chunk_times(c, url, {**base, "prompt": short, "max_tokens": 4}, sh))
    await asyncio.gather(t_long, t_short, *tasks)
    return outs, lo, sh


def _gap_figures(outs: list[dict], lo: dict, sh: dict) -> dict:
    """TTFTs of the long and short requests and the streams' inter-chunk gaps: all of them, and
    those ending during the long prefill (from the long request's arrival to its first token)."""
    start, end = lo["t0"], lo["times"][0] if lo["times"] else lo["t0"]
    gaps_during, gaps_all = [], []
    for o in outs:
        ts = o["times"]
        for a, b in zip(ts, ts[1:]):
            gaps_all.append(b - a)
            if start <= b <= end:
                gaps_during.append(b - a)
    p99_during = pct(gaps_during, 99)
    return {"long_ttft_s": end - start, "short_ttft_s": (sh["times"][0] - sh["t0"]) if sh["times"] else None,
            "stream_gap_p50_s": pct(gaps_all, 50), "stream_gap_during_prefill_p50_s": pct(gaps_during, 50),
            "stream_gap_during_prefill_p99_s": p99_during,
            "gap_p99_during_over_p50_all": _rate(p99_during, pct(gaps_all, 50)),
            "gap_p99_during_over_p50_during": _rate(p99_during, pct(gaps_during, 50)),
            "gaps_during_prefill": len(gaps_during)}


def _prefill_figures(d: dict, prefill_chunk: int) -> dict:
    """From the engine's prefill counters over the run (``d``: :data:`PREFILL_KEYS` deltas):
    seconds per prefilled token (both models' pieces), tokens per prefill step and the time of one
    ``prefill_chunk``-token chunk at that rate (``None`` where the engine lacks the counters)."""
    per_token = _rate(d["prefill_s"], d["prefill_tokens"])
    return {"prefill_s_per_token": per_token, "prefill_tokens_per_step": _rate(d["prefill_tokens"], d["prefill_steps"]),
            "prefill_chunk": prefill_chunk, "chunk_s": None if per_token is None else prefill_chunk * per_token}


async def late_joiner(url: str, streams: list[list[int]], long: list[int], short: list[int], prefill_chunk: int,
                      args) -> dict:
    """8 streams decode; ``long`` arrives; ``short`` arrives during its prefill (module docstring).
    The engine is read before and after: its prefill rate gives ``chunk_s``, the unit of the
    short request's TTFT (``short_ttft_over_chunk``)."""
    import httpx

    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=httpx.Limits(max_connections=16)) as c:
        before = await engine_stats(c, url)
        gaps = _gap_figures(*await _late_streams(c, url, streams, long, short, args))
        prefill = _prefill_figures(engine_delta(before, await engine_stats(c, url), PREFILL_KEYS), prefill_chunk)
    return {**gaps, **prefill, "short_ttft_over_chunk": _rate(gaps["short_ttft_s"], prefill["chunk_s"])}


def late_joiner_runs(url: str, variant: str, prompts: list[list[int]], kind: str, prefill_chunk: int, args) -> dict:
    """``--late-repeats`` runs of :func:`late_joiner` (:data:`LATE_PAUSE_S` apart, streams
    restarted each time): ``{"runs": [...], "median": {figure: median over runs}}``."""
    long = held_out_prompts(kind, args.late_long, 1, seed=1)[0]
    short = held_out_prompts(kind, args.late_short, 1, seed=2)[0]
    streams = (prompts * 8)[:8]
    runs = []
    for k in range(args.late_repeats):
        if k:
            time.sleep(LATE_PAUSE_S)
        runs.append(asyncio.run(late_joiner(url, streams, long, short, prefill_chunk, args)))
        print(json.dumps({"variant": variant, "late_joiner": runs[-1], "repeat": k}), flush=True)
    median = {key: statistics.median(xs) for key in runs[0]
              if (xs := [r[key] for r in runs if r[key] is not None])}
    return {"runs": runs, "median": median}


def elastic_kv_bytes(app: dict, prompt_tokens: int, args) -> int:
    """A tight ``kv_cache_bytes``: ``--elastic-kv-bytes`` when given, else (tiny models, whose
    directories hold their configs) ``--elastic-rows`` rows of ``prompt_tokens``-token prompts at
    the full drafter budget + one prefill (the engine's rule, :mod:`bd_ray.speculative.admission`)."""
    from bd_ray.config.resources import parse_memory_bytes

    if args.elastic_kv_bytes is not None:
        return parse_memory_bytes(args.elastic_kv_bytes)
    if not Path(app["model"]["verifier"]).is_dir():
        raise SystemExit("--elastic with these models needs --elastic-kv-bytes (e.g. 640MiB)")
    from transformers import AutoConfig

    def bpt(path: str) -> int:
        c = AutoConfig.from_pretrained(path)
        kvh = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return 2 * c.num_hidden_layers * kvh * (c.hidden_size // c.num_attention_heads) * 4   # fp32

    v, d = bpt(app["model"]["verifier"]), bpt(app["model"]["drafter"])
    gamma = app.get("speculation", {}).get("max_gamma", 16)   # a row's γ cap: the engine's
    entries = prompt_tokens + args.max_tokens + gamma + 2
    return args.elastic_rows * entries * (v + d) + prompt_tokens * (v + d)


def elastic_scenario(kind: str, prompts: list[list[int]], args) -> dict:
    """Elastic draft budget off vs on under the same tight KV memory (module docstring)."""
    import httpx

    from bd_ray.testing.serve import local_serve_app

    out: dict = {}
    burst = argparse.Namespace(**{**vars(args), "requests_per_client": 1})
    prompts = (prompts * args.elastic_burst)[: args.elastic_burst]
    for on in (False, True):
        app = server_args(kind, None)
        app["engine"]["kv_cache_bytes"] = limit = elastic_kv_bytes(app, args.prompt_tokens, args)
        app["engine"]["elastic_budget"] = {"enabled": on, "floor": args.elastic_floor}
        with local_serve_app(app, "bench") as url:
            cell = asyncio.run(run_cell(url, args.elastic_burst, True, prompts, burst))
            engine = httpx.get(url + "/debug/engine", timeout=30).json()["engine"]
        out["on" if on else "off"] = {
            "kv_cache_bytes": limit, "admitted_at_once": engine["max_rows"],
            "elastic_lowered": engine.get("elastic_lowered"), "kv_budgets": cell["kv_budgets"],
            "alpha_mean": cell["alpha_mean"], "tau_mean": cell["tau_mean"], "ok": cell["ok"],
            "output_tokens_per_s": cell["output_tokens_per_s"], "ttft_p50_s": cell["ttft_p50_s"]}
        print(json.dumps({"elastic": on, **out["on" if on else "off"]}), flush=True)
    return out


def server_args(kind: str, max_num_seqs: int | None) -> dict:
    """Serve app args (``ServeAppConfig`` tree): the tiny models (written to a temp dir) or
    ``serve_configs/default.yaml``, one replica, ``max_num_seqs`` rows per step (``None``: the config's)."""
    import yaml

    if kind == "tiny":
        from bd_ray.testing.tiny import tiny_llama, tiny_tokenizer

        from bd_ray.models import init_drafter_from_verifier

        root = Path(tempfile.mkdtemp(prefix="bd_ray_bench_"))
        tok = tiny_tokenizer()
        import torch

        verifier = tiny_llama(layers=8, seed=0, max_positions=2048, hidden=128)
        # Damp layers 2..7's residual writes so the 2-layer drafter agrees with the verifier often
        # (random weights otherwise give alpha ~ 0): the verifier still pays for 8 layers.
        with torch.no_grad():
            for layer in verifier.model.layers[2:]:
                layer.self_attn.o_proj.weight.mul_(0.02)
                layer.mlp.down_proj.weight.mul_(0.02)
        drafter = init_drafter_from_verifier(verifier, 2)
        for m, d in ((verifier, root / "v"), (drafter, root / "d")):
            m.save_pretrained(d)
            tok.save_pretrained(d)
        args = {"model": {"name": "tiny", "verifier": str(root / "v"), "drafter": str(root / "d"), "device": "cpu"},
                "spec": {"gamma": 4, "budget": "full"},  # random tiny attention is diffuse: sparse views kill alpha
                "engine": {"num_cpus": 1, "max_num_seqs": 16, "max_ongoing_requests": 32, "max_queued_requests": 64,
                           "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
                "ingress": {"num_cpus": 0}}
    else:
        cfg = yaml.safe_load((REPO / "serve_configs" / "default.yaml").read_text())
        args = cfg["applications"][0]["args"]
        args["engine"]["autoscaling"].update({"min_replicas": 1, "max_replicas": 1})
    if max_num_seqs is not None:
        args["engine"]["max_num_seqs"] = max_num_seqs
    return args


def held_out_prompts(kind: str, tokens: int, n: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``tokens`` token ids: held-out corpus text (the test split) for the default
    models, random ids of the tiny vocabulary for ``tiny``."""
    if kind == "tiny":
        import random

        rng = random.Random(f"{seed}:{tokens}")
        return [[rng.randrange(1, 320) for _ in range(tokens)] for _ in range(n)]
    from bd_ray import models
    from bd_ray.config.evaluate import EvalJobConfig
    from bd_ray.evaluate.prompts import corpus_table, select_prompts

    cfg = EvalJobConfig()
    tok = models.load_tokenizer("smollm2-135m")
    return [p.token_ids for p in select_prompts(corpus_table(cfg), tok, [tokens], n, seed)[tokens]]


def concurrency_cells(url: str, variant: str, prompts: list[list[int]], args) -> list[dict]:
    """For each concurrency, ``--repeats`` pairs of speculation off / on cells in ABBA order
    (off, on; on, off; ...: a drift over time weighs both equally); each cell keeps its ``repeat``."""
    cells = []
    for c in args.concurrency:
        for r in range(args.repeats):
            for spec in ((False, True) if r % 2 == 0 else (True, False)):
                cell = {"repeat": r, **asyncio.run(run_cell(url, c, spec, prompts, args))}
                cells.append(cell)
                print(json.dumps({"variant": variant, **cell}), flush=True)
    return cells


def run_variant(variant: str, kind: str, prompts: list[list[int]], args) -> dict:
    """One server build variant (started here, or ``--url``'s ``given``): warm-up, the cells and
    (batched servers) the late joiner; returns ``{"cells", ["late_joiner"]}``."""
    with contextlib.ExitStack() as stack:
        if args.start:
            from bd_ray.config.serve import load_serve_config
            from bd_ray.testing.serve import local_serve_app

            t = time.perf_counter()
            app = server_args(kind, 1 if variant == "unbatched" else None)
            prefill_chunk = load_serve_config(app).spec.prefill_chunk
            url = stack.enter_context(local_serve_app(app, "bench"))
            print(f"[{variant}] server up in {time.perf_counter() - t:.1f} s", flush=True)
        else:
            url, prefill_chunk = args.url.rstrip("/"), args.prefill_chunk
            if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
                raise SystemExit(f"refusing to send load to {url}: only 127.0.0.1 is allowed")
        warm = argparse.Namespace(**{**vars(args), "requests_per_client": 1, "max_tokens": 4})
        asyncio.run(run_cell(url, 1, True, prompts[:1], warm))
        entry: dict = {"cells": concurrency_cells(url, variant, prompts, args)}
        if args.late_joiner and variant != "unbatched":
            entry["late_joiner"] = late_joiner_runs(url, variant, prompts, kind, prefill_chunk, args)
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="running server, http://127.0.0.1:PORT (one variant: 'given')")
    ap.add_argument("--start", choices=["tiny", "default"], default=None, help="start a server per variant here")
    ap.add_argument("--smoke", action="store_true", help="tiny models, short everything (< 2 min)")
    ap.add_argument("--variants", nargs="*", default=["batched", "unbatched"], choices=["batched", "unbatched"],
                    help="server build variants to run (none: only the --elastic comparison)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--repeats", type=int, default=1, help="speculation off/on pairs per concurrency (ABBA order)")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--late-joiner", action="store_true", help="also run the late-joiner scenario")
    ap.add_argument("--late-repeats", type=int, default=1, help="late-joiner runs (the summary gives their medians)")
    ap.add_argument("--late-long", type=int, default=4096)
    ap.add_argument("--late-short", type=int, default=100)
    ap.add_argument("--late-stream-tokens", type=int, default=256)
    ap.add_argument("--late-short-delay-s", type=float, default=0.5, help="short prompt this long after the long one")
    ap.add_argument("--prefill-chunk", type=int, default=512,
                    help="--url only: the server's spec.prefill_chunk (started servers: read from their config)")
    ap.add_argument("--max-cell-s", type=float, default=600.0, help="stop starting requests after this (s)")
    ap.add_argument("--request-timeout-s", type=float, default=900.0)
    ap.add_argument("--elastic", action="store_true", help="also compare the elastic draft budget off/on")
    ap.add_argument("--elastic-kv-bytes", default=None, help="kv_cache_bytes of the elastic runs (e.g. 640MiB); "
                    "default (tiny models only): --elastic-rows rows at the full budget")
    ap.add_argument("--elastic-rows", type=int, default=4)
    ap.add_argument("--elastic-burst", type=int, default=16, help="concurrent requests of the elastic runs")
    ap.add_argument("--elastic-floor", type=int, default=48, help="engine.elastic_budget.floor (tokens)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.start, args.concurrency, args.requests_per_client = "tiny", [1, 4], 1
        args.max_tokens, args.prompt_tokens = 16, 128
        args.late_long, args.late_short, args.late_stream_tokens, args.late_short_delay_s = 1536, 32, 48, 0.05
        args.late_joiner = True
    if (args.url is None) == (args.start is None):
        ap.error("give exactly one of --url, --start or --smoke")
    if args.repeats < 1 or args.late_repeats < 1:
        ap.error("--repeats and --late-repeats must be >= 1")
    kind = args.start or "default"
    prompts = held_out_prompts(kind, args.prompt_tokens, max(args.concurrency) * args.requests_per_client)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "variants": {}}
    for variant in (args.variants if args.start else ["given"]):
        report["variants"][variant] = run_variant(variant, kind, prompts, args)
    if args.elastic:
        if not args.start:
            ap.error("--elastic starts its own servers: use --start or --smoke")
        report["elastic"] = elastic_scenario(kind, prompts, args)
    print_table(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def _mean(xs) -> float | None:
    """Mean of the non-``None`` values of ``xs``; ``None`` when there are none."""
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _spread(xs: list[float]) -> str:
    """``mean [min, max]`` of ``xs`` (one value: itself; none: ``-``)."""
    if len(xs) < 2:
        return _fmt(xs[0] if xs else None, ".2f")
    return f"{statistics.fmean(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"


def _bucket_top(label: str) -> int:
    """The largest batch size of a bucket label (``"1"``, ``"3-4"``, ``"9-16"``)."""
    return int(label.split("-")[-1])


def bucket_throughput(cells: list[dict]) -> dict[str, dict]:
    """The cells' policy buckets summed: label -> ``steps``, ``rows``, ``decode_tokens``,
    ``decode_s`` and ``decode_tokens_per_s`` (engine decode throughput at that batch size)."""
    out: dict[str, dict] = {}
    for x in cells:
        for label, row in (x.get("policy") or {}).items():
            acc = out.setdefault(label, {"steps": 0, **{k: 0 for k in BUCKET_KEYS}})
            acc["steps"] += sum(row["steps"].values())
            for k in BUCKET_KEYS:
                acc[k] += row.get(k) or 0
    for acc in out.values():
        acc["decode_tokens_per_s"] = _rate(acc["decode_tokens"], acc["decode_s"])
    return out


def _print_cells(variant: str, cells: list[dict]) -> None:
    """One line per cell, then its policy buckets (steps by γ, mean rows, decode tok/s, costs)."""
    ms = lambda x: f"{1000 * x:.0f}" if x is not None else "-"  # noqa: E731
    for x in cells:
        print(f"{variant:>9} {x['concurrency']:>2} {x['repeat']:>2} {'on' if x['speculative'] else 'off':>4} "
              f"{x['ok']:>3} {x['output_tokens_per_s']:>7.1f} {_fmt(x['decode_tokens_per_s']):>9} "
              f"{_fmt(x.get('engine_decode_tokens_per_s')):>7} "
              f"{ms(x['ttft_p50_s']) + '/' + ms(x['ttft_p99_s']):>17} "
              f"{ms(x['tpot_p50_s']) + '/' + ms(x['tpot_p99_s']):>17} {_fmt(x['tau_mean'], '.2f'):>4}  {x['modes']}")
        for bucket, row in (x.get("policy") or {}).items():
            print(f"{'':>13} policy {bucket:>5} rows: steps by γ {row['steps']}, mean rows "
                  f"{_fmt(row.get('mean_rows'))}, {_fmt(row.get('decode_tokens_per_s'))} dec tok/s, "
                  f"T0 {row['t0_ms']} ms, c {row['c_ms']} ms ({row['c_source']}), {row['judgement']}, "
                  f"{row['drafter_prefills_skipped']} drafter prefills skipped; {row['last_reason']}")


def _print_spec_ratios(variant: str, cells: list[dict]) -> None:
    """Per concurrency: spec on/off ratios of each repeat's pair, as mean [min, max]."""
    by = {(x["concurrency"], x["repeat"], x["speculative"]): x for x in cells}
    for c in sorted({x["concurrency"] for x in cells}):
        pairs = [(by[(c, r, True)], by[(c, r, False)]) for r in sorted({x["repeat"] for x in cells})
                 if (c, r, True) in by and (c, r, False) in by]
        ratios = {m: [v for on, off in pairs if (v := _rate(on.get(m), off.get(m))) is not None]
                  for m in ("output_tokens_per_s", "engine_decode_tokens_per_s")}
        print(f"{variant} C={c}: spec on/off tok/s = {_spread(ratios['output_tokens_per_s'])} end to end, "
              f"engine decode {_spread(ratios['engine_decode_tokens_per_s'])} ({len(pairs)} pairs)")


def _print_ar_scaling(variant: str, cells: list[dict]) -> None:
    """Speculation off: largest C / smallest C of the means over repeats, and engine decode tok/s
    at the largest bucket with >= :data:`MIN_BUCKET_STEPS` steps / bucket 1 (buckets summed)."""
    off = [x for x in cells if not x["speculative"]]
    cs = sorted({x["concurrency"] for x in off})
    if len(cs) > 1:
        def r(m: str) -> str:
            means = [_mean(x.get(m) for x in off if x["concurrency"] == c) for c in (cs[-1], cs[0])]
            return _fmt(_rate(*means), ".2f")

        print(f"{variant}: AR tok/s C={cs[-1]} / C={cs[0]} (means over repeats) = {r('output_tokens_per_s')} end "
              f"to end, engine decode {r('engine_decode_tokens_per_s')} "
              f"(client-side decode {r('decode_tokens_per_s')})")
    buckets = bucket_throughput(off)
    big = [b for b, v in buckets.items() if b != "1" and v["steps"] >= MIN_BUCKET_STEPS]
    if "1" in buckets and big:
        top = max(big, key=_bucket_top)
        hi, lo = buckets[top], buckets["1"]
        print(f"{variant}: AR engine decode tok/s, bucket {top} ({hi['steps']} steps, mean rows "
              f"{_fmt(_rate(hi['rows'], hi['steps']))}) / bucket 1 ({lo['steps']} steps) = "
              f"{_fmt(hi['decode_tokens_per_s'])} / {_fmt(lo['decode_tokens_per_s'])} = "
              f"{_fmt(_rate(hi['decode_tokens_per_s'], lo['decode_tokens_per_s']), '.2f')}")
    else:
        print(f"{variant}: AR engine decode by bucket: no bucket 1 or no larger bucket with >= {MIN_BUCKET_STEPS} "
              f"steps ({ {b: v['steps'] for b, v in buckets.items()} })")


def _print_late(variant: str, late: dict) -> None:
    """The late joiner's medians over its runs (each run is in the JSON report)."""
    m = late["median"]
    ms = lambda k: _fmt(m[k] * 1000 if m.get(k) is not None else None, ".0f")  # noqa: E731
    print(f"{variant} late joiner (median of {len(late['runs'])}): short TTFT {ms('short_ttft_s')} ms = "
          f"{_fmt(m.get('short_ttft_over_chunk'), '.2f')} chunks (chunk {_fmt(m.get('prefill_chunk'), '.0f')} tokens = "
          f"{ms('chunk_s')} ms at {_fmt(m.get('prefill_tokens_per_step'), '.0f')} prefill tokens/step), long TTFT "
          f"{ms('long_ttft_s')} ms; stream gaps p50 {ms('stream_gap_p50_s')} ms, during the long prefill p50 "
          f"{ms('stream_gap_during_prefill_p50_s')} / p99 {ms('stream_gap_during_prefill_p99_s')} ms; p99 during / "
          f"p50 all {_fmt(m.get('gap_p99_during_over_p50_all'), '.2f')}, / p50 during "
          f"{_fmt(m.get('gap_p99_during_over_p50_during'), '.2f')} ({m.get('gaps_during_prefill')} gaps during)")


def print_table(report: dict) -> None:
    """The concurrency x repeat x spec on/off x variant table, with the ratios the issue's targets use."""
    print(f"{'variant':>9} {'C':>2} {'r':>2} {'spec':>4} {'ok':>3} {'tok/s':>7} {'dec tok/s':>9} {'eng dec':>7} "
          f"{'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>17} {'tau':>4}  modes")
    for variant, entry in report["variants"].items():
        _print_cells(variant, entry["cells"])
        _print_spec_ratios(variant, entry["cells"])
        _print_ar_scaling(variant, entry["cells"])
        if "late_joiner" in entry:
            _print_late(variant, entry["late_joiner"])
    for name, x in report.get("elastic", {}).items():
        print(f"elastic {name}: {x['admitted_at_once']} rows at once (kv_cache_bytes {x['kv_cache_bytes']}), "
              f"{x['elastic_lowered']} lowered, budgets {x['kv_budgets']}, alpha {x['alpha_mean']}, "
              f"{x['output_tokens_per_s']:.1f} tok/s")


if __name__ == "__main__":
    sys.exit(main())
