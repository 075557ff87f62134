"""Held-out agreement of trained drafters with their teacher, collected from training runs
(``python jobs/evaluate.py report agreement --runs DIR --out DIR``).

The metric is the training job's step eval: top-1 agreement of the drafter's argmax with the
teacher's full-cache argmax, teacher-forced on the held-out windows of the offline targets, per
drafter KV budget (``full`` = no sparsity); the untrained init is the step-0 eval. Writes
``agreement.json``, ``agreement.md`` (the table), ``curves.png`` (L_A per step and agreement per
budget, all drafters) and copies each run's ``curves.png`` to ``curves_<name>.png``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

__all__ = ["AGREEMENT_KEYS", "collect_agreement", "agreement_table", "plot_agreement", "write_agreement"]

AGREEMENT_KEYS = ["full", "128", "256", "512", "1024"]
_TARGET_FIELDS = ("train_windows", "eval_windows", "wall_s", "train_s", "s_per_window", "prefix_len",
                  "continuation_len", "top_k")


def _wall_time(log: Path, name: str) -> float | None:
    """``<name> wall <s> s`` as ``/usr/bin/time -f`` writes it into the run's log (last one)."""
    if not log.exists():
        return None
    m = re.findall(rf"{re.escape(name)} wall ([0-9.]+) s", log.read_text(errors="replace"))
    return float(m[-1]) if m else None


def collect_agreement(runs: str | Path, labels: dict[str, str] | None = None,
                      targets_manifest: str | Path | None = None) -> dict:
    """Gather ``<runs>/<name>/metrics.json`` of every drafter run into one dict.

    Args:
        runs: directory with one subdirectory per training run (and ``<name>.log`` with its wall time).
        labels: run name -> display label, in table order; default every run with a
            ``metrics.json``, sorted, labelled by its name.
        targets_manifest: the offline teacher targets' ``manifest.json`` (windows and timings are copied).

    Returns:
        ``{"metric", "drafters": {name: {...agreement per budget, steps, losses, wall_s...}},
        "init": agreement of the untrained drafter or None, "teacher_targets"?}``.
    """
    runs = Path(runs)
    if labels is None:
        labels = {p.parent.name: p.parent.name for p in sorted(runs.glob("*/metrics.json"))}
    res: dict = {"metric": "held-out top-1 agreement of the drafter's argmax with the teacher's full-cache "
                           "argmax, teacher-forced on the held-out windows of the offline targets (eval/); "
                           "key = drafter KV budget (full = no sparsity); init = the untrained drafter "
                           "(step-0 eval)",
                 "drafters": {}}
    init = None
    for name, label in labels.items():
        mp = runs / name / "metrics.json"
        if not mp.exists():
            continue
        m = json.loads(mp.read_text())
        ev = m["eval_history"]
        final = ev[-1]
        if ev[0]["step"] == 0 and init is None:
            init = {k: ev[0].get(f"agree_{k}") for k in AGREEMENT_KEYS}
        res["drafters"][name] = {
            "label": label, "finished": m["finished"], "steps": m["step"], "skipped": m["skipped"],
            "agreement": {k: final.get(f"agree_{k}") for k in AGREEMENT_KEYS}, "eval_step": final["step"],
            "final_loss": m["last"].get("loss"), "final_l_a": m["last"].get("l_a"), "final_l_c": m["last"].get("l_c"),
            "first_l_a": m["history"][0]["l_a"] if m["history"] else None,
            "mean_step_s": (sum(h["step_s"] for h in m["history"]) / len(m["history"])) if m["history"] else None,
            "wall_s": _wall_time(runs / f"{name}.log", name),
            "export": str((runs / name / "final").resolve()),
        }
    res["init"] = init
    if targets_manifest is not None and Path(targets_manifest).exists():
        t = json.loads(Path(targets_manifest).read_text())
        res["teacher_targets"] = {k: t[k] for k in _TARGET_FIELDS}
    return res


def agreement_table(res: dict, init_label: str = "untrained init (step-0 eval)") -> str:
    """The Markdown table of :func:`collect_agreement`'s result: one row per drafter (and the init)."""
    def fmt(v):
        return "-" if v is None else f"{v:.3f}"

    lines = ["| drafter | steps | full | B=128 | B=256 | B=512 | B=1024 |", "|---|---|---|---|---|---|---|"]
    if res["init"]:
        lines.append(f"| {init_label} | 0 | "
                     + " | ".join(fmt(res["init"][k]) for k in AGREEMENT_KEYS) + " |")
    for d in res["drafters"].values():
        lines.append(f"| {d['label']} | {d['steps']} | " + " | ".join(fmt(d["agreement"][k]) for k in AGREEMENT_KEYS) + " |")
    return "\n".join(lines)


def plot_agreement(res: dict, runs: str | Path, out: str | Path) -> None:
    """Write ``curves.png`` (L_A per step; agreement per budget) and copy each run's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, out = Path(runs), Path(out)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    for name in res["drafters"]:
        m = json.loads((runs / name / "metrics.json").read_text())
        left.plot([h["step"] for h in m["history"]], [h["l_a"] for h in m["history"]], label=f"{name} L_A", lw=1.2)
        png = runs / name / "curves.png"
        if png.exists():
            shutil.copy(png, out / f"curves_{name}.png")
    left.set_xlabel("optimizer step")
    left.set_ylabel("L_A (CE vs teacher argmax, nats)")
    left.set_yscale("log")
    left.legend()
    left.set_title("full-cache loss L_A per step (training windows)")
    init = res["init"]
    groups = (["init"] if init else []) + list(res["drafters"])
    w = 0.8 / max(1, len(groups))
    for i, g in enumerate(groups):
        vals = init if g == "init" else res["drafters"][g]["agreement"]
        right.bar([j + i * w for j in range(len(AGREEMENT_KEYS))], [vals[k] or 0 for k in AGREEMENT_KEYS], w, label=g)
    right.set_xticks([j + w * (len(groups) - 1) / 2 for j in range(len(AGREEMENT_KEYS))], AGREEMENT_KEYS)
    right.set_xlabel("drafter KV budget")
    right.set_ylabel("held-out top-1 agreement")
    right.legend()
    right.set_title("held-out agreement with the teacher (greedy alpha proxy)")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def write_agreement(runs: str | Path, out: str | Path, labels: dict[str, str] | None = None,
                    targets_manifest: str | Path | None = None, plots: bool = True,
                    init_label: str = "untrained init (step-0 eval)") -> str:
    """Collect, write ``agreement.json`` / ``agreement.md`` (and the plots) into ``out``; returns the table."""
    res = collect_agreement(runs, labels, targets_manifest)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "agreement.json").write_text(json.dumps(res, indent=1))
    table = agreement_table(res, init_label)
    (out / "agreement.md").write_text(table + "\n")
    if plots:
        plot_agreement(res, runs, out)
    return table
