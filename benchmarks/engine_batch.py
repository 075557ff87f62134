r"""The batched engine without Serve: decode-step scaling with the batch, and the late joiner.

``decode``: ``--rows`` rows (default 1 4 8 16) of one held-out ``--context``-token prompt (its
verifier prefill computed once and shared, so only decoding is timed; the rows join one step
apart, so their lengths differ as in serving) decode ``--tokens`` tokens plainly, all together; the median step time per batch size and its tokens/s relative to one row (the issue's
"AR decode throughput at 16 >= 4x 1", with a full batch the whole time: the Serve benchmark's
figure also depends on how full its bursts keep the batch). Batch sizes are run round-robin
``--repeats`` times so load drift hits all alike.

``late``: 8 rows of 2K-token prompts decode; a 4K-token prompt arrives, and a 100-token prompt
one step later; reported: the steps during the long prefill (median, max) against a plain decode
step of the 8 rows, the short prompt's time to its first token and the long one's, for
``max_num_batched_tokens`` in ``--budgets`` (``none`` = a whole ``prefill_chunk`` every step).

``burst``: the Serve default's engine (verifier + the shipped ``reference-budgetdraft`` drafter,
γ <= 4, B = 256, chunk_topk recent 64, the batch policy, ``max_num_batched_tokens`` 128) under
``--clients`` closed-loop clients of ``--requests`` held-out 2K-token prompts each, 128 new tokens,
speculation off vs on (``speculative`` per request) in ABBA order ``--repeats`` times: wall time,
engine decode and prefill seconds, and what speculation did (rows that drafted, drafter prefills
run) — the Serve benchmark's spec on/off cells without HTTP, on one engine.

Usage (fp32 SmolLM2-135M verifier; ``decode`` and ``late`` without a drafter: the policy keeps
large CPU batches plain anyway)::

    python benchmarks/engine_batch.py decode --rows 1 4 8 16 --context 2048
    python benchmarks/engine_batch.py late --budgets none 128
    python benchmarks/engine_batch.py burst --clients 8 --requests 2 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from serve_load import held_out_prompts  # noqa: E402  (benchmarks/: the Serve benchmark's held-out prompts)


def _setup(threads: int):
    import torch

    from bd_ray import models
    from bd_ray.speculative.engine import DEFAULT_ATTENTION, use_attention

    torch.set_num_threads(threads)
    verifier, tok = models.load_verifier("smollm2-135m")
    use_attention(verifier, DEFAULT_ATTENTION)
    return verifier, tok


def _engine(verifier, tok, budget: int | None, drafter=None, spec=None):
    from bd_ray.config import SpecConfig
    from bd_ray.speculative.batch import BatchEngine, BatchOptions

    return BatchEngine(verifier, drafter, tok, spec or SpecConfig(budget=None, prefill_chunk=512),
                       BatchOptions(max_num_seqs=16, max_num_batched_tokens=budget))


def _request(engine, prompt: list[int], tokens: int, prefilled=None, speculative: bool = True):
    from bd_ray.config import SamplingConfig
    from bd_ray.speculative.batch import new_row
    from bd_ray.speculative.rows import RowRequest

    sampling = SamplingConfig(temperature=0.0, max_new_tokens=tokens, eos_token_ids=[])
    return engine.submit(new_row(engine, RowRequest(prompt, sampling, prefilled=prefilled, speculative=speculative)))


def _timed_step(engine) -> float:
    t = time.perf_counter()
    engine.step()
    return time.perf_counter() - t


def decode(args) -> dict:
    """Median plain decode step per batch size (module docstring)."""
    import torch

    from bd_ray import kvcache

    verifier, tok = _setup(args.threads)
    prompt = held_out_prompts("default", args.context, 1)[0]
    with torch.inference_mode():
        pre = kvcache.prefill(verifier, torch.tensor([prompt]), chunk_size=512)
    steps: dict[int, list[float]] = {b: [] for b in args.rows}
    for _ in range(args.repeats):
        for b in args.rows:
            engine = _engine(verifier, tok, None)
            with torch.inference_mode():
                for _ in range(b):         # one row joins per step: ragged lengths, as in serving
                    _request(engine, prompt, args.tokens + b + 2, prefilled=pre)
                    engine.step()
                steps[b] += [_timed_step(engine) for _ in range(args.tokens)]
    med = {b: statistics.median(ts) for b, ts in steps.items()}
    one = args.rows[0]
    out = {b: {"step_ms": 1e3 * med[b], "tokens_per_s": b / med[b],
               f"vs_{one}_row": (b / med[b]) / (one / med[one])} for b in args.rows}
    for b, x in out.items():
        print(f"{b:>3} rows: decode step {x['step_ms']:.0f} ms, {x['tokens_per_s']:.1f} tok/s, "
              f"{x[f'vs_{one}_row']:.2f}x {one} row", flush=True)
    return {"context": args.context, "rows": out}


def late(args) -> dict:
    """The late joiner per token budget (module docstring)."""
    import torch

    verifier, tok = _setup(args.threads)
    streams = held_out_prompts("default", 2048, 8)
    long, short = held_out_prompts("default", 4096, 1, seed=1)[0], held_out_prompts("default", 100, 1, seed=2)[0]
    out = {}
    for name in args.budgets:
        budget = None if name == "none" else int(name)
        engine = _engine(verifier, tok, budget)
        rows = [_request(engine, p, 10_000) for p in streams]
        with torch.inference_mode():
            while any(r.phase != "decode" for r in rows):
                engine.step()
            plain = [_timed_step(engine) for _ in range(5)]
            long_row, t0 = _request(engine, long, 2), time.perf_counter()
            during, short_row, short_ttft = [], None, None
            while long_row.phase in ("waiting", "prefill"):
                during.append(_timed_step(engine))
                if short_row is None:
                    short_row, t_short = _request(engine, short, 2), time.perf_counter()
                elif short_ttft is None and short_row.checker.num_tokens:
                    short_ttft = time.perf_counter() - t_short
            long_ttft = time.perf_counter() - t0
        for r in rows:
            engine.cancel(r)
        x = {"plain_step_s": statistics.median(plain), "steps_during": len(during),
             "during_median_s": statistics.median(during), "during_max_s": max(during),
             "short_ttft_s": short_ttft, "long_ttft_s": long_ttft,
             "prefill_s_per_token": engine.stats()["prefill_s"] / engine.stats()["prefill_tokens"]}
        x["chunk_s"] = 512 * x["prefill_s_per_token"]
        out[name] = x
        print(f"max_num_batched_tokens={name}: {x['steps_during']} steps during the 4K prefill, median "
              f"{x['during_median_s']:.2f} s / max {x['during_max_s']:.2f} s vs plain step {x['plain_step_s']:.2f} s "
              f"({x['during_median_s'] / x['plain_step_s']:.1f}x / {x['during_max_s'] / x['plain_step_s']:.1f}x); "
              f"short TTFT {short_ttft:.2f} s = {short_ttft / x['chunk_s']:.2f} chunks of 512 "
              f"({x['chunk_s']:.2f} s); long TTFT {long_ttft:.1f} s", flush=True)
    return out


def burst(args) -> dict:
    """Closed-loop clients, speculation off vs on, ABBA (module docstring)."""
    import torch

    from bd_ray import models
    from bd_ray.config import SparsePolicyConfig, SpecConfig
    from bd_ray.reference_drafters import DEFAULT_DRAFTER

    verifier, tok = _setup(args.threads)
    drafter, _ = models.load_drafter(DEFAULT_DRAFTER, tok, verifier=verifier, attn_implementation="bd_ray_sparse")
    spec = SpecConfig(gamma=4, budget=256, policy=SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=64),
                      prefill_chunk=512, adaptive=True)
    prompts = held_out_prompts("default", 2048, args.clients * args.requests)
    engine = _engine(verifier, tok, 128, drafter, spec)       # one engine: the policy's tables persist
    cells = []
    order = [False, True, True, False] * args.repeats
    for i, on in enumerate(order[: 2 * args.repeats]):
        todo = list(prompts)
        done, t0 = [], time.perf_counter()
        before = engine.stats()
        with torch.inference_mode():
            rows = [_request(engine, todo.pop(0), 128, speculative=on) for _ in range(args.clients)]
            while engine.has_work:
                engine.step()
                for r in [r for r in rows if r.finished]:
                    rows.remove(r)
                    done.append(r)
                    if todo:
                        rows.append(_request(engine, todo.pop(0), 128, speculative=on))
        after = engine.stats()
        x = {"speculative": on, "wall_s": time.perf_counter() - t0,
             "decode_s": after["decode_s"] - before["decode_s"], "prefill_s": after["prefill_s"] - before["prefill_s"],
             "prefill_tokens": after["prefill_tokens"] - before["prefill_tokens"],
             "rows_drafted": sum(1 for r in done if r.metrics.cycles > 0),
             "drafter_prefills": sum(1 for r in done if r.d_ready)}
        x["tokens_per_s"] = len(done) * 128 / x["wall_s"]
        cells.append(x)
        print(json.dumps(x), flush=True)
    for on in (False, True):
        xs = [c for c in cells if c["speculative"] == on]
        print(f"speculation {'on ' if on else 'off'}: {statistics.mean(c['tokens_per_s'] for c in xs):.2f} tok/s "
              f"(cells {[round(c['tokens_per_s'], 2) for c in xs]})", flush=True)
    return {"cells": cells}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["decode", "late", "burst"])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2, help="requests per client (burst)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=24, help="decode steps per batch size and repeat")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--budgets", nargs="+", default=["none", "128"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    report = {"args": {k: str(v) for k, v in vars(args).items()},
              args.mode: {"decode": decode, "late": late, "burst": burst}[args.mode](args)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
