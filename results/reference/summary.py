#!/usr/bin/env python
"""The reference matrix's headline figures from results.json (what the closing note states):
for every context, at B = 256 and γ = 2 (the best fixed γ for every drafter here), α of each
drafter, BudgetDraft's α at B = 256 as a fraction of its full-cache α, the best measured speedup
vs AR per drafter (fixed γ and adaptive), and the lossless count.

    python results/reference/summary.py [results/reference/results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str = "results/reference/results.json") -> int:
    r = json.loads(Path(path).read_text())
    cells = r["cells"]

    def cell(ctx, drafter, budget, gamma, mode="greedy"):
        hit = [c for c in cells if (c["context"], c["drafter"], c["budget"], c["gamma"], c["mode"])
               == (ctx, drafter, budget, gamma, mode)]
        return hit[0] if hit else None

    drafters = sorted({c["drafter"] for c in cells})
    for ctx in sorted({c["context"] for c in cells}):
        n = max(c["n_prompts"] for c in cells if c["context"] == ctx)
        print(f"context {ctx}: {n} held-out prompts per cell")
        for d in drafters:
            a256, afull = cell(ctx, d, "256", 2), cell(ctx, d, "full", 2)
            if not a256 or not afull:
                continue
            fixed = max((c for c in cells if c["context"] == ctx and c["drafter"] == d and c["mode"] == "greedy"),
                        key=lambda c: c["speedup"] or 0)
            adaptive = [c["speedup"] for c in cells if c["context"] == ctx and c["drafter"] == d
                        and c["mode"] != "greedy" and c["speedup"] is not None]
            print(f"  {d:12s} α(B=256, γ=2) {a256['alpha']:.3f}  α(full, γ=2) {afull['alpha']:.3f}  "
                  f"ratio {a256['alpha'] / afull['alpha']:.2f}  first-draft acc. B=256 "
                  f"{a256['per_position_acceptance'][0]:.2f}  best fixed-γ speedup {fixed['speedup']:.2f}x "
                  f"(B={fixed['budget']}, γ={fixed['gamma']})"
                  + (f"  adaptive {min(adaptive):.2f}-{max(adaptive):.2f}x" if adaptive else ""))
    ll = r["lossless"]
    print(f"lossless: {ll['checked']} greedy runs compared with AR, {len(ll['failures'])} differ")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
