"""Aggregation of measurements into cells: pooled α/τ/per-position acceptance, tokens/s, speedup,
the best γ per group, the lossless check and the needle report.

The lossless check compares each greedy SD run with the AR run of the same prompt and mode. In
fp32 it is exact: any differing token is a failure (the job fails). In bf16/fp16 it is reported as
agreement (fraction of equal tokens, first divergence) and never fails: the verifier scores γ+1
rows in SD and one row in AR, and low-precision reductions of different shapes round differently,
so a near-tie can flip greedy argmax without any bug (vLLM's docs, "Lossless guarantees of
Speculative Decoding": batch size and precision change logprobs; exact equality is not promised).

α, τ and per-position acceptance are pooled through :class:`bd_ray.speculative.metrics.SpecMetrics`
(its :meth:`~bd_ray.speculative.metrics.SpecMetrics.merge` sums the counters), the one place that
defines them.

Intervals: a percentile bootstrap over prompts (:func:`bootstrap_sums`): prompts are resampled
with replacement and the pooled statistic recomputed from the resampled sums (α = Σaccepted /
Σdrafted, never a mean of per-prompt ratios), so a prompt weighs what it drafted, as in the point
estimate. Every call draws from ``numpy.random.default_rng(report.bootstrap_seed)``, so the report
is reproducible and cells with the same number of prompts share their resamples. The paired
comparison (:func:`paired_differences`) resamples prompts once for both drafters (same prompts,
same draw); the per-prompt table (:func:`per_prompt_alpha`) flags prompts whose α lies more than
``report.outlier_sds`` robust SDs from the median (:func:`outlier_flags`).
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from bd_ray.config import FULL_BUDGET
from bd_ray.config.evaluate import EvalJobConfig, ReportConfig, budget_label
from bd_ray.evaluate.items import ARIndex
from bd_ray.speculative.metrics import SpecMetrics

__all__ = ["pooled_rate", "pooled_metrics", "aggregate_cells", "best_gammas", "EXACT_DTYPES", "lossless_mode",
           "greedy_agreement", "lossless_report", "needle_report", "bootstrap_sums", "percentile_interval",
           "cell_intervals", "report_settings", "paired_differences", "outlier_flags", "per_prompt_alpha",
           "prompt_statistics"]

EXACT_DTYPES = ("float32",)  # model dtypes whose greedy SD must equal AR token for token


def pooled_rate(tokens: Iterable[int], seconds: Iterable[float]) -> float | None:
    """Σtokens / Σseconds (tokens per second pooled over runs); ``None`` when no time was measured."""
    tok, sec = sum(tokens), sum(seconds)
    return tok / sec if sec > 0 else None


def pooled_metrics(runs: Iterable[dict]) -> SpecMetrics:
    """The speculative-decoding counters of SD records (``cycles``, ``drafted``, ``accepted``,
    ``drafted_at``, ``accepted_at``) merged into one :class:`SpecMetrics`: α = Σaccepted /
    Σdrafted, τ = 1 + Σaccepted / Σcycles, per-position acceptance from the summed counts."""
    out = SpecMetrics()
    for r in runs:
        out = out.merge(SpecMetrics(r["cycles"], r["drafted"], r["accepted"], list(r["drafted_at"]),
                                    list(r["accepted_at"])))
    return out


def aggregate_cells(runs: list[dict], cfg: EvalJobConfig) -> list[dict]:
    """One summary per cell from the per-prompt ``sd`` runs and the ``ar`` runs of the same prompts.

    Pooled over prompts: α = Σaccepted / Σdrafted, τ = 1 + Σaccepted / Σcycles, per-position
    acceptance from the summed per-position counts, tokens/s = Σtokens / Σdecode seconds (SD and AR
    over the same prompts), speedup = SD tokens/s / AR tokens/s; ``speedup_mean`` is the mean of
    per-prompt speedups. ``draft_step_s`` / ``verify_step_s``: seconds per cycle; ``ar_step_s``:
    seconds per AR verifier forward. ``drafter_cache``: largest peak drafter cache (entries per
    layer and KV head). ``lossless``: greedy cells ``ok`` / ``FAIL`` (fp32) or ``agree 0.973`` (the
    fraction of equal tokens in bf16/fp16, :func:`lossless_report`); sampled cells ``n/a``.
    ``prompt_alpha``: α of each prompt (order of ``prompt_ids``; ``None`` where it drafted nothing);
    ``alpha_ci`` / ``tau_ci`` / ``speedup_ci``: ``report.confidence`` bootstrap intervals over
    prompts (:func:`cell_intervals`).
    """
    rep = cfg.report
    ar = ARIndex(runs)
    cells: dict[str, list[dict]] = {}
    for r in runs:
        if r["kind"] == "sd" and "error" not in r:
            cells.setdefault(r["cell_id"], []).append(r)
    out = []
    for cid, rs in cells.items():
        r0 = rs[0]
        met = pooled_metrics(rs)
        cycles = met.cycles
        ars = [ar.get(r) for r in rs]
        have_ar = all(a is not None for a in ars)
        sd_tps = pooled_rate((r["n_tokens"] for r in rs), (r["decode_s"] for r in rs))
        ar_tps = pooled_rate((a["n_tokens"] for a in ars), (a["decode_s"] for a in ars)) if have_ar else None
        per_prompt_speedups = [r["tokens_per_s"] / a["tokens_per_s"] for r, a in zip(rs, ars)
                               if a is not None and a["tokens_per_s"] and math.isfinite(r["tokens_per_s"])]
        lossless = "n/a"
        if r0["greedy"]:
            lossless = _cell_lossless(rs, ars, lossless_mode(cfg.models.dtype))
        ar_steps = sum(max(a["n_tokens"] - 1, 1) for a in ars) if have_ar else 0
        out.append({
            "cell_id": cid, "context": r0["context"], "policy": r0["policy"], "budget": r0["budget"],
            "gamma": r0["gamma"], "drafter": r0["drafter"], "mode": r0["mode"], "greedy": r0["greedy"],
            "n_prompts": len(rs), "prompt_ids": [r["prompt_id"] for r in rs],
            "alpha": met.acceptance_rate, "tau": met.mean_accepted_length,
            "per_position_acceptance": met.per_position_acceptance,
            "cycles": met.cycles, "drafted": met.drafted, "accepted": met.accepted,
            "sd_tokens_per_s": sd_tps, "ar_tokens_per_s": ar_tps,
            "speedup": (sd_tps / ar_tps) if (sd_tps and ar_tps) else None,
            "speedup_mean": (sum(per_prompt_speedups) / len(per_prompt_speedups)) if per_prompt_speedups else None,
            "draft_step_s": sum(r["draft_s"] for r in rs) / cycles if cycles else None,
            "verify_step_s": sum(r["verify_s"] for r in rs) / cycles if cycles else None,
            "ar_step_s": (sum(a["verify_s"] for a in ars) / ar_steps) if have_ar and ar_steps else None,
            "drafter_cache": max(r["peak_drafter_cache"] for r in rs),
            "fallbacks": sum(1 for r in rs if r["fallback_reason"]),
            "plain_steps": sum(r.get("plain_steps", 0) for r in rs),
            "lossless": lossless,
            "prompt_alpha": [r["accepted"] / r["drafted"] if r["drafted"] else None for r in rs],
            **cell_intervals(rs, ars if have_ar else None, rep),
        })
    order = {c: i for i, c in enumerate(cfg.matrix.contexts)}
    border = {budget_label(b): i for i, b in enumerate(cfg.matrix.int_budgets())}
    out.sort(key=lambda c: (order.get(c["context"], 0), c["mode"], c["drafter"], c["policy"],
                            border.get(c["budget"], 0), c["gamma"]))
    return out


def best_gammas(cells: list[dict]) -> list[dict]:
    """Per (context, policy, budget, drafter, mode): the gamma with the highest measured SD tokens/s."""
    groups: dict[tuple, list[dict]] = {}
    for c in cells:
        groups.setdefault((c["context"], c["policy"], c["budget"], c["drafter"], c["mode"]), []).append(c)
    out = []
    for (ctx, pol, b, d, mode), cs in groups.items():
        ok = [c for c in cs if c["sd_tokens_per_s"] is not None]
        if not ok:
            continue
        best = max(ok, key=lambda c: c["sd_tokens_per_s"])
        out.append({"context": ctx, "policy": pol, "budget": b, "drafter": d, "mode": mode,
                    "gamma": best["gamma"], "sd_tokens_per_s": best["sd_tokens_per_s"],
                    "ar_tokens_per_s": best["ar_tokens_per_s"], "speedup": best["speedup"],
                    "alpha": best["alpha"], "tau": best["tau"], "cell_id": best["cell_id"],
                    "gammas_tried": sorted(c["gamma"] for c in cs)})
    return out


def lossless_mode(dtype: str) -> str:
    """``"exact"`` for the model dtypes of :data:`EXACT_DTYPES` (fp32), else ``"agreement"`` (bf16/fp16)."""
    return "exact" if dtype in EXACT_DTYPES else "agreement"


def greedy_agreement(ar_ids: list[int], sd_ids: list[int]) -> dict:
    """Token agreement of two greedy outputs of the same prompt.

    Returns ``{"equal": positions with the same token, "compared": the longer length (a missing
    token counts as different), "agreement": equal / compared (1.0 for two empty outputs),
    "first_divergence": first differing index (the shorter length when one is a prefix of the
    other), None when identical}``. After a divergence the two continue from different prefixes,
    so later equal tokens say little; ``first_divergence`` is the figure to read first.
    """
    equal = sum(1 for x, y in zip(ar_ids, sd_ids) if x == y)
    compared = max(len(ar_ids), len(sd_ids))
    first = None
    if list(ar_ids) != list(sd_ids):
        first = next((i for i, (x, y) in enumerate(zip(ar_ids, sd_ids)) if x != y), min(len(ar_ids), len(sd_ids)))
    return {"equal": equal, "compared": compared, "agreement": equal / compared if compared else 1.0,
            "first_divergence": first}


def _cell_lossless(rs: list[dict], ars: list[dict | None], mode: str) -> str:
    if any(a is None for a in ars):
        return "FAIL" if mode == "exact" else "n/a"
    if mode == "exact":
        return "ok" if all(a["token_ids"] == r["token_ids"] for r, a in zip(rs, ars)) else "FAIL"
    agree = [greedy_agreement(a["token_ids"], r["token_ids"]) for r, a in zip(rs, ars)]
    compared = sum(g["compared"] for g in agree)
    return f"agree {sum(g['equal'] for g in agree) / compared:.3f}" if compared else "agree 1.000"


def lossless_report(runs: list[dict], dtype: str = "float32") -> dict:
    """The lossless check of greedy SD runs against the AR run of the same prompt and mode.

    Args:
        runs: measurement records (``results.json`` ``runs``); SD records with an ``error`` are skipped.
        dtype: the models' dtype (``models.dtype``); it picks the mode (:func:`lossless_mode`).

    Returns ``{"mode": "exact" | "agreement", "dtype", "checked": greedy SD runs with an AR run,
    "differ": [per differing run: cell_id, prompt_id, first_difference, agreement, ar_tokens,
    sd_tokens (5 tokens from the divergence)], "agreement": equal / compared tokens pooled over the
    checked runs (None when none), "failures": ``differ`` in exact mode, [] in agreement mode}``.
    Only ``failures`` fails the evaluation job.
    """
    mode = lossless_mode(dtype)
    ar = ARIndex(runs, kinds=("ar", "needle_ar"))
    differ, checked, equal, compared = [], 0, 0, 0
    for r in runs:
        if r["kind"] not in ("sd", "needle_sd") or not r.get("greedy") or "error" in r:
            continue
        a = ar.get(r)
        if a is None:
            continue
        g = greedy_agreement(a["token_ids"], r["token_ids"])
        checked += 1
        equal, compared = equal + g["equal"], compared + g["compared"]
        k = g["first_divergence"]
        if k is not None:
            differ.append({"cell_id": r["cell_id"], "prompt_id": r["prompt_id"], "first_difference": k,
                           "agreement": g["agreement"], "ar_tokens": a["token_ids"][k:k + 5],
                           "sd_tokens": r["token_ids"][k:k + 5]})
    return {"mode": mode, "dtype": dtype, "checked": checked, "differ": differ,
            "agreement": equal / compared if compared else None,
            "failures": differ if mode == "exact" else []}


def needle_report(runs: list[dict], cells: list[dict]) -> list[dict]:
    """Per needle SD run: passkey retrieved by AR / SD, α on the needle prompt vs α of the same
    (context, policy, budget, drafter) greedy cell at the same gamma, and the kept fraction."""
    ar = {r["prompt_id"]: r for r in runs if r["kind"] == "needle_ar" and "error" not in r}
    alpha = {(c["context"], c["policy"], c["budget"], c["drafter"], c["gamma"]): c["alpha"]
             for c in cells if c["greedy"]}
    out = []
    for r in runs:
        if r["kind"] != "needle_sd" or "error" in r:
            continue
        a = ar.get(r["prompt_id"])
        key = r["passkey"]
        base = alpha.get((r["context"], r["policy"], r["budget"], r["drafter"], r["gamma"]))
        out.append({"context": r["context"], "drafter": r["drafter"], "policy": r["policy"], "budget": r["budget"],
                    "gamma": r["gamma"], "passkey": key, "depth": r["depth"],
                    "ar_retrieved": bool(a and key in a["text"]), "sd_retrieved": key in r["text"],
                    "ar_text": a["text"] if a else None, "sd_text": r["text"],
                    "alpha_needle": r["acceptance_rate"], "alpha_ordinary": base,
                    "alpha_ratio": (r["acceptance_rate"] / base) if base else None,
                    "needle_kept_fraction": r["needle_kept_fraction"]})
    return out




# ---- intervals and per-prompt statistics --------------------------------------------------------


def bootstrap_sums(columns: dict[str, Iterable[float]], resamples: int, seed: int) -> dict[str, np.ndarray]:
    """Column sums over ``resamples`` bootstrap resamples of the rows (prompts).

    Args:
        columns: name -> ``[n]`` per-prompt values, every column the same length n >= 1; row i of
            every column is prompt i, so a resample keeps a prompt's values together (paired).
        resamples: R, the number of resamples (``report.bootstrap_resamples``).
        seed: seed of ``numpy.random.default_rng``; the same (n, R, seed) draws the same resamples.

    Returns name -> ``[R]`` float64 sums of the resampled rows. Each resample draws n prompts
    with replacement (as multinomial counts ``[R, n]``, so memory is R x n floats).

    Raises:
        ValueError: no columns, no rows, or columns of different lengths.
    """
    cols = {k: np.asarray(list(v), dtype=np.float64) for k, v in columns.items()}
    sizes = {len(v) for v in cols.values()}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"bootstrap needs columns of one non-zero length, got {sorted(sizes)}")
    n = sizes.pop()
    counts = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(np.float64)
    return {k: counts @ v for k, v in cols.items()}


def percentile_interval(stats: Iterable[float], confidence: float = 0.95) -> list[float] | None:
    """The central ``confidence`` percentile interval ``[lo, hi]`` of bootstrap statistics.
    Non-finite statistics (a resample that drafted nothing) are left out; ``None`` when none is finite."""
    x = np.asarray(stats if isinstance(stats, np.ndarray) else list(stats), dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None
    tail = 100.0 * (1.0 - confidence) / 2.0
    lo, hi = np.percentile(x, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den <= 0 (or is NaN)."""
    ok = den > 0
    return np.where(ok, num / np.where(ok, den, 1.0), np.nan)


