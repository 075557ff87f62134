"""Held-out top-1 agreement of the drafter with the teacher (teacher-forced; a proxy for greedy α).

Source: docs/DESIGN.md section 2 (evaluation during training).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

from bd_ray.device import as_device, autocast
from bd_ray.kvcache import clone_cache, compact_cache, forward_with_cache, prefill
from bd_ray.losses import TeacherTargets, head_params
from bd_ray.sparse import queries_needed

__all__ = ["evaluate_agreement"]


@torch.no_grad()
def evaluate_agreement(drafter: torch.nn.Module, windows: list[np.ndarray], targets: list[TeacherTargets],
                       prefix_len: int, budgets: Iterable[int], policy, prefill_chunk: int = 512,
                       chunk: int = 64, draft_vocab=None, device: torch.device | str | None = None,
                       batch: int = 1, precision: str = "fp32") -> dict[str, float]:
    """Fraction of continuation positions where the drafter's argmax equals the teacher's argmax.

    Computed at the full prefix cache (key ``"full"``) and with the drafter's prefix cache compacted to
    each budget < ``prefix_len`` (key ``str(B)``), on held-out windows. Under greedy verification a
    draft is accepted iff it equals the verifier's argmax, so this is a fast proxy for greedy alpha
    (teacher-forced on the reference text rather than on the drafter's own drafts). With a
    ``draft_vocab`` the drafter's argmax is taken over that subset, as it decodes.

    Args:
        windows: held-out windows, ``int[P+T]`` each; ``targets``: their teacher targets (``argmax [T]``).
        prefix_len: ``P``. budgets: KV budgets (tokens) to compact the drafter's prefix cache to.
        policy: the sparse policy (``SparsePolicyConfig``) that compacts the cache.
        prefill_chunk: prefix tokens per no-grad forward. chunk: continuation rows per head chunk.
        device: the drafter's device; ids and targets are moved there (None = CPU).
        batch: windows of equal length per batched forward (one prefill and one continuation forward
            per budget for the whole batch instead of per window).
        precision: a resolved precision; bf16 / fp16 run the forwards under autocast.

    Returns:
        ``{"full": a, "<B>": a_B, ...}``: agreement fractions in [0, 1] (NaN without positions).
    """
    dev = as_device(device)
    was_training = drafter.training
    drafter.eval()
    weight, bias = head_params(drafter)
    ids_of = None
    if draft_vocab is not None:
        ids_of = torch.from_numpy(draft_vocab.ids).to(dev)
        weight, bias = weight[ids_of], None if bias is None else bias[ids_of]
    keys = ["full"] + [str(b) for b in sorted(set(budgets)) if b < prefix_len]
    hits = {k: 0 for k in keys}
    total = 0
    qwin = queries_needed(policy)
    i = 0
    while i < len(windows):
        # a batch: the next windows of the same length (held-out windows usually all have P + T tokens)
        n = 1
        while n < batch and i + n < len(windows) and len(windows[i + n]) == len(windows[i]):
            n += 1
        ids = torch.as_tensor(np.stack([np.asarray(w, dtype=np.int64).reshape(-1) for w in windows[i:i + n]]),
                              device=dev)
        want = torch.stack([t.argmax.view(-1) for t in targets[i:i + n]]).to(dev)       # [n, T]
        with autocast(dev, precision):
            pre = prefill(drafter, ids[:, :prefix_len], chunk_size=prefill_chunk, capture_queries_window=qwin)
            for k in keys:
                cache = (clone_cache(pre.cache) if k == "full"
                         else compact_cache(pre.cache, int(k), policy, queries=pre.queries))
                h = forward_with_cache(drafter, cache, ids[:, prefix_len:], prefix_len, hidden_only=True)
                for s in range(0, h.shape[1], chunk):
                    logits = torch.nn.functional.linear(h[:, s:s + chunk], weight, bias)
                    pred = logits.argmax(-1) if ids_of is None else ids_of[logits.argmax(-1)]
                    hits[k] += int((pred == want[:, s:s + chunk]).sum())
        total += sum(t.length for t in targets[i:i + n])
        i += n
    if was_training:
        drafter.train()
    return {k: (hits[k] / total if total else float("nan")) for k in keys}
