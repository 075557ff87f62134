"""Decoding configs shared by the engine, training views, evaluation and Serve: the sparse policy,
sampling parameters and speculative decoding (γ, KV budget).

Source of the defaults: the BudgetDraft recipe, docs/DESIGN.md section 2; sampling follows vLLM.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from bd_ray.config.base import StrictModel

__all__ = ["PolicyName", "SparsePolicyConfig", "SamplingConfig", "SpecConfig"]


PolicyName = Literal["chunk_topk", "streaming", "snapkv"]


class SparsePolicyConfig(StrictModel):
    """How the drafter's prefix KV is cut down to a budget of B positions per layer and KV head.

    ``chunk_topk`` is the BudgetDraft/TriForce rule (docs/DESIGN.md section 2): chunks of
    ``chunk_size`` tokens scored by ``query_proxy . mean(keys in chunk)``; chunk 0 (the sink) and
    the last ``recent`` positions are always kept. ``recent=0`` reproduces the paper only when the
    prefix length and the budget B are both multiples of ``chunk_size``: otherwise bd-ray also keeps
    the trailing partial chunk, which the paper drops (bd_ray/sparse.py). ``streaming`` is StreamingLLM: ``sink`` first positions plus
    the most recent ``B - sink``. ``snapkv`` is SnapKV: the last ``window`` queries' attention,
    max-pooled over ``pool_kernel`` positions, top-B per KV head (sink and window always kept).
    """

    name: PolicyName = "chunk_topk"
    chunk_size: int = Field(8, ge=1, le=1024, description="tokens per chunk (chunk_topk)")
    sink: int = Field(4, ge=0, le=4096, description="first positions always kept (streaming, snapkv)")
    recent: int = Field(32, ge=0, le=65536, description="most recent prefix positions always kept (chunk_topk)")
    query_proxy: Literal["last_key", "last_query"] = "last_key"
    window: int = Field(32, ge=1, le=4096, description="observation window of last queries (snapkv)")
    pool_kernel: int = Field(7, ge=1, le=255, description="max-pool width over scores (snapkv), odd")

    @field_validator("pool_kernel")
    @classmethod
    def _odd_kernel(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd")
        return v


class SamplingConfig(StrictModel):
    """Decoding parameters applied identically to the drafter's q and the verifier's p (vLLM semantics).

    ``temperature == 0`` is greedy. ``top_k == 0`` and ``top_p == 1`` disable those filters.
    """

    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(128, ge=1, le=1_000_000)
    seed: int | None = Field(None, ge=0)
    eos_token_ids: list[int] | None = None
    stop: list[str] = Field(default_factory=list)

    @field_validator("temperature", "top_p")
    @classmethod
    def _finite(cls, v: float) -> float:
        if v != v or v in (float("inf"), float("-inf")):
            raise ValueError("must be a finite number")
        return v


class SpecConfig(StrictModel):
    """Speculative decoding: draft length γ and the drafter's KV budget B (``None`` = full cache)."""

    gamma: int = Field(4, ge=1, le=128, description="tokens drafted per cycle")
    budget: int | None = Field(256, ge=1, description="drafter KV budget in tokens; null = full cache")
    policy: SparsePolicyConfig = Field(default_factory=SparsePolicyConfig)
    prefill_chunk: int = Field(512, ge=1, le=1 << 20, description="tokens per prefill forward")
    adaptive: bool = Field(False, description="choose γ per cycle (up to gamma) by measured tokens/s and "
                                               "stop speculating when it cannot pay (bd_ray.speculative.adaptive)")
    adaptive_min_gain: float = Field(1.05, gt=0.0, le=10.0, description="speculate only when expected "
                                     "tokens/s beats plain decoding by this factor")
