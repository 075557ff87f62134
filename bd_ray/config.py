"""Typed configuration for every bd-ray job and deployment.

YAML in, validated pydantic models out. Every model forbids unknown keys, so a typo is an error that
names the key, and every numeric field carries its limits, so an out-of-range value is an error
that names the field and the limit (pydantic's messages give the dotted location, e.g.
``train.lr``). CLI overrides use ``--set section.key=value`` with the value parsed as YAML
(``--set train.lr=1e-4``, ``--set sparse.budgets=[256,512]``), as Hydra/OmegaConf users expect.

Source of the defaults: the BudgetDraft recipe, ../shared/DESIGN.md section 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = [
    "ConfigError",
    "StrictModel",
    "SparsePolicyConfig",
    "SamplingConfig",
    "SpecConfig",
    "load_config",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the field and the limit."""


class StrictModel(BaseModel):
    """Base for all configs: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


PolicyName = Literal["chunk_topk", "streaming", "snapkv"]


class SparsePolicyConfig(StrictModel):
    """How the drafter's prefix KV is cut down to a budget of B positions per layer and KV head.

    ``chunk_topk`` is the BudgetDraft/TriForce rule (DESIGN.md section 2): chunks of
    ``chunk_size`` tokens scored by ``query_proxy . mean(keys in chunk)``; chunk 0 (the sink) and
    the last ``recent`` positions are always kept (``recent=0`` reproduces the paper, which also
    drops the trailing partial chunk). ``streaming`` is StreamingLLM: ``sink`` first positions plus
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
            raise ValueError(f"pool_kernel must be odd, got {v}")
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
                                               "stop speculating when it cannot pay (bd_ray.spec.adaptive)")
    adaptive_min_gain: float = Field(1.05, gt=0.0, le=10.0, description="speculate only when expected "
                                     "tokens/s beats plain decoding by this factor")


# --------------------------------------------------------------------------------------------
# Loading and overrides
# --------------------------------------------------------------------------------------------


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {loc}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: Sequence[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (value parsed as YAML) to a nested dict, in place.

    Raises:
        ConfigError: an override without ``=`` or with an empty key.
    """
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"override {item!r} has an empty key")
        _set_dotted(tree, key, yaml.safe_load(raw) if raw != "" else None)
    return tree


def load_config(model: type[BaseModel], path: str | Path | None = None,
                overrides: Sequence[str] | None = None,
                base: Mapping[str, Any] | None = None) -> Any:
    """Load ``model`` from a YAML file (optional), apply ``--set`` overrides, validate.

    Args:
        model: the pydantic config class (e.g. ``TrainJobConfig``).
        path: YAML file; ``None`` starts from ``base`` or the model's defaults.
        overrides: ``["train.lr=1e-4", ...]``.
        base: a dict merged under the file's content.

    Raises:
        ConfigError: unreadable YAML, a non-mapping document, unknown keys, wrong types or
            out-of-range values; the message names each offending field (dotted path).
    """
    tree: dict[str, Any] = dict(base or {})
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a mapping at the top level, got {type(loaded).__name__}")
        tree.update(loaded)
    apply_overrides(tree, overrides)
    try:
        return model.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
