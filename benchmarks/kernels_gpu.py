"""GPU benchmark: Triton sparse decode/verify attention vs torch gather + SDPA.

For each (model shape, budget B, batch, n_new) it builds a full fp16 KV cache of ``--context``
positions, B kept positions per (batch, KV head) (sorted random indices; chunk 0 style choice does
not matter for timing), and ``n_new`` new tokens, then times in one run (CUDA events, warm-up):

* ``gather+sdpa`` -- what a drafter without a compact cache does each step: gather the kept
  positions from the full cache, append the new tokens, ``F.scaled_dot_product_attention`` with a
  causal mask among the new tokens;
* ``sdpa``        -- SDPA alone on the already-compact cache (isolates the attention cost);
* ``triton``      -- ``bd_ray_kernels`` Triton kernel on the compact cache.

Correctness is checked first for every row (max abs error of Triton vs the fp32 torch reference and
vs gather+SDPA). Also times the ``chunk_topk`` chunk scoring (Triton vs torch) at the context length.

Usage (GPU): ``python benchmarks/kernels_gpu.py``; ``--quick`` for a smaller grid;
``--device cpu`` runs a tiny smoke version through the Triton interpreter (needs TRITON_INTERPRET=1;
timings are then meaningless). ``--json PATH`` also writes the rows (after each one).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels"))

from bd_ray_kernels.chunk_select import chunk_scores_triton  # noqa: E402
from bd_ray_kernels.reference import chunk_scores_reference, sparse_attention_reference  # noqa: E402
from bd_ray_kernels.sparse_attention import sparse_attention_triton  # noqa: E402

# name: (q_heads, kv_heads, head_dim)
SHAPES = {
    "llama-68m": (12, 12, 64),  # the paper's drafter
    "llama2-7b": (32, 32, 128),  # the paper's verifier geometry
    "smollm2-135m": (9, 3, 64),  # GQA (embedded default verifier)
}


def bench(fn, device: torch.device, warmup: int, iters: int, repeats: int = 3) -> float:
    """Median over ``repeats`` of the mean time per call (ms) over ``iters`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(iters):
                fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / iters)
        else:
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t) * 1e3 / iters)
    return statistics.median(times)


def full_cache(shape, batch, context, dtype, device, seed=0):
    """Full K/V cache ``[batch, kv_heads, context, head_dim]`` generated on the device."""
    _, kvh, d = SHAPES[shape]
    g = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(batch, kvh, context, d, generator=g, device=device, dtype=dtype),
            torch.randn(batch, kvh, context, d, generator=g, device=device, dtype=dtype))


def make_case(shape, budget, n_new, full_k, full_v, seed=1):
    qh, kvh, d = SHAPES[shape]
    batch, _, context, _ = full_k.shape
    device, dtype = full_k.device, full_k.dtype
    g = torch.Generator(device=device).manual_seed(seed)
    new_k = torch.randn(batch, kvh, n_new, d, generator=g, device=device, dtype=dtype)
    new_v = torch.randn(batch, kvh, n_new, d, generator=g, device=device, dtype=dtype)
    q = torch.randn(batch, qh, n_new, d, generator=g, device=device, dtype=dtype)
    idx = torch.rand(batch, kvh, context, generator=g, device=device).argsort(-1)[..., :budget].sort(-1).values
    idx_e = idx[..., None].expand(-1, -1, -1, d)
    kv_len = budget + n_new
    mask = torch.ones(n_new, kv_len, dtype=torch.bool, device=device)
    mask[:, budget:] = torch.ones(n_new, n_new, dtype=torch.bool, device=device).tril()
    gqa = qh != kvh

    def gather_sdpa():
        k = torch.cat([full_k.gather(2, idx_e), new_k], 2)
        v = torch.cat([full_v.gather(2, idx_e), new_v], 2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if n_new == 1 else mask, enable_gqa=gqa)

    kc = torch.cat([full_k.gather(2, idx_e), new_k], 2).contiguous()
    vc = torch.cat([full_v.gather(2, idx_e), new_v], 2).contiguous()

    def sdpa():
        return F.scaled_dot_product_attention(q, kc, vc, attn_mask=None if n_new == 1 else mask, enable_gqa=gqa)

    def triton_fn():
        return sparse_attention_triton(q, kc, vc)

    return q, kc, vc, gather_sdpa, sdpa, triton_fn


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--n-new", type=int, nargs="+", default=[1, 5])
    ap.add_argument("--shapes", nargs="+", default=["llama-68m", "llama2-7b"], choices=sorted(SHAPES))
    ap.add_argument("--context", type=int, default=8192, help="full-cache length the kept positions come from")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="budgets 256/2048, shapes llama-68m + smollm2-135m")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = torch.float16
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run with --device cpu (TRITON_INTERPRET=1) for a smoke test")
            return 2
        print(f"device: {torch.cuda.get_device_name(device)}  torch {torch.__version__}", end="")
    else:  # interpreter smoke run: tiny everything
        args.budgets, args.batches, args.context = [16, 40], [1, 2], 64
        args.shapes, args.warmup, args.iters = ["smollm2-135m"], 1, 2
        print(f"device: {device} (Triton interpreter smoke run; timings meaningless)  torch {torch.__version__}", end="")
    if args.quick:
        args.budgets, args.shapes = [256, 2048], ["llama-68m", "smollm2-135m"]
    import triton

    print(f"  triton {triton.__version__}  dtype fp16  context {args.context}")

    rows = []

    def dump(rows: list) -> None:      # after every row: a timeout keeps what was measured
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)

    hdr = (f"{'shape':<13}{'B':>6}{'batch':>6}{'n_new':>6} | {'gather+sdpa ms':>14}{'sdpa ms':>10}{'triton ms':>10}"
           f" | {'gath/tri':>8}{'sdpa/tri':>9} | {'err ref':>9}{'err sdpa':>9}")
    print(hdr)
    print("-" * len(hdr))
    worst = 0.0
    for shape in args.shapes:
        for batch in args.batches:
            full_k, full_v = full_cache(shape, batch, args.context, dtype, device)
            for budget in args.budgets:
                for n_new in args.n_new:
                    q, kc, vc, gather_sdpa, sdpa, triton_fn = make_case(shape, budget, n_new, full_k, full_v)
                    out = triton_fn()
                    ref = sparse_attention_reference(q.float(), kc.float(), vc.float())
                    err_ref = (out.float() - ref).abs().max().item()
                    err_sdpa = (out.float() - gather_sdpa().float()).abs().max().item()
                    worst = max(worst, err_ref)
                    t_g = bench(gather_sdpa, device, args.warmup, args.iters)
                    t_s = bench(sdpa, device, args.warmup, args.iters)
                    t_t = bench(triton_fn, device, args.warmup, args.iters)
                    row = dict(shape=shape, budget=budget, batch=batch, n_new=n_new, gather_sdpa_ms=t_g,
                               sdpa_ms=t_s, triton_ms=t_t, gather_over_triton=t_g / t_t,
                               sdpa_over_triton=t_s / t_t, max_abs_err_ref=err_ref, max_abs_err_sdpa=err_sdpa)
                    rows.append(row)
                    dump(rows)
                    print(f"{shape:<13}{budget:>6}{batch:>6}{n_new:>6} | {t_g:>14.4f}{t_s:>10.4f}{t_t:>10.4f}"
                          f" | {t_g / t_t:>8.2f}{t_s / t_t:>9.2f} | {err_ref:>9.2e}{err_sdpa:>9.2e}", flush=True)
                    del q, kc, vc, gather_sdpa, sdpa, triton_fn
            del full_k, full_v

    # chunk scoring (chunk_topk selection after drafter prefill), one layer's keys
    print("\nchunk scoring (chunk 8, query = last key):")
    for shape in args.shapes:
        for batch in args.batches:
            keys = full_cache(shape, batch, args.context, dtype, device)[0]
            qp = keys[:, :, -1]
            err = (chunk_scores_triton(keys, qp, 8) - chunk_scores_reference(keys, qp, 8)).abs().max().item()
            t_r = bench(lambda: chunk_scores_reference(keys, qp, 8), device, args.warmup, args.iters)
            t_t = bench(lambda: chunk_scores_triton(keys, qp, 8), device, args.warmup, args.iters)
            print(f"  {shape:<13} batch {batch:>3} seq {args.context}: torch {t_r:.4f} ms  triton {t_t:.4f} ms"
                  f"  ratio {t_r / t_t:.2f}  max abs err {err:.2e}")
            rows.append(dict(kind="chunk_scores", shape=shape, batch=batch, seq=args.context, torch_ms=t_r,
                             triton_ms=t_t, max_abs_err=err))
    print(f"\nworst max abs error vs fp32 reference (attention): {worst:.3e}")
    dump(rows)
    ok = worst < 2e-2
    print("CORRECTNESS", "OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
