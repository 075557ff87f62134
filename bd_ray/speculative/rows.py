"""One request inside the batched engine: what was asked (:class:`RowRequest`) and its state (:class:`Row`).

A row lives through ``waiting`` (queued for a slot) -> ``prefill`` (a chunk per engine step) ->
``decode`` -> ``done``; an adaptive row may decode plainly while its drafter prefill is still
pending (:mod:`bd_ray.speculative.prefill`, :attr:`Row.drafter_pending`). Its token bookkeeping is the batch-1 engine's (docs/DESIGN.md section 2):

* ``v_len``: tokens the verifier cache holds (entry ``i`` = position ``i``);
* ``d_len``: true tokens the drafter has seen; its cache holds ``kept`` compact prefix entries
  plus ``d_len - n_prompt`` generated ones (case 10: exactly what a fresh drafter pass would hold);
* every emitted token goes through the row's :class:`StopChecker` (cases 1-3), and its logprob
  entry is kept only while its token is (none for text trimmed by a stop string: case 14).
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from bd_ray import kvcache
from bd_ray.config import SamplingConfig, SparsePolicyConfig
from bd_ray.speculative.adaptive import GammaController
from bd_ray.speculative.metrics import SpecMetrics, Timings
from bd_ray.speculative.results import GenerationResult, StreamChunk, logprob_entries
from bd_ray.speculative.sampling import filtered_probs, is_greedy, sample_from
from bd_ray.speculative.stopping import StopChecker

__all__ = ["DRAFTER_PENDING", "Prefilled", "CycleState", "RowRequest", "Row"]

#: plain_reason of a decoding row whose deferred drafter prefill has not run yet
DRAFTER_PENDING = "drafter prefill pending"


@dataclass
class Prefilled:
    """Both prefills of one prompt, reusable across many requests/cells (never mutated).

    Attributes:
        prompt: the prompt ids.
        verifier: full-cache verifier prefill (cache + last logits).
        drafter: full drafter prefill (+ captured queries when the policy needs them); each
            request compacts it to its own budget.
        verifier_s, drafter_s: seconds each prefill took.
    """

    prompt: list[int]
    verifier: kvcache.PrefillResult
    drafter: kvcache.PrefillResult
    verifier_s: float = 0.0
    drafter_s: float = 0.0


@dataclass
class CycleState:
    """What an ``inspect`` hook sees after each of its row's cycles, after rollback.

    Attributes:
        committed: prompt + emitted ids so far.
        verifier_cache: holds ``committed[:verifier_len]``.
        drafter_cache: compact prefix (``kept`` entries) + ``committed[len(prompt):drafter_len]``.
        verifier_len, drafter_len: true token counts held by each cache.
        kept: compact prefix entries per layer and KV head.
    """

    committed: list[int]
    verifier_cache: kvcache.KVCache
    drafter_cache: kvcache.KVCache
    verifier_len: int
    drafter_len: int
    kept: int


@dataclass
class RowRequest:
    """One request for the batched engine.

    Attributes:
        prompt: prompt ids.
        sampling: decoding parameters (greedy at temperature 0; ``seed`` seeds the row's own
            ``torch.Generator``, unseeded rows draw a fresh seed: no shared random stream).
        speculative: ``False`` decodes this row plainly inside a speculating batch.
        gamma: the row's γ (fixed) or γ cap (adaptive); ``None`` = the engine's.
        budget: drafter KV budget (``None`` = full cache; ``"default"`` = the engine's).
        policy: the drafter's sparse policy (``None`` = the engine's).
        adaptive: γ chosen by the speculation policy (``None`` = the engine's setting).
        logprobs: ``k`` >= 0 returns each emitted token's logprob and its top-``k`` alternatives.
        prefilled: a :class:`Prefilled` (or a verifier ``PrefillResult``) of this prompt to reuse.
        inspect: called with a :class:`CycleState` after each of this row's cycles (tests).
    """

    prompt: list[int]
    sampling: SamplingConfig
    speculative: bool = True
    gamma: int | None = None
    budget: int | None | str = "default"
    policy: SparsePolicyConfig | None = None
    adaptive: bool | None = None
    logprobs: int | None = None
    prefilled: Any = None
    inspect: Callable[[CycleState], None] | None = None


class Row:
    """State of one request in the engine (see the module docstring)."""

    def __init__(self, req: RowRequest, tokenizer: Any, default_eos: Sequence[int], device: torch.device,
                 gamma: int, budget: int | None, policy: SparsePolicyConfig, spec: bool,
                 fallback: str | None, controller: GammaController | None) -> None:
        s = req.sampling
        self.req = req
        self.prompt = list(req.prompt)
        self.n_prompt = len(self.prompt)
        eos = s.eos_token_ids if s.eos_token_ids is not None else list(default_eos)
        self.checker = StopChecker(tokenizer, s.max_new_tokens, eos, s.stop)
        self.greedy = is_greedy(s)
        self.generator: torch.Generator | None = None
        if not self.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        self.gamma, self.budget, self.policy = gamma, budget, policy
        self.requested_budget = budget        # ``budget`` may be lowered by the elastic draft budget
        self.spec = spec                      # drafts may be proposed for this row
        self.fallback = fallback              # why a speculative request runs without its drafter
        self.controller = controller
        self.timings = Timings()
        self.metrics = SpecMetrics()
        self.t0 = time.perf_counter()
        self.phase = "waiting"
        self.slot: int | None = None
        self.cancelled = False
        self.v_len = self.d_len = self.kept = 0
        self.kept_positions: list[torch.Tensor] | None = None
        self.peak_v = self.peak_d = 0
        self.plain_steps = 0                  # decode steps without drafts (the last-token step included)
        self.plain_reason: str | None = None  # the latest reason a step was plain
        self.logprobs: list[dict] | None = [] if req.logprobs is not None else None
        self.outbox: deque[StreamChunk] = deque()
        self._released = 0                    # tokens handed out in chunks
        # prefill progress: pieces (start, end) per model, temporary per-request caches
        self.v_pieces: list[tuple[int, int]] = []
        self.d_pieces: list[tuple[int, int]] = []
        self.v_tmp: kvcache.PrefillResult | None = None
        self.d_tmp: kvcache.PrefillResult | None = None
        self.d_deferred = False               # drafter prefill after the first token (adaptive rows)
        self.d_ready = False                  # the drafter cache holds the compacted prompt
        self.v_tail: torch.Tensor | None = None   # verifier's prompt-tail argmax, kept until d_ready
        self.deferred_at: int | None = None   # batch size at which the policy last held the drafter back

    @property
    def drafter_pending(self) -> bool:
        """Decoding (plainly) while its deferred drafter prefill is not done: it drafts nothing yet."""
        return self.phase == "decode" and self.spec and not self.d_ready

    # ---- tokens ---------------------------------------------------------------------------------
    @property
    def committed(self) -> list[int]:
        """Prompt plus emitted tokens: what both models' caches converge to."""
        return self.prompt + self.checker.token_ids

    @property
    def finished(self) -> bool:
        return self.checker.finished or self.cancelled

    def pick(self, logits: torch.Tensor) -> int:
        """Next token from ``[vocab]`` verifier logits (argmax, or a sample of the filtered p)."""
        if self.greedy:
            return int(logits.argmax())
        return int(sample_from(filtered_probs(logits, self.req.sampling), self.generator))

    def draft_token(self, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """A draft from ``[vocab]`` drafter logits and the exact q it was sampled from (sampling)."""
        if self.greedy:
            return int(logits.argmax()), None
        q = filtered_probs(logits, self.req.sampling)
        return int(sample_from(q, self.generator)), q

    def emit(self, tokens: list[int], logits: torch.Tensor | None) -> None:
        """Add emitted ``tokens`` (``logits[i]`` emitted ``tokens[i]``) and queue a stream chunk.

        A chunk releases a token's id (and logprob entry) only once its text is released: text
        that may begin a stop string is held back (:meth:`StopChecker.text_delta`), and a token of
        it may still be cut, so its id must not have been streamed either (case 14)."""
        checker = self.checker
        before = checker.num_tokens
        checker.extend(tokens)
        if self.logprobs is not None:
            used = len(checker._ids) - before   # noqa: SLF001 (tokens consumed, before trimming)
            self.logprobs.extend(logprob_entries(logits, tokens[:used], self.req.logprobs))
            del self.logprobs[checker.num_tokens:]    # none for text cut by a stop string
        text = checker.text_delta()
        upto = checker.num_tokens
        if not checker.finished:   # tokens whose text lies wholly within the released text
            upto = min(upto, bisect.bisect_right(checker._ends, checker._streamed))  # noqa: SLF001
        lo = min(self._released, upto)
        lp = self.logprobs[lo:upto] if self.logprobs is not None else None
        self.outbox.append(StreamChunk(checker.token_ids[lo:upto], text, logprobs=lp))
        self._released = max(self._released, upto)

    # ---- result ---------------------------------------------------------------------------------
    def mode(self) -> tuple[str, str | None]:
        cycles, plain = self.metrics.cycles, self.plain_steps
        if not self.spec:
            return "plain", self.fallback or self.plain_reason
        if cycles == 0:
            return "plain", self.plain_reason or "no decode step had room for a draft"
        if plain == 0:
            return "speculative", None
        return "mixed", self.plain_reason

    def finish(self) -> None:
        """Queue the last chunk with the :class:`GenerationResult`."""
        self.timings.total_s = time.perf_counter() - self.t0
        mode, reason = self.mode()
        speculative = self.req.speculative and self.fallback is None
        stats = self.controller.stats.as_dict() if self.controller is not None else None
        fallback = self.fallback
        if fallback is None and self.controller is not None and not self.controller.speculating:
            fallback = self.controller.stats.stopped_reason
        result = GenerationResult(
            token_ids=self.checker.token_ids, text=self.checker.text,
            finish_reason=self.checker.finish_reason or "length", prompt_tokens=self.n_prompt,
            metrics=self.metrics, timings=self.timings, speculative=speculative, fallback_reason=fallback,
            peak_drafter_cache=self.peak_d, peak_verifier_cache=self.peak_v,
            adaptive=stats, mode=mode, mode_reason=reason,
            logprobs=list(self.logprobs) if self.logprobs is not None else None,
            budget=self.budget if self.spec else None)
        rest = slice(self._released, self.checker.num_tokens)
        self.outbox.append(StreamChunk(self.checker.token_ids[rest], self.checker.text_delta(), result,
                                       logprobs=self.logprobs[rest] if self.logprobs is not None else None))
        self._released = self.checker.num_tokens
        self.phase = "done"
