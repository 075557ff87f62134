"""Drafter decode-step time: sparse (budget B) vs full KV cache at growing prefix lengths.

The drafter's point is that its attention cost follows the KV budget B, not the context:
with B = 256 the 8K/1K step-time ratio should stay <= 1.2, while the full-cache drafter's
ratio grows with the context.

One decode step = one new token through ``bd_ray.kvcache.forward_with_cache`` (the function
inference uses), logits for the new token included; the cache is cropped back after each step so
every timed step sees the same cache length. Median of ``--iters`` steps after ``--warmup``.

One prefill at the longest prefix serves every length: with causal attention the first ``n``
cache entries of a long prefill equal the cache of an ``n``-token prefill.

    python benchmarks/drafter_step.py                     # random-init Llama, SmolLM2-135M shapes, 4 layers
    python benchmarks/drafter_step.py --checkpoint PATH   # an HF drafter checkpoint
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import time

import torch


def build_model(args):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        return AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=dtype,
                                                    attn_implementation=args.attn).eval()
    # SmolLM2-135M shapes (docs/DESIGN.md section 4), fewer layers: a typical small drafter.
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=args.layers,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=max(8192, args.max_prefix + 64),
                      rope_theta=100000.0, tie_word_embeddings=True, attn_implementation=args.attn)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def time_steps(model, caches: list, starts: list[int], warmup: int, iters: int) -> list[float]:
    """Median seconds of one 1-token decode step on each cache (restored after each step).

    The caches are timed round-robin (one step each per round) so that load drift on a shared
    machine hits every configuration alike.
    """
    from bd_ray.kvcache import cache_len, crop_cache, forward_with_cache

    bases = [cache_len(c) for c in caches]
    tok = torch.tensor([[17]])
    times: list[list[float]] = [[] for _ in caches]
    for i in range(warmup + iters):
        for j, (cache, start) in enumerate(zip(caches, starts)):
            t0 = time.perf_counter()
            forward_with_cache(model, cache, tok, start)
            dt = time.perf_counter() - t0
            crop_cache(cache, bases[j])
            if i >= warmup:
                times[j].append(dt)
    return [statistics.median(t) for t in times]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="HF checkpoint dir of the drafter (default: random init)")
    p.add_argument("--layers", type=int, default=4, help="layers of the random-init drafter")
    p.add_argument("--prefixes", default="1024,4096,8192", help="comma-separated prefix lengths")
    p.add_argument("--budget", type=int, default=256, help="KV budget B of the sparse cache")
    p.add_argument("--policy", default="chunk_topk", choices=["chunk_topk", "streaming", "snapkv"])
    p.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 = steadier on a shared box)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    args = p.parse_args(argv)
    prefixes = sorted(int(x) for x in args.prefixes.split(","))
    args.max_prefix = prefixes[-1]
    torch.set_num_threads(args.threads)

    from bd_ray.config import SparsePolicyConfig
    from bd_ray.kvcache import KVCache, compact_cache, prefill

    cmd = " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + (sys.argv[1:] if argv is None else argv))
    print(f"# command: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')} python {cmd}")
    model = build_model(args)
    c = model.config
    print(f"# drafter: {args.checkpoint or 'random-init Llama'}  layers={c.num_hidden_layers} d={c.hidden_size} "
          f"heads={c.num_attention_heads}/{c.num_key_value_heads} vocab={c.vocab_size} dtype={args.dtype} "
          f"attn={args.attn} threads={args.threads}  torch {torch.__version__}")
    policy = SparsePolicyConfig(name=args.policy)
    print(f"# sparse: policy={args.policy} budget={args.budget} chunk_size={policy.chunk_size} recent={policy.recent}; "
          f"median of {args.iters} steps after {args.warmup} warm-up")

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, c.vocab_size, (1, args.max_prefix), generator=g)
    t0 = time.perf_counter()
    need_q = args.policy == "snapkv" or policy.query_proxy == "last_query"
    pre = prefill(model, ids, chunk_size=args.prefill_chunk, capture_queries_window=policy.window if need_q else 0)
    print(f"# prefill {args.max_prefix} tokens: {time.perf_counter() - t0:.1f} s")

    caches, starts, selects = [], [], []
    for n in prefixes:
        full = KVCache.from_tensors([(layer.keys[:, :, :n], layer.values[:, :, :n]) for layer in pre.cache.layers])
        full.kept_len, full.prefix_len = n, torch.tensor([n])
        if need_q and n != args.max_prefix:
            # snapkv / last_query need the queries of this prefix's own last positions
            queries = prefill(model, ids[:, :n], chunk_size=args.prefill_chunk,
                              capture_queries_window=policy.window).queries
        else:
            queries = pre.queries
        t0 = time.perf_counter()
        sparse = compact_cache(full, args.budget, policy, queries=queries)
        selects.append(time.perf_counter() - t0)
        caches += [sparse, full]
        starts += [n, n]
    with torch.no_grad():
        med = time_steps(model, caches, starts, args.warmup, args.iters)
    rows = [(n, med[2 * i], med[2 * i + 1], selects[i]) for i, n in enumerate(prefixes)]

    print()
    print(f"| prefix | sparse B={args.budget} step (ms) | full step (ms) | full/sparse | selection (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for n, ts, tf, tsel in rows:
        print(f"| {n} | {ts * 1e3:.2f} | {tf * 1e3:.2f} | {tf / ts:.2f}x | {tsel * 1e3:.1f} |")
    lo, hi = rows[0], rows[-1]
    r_sparse, r_full = hi[1] / lo[1], hi[2] / lo[2]
    print()
    print(f"ratio {hi[0]}/{lo[0]}: sparse {r_sparse:.2f} (target <= 1.2: {'PASS' if r_sparse <= 1.2 else 'FAIL'}), "
          f"full {r_full:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
