#!/usr/bin/env python
"""Collect the 2K reference run (results/reference_2k/run.sh) into results/reference_2k/:
agreement.json (held-out top-1 agreement with the teacher per drafter and KV budget, plus the
untrained init), agreement.md (the table), curves.png (all drafters) and curves_<name>.png (per run).

    python results/reference_2k/collect.py [--runs runs/reference_2k]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

NAMES = {"budgetdraft": "BudgetDraft (L_A + 0.5 L_C, sampled B)", "naive": "naive (L_A only)",
         "fixed_256": "fixed budget 256 (L_A + 0.5 L_C)"}
KEYS = ["full", "128", "256", "512", "1024"]


def wall_time(log: str, name: str):
    if not os.path.exists(log):
        return None
    m = re.findall(rf"{name} wall ([0-9.]+) s", open(log, errors="replace").read())
    return float(m[-1]) if m else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", default="runs/reference_2k")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    a = ap.parse_args()
    res: dict = {"metric": "held-out top-1 agreement of the drafter's argmax with the teacher's full-cache "
                           "argmax, teacher-forced on the held-out pg-mini windows of the offline targets (eval/; "
                           "4 windows x 128 continuation positions = 512 here); key = drafter KV budget "
                           "(full = no sparsity); init = the untrained drafter (step-0 eval)",
                 "drafters": {}}
    init = None
    for name in NAMES:
        mp = os.path.join(a.runs, name, "metrics.json")
        if not os.path.exists(mp):
            continue
        m = json.load(open(mp))
        ev = m["eval_history"]
        final = ev[-1]
        if ev[0]["step"] == 0 and init is None:
            init = {k: ev[0].get(f"agree_{k}") for k in KEYS}
        res["drafters"][name] = {
            "label": NAMES[name], "finished": m["finished"], "steps": m["step"], "skipped": m["skipped"],
            "agreement": {k: final.get(f"agree_{k}") for k in KEYS}, "eval_step": final["step"],
            "final_loss": m["last"].get("loss"), "final_l_a": m["last"].get("l_a"), "final_l_c": m["last"].get("l_c"),
            "first_l_a": m["history"][0]["l_a"] if m["history"] else None,
            "mean_step_s": (sum(h["step_s"] for h in m["history"]) / len(m["history"])) if m["history"] else None,
            "wall_s": wall_time(os.path.join(a.runs, f"{name}.log"), name),
            "export": os.path.abspath(os.path.join(a.runs, name, "final")),
        }
        png = os.path.join(a.runs, name, "curves.png")
        if os.path.exists(png):
            shutil.copy(png, os.path.join(a.out, f"curves_{name}.png"))
    res["init"] = init
    tp = os.path.join("runs", "targets", "pg_mini_2k", "manifest.json")
    if os.path.exists(tp):
        t = json.load(open(tp))
        res["teacher_targets"] = {k: t[k] for k in ("train_windows", "eval_windows", "wall_s", "train_s",
                                                     "s_per_window", "prefix_len", "continuation_len", "top_k")}
    with open(os.path.join(a.out, "agreement.json"), "w") as f:
        json.dump(res, f, indent=1)

    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| drafter | steps | full | B=128 | B=256 | B=512 | B=1024 |", "|---|---|---|---|---|---|---|"]
    if init:
        lines.append("| untrained init (verifier's first 4 layers) | 0 | " + " | ".join(fmt(init[k]) for k in KEYS) + " |")
    for name, d in res["drafters"].items():
        lines.append(f"| {d['label']} | {d['steps']} | " + " | ".join(fmt(d["agreement"][k]) for k in KEYS) + " |")
    open(os.path.join(a.out, "agreement.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (l, r) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in res["drafters"]:
        m = json.load(open(os.path.join(a.runs, name, "metrics.json")))
        l.plot([h["step"] for h in m["history"]], [h["l_a"] for h in m["history"]], label=f"{name} L_A", lw=1.2)
    l.set_xlabel("optimizer step"); l.set_ylabel("L_A (CE vs teacher argmax, nats)"); l.set_yscale("log")
    l.legend(); l.set_title("full-cache loss L_A per step (training windows)")
    groups = (["init"] if init else []) + list(res["drafters"])
    w = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        vals = init if g == "init" else res["drafters"][g]["agreement"]
        r.bar([j + i * w for j in range(len(KEYS))], [vals[k] or 0 for k in KEYS], w, label=g)
    r.set_xticks([j + w * (len(groups) - 1) / 2 for j in range(len(KEYS))], KEYS)
    r.set_xlabel("drafter KV budget"); r.set_ylabel("held-out top-1 agreement"); r.legend()
    r.set_title("held-out agreement with the teacher (greedy alpha proxy)")
    fig.tight_layout(); fig.savefig(os.path.join(a.out, "curves.png"), dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
