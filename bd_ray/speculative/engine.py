"""Speculative decoding with a sparse-KV drafter and a full-KV verifier (batch 1 per request).

One request runs as (docs/DESIGN.md sections 1-2; vLLM ``v1/spec_decode`` for the split of roles):

1. prefill: the verifier prefills the prompt into its full KV cache (in chunks, bounded memory);
   its last logits give the first output token, exactly as plain decoding would. The drafter
   prefills the prompt too and keeps only a sparse view of ``budget`` positions per layer and KV
   head (:func:`bd_ray.kvcache.compact_cache`), selected once, right after prefill (the paper).
2. cycle: the drafter proposes γ tokens on its compact cache (true RoPE positions); the verifier
   scores the γ+1 positions in one forward on its full cache; :mod:`bd_ray.speculative.rejection` keeps
   the accepted prefix and adds the recovered or bonus token; both caches drop the rejected
   entries, so the drafter cache holds exactly what a fresh drafter pass over the accepted tokens
   would (case 10 of docs/cases/spec-decoding.md).
3. every emitted token, inside a block too, goes through :class:`StopChecker` (EOS list, stop
   strings across tokens and blocks, ``max_new_tokens``).

:class:`ARGenerator` is plain decoding through the same verifier code path (same cache, same
prefill, same forward), so measured speedups compare like with like.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from bd_ray import kvcache
from bd_ray.config import SamplingConfig, SpecConfig, budget_tokens
from bd_ray.sparse import queries_needed
from bd_ray.speculative.adaptive import PROMPT_PROBE_TOKENS, GammaController, prompt_agreement
from bd_ray.speculative.metrics import SpecMetrics, Timings
from bd_ray.speculative.rejection import verify_greedy, verify_sampling
from bd_ray.speculative.sampling import filtered_probs, is_greedy, sample_from
from bd_ray.speculative.stopping import StopChecker

__all__ = [
    "ContextLengthError",
    "GenerationResult",
    "StreamChunk",
    "Prefilled",
    "CycleState",
    "ARGenerator",
    "SpeculativeGenerator",
    "max_positions",
]

log = logging.getLogger(__name__)


class ContextLengthError(ValueError):
    """Prompt length + ``max_new_tokens`` exceeds a model's position limit (names the limit)."""


def max_positions(model: Any) -> int | None:
    """The model's position limit in tokens (``config.max_position_embeddings``), or ``None``."""
    return getattr(model.config, "max_position_embeddings", None)


def _check_context(prompt_len: int, max_new_tokens: int, limit: int | None) -> None:
    if prompt_len < 1:
        raise ValueError("prompt must contain at least 1 token")
    if limit is not None and prompt_len + max_new_tokens > limit:
        raise ContextLengthError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = "
            f"{prompt_len + max_new_tokens} exceeds the verifier's context limit of {limit} tokens")


@dataclass
class GenerationResult:
    """What one request produced.

    Attributes:
        token_ids: emitted ids (EOS included when it ended generation).
        text: decoded output, special tokens skipped, truncated before a stop string.
        finish_reason: ``"stop"`` (EOS or stop string) or ``"length"``.
        prompt_tokens: prompt length in tokens.
        metrics: α, τ, per-position acceptance (empty for AR).
        timings: seconds per phase.
        speculative: whether the request was decoded speculatively.
        fallback_reason: why a speculative request fell back to plain decoding, else ``None``.
        peak_drafter_cache: largest drafter cache length (entries per layer and KV head).
        peak_verifier_cache: largest verifier cache length.
        adaptive: what the adaptive γ controller did (:class:`bd_ray.speculative.adaptive.AdaptiveStats`
            as a dict), ``None`` with a fixed γ.
    """

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    metrics: SpecMetrics = field(default_factory=SpecMetrics)
    timings: Timings = field(default_factory=Timings)
    speculative: bool = False
    fallback_reason: str | None = None
    peak_drafter_cache: int = 0
    peak_verifier_cache: int = 0
    adaptive: dict | None = None

    @property
    def tokens_per_s(self) -> float:
        """Emitted tokens per second of decoding after prefill (the usual decode throughput)."""
        decode_s = self.timings.total_s - self.timings.verifier_prefill_s - self.timings.drafter_prefill_s
        return len(self.token_ids) / decode_s if decode_s > 0 else float("inf")

    def as_dict(self) -> dict:
        """JSON-ready result: the attributes above plus two derived values.

        Keys: ``token_ids`` (list of ids), ``text``, ``finish_reason``, ``prompt_tokens`` and
        ``completion_tokens`` (token counts), ``speculative``, ``fallback_reason``,
        ``tokens_per_s`` (emitted tokens per second of decoding: prefills excluded, ``inf`` when
        no decode time was measured), ``peak_drafter_cache`` / ``peak_verifier_cache`` (cache
        entries per layer and KV head), ``adaptive`` (dict or ``None``), ``spec_metrics``
        (:meth:`SpecMetrics.as_dict`) and ``timings`` (:meth:`Timings.as_dict`, seconds).
        """
        return {
            "token_ids": self.token_ids,
            "text": self.text,
            "finish_reason": self.finish_reason,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": len(self.token_ids),
            "speculative": self.speculative,
            "fallback_reason": self.fallback_reason,
            "tokens_per_s": self.tokens_per_s,
            "peak_drafter_cache": self.peak_drafter_cache,
            "peak_verifier_cache": self.peak_verifier_cache,
            "adaptive": self.adaptive,
            "spec_metrics": self.metrics.as_dict(),
            "timings": self.timings.as_dict(),
        }


