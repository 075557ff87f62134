"""Triton chunk scoring for the ``chunk_topk`` sparse policy (BudgetDraft / TriForce).

``score[b, h, c] = query[b, h] . mean(keys[b, h, c*cs:(c+1)*cs])`` for the full chunks
``c < num_chunks``. One program scores ``BLOCK_C`` chunks of one (batch, kv_head): it sums the
``chunk_size`` keys of each chunk in fp32 (one masked ``[BLOCK_C, BLOCK_D]`` load per offset inside
the chunk), divides by ``chunk_size`` and dots with the query proxy. The selection itself (top-k,
ties to the lower chunk index) is :func:`bd_ray.sparse.select_positions`, on these scores.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import check_chunk_args
from .sparse_attention import _wrap, interpreter_active

__all__ = ["chunk_scores_triton"]


def _chunk_scores_kernel(
    K, Q, S,
    skb, skh, skn, skd,
    sqb, sqh, sqd,
    num_kv_heads, num_chunks, chunk_size, head_dim, inv_cs,
    BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    h = pid_bh % num_kv_heads
    chunks = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chunks < num_chunks
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(Q + b * sqb + h * sqh + offs_d * sqd, mask=d_ok, other=0.0).to(tl.float32)
    k_base = K + b * skb + h * skh
    ksum = tl.zeros([BLOCK_C, BLOCK_D], dtype=tl.float32)
    for t in range(0, chunk_size):
        pos = chunks.to(tl.int64) * chunk_size + t
        kt = tl.load(k_base + pos[:, None] * skn + offs_d[None, :] * skd,
                     mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        ksum += kt.to(tl.float32)
    score = tl.sum(ksum * inv_cs * q[None, :], 1)
    tl.store(S + pid_bh.to(tl.int64) * num_chunks + chunks, score, mask=c_ok)


def chunk_scores_triton(
    keys: torch.Tensor, query: torch.Tensor, chunk_size: int, num_chunks: Optional[int] = None
) -> torch.Tensor:
    """Chunk scores with the Triton kernel (CUDA, or the interpreter for CPU tensors).

    Args / returns / errors: as :func:`bd_ray_kernels.reference.chunk_scores_reference`
    (keys ``[batch, kv_heads, seq, head_dim]``, query ``[batch, kv_heads, head_dim]``, any float
    dtype and strides; returns ``[batch, kv_heads, num_chunks]`` float32).
    """
    n = check_chunk_args(keys, query, chunk_size, num_chunks)
    b, kvh, _, d = keys.shape
    scores = torch.empty(b, kvh, n, device=keys.device, dtype=torch.float32)
    if n == 0 or b * kvh == 0:
        return scores
    kern = _wrap(_chunk_scores_kernel, keys.device)
    interpret = interpreter_active()
    BLOCK_D = max(16, triton.next_power_of_2(d))
    BLOCK_C = min(64 if BLOCK_D <= 128 else 32, max(16, triton.next_power_of_2(n)))
    kern[(b * kvh, triton.cdiv(n, BLOCK_C))](
        keys, query, scores, *keys.stride(), *query.stride(),
        kvh, n, chunk_size, d, 1.0 / chunk_size,
        BLOCK_C=BLOCK_C, BLOCK_D=BLOCK_D, **({} if interpret else {"num_warps": 4}),
    )
    return scores
