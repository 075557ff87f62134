"""Decoding configs shared by the engine, training views, evaluation and Serve: the sparse policy,
sampling parameters and speculative decoding (γ, KV budget).

The KV budget has one type everywhere, :data:`Budget`: a positive token count or ``"full"`` (no
sparsity). Each edge parses it once with :func:`parse_budget` (config YAML through the pydantic
field, the HTTP request, the CLI ``--budget``) and checks it against the sparse policy's minimum
with :func:`check_budget`; the engine's own spelling (``None`` = full) is derived in one place,
:func:`budget_tokens`.

Source of the defaults: the BudgetDraft recipe, docs/DESIGN.md section 2; sampling follows vLLM.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, field_validator

from bd_ray.config.base import StrictModel

__all__ = ["PolicyName", "SparsePolicyConfig", "SamplingConfig", "SpecConfig", "ElasticBudgetConfig", "Budget",
           "FULL_BUDGET", "parse_budget", "check_budget", "budget_tokens"]


FULL_BUDGET = "full"


def parse_budget(value: Any) -> int | Literal["full"]:
    """A KV budget from a config value, a request field or a CLI string: a whole number of tokens
    >= 1, or ``"full"`` (any case). Strings of digits and whole floats (``256.0``, pydantic's lax
    int) are read as numbers; booleans and fractions are not budgets.

    Raises:
        ValueError: anything else; the message (``must be ...``) leaves the field's name and the
            value to the caller (pydantic's location and input, argparse's ``argument --budget:``).
    """
    if isinstance(value, str):
        text = value.strip()
        if text.lower() == FULL_BUDGET:
            return FULL_BUDGET
        try:
            value = int(text)
        except ValueError:
            raise ValueError("must be a whole number (or 'full')") from None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("must be a whole number (or 'full')")
    if value < 1:
        raise ValueError("must be >= 1 (or 'full')")
    return value


# The one KV-budget type: tokens (>= 1) or "full". As a pydantic field it is parsed by parse_budget.
Budget = Annotated[Union[int, Literal["full"]], BeforeValidator(parse_budget)]


def check_budget(budget: int | Literal["full"], minimum: int, policy: str, where: str) -> None:
    """Check a parsed budget against its sparse policy's minimum.

    Args:
        budget: a :data:`Budget` (``"full"`` always passes).
        minimum: the policy's smallest budget, from :func:`bd_ray.sparse.min_budget` (a known
            prompt length) or :func:`bd_ray.sparse.min_budget_any_length` (a default that must
            fit every prompt longer than it).
        policy: the policy's name, for the message.
        where: what the minimum is for, e.g. ``"for this 120-token prompt"``.

    Raises:
        ValueError: ``"<budget> is below the minimum <minimum> of policy <policy> <where>"``; the
            caller prefixes the field (``--budget``, ``kv_budget``, ``spec.budget``).
    """
    if budget != FULL_BUDGET and budget < minimum:
        raise ValueError(f"{budget} is below the minimum {minimum} of policy {policy} {where}")


def budget_tokens(budget: int | Literal["full"]) -> int | None:
    """The engine's spelling of a budget (``bd_ray.kvcache.compact_cache``): tokens, ``None`` = full."""
    return None if budget == FULL_BUDGET else budget


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
    """Speculative decoding: draft length γ and the drafter's KV budget B (``"full"`` = full cache).

    ``adaptive`` (the default in every entry point: Serve, ``python -m bd_ray.generate``, the Python
    API): γ is a cap, the speculation policy picks γ per step from measured costs and acceptance,
    0 (plain decoding) when speculation cannot pay (:mod:`bd_ray.speculative.batch_policy`,
    :mod:`bd_ray.speculative.adaptive`). ``adaptive: false`` is an explicit fixed γ: every step
    drafts exactly γ tokens (the paper's protocol, case 9's metrics).
    """

    gamma: int = Field(4, ge=1, le=128, description="tokens drafted per cycle")
    budget: Budget = Field(256, description="drafter KV budget in tokens, or 'full' (no sparsity)")
    policy: SparsePolicyConfig = Field(default_factory=SparsePolicyConfig)
    prefill_chunk: int = Field(512, ge=1, le=1 << 20, description="tokens per prefill forward")
    adaptive: bool = Field(True, description="the speculation policy chooses γ per step (up to gamma) by measured "
                                              "tokens/s, 0 when speculation cannot pay; false = a fixed γ")
    adaptive_min_gain: float = Field(1.05, gt=0.0, le=10.0, description="speculate only when expected "
                                     "tokens/s beats plain decoding by this factor")
    adaptive_cost_prior: Literal["measure", "constant"] = Field(
        "measure", description="cost ratios the speculation policy assumes before measuring a request: "
        "timed once on the engine's device (measure) or CPU constants (constant)")

    @field_validator("budget", mode="before")
    @classmethod
    def _null_is_full(cls, v: Any) -> Any:
        # YAML `budget: null` and engine callers passing the engine's spelling (None) mean "full"
        return FULL_BUDGET if v is None else v


class ElasticBudgetConfig(StrictModel):
    """Elastic draft budget: under KV-memory pressure, lower the drafter KV budget instead of queueing.

    When a waiting request would have to queue because both caches would no longer fit the
    engine's ``kv_cache_bytes``, the engine may lower the drafter KV budget of the rows whose
    drafter prefix is not compacted yet (the new row and rows still being prefilled) down to
    ``floor`` tokens (never below the sparse policy's minimum for the prompt,
    :func:`bd_ray.sparse.min_budget`) and admit it. Only a budget-robust drafter (BudgetDraft)
    keeps its acceptance across budgets; output stays lossless at any budget (exact verification).
    Each request reports the budget it ran at (``GenerationResult.budget``, Serve's
    ``spec_metrics.kv_budget``). Off by default until measured (``benchmarks/serve_load.py
    --elastic``).
    """

    enabled: bool = Field(False, description="lower new rows' drafter KV budget instead of queueing them")
    floor: int = Field(128, ge=1, description="the lowest drafter KV budget (tokens) a row may be lowered to")
