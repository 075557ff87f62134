#!/usr/bin/env python
"""Print the README's summary table of the reference matrix from results.json: per context and
drafter, α at γ = 2 for each budget, first-draft acceptance at B = 256, the best fixed-γ speedup
vs AR and the adaptive-mode range, with the number of held-out prompts behind each figure.

    python results/reference/table.py [results/reference/results.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str = "results/reference/results.json") -> int:
    cells = json.loads(Path(path).read_text())["cells"]
    budgets = ["128", "256", "512", "full"]
    print("| context | drafter | prompts | " + " | ".join(f"α B={b}" for b in budgets)
          + " | first-draft acc. B=256 | best fixed-γ speedup | adaptive (γ cap 8) |")
    print("|---" * (6 + len(budgets)) + "|")
    for ctx in sorted({c["context"] for c in cells}):
        for d in ("budgetdraft", "naive", "init4"):
            mine = [c for c in cells if c["context"] == ctx and c["drafter"] == d]
            g2 = {c["budget"]: c for c in mine if c["mode"] == "greedy" and c["gamma"] == 2}
            if not g2:
                continue
            fixed = [c for c in mine if c["mode"] == "greedy" and c["speedup"] is not None]
            best = max(fixed, key=lambda c: c["speedup"])
            ad = [c["speedup"] for c in mine if c["mode"] != "greedy" and c["speedup"] is not None]
            n = sorted({c["n_prompts"] for c in mine})
            print(f"| {ctx} | {d} | {n[0]}" + (f"-{n[-1]}" if len(n) > 1 else "") + " | "
                  + " | ".join(f"{g2[b]['alpha']:.3f}" if b in g2 else "-" for b in budgets)
                  + f" | {g2['256']['per_position_acceptance'][0]:.2f} | {best['speedup']:.2f}x "
                  f"(B={best['budget']}, γ={best['gamma']}) | "
                  + (f"{min(ad):.2f}-{max(ad):.2f}x" if ad else "-") + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
