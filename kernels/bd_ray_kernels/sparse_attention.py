"""Triton sparse decode/verify attention (flash-decoding style) over a compact KV cache.

Layout and convention (identical to :func:`bd_ray_kernels.reference.sparse_attention_reference`):
``q [batch, q_heads, n_new, head_dim]``, ``k/v [batch, kv_heads, kv_len, head_dim]``; the last
``n_new`` valid entries of k/v are the new tokens; query ``i`` sees kv positions
``[0, L_b - n_new + i]`` with ``L_b = kv_lens[b]`` (default ``kv_len``).

Kernel design (FlashAttention-2 online softmax + FlashDecoding split-KV, Dao et al. 2023):

* one program per ``(batch, kv_head, m_block, kv_split)``; the M dimension of the tile packs the
  ``group = q_heads // kv_heads`` query heads sharing a KV head times the ``n_new`` queries
  (row ``r = i * group + g``), so GQA reads each K/V tile once for all its query heads and small
  ``n_new`` still fills a 16-row ``tl.dot``;
* the KV axis is split over programs when ``batch * kv_heads`` alone cannot fill the GPU
  (FlashDecoding); each split writes an fp32 partial output and its log-sum-exp, and a second
  small kernel combines them;
* ragged lengths (``kv_lens``, non-power-of-two ``kv_len`` / ``head_dim``) are handled with masked
  loads; causal masking only bites in the last block(s);
* fp32 inputs use an IEEE fp32 ``tl.dot`` (no TF32), fp16/bf16 use the native tensor-core dot with
  fp32 accumulation. Under the Triton interpreter (CPU tensors) everything is cast to fp32 inside
  the kernel because the interpreter's bf16 arithmetic is wrong.

The kernels are written as plain functions and wrapped on first use (``JITFunction``, or
``InterpretedFunction`` when Triton was imported with ``TRITON_INTERPRET=1``), so importing this
module never compiles anything. Note that Triton fixes interpreter mode at *its* import (its
standard library is decorated then); CPU tensors raise a clear error without it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import check_sparse_attention_args

__all__ = ["sparse_attention_triton", "num_kv_splits", "interpreter_active"]


def _sparse_attn_fwd(
    Q, K, V, O, OP, LSE, KV_LENS,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    n_new, kv_len, head_dim, num_kv_heads, group, split_len, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENS: tl.constexpr, SPLIT: tl.constexpr, F32_DOT: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    num_splits = tl.num_programs(2)
    b = (pid_bh // num_kv_heads).to(tl.int64)  # int64: batch offsets of big caches overflow int32
    kvh = pid_bh % num_kv_heads
    m_total = group * n_new

    if HAS_LENS:
        L = tl.load(KV_LENS + b).to(tl.int32)
    else:
        L = kv_len
    base = L - n_new  # kv index of new token 0

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m_total
    qi = rows // group  # new-token index of the row
    g = rows % group
    h = kvh * group + g  # query head of the row
    last = base + qi  # last visible kv index per row
    r_last = tl.minimum(pid_m * BLOCK_M + BLOCK_M, m_total) - 1
    end = base + r_last // group + 1  # exclusive end of the kv range this m-block may see

    start = pid_s * split_len
    stop = tl.minimum(start + split_len, end)

    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_ptrs = Q + b * sqb + h[:, None] * sqh + qi[:, None] * sqn + offs_d[None, :] * sqd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if F32_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    offs_n0 = tl.arange(0, BLOCK_N)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + offs_n0
        n_ok = offs_n < stop
        kt = tl.load(k_base + offs_n[None, :] * skn + offs_d[:, None] * skd,
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        if F32_DOT:
            kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * qk_scale  # log2 units
        vis = (offs_n[None, :] <= last[:, None]) & n_ok[None, :]
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        vt = tl.load(v_base + offs_n[:, None] * svn + offs_d[None, :] * svd,
                     mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        if F32_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLIT:
        # partials: OP [b*kvh, splits, m_total, BLOCK_D] fp32, LSE [b*kvh, splits, m_total] (log2 units)
        prow = (pid_bh * num_splits + pid_s) * m_total + rows
        tl.store(OP + prow[:, None] * BLOCK_D + offs_d[None, :], o, mask=row_ok[:, None])
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LSE + prow, lse, mask=row_ok)
    else:
        o_ptrs = O + b * sob + h[:, None] * soh + qi[:, None] * son + offs_d[None, :] * sod
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def _sparse_attn_combine(
    O, OP, LSE,
    sob, soh, son, sod,
    n_new, head_dim, num_kv_heads, group, num_splits,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # merge the per-split partial outputs with their log-sum-exps (log2 units)
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    kvh = pid_bh % num_kv_heads
    m_total = group * n_new
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < m_total
    offs_d = tl.arange(0, BLOCK_D)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s_idx in range(0, num_splits):
        prow = (pid_bh * num_splits + s_idx) * m_total + rows
        lse = tl.load(LSE + prow, mask=row_ok, other=float("-inf"))
        o = tl.load(OP + prow[:, None] * BLOCK_D + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        w = tl.math.exp2(lse - m_safe)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    qi = rows // group
    h = kvh * group + rows % group
    o_ptrs = O + b * sob + h[:, None] * soh + qi[:, None] * son + offs_d[None, :] * sod
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d < head_dim)[None, :])


_CACHE: dict = {}


def interpreter_active() -> bool:
    """True when Triton was imported with ``TRITON_INTERPRET=1`` (its standard library then runs
    in the interpreter). Triton decides this once, at import: setting the variable later has no
    effect on ``tl.zeros``, ``tl.sum``, ... so it cannot be switched on per call."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


