r"""End-to-end speedup of speculative decoding over bd-ray's own best AR, on held-out book prompts.

For each context length, the same held-out prompts (``bd_ray.evaluate.prompts.select_prompts``: test-split
works only) are decoded greedily by

* ``ar``: :class:`bd_ray.speculative.engine.ARGenerator` -- the denominator. It runs the verifier through
  exactly the code the speculative verifier uses (same KV buffers, same ``bd_ray_sparse``
  attention, same threads), so the speedup is against our own best plain decoding;
* ``sd``: :class:`SpeculativeGenerator` with a fixed γ (the paper's protocol);
* ``sd-adaptive``: the same with adaptive γ (γ is the cap; speculation stops when it cannot pay);
* for reference, on the same prompts: ``hf-generate`` (plain ``model.generate``, sdpa, DynamicCache)
  and ``hf-assisted`` (transformers' assisted generation with the same drafter, full drafter KV).

Decode tokens/s exclude prefill (both models' prefills are reported apart). Each prompt runs every
method back to back, ``--rounds`` times in mirrored order (A B C, C B A, ...), so load drift on a
shared machine that is linear in time hits all of them alike; the ratios are what to read. Greedy outputs are compared token for token with ``ar`` (``lossless``).

Usage::

    python benchmarks/speedup.py [--drafter runs/reference_2k/budgetdraft/final | from-verifier:4] \
        [--draft-vocab runs/draft_vocab/pg_mini_8192] [--contexts 1024 2048 4096] [--prompts 3] \
        [--new-tokens 64] [--gamma 4] [--budget 256] [--threads 2] [--no-hf] [--json results/speed/x.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="smollm2-135m")
    p.add_argument("--drafter", default="from-verifier:4", help="checkpoint dir or from-verifier:N")
    p.add_argument("--draft-vocab", default=None, help="draft_vocab.json (or dir) for the drafter's head")
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts per context")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=4)
    p.add_argument("--budget", default="256", help="drafter KV budget in tokens, or 'full'")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--no-hf", action="store_true", help="skip the transformers reference rows")
    p.add_argument("--rounds", type=int, default=2, help="runs of every method per prompt, in mirrored order")
    p.add_argument("--json", default=None, help="write every run and the summary here")
    return p.parse_args(argv)


def _hf_generate(model, prompt: list[int], n: int, assistant=None) -> tuple[list[int], float]:
    """transformers ``generate`` (greedy, exactly ``n`` new tokens); returns (ids, decode seconds).

    Decode time = total minus one prefill forward (last-position logits only, as generate does)
    timed separately on the same prompt: an estimate, noisier than bd-ray's own per-step timing.
    """
    ids = torch.tensor([prompt])
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=None)
    if assistant is not None:
        kw["assistant_model"] = assistant
    t = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    total = time.perf_counter() - t
    # logits_to_keep=1: generate's own prefill computes the last position's logits only
    t = time.perf_counter()
    model(ids, use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - t
    if assistant is not None:
        t = time.perf_counter()
        assistant(ids, use_cache=True, logits_to_keep=1)
        prefill += time.perf_counter() - t
    return out[0, len(prompt):].tolist(), max(total - prefill, 1e-9)


def main(argv=None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    from bd_ray import assets, models
    from bd_ray.config import SamplingConfig, SparsePolicyConfig, SpecConfig
    from bd_ray.evaluate.prompts import select_prompts
    from bd_ray.speculative.engine import ARGenerator, SpeculativeGenerator

    cmd = "python benchmarks/speedup.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"# {cmd}")
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, fp32, batch 1, greedy")
    verifier, tok = models.load_verifier(args.verifier)
    drafter, _ = models.load_drafter(args.drafter, tok, verifier=verifier, draft_vocab=args.draft_vocab
                                     if args.draft_vocab else "auto")
    hf_verifier = hf_drafter = None
    if not args.no_hf:
        hf_verifier, _ = models.load_verifier(args.verifier, attn_implementation="sdpa")
        hf_drafter, _ = models.load_drafter(args.drafter, tok, verifier=hf_verifier, draft_vocab=None,
                                            attn_implementation="sdpa")
    budget = None if args.budget == "full" else int(args.budget)
    spec = SpecConfig(gamma=args.gamma, budget=budget, policy=SparsePolicyConfig(name="chunk_topk"), adaptive=False)
    ar = ARGenerator(verifier, tok)
    sd = SpeculativeGenerator(verifier, drafter, tok, spec)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens, eos_token_ids=[])
    table = assets.load_corpus_table(assets.ensure_corpus("pg-mini"), split="test")
    prompts = select_prompts(table, tok, args.contexts, args.prompts, args.seed)

    # Warm-up on a short prompt: first calls pay one-off costs (kernel selection, allocations).
    warm = prompts[args.contexts[0]][0].token_ids[:64]
    short = SamplingConfig(temperature=0.0, max_new_tokens=8, eos_token_ids=[])
    ar.generate(warm, short)
    sd.generate(warm, short, budget=None)
    if hf_verifier is not None:
        _hf_generate(hf_verifier, warm, 8)
        _hf_generate(hf_verifier, warm, 8, hf_drafter)

    runs: list[dict] = []
    summary: dict[int, dict] = {}
    for ctx in args.contexts:
        rates: dict[str, list[tuple[int, float]]] = {}
        for p in prompts[ctx]:
            pre = sd.prefill(p.token_ids)
            want = ar.generate(p.token_ids, greedy, prefilled=pre.verifier).token_ids   # also a warm-up
            methods = {
                "ar": lambda: ar.generate(p.token_ids, greedy, prefilled=pre.verifier),
                "sd": lambda: sd.generate(p.token_ids, greedy, prefilled=pre, adaptive=False),
                "sd-adaptive": lambda: sd.generate(p.token_ids, greedy, prefilled=pre, adaptive=True)}
            if hf_verifier is not None:
                methods["hf-generate"] = lambda: _hf_generate(hf_verifier, p.token_ids, args.new_tokens)
                methods["hf-assisted"] = lambda: _hf_generate(hf_verifier, p.token_ids, args.new_tokens, hf_drafter)
            row = {"context": ctx, "prompt_id": p.prompt_id, "verifier_prefill_s": pre.verifier_s,
                   "drafter_prefill_s": pre.drafter_s}
            for r in range(args.rounds):
                for name in (list(methods) if r % 2 == 0 else list(methods)[::-1]):
                    res = methods[name]()
                    if isinstance(res, tuple):                       # transformers rows
                        ids, decode_s = res
                        rec = {"lossless": ids == want}
                    else:
                        ids = res.token_ids
                        decode_s = res.timings.total_s - res.timings.verifier_prefill_s - res.timings.drafter_prefill_s
                        rec = {"alpha": res.metrics.acceptance_rate, "tau": res.metrics.mean_accepted_length,
                               "lossless": ids == want, "adaptive": res.adaptive}
                    rates.setdefault(name, []).append((len(ids), decode_s))
                    prev = row.get(name)
                    rec["tokens_per_s"] = len(ids) / decode_s
                    rec["rounds_tokens_per_s"] = (prev["rounds_tokens_per_s"] if prev else []) + [rec["tokens_per_s"]]
                    rec["lossless"] = rec["lossless"] and (prev["lossless"] if prev else True)
                    row[name] = rec
            runs.append(row)
            print(f"  {p.prompt_id}: " + ", ".join(
                f"{k} " + "/".join(f"{x:.1f}" for x in row[k]["rounds_tokens_per_s"]) + " tok/s" for k in methods),
                flush=True)
        pooled = {k: sum(n for n, _ in v) / sum(s for _, s in v) for k, v in rates.items()}
        summary[ctx] = {"tokens_per_s": pooled, "speedup_vs_ar": {k: r / pooled["ar"] for k, r in pooled.items()},
                        "alpha_sd": statistics.mean(r["sd"]["alpha"] for r in runs if r["context"] == ctx),
                        "lossless": all(r[k]["lossless"] for r in runs if r["context"] == ctx
                                        for k in ("sd", "sd-adaptive"))}
        print(f"\n## context {ctx}: pooled decode tokens/s and speedup vs bd-ray AR "
              f"(γ={args.gamma}, B={args.budget}, α(sd)={summary[ctx]['alpha_sd']:.3f}, "
              f"lossless={summary[ctx]['lossless']})")
        for k, r in pooled.items():
            print(f"  {k:<12} {r:7.2f} tok/s   {summary[ctx]['speedup_vs_ar'][k]:5.2f}x")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"command": cmd, "machine": platform.processor() or platform.machine(),
                                               "threads": torch.get_num_threads(), "summary": summary,
                                               "runs": runs}, indent=1, default=str))
    if not all(s["lossless"] for s in summary.values()):
        print("LOSSLESS CHECK FAILED: a speculative output differs from AR", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
