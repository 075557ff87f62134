r"""``python -m bd_ray.generate``: one prompt through the speculative engine, text and metrics out.

Example::

    python -m bd_ray.generate --verifier smollm2-135m --budget 256 --gamma 4 \
        --prompt "It is a truth universally acknowledged" --max-new-tokens 64 --compare-ar

The drafter is the shipped BudgetDraft reference drafter (``reference-budgetdraft``, drafters/)
unless ``--drafter`` names another (checkpoint dir or shipped name) or ``--drafter-layers N`` asks
for the untrained init (the verifier's first N layers). A drafter with a ``draft_vocab.json``
decodes with it (``bd_ray.models.load_drafter``).
"""

from __future__ import annotations

import argparse
import json
import sys

from bd_ray.config import Budget, SamplingConfig, SparsePolicyConfig, SpecConfig, check_budget, parse_budget
from bd_ray.reference_drafters import DEFAULT_DRAFTER


def _positive_int(text: str) -> int:
    """An argparse value that must be a whole number >= 1.

    Raises:
        argparse.ArgumentTypeError: not a whole number, or below 1.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _budget(text: str) -> Budget:
    """``--budget`` value: a whole number of tokens >= 1, or ``full`` (:func:`bd_ray.config.parse_budget`)."""
    try:
        return parse_budget(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}, got {text!r}") from None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bd_ray.generate", description=__doc__.splitlines()[0])
    p.add_argument("--verifier", default="smollm2-135m", help="embedded name or HF checkpoint dir")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--drafter", help="drafter: an HF checkpoint dir (e.g. a trained BudgetDraft drafter) or a shipped "
                                          f"drafter name (drafters/README.md; default {DEFAULT_DRAFTER})")
    src.add_argument("--drafter-layers", type=_positive_int, default=None,
                     help="untrained drafter instead: the verifier's first N layers")
    pr = p.add_mutually_exclusive_group(required=True)
    pr.add_argument("--prompt", help="prompt text")
    pr.add_argument("--prompt-file", help="file holding the prompt text")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64)
    p.add_argument("--gamma", type=_positive_int, default=4,
                   help="the largest draft length the speculation policy may choose (with --fixed-gamma: every step's)")
    p.add_argument("--fixed-gamma", action="store_true",
                   help="draft exactly --gamma tokens every step (default: the speculation policy chooses "
                        "gamma per step by measured tokens/s, 0 when speculation cannot pay)")
    p.add_argument("--budget", type=_budget, default=256,
                   help="drafter KV budget in tokens, or 'full' (at least the policy's minimum for the prompt, "
                        "bd_ray.sparse.min_budget)")
    p.add_argument("--policy", default="chunk_topk", choices=["chunk_topk", "streaming", "snapkv"])
    p.add_argument("--recent", type=_positive_int, default=64,
                   help="recent-window tokens the sparse policy always keeps (default 64: the policy the shipped "
                        "drafters were trained with, as in serve_configs/default.yaml)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--compare-ar", action="store_true", help="also run plain decoding and print the speedup")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one prompt and print the text and metrics (``--json``: the full result).

    Returns:
        0 on success. Invalid arguments exit with status 2 through argparse, the message naming
        the option: a ``--budget`` that is not a number or ``full``, or below the sparse policy's
        minimum for this prompt (:func:`bd_ray.sparse.min_budget`, checked once the prompt is
        tokenized); a ``--prompt-file`` that cannot be read. Errors of the models themselves
        (a missing checkpoint, mismatched tokenizers, prompt + ``--max-new-tokens`` beyond the
        verifier's positions) propagate as exceptions.
    """
    p = _parser()
    args = p.parse_args(argv)
    text = args.prompt
    if text is None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            p.error(f"--prompt-file {args.prompt_file}: {exc}")
    from bd_ray import models
    from bd_ray.sparse import min_budget
    from bd_ray.speculative.engine import ARGenerator, SpeculativeGenerator

    verifier, tok = models.load_verifier(args.verifier)
    if args.drafter_layers is not None:
        drafter = models.init_drafter_from_verifier(verifier, args.drafter_layers)
    else:
        drafter, _ = models.load_drafter(args.drafter or DEFAULT_DRAFTER, tok, verifier=verifier)
    policy = SparsePolicyConfig(name=args.policy, recent=args.recent)
    spec = SpecConfig(gamma=args.gamma, budget=args.budget, policy=policy,
                      adaptive=not args.fixed_gamma)
    sampling = SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              max_new_tokens=args.max_new_tokens, stop=args.stop)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    # The minimum depends on the prompt's length (the policy always keeps chunk 0, the trailing
    # partial chunk and the recent window), so it is known only now; the engine would raise it
    # as a ValueError traceback from deep inside the drafter's cache.
    need = min_budget(spec.policy, len(ids)) if ids else 1
    try:
        check_budget(spec.budget, need, args.policy, f"for this {len(ids)}-token prompt")
    except ValueError as exc:
        p.error(f"argument --budget: {exc}; use --budget {need} or more, or --budget full")
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
