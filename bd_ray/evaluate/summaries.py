"""README figures from a finished ``results.json``: the per-drafter summary table and the headline
figures (``python jobs/evaluate.py report table|summary --results PATH``).

Fixed-γ cells are those of mode ``mode`` (default ``greedy``); the adaptive range is over the
cells of every mode with ``adaptive: true`` in the run's config. Intervals and the paired
comparison are recomputed from the ``runs`` (:mod:`bd_ray.evaluate.aggregate`), so results written
before they existed get them too.
"""

from __future__ import annotations

from bd_ray.config.evaluate import budget_label
from bd_ray.evaluate.intervals import cell_intervals, prompt_statistics, report_settings

__all__ = ["summary_table", "headline_summary", "plain_summary", "lossless_line", "format_ci"]


def format_ci(ci: list[float] | None, fmt: str = ".2f") -> str:
    """``[lo, hi]`` of an interval in ``fmt``, ``–`` when there is none."""
    return "–" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def lossless_line(ll: dict) -> str:
    """One line for ``results.json``'s ``lossless`` block (:func:`bd_ray.evaluate.aggregate.lossless_report`;
    blocks written before the bf16 rule, without ``mode``, are exact-mode ones)."""
    if ll.get("mode", "exact") == "exact":
        return f"{ll['checked']} greedy runs compared with AR, {len(ll['failures'])} differ"
    differ = ll.get("differ", [])
    agree = "n/a" if ll.get("agreement") is None else f"{ll['agreement']:.3f}"
    first = (f", first divergence at token {min(d['first_difference'] for d in differ)}" if differ else "")
    return (f"{ll['checked']} greedy runs compared with AR as agreement ({ll['dtype']}: exact equality is "
            f"not expected below fp32): {agree} of tokens equal, {len(differ)} diverge{first}")


def _adaptive_modes(results: dict) -> set[str]:
    return {m["name"] for m in results["config"]["matrix"]["modes"] if m.get("adaptive")}


def _cell(cells: list[dict], ctx: int, drafter: str, budget: str, gamma: int, mode: str) -> dict | None:
    """The cell of ``drafter`` at context ``ctx``, ``budget`` (label), ``gamma`` and ``mode``, if measured."""
    hit = [c for c in cells if (c["context"], c["drafter"], c["budget"], c["gamma"], c["mode"])
           == (ctx, drafter, budget, gamma, mode)]
    return hit[0] if hit else None


def _adaptive_range(cells: list[dict], adaptive: set[str]) -> list[float]:
    return [c["speedup"] for c in cells if c["mode"] in adaptive and c["speedup"] is not None]


def summary_table(results: dict, gamma: int = 2, budget: str = "256", mode: str = "greedy") -> str:
    """The README's Markdown table: per context and drafter (config order), α at ``gamma`` for
    every budget, first-draft acceptance at ``budget``, the best fixed-γ speedup vs AR (with its
    budget and γ) and the adaptive modes' speedup range, with the number of held-out prompts."""
    cells = results["cells"]
    cfg = results["config"]
    budgets = [budget_label(None if b == "full" else b) for b in cfg["matrix"]["budgets"]]
    adaptive = _adaptive_modes(results)
    caps = sorted({g for m in cfg["matrix"]["modes"] if m.get("adaptive") for g in (m.get("gammas") or [])})
    cap = f" (γ cap {'/'.join(map(str, caps))})" if caps else ""
    lines = ["| context | drafter | prompts | " + " | ".join(f"α B={b}" for b in budgets)
             + f" | first-draft acc. B={budget} | best fixed-γ speedup | adaptive{cap} |",
             "|---" * (6 + len(budgets)) + "|"]
    for ctx in sorted({c["context"] for c in cells}):
        for d in cfg["models"]["drafters"]:
            mine = [c for c in cells if c["context"] == ctx and c["drafter"] == d]
            at_gamma = {c["budget"]: c for c in mine if c["mode"] == mode and c["gamma"] == gamma}
            if not at_gamma:
                continue
            fixed = [c for c in mine if c["mode"] == mode and c["speedup"] is not None]
            best = max(fixed, key=lambda c: c["speedup"])
            ad = _adaptive_range(mine, adaptive)
            n = sorted({c["n_prompts"] for c in mine})
            first = at_gamma[budget]["per_position_acceptance"][0] if budget in at_gamma else None
            lines.append(f"| {ctx} | {d} | {n[0]}" + (f"-{n[-1]}" if len(n) > 1 else "") + " | "
                         + " | ".join(f"{at_gamma[b]['alpha']:.3f}" if b in at_gamma else "-" for b in budgets)
                         + (f" | {first:.2f}" if first is not None else " | -")
                         + f" | {best['speedup']:.2f}x (B={best['budget']}, γ={best['gamma']}) | "
                         + (f"{min(ad):.2f}-{max(ad):.2f}x" if ad else "-") + " |")
    return "\n".join(lines)


