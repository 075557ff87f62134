"""Typed configuration of the evaluation matrix (``jobs/evaluate.py``, :mod:`bd_ray.evaluate`).

The matrix is the cross product ``contexts x policies x budgets x gammas x drafters x modes``,
each cell measured on ``data.prompts_per_context`` held-out prompts of exactly ``context`` tokens
with ``matrix.max_new_tokens`` new tokens, next to plain decoding (AR) on the same prompts.

Every section forbids unknown keys and bounds its numbers, so a typo or an out-of-range value is a
:class:`bd_ray.config.ConfigError` naming the dotted field (``matrix.budgets.1``, ``run.num_workers``).
Load with :func:`load_eval_config` (YAML + ``--set section.key=value`` overrides, values parsed as
YAML: ``--set matrix.budgets=[128,full]``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Sequence

from pydantic import Field, field_validator, model_validator

from bd_ray.config import (FULL_BUDGET, Budget, ConfigError, FieldError, SamplingConfig, SparsePolicyConfig, StrictModel,
                           budget_tokens, load_config)
from bd_ray.sparse import min_budget

__all__ = [
    "EvalModelsConfig",
    "EvalDataConfig",
    "DecodeMode",
    "MatrixConfig",
    "NeedleConfig",
    "EvalRunConfig",
    "ReportConfig",
    "EvalJobConfig",
    "load_eval_config",
    "budget_label",
    "ConfigError",
]

def budget_label(budget: int | None) -> str:
    """The label of an engine-spelled budget in results: ``None`` (full drafter cache) ->
    ``"full"`` (:data:`bd_ray.config.FULL_BUDGET`), an int -> its decimal string."""
    return FULL_BUDGET if budget is None else str(int(budget))


class EvalModelsConfig(StrictModel):
    """The verifier and the drafters to compare.

    ``verifier``: a registered embedded name (default ``smollm2-135m``) or a local HF checkpoint dir.
    ``drafters``: display name -> a local HF checkpoint directory (e.g. ``runs/<name>/final`` from
    ``jobs/train_drafter.py``), a shipped drafter name (``drafters/README.md``) or ``from-verifier:N``
    (the untrained init: the verifier's first N layers). On a multi-node cluster, paths must be readable on every node (shared filesystem).
    ``dtype``: parameter dtype of both models. ``device``: ``auto`` = CUDA when the worker has a GPU,
    else CPU.
    """

    verifier: str = "smollm2-135m"
    drafters: dict[str, str] = Field(default_factory=lambda: {"init4": "from-verifier:4"})
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("drafters")
    @classmethod
    def _non_empty(cls, v: dict[str, str]) -> dict[str, str]:
        if not v:
            raise ValueError("at least one drafter is needed (name: path or from-verifier:N)")
        for name, src in v.items():
            if not name or any(c in name for c in " /\\|"):
                raise ValueError(f"drafter name {name!r} must be non-empty without spaces, slashes or '|'")
            if not str(src).strip():
                raise ValueError(f"drafter {name!r} has an empty path")
        return v


class EvalDataConfig(StrictModel):
    """Where the held-out prompts come from.

    ``corpus``: the embedded ``pg-mini`` (``bd_ray.assets.ensure_corpus``) or a parquet file/directory
    with the pg-mini columns (at least ``doc_id``, ``work_id``, ``split``, ``text``). Only rows with
    ``split == "test"`` are ever used, and a test work that also appears in the train split is an
    error (the held-out assertion of :func:`bd_ray.evaluate.prompts.select_prompts`).
    ``prompts_per_context``: N prompts per context length (every cell of that context uses the same N).
    ``seed``: picks works, documents and window offsets deterministically.
    """

    corpus: str = "pg-mini"
    prompts_per_context: int = Field(2, ge=1, le=10_000)
    seed: int = Field(1234, ge=0)


def _check_gammas(v: list[int], field: str) -> list[int]:
    """Non-empty, unique, each within 1..128 (raises ``ValueError`` naming ``field``)."""
    if not v:
        raise ValueError(f"{field}: at least one gamma is needed")
    for g in v:
        if not 1 <= g <= 128:
            raise ValueError(f"{field} must be within 1..128, got {g}")
    if len(set(v)) != len(v):
        raise ValueError(f"{field}: duplicate gammas in {v}")
    return v


class DecodeMode(StrictModel):
    """One decoding mode: ``temperature == 0`` is greedy (the lossless check applies), else sampling.

    ``seed`` seeds the sampler of every request in this mode (AR and SD each draw their own stream,
    so sampled AR and SD outputs differ token-wise; they follow the same distribution).
    ``adaptive``: the cell's γ caps a per-cycle choice and speculation stops when it cannot pay
    (:mod:`bd_ray.speculative.adaptive`); off = every cycle drafts exactly γ (the paper's protocol).
    ``gammas``: the γ values (caps, for adaptive modes) run in this mode instead of
    ``matrix.gammas``, e.g. an adaptive mode run only at the largest cap.
    """

    name: str = "greedy"
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    seed: int = Field(0, ge=0)
    adaptive: bool = False
    gammas: list[int] | None = None

    @field_validator("gammas")
    @classmethod
    def _gammas(cls, v: list[int] | None) -> list[int] | None:
        return None if v is None else _check_gammas(v, "modes[].gammas")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def sampling(self, max_new_tokens: int, eos: list[int] | None = None) -> SamplingConfig:
        """The :class:`SamplingConfig` of this mode. ``eos=[]`` disables EOS so every request
        decodes exactly ``max_new_tokens`` tokens (equal work per cell; the default in the matrix)."""
        return SamplingConfig(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              max_new_tokens=max_new_tokens, seed=self.seed, eos_token_ids=eos)


class MatrixConfig(StrictModel):
    """The axes of the matrix.

    ``contexts``: prompt lengths in tokens (2048 = "2K"); each prompt is a window of exactly that
    many tokens of one held-out book. ``policies``: label -> sparse policy
    (:class:`bd_ray.config.SparsePolicyConfig`). ``budgets``: drafter KV budgets in tokens, or
    ``full`` (no sparsity; run once, not once per policy). ``gammas``: tokens drafted per cycle.
    ``modes``: decoding modes. ``max_new_tokens``: M tokens generated per request. ``ignore_eos``:
    decode exactly M tokens (EOS not honoured) so every cell does the same work.
    """

    contexts: list[int] = Field(default_factory=lambda: [2048])
    policies: dict[str, SparsePolicyConfig] = Field(
        default_factory=lambda: {"chunk_topk": SparsePolicyConfig(name="chunk_topk", chunk_size=8, recent=64)})
    budgets: list[Budget] = Field(default_factory=lambda: [128, FULL_BUDGET])
    gammas: list[int] = Field(default_factory=lambda: [2, 4])
    modes: list[DecodeMode] = Field(default_factory=lambda: [DecodeMode()])
    max_new_tokens: int = Field(32, ge=1, le=1_000_000)
    ignore_eos: bool = True
    prefill_chunk: int = Field(512, ge=1, le=1 << 20, description="prompt tokens per prefill forward")

    @field_validator("contexts")
    @classmethod
    def _contexts(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("at least one context length is needed")
        for c in v:
            if c < 2:
                raise ValueError(f"context lengths must be >= 2 tokens, got {c}")
        if len(set(v)) != len(v):
            raise ValueError(f"duplicate context lengths in {v}")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list) -> list:
        if not v:
            raise ValueError("at least one budget is needed (an int or 'full')")
        if len(set(map(str, v))) != len(v):
            raise ValueError(f"duplicate budgets in {v}")
        return v

    @field_validator("gammas")
    @classmethod
    def _gammas(cls, v: list[int]) -> list[int]:
        return _check_gammas(v, "matrix.gammas")

    @field_validator("policies")
    @classmethod
    def _policies(cls, v: dict) -> dict:
        if not v:
            raise ValueError("at least one sparse policy is needed")
        for label in v:
            if not label or any(c in label for c in " /\\|") or label == "none":
                raise ValueError(f"policy label {label!r} must be non-empty, not 'none', without spaces, slashes or '|'")
        return v

    @field_validator("modes")
    @classmethod
    def _modes(cls, v: list[DecodeMode]) -> list[DecodeMode]:
        if not v:
            raise ValueError("at least one decoding mode is needed")
        names = [m.name for m in v]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate mode names in {names}")
        return v

    def int_budgets(self) -> list[int | None]:
        """Budgets with ``full`` as ``None``, in config order."""
        return [budget_tokens(b) for b in self.budgets]


class NeedleConfig(StrictModel):
    """Passkey retrieval: a sentence with a random ``digits``-digit number planted at ``depth``
    (fraction of the window, 0 = start) of one held-out window per context, then a question; AR and
    SD (every drafter and budget, greedy, ``gamma``) decode ``max_new_tokens`` tokens.
    Reported: whether each output contains the passkey, the drafter's acceptance on the needle
    prompt vs. its acceptance on the ordinary prompts, and the fraction of the needle's positions the
    sparse policy kept in the drafter cache (mean over layers and KV heads).
    """

    enabled: bool = False
    depth: float = Field(0.25, ge=0.0, le=0.95)
    digits: int = Field(5, ge=1, le=12)
    gamma: int | None = Field(None, ge=1, le=128, description="null = the smallest gamma of the matrix")
    max_new_tokens: int = Field(16, ge=1, le=4096)
    seed: int = Field(7, ge=0)


class EvalRunConfig(StrictModel):
    """How the matrix runs on Ray, and where outputs go.

    ``executor``: ``ray`` (default: one worker actor per node, see :mod:`bd_ray.evaluate.driver`) or
    ``local`` (in this process, sequentially; debugging and tests).
    ``ray_address``: ``null`` = the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``), else a new
    private instance; ``auto`` = a running local cluster (``ray start --head``); ``local`` = always a
    private one; or ``host:port`` (the rule of every bd-ray job: :mod:`bd_ray.ray_connect`).
    ``ray_num_cpus``: logical CPUs when starting a local instance (``null`` = all cores).
    ``num_workers``: worker actors; ``auto`` = one per alive node (capped by the number of prompts).
    ``worker_cpus``: CPUs each worker reserves; ``node`` = all CPUs of the node it is placed on, so
    no two measurements ever share a node (timings do not disturb each other).
    ``worker_gpus``: GPUs each worker reserves (1 on GPU clusters; 0 = CPU).
    ``torch_threads``: intra-op threads in a worker; ``null`` = the CPUs it reserved.
    ``output_dir``: where results.json, results.md and the plots go (use an absolute path under
    ``ray job submit``: the job's working directory is temporary).
    ``item_timeout_s``: give up on the matrix when no measurement finished for this long.
    ``resume``: every finished measurement is appended to ``output_dir/runs.journal.jsonl``
    (fsynced); a rerun skips those and measures only the rest, so an interrupted run continues
    where it stopped, and a matrix grown by more prompts, contexts, budgets, gammas or modes
    measures only what is new (other changes start afresh).
    """

    executor: Literal["ray", "local"] = "ray"
    ray_address: str | None = None
    ray_num_cpus: int | None = Field(None, ge=1)
    num_workers: int | Literal["auto"] = "auto"
    worker_cpus: float | Literal["node"] = "node"
    worker_gpus: float = Field(0.0, ge=0.0)
    torch_threads: int | None = Field(None, ge=1, le=1024)
    output_dir: str = "results/eval"
    item_timeout_s: float = Field(3600.0, gt=0.0)
    resume: bool = Field(True, description="reuse measurements journaled in output_dir/runs.journal.jsonl "
                                           "by an earlier run of the same matrix; false = measure all anew")

    @field_validator("num_workers")
    @classmethod
    def _workers(cls, v):
        if v != "auto" and int(v) < 1:
            raise ValueError(f"num_workers must be >= 1 or 'auto', got {v}")
        return v

    @field_validator("worker_cpus")
    @classmethod
    def _cpus(cls, v):
        if v != "node" and float(v) <= 0:
            raise ValueError(f"worker_cpus must be > 0 or 'node', got {v}")
        return v


class ReportConfig(StrictModel):
    """Tables, intervals and plots.

    ``alpha_gamma``: the gamma whose α the acceptance-vs-budget plot and the per-prompt table show
    (``null`` = the smallest gamma in the matrix), so drafters are compared at one gamma.
    ``bootstrap_resamples`` / ``bootstrap_seed`` / ``confidence``: the percentile bootstrap over
    prompts behind every interval (α, τ, speedup per cell; the paired differences), resampling
    prompts with replacement (:mod:`bd_ray.evaluate.aggregate`); a fixed seed makes the report
    reproducible. ``paired``: [drafter A, drafter B] pairs compared prompt by prompt (A - B) in
    every cell both ran; ``null`` = ``[[budgetdraft, naive]]`` when both drafters exist, else none.
    ``per_prompt_budgets``: the budgets of the per-prompt α table (``null`` = 256, else the
    smallest budget of the matrix, and ``full`` when in the matrix). ``outlier_sds``: a prompt's α
    is flagged when it lies more than this many robust SDs (1.4826 x MAD) from the median.
    """

    alpha_gamma: int | None = Field(None, ge=1, le=128)
    plots: bool = True
    bootstrap_resamples: int = Field(2000, ge=1, le=1_000_000)
    bootstrap_seed: int = Field(0, ge=0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    paired: list[tuple[str, str]] | None = None
    per_prompt_budgets: list[Budget] | None = None
    outlier_sds: float = Field(3.0, gt=0.0, le=1000.0)


class EvalJobConfig(StrictModel):
    """Top-level config of ``jobs/evaluate.py``."""

    models: EvalModelsConfig = Field(default_factory=EvalModelsConfig)
    data: EvalDataConfig = Field(default_factory=EvalDataConfig)
    matrix: MatrixConfig = Field(default_factory=MatrixConfig)
    needle: NeedleConfig = Field(default_factory=NeedleConfig)
    run: EvalRunConfig = Field(default_factory=EvalRunConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _cross(self) -> "EvalJobConfig":
        if self.report.alpha_gamma is not None and self.report.alpha_gamma not in self.matrix.gammas:
            raise FieldError("report.alpha_gamma", f"{self.report.alpha_gamma} is not one of matrix.gammas "
                                                   f"{self.matrix.gammas}")
        for i, (a, b) in enumerate(self.report.paired or []):
            for name in (a, b):
                if name not in self.models.drafters:
                    raise FieldError(f"report.paired.{i}", f"{name!r} is not a drafter of models.drafters "
                                                           f"{list(self.models.drafters)}")
            if a == b:
                raise FieldError(f"report.paired.{i}", f"a drafter compared with itself ({a!r})")
        budgets = [str(b) for b in self.matrix.budgets]
        for i, b in enumerate(self.report.per_prompt_budgets or []):
            if str(b) not in budgets:
                raise FieldError(f"report.per_prompt_budgets.{i}", f"{b} is not one of matrix.budgets {budgets}")
        for label, pol in self.matrix.policies.items():
            for ctx in self.matrix.contexts:
                need = min_budget(pol, ctx)
                for b in self.matrix.int_budgets():
                    if b is not None and b < need:
                        raise FieldError(
                            "matrix.budgets", f"budget {b} is below the minimum {need} of policy {label!r} "
                            f"({pol.name}) at context {ctx}; raise the budget or lower the policy's "
                            f"chunk_size/recent/sink/window")
        return self

    @property
    def needle_gamma(self) -> int:
        return self.needle.gamma if self.needle.gamma is not None else min(self.matrix.gammas)

    @property
    def alpha_gamma(self) -> int:
        return self.report.alpha_gamma if self.report.alpha_gamma is not None else min(self.matrix.gammas)


def load_eval_config(path: str | Path | None = None, overrides: Sequence[str] | None = None) -> EvalJobConfig:
    """Load :class:`EvalJobConfig` from YAML (optional) plus ``--set key=value`` overrides.

    Raises:
        ConfigError: unreadable YAML, unknown keys, wrong types, out-of-range values, or a budget
            below a policy's minimum; the message names each offending field.
    """
    return load_config(EvalJobConfig, path, overrides)
