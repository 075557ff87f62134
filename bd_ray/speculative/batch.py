"""The batched speculative engine: a dynamic set of requests (rows) stepped together.

One :meth:`BatchEngine.step`:

1. admit waiting requests while ``max_num_seqs`` and the KV-cache memory budget allow (the rest
   wait in FIFO order; nothing is allocated beyond the budget, so many long prompts never OOM;
   :mod:`bd_ray.speculative.admission`, with the optional elastic draft budget);
2. prefill (:mod:`bd_ray.speculative.prefill`): the step's prefill budget of prompt tokens
   (``max_num_batched_tokens`` less the decoding rows' tokens while they outnumber prefilling
   rows, else ``prefill_chunk``; rows already decoding keep going: chunked prefill interleaved with
   decoding): verifier pieces first (a fixed-γ row's drafter piece with each), the verifier's
   last logits giving the row's first token; then, with what is left, the deferred drafter
   prefills of adaptive rows already decoding, only while the batch policy would speculate at this
   batch size. Before it, the caches' pending reshapes move a layer or so
   (:meth:`RaggedKVCache.settle`: admitting a long prompt never copies every row of every layer
   in one step);
3. decode: the speculation policy (:mod:`bd_ray.speculative.batch_policy`, from whole decode-step
   times) gives each row its γ (0 allowed); ``max γ`` drafter forwards draft for all drafting
   rows at once (a row takes part in the first ``γ_r``); ONE verifier forward over every row's
   block (γ_r drafts + the pending token); per-row rejection (greedy argmax once for the batch;
   sampling with each row's own generator, in the batch-1 order of draws); per-row emission
   through the stopping rules, and per-row rollback (a length update in :class:`RaggedKVCache`).

An adaptive row joining a batch where the policy judges speculation off (measured, or
``disable_above``) is admitted plainly: no drafter prefill, no drafter cache entries, plain for its
life (:meth:`bd_ray.speculative.batch_policy.BatchSpecPolicy.admit_plainly`). Other adaptive rows
decode plainly from their first token until their deferred drafter prefill is done; a row
finishing before that was plain for its life, and its pending prefill is dropped.

Both caches are :class:`bd_ray.speculative.ragged_cache.RaggedKVCache` (padded
``[slots, kv_heads, capacity, head_dim]``, per-row lengths); a row keeps the same slot index in
both. A finished or cancelled row frees its slot at once (length 0); when no row is left both
caches release their storage.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from bd_ray import kvcache
from bd_ray.config import budget_tokens
from bd_ray.config.decoding import ElasticBudgetConfig
from bd_ray.sparse import min_budget
from bd_ray.speculative.admission import MemoryPlan
from bd_ray.speculative.adaptive import CONSTANT_PRIOR, CostPrior, GammaController
from bd_ray.speculative.cost_prior import measure_cost_prior
from bd_ray.speculative.batch_policy import BatchSpecPolicy
from bd_ray.speculative.prefill import Prefiller, prefill_bytes
from bd_ray.speculative.ragged_cache import RaggedKVCache, kv_bytes_per_token, ragged_forward
from bd_ray.speculative.rejection import verify_greedy_batch, verify_sampling
from bd_ray.speculative.results import check_context, max_positions
from bd_ray.speculative.rows import DRAFTER_PENDING, CycleState, Prefilled, Row
from bd_ray.speculative.sampling import filtered_probs

__all__ = ["BatchOptions", "BatchEngine", "new_row"]

log = logging.getLogger(__name__)

#: bytes of cache storage each cache may reallocate per step to reach its reserved shape
#: (:meth:`RaggedKVCache.settle`): about one verifier layer at 9 rows x 4K entries in fp32, a
#: copy that adds a few percent to a decode step instead of stalling one step for all layers
SETTLE_BYTES = 64 << 20


@dataclass
class BatchOptions:
    """Admission limits of a :class:`BatchEngine`.

    Attributes:
        max_num_seqs: rows decoded together at most.
        kv_cache_bytes: bytes both caches (and in-flight prefills) may hold; ``None`` = no limit.
        disable_above: adaptive rows never speculate with more decoding rows than this.
        max_num_batched_tokens: tokens one step computes while decoding rows outnumber
            prefilling ones (vLLM's name): the decoding rows' 1 + γ each, the rest (at least a
            quarter of it) prompt tokens of prefill, so a long prefill stalls the streams
            decoding beside it by about this many tokens' time per step; otherwise, and when
            ``None``, a step prefills a whole ``prefill_chunk``
            (:meth:`bd_ray.speculative.prefill.Prefiller.budget`).
        elastic_budget: lower the drafter KV budget of new rows instead of queueing them
            (:mod:`bd_ray.speculative.admission`; off by default).
    """

    max_num_seqs: int = 8
    kv_cache_bytes: int | None = None
    disable_above: int | None = None
    max_num_batched_tokens: int | None = None
    elastic_budget: ElasticBudgetConfig = field(default_factory=ElasticBudgetConfig)


class _Clock:
    """Phase timings without a host sync per phase.

    :meth:`mark` returns ``time.perf_counter()`` on CPU and a recorded ``torch.cuda.Event`` on
    CUDA (queued on the device's current stream, no wait); :meth:`seconds` turns two marks into
    seconds, waiting on the end event only. Callers read the marks after the phase's own host sync
    (the verifier's verdict, a prefill's logits), so a draft step is never followed by a
    ``torch.cuda.synchronize`` and an engine step waits at most once more than its work does.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


class BatchEngine:
    """Continuous batching of (speculative) requests on one verifier and an optional drafter.

    Args:
        verifier, drafter: transformers causal LMs (``drafter=None``: plain decoding only).
        tokenizer: their tokenizer. spec: :class:`bd_ray.config.SpecConfig` (γ, budget, policy,
            prefill chunk, adaptive). options: :class:`BatchOptions`. eos_token_ids: default EOS ids.
    """

    def __init__(self, verifier: Any, drafter: Any, tokenizer: Any, spec: Any, options: BatchOptions | None = None,
                 eos_token_ids: list[int] | None = None) -> None:
        self.verifier, self.drafter, self.tokenizer, self.spec = verifier, drafter, tokenizer, spec
        self.options = options or BatchOptions()
        self.device = next(verifier.parameters()).device
        self.clock = _Clock(self.device)
        self.eos_token_ids = eos_token_ids or []
        self.vcache = RaggedKVCache(verifier.config.num_hidden_layers)
        self.dcache = RaggedKVCache(drafter.config.num_hidden_layers) if drafter is not None else None
        self.v_bpt = kv_bytes_per_token(verifier)
        self.d_bpt = kv_bytes_per_token(drafter) if drafter is not None else 0
        self.memory = MemoryPlan(self.v_bpt, self.d_bpt, self.options.kv_cache_bytes, self.options.elastic_budget)
        self.policy = BatchSpecPolicy(max_gamma=spec.gamma, min_gain=spec.adaptive_min_gain,
                                      disable_above=self.options.disable_above)
        self.prefiller = Prefiller(verifier, drafter, self.vcache, self.dcache, spec, self.policy, self.clock,
                                   self._note_bytes, self.options.max_num_batched_tokens)
        self.waiting: deque[Row] = deque()
        self.peak_cache_bytes = 0
        self.prior: CostPrior | None = None     # set on the first adaptive row (:meth:`cost_prior`)
        self.rows: dict[int, Row] = {}          # slot -> row (admitted, not finished)

    # ---- admission ------------------------------------------------------------------------------
    def submit(self, row: Row) -> Row:
        """Queue a row (built by the caller, validated). Raises ``ValueError`` when it alone
        exceeds the memory budget (it could never be admitted, even at the elastic floor)."""
        if not self.memory.fits([row]):
            raise ValueError(f"request needs {self.memory.projected_bytes([row])} bytes of KV cache, more than the "
                             f"engine's kv_cache_bytes budget of {self.options.kv_cache_bytes} bytes")
        self.waiting.append(row)
        return row

    def _admit(self) -> None:
        admitted = False
        while self.waiting and len(self.rows) < self.options.max_num_seqs:
            row = self.waiting[0]
            slot = next(s for s in range(len(self.rows) + 1) if s not in self.rows)
            if not self.memory.fits(list(self.rows.values()) + [row], slots=max(max(self.rows, default=0), slot) + 1,
                                    held_extra=self._excess_bytes()):
                break
            self.waiting.popleft()
            row.slot = slot
            self.rows[row.slot] = row
            self._start_prefill(row)
            admitted = True
        if not self.waiting:
            self.memory.relieve()
        if admitted:
            self._fit_caches()

    @property
    def _caches(self) -> list[RaggedKVCache]:
        """The verifier's cache and, with a drafter, the drafter's."""
        return [c for c in (self.vcache, self.dcache) if c is not None]

    def _excess_bytes(self) -> int:
        """Cache bytes held beyond what the live rows reserve (storage not yet shrunk by
        :meth:`RaggedKVCache.settle`): admission counts them, so the budget holds meanwhile."""
        return sum(c.excess_bytes() for c in self._caches)

    def _fit_caches(self) -> None:
        """Size both caches for the live rows' most (the shape admission projected)."""
        slots = max(self.rows) + 1
        needs = [self.memory.row_entries(r) for r in self.rows.values()]
        self.vcache.fit(slots, max(v for v, _, _ in needs))
        if self.dcache is not None:
            self.dcache.fit(slots, max(d for _, d, _ in needs))

    def cancel(self, row: Row) -> None:
        """Drop a row now (client gone): its slot and both caches' entries are freed at once."""
        row.cancelled = True
        if row in self.waiting:
            self.waiting.remove(row)
        self._release(row)

    def _release(self, row: Row) -> None:
        if row.slot is not None and self.rows.get(row.slot) is row:
            del self.rows[row.slot]
            for cache in self._caches:
                if row.slot < len(cache.lens):
                    cache.free(row.slot)
            if self.rows:
                self._fit_caches()
        row.v_tmp = row.d_tmp = row.v_tail = None     # a pending (drafter) prefill is dropped
        row.v_pieces, row.d_pieces = [], []
        if not self.rows:
            for cache in self._caches:
                cache.release()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.rows)

    def cache_bytes(self, transient: bool = True) -> int:
        """Bytes both caches hold now, plus (``transient``) the per-request prefill caches of rows
        being prefilled: what ``kv_cache_bytes`` bounds."""
        held = sum(c.nbytes for c in self._caches)
        if transient:
            held += sum(prefill_bytes(t) for r in self.rows.values() for t in (r.v_tmp, r.d_tmp) if t is not None)
        return held

    def _note_bytes(self) -> None:
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    def stats(self) -> dict:
        """Engine counters: rows live/waiting, cache bytes now (``cache_bytes``: both caches) and at
        most so far (``peak_cache_bytes``: with in-flight prefills, sampled after every prefill
        piece, cache install and decode step), rows the elastic budget lowered, the cost prior
        (``None`` before the first adaptive row), and the decode and prefill steps'
        :class:`bd_ray.speculative.batch_policy.BatchStats` (with ``decode_tokens_per_s`` and the
        policy's per-bucket table, :meth:`BatchSpecPolicy.as_dict`)."""
        return {"live_rows": len(self.rows), "waiting": len(self.waiting),
                "cache_bytes": self.cache_bytes(transient=False), "peak_cache_bytes": self.peak_cache_bytes,
                "elastic_lowered": self.memory.lowered,
                "cost_prior": self.prior.as_dict() if self.prior is not None else None,
                **self.policy.as_dict()}

    # ---- step -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """One engine step (module docstring); chunks land in each row's ``outbox``."""
        self._admit()
        for cache in self._caches:
            cache.settle(SETTLE_BYTES)
        t = self.clock.mark()
        prefilled, first_only = self.prefiller.step(list(self.rows.values()))
        if prefilled:
            self.policy.observe_prefill(self.clock.seconds(t, self.clock.mark()), prefilled)
        for row in first_only:        # finished on their first token
            self._finish(row)
        self._decode()

    def cost_prior(self) -> CostPrior:
        """The speculation policies' cost prior: measured once on this engine's device, on the
        model thread, when the first adaptive row is admitted (:mod:`bd_ray.speculative.cost_prior`);
        the constant when ``spec.adaptive_cost_prior`` is ``"constant"``. Sets the batch policy's."""
        if self.prior is None:
            measure = self.spec.adaptive_cost_prior == "measure" and self.drafter is not None
            self.prior = measure_cost_prior(self.verifier, self.drafter, self.spec.gamma) if measure else CONSTANT_PRIOR
            self.policy.prior = (self.prior.draft_ratio, self.prior.slope_ratio)
        return self.prior

    def _start_prefill(self, row: Row) -> None:
        # an adaptive row joining a batch where speculation is judged off: plain for its life
        plainly = self.policy.admit_plainly(len(self.rows)) if row.controller is not None else None
        if plainly is not None:
            row.spec, row.controller, row.fallback, row.plain_reason = False, None, plainly, plainly
        if row.controller is not None:
            first, t = self.prior is None, time.perf_counter()
            row.controller.set_cost_prior(self.cost_prior())
            if first:   # the prior is set up once per engine, inside this row's lifetime: its setup, not decode
                row.timings.setup_s += time.perf_counter() - t
        self.prefiller.plan(row)

    def _finish(self, row: Row) -> None:
        if row.drafter_pending:       # the drafter never saw the prompt: the row was plain for its life
            reason = row.plain_reason if row.plain_reason not in (None, DRAFTER_PENDING) else None
            row.spec, row.fallback = False, reason or "finished before its deferred drafter prefill was done"
            if row.deferred_at is not None:
                self.policy.drafter_dropped(row.deferred_at)
        row.finish()
        self._release(row)

    # ---- decode ---------------------------------------------------------------------------------
    def _decode(self) -> None:
        rows = [r for r in self.rows.values() if r.phase == "decode"]
        if not rows:
            return
        clock = self.clock
        t_step = clock.mark()          # the whole step: the policy's cost model is anchored on it
        gammas = self.policy.choose(rows)
        drafts: dict[Row, list[int]] = {r: [] for r in rows}
        qs: dict[Row, list[torch.Tensor]] = {r: [] for r in rows}
        # each drafter forward's marks and its rows; timed after the verdicts (no sync per draft step)
        spans: list[tuple[Any, Any, list[Row], list[Row]]] = []
        g_max = max(gammas.values())
        for k in range(g_max):
            part = [r for r in rows if gammas[r] > k]
            feeds = {r.slot: (r.committed[r.d_len:] if k == 0 else [drafts[r][-1]]) for r in part}
            t = clock.mark()
            out = ragged_forward(self.drafter, self.dcache, feeds,
                                 {r.slot: r.d_len for r in part}, {r.slot: 1 for r in part})
            spans.append((t, clock.mark(), part,
                          # catching up on plainly decoded tokens
                          [r for r in part if k == 0 and len(feeds[r.slot]) > 2]))
            for r in part:
                r.d_len += len(feeds[r.slot])
                tok, q = r.draft_token(out[r.slot][-1])
                drafts[r].append(tok)
                if q is not None:
                    qs[r].append(q)
        for r in rows:
            if gammas[r]:
                r.peak_d = max(r.peak_d, r.kept + r.d_len - r.n_prompt)

        feeds = {r.slot: r.committed[r.v_len:] + drafts[r] for r in rows}
        t = clock.mark()
        out = ragged_forward(self.verifier, self.vcache, feeds, {r.slot: r.v_len for r in rows},
                             {r.slot: gammas[r] + 1 for r in rows})
        verdicts = self._verify(rows, drafts, qs, out)
        self._note_bytes()
        verify_s = clock.seconds(t, clock.mark())
        catch_up: dict[Row, float] = {}
        row_draft_s: dict[Row, float] = {r: 0.0 for r in rows}   # drafter forwards the row took part in
        for a, b, part, catching_up in spans:
            dt = clock.seconds(a, b)
            for r in catching_up:
                catch_up[r] = dt
            for r in part:
                r.timings.draft_s += dt
                row_draft_s[r] += dt
        tokens = 0
        for r in rows:
            g, verdict = gammas[r], verdicts[r]
            committed_n = len(r.committed)
            r.peak_v = max(r.peak_v, r.v_len + len(feeds[r.slot]))
            if g == 0:
                r.v_len = committed_n
                r.timings.plain_s += verify_s
                r.plain_steps += 1
                if r.controller is not None:
                    r.controller.observe_plain(verify_s)
            else:
                r.metrics.record_cycle(g, verdict.num_accepted)
                r.v_len = committed_n + verdict.num_accepted
                self.vcache.set_len(r.slot, r.v_len)
                r.d_len = committed_n + min(verdict.num_accepted, g - 1)
                self.dcache.set_len(r.slot, r.kept + r.d_len - r.n_prompt)
                r.timings.verify_s += verify_s
                if r.controller is not None:
                    r.controller.observe_cycle(g, verdict.num_accepted, row_draft_s[r], verify_s,
                                               catch_up_s=catch_up.get(r, 0.0))
            before = r.checker.num_tokens
            r.emit(verdict.emitted(drafts[r]), out[r.slot])
            tokens += r.checker.num_tokens - before
            if g and r.req.inspect is not None:
                r.req.inspect(self._cycle_state(r))
            if r.finished:
                self._finish(r)
        self.policy.observe([gammas[r] for r in rows], clock.seconds(t_step, clock.mark()), tokens,
                            catch_up=bool(catch_up))

    def _verify(self, rows: list[Row], drafts: dict, qs: dict, out: dict) -> dict:
        greedy = [r for r in rows if r.greedy]
        verdicts = dict(zip(greedy, verify_greedy_batch([drafts[r] for r in greedy], [out[r.slot] for r in greedy])))
        for r in rows:
            if not r.greedy:
                q = torch.stack(qs[r]) if qs[r] else None
                verdicts[r] = verify_sampling(drafts[r], q, filtered_probs(out[r.slot], r.req.sampling), r.generator)
        return verdicts

    def _cycle_state(self, r: Row) -> CycleState:
        v = kvcache.KVCache.from_tensors(self.vcache.row(r.slot))
        d = kvcache.KVCache.from_tensors(self.dcache.row(r.slot))
        d.kept_positions, d.kept_len = r.kept_positions, r.kept
        return CycleState(r.committed, v, d, r.v_len, r.d_len, r.kept)


def new_row(engine: BatchEngine, req: Any) -> Row:
    """Validate a :class:`bd_ray.speculative.rows.RowRequest` and build its :class:`Row`.

    Raises:
        ValueError: ``gamma < 1``; an empty prompt; ``prefilled`` from another prompt; a budget
            below the sparse policy's minimum for this prompt (names the minimum,
            :func:`bd_ray.sparse.min_budget`).
        ContextLengthError: prompt + ``max_new_tokens`` beyond the verifier's positions.
    """
    spec, sampling = engine.spec, req.sampling
    gamma = spec.gamma if req.gamma is None else int(req.gamma)
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    # "default" = the engine spec's budget; "full" and None both mean the full drafter cache
    budget = budget_tokens(spec.budget if req.budget == "default" else req.budget)
    prompt = req.prompt
    policy = req.policy or spec.policy
    check_context(len(prompt), sampling.max_new_tokens, max_positions(engine.verifier))
    pre = req.prefilled
    if isinstance(pre, Prefilled) and pre.prompt != list(prompt):
        raise ValueError("prefilled belongs to a different prompt")
    spec_on = bool(req.speculative) and engine.drafter is not None
    fallback = None
    d_limit = max_positions(engine.drafter) if engine.drafter is not None else None
    if spec_on and d_limit is not None and len(prompt) + sampling.max_new_tokens > d_limit:
        fallback = (f"drafter position limit {d_limit} < prompt ({len(prompt)}) + max_new_tokens "
                    f"({sampling.max_new_tokens}); decoded without speculation")
        log.warning(fallback)
        spec_on = False
    if spec_on and budget is not None and budget < len(prompt):
        least = min_budget(policy, len(prompt))
        if budget < least:
            raise ValueError(f"KV budget {budget} is below the minimum {least} of the {policy.name} policy "
                             f"for a {len(prompt)}-token prompt")
    adaptive = spec.adaptive if req.adaptive is None else req.adaptive
    controller = GammaController(gamma, min_gain=spec.adaptive_min_gain) if spec_on and adaptive else None
    return Row(req, engine.tokenizer, engine.eos_token_ids, engine.device, gamma, budget, policy,
               spec_on, fallback, controller)