def headline_summary(results: dict, gamma: int = 2, budget: str = "256", mode: str = "greedy") -> str:
    """The headline figures, per context: α of each drafter at ``budget`` and full cache (at
    ``gamma``), their ratio (how much of its full-cache α a drafter keeps), first-draft acceptance,
    the best fixed-γ speedup vs AR, the adaptive range; each α with its bootstrap interval over
    prompts; per context the paired per-prompt differences (``report.paired``) at ``budget`` and
    full, and the prompts flagged as outliers there; then the lossless count."""
    cells = results["cells"]
    adaptive = _adaptive_modes(results)
    rep = report_settings(results["config"])
    stats = prompt_statistics(results, gamma)
    level = f"{100 * rep.confidence:g} %"

    def alpha(c):
        ci = c.get("alpha_ci")
        if "alpha_ci" not in c:   # results written before the intervals: recompute from the runs
            rs = [r for r in results["runs"] if r["kind"] == "sd" and r["cell_id"] == c["cell_id"] and "error" not in r]
            ci = cell_intervals(rs, None, rep)["alpha_ci"] if rs else None
        return f"{c['alpha']:.3f} {format_ci(ci, '.3f')}"

    out = []
    drafters = sorted({c["drafter"] for c in cells})
    for ctx in sorted({c["context"] for c in cells}):
        n = max(c["n_prompts"] for c in cells if c["context"] == ctx)
        out.append(f"context {ctx}: {n} held-out prompts per cell")
        for d in drafters:
            at_b, full = _cell(cells, ctx, d, budget, gamma, mode), _cell(cells, ctx, d, "full", gamma, mode)
            if not at_b or not full:
                continue
            fixed = max((c for c in cells if c["context"] == ctx and c["drafter"] == d and c["mode"] == mode),
                        key=lambda c: c["speedup"] or 0)
            ad = _adaptive_range([c for c in cells if c["context"] == ctx and c["drafter"] == d], adaptive)
            out.append(f"  {d:12s} α(B={budget}, γ={gamma}) {alpha(at_b)}  α(full, γ={gamma}) "
                       f"{alpha(full)}  ratio {at_b['alpha'] / full['alpha']:.2f}  first-draft acc. "
                       f"B={budget} {at_b['per_position_acceptance'][0]:.2f}  best fixed-γ speedup "
                       f"{fixed['speedup']:.2f}x (B={fixed['budget']}, γ={fixed['gamma']})"
                       + (f"  adaptive {min(ad):.2f}-{max(ad):.2f}x" if ad else ""))
        for p in stats["paired"]:
            if (p["context"], p["gamma"], p["mode"]) == (ctx, gamma, mode) and p["budget"] in (budget, "full"):
                out.append(f"  {p['drafter_a']} - {p['drafter_b']} B={p['budget']}: mean per-prompt Δα "
                           f"{p['mean_diff']:+.3f} {format_ci(p['mean_diff_ci'], '+.3f')} ({level}, "
                           f"{p['n_prompts']} prompts, wins {p['a_wins']}/{p['b_wins']}; interval "
                           f"{'excludes' if p['mean_diff_excludes_zero'] else 'includes'} 0), pooled Δα "
                           f"{p['pooled_diff']:+.3f} {format_ci(p['pooled_diff_ci'], '+.3f')}")
        flagged = [f"{q} ({c['drafter']} B={c['budget']}: α {c['prompt_alpha'][q]:.3f}, median {c['median']:.3f})"
                   for c in stats["per_prompt"]["columns"] if (c["context"], c["mode"]) == (ctx, mode)
                   and c["budget"] in (budget, "full") for q in c["outliers"]]
        out.append(f"  outlier prompts (> {rep.outlier_sds:g} robust SDs from the median): "
                   + ("; ".join(flagged) if flagged else "none"))
    ll = results["lossless"]
    out.append(f"lossless: {lossless_line(ll)}")
    return "\n".join(out)


