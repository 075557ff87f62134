"""The speculation policies' cost prior, measured on the engine's own device.

Until a request has measured its own costs, :class:`bd_ray.speculative.adaptive.GammaController`
and :class:`bd_ray.speculative.batch_policy.BatchSpecPolicy` assume a drafter step of
``draft_ratio`` and each extra verified token of ``slope_ratio`` plain verifier steps. These ratios
differ by an order of magnitude between devices (a GPU verifies γ + 1 tokens for about the price
of one, a CPU does not), so the batched engine measures them once, on first use, through its own
forward path (:func:`bd_ray.speculative.ragged_cache.ragged_forward`, same attention and device):
one verifier forward of 1 and of γ + 1 tokens and one drafter forward of 1 token after a short
dummy prefix, each timed at its best of a few repeats (the first also warms kernels up).
:data:`bd_ray.speculative.adaptive.CONSTANT_PRIOR` is used only when measuring is switched off
(``SpecConfig.adaptive_cost_prior: constant``) or there is no drafter.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from bd_ray import kvcache
from bd_ray.speculative.adaptive import CostPrior
from bd_ray.speculative.ragged_cache import RaggedKVCache, ragged_forward

__all__ = ["measure_cost_prior"]


def _best_time(model: Any, cache: RaggedKVCache, tokens: list[int], start: int, repeats: int) -> float:
    """Best seconds of ``repeats`` forwards feeding ``tokens`` after ``start`` cached entries."""
    cuda = cache.k[0] is not None and cache.k[0].is_cuda
    best = float("inf")
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        ragged_forward(model, cache, {0: tokens}, {0: start}, {0: len(tokens)})
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        cache.set_len(0, start)                  # rollback: the next repeat sees the same prefix
    return best


@torch.inference_mode()
def measure_cost_prior(verifier: Any, drafter: Any, gamma: int, context: int = 64, repeats: int = 3) -> CostPrior:
    """Measure :class:`CostPrior` on the models' device (module docstring).

    Args:
        verifier, drafter: the engine's models (any attention implementation the engine uses).
        gamma: tokens drafted per cycle; the verifier forward is timed at γ + 1 tokens.
        context: dummy prefix tokens cached before the timed forwards.
        repeats: forwards per measurement (the best one counts).

    Returns:
        a :class:`bd_ray.speculative.adaptive.CostPrior` (``source="measured"``), ratios clamped to [0.01, 10] (timer noise on tiny models must not give 0 or negative costs).
    """
    dev = next(verifier.parameters()).device
    vocab = min(verifier.config.vocab_size, drafter.config.vocab_size)
    ids = [(7 * i + 3) % vocab for i in range(context + gamma + 1)]

    def primed(model: Any) -> RaggedKVCache:
        pre = kvcache.prefill(model, torch.tensor([ids[:context]], device=dev))
        cache = RaggedKVCache(model.config.num_hidden_layers)
        cache.install(0, [(layer.keys, layer.values) for layer in pre.cache.layers])
        return cache

    vcache, dcache = primed(verifier), primed(drafter)
    block = ids[context: context + gamma + 1]
    v1 = _best_time(verifier, vcache, block[:1], context, repeats)
    vg = _best_time(verifier, vcache, block, context, repeats)
    td = _best_time(drafter, dcache, block[:1], context, repeats)

    def ratio(x: float) -> float:
        return min(10.0, max(0.01, x / v1))

    return CostPrior(draft_ratio=ratio(td), slope_ratio=ratio(max(0.0, vg - v1) / gamma), source="measured")