def _wrap(fn, device: torch.device):
    """The launchable kernel for ``fn``: interpreted when Triton runs in interpreter mode, compiled
    otherwise. CPU tensors need the interpreter (there is no CPU backend)."""
    interpret = interpreter_active()
    if device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"the Triton kernels got {device} tensors but Triton is not in interpreter mode: set "
            "TRITON_INTERPRET=1 in the environment before triton is first imported, or use CUDA tensors"
        )
    key = (fn.__name__, interpret)
    k = _CACHE.get(key)
    if k is None:
        if interpret:
            from triton.runtime.interpreter import InterpretedFunction

            k = InterpretedFunction(fn)
        else:
            from triton.runtime.jit import JITFunction

            k = JITFunction(fn)
        _CACHE[key] = k
    return k


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def num_kv_splits(batch: int, kv_heads: int, m_blocks: int, kv_len: int, block_n: int, device: torch.device) -> int:
    """FlashDecoding split heuristic: split the KV axis until ~2 programs per SM, >= 2 blocks per split."""
    if device.type != "cuda":
        return 1
    base = batch * kv_heads * m_blocks
    target = 2 * _sm_count(device)
    n_blocks = triton.cdiv(kv_len, block_n)
    return max(1, min(triton.cdiv(target, base), n_blocks // 2))


def sparse_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    kv_lens: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    *,
    num_splits: Optional[int] = None,
    block_n: Optional[int] = None,
    block_m: Optional[int] = None,
) -> torch.Tensor:
    """Sparse decode/verify attention with the Triton kernel (CUDA, or interpreter on CPU).

    Args / returns / errors: as :func:`bd_ray_kernels.reference.sparse_attention_reference`
    (q ``[batch, q_heads, n_new, head_dim]``, k/v ``[batch, kv_heads, kv_len, head_dim]``, fp32 /
    fp16 / bf16, fp32 accumulation, output in q's dtype). Inputs may have any strides.

    Tuning knobs (tests and benchmarks): ``num_splits`` (KV splits per (batch, kv_head); default
    from :func:`num_kv_splits`), ``block_n`` (KV tile, default 64 on CUDA, 16 in the interpreter),
    ``block_m`` (query-row tile, default ``max(16, next_pow2(group * n_new))`` capped at 64).
    On CUDA the first call per dtype / head_dim / split mode JIT-compiles (a few seconds).

    Source: FlashAttention-2 online softmax and FlashDecoding split-KV (Dao et al. 2023); the
    compact-cache convention of TriForce / BudgetDraft (docs/DESIGN.md section 2).
    """
    b, qh, n_new, d, kvh, kv_len = check_sparse_attention_args(q, k, v, kv_lens, out)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    kern = _wrap(_sparse_attn_fwd, q.device)
    interpret = interpreter_active()
    group = qh // kvh
    m_total = group * n_new
    BLOCK_D = max(16, triton.next_power_of_2(d))
    BLOCK_M = block_m or min(64, max(16, triton.next_power_of_2(m_total)))
    # KV tile: 64 keys when a K row is <= 256 bytes (fp16 d<=128, fp32 d<=64), else 32 (keeps the
    # fp32 / d=256 tiles within ~80 KB of shared memory); 16 in the interpreter (tiny test shapes)
    BLOCK_N = block_n or (16 if interpret else (64 if BLOCK_D * q.element_size() <= 256 else 32))
    m_blocks = triton.cdiv(m_total, BLOCK_M)
    if num_splits is None:
        num_splits = num_kv_splits(b, kvh, m_blocks, kv_len, BLOCK_N, q.device)
    num_splits = max(1, min(int(num_splits), triton.cdiv(kv_len, BLOCK_N)))
    split_len = triton.cdiv(triton.cdiv(kv_len, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(kv_len, split_len)

    o = out if out is not None else torch.empty_like(q, memory_format=torch.contiguous_format)
    if b == 0 or qh == 0:
        return o
    lens = kv_lens if kv_lens is not None else q  # dummy pointer when HAS_LENS is False
    split = num_splits > 1
    if split:
        op = torch.empty(b * kvh, num_splits, m_total, BLOCK_D, device=q.device, dtype=torch.float32)
        lse = torch.empty(b * kvh, num_splits, m_total, device=q.device, dtype=torch.float32)
    else:
        op = lse = o  # unused
    f32_dot = interpret or q.dtype == torch.float32
    opts = {} if interpret else {"num_warps": 4, "num_stages": 2}
    kern[(b * kvh, m_blocks, num_splits)](
        q, k, v, o, op, lse, lens,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        n_new, kv_len, d, kvh, group, split_len, float(scale) * 1.4426950408889634,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        HAS_LENS=kv_lens is not None, SPLIT=split, F32_DOT=f32_dot, **opts,
    )
    if split:
        comb = _wrap(_sparse_attn_combine, q.device)
        comb[(b * kvh, m_blocks)](
            o, op, lse, *o.stride(), n_new, d, kvh, group, num_splits,
            BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, **({} if interpret else {"num_warps": 4}),
        )
    return o
