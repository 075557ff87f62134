"""A batched KV cache with per-row lengths, and the ragged forward that runs rows through it.

Layout (MagicDec's static batch with per-row ``cachelens``, the layout of the Triton kernel in
``kernels/bd_ray_kernels``): per layer one key and one value tensor ``[slots, kv_heads, capacity,
head_dim]``; row ``s`` holds ``lens[s]`` valid entries. For the verifier entry ``i`` is position
``i``; for a sparse drafter the first ``kept`` entries are the row's compact prefix (each key keeps
its original RoPE rotation) and the rest are the tokens fed since. Rollback of rejected drafts is
a length update (vLLM: ``num_computed_tokens -= num_rejected``); later writes overwrite them. A
freed slot is length 0: nothing of the previous request is ever visible to the next (the causal
rule below only reads entries below a row's length), which is what case 15 asks.

How it plugs into transformers 5 (as :mod:`bd_ray.kvcache` does, docs/DESIGN.md section 3):
:class:`RaggedKVCache` is a ``transformers.Cache`` whose ``update`` writes each row's new entries
at that row's own offset and returns ``[rows, kv_heads, L, head_dim]`` views (``L`` = the longest
row after the write); :func:`ragged_forward` pads every row's new tokens to ``T`` (the longest
feed), gives each row its true ``position_ids [rows, T]``, and tells attention the per-row valid
lengths: ``bd_ray_kv_lens`` for the ``bd_ray_sparse`` implementation (Triton on CUDA, masked fused
SDPA on CPU, :mod:`bd_ray.attention`), an explicit 4-D additive mask for ``sdpa``/``eager``.
Query ``i`` of row ``s`` sees entries ``[0, lens[s] + i]``; padded queries are computed and
ignored. Rows in the slot range that take no part in a forward are fed a dummy token whose
entries land beyond their length (never read). When all rows are alike (one row, or equal
lengths and feeds) no mask is passed and the forward is exactly the batch-1 one.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

from bd_ray import kvcache

__all__ = ["RaggedKVCache", "ragged_forward", "kv_bytes_per_token"]


def kv_bytes_per_token(model: Any) -> int:
    """Bytes of K and V that one token occupies in ``model``'s cache, all layers (from its config)."""
    cfg = model.config
    kvh = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = next(model.parameters()).element_size()
    return 2 * cfg.num_hidden_layers * kvh * head_dim * elem


