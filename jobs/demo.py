"""The README demo (``make demo``): the main job on the embedded default, step by step.

Steps (each prints progress; the whole run fits a 2-core machine):
1. assets: the SmolLM2 verifier and the pg-mini books (``jobs/prepare_data.py``, cached);
2. speculative vs plain decoding on a held-out book prompt with the untrained drafter (the
   verifier's first 4 layers), greedy, at a few KV budgets: α, τ, tokens/s, lossless check.

Usage: ``python jobs/demo.py [--context 2048] [--new-tokens 64]``
"""

from __future__ import annotations

import argparse
import sys
import time


def _held_out_prompt(tok, context: int) -> list[int]:
    from bd_ray import assets

    rows = assets.load_corpus_table(assets.ensure_corpus("pg-mini")).to_pylist()
    doc = max((r for r in rows if r["split"] == "test"), key=lambda r: len(r["text"]))
    text = doc["text"]
    ids = tok(text[len(text) // 2: len(text) // 2 + 6 * context], add_special_tokens=False)["input_ids"]
    print(f"  prompt: {context} tokens from held-out work {doc['title']!r} ({doc['author']})")
    return ids[:context]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args(argv)

    from bd_ray import models
    from bd_ray.config import SamplingConfig, SpecConfig
    from bd_ray.spec.engine import ARGenerator, SpeculativeGenerator

    t0 = time.time()
    print("[1/2] embedded assets")
    verifier, tok = models.load_verifier("smollm2-135m")
    drafter = models.init_drafter_from_verifier(verifier, 4)
    prompt = _held_out_prompt(tok, args.context)

    print("[2/2] speculative vs plain decoding (greedy, untrained 4-layer drafter)")
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
    sd = SpeculativeGenerator(verifier, drafter, tok, SpecConfig(gamma=4))
    pre = sd.prefill(prompt)
    ar = ARGenerator(verifier, tok).generate(prompt, sampling, prefilled=pre.verifier)
    print(f"  AR: {ar.tokens_per_s:.1f} tok/s")
    print(f"  {'budget':>8} {'gamma':>5} {'alpha':>6} {'tau':>5} {'tok/s':>7} {'speedup':>7} lossless")
    ok = True
    for budget in (128, 256, None):
        res = sd.generate(prompt, sampling, budget=budget, prefilled=pre)
        same = res.token_ids == ar.token_ids
        ok &= same
        print(f"  {str(budget or 'full'):>8} {4:>5} {res.metrics.acceptance_rate:>6.3f} "
              f"{res.metrics.mean_accepted_length:>5.2f} {res.tokens_per_s:>7.1f} "
              f"{res.tokens_per_s / ar.tokens_per_s:>6.2f}x {'yes' if same else 'NO'}")
    print(f"  text: {ar.text[:200]!r}")
    print(f"done in {time.time() - t0:.0f} s")
    if not ok:
        print("ERROR: speculative output differs from plain greedy decoding", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
