"""Intervals and per-prompt statistics of an evaluation (the report's uncertainty).

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

from typing import Iterable

import numpy as np

from bd_ray.config import FULL_BUDGET
from bd_ray.config.evaluate import ReportConfig

__all__ = ["bootstrap_sums", "percentile_interval", "cell_intervals", "report_settings", "paired_differences",
           "outlier_flags", "per_prompt_alpha", "prompt_statistics"]


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