def _excludes_zero(ci: list[float] | None) -> bool:
    return ci is not None and (ci[0] > 0.0 or ci[1] < 0.0)


def cell_intervals(rs: list[dict], ars: list[dict] | None, rep: ReportConfig) -> dict:
    """Bootstrap intervals of one cell over its prompts, each ``[lo, hi]`` or ``None``.

    Args:
        rs: the cell's SD records, one per prompt (``accepted``, ``drafted``, ``cycles``,
            ``n_tokens``, ``decode_s``).
        ars: the AR record of the same prompt for each of ``rs`` (``None`` = no speedup interval).
        rep: the report settings (resamples, seed, confidence).

    Returns ``{"alpha_ci", "tau_ci", "speedup_ci"}``: the pooled statistics of
    :func:`aggregate_cells` recomputed on every resample of prompts: α = Σaccepted / Σdrafted,
    τ = 1 + Σaccepted / Σcycles, speedup = (ΣSD tokens / ΣSD s) / (ΣAR tokens / ΣAR s).
    """
    cols = {"acc": [r["accepted"] for r in rs], "dr": [r["drafted"] for r in rs], "cyc": [r["cycles"] for r in rs]}
    if ars is not None:
        cols.update(sd_tok=[r["n_tokens"] for r in rs], sd_s=[r["decode_s"] for r in rs],
                    ar_tok=[a["n_tokens"] for a in ars], ar_s=[a["decode_s"] for a in ars])
    s = bootstrap_sums(cols, rep.bootstrap_resamples, rep.bootstrap_seed)
    speedup = None
    if ars is not None:
        speedup = percentile_interval(_ratio(_ratio(s["sd_tok"], s["sd_s"]), _ratio(s["ar_tok"], s["ar_s"])),
                                      rep.confidence)
    return {"alpha_ci": percentile_interval(_ratio(s["acc"], s["dr"]), rep.confidence),
            "tau_ci": percentile_interval(1.0 + _ratio(s["acc"], s["cyc"]), rep.confidence),
            "speedup_ci": speedup}


