"""Forward passes over bd-ray caches: :func:`forward_with_cache` (new tokens at their true
positions over a full or compact cache), :func:`prefill` (chunked, with query capture and tail
argmax) and :func:`compact_cache` (a sparse view at a KV budget, :func:`bd_ray.sparse.select_positions`).
How they fit together: :mod:`bd_ray.kvcache`."""

from __future__ import annotations

from typing import Sequence

import torch

from bd_ray.config import SparsePolicyConfig
from bd_ray.kvcache.capture import capture_queries
from bd_ray.kvcache.layers import KVCache, PrefillResult, cache_len, clone_cache, next_position
from bd_ray.sparse import gather_kv, kept_valid_mask, select_positions

__all__ = ["forward_with_cache", "prefill", "compact_cache", "base_and_head", "apply_head"]


def base_and_head(model):
    """``(base model, LM head)`` of a causal LM; ``ValueError`` when it has no such split."""
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        base = getattr(model, "model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if base is None or head is None:
        raise ValueError(f"{type(model).__name__} is not a causal LM with a base model and an LM head")
    return base, head


def apply_head(model, head, hidden: torch.Tensor) -> torch.Tensor:
    """Logits ``[..., vocab]`` of final hidden states ``[..., hidden]`` (with the model's soft-capping)."""
    logits = head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma-2/3 style soft-capping, applied by their CausalLM forward
        logits = torch.tanh(logits / cap) * cap
    return logits


def _as_row_tensor(x, b: int, device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long, device=device).reshape(-1)
    if t.numel() == 1 and b != 1:
        t = t.expand(b)
    if t.numel() != b:
        raise ValueError(f"expected one value per batch row ({b}), got {t.numel()}")
    return t


def forward_with_cache(model, cache, input_ids: torch.Tensor, start_position, hidden_only: bool = False,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ``n`` new tokens per row through ``model`` on ``cache`` (grown in place), at true positions.

    The one function training views and inference use (spec-decoding case 8): the training view
    feeds the whole continuation at once, the drafter feeds one token or a block at a time.

    Args:
        model: an HF causal LM (Llama family; any model dispatching attention through transformers).
        cache: a :class:`KVCache` / ``DynamicCache``; its prefix may be compact.
        input_ids: ``[b, n]`` token ids.
        start_position: int or LongTensor ``[b]``: true position of ``input_ids[:, 0]``
            (usually :func:`next_position`); ``position_ids = start + arange(n)``.
        hidden_only: return final hidden states ``[b, n, hidden]`` (after the final norm) instead of
            logits, so training can apply the LM head chunk-wise.
        attention_mask: optional 2-D ``[b, cache_len + n]`` (1 = visible). Default: derived from
            ``cache.kept_valid`` when some prefix entries are padding, else none (pure causal).

    Returns:
        ``[b, n, vocab]`` logits, or ``[b, n, hidden]`` if ``hidden_only``.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, n], got shape {tuple(input_ids.shape)}")
    b, n = input_ids.shape
    dev = input_ids.device
    start = _as_row_tensor(start_position, b, dev)
    position_ids = start.view(b, 1) + torch.arange(n, device=dev).view(1, n)
    if attention_mask is None:
        valid = getattr(cache, "kept_valid", None)
        if valid is not None and not bool(valid.all()):
            past = cache_len(cache)
            attention_mask = torch.ones(b, past + n, dtype=torch.long, device=dev)
            attention_mask[:, : valid.shape[1]] = valid.to(dev).long()
    base, head = base_and_head(model)
    out = base(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
               cache=cache, use_cache=True)
    hidden = out.last_hidden_state
    if hidden_only:
        return hidden
    return apply_head(model, head, hidden)


@torch.no_grad()
def prefill(model, input_ids: torch.Tensor, cache: KVCache | None = None, chunk_size: int = 512,
            start_position: int = 0, capture_queries_window: int = 0,
            lengths: torch.Tensor | None = None, tail_argmax: int = 0) -> PrefillResult:
    """Chunked no-grad prefill with explicit positions; bounded memory (only last logits).

    Args:
        model: HF causal LM.
        input_ids: ``[b, seq]`` prompt ids, left-aligned; rows shorter than ``seq`` are padded at
            the right (any id) and described by ``lengths``.
        cache: an empty or existing :class:`KVCache` to append to (``None`` = new). Appending to a
            non-empty cache requires ``lengths is None``.
        chunk_size: tokens per forward (memory bound: activations of ``chunk_size`` tokens).
        start_position: true position of ``input_ids[:, 0]`` (appending to an existing cache).
        capture_queries_window: ``W > 0`` records the post-RoPE queries of each row's last ``W``
            valid positions per layer (for ``snapkv`` and ``chunk_topk`` with ``last_query``).
        lengths: ``[b]`` valid length per row; ``None`` = all ``seq``.
        tail_argmax: ``T > 0`` also returns the argmax token at each row's last ``T`` valid
            positions (the head runs on ``T`` hidden states per row, never on the whole prompt).

    Returns:
        :class:`PrefillResult` (cache with ``prefix_len = start_position + lengths``,
        ``kept_len`` = its length, ``kept_valid`` when rows are ragged; last-position logits
        ``[b, vocab]``; captured queries or ``None``; tail argmax ``[b, T]`` or ``None``).

    Raises:
        ValueError: bad shapes, ``chunk_size < 1``, ``lengths`` out of ``[1, seq]``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must be [batch, seq>=1], got shape {tuple(input_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"prefill chunk_size must be >= 1, got {chunk_size}")
    b, s = input_ids.shape
    dev = input_ids.device
    if cache is None:
        cache = KVCache()
    elif not isinstance(cache, KVCache):
        raise ValueError("prefill appends only to a bd_ray.kvcache.KVCache (use KVCache() or None)")
    elif cache.kept_positions is not None:
        raise ValueError("prefill cannot append to a compact cache; feed tokens with forward_with_cache")
    past = cache_len(cache)
    ragged = lengths is not None
    lengths = torch.full((b,), s, dtype=torch.long, device=dev) if lengths is None else _as_row_tensor(lengths, b, dev)
    if int(lengths.min()) < 1 or int(lengths.max()) > s:
        raise ValueError(f"lengths must lie in [1, seq={s}], got {lengths.tolist()}")
    ragged = ragged and bool((lengths != s).any())
    if ragged and past:
        raise ValueError("prefill with ragged lengths needs an empty cache")
    if past and getattr(cache, "kept_valid", None) is not None:
        raise ValueError("cannot append a prefill to a cache with padded prefix entries")
    base, head = base_and_head(model)

    W = int(capture_queries_window)
    buffers: dict[int, torch.Tensor] = {}
    # Window slot i of row r holds position lengths[r] - W + i (relative to input_ids).
    win_pos = (lengths - W).view(b, 1) + torch.arange(max(W, 0), device=dev).view(1, -1)  # [b, W]
    chunk_start = [0]

    def on_query(layer_idx: int, q: torch.Tensor) -> None:
        s0, n = chunk_start[0], q.shape[2]
        inside = (win_pos >= s0) & (win_pos < s0 + n)  # [b, W]
        if not bool(inside.any()):
            return
        buf = buffers.get(layer_idx)
        if buf is None:
            buf = buffers[layer_idx] = q.new_zeros(b, q.shape[1], W, q.shape[3])
        src = (win_pos - s0).clamp(0, n - 1)
        got = q.gather(2, src.view(b, 1, W, 1).expand(b, q.shape[1], W, q.shape[3]))
        buffers[layer_idx] = torch.where(inside.view(b, 1, W, 1), got.detach(), buf)

    last_hidden = None
    T = max(int(tail_argmax), 0)
    tail_pos = (lengths - T).view(b, 1) + torch.arange(T, device=dev).view(1, -1)       # [b, T]
    tail_hidden: torch.Tensor | None = None
    ctx = capture_queries(model, on_query) if W > 0 else None
    try:
        if ctx is not None:
            ctx.__enter__()
        for s0 in range(0, s, chunk_size):
            chunk_start[0] = s0
            ids = input_ids[:, s0:s0 + chunk_size]
            n = ids.shape[1]
            pos = (start_position + s0 + torch.arange(n, device=dev)).view(1, n).expand(b, n)
            h = base(input_ids=ids, position_ids=pos, cache=cache, use_cache=True).last_hidden_state
            # Keep only each row's last valid hidden state (never the [n, vocab] logits).
            last = lengths - 1 - s0
            inside = (last >= 0) & (last < n)
            if bool(inside.any()):
                got = h.gather(1, last.clamp(0, n - 1).view(b, 1, 1).expand(b, 1, h.shape[-1])).squeeze(1)
                last_hidden = got if last_hidden is None else torch.where(inside.view(b, 1), got, last_hidden)
            if T:
                t_in = (tail_pos >= s0) & (tail_pos < s0 + n)                          # [b, T]
                if bool(t_in.any()):
                    src = (tail_pos - s0).clamp(0, n - 1).view(b, T, 1).expand(b, T, h.shape[-1])
                    got = h.gather(1, src)
                    tail_hidden = got if tail_hidden is None else torch.where(t_in.view(b, T, 1), got, tail_hidden)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    logits = apply_head(model, head, last_hidden).float()
    tail = None
    if T:
        tail = apply_head(model, head, tail_hidden).argmax(-1)                            # [b, T]
        tail = torch.where(tail_pos >= 0, tail, torch.full_like(tail, -1))

    cache.kept_len = cache_len(cache)
    cache.prefix_len = (start_position + lengths) if not past else torch.full_like(lengths, start_position + s)
    cache.kept_valid = kept_valid_mask(lengths, s) if ragged else None
    queries = [buffers[i] for i in sorted(buffers)] if W > 0 else None
    if queries is not None and len(queries) != len(cache.layers):
        raise RuntimeError(f"captured queries for {len(queries)} layers, cache has {len(cache.layers)}")
    return PrefillResult(cache=cache, last_logits=logits, queries=queries, tail_argmax=tail)


@torch.no_grad()
def compact_cache(cache, budget: int | None, policy: SparsePolicyConfig,
                  queries: Sequence[torch.Tensor] | None = None,
                  lengths: torch.Tensor | None = None) -> KVCache:
    """A sparse view of a contiguous prefix cache: per layer and KV head, keep ``budget`` positions.

    The same function builds the training views (several per prefill) and the inference caches.
    The source is never modified (kept entries are gathered into new tensors; with nothing to drop
    and no padding the tensors are shared, which is safe, see :func:`clone_cache`).

    Args:
        cache: a contiguous cache (entry ``i`` = position ``i``), e.g. ``prefill(...).cache``.
        budget: KV budget ``B``; ``None`` or ``>= length`` keeps everything.
        policy: :class:`bd_ray.config.SparsePolicyConfig`.
        queries: per layer ``[b, q_heads, W, d]`` (``prefill(..., capture_queries_window=W)``);
            required by ``snapkv`` and ``chunk_topk``/``last_query``.
        lengths: ``[b]`` valid prefix lengths; default: the cache's ``prefix_len`` when it has
            padded rows, else all entries valid.

    Returns:
        a new :class:`KVCache` with ``kept_positions`` (per layer ``[b, kvh, K]``), ``kept_len = K``,
        ``prefix_len`` (true prefix lengths ``[b]``), ``kept_valid`` (``[b, K]`` when some row is
        shorter than ``K``), ``budget`` and ``policy``.

    Raises:
        ValueError: the source is already compact or has grown past a padded prefix; budget below
            the policy minimum (:func:`bd_ray.sparse.min_budget`); missing queries.
    """
    if getattr(cache, "kept_positions", None) is not None:
        raise ValueError("compact_cache needs a contiguous (prefill) cache, got an already compact one")
    n_layers = len(cache.layers)
    if n_layers == 0:
        raise ValueError("compact_cache got an empty cache")
    s = cache_len(cache)
    b = cache.layers[0].keys.shape[0]
    dev = cache.layers[0].keys.device
    if lengths is None and getattr(cache, "kept_valid", None) is not None:
        if s != cache.kept_len:
            raise ValueError("cannot compact a padded prefill cache that has grown past its prefix")
        lengths = cache.prefix_len
    if lengths is not None:
        lengths = _as_row_tensor(lengths, b, dev)
    if queries is not None and len(queries) != n_layers:
        raise ValueError(f"queries has {len(queries)} layers, cache has {n_layers}")
    ragged = lengths is not None and bool((lengths != s).any())
    keep_all = budget is None or budget >= s

    kv, kept = [], []
    for li, layer in enumerate(cache.layers):
        k, v = layer.keys, layer.values
        if keep_all and not ragged:
            pos = torch.arange(s, device=dev).view(1, 1, s).expand(b, k.shape[1], s)
            kv.append((k, v))  # shared, never written (update() concatenates)
        else:
            pos = select_positions(k, budget, policy, queries=None if queries is None else queries[li],
                                   lengths=lengths)
            kv.append(gather_kv(k, v, pos))
        kept.append(pos)
    out = KVCache.from_tensors(kv)
    K = kept[0].shape[-1]
    out.kept_positions = kept
    out.kept_len = K
    out.prefix_len = lengths.clone() if lengths is not None else torch.full((b,), s, dtype=torch.long, device=dev)
    out.kept_valid = kept_valid_mask(lengths, K) if ragged and bool((lengths < K).any()) else None
    out.budget = budget
    out.policy = policy
    return out
