"""Sparse KV policies: which prefix positions the drafter keeps, per layer and KV head.

One function, :func:`select_positions`, chooses the kept positions for a budget ``B``; both the
training views (``bd_ray.kvcache.compact_cache`` on a no-grad prefix prefill) and the inference
caches use it, so training and inference see the same sparse attention (spec-decoding case 8).

Policies (``SparsePolicyConfig.name``):

- ``chunk_topk`` -- BudgetDraft / TriForce (docs/DESIGN.md section 2). The prefix is cut into chunks of
  ``chunk_size`` positions; each full chunk is scored ``proxy . mean(keys in chunk)`` per KV head,
  where ``proxy`` is the last prefix key of that layer/head (``query_proxy="last_key"``, the
  paper's choice) or the group-mean of the last real post-RoPE query (``"last_query"``).
  Always kept: chunk 0, the trailing partial chunk (the reference drops it), and the last
  ``recent`` positions. The rest of the budget goes to the best-scoring chunks, whole chunks in
  score order; when the remaining slots are not a multiple of ``chunk_size`` the next chunk in
  score order is kept partially (its earliest positions), so exactly ``B`` positions are kept.
  With ``recent=0``, ``seq % chunk_size == 0`` and ``B % chunk_size == 0`` this is exactly the
  paper's rule: chunk 0 plus the top ``B/chunk_size - 1`` other chunks.
- ``streaming`` -- StreamingLLM (Xiao et al. 2023): the first ``sink`` positions plus the most
  recent ``B - sink``.
- ``snapkv`` -- SnapKV (Li et al. 2024): the last ``window`` post-RoPE queries attend (softmax,
  causal inside the window, scale ``1/sqrt(head_dim)``) to the prefix; the attention is summed
  over the window queries, averaged over the query heads of each KV head's group (GQA: query head
  ``h`` belongs to KV head ``h // (q_heads / kv_heads)``, the ``repeat_kv`` convention of HF
  Llama), max-pooled along positions (``pool_kernel``, odd, same length; positions in the window
  are excluded from the pooling as in SnapKV's ``[..., :-window]`` slice). Always kept: the first
  ``sink`` positions and the window; the rest of the budget goes to the highest pooled scores.

Ties (equal scores, common after max-pooling) go to the earlier position / lower chunk index, so
the kept set is deterministic and reproducible by a brute-force reference.

Batch rows may have different valid lengths (``lengths``, left-aligned, padding at the right).
Kept positions never point at padding. ``K = min(budget, seq)`` is the same for all rows (the
tensors are rectangular); a row with fewer than ``K`` valid positions keeps all of them and pads
the tail by repeating its last valid position; :func:`kept_valid_mask` marks the real entries
(the padded ones must be masked out of attention -- ``bd_ray.kvcache`` does it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bd_ray_kernels.dispatch import chunk_scores

from bd_ray.config.decoding import SparsePolicyConfig

__all__ = [
    "min_budget",
    "min_budget_any_length",
    "select_positions",
    "gather_kv",
    "kept_valid_mask",
    "queries_needed",
]


# ------------------------------------------------------------------------------------------
# Minimum budgets
# ------------------------------------------------------------------------------------------


def _mandatory_count(policy: SparsePolicyConfig, length: int) -> int:
    """Number of positions the policy always keeps for a prefix of ``length`` valid positions."""
    if length <= 0:
        return 0
    if policy.name == "chunk_topk":
        c = policy.chunk_size
        n_full = length // c
        # Union of [0, c), [n_full*c, length) (trailing partial chunk), [length-recent, length).
        tail_start = min(n_full * c, length - policy.recent)
        tail_start = max(tail_start, min(c, length))
        return min(c, length) + (length - tail_start)
    if policy.name == "streaming":
        return min(policy.sink, length)
    if policy.name == "snapkv":
        return min(length, policy.sink + policy.window)
    raise ValueError(f"unknown sparse policy name {policy.name!r}; expected chunk_topk, streaming or snapkv")


def min_budget(policy: SparsePolicyConfig, seq: int) -> int:
    """Smallest KV budget ``policy`` accepts for a prefix of ``seq`` tokens (budgets >= ``seq`` keep all).

    ``chunk_topk``: chunk 0 + the trailing partial chunk + the last ``recent`` positions (their
    union; e.g. ``chunk_size + recent`` when ``recent >= chunk_size - 1``). ``streaming``: ``sink``.
    ``snapkv``: ``sink + window``. Never below 1. Capped at ``seq`` (a budget >= ``seq`` keeps
    everything and is always valid).
    """
    return max(1, min(seq, _mandatory_count(policy, seq)))


def min_budget_any_length(policy: SparsePolicyConfig) -> int:
    """Smallest KV budget ``policy`` accepts for every prefix longer than the budget: the largest
    :func:`min_budget` over prefix lengths (for ``chunk_topk`` it depends on the length's trailing
    partial chunk, so one full chunk of lengths is checked). A default budget below it would make
    long prompts fail at request time (Serve config validation, training budgets)."""
    span = policy.chunk_size if policy.name == "chunk_topk" else 1
    base = 1 << 20                       # longer than any mandatory set: min_budget is not capped
    return max(min_budget(policy, base + r) for r in range(span))


def queries_needed(policy: SparsePolicyConfig) -> int:
    """How many of the last prefix positions' post-RoPE queries ``policy`` needs captured during the
    drafter's prefill: ``window`` for ``snapkv`` (its observation window), 1 for ``chunk_topk`` with
    ``query_proxy="last_query"`` (the last real query is the proxy), 0 otherwise (the ``last_key``
    proxy and ``streaming`` read keys only). The one rule used by the engine, training views and
    evaluation (:func:`select_positions` reads ``queries[:, :, -1]`` / ``queries[:, :, -window:]``)."""
    if policy.name == "snapkv":
        return policy.window
    if policy.name == "chunk_topk" and policy.query_proxy == "last_query":
        return 1
    return 0


def _mandatory_description(policy: SparsePolicyConfig, seq: int) -> str:
    if policy.name == "chunk_topk":
        parts = [f"chunk_size {policy.chunk_size}"]
        if policy.recent:
            parts.append(f"recent {policy.recent}")
        if seq % policy.chunk_size and seq % policy.chunk_size > policy.recent:
            parts.append(f"trailing partial chunk {seq % policy.chunk_size}")
        return " + ".join(parts)
    if policy.name == "streaming":
        return f"sink {policy.sink}"
    return f"sink {policy.sink} + window {policy.window}"


def _check_budget(budget: int, policy: SparsePolicyConfig, length: int) -> None:
    need = min_budget(policy, length)
    if budget < need:
        raise ValueError(
            f"kv budget {budget} is below the minimum {need} for {policy.name} "
            f"({_mandatory_description(policy, length)}) at prefix length {length}; "
            f"raise budget or lower those policy fields"
        )


# ------------------------------------------------------------------------------------------
# Scores
# ------------------------------------------------------------------------------------------


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _group_mean(x: torch.Tensor, kvh: int) -> torch.Tensor:
    """``[b, qh, ...]`` -> ``[b, kvh, ...]``, mean over each KV head's query-head group."""
    b, qh = x.shape[:2]
    if qh % kvh:
        raise ValueError(f"query heads {qh} are not a multiple of kv heads {kvh}")
    return x.reshape(b, kvh, qh // kvh, *x.shape[2:]).mean(dim=2)


# ------------------------------------------------------------------------------------------
# Priorities per policy: +inf = mandatory, -inf = padding, finite = candidate (higher = better)
# ------------------------------------------------------------------------------------------


def _chunk_topk_priority(keys, policy, queries, lengths, pos):
    b, h, s, d = keys.shape
    c = policy.chunk_size
    L = lengths.view(b, 1, 1)
    if policy.query_proxy == "last_key":
        idx = (lengths - 1).clamp(min=0).view(b, 1, 1, 1).expand(b, h, 1, d)
        proxy = keys.gather(2, idx).squeeze(2)  # [b, kvh, d] last valid key of each row
    else:
        if queries is None:
            raise ValueError("query_proxy='last_query' needs queries [b, q_heads, W, d] of the last prefix positions")
        proxy = _group_mean(queries[:, :, -1].float(), h)  # [b, kvh, d]
    n = s // c
    # The kernels package scores chunks (Triton on CUDA, its torch reference elsewhere), in fp32
    # from fp32/fp16/bf16 inputs; other float keys (fp64 in tests) are handed over as fp32, which is
    # the precision the score is computed in anyway.
    if keys.dtype not in _KERNEL_DTYPES:
        keys, proxy = keys.float(), proxy.float()
    scores = chunk_scores(keys, proxy, c).float()  # [b, kvh, seq // c]
    chunk = torch.arange(n, device=keys.device)
    n_full = (lengths // c).view(b, 1, 1)
    candidate_chunk = (chunk > 0) & (chunk < n_full)  # chunk 0 is mandatory; partial/padding excluded
    scores = scores.masked_fill(~candidate_chunk, float("-inf"))
    # Rank chunks by score, descending; stable sort gives ties to the lower chunk index.
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=keys.device).expand_as(order))
    # Position priority: whole chunks in rank order, earliest offsets first inside a chunk.
    pos_chunk = (pos // c).clamp(max=max(n - 1, 0))
    if n > 0:
        pos_rank = rank.gather(-1, pos_chunk.view(1, 1, s).expand(b, h, s))
    else:
        pos_rank = torch.zeros(b, h, s, dtype=torch.long, device=keys.device)
    prio = -(pos_rank * c + pos % c).to(torch.float64)
    mandatory = (pos < c) | (pos >= n_full * c) | (pos >= L - policy.recent)
    return prio, mandatory


def _streaming_priority(keys, policy, queries, lengths, pos):
    b, h, s, _ = keys.shape
    prio = pos.to(torch.float64).view(1, 1, s).expand(b, h, s)  # most recent first
    mandatory = (pos < policy.sink).view(1, 1, s).expand(b, h, s)
    return prio, mandatory


def _snapkv_priority(keys, policy, queries, lengths, pos):
    b, h, s, d = keys.shape
    if queries is None:
        raise ValueError("snapkv needs queries [b, q_heads, W, d]: the post-RoPE queries of the last "
                         f"window={policy.window} prefix positions (prefill(..., capture_queries_window=W))")
    if queries.shape[0] != b or queries.shape[-1] != d:
        raise ValueError(f"queries shape {tuple(queries.shape)} does not match keys {tuple(keys.shape)}")
    W = min(policy.window, s)
    if queries.shape[2] < W:
        raise ValueError(f"snapkv window {policy.window} needs {W} queries per row, got {queries.shape[2]}")
    q = queries[:, :, -W:].float()  # [b, qh, W, d]; row r's query i sits at position L_r - W + i
    qh = q.shape[1]
    if qh % h:
        raise ValueError(f"query heads {qh} are not a multiple of kv heads {h}")
    g = qh // h
    L = lengths.view(b, 1, 1, 1)
    qpos = L - W + torch.arange(W, device=keys.device).view(1, 1, W, 1)  # [b,1,W,1]
    logits = torch.einsum("bhgwd,bhsd->bhgws", q.reshape(b, h, g, W, d), keys.float()) / math.sqrt(d)
    visible = (pos.view(1, 1, 1, s) <= qpos) & (qpos >= 0)  # causal inside the window, within the row
    logits = logits.masked_fill(~visible.unsqueeze(1), float("-inf"))
    attn = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # rows of fully masked queries -> 0
    score = attn.sum(dim=3).mean(dim=2)  # sum over window queries, mean over the group: [b, kvh, s]
    window_start = (lengths - W).view(b, 1, 1)
    outside = pos.view(1, 1, s) >= window_start  # window + padding: excluded from pooling (SnapKV)
    score = score.masked_fill(outside, float("-inf"))
    k = policy.pool_kernel
    if k > 1:
        score = F.max_pool1d(score.reshape(b * h, 1, s), kernel_size=k, stride=1, padding=k // 2).reshape(b, h, s)
    mandatory = (pos.view(1, 1, s) < policy.sink) | (pos.view(1, 1, s) >= window_start)
    return score.to(torch.float64), mandatory.expand(b, h, s)


_PRIORITY = {
    "chunk_topk": _chunk_topk_priority,
    "streaming": _streaming_priority,
    "snapkv": _snapkv_priority,
}


# ------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------


def select_positions(
    keys: torch.Tensor,
    budget: int | None,
    policy: SparsePolicyConfig,
    queries: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Kept prefix positions per (batch row, KV head) for one layer.

    Args:
        keys: ``[b, kvh, seq, d]`` post-RoPE prefix keys of one layer (any float dtype; scores are
            computed in fp32).
        budget: KV budget ``B`` in positions; ``None`` or ``>= seq`` keeps everything.
        policy: which rule (module docstring).
        queries: ``[b, q_heads, W, d]`` post-RoPE queries of the last ``W`` valid prefix positions
            of each row (row ``r``'s query ``i`` is at position ``lengths[r] - W + i``); needed by
            ``snapkv`` (``W >= min(window, seq)``) and ``chunk_topk`` with ``query_proxy="last_query"``.
            ``q_heads`` must be a multiple of ``kvh``.
        lengths: ``[b]`` valid prefix length per row (left-aligned, padding at the right);
            ``None`` = all rows have ``seq`` valid positions.

    Returns:
        LongTensor ``[b, kvh, K]``, ``K = min(budget, seq)``, ascending per row/head. Rows with
        fewer than ``K`` valid positions repeat their last valid position at the tail (see
        :func:`kept_valid_mask`).

    Raises:
        ValueError: ``budget`` below :func:`min_budget` for some row longer than the budget (the
            message names the minimum and the policy fields that make it up); missing or
            mis-shaped ``queries``; ``lengths`` out of ``[1, seq]``.
    """
    if keys.dim() != 4:
        raise ValueError(f"keys must be [b, kv_heads, seq, head_dim], got shape {tuple(keys.shape)}")
    b, h, s, _ = keys.shape
    dev = keys.device
    if lengths is None:
        lengths = torch.full((b,), s, dtype=torch.long, device=dev)
    else:
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=dev).reshape(-1)
        if lengths.numel() != b:
            raise ValueError(f"lengths has {lengths.numel()} entries for batch {b}")
        if int(lengths.min()) < 1 or int(lengths.max()) > s:
            raise ValueError(f"lengths must lie in [1, seq={s}], got {lengths.tolist()}")
    if budget is not None and budget < 1:
        raise ValueError(f"kv budget must be >= 1, got {budget}")
    K = s if budget is None else min(budget, s)
    pos = torch.arange(s, device=dev)
    lengths_cpu = lengths.tolist()
    if K == s or all(n <= K for n in lengths_cpu):
        # Nothing to drop: every row keeps all its valid positions (padded by repeating the last).
        kept = pos[:K].view(1, 1, K).expand(b, h, K)
        return torch.minimum(kept, (lengths - 1).view(b, 1, 1)).contiguous()
    for n in lengths_cpu:
        if n > K:
            _check_budget(K, policy, n)
    if policy.name not in _PRIORITY:
        raise ValueError(f"unknown sparse policy name {policy.name!r}; expected one of {sorted(_PRIORITY)}")
    prio, mandatory = _PRIORITY[policy.name](keys, policy, queries, lengths, pos)
    valid = pos.view(1, 1, s) < lengths.view(b, 1, 1)
    prio = torch.where(mandatory, torch.full_like(prio, float("inf")), prio)
    prio = prio.masked_fill(~valid, float("-inf"))
    # Stable descending sort: mandatory first, then candidates best-first (ties -> earlier index).
    top = torch.sort(prio, dim=-1, descending=True, stable=True).indices[..., :K]
    kept = torch.sort(top, dim=-1).values
    # Short rows picked padding at the tail (it sorts last): repeat the last valid position.
    return torch.minimum(kept, (lengths - 1).view(b, 1, 1)).contiguous()


def kept_valid_mask(lengths: torch.Tensor | None, K: int, batch: int | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """Which of the ``K`` kept slots are real (not the repeated padding of a short row).

    Args:
        lengths: ``[b]`` valid prefix lengths, or ``None`` (all slots real; give ``batch``).
        K: kept count returned by :func:`select_positions`.

    Returns:
        BoolTensor ``[b, K]``: slot ``j`` of row ``r`` is real iff ``j < min(lengths[r], K)``.
        The mask is the same for every KV head and layer.
    """
    if lengths is None:
        if batch is None:
            raise ValueError("kept_valid_mask needs lengths or batch")
        return torch.ones(batch, K, dtype=torch.bool, device=device)
    lengths = torch.as_tensor(lengths, dtype=torch.long, device=device)
    return torch.arange(K, device=lengths.device).view(1, K) < lengths.view(-1, 1)


def gather_kv(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather kept positions: ``[b, kvh, seq, d]`` x ``[b, kvh, K]`` -> ``[b, kvh, K, d]`` (new tensors).

    Keys keep the RoPE rotation of their original position (HF caches store post-RoPE keys), so
    the compact cache is exact as long as new tokens are fed with their true ``position_ids``.
    ``values`` may have a different head dim from ``keys``.
    """
    if positions.dim() != 3 or positions.shape[:2] != keys.shape[:2]:
        raise ValueError(f"positions must be [b, kv_heads, K] matching keys {tuple(keys.shape)}, "
                         f"got {tuple(positions.shape)}")
    pk = positions.unsqueeze(-1)
    k = keys.gather(2, pk.expand(*positions.shape, keys.shape[-1]))
    v = values.gather(2, pk.expand(*positions.shape, values.shape[-1]))
    return k, v
