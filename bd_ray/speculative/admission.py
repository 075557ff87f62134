"""KV-cache memory of the batched engine's rows: what admitting a row would take, and the elastic
draft budget that lowers drafter budgets instead of queueing.

The projection follows the caches' layout (:mod:`bd_ray.speculative.ragged_cache`): both caches
are padded ``[slots, kv_heads, capacity, head_dim]`` tensors, so rows in ``slots`` slots cost
``slots x (the longest row's entries)`` per model, plus the per-request prefill caches of rows not
yet decoding (their full prompt in both models) and of rows whose deferred drafter prefill is not
installed yet (the drafter's). A row's drafter entries are reserved from admission on, whether or
when its deferred drafter prefill runs. A row's entries are its most: the verifier holds
prompt + ``max_new_tokens`` + γ + 2 (the last block's drafts and the pending token), the drafter its
compact prefix (``min(budget, prompt)``) + the same.

Elastic draft budget (:class:`bd_ray.config.decoding.ElasticBudgetConfig`): when a row would not
fit, the rows whose drafter prefix is not compacted yet (waiting, being prefilled, or decoding
with a deferred drafter prefill: lowering them costs nothing, their compaction at the end of the
drafter prefill simply keeps fewer positions) get the largest common budget cap, down to
``floor`` (never below the policy's minimum for their prompt), that lets it fit. The cap stays
while any row waits (a row arriving as another leaves would fit at its full budget, and the
padded drafter cache would never shrink), and is lifted when the queue is empty. Rows whose
drafter prefix is installed keep their budget: their drafter cache holds only the compacted
prefix (the full prefix keys and the captured queries ``chunk_topk`` / ``snapkv`` score with are
gone), so recompacting them by the same :func:`bd_ray.sparse.select_positions` rule would need a
new drafter prefill of the prompt.
"""

from __future__ import annotations

from typing import Any, Iterable

from bd_ray.config.decoding import ElasticBudgetConfig
from bd_ray.sparse import min_budget

__all__ = ["MemoryPlan"]


class MemoryPlan:
    """Bytes rows take in an engine's caches, and admission within ``limit`` bytes.

    Args:
        v_bpt, d_bpt: K/V bytes per token of the verifier / drafter (all layers;
            :func:`bd_ray.speculative.ragged_cache.kv_bytes_per_token`; 0 = no drafter).
        limit: ``kv_cache_bytes`` (``None`` = no limit).
        elastic: the elastic draft budget setting (``None`` = off).
    """

    def __init__(self, v_bpt: int, d_bpt: int, limit: int | None, elastic: ElasticBudgetConfig | None = None) -> None:
        self.v_bpt, self.d_bpt, self.limit = v_bpt, d_bpt, limit
        self.elastic = elastic if elastic is not None and elastic.enabled else None
        self.lowered = 0          # rows whose drafter budget the elastic rule lowered
        # While rows wait for memory, new rows run at most at this budget: rows already decoding
        # keep theirs, so the padded drafter cache shrinks only as the rows above the cap leave.
        self.cap: int | None = None

    @staticmethod
    def kept(row: Any, budget: int | None) -> int:
        """Compact drafter prefix entries of ``row`` at ``budget`` (``None`` = full)."""
        return row.n_prompt if budget is None else min(budget, row.n_prompt)

    def row_entries(self, row: Any, budget: int | None | str = "row") -> tuple[int, int, int]:
        """(verifier entries, drafter entries, transient prefill bytes) ``row`` needs at most,
        at ``budget`` (``"row"``: the row's own). Transient bytes are the per-request prefill
        caches it holds or will hold: the verifier's until it decodes, the drafter's until its
        compacted prefix is installed (a deferred drafter prefill, :mod:`bd_ray.speculative.prefill`)."""
        budget = row.budget if budget == "row" else budget
        extra = row.req.sampling.max_new_tokens + row.gamma + 2
        d = self.kept(row, budget) + extra if row.spec else 0
        v_pending = row.phase in ("waiting", "prefill")
        d_pending = row.spec and not row.d_ready      # a deferred drafter prefill outlives the first token
        transient = row.n_prompt * (self.v_bpt * v_pending + self.d_bpt * d_pending)
        return row.n_prompt + extra, d, transient

    def projected_bytes(self, rows: list[Any], slots: int | None = None,
                        budgets: dict[Any, int | None] | None = None) -> int:
        """Bytes the padded caches (+ in-flight prefills) take for ``rows`` in ``slots`` slots
        (default ``len(rows)``), rows at ``budgets[row]`` where given."""
        if not rows:
            return 0
        budgets = budgets or {}
        needs = [self.row_entries(r, budgets.get(r, "row")) for r in rows]
        n = len(rows) if slots is None else slots
        cache = n * (max(v for v, _, _ in needs) * self.v_bpt + max(d for _, d, _ in needs) * self.d_bpt)
        return cache + sum(t for _, _, t in needs)

    def fits(self, rows: list[Any], slots: int | None = None, held_extra: int = 0) -> bool:
        """Whether ``rows`` fit the limit, besides ``held_extra`` bytes the caches hold beyond
        their reserved shape until settled. With the elastic budget on, the rows not yet compacted
        run at most at the current cap (set while rows wait for memory), and when they still do
        not fit the cap is lowered as little as needed (down to the floor; module docstring)."""
        if self.elastic is not None and self.cap is not None:
            self._lower(rows, self.cap)
        if self.limit is None or self.projected_bytes(rows, slots) + held_extra <= self.limit:
            return True
        if self.elastic is None or held_extra:   # wait for the storage to shrink before lowering budgets
            return False
        low = {r: self._floor(r) for r in self._lowerable(rows)}
        low = {r: f for r, f in low.items() if f < self.kept(r, r.budget)}
        if not low:
            return False

        def trial(cap: int) -> dict[Any, int | None]:
            return {r: min(self.kept(r, r.budget), max(f, cap)) for r, f in low.items()}

        lo, hi = min(low.values()), max(self.kept(r, r.budget) for r in low)
        if self.projected_bytes(rows, slots, trial(lo)) > self.limit:
            self.cap = lo            # rows wait: whoever is admitted next runs at the floor
            return False
        while lo < hi:                       # the largest cap that fits (bytes fall as the cap falls)
            mid = (lo + hi + 1) // 2
            if self.projected_bytes(rows, slots, trial(mid)) <= self.limit:
                lo = mid
            else:
                hi = mid - 1
        self.cap = lo
        self._lower(rows, lo)
        return True

    def relieve(self) -> None:
        """No row waits any more: new rows run at their own budget again."""
        self.cap = None

    def _lower(self, rows: list[Any], cap: int) -> None:
        for r in self._lowerable(rows):
            b = min(self.kept(r, r.budget), max(self._floor(r), cap))
            if b < self.kept(r, r.budget):
                if r.requested_budget == r.budget:
                    self.lowered += 1
                r.budget = b

    @staticmethod
    def _lowerable(rows: Iterable[Any]) -> list[Any]:
        return [r for r in rows if r.spec and not r.d_ready]

    def _floor(self, row: Any) -> int:
        """The lowest budget ``row`` may run at: the configured floor, or the policy's minimum."""
        return max(self.elastic.floor, min_budget(row.policy, row.n_prompt))
