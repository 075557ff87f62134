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

``--random-pair`` measures the paper's pair instead, with random weights created on the device (no
weights to load): a Llama-2-7B-shaped verifier and a llama-68m-shaped drafter
(:data:`PAIR_SHAPES`), through the engine's own cache and forward (:class:`RaggedKVCache`,
:func:`ragged_forward`) with random K/V of ``context`` entries per row. Per (context, rows): T_v(1)
and T_v(γ+1) for ``sdpa`` and ``bd_ray_sparse`` attention (Triton on CUDA), the drafter step with
B = ``--budget`` kept entries vs the full cache, their ratios, and the speedup these costs predict
for each ``--alphas`` value (:func:`predicted_speedup`). Rows that do not fit the device's free
memory are reduced, and the record says so. ``--tiny`` shrinks both shapes (CPU smoke runs)::

    python benchmarks/step_costs.py --random-pair --device cuda --dtype bfloat16 \
        --contexts 4096 8192 16384 --batches 1 16 --alphas 0.108 0.137 0.6 0.8 --json costs.json
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
    p.add_argument("--random-pair", action="store_true", help="random-weight 7B/68M-shaped pair on --device")
    p.add_argument("--tiny", action="store_true", help="with --random-pair: tiny shapes (smoke runs)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--alphas", type=float, nargs="+", default=list(CPU_ALPHAS))
    return p.parse_args(argv)


# ---- the paper's pair, random weights on the device ------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: LlamaConfig fields of the paper's verifier (Llama-2-7B) and drafter (llama-68m); "tiny" ones for smoke runs.
PAIR_SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama-68m": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000),
    "tiny-verifier": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=320),
    "tiny-drafter": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=320),
}
#: α measured on CPU (results/reference: BudgetDraft at B = 256 and at full cache, 4K, greedy), then
#: two paper-range values for contrast.
CPU_ALPHAS = (0.108, 0.137, 0.6, 0.8)
_MEM_MARGIN = 3 << 30   # bytes left free for activations, the allocator and the Triton workspace