def report_settings(config: dict) -> ReportConfig:
    """The report settings of a ``results.json`` ``config`` (defaults for keys an older run lacks)."""
    return ReportConfig.model_validate(config.get("report") or {})


def _pairs(rep: ReportConfig, drafters: Iterable[str]) -> list[tuple[str, str]]:
    """``report.paired``, or (``null``) budgetdraft vs naive when both drafters exist."""
    if rep.paired is not None:
        return [(a, b) for a, b in rep.paired]
    return [("budgetdraft", "naive")] if {"budgetdraft", "naive"} <= set(drafters) else []


def _table_budgets(rep: ReportConfig, matrix_budgets: Iterable) -> list[str]:
    """``report.per_prompt_budgets`` as labels, or (``null``) 256 (else the smallest budget) and full."""
    if rep.per_prompt_budgets is not None:
        return [str(b) for b in rep.per_prompt_budgets]
    labels = [str(b) for b in matrix_budgets]
    ints = sorted(int(b) for b in labels if b != FULL_BUDGET)
    pick = ["256"] if "256" in labels else [str(ints[0])] if ints else []
    return pick + ([FULL_BUDGET] if FULL_BUDGET in labels else [])


def _prompt_runs(runs: Iterable[dict]) -> dict[str, dict[str, dict]]:
    """cell_id -> prompt_id -> the SD record (records with an ``error`` left out)."""
    out: dict[str, dict[str, dict]] = {}
    for r in runs:
        if r["kind"] == "sd" and "error" not in r:
            out.setdefault(r["cell_id"], {})[r["prompt_id"]] = r
    return out


