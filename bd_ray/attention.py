"""The ``bd_ray_sparse`` attention implementation for transformers 5.x models.

Importing this module registers, under the name :data:`ATTN_IMPLEMENTATION` (``"bd_ray_sparse"``):

* an attention function (``transformers.AttentionInterface``) that computes attention through
  :func:`bd_ray_kernels.sparse_attention` -- the Triton kernel on CUDA -- and on CPU through
  torch's fused flash kernel (``_cpu_fused_attention``; with ragged ``bd_ray_kv_lens``, the same
  kernel with a per-row mask, ``_cpu_ragged_attention``);
* a matching mask function (``transformers.AttentionMaskInterface``) that builds no mask: causality
  is handled by the kernel with the compact-cache convention "the last ``q_len`` entries of the
  key/value tensors are the new tokens, query ``i`` sees kv entries ``[0, kv_len - q_len + i]``".

That convention is exactly the HF causal mask in *cache index space*, so it is right both for a
dense ``DynamicCache`` and for a compact cache holding only kept prefix positions (keys keep their
original RoPE rotation; the new tokens get their true ``position_ids``), which is how the sparse
drafter of BudgetDraft runs (docs/DESIGN.md section 2). The model code stays oblivious.

Use::

    import bd_ray.attention  # registers "bd_ray_sparse"
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="bd_ray_sparse")

Not supported (clear ``NotImplementedError``): padding masks (an ``attention_mask`` with zeros),
custom 4D masks, non-causal / packed-sequence / sliding-window / chunked masks, static caches whose
key/value tensors are longer than the filled part, attention dropout, logit soft-capping. Ragged
batches can pass per-row valid lengths as the forward kwarg ``bd_ray_kv_lens`` (``[batch]`` int
tensor, same convention as :func:`bd_ray_kernels.sparse_attention`).
"""

from __future__ import annotations

from typing import Optional

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.masking_utils import causal_mask_function

from bd_ray_kernels import backend_name, sparse_attention, use_triton

__all__ = ["ATTN_IMPLEMENTATION", "register", "bd_ray_sparse_attention_forward", "bd_ray_sparse_mask"]

ATTN_IMPLEMENTATION = "bd_ray_sparse"


def bd_ray_sparse_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=causal_mask_function,
    attention_mask: Optional[torch.Tensor] = None,
    **kwargs,
) -> None:
    """Mask interface for ``bd_ray_sparse``: checks that a plain causal mask is wanted, returns None.

    Args follow ``transformers.masking_utils.sdpa_mask`` (5.x): ``attention_mask`` is the optional
    2D ``[batch, seen + q_length]`` padding mask (bool after HF pre-processing).

    Raises:
        NotImplementedError: the requested mask is not the plain causal one the kernel implements
            (padding zeros, packed sequences, or/and mask overlays, sliding windows, a static cache
            whose kv tensors hold unused slots).
    """
    if mask_function is not causal_mask_function:
        raise NotImplementedError(
            f"attn_implementation='{ATTN_IMPLEMENTATION}' implements only the plain causal mask (new tokens "
            f"are the last q_len kv entries); got mask function {getattr(mask_function, '__name__', mask_function)!r} "
            "(packed sequences, sliding/chunked windows or mask overlays are not supported)"
        )
    if attention_mask is not None and not bool(attention_mask.all()):
        raise NotImplementedError(
            f"attn_implementation='{ATTN_IMPLEMENTATION}' does not support padding: the attention_mask has zeros. "
            "Run rows of different lengths unpadded, or pass bd_ray_kv_lens for right-padded compact caches."
        )
    if isinstance(q_offset, torch.Tensor) or kv_offset != 0 or kv_length != q_offset + q_length:
        raise NotImplementedError(
            f"attn_implementation='{ATTN_IMPLEMENTATION}' needs a cache whose key/value tensors end with the new "
            f"tokens (DynamicCache); got kv_length={kv_length}, q_offset={q_offset}, kv_offset={kv_offset}, "
            f"q_length={q_length} (static/sliding caches are not supported)"
        )
    return None


