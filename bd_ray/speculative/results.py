"""What a decoded request returns: results, stream chunks, per-token logprobs, context checks.

Shared by the batched engine (:mod:`bd_ray.speculative.batch`) and its batch-1 front ends
(:mod:`bd_ray.speculative.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from bd_ray.speculative.metrics import SpecMetrics, Timings

__all__ = ["ContextLengthError", "max_positions", "check_context", "GenerationResult", "StreamChunk",
           "LogprobEntry", "logprob_entries"]


class ContextLengthError(ValueError):
    """Prompt length + ``max_new_tokens`` exceeds a model's position limit (names the limit)."""


def max_positions(model: Any) -> int | None:
    """The model's position limit in tokens (``config.max_position_embeddings``), or ``None``."""
    return getattr(model.config, "max_position_embeddings", None)


def check_context(prompt_len: int, max_new_tokens: int, limit: int | None) -> None:
    """Refuse an empty prompt (``ValueError``) or prompt + ``max_new_tokens`` beyond ``limit``
    positions (:class:`ContextLengthError`, naming the limit), before any work."""
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
        mode: how the tokens after the first were decoded: ``"speculative"`` (every decode step
            verified drafts), ``"plain"`` (none did) or ``"mixed"``.
        mode_reason: why some or all steps were plain (``None`` when all were speculative).
        logprobs: when asked for, one entry per emitted token (:data:`LogprobEntry`), none for
            tokens trimmed by a stop string; else ``None``.
        budget: the drafter KV budget the request ran at (``None`` = full cache or no drafter).
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
    mode: str = "plain"
    mode_reason: str | None = None
    logprobs: list[dict] | None = None
    budget: int | None = None

    @property
    def tokens_per_s(self) -> float:
        """Emitted tokens per second of decoding after prefill (the usual decode throughput; the
        engine's one-off setup, ``timings.setup_s``, excluded too)."""
        t = self.timings
        decode_s = t.total_s - t.verifier_prefill_s - t.drafter_prefill_s - t.setup_s
        return len(self.token_ids) / decode_s if decode_s > 0 else float("inf")

    def as_dict(self) -> dict:
        """JSON-ready result: the attributes above plus two derived values.

        Keys: ``token_ids`` (list of ids), ``text``, ``finish_reason``, ``prompt_tokens`` and
        ``completion_tokens`` (token counts), ``speculative``, ``fallback_reason``,
        ``tokens_per_s`` (emitted tokens per second of decoding: prefills and setup excluded, ``inf`` when
        no decode time was measured), ``mode`` / ``mode_reason`` / ``budget`` / ``logprobs`` (as
        the attributes), ``peak_drafter_cache`` / ``peak_verifier_cache`` (cache
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
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "budget": self.budget,
            "logprobs": self.logprobs,
            "spec_metrics": self.metrics.as_dict(),
            "timings": self.timings.as_dict(),
        }


@dataclass
class StreamChunk:
    """One streaming step: the ids and the text released by it (and their logprob entries when the
    request asked for them); ``result`` is set on the last one."""

    token_ids: list[int]
    text: str
    result: GenerationResult | None = None
    logprobs: list[dict] | None = None


#: A logprob entry: ``{"token": id, "logprob": float, "top": [[id, logprob], ...]}``, the
#: verifier's log-softmax of its *raw* logits (before temperature/top-k/top-p, as vLLM's default)
#: at the position that emitted ``token``; ``top`` has the request's k most likely ids.
LogprobEntry = dict


def logprob_entries(logits: Any, tokens: list[int], k: int) -> list[dict]:
    """Entries for ``tokens[i]`` emitted from ``logits[i]`` (``[n, vocab]`` raw verifier logits)."""
    import torch

    lp = torch.log_softmax(logits[: len(tokens)].float(), dim=-1)
    chosen = lp.gather(1, torch.tensor(tokens, device=lp.device).view(-1, 1)).view(-1).tolist()
    out = []
    if k > 0:
        vals, ids = lp.topk(k, dim=-1)
        tops = [[[i, v] for i, v in zip(r_i, r_v)] for r_i, r_v in zip(ids.tolist(), vals.tolist())]
    else:
        tops = [[] for _ in tokens]
    for t, c, top in zip(tokens, chosen, tops):
        out.append({"token": int(t), "logprob": c, "top": top})
    return out