def random_llama(shape: str, device: torch.device, dtype: torch.dtype, max_positions: int, seed: int = 0):
    """A random-weight ``LlamaForCausalLM`` of :data:`PAIR_SHAPES` ``[shape]``, created directly on
    ``device`` in ``dtype`` (weights initialised there: a 7B model in seconds, nothing to load)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**PAIR_SHAPES[shape], max_position_embeddings=max_positions, tie_word_embeddings=False,
                      bos_token_id=None, eos_token_id=0, pad_token_id=None, attn_implementation="sdpa")
    torch.manual_seed(seed)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(before)
    return model.eval().requires_grad_(False)


def predicted_speedup(alpha: float, gamma: int, t_v1: float, t_vg: float, t_d: float) -> float:
    """τ·T_v(1) / (γ·T_d + T_v(γ+1)), τ = (1 - α^(γ+1)) / (1 - α) tokens per cycle
    (:func:`bd_ray.speculative.adaptive.expected_tokens`, i.i.d. acceptance)."""
    from bd_ray.speculative.adaptive import expected_tokens

    return expected_tokens(alpha, gamma) * t_v1 / (gamma * t_d + t_vg)


def _filled_cache(model, rows: int, entries: int, capacity: int, device: torch.device):
    """The engine's :class:`RaggedKVCache` with ``rows`` rows of ``entries`` random K/V entries
    (storage allocated once for ``capacity`` entries per row)."""
    from bd_ray.speculative.ragged_cache import RaggedKVCache

    cfg = model.config
    kvh = cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    cache = RaggedKVCache(cfg.num_hidden_layers)
    cache.reserve(rows, capacity)
    g = torch.Generator(device=device).manual_seed(1)
    k = torch.randn(1, kvh, entries, d, generator=g, device=device, dtype=dtype)
    v = torch.randn(1, kvh, entries, d, generator=g, device=device, dtype=dtype)
    for s in range(rows):
        cache.install(s, [(k, v)] * cfg.num_hidden_layers)
    return cache


def _timer(device: torch.device):
    def run(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t
    return run


def random_pair_costs(contexts: list[int], batches: list[int], gamma: int = 4, budget: int = 256,
                      alphas: list[float] = CPU_ALPHAS, device: str = "cuda", dtype: str = "bfloat16",
                      repeats: int = 9, tiny: bool = False, log=print, on_config=None) -> dict:
    """Step costs of the paper's pair with random weights on ``device`` (module docstring).

    ``on_config(report)`` is called after every (context, rows) configuration (partial results
    survive a timeout).

    Returns ``{"device", "dtype", "shapes", "gamma", "budget", "alphas", "configs": [per (context,
    rows): rows_requested, rows (fewer when memory is short, with "note"), "ms" medians, "verify_ratio"
    T_v(γ+1)/T_v(1) per attention, "drafter_ratio" T_d/T_v(1), "predicted_speedup" per attention,
    drafter cache and α]}``.
    """
    from bd_ray import attention  # noqa: F401  registers "bd_ray_sparse"
    from bd_ray.speculative.ragged_cache import kv_bytes_per_token, ragged_forward

    dev, dt = torch.device(device), _DTYPES[dtype]
    vshape, dshape = ("tiny-verifier", "tiny-drafter") if tiny else ("llama2-7b", "llama-68m")
    max_pos = max(contexts) + 2 * (gamma + 1) + 64
    t0 = time.perf_counter()
    verifier = random_llama(vshape, dev, dt, max_pos, seed=0)
    drafter = random_llama(dshape, dev, dt, max_pos, seed=1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    report: dict = {"device": str(dev), "dtype": dtype, "shapes": {"verifier": vshape, "drafter": dshape},
                    "gamma": gamma, "budget": budget, "alphas": list(alphas), "repeats": repeats,
                    "create_models_s": time.perf_counter() - t0, "configs": []}
    if dev.type == "cuda":
        report["device_name"] = torch.cuda.get_device_name(dev)
        report["weights_gib"] = torch.cuda.memory_allocated(dev) / 2**30
    log(f"[step_costs] {vshape} + {dshape} on {dev} in {dtype}: {report['create_models_s']:.1f}s")
    v_bpt, d_bpt = kv_bytes_per_token(verifier), kv_bytes_per_token(drafter)
    timed = _timer(dev)
    vocab = verifier.config.vocab_size
    block = torch.randint(1, vocab, (gamma + 1,), generator=torch.Generator().manual_seed(2)).tolist()
    for ctx in contexts:
        for want in batches:
            cap = ctx + gamma + 1 + 64
            per_row = v_bpt * cap + d_bpt * (cap + budget + gamma + 1 + 64)
            rows, note = want, None
            if dev.type == "cuda":
                torch.cuda.empty_cache()
                free, _ = torch.cuda.mem_get_info(dev)
                fit = int((free - _MEM_MARGIN) // per_row)
                if fit < want:
                    rows = max(fit, 0)
                    note = (f"{want} rows need {want * per_row / 2**30:.1f} GiB of KV cache, "
                            f"{free / 2**30:.1f} GiB free: measured with {rows} rows")
            rec: dict = {"context": ctx, "rows_requested": want, "rows": rows, "note": note,
                         "kv_gib_per_row": per_row / 2**30}
            report["configs"].append(rec)
            if rows < 1:
                log(f"[step_costs] context {ctx}: not even one row fits; skipped")
                if on_config is not None:
                    on_config(report)
                continue
            if note:
                log(f"[step_costs] {note}")
            vcache = _filled_cache(verifier, rows, ctx, cap, dev)
            dfull = _filled_cache(drafter, rows, ctx, cap, dev)
            dsparse = _filled_cache(drafter, rows, budget, budget + gamma + 1 + 64, dev)

            def step(model, cache, n, attn):
                if model.config._attn_implementation != attn:
                    model.set_attn_implementation(attn)
                base = cache.lens[0]
                ragged_forward(model, cache, {s: block[:n] for s in range(rows)}, {s: ctx for s in range(rows)},
                               {s: n for s in range(rows)})
                for s in range(rows):
                    cache.set_len(s, base)

            g1 = gamma + 1
            cases = {}
            for attn in ("sdpa", "bd_ray_sparse"):
                cases[f"T_v(1) {attn}"] = lambda a=attn: step(verifier, vcache, 1, a)
                cases[f"T_v({g1}) {attn}"] = lambda a=attn: step(verifier, vcache, g1, a)
            cases[f"T_d B={budget} bd_ray_sparse"] = lambda: step(drafter, dsparse, 1, "bd_ray_sparse")
            cases["T_d full bd_ray_sparse"] = lambda: step(drafter, dfull, 1, "bd_ray_sparse")
            cases["T_d full sdpa"] = lambda: step(drafter, dfull, 1, "sdpa")
            times: dict[str, list[float]] = {k: [] for k in cases}
            with torch.inference_mode():
                for f in cases.values():     # warm-up (Triton compiles here)
                    f()
                for _ in range(repeats):
                    for name, f in cases.items():   # interleaved: drift hits all alike
                        times[name].append(timed(f))
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            rec["ms"] = ms
            rec["verify_ratio"] = {a: ms[f"T_v({g1}) {a}"] / ms[f"T_v(1) {a}"] for a in ("sdpa", "bd_ray_sparse")}
            best_v = min(("sdpa", "bd_ray_sparse"), key=lambda a: ms[f"T_v(1) {a}"])
            drafters = {f"B={budget}": ms[f"T_d B={budget} bd_ray_sparse"],
                        "full": min(ms["T_d full bd_ray_sparse"], ms["T_d full sdpa"])}
            rec["drafter_ratio"] = {k: v / ms[f"T_v(1) {best_v}"] for k, v in drafters.items()}
            rec["predicted_speedup"] = {
                a: {d: {str(al): predicted_speedup(al, gamma, ms[f"T_v(1) {a}"], ms[f"T_v({g1}) {a}"], td)
                        for al in alphas} for d, td in drafters.items()}
                for a in ("sdpa", "bd_ray_sparse")}
            log(f"[step_costs] context {ctx} rows {rows}: " + "  ".join(f"{k} {v:.2f}ms" for k, v in ms.items()))
            log(f"[step_costs]   T_v({g1})/T_v(1) " + " ".join(f"{a} {r:.2f}" for a, r in rec["verify_ratio"].items())
                + "; T_d/T_v(1) " + " ".join(f"{d} {r:.3f}" for d, r in rec["drafter_ratio"].items())
                + f"; predicted speedup ({best_v}, B={budget}) "
                + " ".join(f"α={al}: {v:.2f}x" for al, v in rec["predicted_speedup"][best_v][f"B={budget}"].items()))
            del vcache, dfull, dsparse
            if on_config is not None:
                on_config(report)
    return report


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    if args.random_pair:
        report = random_pair_costs(args.contexts, args.batches, args.gamma, args.budget, args.alphas, args.device,
                                   args.dtype, args.repeats, tiny=args.tiny)
        report["command"] = "python benchmarks/step_costs.py " + " ".join(sys.argv[1:] if argv is None else argv)
        if args.json:
            import json
            from pathlib import Path

            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(report, indent=1))
        return 0
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
