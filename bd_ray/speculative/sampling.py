"""Turning logits into the distributions that drafting and verification compare.

The same filter (temperature, then top-k, then top-p) is applied to the drafter's logits (giving
q) and to the verifier's logits (giving p). Speculative sampling is lossless with respect to the
*filtered* verifier distribution only if both sides are filtered identically; this module is the
one place that does it. Order and conventions follow vLLM's sampler (temperature scaling, then
top-k, then top-p keeping the smallest set whose mass reaches ``top_p``).
"""

from __future__ import annotations

import torch

from bd_ray.config import SamplingConfig

__all__ = ["is_greedy", "filtered_probs", "sample_from"]


def is_greedy(sampling: SamplingConfig) -> bool:
    """True when decoding is greedy (temperature 0), where acceptance is ``draft == argmax p``."""
    return sampling.temperature == 0.0


def filtered_probs(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Probabilities after temperature, top-k and top-p.

    Args:
        logits: ``[..., vocab]`` raw logits (any float dtype; computed in fp32).
        sampling: ``temperature > 0`` required (greedy decoding never needs probabilities).

    Returns:
        ``[..., vocab]`` fp32 probabilities; tokens removed by top-k/top-p have probability 0.

    Raises:
        ValueError: ``sampling.temperature == 0``.
    """
    if is_greedy(sampling):
        raise ValueError("filtered_probs needs temperature > 0; greedy decoding uses argmax")
    scaled = logits.float() / sampling.temperature
    vocab = scaled.shape[-1]
    if 0 < sampling.top_k < vocab:
        kth = torch.topk(scaled, sampling.top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Mass strictly before each token: a token is kept while the mass before it is < top_p,
        # so the most likely token is always kept and the kept set is the smallest reaching top_p.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        drop_sorted = mass_before >= sampling.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))
    return scaled.softmax(dim=-1)


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw one token per row.

    Args:
        probs: ``[rows, vocab]`` (or ``[vocab]``) non-negative weights; need not be normalised.
        generator: seeded generator for repeatable runs (on ``probs.device``), or ``None``.

    Returns:
        ``[rows]`` int64 token ids (``[]`` for a 1-D input).
    """
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return out.reshape(probs.shape[:-1])