@dataclass
class StreamChunk:
    """One streaming step: the ids and the text released by it; ``result`` is set on the last one."""

    token_ids: list[int]
    text: str
    result: GenerationResult | None = None


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _as_ids(prompt_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2:
            if prompt_ids.shape[0] != 1:
                raise ValueError(f"prompt_ids must be one sequence, got shape {tuple(prompt_ids.shape)}")
            prompt_ids = prompt_ids[0]
        return [int(t) for t in prompt_ids.tolist()]
    return [int(t) for t in prompt_ids]


class _Request:
    """Per-request state shared by the AR and speculative loops."""

    def __init__(self, tokenizer: Any, prompt: list[int], sampling: SamplingConfig,
                 default_eos: Sequence[int], device: torch.device) -> None:
        self.sampling = sampling
        self.prompt = prompt
        eos = sampling.eos_token_ids if sampling.eos_token_ids is not None else list(default_eos)
        self.checker = StopChecker(tokenizer, sampling.max_new_tokens, eos, sampling.stop)
        self.generator: torch.Generator | None = None
        if not is_greedy(sampling):
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling.seed if sampling.seed is not None
                                       else int(torch.randint(0, 2**62, ()).item()))
        self.timings = Timings()
        self.metrics = SpecMetrics()
        self.t0 = time.perf_counter()

    @property
    def committed(self) -> list[int]:
        """Prompt plus emitted tokens: what both models' caches converge to."""
        return self.prompt + self.checker.token_ids

    def pick(self, logits: torch.Tensor) -> int:
        """Next token from ``[vocab]`` verifier logits (argmax, or a sample of the filtered p)."""
        if is_greedy(self.sampling):
            return int(logits.argmax())
        return int(sample_from(filtered_probs(logits, self.sampling), self.generator))

    def chunk(self, before: int) -> StreamChunk:
        return StreamChunk(self.checker.token_ids[before:], self.checker.text_delta())


def _default_eos(tokenizer: Any, model: Any) -> list[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) if hasattr(model, "generation_config") else None
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in (ids if isinstance(ids, (list, tuple)) else [ids])]


def use_attention(model: Any, attn_implementation: str | None) -> None:
    """Switch ``model`` to ``attn_implementation`` (``None`` leaves it as loaded).

    The default for both generators is ``bd_ray_sparse`` (:mod:`bd_ray.attention`): Triton on
    CUDA; on CPU torch's fused flash kernel, with the query heads of a KV head stacked for
    γ+1-token blocks: T_v(5)/T_v(1) 1.46 at 4K against 2.25 for transformers' masked sdpa
    (benchmarks/step_costs.py, results/speed/). AR and speculative decoding always share the setting, so
    speedups compare like with like.
    """
    if attn_implementation is None or model.config._attn_implementation == attn_implementation:
        return
    if attn_implementation == "bd_ray_sparse":
        import bd_ray.attention  # noqa: F401  (registers the implementation)
    model.set_attn_implementation(attn_implementation)


DEFAULT_ATTENTION = "bd_ray_sparse"


