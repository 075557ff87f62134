"""Torch reference implementations of the bd-ray kernels (the ground truth for the Triton code).

Two operations, both used by the drafter (see docs/DESIGN.md sections 2-3):

* :func:`sparse_attention_reference` -- decode / verify attention of ``n_new`` new query tokens
  against a *compact* KV cache (the kept prefix positions, then the new tokens themselves),
  causal among the new tokens, GQA, optional ragged batch lengths.
* :func:`chunk_scores_reference` -- the BudgetDraft / TriForce ``chunk_topk`` score of chunk ``c``:
  ``query . mean(keys[c])``. Which chunks are kept is decided once, in
  :func:`bd_ray.sparse.select_positions` (training views and inference caches alike).

Everything here is plain PyTorch (no gathers over the cache, no Triton), computes in fp32 and runs
on any device. Shape checks live here too (``check_*``) so that the Triton path raises the same
errors as the reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = [
    "check_sparse_attention_args",
    "check_chunk_args",
    "sparse_attention_reference",
    "sparse_attention_bruteforce",
    "chunk_scores_reference",
]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# argument checks (shared with the Triton path)
# ---------------------------------------------------------------------------------------------
def check_sparse_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_lens: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> tuple[int, int, int, int, int, int]:
    """Validate the arguments of ``sparse_attention``; return ``(b, qh, n_new, d, kvh, kv_len)``.

    Raises ``ValueError`` / ``TypeError`` naming the offending tensor and the expected shape.
    Value checks that would need a device sync (``kv_lens >= n_new``) are not done here.
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [batch, q_heads, n_new, head_dim], got shape {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k must be [batch, kv_heads, kv_len, head_dim], got shape {tuple(k.shape)}")
    b, qh, n_new, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ValueError(
            f"k must be [batch={b}, kv_heads, kv_len, head_dim={d}] to match q {tuple(q.shape)}, "
            f"got {tuple(k.shape)}"
        )
    kvh, kv_len = k.shape[1], k.shape[2]
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)} [batch, kv_heads, kv_len, head_dim], got {tuple(v.shape)}")
    if kvh == 0 or qh % kvh != 0:
        raise ValueError(f"q_heads ({qh}) must be a multiple of kv_heads ({kvh}) (GQA)")
    if n_new < 1:
        raise ValueError(f"q must hold at least one new token (n_new = q.shape[2] = {n_new})")
    if kv_len < n_new:
        raise ValueError(
            f"k/v hold {kv_len} positions but the last n_new={n_new} of them must be the new tokens "
            f"(need kv_len >= n_new)"
        )
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share a dtype, got q={q.dtype} k={k.dtype} v={v.dtype}")
    if kv_lens is not None:
        if kv_lens.shape != (b,):
            raise ValueError(f"kv_lens must be [batch={b}], got shape {tuple(kv_lens.shape)}")
        if kv_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"kv_lens must be int32 or int64, got {kv_lens.dtype}")
        if kv_lens.device != q.device:
            raise ValueError(f"kv_lens is on {kv_lens.device} but q is on {q.device}")
    if out is not None:
        if out.shape != q.shape:
            raise ValueError(f"out must be [batch, q_heads, n_new, head_dim] = {tuple(q.shape)}, got {tuple(out.shape)}")
        if out.dtype != q.dtype or out.device != q.device:
            raise TypeError(f"out must be {q.dtype} on {q.device}, got {out.dtype} on {out.device}")
    return b, qh, n_new, d, kvh, kv_len