def plain_summary(results: dict, budget: str = "256", gamma: int = 4, mode: str = "greedy") -> str:
    """What a results table says, in plain words (``make demo`` prints it under the table): per
    context, each drafter's acceptance at full cache and at ``budget`` (α at ``gamma``), the share of
    its full-cache acceptance it keeps, the paired difference of ``report.paired`` at ``budget``,
    the lossless check, and the best speedup of each drafter over all budgets (fixed γ and adaptive
    modes)."""
    cells = results["cells"]
    adaptive = _adaptive_modes(results)
    stats = prompt_statistics(results, gamma)

    out = []
    for ctx in sorted({c["context"] for c in cells}):
        n = max(c["n_prompts"] for c in cells if c["context"] == ctx)
        out.append(f"At {ctx:,} tokens of context ({n} held-out prompts, the verifier always keeps its full "
                   f"KV cache, γ = {gamma}):")
        for d in results["config"]["models"]["drafters"]:
            full, at_b = _cell(cells, ctx, d, "full", gamma, mode), _cell(cells, ctx, d, budget, gamma, mode)
            if full is None or at_b is None:
                continue
            kept = f"{at_b['alpha'] / full['alpha']:.0%}" if full["alpha"] > 0 else "n/a"
            mine = [c for c in cells if c["context"] == ctx and c["drafter"] == d and c["speedup"] is not None]
            fixed = [c["speedup"] for c in mine if c["mode"] == mode]
            ad = _adaptive_range(mine, adaptive)
            out.append(f"- {d}: {full['alpha']:.0%} of its drafted tokens accepted with a full drafter cache, "
                       f"{at_b['alpha']:.0%} when it keeps only {budget} KV entries ({kept} of its full-cache "
                       f"acceptance); first drafted token accepted {at_b['per_position_acceptance'][0]:.0%} "
                       f"of the time at B={budget}; speed vs plain decoding: best fixed γ "
                       f"{max(fixed):.2f}x" + (f", adaptive γ {max(ad):.2f}x (best budget)" if ad else "")
                       + " (above 1 = speculation pays).")
        for p in stats["paired"]:
            if (p["context"], p["gamma"], p["mode"], p["budget"]) == (ctx, gamma, mode, budget):
                sure = ("the interval excludes 0" if p["mean_diff_excludes_zero"]
                        else "the interval includes 0: not a significant difference with these prompts")
                out.append(f"- {p['drafter_a']} - {p['drafter_b']} at B={budget}: {p['mean_diff']:+.3f} "
                           f"acceptance per prompt on average, 95 % interval "
                           f"{format_ci(p['mean_diff_ci'], '+.3f')} ({sure}).")
    out.append(f"Lossless: {lossless_line(results['lossless'])} (speculation must not change a greedy output).")
    return "\n".join(out)
