"""Cache storage: :class:`BufferedLayer` (preallocated, copy-on-write, rollback by length),
:class:`KVCache` (a transformers ``DynamicCache`` with bd-ray's bookkeeping), :class:`PrefillResult`,
and the length/clone/crop operations on them. How they are used: :mod:`bd_ray.kvcache`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from bd_ray.config import SparsePolicyConfig

__all__ = ["BufferedLayer", "KVCache", "PrefillResult", "cache_len", "next_position", "clone_cache", "crop_cache"]


class BufferedLayer(DynamicLayer):
    """A full-attention cache layer with preallocated capacity and copy-on-write sharing.

    ``keys``/``values`` read as ``[b, kv_heads, length, head_dim]`` views of the storage. Assigning
    them adopts the tensors as *shared* storage (never written in place). Source: gpt-fast's
    static ``KVCache`` (index writes, rollback by length), adapted to transformers' layer API.
    """

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)

    # storage: self._k/self._v [b, kvh, capacity, d]; self._len valid entries; self._owned writable
    @property
    def keys(self):
        k = self.__dict__.get("_k")
        return k if k is None or k.shape[-2] == self._len else k[..., : self._len, :]

    @keys.setter
    def keys(self, t) -> None:
        self._k = t
        self._owned = False
        self._len = t.shape[-2] if t is not None and t.dim() == 4 else 0

    @property
    def values(self):
        v = self.__dict__.get("_v")
        return v if v is None or v.shape[-2] == self._len else v[..., : self._len, :]

    @values.setter
    def values(self, t) -> None:
        self._v = t
        self._owned = False

    def share(self) -> "BufferedLayer":
        """A new layer viewing the same entries; both copy before their next in-place write."""
        other = BufferedLayer()
        other.lazy_initialization(self.keys, self.values)
        other.keys, other.values = self.keys, self.values
        self._owned = False
        return other

    def _reserve(self, need: int, like_k: torch.Tensor, like_v: torch.Tensor) -> None:
        """Make the storage owned and able to hold ``need`` entries (grows by 25 %, at least 64)."""
        cap = self._k.shape[-2] if self._k is not None and self._k.dim() == 4 else 0
        if self._owned and need <= cap:
            return
        n, new_cap = self._len, max(need + 64, int(need * 1.25))
        b, h, _, dk = like_k.shape
        k = like_k.new_empty(b, h, new_cap, dk)
        v = like_v.new_empty(b, h, new_cap, like_v.shape[-1])
        if n:
            k[..., :n, :].copy_(self.keys)
            v[..., :n, :].copy_(self.values)
        self._k, self._v, self._owned = k, v, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``t`` new entries; transformers' attention calls it once per layer and forward.

        Args:
            key_states: ``[b, kv_heads, t, head_dim]`` keys of the new tokens (post-RoPE).
            value_states: ``[b, kv_heads, t, head_dim_v]`` their values.
            *args, **kwargs: transformers' ``cache_kwargs``; unused.

        Returns:
            ``(keys, values)``: ``[b, kv_heads, length + t, d]`` views of all entries so far,
            valid until the next write.

        In-place growth: the entries are copied into preallocated storage (grown by 25 %, at least
        64 entries, when full; shared storage is copied first), so a decode step costs ``O(t)``
        rather than a ``torch.cat`` of the whole cache. Under autograd with inputs that need
        gradients (training views), it concatenates instead, so gradients flow through the
        returned tensors.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or value_states.requires_grad):
            keys = torch.cat([self.keys, key_states], dim=-2)
            values = torch.cat([self.values, value_states], dim=-2)
            self.keys, self.values = keys, values
            return keys, values
        n, start = key_states.shape[-2], self._len
        self._reserve(start + n, key_states, value_states)
        self._k[..., start:start + n, :].copy_(key_states)
        self._v[..., start:start + n, :].copy_(value_states)
        self._len = start + n
        return self.keys, self.values

    def crop_to(self, new_len: int) -> None:
        """Keep the first ``new_len`` entries (rollback); storage is kept for the next writes."""
        self._len = new_len

    def get_seq_length(self) -> int:
        return self._len if self.is_initialized else 0


class KVCache(DynamicCache):
    """A ``DynamicCache`` (plain full-attention ``DynamicLayer`` s) with sparse-view bookkeeping.

    Attributes:
        kept_positions: ``None`` for a contiguous cache (entry ``i`` is position ``i``), else one
            LongTensor ``[b, kv_heads, K]`` per layer: the original (true) position of each of the
            first ``K`` compact entries, ascending (:func:`bd_ray.sparse.select_positions`).
        kept_len: number of leading entries that belong to the prefix (``K`` for a compact cache,
            the padded prefix length for a prefill cache); :func:`crop_cache` never cuts below it.
        prefix_len: LongTensor ``[b]``, true length of each row's prefix; the next new token of
            row ``r`` has true position ``prefix_len[r] + (cache_len - kept_len)``.
        kept_valid: ``None`` (all prefix entries real) or BoolTensor ``[b, kept_len]``: which prefix
            entries are real (false = right padding of a shorter row / repeated kept slot).
        budget, policy: the selection that built a compact cache (``None`` otherwise).
    """

    def __init__(self) -> None:
        super().__init__()
        self.layer_class_to_replicate = BufferedLayer
        self.kept_positions: list[torch.Tensor] | None = None
        self.kept_len: int = 0
        self.prefix_len: torch.Tensor | None = None
        self.kept_valid: torch.Tensor | None = None
        self.budget: int | None = None
        self.policy: SparsePolicyConfig | None = None

    @classmethod
    def from_tensors(cls, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> "KVCache":
        """A cache whose layer ``l`` holds ``kv[l] = (keys, values)`` ``[b, kvh, n, d]`` (not copied)."""
        cache = cls()
        for k, v in kv:
            layer = BufferedLayer()
            layer.lazy_initialization(k, v)
            layer.keys, layer.values = k, v  # shared storage: copied before the first in-place write
            cache.layers.append(layer)
        return cache

    def _copy_meta(self, other: "KVCache") -> None:
        self.kept_positions = other.kept_positions
        self.kept_len = other.kept_len
        self.prefix_len = other.prefix_len
        self.kept_valid = other.kept_valid
        self.budget = other.budget
        self.policy = other.policy


@dataclass
class PrefillResult:
    """Output of :func:`prefill`.

    Attributes:
        cache: the filled :class:`KVCache` (contiguous, ``kept_len`` = padded prefix length).
        last_logits: ``[b, vocab]`` fp logits at each row's last valid prefix position.
        queries: ``None`` or one tensor per layer ``[b, q_heads, W, head_dim]``: post-RoPE queries
            of the last ``W`` valid positions of each row (row ``r``'s entry ``i`` is position
            ``lengths[r] - W + i``; entries before position 0 are zero).
        tail_argmax: ``None`` or ``[b, T]`` long: the model's argmax next token at each row's last
            ``T`` valid positions (entry ``i`` = position ``lengths[r] - T + i``; ``-1`` before
            position 0). Comparing a drafter's with the verifier's gives their greedy agreement on
            the prompt's own text (:mod:`bd_ray.speculative.adaptive` uses it as a free acceptance prior).
    """

    cache: KVCache
    last_logits: torch.Tensor
    queries: list[torch.Tensor] | None = None
    tail_argmax: torch.Tensor | None = None


def cache_len(cache) -> int:
    """Number of entries in the cache (compact index space; the same for every layer)."""
    if cache is None or len(cache.layers) == 0:
        return 0
    return cache.layers[0].get_seq_length()


def next_position(cache: KVCache) -> torch.Tensor:
    """LongTensor ``[b]``: true position of the next token each row would feed.

    ``prefix_len + (cache_len - kept_len)``. Raises ``ValueError`` if the cache has no
    ``prefix_len`` (not built by :func:`prefill` / :func:`compact_cache`).
    """
    if getattr(cache, "prefix_len", None) is None:
        raise ValueError("cache has no prefix_len; build it with prefill() or compact_cache()")
    return cache.prefix_len + (cache_len(cache) - cache.kept_len)


def clone_cache(cache) -> KVCache:
    """Shallow copy: a new :class:`KVCache` sharing the tensors (and bookkeeping) of ``cache``.

    Safe because shared storage is copied before either cache writes into it (copy-on-write,
    :class:`BufferedLayer`), so growing or cropping the clone never changes ``cache``.
    """
    out = KVCache()
    out.layers = [layer.share() if isinstance(layer, BufferedLayer) else _shared_layer(layer)
                  for layer in cache.layers]
    if isinstance(cache, KVCache):
        out._copy_meta(cache)
    else:
        out.kept_len = cache_len(cache)
    return out


def crop_cache(cache, new_len: int) -> None:
    """Roll back rejected drafts in place: keep the first ``new_len`` entries (compact index space).

    Raises:
        ValueError: ``new_len`` below ``cache.kept_len`` (it would drop kept prefix entries) or above
            the current length.
    """
    n = cache_len(cache)
    floor = getattr(cache, "kept_len", 0)
    if new_len < floor:
        raise ValueError(f"crop_cache new_len {new_len} is below the kept prefix length {floor}; "
                         "rollback may only remove entries added after prefill/compaction")
    if new_len > n:
        raise ValueError(f"crop_cache new_len {new_len} exceeds the cache length {n}")
    if new_len == n:
        return
    for layer in cache.layers:
        if isinstance(layer, BufferedLayer):
            layer.crop_to(new_len)      # later appends overwrite the rejected entries in place
        else:
            layer.keys = layer.keys[..., :new_len, :]
            layer.values = layer.values[..., :new_len, :]


def _shared_layer(layer) -> BufferedLayer:
    out = BufferedLayer()
    out.lazy_initialization(layer.keys, layer.values)
    out.keys, out.values = layer.keys, layer.values
    return out
