"""The outputs of an evaluation run: ``results.json``, the Markdown report and the PNG plots.

``results.md`` has the setup, the best γ per budget, every cell (with bootstrap intervals over
prompts), the paired per-prompt comparison of drafters, the per-prompt α table with its flagged
outliers, the needle check and the lossless check; ``acceptance_vs_budget_<mode>.png`` plots α at ``report.alpha_gamma`` against the
budget (one panel per context, one line per drafter and policy), ``speedup_vs_gamma_<mode>.png``
the speedup against γ (one line per drafter, policy and budget).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from bd_ray.config import FULL_BUDGET
from bd_ray.evaluate.intervals import prompt_statistics
from bd_ray.evaluate.summaries import format_ci, lossless_line

__all__ = ["render_markdown", "make_plots", "write_outputs", "json_default"]


def _f(x: Any, fmt: str = ".2f") -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return format(x, fmt) if math.isfinite(x) else "inf"
    return str(x)


def render_markdown(results: dict) -> str:
    """The Markdown report: setup, best gamma per budget, every cell, the paired comparison and the
    per-prompt α table (when ``results`` has them: :func:`write_outputs` adds them), needle, lossless."""
    cfg = results["config"]
    mach = results["machine"]
    lines = ["# bd-ray evaluation matrix", ""]
    w = (mach.get("workers") or [{}])[0]
    lines += [f"- verifier `{cfg['models']['verifier']}`; drafters: "
              + ", ".join(f"`{k}` = `{v}`" for k, v in cfg["models"]["drafters"].items()),
              f"- {cfg['data']['prompts_per_context']} held-out prompts per context (corpus `{cfg['data']['corpus']}`, "
              f"split test, seed {cfg['data']['seed']}), {cfg['matrix']['max_new_tokens']} new tokens, "
              f"contexts {cfg['matrix']['contexts']} tokens",
              f"- machine: {mach['driver']['cpu_count']} CPUs, torch {mach['driver']['torch']}, "
              + (f"device {w.get('device', '?')} ({w.get('device_name', '')}), {w.get('torch_threads', '?')} torch "
                 f"threads per worker, {len(mach['workers'])} worker(s)" if mach.get("workers") else
                 f"torch threads {cfg['run']['torch_threads']}; no worker started in this run (every "
                 f"measurement from the journal; each run records its host and load)"),
              f"- isolation: {results['isolation']}",
              f"- wall time of this run {results['wall_s']:.0f} s; decoding measured over all runs "
              f"{sum(r.get('decode_s') or 0.0 for r in results['runs']):.0f} s"
              + (f"; report only: {results['missing']} measurements of the matrix not measured yet (left out)"
                 if results.get("missing") else ""),
              "- α = accepted/drafted, τ = 1 + accepted/cycles; tokens/s = decode throughput after prefill "
              "(pooled over prompts); speedup = SD tok/s / AR tok/s on the same prompts, AR measured right "
              "before each drafter's cells; step times in ms per cycle; cache = peak drafter KV entries per layer "
              "and KV head; plain = steps decoded without speculation (adaptive modes)",
              f"- intervals: {_level(cfg)} percentile bootstrap over prompts (prompts resampled with replacement, "
              f"the pooled statistic recomputed; {_rep(cfg, 'bootstrap_resamples', 2000)} resamples, seed "
              f"{_rep(cfg, 'bootstrap_seed', 0)}); they cover prompt-to-prompt spread only, and with few prompts "
              "(below ~10) a percentile bootstrap is too narrow: read such intervals as a rough guide", ""]
    lines += ["## Best gamma (by measured SD tokens/s)", "",
              "| context | mode | drafter | policy | budget | best γ | α | τ | SD tok/s | AR tok/s | speedup |",
              "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in results["best_gamma"]:
        lines.append(f"| {b['context']} | {b['mode']} | {b['drafter']} | {b['policy']} | {b['budget']} | {b['gamma']} | "
                     f"{_f(b['alpha'])} | {_f(b['tau'])} | {_f(b['sd_tokens_per_s'], '.1f')} | "
                     f"{_f(b['ar_tokens_per_s'], '.1f')} | {_f(b['speedup'])}× |")
    lines += ["", "## All cells", "",
              "| context | mode | drafter | policy | budget | γ | α | α CI | τ | τ CI | per-position acceptance | "
              "SD tok/s | AR tok/s | speedup | speedup CI | draft ms | verify ms | cache | plain | lossless |",
              "|---:|---|---|---|---:|---:|---:|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|"]
    for c in results["cells"]:
        pp = " ".join(f"{x:.2f}" for x in c["per_position_acceptance"])
        ms = lambda s: _f(s * 1e3 if s is not None else None, ".1f")  # noqa: E731
        lines.append(f"| {c['context']} | {c['mode']} | {c['drafter']} | {c['policy']} | {c['budget']} | {c['gamma']} | "
                     f"{_f(c['alpha'], '.3f')} | {format_ci(c.get('alpha_ci'), '.3f')} | {_f(c['tau'])} | "
                     f"{format_ci(c.get('tau_ci'))} | {pp} | {_f(c['sd_tokens_per_s'], '.1f')} | "
                     f"{_f(c['ar_tokens_per_s'], '.1f')} | {_f(c['speedup'])}× | {format_ci(c.get('speedup_ci'))} | "
                     f"{ms(c['draft_step_s'])} | "
                     f"{ms(c['verify_step_s'])} | {c['drafter_cache']} | {c['plain_steps']} | {c['lossless']} |")
    lines += _paired_lines(results.get("paired"), cfg)
    lines += _per_prompt_lines(results.get("per_prompt"))
    if results.get("needle"):
        lines += ["", "## Needle (passkey) check", "",
                  "| context | drafter | policy | budget | γ | AR retrieved | SD retrieved | α needle | α ordinary | "
                  "needle kept |", "|---:|---|---|---:|---:|---|---|---:|---:|---:|"]
        for n in results["needle"]:
            lines.append(f"| {n['context']} | {n['drafter']} | {n['policy']} | {n['budget']} | {n['gamma']} | "
                         f"{'yes' if n['ar_retrieved'] else 'no'} | {'yes' if n['sd_retrieved'] else 'no'} | "
                         f"{_f(n['alpha_needle'])} | {_f(n['alpha_ordinary'])} | {_f(n['needle_kept_fraction'])} |")
    ll = results["lossless"]
    lines += ["", f"## Lossless check: {lossless_line(ll)}", ""]
    for f in ll["failures"]:
        lines.append(f"- FAIL {f['cell_id']} prompt {f['prompt_id']}: first difference at token {f['first_difference']}")
    if ll.get("mode") == "agreement":
        for f in ll["differ"]:
            lines.append(f"- {f['cell_id']} prompt {f['prompt_id']}: first divergence at token "
                         f"{f['first_difference']}, agreement {f['agreement']:.3f}")
    if results.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e['item']}: {e['error']}" for e in results["errors"]]
    if results.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in results["plots"]]
    return "\n".join(lines) + "\n"


def _rep(cfg: dict, key: str, default: Any) -> Any:
    return (cfg.get("report") or {}).get(key, default)


def _level(cfg: dict) -> str:
    return f"{100 * _rep(cfg, 'confidence', 0.95):g} %"


def _paired_lines(paired: list[dict] | None, cfg: dict) -> list[str]:
    """The paired comparison section: per pair and cell, the per-prompt α difference A - B."""
    if not paired:
        return []
    lines = ["", "## Paired comparison (same prompts, α of drafter A - drafter B)", "",
             f"Per prompt Δα = α_A - α_B; mean Δα with its {_level(cfg)} paired bootstrap interval (prompts "
             "resampled once for both drafters); pooled Δα = pooled α_A - pooled α_B with its interval from the "
             "same resamples; wins = prompts where A's α is higher / lower; *yes* = the interval excludes 0.", "",
             "| A - B | context | mode | policy | budget | γ | prompts | α A | α B | mean Δα | CI | excludes 0 | "
             "pooled Δα | CI | excludes 0 | wins A/B |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---|---|---|"]
    for p in paired:
        lines.append(f"| {p['drafter_a']} - {p['drafter_b']} | {p['context']} | {p['mode']} | {p['policy']} | "
                     f"{p['budget']} | {p['gamma']} | {p['n_prompts']} | {_f(p['alpha_a'], '.3f')} | "
                     f"{_f(p['alpha_b'], '.3f')} | {p['mean_diff']:+.3f} | {format_ci(p['mean_diff_ci'], '+.3f')} | "
                     f"{'yes' if p['mean_diff_excludes_zero'] else 'no'} | {p['pooled_diff']:+.3f} | "
                     f"{format_ci(p['pooled_diff_ci'], '+.3f')} | {'yes' if p['pooled_diff_excludes_zero'] else 'no'} | "
                     f"{p['a_wins']}/{p['b_wins']} |")
    return lines


def _per_prompt_lines(pp: dict | None) -> list[str]:
    """The per-prompt α section: one table per (context, mode), a column per drafter and budget;
    flagged values in bold with a list of them below."""
    if not pp or not pp["columns"]:
        return []
    k = pp["outlier_sds"]
    lines = ["", f"## Per-prompt α (γ = {pp['gamma']}, budgets {', '.join(pp['budgets'])})", "",
             f"**bold** = more than {k:g} robust SDs (1.4826 × MAD) from the column's median: one such prompt can "
             "move the pooled α by itself, so the pooled α without the flagged prompts is shown below it."]
    groups: dict[tuple, list[dict]] = {}
    for c in pp["columns"]:
        groups.setdefault((c["context"], c["mode"]), []).append(c)
    for (ctx, mode), cols in groups.items():
        many = len({c["policy"] for c in cols if c["policy"] != "none"}) > 1
        heads = [f"{c['drafter']} B={c['budget']}" + (f" {c['policy']}" if many and c["policy"] != "none" else "")
                 for c in cols]
        prompts = list(dict.fromkeys(p for c in cols for p in c["prompt_alpha"]))
        lines += ["", f"### context {ctx}, {mode}", "", "| prompt | " + " | ".join(heads) + " |",
                  "|---|" + "---:|" * len(cols)]
        for p in prompts:
            cells = []
            for c in cols:
                v = c["prompt_alpha"].get(p)
                cells.append("–" if v is None else f"**{v:.3f}**" if p in c["outliers"] else f"{v:.3f}")
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
        lines += ["| median | " + " | ".join(_f(c["median"], ".3f") for c in cols) + " |",
                  "| robust SD | " + " | ".join(_f(c["robust_sd"], ".3f") for c in cols) + " |",
                  "| pooled α | " + " | ".join(_f(c["alpha"], ".3f") for c in cols) + " |",
                  "| pooled α without flagged | " + " | ".join(_f(c["alpha_without_outliers"], ".3f") for c in cols) + " |"]
        flagged = [(c, p) for c in cols for p in c["outliers"]]
        lines.append("")
        for c, p in flagged:
            lines.append(f"- outlier: {p}, {c['drafter']} B={c['budget']}: α {c['prompt_alpha'][p]:.3f} against median "
                         f"{c['median']:.3f} (robust SD {c['robust_sd']:.3f}); pooled α {_f(c['alpha'], '.3f')} -> "
                         f"{_f(c['alpha_without_outliers'], '.3f')} without the flagged prompts of this column")
        if not flagged:
            lines.append("- no outlier prompt")
    return lines


def _budget_order(labels: Iterable[str]) -> list[str]:
    labels = list(labels)
    ints = sorted({int(b) for b in labels if b != FULL_BUDGET})
    return [str(b) for b in ints] + ([FULL_BUDGET] if FULL_BUDGET in set(labels) else [])


def make_plots(results: dict, out_dir: Path, alpha_gamma: int) -> list[str]:
    """Write the PNG plots (matplotlib, Agg); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = results["cells"]
    contexts = sorted({c["context"] for c in cells})
    paths = []
    for mode in sorted({c["mode"] for c in cells}):
        mc = [c for c in cells if c["mode"] == mode]
        # acceptance vs budget, one panel per context, one line per (drafter, policy)
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            cc = [c for c in mc if c["context"] == ctx and c["gamma"] == alpha_gamma]
            xs = _budget_order(c["budget"] for c in cc)
            pols = sorted({c["policy"] for c in cc if c["policy"] != "none"}) or ["none"]
            for d in sorted({c["drafter"] for c in cc}):
                for pol in pols:
                    pts = {c["budget"]: c["alpha"] for c in cc if c["drafter"] == d and c["policy"] in (pol, "none")}
                    x = [i for i, b in enumerate(xs) if b in pts]
                    ax.plot(x, [pts[xs[i]] for i in x], marker="o",
                            label=d if len(pols) == 1 else f"{d} / {pol}")
            ax.set_xticks(range(len(xs)), xs)
            ax.set_xlabel("drafter KV budget (tokens)")
            ax.set_ylabel(f"acceptance rate α (γ={alpha_gamma})")
            ax.set_ylim(0, 1)
            ax.set_title(f"context {ctx} tokens, {mode}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"acceptance_vs_budget_{mode}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
        # speedup vs gamma, one panel per context, one line per (drafter, policy, budget)
        fig, axes = plt.subplots(1, len(contexts), figsize=(5 * len(contexts), 4), squeeze=False)
        for ax, ctx in zip(axes[0], contexts):
            cc = [c for c in mc if c["context"] == ctx and c["speedup"] is not None]
            keys = sorted({(c["drafter"], c["policy"], c["budget"]) for c in cc},
                          key=lambda k: (k[0], k[1], k[2] == FULL_BUDGET, int(k[2]) if k[2] != FULL_BUDGET else 0))
            for d, pol, b in keys:
                pts = sorted((c["gamma"], c["speedup"]) for c in cc if (c["drafter"], c["policy"], c["budget"]) == (d, pol, b))
                ax.plot([g for g, _ in pts], [s for _, s in pts], marker="o",
                        label=f"{d} B={b}" + (f" {pol}" if pol != "none" and len({k[1] for k in keys} - {'none'}) > 1 else ""))
            ax.axhline(1.0, color="grey", lw=1, ls="--")
            ax.set_xticks(sorted({c["gamma"] for c in cc}))
            ax.set_xlabel("γ (tokens drafted per cycle)")
            ax.set_ylabel("speedup vs AR (tokens/s ratio)")
            ax.set_title(f"context {ctx} tokens, {mode}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"speedup_vs_gamma_{mode}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(str(p))
    return paths


def write_outputs(results: dict, out_dir: str | Path, plots: bool = True, alpha_gamma: int = 1) -> dict:
    """Write ``results.json``, ``results.md`` and (``plots``) the PNGs into ``out_dir``; returns the paths.

    Adds ``results["paired"]`` and ``results["per_prompt"]``
    (:func:`bd_ray.evaluate.intervals.prompt_statistics`, the per-prompt table at ``alpha_gamma``)
    and ``results["plots"]`` before writing.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results.update(prompt_statistics(results, alpha_gamma))
    results["plots"] = make_plots(results, out, alpha_gamma) if (plots and results["cells"]) else []
    (out / "results.json").write_text(json.dumps(results, indent=1, default=json_default))
    (out / "results.md").write_text(render_markdown(results))
    return {"json": str(out / "results.json"), "markdown": str(out / "results.md"), "plots": results["plots"]}


def json_default(x: Any):
    """``json.dumps`` fallback: non-finite floats become ``null``, anything else its ``str``."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)