class ARGenerator:
    """Plain autoregressive decoding with the verifier alone: the speedup denominator (AR).

    Args:
        verifier: a transformers causal LM (full KV cache).
        tokenizer: its tokenizer.
        prefill_chunk: prompt tokens per prefill forward (bounds activation memory).
        attn_implementation: attention for the verifier (see :func:`use_attention`).
    """

    def __init__(self, verifier: Any, tokenizer: Any, prefill_chunk: int = 512,
                 attn_implementation: str | None = DEFAULT_ATTENTION) -> None:
        use_attention(verifier, attn_implementation)
        self.verifier = verifier
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.device = _device(verifier)
        self.eos_token_ids = _default_eos(tokenizer, verifier)

    def prefill(self, prompt_ids: Sequence[int] | torch.Tensor) -> kvcache.PrefillResult:
        """Verifier prefill of a prompt, reusable by many :meth:`generate` calls (never mutated)."""
        ids = torch.tensor([_as_ids(prompt_ids)], device=self.device)
        with torch.inference_mode():
            return kvcache.prefill(self.verifier, ids, chunk_size=self.prefill_chunk)

    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingConfig,
                 prefilled: kvcache.PrefillResult | None = None) -> GenerationResult:
        """Decode ``prompt_ids`` (``[prompt_len]`` ids) to completion.

        Args:
            prefilled: a :meth:`prefill` of the same prompt to reuse (its time is then not counted).

        Raises:
            ContextLengthError: prompt + ``max_new_tokens`` beyond the verifier's positions.
        """
        *_, last = self.stream(prompt_ids, sampling, prefilled=prefilled)
        assert last.result is not None
        return last.result

    @torch.inference_mode()
    def stream(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingConfig,
               prefilled: kvcache.PrefillResult | None = None) -> Iterator[StreamChunk]:
        """Like :meth:`generate`, yielding a :class:`StreamChunk` per emitted token."""
        prompt = _as_ids(prompt_ids)
        _check_context(len(prompt), sampling.max_new_tokens, max_positions(self.verifier))
        req = _Request(self.tokenizer, prompt, sampling, self.eos_token_ids, self.device)
        yield from _ar_loop(self, req, prefilled)
        yield _final_chunk(req, speculative=False, fallback=None, vcache_len=len(req.committed) - 1, dcache_len=0)


def _verifier_prefill(gen: ARGenerator | "SpeculativeGenerator", req: _Request,
                      prefilled: kvcache.PrefillResult | None,
                      tail: int = 0) -> tuple[kvcache.KVCache, torch.Tensor, torch.Tensor | None]:
    """(a private shallow clone of the verifier prefill cache, its last logits ``[vocab]``, the
    argmax at the prompt's last ``tail`` positions ``[1, tail]`` or ``None``)."""
    if prefilled is None:
        t = _clock(gen.device)
        prefilled = kvcache.prefill(gen.verifier, torch.tensor([req.prompt], device=gen.device),
                                    chunk_size=gen.prefill_chunk, tail_argmax=tail)
        req.timings.verifier_prefill_s += _clock(gen.device) - t
    elif kvcache.cache_len(prefilled.cache) != len(req.prompt):
        raise ValueError(f"prefilled verifier cache holds {kvcache.cache_len(prefilled.cache)} tokens, "
                         f"prompt has {len(req.prompt)}")
    return kvcache.clone_cache(prefilled.cache), prefilled.last_logits[0], prefilled.tail_argmax


def _ar_loop(gen: ARGenerator | "SpeculativeGenerator", req: _Request,
             prefilled: kvcache.PrefillResult | None = None) -> Iterator[StreamChunk]:
    """Plain decoding loop over the verifier (the shared cache/forward path of AR and SD)."""
    dev = gen.device
    cache, logits, _ = _verifier_prefill(gen, req, prefilled)
    while True:
        before = req.checker.num_tokens
        done = req.checker.add(req.pick(logits))
        yield req.chunk(before)
        if done:
            return
        t = _clock(dev)
        committed = req.committed
        out = kvcache.forward_with_cache(gen.verifier, cache, torch.tensor([committed[-1:]], device=dev),
                                         start_position=len(committed) - 1)
        logits = out[0, -1]
        req.timings.verify_s += _clock(dev) - t


