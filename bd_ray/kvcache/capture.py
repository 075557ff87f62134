"""Capture of post-RoPE queries during a prefill (the sparse policies that score with queries:
``snapkv``, ``chunk_topk`` with ``last_query``), by wrapping the registered attention function
(transformers ``AttentionInterface``)."""

from __future__ import annotations

import sys

import torch

__all__ = ["capture_queries"]


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