def _pooled_alpha(rs: Iterable[dict]) -> float | None:
    rs = list(rs)
    dr = sum(r["drafted"] for r in rs)
    return sum(r["accepted"] for r in rs) / dr if dr else None


def paired_differences(runs: list[dict], cells: list[dict], pairs: list[tuple[str, str]],
                       rep: ReportConfig) -> list[dict]:
    """Drafter A - drafter B on the same prompts, for every (context, policy, budget, γ, mode)
    cell both ran (in cell order), per pair of ``pairs``.

    Only prompts both drafters measured and drafted on are compared. Per comparison:
    ``diff_per_prompt`` (α_A - α_B per prompt, order of ``prompt_ids``), ``mean_diff`` and its
    paired bootstrap interval ``mean_diff_ci`` (prompts resampled once for both drafters), with
    ``mean_diff_excludes_zero``; ``pooled_diff`` = pooled α_A - pooled α_B (the headline α's
    difference) with ``pooled_diff_ci`` / ``pooled_diff_excludes_zero`` from the same resamples;
    ``a_wins`` / ``b_wins``: prompts where A's α is higher / lower.
    """
    by_cell = _prompt_runs(runs)
    index = {(c["context"], c["policy"], c["budget"], c["gamma"], c["mode"], c["drafter"]): c for c in cells}
    out = []
    for a, b in pairs:
        for ca in cells:
            if ca["drafter"] != a:
                continue
            key = (ca["context"], ca["policy"], ca["budget"], ca["gamma"], ca["mode"])
            cb = index.get(key + (b,))
            if cb is None:
                continue
            ra, rb = by_cell.get(ca["cell_id"], {}), by_cell.get(cb["cell_id"], {})
            common = [p for p in ra if p in rb and ra[p]["drafted"] and rb[p]["drafted"]]
            if not common:
                continue
            xa, xb = [ra[p] for p in common], [rb[p] for p in common]
            diff = [x["accepted"] / x["drafted"] - y["accepted"] / y["drafted"] for x, y in zip(xa, xb)]
            s = bootstrap_sums({"d": diff, "acc_a": [x["accepted"] for x in xa], "dr_a": [x["drafted"] for x in xa],
                                "acc_b": [y["accepted"] for y in xb], "dr_b": [y["drafted"] for y in xb]},
                               rep.bootstrap_resamples, rep.bootstrap_seed)
            mean_ci = percentile_interval(s["d"] / len(common), rep.confidence)
            pooled_ci = percentile_interval(_ratio(s["acc_a"], s["dr_a"]) - _ratio(s["acc_b"], s["dr_b"]),
                                            rep.confidence)
            alpha_a, alpha_b = _pooled_alpha(xa), _pooled_alpha(xb)
            out.append({"drafter_a": a, "drafter_b": b, "context": key[0], "policy": key[1], "budget": key[2],
                        "gamma": key[3], "mode": key[4], "n_prompts": len(common), "prompt_ids": common,
                        "alpha_a": alpha_a, "alpha_b": alpha_b, "diff_per_prompt": diff,
                        "mean_diff": sum(diff) / len(diff), "mean_diff_ci": mean_ci,
                        "mean_diff_excludes_zero": _excludes_zero(mean_ci),
                        "pooled_diff": alpha_a - alpha_b, "pooled_diff_ci": pooled_ci,
                        "pooled_diff_excludes_zero": _excludes_zero(pooled_ci),
                        "a_wins": sum(1 for d in diff if d > 0), "b_wins": sum(1 for d in diff if d < 0)})
    return out