def check_chunk_args(
    keys: torch.Tensor, query: torch.Tensor, chunk_size: int, num_chunks: Optional[int]
) -> int:
    """Validate ``chunk_scores`` arguments; return the number of scored chunks."""
    if keys.dim() != 4:
        raise ValueError(f"keys must be [batch, kv_heads, seq, head_dim], got shape {tuple(keys.shape)}")
    b, kvh, seq, d = keys.shape
    if query.shape != (b, kvh, d):
        raise ValueError(
            f"query must be [batch={b}, kv_heads={kvh}, head_dim={d}] (the query proxy per KV head), "
            f"got {tuple(query.shape)}"
        )
    for name, t in (("keys", keys), ("query", query)):
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if query.device != keys.device:
        raise ValueError(f"query is on {query.device} but keys are on {keys.device}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    full = seq // chunk_size
    if num_chunks is None:
        num_chunks = full
    if not 0 <= num_chunks <= full:
        raise ValueError(
            f"num_chunks={num_chunks} but keys hold only {full} full chunks of {chunk_size} "
            f"(seq={seq})"
        )
    return int(num_chunks)


# ---------------------------------------------------------------------------------------------
# sparse decode / verify attention
# ---------------------------------------------------------------------------------------------
def _visible_mask(
    n_new: int, kv_len: int, kv_lens: Optional[torch.Tensor], b: int, device: torch.device
) -> torch.Tensor:
    """Bool mask [b, 1, n_new, kv_len]: query i of batch row b sees kv positions [0, L_b - n_new + i]."""
    lens = (
        torch.full((b,), kv_len, dtype=torch.long, device=device)
        if kv_lens is None
        else kv_lens.to(device=device, dtype=torch.long)
    )
    i = torch.arange(n_new, device=device)
    j = torch.arange(kv_len, device=device)
    last = lens[:, None] - n_new + i[None, :]  # [b, n_new] last visible kv index per query
    return (j[None, None, :] <= last[:, :, None])[:, None]  # j <= last implies j < L_b


def sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    kv_lens: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sparse decode/verify attention, torch reference (matmul + explicit mask, fp32 math).

    Args:
        q: ``[batch, q_heads, n_new, head_dim]`` queries of the new tokens (post-RoPE);
            float32 / float16 / bfloat16.
        k, v: ``[batch, kv_heads, kv_len, head_dim]``, same dtype as ``q``. The first
            ``L_b - n_new`` entries of row ``b`` are the kept (compact) cache, in any order that the
            caller likes; the next ``n_new`` are the new tokens themselves, in order. GQA: query head
            ``h`` reads KV head ``h // (q_heads // kv_heads)``.
        scale: softmax scale; default ``1 / sqrt(head_dim)``.
        kv_lens: optional ``[batch]`` int32/int64: valid length ``L_b`` of each row (ragged batch);
            entries ``>= L_b`` are padding and never read into the result. Default ``kv_len``.
        out: optional output tensor of ``q``'s shape and dtype (any strides); written and returned.

    Returns:
        ``[batch, q_heads, n_new, head_dim]`` in ``q``'s dtype. Query ``i`` (0-based) of row ``b``
        attends to kv positions ``[0, L_b - n_new + i]`` (causal among the new tokens). A query that
        sees no position (only when ``L_b < n_new``) gets a zero output.

    Raises:
        ValueError / TypeError on bad shapes, dtypes or devices (message names the tensor).

    Source: the decode/verify step of speculative decoding with a sparse drafter cache (TriForce,
    Sun et al. 2024; BudgetDraft section 3): the compact cache is attended like a dense one, so the
    cost follows the budget B, not the context.
    """
    b, qh, n_new, d, kvh, kv_len = check_sparse_attention_args(q, k, v, kv_lens, out)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    g = qh // kvh
    # group the query heads of one KV head together: [b, kvh, g * n_new, d] (no repeat of k/v)
    qf = q.float().reshape(b, kvh, g * n_new, d)
    kf, vf = k.float(), v.float()
    s = torch.matmul(qf, kf.transpose(-1, -2)) * scale  # [b, kvh, g*n_new, kv_len]
    s = s.view(b, kvh, g, n_new, kv_len)
    mask = _visible_mask(n_new, kv_len, kv_lens, b, q.device)[:, :, None]  # [b,1,1,n_new,kv_len]
    s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m)  # exp(-inf) = 0 on masked entries
    den = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(den > 0, den, torch.ones_like(den))
    o = torch.matmul(p.view(b, kvh, g * n_new, kv_len), vf).view(b, qh, n_new, d)
    o = o.to(q.dtype)
    if out is not None:
        out.copy_(o)
        return out
    return o


def sparse_attention_bruteforce(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    kv_lens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-(batch, head, query) loop in float64: the reference of the reference (tests only)."""
    b, qh, n_new, d, kvh, kv_len = check_sparse_attention_args(q, k, v, kv_lens)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    g = qh // kvh
    out = torch.zeros(b, qh, n_new, d, dtype=torch.float64)
    for bi in range(b):
        L = kv_len if kv_lens is None else int(kv_lens[bi])
        for h in range(qh):
            for i in range(n_new):
                last = L - n_new + i
                if last < 0:
                    continue
                kk = k[bi, h // g, : last + 1].double()
                vv = v[bi, h // g, : last + 1].double()
                w = torch.softmax(kk @ q[bi, h, i].double() * scale, dim=0)
                out[bi, h, i] = w @ vv
    return out.to(q.dtype)


# ---------------------------------------------------------------------------------------------
# chunk_topk selection
# ---------------------------------------------------------------------------------------------
def chunk_scores_reference(
    keys: torch.Tensor, query: torch.Tensor, chunk_size: int, num_chunks: Optional[int] = None
) -> torch.Tensor:
    """Chunk scores of the ``chunk_topk`` policy, torch reference.

    Args:
        keys: ``[batch, kv_heads, seq, head_dim]`` prefix keys of one layer (post-RoPE), any float dtype.
        query: ``[batch, kv_heads, head_dim]`` query proxy per KV head (BudgetDraft: the last key).
        chunk_size: positions per chunk (paper: 8).
        num_chunks: chunks to score, default ``seq // chunk_size`` (only full chunks are scored).

    Returns:
        ``[batch, kv_heads, num_chunks]`` float32: ``score[c] = query . mean(keys[c*cs:(c+1)*cs])``.

    Source: TriForce (Sun et al. 2024) retrieval cache / BudgetDraft section 2 (``chunk_topk``).
    """
    n = check_chunk_args(keys, query, chunk_size, num_chunks)
    b, kvh, _, d = keys.shape
    kc = keys[:, :, : n * chunk_size].float().reshape(b, kvh, n, chunk_size, d).mean(dim=3)
    return torch.matmul(kc, query.float().unsqueeze(-1)).squeeze(-1)
