r"""``python -m bd_ray.generate``: one prompt through the speculative engine, text and metrics out.

Example::

    python -m bd_ray.generate --verifier smollm2-135m --drafter-layers 4 --budget 256 --gamma 4 \
        --prompt "It is a truth universally acknowledged" --max-new-tokens 64 --compare-ar
"""

from __future__ import annotations

import argparse
import json
import sys

from bd_ray.config import SamplingConfig, SparsePolicyConfig, SpecConfig


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bd_ray.generate", description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="smollm2-135m", help="embedded name or HF checkpoint dir")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--drafter", help="drafter HF checkpoint dir (e.g. a trained BudgetDraft drafter)")
    src.add_argument("--drafter-layers", type=int, default=4,
                     help="untrained drafter: the verifier's first N layers (default 4)")
    pr = p.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompt", help="prompt text")
    pr.add_argument("--prompt-file", help="file holding the prompt text")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--gamma", type=int, default=4, help="draft length (the cap with --adaptive)")
    p.add_argument("--adaptive", action="store_true",
                   help="choose gamma per cycle by measured tokens/s; stop speculating when it cannot pay")
    p.add_argument("--budget", default="256", help="KV budget in tokens, or 'full'")
    p.add_argument("--policy", default="chunk_topk", choices=["chunk_topk", "streaming", "snapkv"])
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--compare-ar", action="store_true", help="also run plain decoding and print the speedup")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from bd_ray import models
    from bd_ray.spec.engine import ARGenerator, SpeculativeGenerator

    verifier, tok = models.load_verifier(args.verifier)
    if args.drafter:
        drafter, _ = models.load_drafter(args.drafter, tok)
    else:
        drafter = models.init_drafter_from_verifier(verifier, args.drafter_layers)
    budget = None if args.budget == "full" else int(args.budget)
    spec = SpecConfig(gamma=args.gamma, budget=budget, policy=SparsePolicyConfig(name=args.policy),
                      adaptive=args.adaptive)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, stop=args.stop)
    text = args.prompt if args.prompt is not None else open(args.prompt_file, encoding="utf-8").read()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    res = SpeculativeGenerator(verifier, drafter, tok, spec).generate(ids, sampling)
    out = {"speculative": res.as_dict()}
    if args.compare_ar:
        ar = ARGenerator(verifier, tok, spec.prefill_chunk).generate(ids, sampling)
        out["ar"] = ar.as_dict()
        out["speedup"] = res.tokens_per_s / ar.tokens_per_s
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    m = res.metrics
    print(res.text)
    print(f"\n[{len(ids)} prompt tokens, {len(res.token_ids)} new, finish={res.finish_reason}] "
          f"alpha={m.acceptance_rate:.3f} tau={m.mean_accepted_length:.2f} "
          f"per-position={[round(x, 2) for x in m.per_position_acceptance]} "
          f"{res.tokens_per_s:.1f} tok/s" + (f" fallback: {res.fallback_reason}" if res.fallback_reason else ""))
    if args.compare_ar:
        print(f"AR {out['ar']['tokens_per_s']:.1f} tok/s; speedup {out['speedup']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
