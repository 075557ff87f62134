"""KV caches for the drafter and the verifier: prefill, sparse (compact) views, growth and rollback.

The model code stays oblivious (docs/DESIGN.md section 3): every cache here is a transformers
``DynamicCache`` (the subclass :class:`KVCache`, which only adds bookkeeping attributes) handed
to an unmodified HF model.

How a compact cache works. HF caches store post-RoPE keys. A compact cache is a ``DynamicCache``
whose layer ``l`` holds the keys/values gathered at the kept prefix positions,
``[b, kv_heads, K, head_dim]``; each kept key keeps the rotation of its original position. New
tokens are fed with their TRUE ``position_ids`` (prefix length + offset), so their queries and
keys are rotated exactly as in the full-cache model, while transformers 5.x derives the query
offset and the causal mask from the cache *length* (``Cache.get_query_offset`` /
``get_mask_sizes``, ``masking_utils._preprocess_mask_arguments``), i.e. in compact index space:
every kept prefix entry is visible to every new token, new tokens are causal among themselves.
The result is exactly full attention restricted to the kept positions (tested against an
explicit 4-D mask on the full cache, eager and sdpa). ``position_ids`` are not used for masking
when a cache is passed (packed-sequence detection only runs without a cache).

Growth: layers are :class:`BufferedLayer` s. At inference an append writes into preallocated
capacity in place (as gpt-fast's static KV buffers: no ``torch.cat`` of the whole cache per decode
step) and rollback of rejected drafts (:func:`crop_cache`) only moves the length, so rejected
entries are simply overwritten next cycle; the kept prefix entries are never touched. Buffers
can be shared (shallow clones, several sparse views of one prefill): a layer writes in place only
into storage it owns and copies shared storage once before its first write (copy-on-write), so
caches never mutate each other. With autograd recording (training continuations) an append
concatenates like ``DynamicLayer``, so no in-place write can invalidate a saved tensor.

Batch rows with different prompt lengths: prompts are left-aligned, padding at the right. Causal
attention means valid tokens never see the right padding during prefill; afterwards the cache
records ``kept_valid`` ``[b, K]`` and :func:`forward_with_cache` turns it into a 2-D attention
mask (padding slots hidden), while new tokens of row ``r`` get true positions starting at
``prefix_len[r]``.
"""

from bd_ray.kvcache.capture import capture_queries
from bd_ray.kvcache.forward import apply_head, base_and_head, compact_cache, forward_with_cache, prefill
from bd_ray.kvcache.layers import (BufferedLayer, KVCache, PrefillResult, cache_len, clone_cache, crop_cache,
                                   next_position)

__all__ = ["KVCache", "BufferedLayer", "PrefillResult", "prefill", "compact_cache", "clone_cache", "cache_len",
           "crop_cache", "next_position", "forward_with_cache", "capture_queries", "base_and_head", "apply_head"]