def outlier_flags(values: Iterable[float], k: float = 3.0) -> dict:
    """Robust outliers among per-prompt values (no normality of the mean assumed).

    Returns ``{"median", "robust_sd", "flags"}``: robust SD = 1.4826 x MAD (the median absolute
    deviation from the median, scaled to the SD of normal data); ``flags[i]`` is whether
    ``|values[i] - median| > k`` robust SDs. When more than half the values equal the median
    (MAD = 0), the robust SD falls back to 1.2533 x the mean absolute deviation from the median
    (also the SD for normal data), so many equal prompts and one far away still flag that one; all
    values equal flag nothing. Deviations below 1e-12 count as 0 (rounding of equal ratios).
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return {"median": None, "robust_sd": None, "flags": []}
    med = float(np.median(x))
    dev = np.abs(x - med)
    dev[dev < 1e-12] = 0.0
    sd = 1.4826 * float(np.median(dev))
    if sd == 0.0:
        sd = 1.2533 * float(dev.mean())
    return {"median": med, "robust_sd": sd, "flags": [bool(sd > 0.0 and d > k * sd) for d in dev]}


def per_prompt_alpha(runs: list[dict], cells: list[dict], gamma: int, budgets: list[str], k: float = 3.0) -> list[dict]:
    """One column per cell at ``gamma`` and a budget label of ``budgets`` (every context, mode,
    policy and drafter; cell order): α of each prompt (``prompt_alpha``: prompt_id -> α, prompts
    that drafted nothing left out), their ``median`` and ``robust_sd``, the prompts flagged by
    :func:`outlier_flags` (``outliers``), and pooled α over all prompts (``alpha``) and without the
    flagged ones (``alpha_without_outliers``), so one prompt's weight on the mean is visible."""
    by_cell = _prompt_runs(runs)
    out = []
    for c in cells:
        if c["gamma"] != gamma or c["budget"] not in budgets:
            continue
        rs = by_cell.get(c["cell_id"], {})
        alpha = {p: r["accepted"] / r["drafted"] for p, r in rs.items() if r["drafted"]}
        o = outlier_flags(alpha.values(), k)
        flagged = [p for p, f in zip(alpha, o["flags"]) if f]
        out.append({"context": c["context"], "mode": c["mode"], "policy": c["policy"], "budget": c["budget"],
                    "gamma": c["gamma"], "drafter": c["drafter"], "cell_id": c["cell_id"],
                    "alpha": _pooled_alpha(rs.values()),
                    "alpha_without_outliers": _pooled_alpha(r for p, r in rs.items() if p not in flagged),
                    "median": o["median"], "robust_sd": o["robust_sd"], "prompt_alpha": alpha, "outliers": flagged})
    return out


def prompt_statistics(results: dict, gamma: int | None = None) -> dict:
    """The per-prompt sections of a results dict (its ``config``, ``cells`` and ``runs``; any
    schema version, report settings defaulted where an older config lacks them).

    Returns ``{"paired": paired_differences(...), "per_prompt": {"gamma", "budgets",
    "outlier_sds", "columns": per_prompt_alpha(...)}}``; ``gamma`` defaults to
    ``report.alpha_gamma``, else the smallest γ of the matrix.
    """
    cfg = results["config"]
    rep = report_settings(cfg)
    gamma = gamma or rep.alpha_gamma or min(cfg["matrix"]["gammas"])
    budgets = _table_budgets(rep, cfg["matrix"]["budgets"])
    runs, cells = results["runs"], results["cells"]
    return {"paired": paired_differences(runs, cells, _pairs(rep, cfg["models"]["drafters"]), rep),
            "per_prompt": {"gamma": gamma, "budgets": budgets, "outlier_sds": rep.outlier_sds,
                           "columns": per_prompt_alpha(runs, cells, gamma, budgets, rep.outlier_sds)}}
