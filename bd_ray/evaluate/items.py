"""Work items of the evaluation matrix: cells, single measurements in run order, their identities.

A cell is ``(context, policy, budget, γ, drafter, mode)``; an item is one measurement (an AR
baseline run, one SD cell x prompt, or a needle run), a plain dict a worker can receive.
:class:`ARIndex` finds the AR baseline of an SD run.
"""

from __future__ import annotations

import hashlib
import json
from typing import Iterable

from bd_ray.config.evaluate import EvalJobConfig, budget_label
from bd_ray.evaluate.prompts import PromptSpec

__all__ = ["cell_id", "build_items", "item_key", "ARIndex"]


def cell_id(context: int, policy: str, budget: int | None, gamma: int, drafter: str, mode: str) -> str:
    """Stable id of a cell: ``"2048|chunk_topk|128|g4|init4|greedy"`` (policy ``none`` for full budget)."""
    return f"{context}|{policy}|{budget_label(budget)}|g{gamma}|{drafter}|{mode}"


def _budget_policies(cfg: EvalJobConfig) -> list[tuple[str, int | None]]:
    """(policy label, budget) pairs: every policy for integer budgets, once (policy ``none``) for full."""
    pairs: list[tuple[str, int | None]] = []
    for b in cfg.matrix.int_budgets():
        if b is None:
            pairs.append(("none", None))
        else:
            pairs.extend((label, b) for label in cfg.matrix.policies)
    return pairs


def build_items(cfg: EvalJobConfig, prompts: dict[int, list[PromptSpec]],
                needles: dict[int, PromptSpec] | None = None) -> list[dict]:
    """All measurements in run order: per prompt and mode, for each drafter an AR baseline run
    followed by that drafter's SD cells (γ from ``mode.gammas`` when set, else ``matrix.gammas``).

    Each item is a plain dict (sent to a worker): ``kind`` (``ar`` | ``sd`` | ``needle_ar`` |
    ``needle_sd``), ``prompt`` (:meth:`PromptSpec.meta` plus ``token_ids``), ``mode``, ``drafter``
    (for ``ar``: the group it is the baseline of) and, for SD, ``policy``, ``budget`` (``None`` =
    full), ``gamma`` and ``cell_id``.
    """
    m = cfg.matrix
    items: list[dict] = []
    groups: list[PromptSpec] = [p for ctx in m.contexts for p in prompts[ctx]]
    if needles:
        groups += [needles[ctx] for ctx in m.contexts if ctx in needles]
    for p in groups:
        pm = {**p.meta(), "token_ids": p.token_ids}
        if p.needle is not None:
            greedy = [md for md in m.modes if md.greedy][:1] or [m.modes[0].model_copy(update={"name": "greedy", "temperature": 0.0})]
            md = greedy[0]
            items.append({"kind": "needle_ar", "prompt": pm, "mode": md.model_dump(), "group": p.prompt_id})
            for d in cfg.models.drafters:
                for pol, b in _budget_policies(cfg):
                    items.append({"kind": "needle_sd", "prompt": pm, "mode": md.model_dump(), "drafter": d,
                                  "policy": pol, "budget": b, "gamma": cfg.needle_gamma, "group": p.prompt_id,
                                  "cell_id": cell_id(p.context, pol, b, cfg.needle_gamma, d, md.name)})
            continue
        # Modes outermost, so fixed-γ cells of every drafter come before the adaptive ones; an AR
        # baseline right before each drafter's cells, so slow drift in machine load (a shared
        # box) shifts SD and its AR together instead of biasing one drafter against another.
        for md in m.modes:
            mode = md.model_dump(exclude_none=True)
            for d in cfg.models.drafters:
                items.append({"kind": "ar", "prompt": pm, "mode": mode, "drafter": d, "group": p.prompt_id})
                for pol, b in _budget_policies(cfg):
                    for g in md.gammas or m.gammas:
                        items.append({"kind": "sd", "prompt": pm, "mode": mode, "drafter": d,
                                      "policy": pol, "budget": b, "gamma": g, "group": p.prompt_id,
                                      "cell_id": cell_id(p.context, pol, b, g, d, md.name)})
    return items


class ARIndex:
    """The AR baseline of each SD run: the AR run of the same prompt and mode measured for its
    drafter's group (see :func:`build_items`), else any AR run of that prompt and mode (older
    journals measured AR once per prompt)."""

    def __init__(self, runs: Iterable[dict], kinds: tuple[str, ...] = ("ar",)) -> None:
        self._by: dict[tuple, dict] = {}
        for r in runs:
            if r["kind"] in kinds and "error" not in r:
                self.add(r)

    def add(self, r: dict) -> None:
        """Index AR record ``r`` (its drafter group's baseline, and its prompt's if first)."""
        self._by[(r["prompt_id"], r["mode"], r.get("drafter"))] = r
        self._by.setdefault((r["prompt_id"], r["mode"], None), r)

    def get(self, sd: dict) -> dict | None:
        """The AR record for SD record ``sd``, or ``None`` when its prompt and mode have none."""
        return (self._by.get((sd["prompt_id"], sd["mode"], sd.get("drafter")))
                or self._by.get((sd["prompt_id"], sd["mode"], None)))


def item_key(item: dict) -> str:
    """Stable identity of one measurement: kind, prompt (id and a hash of its tokens), mode, cell."""
    toks = hashlib.sha256(json.dumps(item["prompt"]["token_ids"]).encode()).hexdigest()[:12]
    mode = json.dumps(item["mode"], sort_keys=True)
    cell = item.get("cell_id") or item.get("drafter")      # AR runs: the drafter group they baseline
    return f"{item['kind']}|{item['prompt']['prompt_id']}|{toks}|{mode}|{cell}"


