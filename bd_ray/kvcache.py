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

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from bd_ray.config import SparsePolicyConfig
from bd_ray.sparse import gather_kv, kept_valid_mask, select_positions

__all__ = [
    "KVCache",
    "PrefillResult",
    "prefill",
    "compact_cache",
    "clone_cache",
    "cache_len",
    "crop_cache",
    "next_position",
    "forward_with_cache",
    "capture_queries",
    "base_and_head",
    "apply_head",
]


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


# ------------------------------------------------------------------------------------------
# Query capture: wrap the registered attention function (transformers AttentionInterface)
# ------------------------------------------------------------------------------------------

_CAPTURE_PREFIX = "bd_ray_capture__"


def _register_capture(orig: str) -> str:
    """Register (once) an attention implementation that records queries, then calls ``orig``.

    Wrapping the attention *function* (instead of hooking ``self_attn``) sees exactly the post-RoPE
    (and post-q-norm, for models that have one) queries the model attends with, for any
    architecture that dispatches through ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2, Gemma, ...).
    """
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    name = _CAPTURE_PREFIX + orig
    if name in ALL_ATTENTION_FUNCTIONS:
        return name

    def attention(module, query, key, value, attention_mask, **kwargs):
        hook = getattr(module, "_bd_ray_query_hook", None)
        if hook is not None:
            hook(query)  # [b, q_heads, q_len, d], post-RoPE
        if orig == "eager":
            # "eager" is not in the registry: each modeling file has its own eager function.
            fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward")
        else:
            fn = ALL_ATTENTION_FUNCTIONS[orig]
        return fn(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    if orig in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS._global_mapping[orig])
    return name


class capture_queries:
    """Context manager: while active, ``model``'s attention modules pass their queries to a callback.

    ``callback(layer_idx, query)`` gets ``query`` ``[b, q_heads, q_len, head_dim]`` post-RoPE.
    It temporarily switches ``model.config._attn_implementation`` to a registered wrapper of the
    current implementation (eager, sdpa, or any registered one) and restores it on exit. Not safe
    while another thread runs a forward of the same model object.
    """

    def __init__(self, model, callback):
        self.model = model
        self.callback = callback
        self._orig: str | None = None
        self._modules: list = []

    def __enter__(self):
        cfg = self.model.config
        self._orig = cfg._attn_implementation or "eager"
        name = _register_capture(self._orig)
        for module in _attention_modules(self.model):
            module._bd_ray_query_hook = (lambda q, i=module.layer_idx: self.callback(i, q))
            self._modules.append(module)
        cfg._attn_implementation = name
        return self

    def __exit__(self, *exc):
        self.model.config._attn_implementation = self._orig
        for module in self._modules:
            module._bd_ray_query_hook = None
        self._modules = []
        return False


def _attention_modules(model) -> list:
    """Attention modules in layer order (those with a ``layer_idx`` and a ``q_proj``/query path)."""
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "num_key_value_groups")]
    mods.sort(key=lambda m: m.layer_idx)
    if not mods:
        raise ValueError(f"cannot find attention modules (with layer_idx) in {type(model).__name__}")
    return mods


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------


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


def _as_row_tensor(x, b: int, device) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.long, device=device).reshape(-1)
    if t.numel() == 1 and b != 1:
        t = t.expand(b)
    if t.numel() != b:
        raise ValueError(f"expected one value per batch row ({b}), got {t.numel()}")
    return t


# ------------------------------------------------------------------------------------------
# Forward passes
# ------------------------------------------------------------------------------------------


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