class RaggedKVCache(Cache):
    """Per-row-length KV cache over ``slots`` rows (see the module docstring for the layout).

    Attributes:
        lens: valid entries per slot (Python ints; the engine's bookkeeping, changed by
            :meth:`set_len` for rollback and :meth:`free` when a request leaves).
    """

    _GROW = 64   # capacity grows in steps of this many entries (fewer reallocations)

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[DynamicLayer() for _ in range(num_layers)])  # for HF's layer-type queries
        self.num_layers = num_layers
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers
        self.lens: list[int] = []
        self._slots = 0          # rows the storage must hold
        self._capacity = 0       # entries per row the storage must hold
        self._fwd: tuple | None = None  # (lo, hi, write offsets [rows] or int, T, L) during a forward

    # ---- storage --------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of K/V storage allocated now."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v if t is not None)

    def reserve(self, slots: int, capacity: int) -> None:
        """Make room for ``slots`` rows of ``capacity`` entries (storage grows on the next write)."""
        self._slots = max(self._slots, slots)
        if capacity > self._capacity:
            self._capacity = -(-capacity // self._GROW) * self._GROW
        while len(self.lens) < self._slots:
            self.lens.append(0)

    def _storage(self, li: int, like: torch.Tensor, slots: int = 0, capacity: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``li``'s K/V storage, holding at least ``slots`` rows of ``capacity`` entries (what
        the write at hand needs): a layer too small is reshaped to the reserved shape now (the
        rest wait for :meth:`settle`)."""
        k = self.k[li]
        if k is None or k.shape[0] < slots or k.shape[2] < capacity:
            self._reshape(li, like, max(slots, self._slots), max(capacity, self._capacity))
        return self.k[li], self.v[li]

    def _reshape(self, li: int, like: torch.Tensor, slots: int, capacity: int) -> int:
        """Reallocate layer ``li`` as ``[slots, kv_heads, capacity, head_dim]`` zeros (masked
        entries must be finite: softmax weight 0 times NaN is NaN), live entries copied; return
        the bytes allocated."""
        k, v = self.k[li], self.v[li]
        _, kvh, _, d = like.shape
        nk = like.new_zeros(slots, kvh, capacity, d)
        nv = like.new_zeros(slots, kvh, capacity, d)
        if k is not None:
            s, c = min(slots, k.shape[0]), min(capacity, k.shape[2])
            nk[:s, :, :c].copy_(k[:s, :, :c])
            nv[:s, :, :c].copy_(v[:s, :, :c])
        self.k[li], self.v[li] = nk, nv
        return 2 * nk.numel() * nk.element_size()

    def _unsettled(self) -> list[int]:
        return [li for li, k in enumerate(self.k)
                if k is not None and (k.shape[0] != self._slots or k.shape[2] != self._capacity)]

    def settle(self, max_bytes: int) -> int:
        """Move layers whose storage differs from the reserved shape to it, one layer after
        another until ``max_bytes`` are allocated (at least one layer); return how many moved.

        Why: reshaping the padded storage copies every live row; done for all layers inside one
        forward (a long prompt's admission grows the capacity of every row, its end shrinks it)
        it stalls every decoding stream for that step (~1.7 GB at 9 rows x 4.2K entries in fp32).
        The engine calls this once per step, so a long prompt's chunked prefill spreads its
        growth over its steps; a write that needs a layer before then reshapes it itself."""
        done, spent = 0, 0
        for li in self._unsettled():
            if done and spent >= max_bytes:
                break
            spent += self._reshape(li, self.k[li], self._slots, self._capacity)
            done += 1
        return done

    def excess_bytes(self) -> int:
        """Bytes held beyond the reserved shape (layers :meth:`settle` has not shrunk yet)."""
        extra = 0
        for li in self._unsettled():
            k = self.k[li]
            per_entry = 2 * k.shape[1] * k.shape[3] * k.element_size()
            extra += max(0, k.shape[0] * k.shape[2] - self._slots * self._capacity) * per_entry
        return extra

    def fit(self, slots: int, capacity: int) -> None:
        """Reserve exactly ``slots`` rows of ``capacity`` entries (every slot at or above ``slots``
        must be free and no row longer than ``capacity``): the storage moves to that shape layer
        by layer (:meth:`settle`, or the first write that needs it). The batched engine calls it on
        every admission and release with what its live rows need at most, so the memory held is
        what admission projected (:mod:`bd_ray.speculative.admission`) plus :meth:`excess_bytes`
        until settled."""
        if any(self.lens[slots:]) or any(n > capacity for n in self.lens[:slots]):
            raise ValueError(f"fit({slots}, {capacity}) would cut live entries (lengths {self.lens})")
        self._slots, self._capacity = slots, capacity
        del self.lens[slots:]
        while len(self.lens) < slots:
            self.lens.append(0)

    def release(self) -> None:
        """Drop all storage (every slot must be free): an idle engine holds no cache memory."""
        if any(self.lens):
            raise RuntimeError("release() with rows still in the cache")
        self.k = [None] * self.num_layers
        self.v = [None] * self.num_layers
        self.lens, self._slots, self._capacity = [], 0, 0

    # ---- rows -----------------------------------------------------------------------------------
    def set_len(self, slot: int, n: int) -> None:
        """Keep the first ``n`` entries of ``slot`` (rollback; ``n`` never above the length)."""
        if not 0 <= n <= self.lens[slot]:
            raise ValueError(f"slot {slot}: new length {n} outside [0, {self.lens[slot]}]")
        self.lens[slot] = n

    def free(self, slot: int) -> None:
        """The row leaves: length 0, its entries are never read again."""
        self.lens[slot] = 0

    def install(self, slot: int, kv: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy one request's cache (per layer ``[1, kv_heads, n, head_dim]``) into ``slot``."""
        n = kv[0][0].shape[-2]
        self.reserve(slot + 1, n)
        for li, (k, v) in enumerate(kv):
            sk, sv = self._storage(li, k, slot + 1, n)
            sk[slot, :, :n].copy_(k[0])
            sv[slot, :, :n].copy_(v[0])
        self.lens[slot] = n

    def row(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)`` ``[1, kv_heads, lens[slot], head_dim]`` views of one row."""
        n = self.lens[slot]
        return [(k[slot: slot + 1, :, :n], v[slot: slot + 1, :, :n]) for k, v in zip(self.k, self.v)]

    # ---- transformers Cache API (during ragged_forward) -----------------------------------------
    def begin(self, lo: int, hi: int, offsets: list[int], T: int) -> None:
        self.reserve(hi, max(offsets) + T)
        same = all(o == offsets[0] for o in offsets)
        offs = offsets[0] if same else torch.tensor(offsets)
        self._fwd = (lo, hi, offs, T, max(offsets) + T)

    def end(self) -> None:
        self._fwd = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write ``T`` new entries per row at each row's offset; return ``[rows, kvh, L, d]`` views."""
        lo, hi, offs, T, L = self._fwd
        sk, sv = self._storage(layer_idx, key_states, hi, L)
        k, v = sk[lo:hi], sv[lo:hi]
        if isinstance(offs, int):
            k[:, :, offs: offs + T].copy_(key_states)
            v[:, :, offs: offs + T].copy_(value_states)
        else:
            idx = (offs.to(k.device).view(-1, 1, 1, 1) + torch.arange(T, device=k.device).view(1, 1, T, 1))
            k.scatter_(2, idx.expand_as(key_states), key_states)
            v.scatter_(2, idx.expand_as(value_states), value_states)
        return k[:, :, :L], v[:, :, :L]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._fwd is not None:
            return self._fwd[4] - self._fwd[3]
        return max(self.lens, default=0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length(layer_idx) + query_length, 0


def ragged_forward(model: Any, cache: RaggedKVCache, feeds: dict[int, list[int]], positions: dict[int, int],
                   heads: dict[int, int]) -> dict[int, torch.Tensor]:
    """Feed each row its own new tokens in one forward; return the logits each row asked for.

    Args:
        model: HF causal LM (Llama family; attention through transformers' interface).
        cache: the model's :class:`RaggedKVCache`; ``lens[s]`` grows by ``len(feeds[s])``.
        feeds: slot -> new token ids (at least one).
        positions: slot -> true position of ``feeds[s][0]`` (for a compact drafter prefix it
            differs from the cache length).
        heads: slot -> how many of the row's last positions need logits (``γ + 1`` to verify).

    Returns:
        slot -> ``[heads[s], vocab]`` logits (the LM head runs on those positions only).
    """
    slots = sorted(feeds)
    lo, hi = slots[0], slots[-1] + 1
    T = max(len(f) for f in feeds.values())
    dev = next(model.parameters()).device
    rows = hi - lo
    cache.reserve(hi, 0)
    offsets = [cache.lens[s] for s in range(lo, hi)]
    ids = torch.zeros(rows, T, dtype=torch.long)
    pos = torch.arange(T).view(1, T).repeat(rows, 1)
    n_new = [0] * rows
    for s in slots:
        f = feeds[s]
        ids[s - lo, : len(f)] = torch.tensor(f)
        pos[s - lo] += positions[s]
        n_new[s - lo] = len(f)
    uniform = len(slots) == rows and all(n == T for n in n_new) and all(o == offsets[0] for o in offsets)
    kwargs: dict[str, Any] = {}
    mask = None
    if not uniform:
        kv_lens = torch.tensor(offsets, device=dev) + T
        if model.config._attn_implementation == "bd_ray_sparse":
            kwargs["bd_ray_kv_lens"] = kv_lens
        else:
            L = max(offsets) + T
            dtype = next(model.parameters()).dtype
            j = torch.arange(L, device=dev).view(1, 1, 1, L)
            last = (kv_lens - T).view(rows, 1, 1, 1) + torch.arange(T, device=dev).view(1, 1, T, 1)
            mask = torch.zeros(rows, 1, T, L, dtype=dtype, device=dev).masked_fill(j > last, float("-inf"))
    base, head = kvcache.base_and_head(model)
    cache.begin(lo, hi, offsets, T)
    try:
        hidden = base(input_ids=ids.to(dev), position_ids=pos.to(dev), attention_mask=mask, cache=cache,
                      use_cache=True, **kwargs).last_hidden_state
    finally:
        cache.end()
    for s in slots:
        cache.lens[s] += len(feeds[s])
    # the LM head only on the positions asked for (never [rows, T, vocab])
    b_idx, t_idx, counts = [], [], []
    for s in slots:
        n, h = len(feeds[s]), heads[s]
        b_idx += [s - lo] * h
        t_idx += list(range(n - h, n))
        counts.append(h)
    logits = kvcache.apply_head(model, head, hidden[torch.tensor(b_idx, device=dev), torch.tensor(t_idx, device=dev)])
    return dict(zip(slots, logits.split(counts)))
