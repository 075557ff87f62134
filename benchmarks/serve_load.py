"""Bounded load generator for the bd-ray OpenAI server (127.0.0.1 only): speculative vs AR.

For each concurrency C in ``--concurrency`` (default 1 4 8) and each mode (``speculative``
false = AR, true = BudgetDraft), C closed-loop clients each send ``--requests-per-client``
streaming greedy ``/v1/completions`` requests; every cell is also cut off after
``--max-cell-s`` seconds. Reported per cell (like vLLM's ``benchmark_serving``):

* requests/s and output tokens/s over the cell's wall time;
* p50/p99 time to first token (TTFT, s: request sent -> first text chunk);
* p50/p99 per-token latency (TPOT, s: (last chunk - first chunk) / (completion tokens - 1));
* mean α / τ of the speculative requests (from the response's ``spec_metrics``);
* per concurrency: the speculative/AR ratio of output tokens/s and of p50 TPOT.

Either point it at a running server (``--url http://127.0.0.1:8000``) or let it start one
(``--start tiny``: random tiny models, an 8-layer verifier whose layers 2..7 are damped and a drafter
made of its first 2 layers, so α is high and the cost ratio is ~1:4; measures the serving loop;
``--start default``: ``serve_configs/default.yaml``'s embedded SmolLM2-135M). Examples::

    python benchmarks/serve_load.py --start tiny --out /tmp/serve_load.json
    serve run serve_configs/default.yaml &  python benchmarks/serve_load.py --url http://127.0.0.1:8000

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
PROMPT_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife. However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
    "he is considered the rightful property of some one or other of their daughters. "
)


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


async def run_cell(url: str, concurrency: int, speculative: bool, args) -> dict:
    import httpx

    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
            "speculative": speculative, "ignore_eos": True}
    if speculative:
        if args.gamma:
            body["gamma"] = args.gamma
        if args.kv_budget:
            body["kv_budget"] = args.kv_budget
    deadline = time.perf_counter() + args.max_cell_s
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=args.request_timeout_s, limits=limits) as client:
        async def worker():
            for _ in range(args.requests_per_client):
                if time.perf_counter() > deadline:
                    return
                results.append(await one_request(client, url, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["status"] == 200 and r.get("tokens")]
    ttft = [r["ttft"] for r in ok if r.get("ttft") is not None]
    tpot = [r["tpot"] for r in ok if r.get("tpot") is not None]
    specs = [r["spec"] for r in ok if r.get("spec") and r["spec"].get("drafted")]
    return {
        "concurrency": concurrency, "speculative": speculative, "requests": len(results), "ok": len(ok),
        "rejected_503": sum(r["status"] == 503 for r in results), "wall_s": wall,
        "requests_per_s": len(ok) / wall, "output_tokens_per_s": sum(r["tokens"] for r in ok) / wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p99_s": pct(ttft, 99), "tpot_p50_s": pct(tpot, 50),
        "tpot_p99_s": pct(tpot, 99),
        "alpha_mean": statistics.fmean(s["alpha"] for s in specs) if specs else None,
        "tau_mean": statistics.fmean(s["tau"] for s in specs) if specs else None,
    }


def server_args(kind: str) -> dict:
    """Serve app args (``ServeAppConfig`` tree): the tiny test models (written to a temp dir) or the default config."""
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
        args = {"model": {"name": "tiny", "verifier": str(root / "v"), "drafter": str(root / "d"), "device": "cpu",
                          "torch_threads": 1},
                "spec": {"gamma": 4, "budget": "full"},  # random tiny attention is diffuse: sparse views kill alpha
                "engine": {"num_cpus": 1, "max_ongoing_requests": 8, "max_queued_requests": 32,
                           "autoscaling": {"min_replicas": 1, "max_replicas": 1}}}
    else:
        cfg = yaml.safe_load((REPO / "serve_configs" / "default.yaml").read_text())
        args = cfg["applications"][0]["args"]
        args["engine"]["autoscaling"].update({"min_replicas": 1, "max_replicas": 1})
        args["engine"]["max_ongoing_requests"] = 8
        args["engine"]["max_queued_requests"] = 32
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default=None, help="running server, http://127.0.0.1:PORT")
    ap.add_argument("--start", choices=["tiny", "default"], default=None, help="start a server here")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-repeats", type=int, default=3, help="copies of the built-in paragraph in the prompt")
    ap.add_argument("--gamma", type=int, default=None)
    ap.add_argument("--kv-budget", type=int, default=None)
    ap.add_argument("--max-cell-s", type=float, default=60.0, help="stop starting requests after this (s)")
    ap.add_argument("--request-timeout-s", type=float, default=300.0)
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    args.prompt = PROMPT_TEXT * args.prompt_repeats

    if (args.url is None) == (args.start is None):
        ap.error("give exactly one of --url or --start")
    cells = []
    with contextlib.ExitStack() as stack:
        if args.start:
            from bd_ray.testing.serve import local_serve_app

            t = time.perf_counter()
            url = stack.enter_context(local_serve_app(server_args(args.start), "bench"))
            print(f"server up in {time.perf_counter() - t:.1f} s", flush=True)
        else:
            url = args.url.rstrip("/")
            if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
                raise SystemExit(f"refusing to send load to {url}: only 127.0.0.1 is allowed")
        # warm-up
        asyncio.run(run_cell(url, 1, False, argparse.Namespace(**{**vars(args), "requests_per_client": 1})))
        for c in args.concurrency:
            for spec in (False, True):
                cell = asyncio.run(run_cell(url, c, spec, args))
                cells.append(cell)
                print(json.dumps(cell), flush=True)

    ratios = {}
    for c in args.concurrency:
        ar = next(x for x in cells if x["concurrency"] == c and not x["speculative"])
        sd = next(x for x in cells if x["concurrency"] == c and x["speculative"])
        ratios[c] = {
            "output_tokens_per_s": sd["output_tokens_per_s"] / ar["output_tokens_per_s"] if ar["output_tokens_per_s"] else None,
            "tpot_p50": (sd["tpot_p50_s"] / ar["tpot_p50_s"]) if sd["tpot_p50_s"] and ar["tpot_p50_s"] else None,
        }
    hdr = f"{'C':>2} {'mode':>5} {'ok':>3} {'req/s':>6} {'tok/s':>7} {'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>17} {'alpha':>5} {'tau':>4}"
    print(hdr)
    ms = lambda x: f"{1000 * x:.0f}" if x is not None else "-"  # noqa: E731
    for x in cells:
        print(f"{x['concurrency']:>2} {'SD' if x['speculative'] else 'AR':>5} {x['ok']:>3} {x['requests_per_s']:>6.2f} "
              f"{x['output_tokens_per_s']:>7.1f} {ms(x['ttft_p50_s']) + '/' + ms(x['ttft_p99_s']):>17} "
              f"{ms(x['tpot_p50_s']) + '/' + ms(x['tpot_p99_s']):>17} "
              f"{x['alpha_mean'] if x['alpha_mean'] is None else round(x['alpha_mean'], 2)!s:>5} "
              f"{x['tau_mean'] if x['tau_mean'] is None else round(x['tau_mean'], 2)!s:>4}")
    for c, r in ratios.items():
        print(f"C={c}: SD/AR output tok/s = {r['output_tokens_per_s']:.2f}, SD/AR p50 TPOT = "
              f"{r['tpot_p50'] if r['tpot_p50'] is None else round(r['tpot_p50'], 2)}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items() if k != "prompt"},
                                        "cells": cells, "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
