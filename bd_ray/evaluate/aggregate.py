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
"""

from __future__ import annotations

import math
from typing import Iterable

from bd_ray.config.evaluate import EvalJobConfig, budget_label
from bd_ray.evaluate.intervals import cell_intervals
from bd_ray.evaluate.items import ARIndex
from bd_ray.speculative.metrics import SpecMetrics

__all__ = ["pooled_rate", "pooled_metrics", "aggregate_cells", "best_gammas", "EXACT_DTYPES", "lossless_mode",
           "greedy_agreement", "lossless_report", "needle_report"]

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
