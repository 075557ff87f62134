"""bd-ray kernels: sparse decode/verify attention and ``chunk_topk`` chunk scoring.

Importable as ``bd_ray_kernels`` (the source lives under ``kernels/``, but a top-level package named
``kernels`` would be mistaken by transformers for the Hugging Face ``kernels`` library).

Public entry points (dispatching to Triton on CUDA, the torch reference elsewhere; see
:mod:`bd_ray_kernels.dispatch`): :func:`sparse_attention`, :func:`chunk_scores`,
:func:`backend_name`. Which chunks are kept is decided once, in :func:`bd_ray.sparse.select_positions`,
from these scores. The torch references live in
:mod:`bd_ray_kernels.reference`; the Triton code in :mod:`.sparse_attention` / :mod:`.chunk_select`
(imported lazily: CPU-only use never imports triton).
"""

from .dispatch import (
    backend_name,
    chunk_scores,
    sparse_attention,
    triton_available,
    use_triton,
)
from .reference import (
    chunk_scores_reference,
    sparse_attention_reference,
)

__all__ = [
    "backend_name",
    "chunk_scores",
    "sparse_attention",
    "triton_available",
    "use_triton",
    "chunk_scores_reference",
    "sparse_attention_reference",
]
