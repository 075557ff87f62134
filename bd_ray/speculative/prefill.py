"""Prefill of the batched engine's rows: the pieces plan, and the per-step prefill scheduler.

A prompt is prefilled into per-request caches (:func:`bd_ray.kvcache.prefill`, so query capture
and the prompt-agreement probe are the batch-1 ones) a piece of ``spec.prefill_chunk`` tokens at a
time, so streams already decoding keep going (chunked prefill interleaved with decoding). A
finished prefill is copied into the row's slot of the engine's caches: the verifier's prefix as
is, the drafter's compacted to the row's KV budget by its sparse policy
(:func:`bd_ray.kvcache.compact_cache`, the rule of :func:`bd_ray.sparse.select_positions`). The
verifier's last logits give the first token, as in plain decoding.

One engine step's prefill work (:meth:`Prefiller.step`), within the step's budget
(:meth:`Prefiller.budget`: ``max_num_batched_tokens`` less the decoding rows' tokens while decoding
rows outnumber prefilling ones, else ``prefill_chunk``):

1. **first tokens first**: verifier pieces of the rows not yet decoding, shortest remaining
   prefill first (a short prompt arriving during a long one's prefill gets its first token within
   a chunk or two). A fixed-γ row's drafter piece runs with each of its verifier pieces and its
   first token waits for both prefills (today's order: its text, seeded sampling included, must
   not depend on its batch mates, so nothing about it may depend on the batch policy).
2. **deferred drafter prefills**: an adaptive row (γ chosen by the speculation policies) starts
   decoding as soon as its verifier prefill is done, plainly (γ = 0,
   :attr:`bd_ray.speculative.rows.Row.drafter_pending`); its drafter pieces then run with what is
   left of the step's budget (each costs its tokens), shortest remaining first, only while the
   batch policy would speculate at the engine's batch size
   (:meth:`bd_ray.speculative.batch_policy.BatchSpecPolicy.defer_drafter`). When the last piece is
   done the prompt-agreement probe feeds the row's controller (the verifier's tail argmax is kept
   on the row until then), and the compacted prefix is installed with ``d_len = n_prompt``; the
   first drafter forward of the row's next speculative step catches up on the tokens decoded
   plainly meanwhile (``committed[d_len:]``). A burst of adaptive rows into a batch where
   speculation does not pay so spends nothing on the drafter's share of prefill, and a row alone
   gets its first token a drafter prefill earlier. A row that never gets its drafter prefill
   decodes plainly for its life; its partial drafter cache is dropped when it finishes or is
   cancelled (the engine's ``_release``).

Memory: a pending drafter prefill's per-request cache is transient memory until installed
(:meth:`bd_ray.speculative.admission.MemoryPlan.row_entries`; the engine's ``cache_bytes``), and
the row's drafter cache entries stay reserved from admission on, so admission by
``kv_cache_bytes`` holds whether or when the deferred prefill runs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from bd_ray import kvcache
from bd_ray.sparse import queries_needed
from bd_ray.speculative.adaptive import PROMPT_PROBE_TOKENS, prompt_agreement
from bd_ray.speculative.batch_policy import BatchSpecPolicy
from bd_ray.speculative.ragged_cache import RaggedKVCache
from bd_ray.speculative.rows import DRAFTER_PENDING, Prefilled, Row

__all__ = ["Prefiller", "pieces", "prefill_bytes", "split_head"]


def pieces(n: int, chunk: int, need: int) -> list[tuple[int, int]]:
    """Prefill pieces ``(start, end)`` of an ``n``-token prompt: ``chunk`` tokens each, the last at
    least ``need`` long (it must see the positions whose queries / argmax are captured)."""
    starts = list(range(0, n, chunk))
    last = starts[-1]
    if n - last < need:
        last = max(0, n - need)
    starts = [s for s in starts if s < last] + [last]
    return [(s, e) for s, e in zip(starts, starts[1:] + [n])]


def split_head(todo: list[tuple[int, int]], limit: int, need: int) -> None:
    """Split the first of the pieces ``todo`` so it is at most ``limit`` tokens, in place; the
    final piece keeps at least ``need`` tokens (cut earlier, or run whole when it cannot)."""
    s, e = todo[0]
    if e - s <= limit:
        return
    cut = s + max(1, limit)
    if len(todo) == 1 and e - cut < need:
        cut = e - need
        if cut <= s:
            return
    todo[0:1] = [(s, cut), (cut, e)]


def _tokens(todo: list[tuple[int, int]]) -> int:
    return sum(e - s for s, e in todo)


def prefill_bytes(pre: Any) -> int:
    """K/V bytes of a per-request prefill cache (a :class:`bd_ray.kvcache.PrefillResult`)."""
    return sum(t.numel() * t.element_size() for layer in pre.cache.layers for t in (layer.keys, layer.values)
               if t is not None)


class Prefiller:
    """Plans and runs the rows' prefills of one :class:`bd_ray.speculative.batch.BatchEngine`.

    Args:
        verifier, drafter: the engine's models (``drafter=None``: plain decoding only).
        vcache, dcache: the engine's :class:`RaggedKVCache` of each model (``dcache`` may be ``None``).
        spec: :class:`bd_ray.config.SpecConfig` (``prefill_chunk``).
        policy: the engine's :class:`BatchSpecPolicy` (when deferred drafter prefills may run).
        clock: the engine's phase clock (``mark()`` / ``seconds(a, b)``).
        note_bytes: called after each piece and cache install (the engine's peak memory sample).
        max_num_batched_tokens: the engine's per-step token budget (:meth:`budget`; ``None`` =
            ``prefill_chunk`` tokens of prefill every step).
    """

    def __init__(self, verifier: Any, drafter: Any, vcache: RaggedKVCache, dcache: RaggedKVCache | None,
                 spec: Any, policy: BatchSpecPolicy, clock: Any, note_bytes: Callable[[], None],
                 max_num_batched_tokens: int | None = None) -> None:
        self.verifier, self.drafter, self.vcache, self.dcache = verifier, drafter, vcache, dcache
        self.spec, self.policy, self.clock, self.note_bytes = spec, policy, clock, note_bytes
        self.max_num_batched_tokens = max_num_batched_tokens
        self.device = next(verifier.parameters()).device

    def plan(self, row: Row) -> None:
        """Plan ``row``'s pieces (none for a model whose prefill the request brings) and mark it
        prefilling; an adaptive row's drafter pieces are deferred (module docstring)."""
        pre = row.req.prefilled
        tail = PROMPT_PROBE_TOKENS if row.controller is not None else 0
        if isinstance(pre, Prefilled):
            row.v_tmp, row.d_tmp = pre.verifier, pre.drafter if row.spec else None
        elif pre is not None:
            row.v_tmp = pre
        if row.v_tmp is None:
            row.v_pieces = pieces(row.n_prompt, self.spec.prefill_chunk, tail)
        if row.spec and row.d_tmp is None:
            row.d_pieces = pieces(row.n_prompt, self.spec.prefill_chunk, max(tail, queries_needed(row.policy)))
            row.d_deferred = row.controller is not None
        row.phase = "prefill"

    def budget(self, rows: list[Row]) -> int:
        """Prompt tokens this step may prefill.

        ``prefill_chunk`` while at least as many rows wait for their first token (prefilling) as
        decode: then the prefill queue is what users wait on, and on a CPU a step spends about
        one decode step of all its rows whatever it prefills, so small chunks would multiply
        those decode steps and cut throughput (with 128-token steps throughout, 16 closed-loop
        clients of 2K-token prompts got less end-to-end throughput than 8: results/serving). Otherwise
        (streams decoding, a few prompts arriving) the streams' time per token is protected:
        what ``max_num_batched_tokens`` leaves after the decoding rows' tokens (1, + γ for a row
        that may draft: vLLM counts speculative tokens the same way), at least a quarter of it
        so a full batch never starves the queue, at most ``prefill_chunk``."""
        chunk, total = self.spec.prefill_chunk, self.max_num_batched_tokens
        decoding = [r for r in rows if r.phase == "decode"]
        if total is None or len(decoding) <= sum(r.phase == "prefill" for r in rows):
            return chunk
        tokens = sum(1 + (r.gamma if r.spec and r.d_ready else 0) for r in decoding)
        return min(chunk, max(total - tokens, total // 4, 1))

    def step(self, rows: list[Row]) -> tuple[int, list[Row]]:
        """One engine step's prefill work over the live ``rows`` (module docstring), within
        :meth:`budget` tokens: a piece longer than what is left is split (its last part keeping
        the tokens whose queries / argmax are captured).

        Returns:
            the prompt tokens prefilled (both models; 0 = no prefill work ran), and the rows that
            finished on their first token (the caller finishes and releases them before decoding).
        """
        left = self.budget(rows)
        spans: list[tuple[Row, str, Any, Any]] = []   # read once, after this step's prefill work
        done: list[Row] = []
        prefilling = sorted((r for r in rows if r.phase == "prefill"),
                            key=lambda r: _tokens(r.v_pieces) + (0 if r.d_deferred else _tokens(r.d_pieces)))
        tokens = 0
        for row in prefilling:
            if left <= 0:
                break
            v = self._piece(row, False, spans, left) if row.v_pieces else 0
            # a fixed-γ row's drafter keeps pace with its verifier (its tokens are not charged: the
            # drafter is the cheap model)
            d = self._piece(row, True, spans, v or left) if row.d_pieces and not row.d_deferred else 0
            left, tokens = left - (v or d), tokens + v + d
            if not row.v_pieces and (row.d_deferred or not row.d_pieces):
                spans = self._add_spans(spans, row)   # before a result can be built from the timings
                self._start_decoding(row)
                if row.finished:
                    done.append(row)
        pending = sorted((r for r in rows if r.drafter_pending and not r.finished), key=lambda r: _tokens(r.d_pieces))
        wait = self.policy.defer_drafter(len(rows)) if pending else None
        for row in pending:
            if wait is not None:
                row.plain_reason, row.deferred_at = wait, len(rows)
                continue
            row.plain_reason = DRAFTER_PENDING
            if left <= 0:
                continue
            n = self._piece(row, True, spans, left)
            left, tokens = left - n, tokens + n
            if not row.d_pieces:
                spans = self._add_spans(spans, row)
                self._install_drafter(row, row.v_tail)
        self._add_spans(spans, None)
        return tokens, done

    def _piece(self, row: Row, drafter: bool, spans: list, limit: int) -> int:
        """Run ``row``'s next piece of the drafter's (or verifier's) prefill, at most ``limit``
        tokens (:func:`split_head`); the last one captures the queries the sparse policy scores
        with (drafter) and the prompt-tail argmax (adaptive rows). Returns its tokens."""
        model = self.drafter if drafter else self.verifier
        todo = row.d_pieces if drafter else row.v_pieces
        tmp = row.d_tmp if drafter else row.v_tmp
        tail = PROMPT_PROBE_TOKENS if row.controller is not None else 0
        need_q = queries_needed(row.policy) if drafter else 0
        split_head(todo, limit, max(tail, need_q))
        s, e = todo.pop(0)
        last = not todo
        t = self.clock.mark()
        out = kvcache.prefill(model, torch.tensor([row.prompt[s:e]], device=self.device),
                              cache=tmp.cache if tmp is not None else None,
                              chunk_size=self.spec.prefill_chunk, start_position=s,
                              capture_queries_window=need_q if last else 0, tail_argmax=tail if last else 0)
        spans.append((row, "drafter_prefill_s" if drafter else "verifier_prefill_s", t, self.clock.mark()))
        if drafter:
            row.d_tmp = out
        else:
            row.v_tmp = out
        self.note_bytes()
        return e - s

    def _add_spans(self, spans: list[tuple[Row, str, Any, Any]], row: Row | None) -> list:
        """Add the prefill spans of ``row`` (``None``: all) to their rows' timings; return the rest."""
        rest = []
        for r, name, a, b in spans:
            if row is None or r is row:
                setattr(r.timings, name, getattr(r.timings, name) + self.clock.seconds(a, b))
            else:
                rest.append((r, name, a, b))
        return rest

    def _start_decoding(self, row: Row) -> None:
        """Install the verifier prefix, and the drafter's unless deferred; emit the first token."""
        vpre = row.v_tmp
        if kvcache.cache_len(vpre.cache) != row.n_prompt:
            raise ValueError(f"prefilled verifier cache holds {kvcache.cache_len(vpre.cache)} tokens, "
                             f"prompt has {row.n_prompt}")
        self.vcache.install(row.slot, [(l.keys, l.values) for l in vpre.cache.layers])
        row.v_len = row.peak_v = row.n_prompt
        if row.spec and row.d_pieces:
            row.v_tail = vpre.tail_argmax          # the prompt-agreement probe, once the drafter is done
        elif row.spec:
            self._install_drafter(row, vpre.tail_argmax)
        self.note_bytes()
        row.v_tmp = None
        row.phase = "decode"
        logits = vpre.last_logits[0]
        row.emit([row.pick(logits)], logits.view(1, -1))

    def _install_drafter(self, row: Row, v_tail: Any) -> None:
        """Feed the prompt-agreement probe to the controller, compact the drafter prefix to the
        row's budget and install it (``d_len = n_prompt``); the row may draft from now on."""
        dpre = row.d_tmp
        if row.controller is not None:
            agreement = prompt_agreement(v_tail, dpre.tail_argmax)
            if agreement is not None:
                row.controller.observe_prompt_agreement(*agreement)
        t = self.clock.mark()
        compact = kvcache.compact_cache(dpre.cache, row.budget, row.policy, queries=dpre.queries)
        self.dcache.install(row.slot, [(l.keys, l.values) for l in compact.layers])
        row.timings.drafter_prefill_s += self.clock.seconds(t, self.clock.mark())
        row.kept = row.peak_d = kvcache.cache_len(compact)
        row.kept_positions = compact.kept_positions
        row.d_len = row.n_prompt
        row.d_ready = True
        self.note_bytes()
        row.d_tmp = row.v_tail = None