def bd_ray_sparse_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function for ``bd_ray_sparse`` (signature of transformers' ``sdpa_attention_forward``).

    Args:
        module: the calling attention module (read for ``is_causal``).
        query: ``[batch, q_heads, q_len, head_dim]`` post-RoPE queries.
        key, value: ``[batch, kv_heads, kv_len, head_dim]`` after the cache update; the last
            ``q_len`` entries are the new tokens (GQA: ``q_heads % kv_heads == 0``).
        attention_mask: must be None (the mask interface returns None); a tensor is rejected.
        dropout: must be 0. scaling: softmax scale (default ``1/sqrt(head_dim)``).
        kwargs: ``bd_ray_kv_lens`` (optional ``[batch]`` int tensor of valid kv lengths); the rest is
            ignored, as in transformers' own implementations.

    Returns:
        ``(attn_output [batch, q_len, q_heads, head_dim], None)`` in the query dtype.

    Raises:
        NotImplementedError for masks, dropout, soft-capping, sliding windows or non-causal modules.
    """
    if attention_mask is not None:
        raise NotImplementedError(
            f"attn_implementation='{ATTN_IMPLEMENTATION}' got an explicit attention mask of shape "
            f"{tuple(attention_mask.shape)}; only the implicit causal compact-cache mask is supported"
        )
    if dropout:
        raise NotImplementedError(f"attn_implementation='{ATTN_IMPLEMENTATION}' does not support attention dropout")
    if softcap is not None:
        raise NotImplementedError(f"attn_implementation='{ATTN_IMPLEMENTATION}' does not support softcap")
    if sliding_window is not None:
        raise NotImplementedError(f"attn_implementation='{ATTN_IMPLEMENTATION}' does not support sliding windows")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if not causal:
        raise NotImplementedError(f"attn_implementation='{ATTN_IMPLEMENTATION}' supports causal attention only")
    b, qh, q_len, d = query.shape
    if value.dtype != query.dtype or key.dtype != query.dtype:
        key, value = key.to(query.dtype), value.to(query.dtype)
    kv_lens = kwargs.get("bd_ray_kv_lens")
    if query.device.type != "cuda":
        if kv_lens is None:
            return _cpu_fused_attention(query, key, value, scaling), None
        if not use_triton(query.device):   # (the Triton interpreter when tests force it)
            return _cpu_ragged_attention(query, key, value, scaling, kv_lens), None
    out = torch.empty(b, q_len, qh, d, dtype=query.dtype, device=query.device)
    sparse_attention(query, key, value, scale=scaling, kv_lens=kv_lens, out=out.transpose(1, 2))
    return out, None


_GROUPED_ROWS = 64   # up to this many query rows per KV head, queries are regrouped (see below)
_mask_cache: dict[tuple, torch.Tensor] = {}


def _tail_causal_mask(q_len: int, kv_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[q_len, kv_len]`` additive mask: query i sees kv entries ``[0, kv_len - q_len + i]``.

    Cached for the last shape only: every layer of one forward asks for the same mask.
    """
    key = (q_len, kv_len, dtype, device)
    mask = _mask_cache.get(key)
    if mask is None:
        mask = torch.zeros(q_len, kv_len, dtype=dtype, device=device)
        mask[:, kv_len - q_len:] = torch.full((q_len, q_len), float("-inf"), dtype=dtype, device=device).triu(1)
        _mask_cache.clear()
        _mask_cache[key] = mask
    return mask


def _cpu_fused_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scale: Optional[float]) -> torch.Tensor:
    """Causal attention on CPU through torch's fused flash kernel; returns ``[b, q_len, q_heads, d]``.

    * one decode token sees every cached entry: no mask at all, and the ``g`` query heads that
      share a KV head are stacked as ``g`` query rows of that head, so each key/value block is
      read once for all of them (the kernel's own GQA reads it once per query head: measured
      1.9x slower at 16 rows x 2K entries, 1.5x at one row);
    * a verify block of γ+1 tokens: the ``g`` query heads that share a KV head are stacked into
      one ``[g * q_len, d]`` query matrix per KV head, so each key/value block is read once for all
      of them (memory-bound on CPU), with the tail-causal mask repeated per head; measured 3x
      cheaper than grouped matmul + masked softmax for 5 tokens at 4K (benchmarks/step_costs.py);
    * longer chunks (prefill): the kernel's own GQA with the ``[q_len, kv_len]`` mask, or plain
      ``is_causal`` when the chunk is the whole sequence.
    """
    F = torch.nn.functional
    b, qh, q_len, d = query.shape
    kvh, kv_len = key.shape[1], key.shape[2]
    g = qh // kvh
    if q_len == 1:
        out = F.scaled_dot_product_attention(query.reshape(b, kvh, g, d), key, value, scale=scale)
        return out.view(b, qh, 1, d).transpose(1, 2)
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(query, key, value, scale=scale, is_causal=True, enable_gqa=True)
        return out.transpose(1, 2)
    mask = _tail_causal_mask(q_len, kv_len, query.dtype, query.device)
    if g * q_len <= _GROUPED_ROWS:
        q = query.reshape(b, kvh, g * q_len, d)   # rows ordered (head in group, token)
        out = F.scaled_dot_product_attention(q, key, value, attn_mask=mask.repeat(g, 1), scale=scale)
        return out.view(b, qh, q_len, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


_ragged_mask_cache: dict[tuple, torch.Tensor] = {}


def _ragged_mask(kv_lens: torch.Tensor, q_len: int, kv_len: int, repeat: int) -> torch.Tensor:
    """``[b, 1, repeat * q_len, kv_len]`` bool mask: query ``i`` of row ``b`` sees entries
    ``[0, kv_lens[b] - q_len + i]`` (rows stacked ``repeat`` times for grouped query heads).
    Cached for the last lengths only: every layer of one forward asks for the same mask."""
    key = (tuple(kv_lens.tolist()), q_len, kv_len, repeat, kv_lens.device)
    mask = _ragged_mask_cache.get(key)
    if mask is None:
        last = (kv_lens.view(-1, 1, 1, 1) - q_len) + torch.arange(q_len, device=kv_lens.device).view(1, 1, q_len, 1)
        mask = torch.arange(kv_len, device=kv_lens.device).view(1, 1, 1, kv_len) <= last
        if repeat > 1:
            mask = mask.repeat(1, 1, repeat, 1)
        _ragged_mask_cache.clear()
        _ragged_mask_cache[key] = mask
    return mask


def _cpu_ragged_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: Optional[float],
                          kv_lens: torch.Tensor) -> torch.Tensor:
    """Attention of a ragged batch (``kv_lens`` ``[b]`` valid entries per row, the last ``q_len`` of
    them the new tokens) through torch's fused kernel with a per-row boolean mask; returns
    ``[b, q_len, q_heads, d]``. Query heads sharing a KV head are stacked as in
    :func:`_cpu_fused_attention`, so each row's K/V are read once per KV head. Entries past a row's
    length are masked (they must be finite: storage is zero-initialised, see
    :mod:`bd_ray.speculative.ragged_cache`)."""
    F = torch.nn.functional
    b, qh, q_len, d = query.shape
    kvh, kv_len = key.shape[1], key.shape[2]
    g = qh // kvh
    if g * q_len <= _GROUPED_ROWS:
        mask = _ragged_mask(kv_lens, q_len, kv_len, g)
        out = F.scaled_dot_product_attention(query.reshape(b, kvh, g * q_len, d), key, value, attn_mask=mask,
                                             scale=scale)
        return out.view(b, qh, q_len, d).transpose(1, 2)
    mask = _ragged_mask(kv_lens, q_len, kv_len, 1)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(1, 2)


def register() -> str:
    """Register ``bd_ray_sparse`` with transformers (idempotent); returns the name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, bd_ray_sparse_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, bd_ray_sparse_mask)
    return ATTN_IMPLEMENTATION


def attention_backend(device: torch.device | str) -> str:
    """Kernel backend ``bd_ray_sparse`` uses on ``device`` (``triton``, ``triton-interpret``, ``torch``)."""
    return backend_name(device)


register()
