r"""Step costs of speculative decoding: verifier T_v(1), T_v(γ+1) and drafter T_d, as ratios.

Speculative decoding pays only when verifying γ+1 tokens costs little more than decoding one and
a drafter step is cheap next to a verifier step (the targets: T_v(5)/T_v(1) <= 1.3 and
T_d/T_v(1) <= 0.10 at B = 256, 4K context). Everything is measured in one run, interleaved step
by step so that load drift on a shared machine hits every configuration alike; the printed
figures are medians and the ratios are what to compare across machines.

Also measures what the in-place KV buffers bought: the same verifier step on transformers'
``DynamicCache`` (``torch.cat`` of the whole cache every step) vs bd-ray's ``BufferedLayer``.

Usage::

    python benchmarks/step_costs.py [--contexts 1024 4096] [--gamma 4] [--budget 256] \
        [--drafter-layers 1 2 4] [--draft-vocab runs/draft_vocab/pg_mini_8192] [--repeats 9] [--threads 2]

``--draft-vocab`` adds drafter rows with the LM head over that subset (bd_ray/draft_vocab.py).
``--json PATH`` also writes every median.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time

import torch


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--budget", type=int, default=256)
    p.add_argument("--drafter-layers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--draft-vocab", default=None, help="draft_vocab.json (or its dir) for subset-head rows")
    p.add_argument("--json", default=None, help="write the medians here as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    from transformers import DynamicCache

    import bd_ray.attention  # noqa: F401  registers "bd_ray_sparse"
    from bd_ray import kvcache, models
    from bd_ray.config import SparsePolicyConfig

    print(f"# python benchmarks/step_costs.py {' '.join(sys.argv[1:])}")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, fp32, batch 1")
    verifier, tok = models.load_verifier(args.verifier)
    drafters = {(n, "full-vocab"): models.init_drafter_from_verifier(verifier, n) for n in args.drafter_layers}
    if args.draft_vocab:
        from bd_ray.draft_vocab import apply_draft_vocab, load_draft_vocab

        vocab = load_draft_vocab(args.draft_vocab)
        for n in args.drafter_layers:
            drafters[(n, f"vocab{len(vocab)}")] = apply_draft_vocab(models.init_drafter_from_verifier(verifier, n), vocab)
    policy = SparsePolicyConfig(name="chunk_topk")
    g = torch.Generator().manual_seed(0)

    report: dict = {"command": "python benchmarks/step_costs.py " + " ".join(sys.argv[1:]),
                    "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    for ctx in args.contexts:
        ids = torch.randint(100, len(tok) - 1, (1, ctx + args.gamma + 1), generator=g)
        prompt, block = ids[:, :ctx], ids[:, ctx:]
        with torch.inference_mode():
            vpre = kvcache.prefill(verifier, prompt)
            concat = DynamicCache(ddp_cache_data=[(l.keys.clone(), l.values.clone()) for l in vpre.cache.layers])
            buffered = kvcache.clone_cache(vpre.cache)
            dcaches = {}
            for key, d in drafters.items():
                dpre = kvcache.prefill(d, prompt)
                dcaches[(key, "full")] = kvcache.clone_cache(dpre.cache)
                dcaches[(key, args.budget)] = kvcache.compact_cache(dpre.cache, args.budget, policy)

        def step(model, cache, n_tokens, attn="sdpa"):
            if model.config._attn_implementation != attn:
                model.set_attn_implementation(attn)
            base = kvcache.cache_len(cache) if hasattr(cache, "kept_len") else cache.get_seq_length()
            kvcache.forward_with_cache(model, cache, block[:, :n_tokens], start_position=ctx)
            if hasattr(cache, "kept_len"):
                kvcache.crop_cache(cache, base)
            else:
                cache.crop(-n_tokens)

        cases = {
            "T_v(1) buffered": lambda: step(verifier, buffered, 1),
            f"T_v({args.gamma + 1}) buffered": lambda: step(verifier, buffered, args.gamma + 1),
            "T_v(1) bd_ray_sparse": lambda: step(verifier, buffered, 1, "bd_ray_sparse"),
            f"T_v({args.gamma + 1}) bd_ray_sparse": lambda: step(verifier, buffered, args.gamma + 1, "bd_ray_sparse"),
            "T_v(1) concat": lambda: step(verifier, concat, 1),
            f"T_v({args.gamma + 1}) concat": lambda: step(verifier, concat, args.gamma + 1),
        }
        for ((n, head), b), c in dcaches.items():
            cases[f"T_d {n}L B={b} {head}"] = (lambda d=drafters[(n, head)], c=c: step(d, c, 1, "bd_ray_sparse"))
        times: dict[str, list[float]] = {k: [] for k in cases}
        with torch.inference_mode():
            for f in cases.values():
                f()                                   # warm-up
            for _ in range(args.repeats):
                for name, f in cases.items():         # interleaved: drift hits all alike
                    t = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        tv1 = med["T_v(1) buffered"]
        print(f"\n## context {ctx} tokens, γ = {args.gamma}, budget {args.budget}")
        print(f"{'step':<34}{'median ms':>10}{'/ T_v(1)':>10}{'/ T_v(1) bd_ray_sparse':>24}")
        sp1 = med["T_v(1) bd_ray_sparse"]
        for k, v in med.items():
            print(f"{k:<34}{v * 1e3:>10.1f}{v / tv1:>10.3f}{v / sp1:>24.3f}")
        report[ctx] = {"ms": {k: v * 1e3 for k, v in med.items()},
                       "verify_ratio": med[f"T_v({args.gamma + 1}) bd_ray_sparse"] / sp1,
                       "drafter_ratio": {k: v / sp1 for k, v in med.items() if k.startswith("T_d")}}
        sp = med["T_v(1) bd_ray_sparse"]
        print(f"bd_ray_sparse attention: T_v(1) {sp / tv1:.2f}x of sdpa, T_v({args.gamma + 1})/T_v(1) "
              f"{med[f'T_v({args.gamma + 1}) bd_ray_sparse'] / sp:.2f}")
        print(f"verify ratio T_v({args.gamma + 1})/T_v(1): buffered "
              f"{med[f'T_v({args.gamma + 1}) buffered'] / tv1:.2f}, concat "
              f"{med[f'T_v({args.gamma + 1}) concat'] / med['T_v(1) concat']:.2f}; "
              f"in-place buffers vs torch.cat per step: {med['T_v(1) concat'] / tv1:.2f}x faster T_v(1)")
    if args.json:
        import json
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
