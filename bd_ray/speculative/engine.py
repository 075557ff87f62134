"""Speculative and plain decoding of one request: batch-1 front ends of the batched engine.

:class:`SpeculativeGenerator` and :class:`ARGenerator` submit one request to their own
:class:`bd_ray.speculative.batch.BatchEngine` and step it until that request is done, so every
entry point decodes through one engine (prefill, draft, verify, rejection, rollback, stopping:
docs/DESIGN.md sections 1-2, :mod:`bd_ray.speculative.batch`). With one row the engine's forwards
are exactly the batch-1 ones (no mask, same chunks), so AR and speculative decoding compare like
with like. :meth:`SpeculativeGenerator.generate_many` runs several requests as one batch.

The result types (:class:`GenerationResult`, :class:`StreamChunk`, :class:`ContextLengthError`,
:func:`max_positions`) live in :mod:`bd_ray.speculative.results` and the prefill/inspection
records (:class:`Prefilled`, :class:`CycleState`) in :mod:`bd_ray.speculative.rows`; this module
is their public entry point.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterator, Sequence

import torch

from bd_ray import kvcache
from bd_ray.config import SamplingConfig, SpecConfig
from bd_ray.sparse import queries_needed
from bd_ray.speculative.adaptive import PROMPT_PROBE_TOKENS
from bd_ray.speculative.batch import BatchEngine, BatchOptions, new_row
from bd_ray.speculative.results import ContextLengthError, GenerationResult, StreamChunk, max_positions
from bd_ray.speculative.rows import CycleState, Prefilled, Row, RowRequest

__all__ = [
    "ContextLengthError",
    "GenerationResult",
    "StreamChunk",
    "Prefilled",
    "CycleState",
    "RowRequest",
    "ARGenerator",
    "SpeculativeGenerator",
    "max_positions",
    "use_attention",
    "DEFAULT_ATTENTION",
]


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _as_ids(prompt_ids: Sequence[int] | torch.Tensor) -> list[int]:
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() == 2:
            if prompt_ids.shape[0] != 1:
                raise ValueError(f"prompt_ids must be one sequence, got shape {tuple(prompt_ids.shape)}")
            prompt_ids = prompt_ids[0]
        return [int(t) for t in prompt_ids.tolist()]
    return [int(t) for t in prompt_ids]


def default_eos(tokenizer: Any, model: Any) -> list[int]:
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


def _drive(engine: BatchEngine, make_row: Callable[[], Row]) -> Iterator[StreamChunk]:
    """Submit one row and step the engine until it is done, yielding its chunks. Closing the
    generator early cancels the row (its slot and cache entries are freed at once)."""
    row = engine.submit(make_row())
    try:
        while True:
            while row.outbox:
                chunk = row.outbox.popleft()
                yield chunk
                if chunk.result is not None:
                    return
            engine.step()
    finally:
        if row.phase != "done":
            engine.cancel(row)


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
        self.eos_token_ids = default_eos(tokenizer, verifier)
        self.engine = BatchEngine(verifier, None, tokenizer, SpecConfig(prefill_chunk=prefill_chunk, budget=None),
                                  eos_token_ids=self.eos_token_ids)

    def prefill(self, prompt_ids: Sequence[int] | torch.Tensor) -> kvcache.PrefillResult:
        """Verifier prefill of a prompt, reusable by many :meth:`generate` calls (never mutated)."""
        ids = torch.tensor([_as_ids(prompt_ids)], device=self.device)
        with torch.inference_mode():
            return kvcache.prefill(self.verifier, ids, chunk_size=self.prefill_chunk)

    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingConfig,
                 prefilled: kvcache.PrefillResult | None = None, logprobs: int | None = None) -> GenerationResult:
        """Decode ``prompt_ids`` (``[prompt_len]`` ids) to completion.

        Args:
            prefilled: a :meth:`prefill` of the same prompt to reuse (its time is then not counted).
            logprobs: ``k`` returns each token's verifier logprob and top-``k`` alternatives.

        Raises:
            ContextLengthError: prompt + ``max_new_tokens`` beyond the verifier's positions.
        """
        *_, last = self.stream(prompt_ids, sampling, prefilled=prefilled, logprobs=logprobs)
        assert last.result is not None
        return last.result

    def stream(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingConfig,
               prefilled: kvcache.PrefillResult | None = None, logprobs: int | None = None) -> Iterator[StreamChunk]:
        """Like :meth:`generate`, yielding a :class:`StreamChunk` per emitted token."""
        req = RowRequest(_as_ids(prompt_ids), sampling, speculative=False, prefilled=prefilled, logprobs=logprobs)
        yield from _drive(self.engine, lambda: new_row(self.engine, req))


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
        options: batch limits of :meth:`generate_many` (:class:`bd_ray.speculative.batch.BatchOptions`).

    Raises:
        ValueError: drafter and verifier vocabulary sizes differ (names both sizes).

    Lossless: greedy output equals :class:`ARGenerator` token for token (fp32); sampled output
    follows the verifier's filtered distribution (speculative rejection sampling).
    """

    def __init__(self, verifier: Any, drafter: Any, tokenizer: Any, spec: SpecConfig | None = None,
                 attn_implementation: str | None = DEFAULT_ATTENTION, options: BatchOptions | None = None) -> None:
        use_attention(verifier, attn_implementation)
        use_attention(drafter, attn_implementation)
        self.verifier = verifier
        self.drafter = drafter
        self.tokenizer = tokenizer
        self.spec = spec or SpecConfig()
        self.prefill_chunk = self.spec.prefill_chunk
        self.device = _device(verifier)
        self.eos_token_ids = default_eos(tokenizer, verifier)
        from bd_ray.models import model_vocab_size

        v_vocab, d_vocab = model_vocab_size(verifier), model_vocab_size(drafter)
        if v_vocab != d_vocab:
            raise ValueError(f"drafter vocabulary size {d_vocab} != verifier vocabulary size {v_vocab}")
        self.engine = BatchEngine(verifier, drafter, tokenizer, self.spec, options, eos_token_ids=self.eos_token_ids)

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
            t = time.perf_counter()
            # The tail argmax (a few head rows) gives adaptive requests their acceptance prior.
            v = kvcache.prefill(self.verifier, ids, chunk_size=self.prefill_chunk, tail_argmax=PROMPT_PROBE_TOKENS)
            v_s = time.perf_counter() - t
        t1 = time.perf_counter()
        d = kvcache.prefill(self.drafter, ids, chunk_size=self.prefill_chunk,
                            capture_queries_window=queries_needed(self.spec.policy),
                            tail_argmax=PROMPT_PROBE_TOKENS)
        return Prefilled(prompt, v, d, verifier_s=v_s, drafter_s=time.perf_counter() - t1)

    def generate(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingConfig,
                 gamma: int | None = None, budget: int | None | str = "default",
                 prefilled: Prefilled | None = None, adaptive: bool | None = None,
                 logprobs: int | None = None) -> GenerationResult:
        """Decode ``prompt_ids`` (``[prompt_len]`` ids) speculatively.

        Args:
            gamma, budget: per-request overrides of the spec config (``budget=None`` = full cache).
            prefilled: :meth:`prefill` of the same prompt to reuse (its time is then not counted).
            adaptive: override of ``spec.adaptive`` (γ then caps a per-cycle choice).
            logprobs: ``k`` returns each token's verifier logprob and top-``k`` alternatives.

        Raises:
            ContextLengthError: prompt + ``max_new_tokens`` beyond the verifier's positions.
            ValueError: a budget below the policy's minimum (names the minimum), ``gamma < 1``.
        """
        *_, last = self.stream(prompt_ids, sampling, gamma=gamma, budget=budget, prefilled=prefilled,
                               adaptive=adaptive, logprobs=logprobs)
        assert last.result is not None
        return last.result

    def stream(self, prompt_ids: Sequence[int] | torch.Tensor, sampling: SamplingConfig,
               gamma: int | None = None, budget: int | None | str = "default",
               prefilled: Prefilled | None = None,
               inspect: Callable[[CycleState], None] | None = None,
               adaptive: bool | None = None, logprobs: int | None = None) -> Iterator[StreamChunk]:
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
        req = RowRequest(_as_ids(prompt_ids), sampling, gamma=gamma, budget=budget, adaptive=adaptive,
                         logprobs=logprobs, prefilled=prefilled, inspect=inspect)
        yield from _drive(self.engine, lambda: new_row(self.engine, req))

    def generate_many(self, requests: Sequence[RowRequest]) -> list[GenerationResult]:
        """Decode several requests as one continuous batch (admission by the engine's
        :class:`BatchOptions`); results in request order. Raises as :meth:`stream`, before any work."""
        rows = [self.engine.submit(new_row(self.engine, r)) for r in requests]
        results: dict[int, GenerationResult] = {}
        try:
            while len(results) < len(rows):
                self.engine.step()
                for i, row in enumerate(rows):
                    while row.outbox:
                        chunk = row.outbox.popleft()
                        if chunk.result is not None:
                            results[i] = chunk.result
        finally:
            for row in rows:
                if row.phase != "done":
                    self.engine.cancel(row)
        return [results[i] for i in range(len(rows))]
