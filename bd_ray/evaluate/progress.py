"""Progress of an evaluation run, printed once by the driver: one line per measurement finished in
this run (``[done/total]``, elapsed time and ETA) and one line per cell completed in this run.

Measurements reused from the journal are counted in ``done`` without a line each (the driver says
how many it reused), and the ETA uses only the measurements of this run, so a resumed matrix
neither repeats the earlier run's lines nor underestimates what is left.
"""

from __future__ import annotations

import time
from typing import Callable

from bd_ray.config.evaluate import budget_label
from bd_ray.evaluate.aggregate import pooled_metrics, pooled_rate
from bd_ray.evaluate.items import ARIndex

__all__ = ["Progress"]


def _fmt_s(s: float) -> str:
    s = max(0.0, s)
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


class Progress:
    """Counts finished measurements of ``items`` and prints progress lines through ``log``.

    ``ar`` indexes every AR record seen (journaled or new): the lossless check and the cell lines
    look up SD runs' baselines there.
    """

    def __init__(self, items: list[dict], log: Callable[[str], None]):
        self.total = len(items)
        self.log = log
        self.done = 0
        self.measured = 0
        self.t0 = time.perf_counter()
        self.cell_need: dict[str, int] = {}
        for it in items:
            if it["kind"] == "sd":
                self.cell_need[it["cell_id"]] = self.cell_need.get(it["cell_id"], 0) + 1
        self.cell_runs: dict[str, list[dict]] = {}
        self.ar = ARIndex(())

    def reused(self, item: dict, rec: dict) -> None:
        """Count a measurement taken from the journal (no line printed)."""
        self.done += 1
        self._index(item, rec)

    def update(self, item: dict, rec: dict) -> None:
        """Count a measurement finished in this run and print its line (and its cell's, when it
        completes the cell)."""
        self.done += 1
        self.measured += 1
        el = time.perf_counter() - self.t0
        eta = el / self.measured * (self.total - self.done)
        what = f"{rec['prompt_id']} {item['kind']:<9} {item['mode']['name']}"
        if "error" in rec:
            msg = f"ERROR {rec['error'].splitlines()[0][:200]}"
        elif item["kind"] in ("ar", "needle_ar"):
            msg = f"{rec['tokens_per_s']:.1f} tok/s (prefill {rec['verifier_prefill_s']:.1f}s)"
        else:
            what += f" {item['drafter']} {item['policy']} B={budget_label(item['budget'])} γ={item['gamma']}"
            a = self.ar.get(rec)
            sp = f" {rec['tokens_per_s'] / a['tokens_per_s']:.2f}x" if a and a["tokens_per_s"] else ""
            msg = f"α {rec['acceptance_rate']:.2f} τ {rec['mean_accepted_length']:.2f} {rec['tokens_per_s']:.1f} tok/s{sp}"
        self.log(f"[{self.done:>4}/{self.total}] {what}: {msg} | {_fmt_s(el)} elapsed, ETA {_fmt_s(eta)}")
        if self._index(item, rec):
            rs = self.cell_runs[item["cell_id"]]
            ars = [self.ar.get(r) for r in rs]
            sd = pooled_rate((r["n_tokens"] for r in rs), (r["decode_s"] for r in rs))
            arr = pooled_rate((x["n_tokens"] for x in ars), (x["decode_s"] for x in ars)) if all(ars) else None
            sp = f"{sd / arr:.2f}x" if sd and arr else "?"
            self.log(f"  cell {item['cell_id']} done: α {pooled_metrics(rs).acceptance_rate:.3f}, "
                     f"SD {sd or 0:.1f} tok/s, AR {arr or 0:.1f} tok/s, speedup {sp} ({len(rs)} prompts)")

    def _index(self, item: dict, rec: dict) -> bool:
        """Index ``rec``; True when it completes its cell."""
        if "error" in rec:
            return False
        if item["kind"] in ("ar", "needle_ar"):
            self.ar.add(rec)
            return False
        if item["kind"] != "sd":
            return False
        rs = self.cell_runs.setdefault(item["cell_id"], [])
        rs.append(rec)
        return len(rs) == self.cell_need[item["cell_id"]]
