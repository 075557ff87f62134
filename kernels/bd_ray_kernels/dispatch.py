"""Backend dispatch: Triton kernels on CUDA, torch reference elsewhere.

Rules (``backend=None`` / ``"auto"``):

* CUDA tensors and an importable Triton -> Triton (compiled). Without Triton: torch reference,
  with a one-time warning.
* CPU tensors -> torch reference, unless ``BD_RAY_FORCE_TRITON=1`` *and* Triton runs in interpreter
  mode (``TRITON_INTERPRET=1`` set before triton was imported): then the Triton code runs in the
  interpreter (tests; 300-500x slower than torch).
* ``backend="torch"`` / ``"triton"`` force a backend (``"triton"`` on CPU needs interpreter mode and
  raises otherwise). The environment variable ``BD_RAY_KERNEL_BACKEND`` (``torch`` / ``triton`` /
  ``auto``) sets the default for every call.

Importing this module never imports Triton; Triton is imported on first use and an
``ImportError`` just means "not available".
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Optional

import torch

from . import reference as _ref

__all__ = [
    "triton_available",
    "use_triton",
    "backend_name",
    "sparse_attention",
    "chunk_scores",
]

_BACKENDS = ("auto", "torch", "triton")


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when ``import triton`` works (it does not need a GPU to import)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising at import
        return False
    return True


def _interpreter_active() -> bool:
    if not triton_available():
        return False
    from .sparse_attention import interpreter_active

    return interpreter_active()


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


_warned_no_triton = False


def use_triton(device: torch.device | str, backend: Optional[str] = None) -> bool:
    """Whether a call on ``device`` runs the Triton kernel (see the module docstring for the rules).

    Raises ``ValueError`` for an unknown backend name, ``RuntimeError`` when ``backend="triton"`` is
    forced but cannot run (no Triton, or CPU tensors without interpreter mode).
    """
    global _warned_no_triton
    device = torch.device(device)
    backend = (backend or os.environ.get("BD_RAY_KERNEL_BACKEND") or "auto").lower()
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' but triton cannot be imported")
        if device.type != "cuda" and not _interpreter_active():
            raise RuntimeError(
                f"backend='triton' on {device} needs TRITON_INTERPRET=1 set before triton is imported"
            )
        return True
    if device.type == "cuda":
        if triton_available():
            return True
        if not _warned_no_triton:
            warnings.warn("triton is not importable: bd_ray_kernels falls back to the torch reference on CUDA")
            _warned_no_triton = True
        return False
    return device.type == "cpu" and _env_flag("BD_RAY_FORCE_TRITON") and _interpreter_active()


def backend_name(device: torch.device | str, backend: Optional[str] = None) -> str:
    """Name of the backend a call on ``device`` uses, for metrics: ``"triton"``,
    ``"triton-interpret"`` or ``"torch"``."""
    if not use_triton(device, backend):
        return "torch"
    return "triton-interpret" if _interpreter_active() else "triton"


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    kv_lens: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sparse decode/verify attention of new tokens against a compact KV cache.

    Args:
        q: ``[batch, q_heads, n_new, head_dim]`` float32/float16/bfloat16, post-RoPE queries.
        k, v: ``[batch, kv_heads, kv_len, head_dim]``, q's dtype and device. The first
            ``L_b - n_new`` positions are the kept cache, the last ``n_new`` the new tokens.
            ``q_heads % kv_heads == 0`` (GQA: head ``h`` reads KV head ``h // (q_heads // kv_heads)``).
        scale: softmax scale, default ``1 / sqrt(head_dim)``.
        kv_lens: optional ``[batch]`` int32/int64 valid lengths ``L_b`` (ragged batch; the rest is
            padding). Default: ``kv_len`` for every row.
        out: optional preallocated output of q's shape/dtype (any strides, e.g. a transposed view of
            a ``[batch, n_new, q_heads, head_dim]`` buffer).
        backend: ``None``/``"auto"``, ``"torch"`` or ``"triton"`` (module docstring).

    Returns:
        ``[batch, q_heads, n_new, head_dim]`` in q's dtype (fp32 accumulation). Query ``i`` attends to
        kv positions ``[0, L_b - n_new + i]``; a query seeing nothing (``L_b < n_new``) outputs 0.

    Raises:
        ValueError / TypeError naming the bad tensor and the expected shape.

    Source: FlashDecoding (Dao et al. 2023) over the TriForce / BudgetDraft compact drafter cache.
    """
    if use_triton(q.device, backend):
        from .sparse_attention import sparse_attention_triton

        return sparse_attention_triton(q, k, v, scale, kv_lens, out)
    return _ref.sparse_attention_reference(q, k, v, scale, kv_lens, out)


def chunk_scores(
    keys: torch.Tensor,
    query: torch.Tensor,
    chunk_size: int,
    num_chunks: Optional[int] = None,
    *,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """``chunk_topk`` scores: ``[batch, kv_heads, num_chunks]`` float32,
    ``score[c] = query . mean(keys[c*chunk_size:(c+1)*chunk_size])``.

    Args:
        keys: ``[batch, kv_heads, seq, head_dim]`` float keys of one layer.
        query: ``[batch, kv_heads, head_dim]`` query proxy (BudgetDraft: the last key).
        chunk_size: positions per chunk (paper: 8).
        num_chunks: full chunks to score, default ``seq // chunk_size``.

    Raises ValueError / TypeError on bad shapes. Source: TriForce / BudgetDraft (docs/DESIGN.md s. 2).
    """
    if use_triton(keys.device, backend):
        from .chunk_select import chunk_scores_triton

        return chunk_scores_triton(keys, query, chunk_size, num_chunks)
    return _ref.chunk_scores_reference(keys, query, chunk_size, num_chunks)