def _final_chunk(req: _Request, speculative: bool, fallback: str | None, vcache_len: int,
                 dcache_len: int, adaptive: dict | None = None) -> StreamChunk:
    req.timings.total_s = time.perf_counter() - req.t0
    result = GenerationResult(
        token_ids=req.checker.token_ids, text=req.checker.text, finish_reason=req.checker.finish_reason or "length",
        prompt_tokens=len(req.prompt), metrics=req.metrics, timings=req.timings, speculative=speculative,
        fallback_reason=fallback, peak_drafter_cache=dcache_len, peak_verifier_cache=vcache_len,
        adaptive=adaptive)
    return StreamChunk([], req.checker.text_delta(), result)


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
    """What :meth:`SpeculativeGenerator.stream`'s ``inspect`` hook sees after each cycle's rollback.

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


class SpeculativeGenerator:
    """Speculative decoding: a sparse-KV drafter proposes γ tokens, the full-KV verifier checks them.

    Args:
        verifier: transformers causal LM, full KV cache; its distribution is reproduced exactly.
        drafter: transformers causal LM with the verifier's vocabulary (checked at load by
            :func:`bd_ray.models.load_drafter`).
        tokenizer: the shared tokenizer.
        spec: γ, the KV budget B (``"full"`` = full drafter cache), the sparse policy, prefill chunk,
            and ``adaptive`` (γ becomes the cap of a per-cycle choice, :mod:`bd_ray.speculative.adaptive`).
        attn_implementation: attention for both models (see :func:`use_attention`).

    Raises:
        ValueError: drafter and verifier vocabulary sizes differ (names both sizes).

    Lossless: greedy output equals :class:`ARGenerator` token for token (fp32); sampled output
    follows the verifier's filtered distribution (speculative rejection sampling).
    """

    def __init__(self, verifier: Any, drafter: Any, tokenizer: Any, spec: SpecConfig | None = None,
                 attn_implementation: str | None = DEFAULT_ATTENTION) -> None:
        use_attention(verifier, attn_implementation)
        use_attention(drafter, attn_implementation)
        self.verifier = verifier
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.spec = spec or SpecConfig()
        self.prefill_chunk = self.spec.prefill_chunk
        self.device = _device(verifier)
        self.eos_token_ids = _default_eos(tokenizer, verifier)
        from bd_ray.models import model_vocab_size

        v_vocab, d_vocab = model_vocab_size(verifier), model_vocab_size(drafter)
        if v_vocab != d_vocab:
            raise ValueError(f"drafter vocabulary size {d_vocab} != verifier vocabulary size {v_vocab}")

    @torch.inference_mode()
    def prefill(self, prompt_ids: Sequence[int] | torch.Tensor, reuse_verifier: Prefilled | None = None) -> Prefilled:
        """Prefill both models once for a prompt; pass the result to many :meth:`generate` calls.

        ``reuse_verifier``: a :meth:`prefill` of the same prompt by a generator with the same
        verifier (another drafter); its verifier prefill and time are reused, only the drafter is
        prefilled. The drafter captures the queries ``spec.policy`` needs
        (:func:`bd_ray.sparse.queries_needed`); a policy needing fewer reads only the last ones.

        Raises:
            ValueError: ``reuse_verifier`` belongs to another prompt.
        """
        prompt = _as_ids(prompt_ids)
        ids = torch.tensor([prompt], device=self.device)
        if reuse_verifier is not None:
            if reuse_verifier.prompt != prompt:
                raise ValueError("reuse_verifier belongs to a different prompt")
            v, v_s = reuse_verifier.verifier, reuse_verifier.verifier_s
        else:
            t = _clock(self.device)
            # The tail argmax (a few head rows) gives adaptive requests their acceptance prior.
            v = kvcache.prefill(self.verifier, ids, chunk_size=self.prefill_chunk, tail_argmax=PROMPT_PROBE_TOKENS)
            v_s = _clock(self.device) - t
        t1 = _clock(self.device)
        d = kvcache.prefill(self.drafter, ids, chunk_size=self.prefill_chunk,
                            capture_queries_window=queries_needed(self.spec.policy),
                            tail_argmax=PROMPT_PROBE_TOKENS)
        return Prefilled(prompt, v, d, verifier_s=v_s, drafter_s=_clock(self.device) - t1)

    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingConfig,
                 gamma: int | None = None, budget: int | None | str = "default",
                 prefilled: Prefilled | None = None, adaptive: bool | None = None) -> GenerationResult:
        """Decode ``prompt_ids`` (``[prompt_len]`` ids) speculatively.

        Args:
            gamma, budget: per-request overrides of the spec config (``budget=None`` = full cache).
            prefilled: :meth:`prefill` of the same prompt to reuse (its time is then not counted).
            adaptive: override of ``spec.adaptive`` (γ then caps a per-cycle choice).

        Raises:
            ContextLengthError: prompt + ``max_new_tokens`` beyond the verifier's positions.
            ValueError: a budget below the policy's minimum (names the minimum), ``gamma < 1``.
        """
        *_, last = self.stream(prompt_ids, sampling, gamma=gamma, budget=budget, prefilled=prefilled,
                               adaptive=adaptive)
        assert last.result is not None
        return last.result

    @torch.inference_mode()
    def stream(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingConfig,
               gamma: int | None = None, budget: int | None | str = "default",
               prefilled: Prefilled | None = None,
               inspect: Callable[[CycleState], None] | None = None,
               adaptive: bool | None = None) -> Iterator[StreamChunk]:
        """Like :meth:`generate`, yielding a :class:`StreamChunk` per verification cycle.

        ``inspect`` (tests, debugging) is called after every cycle's rollback; ``adaptive``
        overrides ``spec.adaptive`` for this request. A drafter with fewer positions than
        prompt + ``max_new_tokens`` is not an error: the request is decoded plainly and the last
        chunk's result says why (``fallback_reason``).

        Raises (a generator: on the first ``next()``, before any chunk):
            ValueError: ``gamma < 1``; an empty prompt; ``prefilled`` from another prompt; a
                budget below the sparse policy's minimum for this prompt (names the minimum,
                :func:`bd_ray.sparse.min_budget`).
            ContextLengthError: prompt + ``max_new_tokens`` beyond the verifier's positions.
        """
        gamma = self.spec.gamma if gamma is None else int(gamma)
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        budget = budget_tokens(self.spec.budget) if budget == "default" else budget
        prompt = _as_ids(prompt_ids)
        _check_context(len(prompt), sampling.max_new_tokens, max_positions(self.verifier))
        if prefilled is not None and prefilled.prompt != prompt:
            raise ValueError("prefilled belongs to a different prompt")
        req = _Request(self.tokenizer, prompt, sampling, self.eos_token_ids, self.device)

        d_limit = max_positions(self.drafter)
        if d_limit is not None and len(prompt) + sampling.max_new_tokens > d_limit:
            reason = (f"drafter position limit {d_limit} < prompt ({len(prompt)}) + max_new_tokens "
                      f"({sampling.max_new_tokens}); decoded without speculation")
            log.warning(reason)
            yield from _ar_loop(self, req, prefilled.verifier if prefilled else None)
            yield _final_chunk(req, speculative=False, fallback=reason,
                               vcache_len=len(req.committed) - 1, dcache_len=0)
            return
        adaptive = self.spec.adaptive if adaptive is None else adaptive
        controller = GammaController(gamma, min_gain=self.spec.adaptive_min_gain) if adaptive else None
        yield from self._speculate(req, gamma, budget, prefilled, inspect, controller)

    # ------------------------------------------------------------------------------------------
    def _drafter_prefill(self, req: _Request, prefilled: Prefilled | None, tail: int = 0) -> kvcache.PrefillResult:
        if prefilled is not None:
            return prefilled.drafter
        t = _clock(self.device)
        pre = kvcache.prefill(self.drafter, torch.tensor([req.prompt], device=self.device),
                              chunk_size=self.prefill_chunk,
                              capture_queries_window=queries_needed(self.spec.policy), tail_argmax=tail)
        req.timings.drafter_prefill_s += _clock(self.device) - t
        return pre

    def _speculate(self, req: _Request, gamma: int, budget: int | None, prefilled: Prefilled | None,
                   inspect: Callable[[CycleState], None] | None,
                   controller: GammaController | None) -> Iterator[StreamChunk]:
        dev, n_prompt = self.device, len(req.prompt)
        greedy = is_greedy(req.sampling)

        tail = PROMPT_PROBE_TOKENS if controller is not None else 0
        vcache, first_logits, v_tail = _verifier_prefill(self, req, prefilled.verifier if prefilled else None, tail)
        v_len = n_prompt                       # true tokens held by the verifier cache
        dpre = self._drafter_prefill(req, prefilled, tail)
        agreement = prompt_agreement(v_tail, dpre.tail_argmax) if controller is not None else None
        if agreement is not None:
            controller.observe_prompt_agreement(*agreement)
        t = _clock(dev)
        dcache = kvcache.compact_cache(dpre.cache, budget, self.spec.policy, queries=dpre.queries)
        req.timings.drafter_prefill_s += _clock(dev) - t
        kept = kvcache.cache_len(dcache)       # compact prefix entries per layer and KV head
        d_len = n_prompt                       # true tokens held by the drafter cache
        peak_d, peak_v = kept, v_len

        def forward(model: Any, cache: kvcache.KVCache, tokens: list[int], start: int) -> torch.Tensor:
            return kvcache.forward_with_cache(model, cache, torch.tensor([tokens], device=dev),
                                              start_position=start)[0]

        # The first token comes from the verifier's prefill, exactly as in plain decoding.
        before = req.checker.num_tokens
        done = req.checker.add(req.pick(first_logits))
        yield req.chunk(before)

        while not done:
            committed = req.committed
            if controller is None:
                g = min(gamma, req.checker.remaining() - 1)
            else:
                g = controller.next_gamma(req.checker.remaining())
            if g < 1:
                # One token left, or the controller found that drafting cannot pay: a plain step.
                t = _clock(dev)
                logits = forward(self.verifier, vcache, committed[v_len:], v_len)[-1]
                v_len = len(committed)
                step_s = _clock(dev) - t
                req.timings.plain_s += step_s
                if controller is not None:
                    controller.observe_plain(step_s)
                before = req.checker.num_tokens
                done = req.checker.add(req.pick(logits))
                yield req.chunk(before)
                continue

            # ---- draft γ tokens on the sparse cache ------------------------------------------
            t = _clock(dev)
            drafts: list[int] = []
            q_rows: list[torch.Tensor] = []
            feed = committed[d_len:]           # 1 token, 2 after a full accept, more after plain steps
            catch_up_s = 0.0
            for _ in range(g):
                t_step = _clock(dev)
                logits = forward(self.drafter, dcache, feed, d_len)[-1]
                if len(feed) > 2:              # a catch-up over plain-decoded tokens, not a draft step
                    catch_up_s = _clock(dev) - t_step
                d_len += len(feed)
                if greedy:
                    tok = int(logits.argmax())
                else:
                    q = filtered_probs(logits, req.sampling)
                    tok = int(sample_from(q, req.generator))
                    q_rows.append(q)           # the exact q the draft was sampled from
                drafts.append(tok)
                feed = [tok]
            peak_d = max(peak_d, kept + d_len - n_prompt)
            draft_s = _clock(dev) - t
            req.timings.draft_s += draft_s

            # ---- verify the γ+1 positions in one verifier forward --------------------------------
            t = _clock(dev)
            block = committed[v_len:] + drafts
            logits = forward(self.verifier, vcache, block, v_len)[-(g + 1):]
            peak_v = max(peak_v, v_len + len(block))
            if greedy:
                verdict = verify_greedy(drafts, logits)
            else:
                verdict = verify_sampling(drafts, torch.stack(q_rows), filtered_probs(logits, req.sampling),
                                          req.generator)
            req.metrics.record_cycle(g, verdict.num_accepted)

            # ---- roll back rejected entries (the recovered/bonus token is fed next cycle) --------
            v_len = len(committed) + verdict.num_accepted
            kvcache.crop_cache(vcache, v_len)
            d_len = len(committed) + min(verdict.num_accepted, g - 1)
            kvcache.crop_cache(dcache, kept + d_len - n_prompt)
            verify_s = _clock(dev) - t
            req.timings.verify_s += verify_s
            if controller is not None:
                controller.observe_cycle(g, verdict.num_accepted, draft_s, verify_s, catch_up_s=catch_up_s)

            before = req.checker.num_tokens
            req.checker.extend(verdict.emitted(drafts))
            done = req.checker.finished
            if inspect is not None:
                inspect(CycleState(req.committed, vcache, dcache, v_len, d_len, kept))
            yield req.chunk(before)

        stats = controller.stats.as_dict() if controller is not None else None
        fallback = controller.stats.stopped_reason if controller is not None and not controller.speculating else None
        yield _final_chunk(req, speculative=True, fallback=fallback, vcache_len=peak_v, dcache_len=peak_d,
                           adaptive=stats)
