"""The models a run starts from (:func:`load_models`) and the drafter's optimizer engines: AdamW,
the warm-up + cosine lr schedule, a local engine and a DeepSpeed ZeRO-0/1/2 engine with the same
interface (``backward``, ``step``, ``get_lr``, ``save``, ``load``, ``module``, ``global_steps``,
``last_grad_norm``, ``device``, ``precision``, ``autocast``).

Mixed precision (``optim.precision``, bd_ray.device): the local engine keeps the drafter's weights
and AdamW state in fp32 and runs forwards under ``torch.autocast`` (bf16, or fp16 with a
``GradScaler``), so an update far below bf16's resolution (lr 1e-5 on weights near 1) still lands in
the fp32 master copy; DeepSpeed does the same through its own ``bf16`` / ``fp16`` sections (bf16
module, fp32 optimizer partitions; dynamic loss scaling for fp16).

Source: docs/DESIGN.md section 2 (optimizer and schedule), section 5 (DeepSpeed on CPU/gloo).
"""

from __future__ import annotations

import contextlib
import math
import os

import torch

from bd_ray import models
from bd_ray.config.train import TrainJobConfig
from bd_ray.device import as_device, autocast, resolve_precision

__all__ = ["ENGINE_TAG", "load_models", "lr_factor", "make_optimizer", "LocalEngine", "DeepSpeedDrafterEngine",
           "build_drafter_engine", "disable_deepspeed_shm_op", "freeze_embedding"]

ENGINE_TAG = "engine"


def lr_factor(step: int, warmup: int, max_steps: int, min_ratio: float = 0.0) -> float:
    """LR multiplier used by optimizer step ``step`` (0-based): linear warm-up over ``warmup``
    steps (``(step+1)/warmup``), then cosine from 1 to ``min_ratio`` at ``max_steps``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, max_steps - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(cfg: TrainJobConfig, model: torch.nn.Module):
    """``(AdamW over the trainable parameters, LambdaLR of :func:`lr_factor`)`` from ``cfg.optim``."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, o.warmup_steps, o.max_steps, o.min_lr_ratio))
    return opt, sched



class LocalEngine:
    """Single-process engine with DeepSpeed's semantics: ``backward`` scales by ``1/grad_accum``,
    ``step`` updates (clip, AdamW, scheduler) only at accumulation boundaries.

    The drafter is moved to ``device`` in fp32 (the master weights; AdamW's state follows them);
    forwards run under :meth:`autocast` in the resolved ``optim.precision``. fp16 scales the loss
    (``torch.amp.GradScaler``): gradients are unscaled before clipping, and a step whose gradients
    overflowed is skipped by the scaler (the schedule still advances, as DeepSpeed's does).
    """

    def __init__(self, cfg: TrainJobConfig, model: torch.nn.Module, device: torch.device | str | None = None):
        self.device = as_device(device)
        self.precision = resolve_precision(cfg.optim.precision, self.device, "optim.precision")
        self.module = model.to(device=self.device, dtype=torch.float32)
        self.optimizer, self.scheduler = make_optimizer(cfg, model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.accum = cfg.optim.grad_accum
        self.clip = cfg.optim.grad_clip
        self.micro_steps = 0
        self.global_steps = 0
        self.last_grad_norm: float | None = None

    def autocast(self):
        """Context for the drafter's forwards: autocast in this engine's precision (no-op in fp32)."""
        return autocast(self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        if self.scaler.is_enabled():
            self.scaler.scale(loss / self.accum).backward()
        else:
            (loss / self.accum).backward()

    def step(self) -> None:
        self.micro_steps += 1
        if self.micro_steps % self.accum:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        if self.clip > 0:
            self.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.clip))
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def get_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def save(self, d: str) -> None:
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "micro_steps": self.micro_steps,
                 "global_steps": self.global_steps}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        torch.save(state, os.path.join(d, "local_engine.pt"))

    def load(self, d: str) -> None:
        state = torch.load(os.path.join(d, "local_engine.pt"), map_location=self.device, weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        self.micro_steps, self.global_steps = state["micro_steps"], state["global_steps"]


class DeepSpeedDrafterEngine:
    """The drafter's DeepSpeed engine (ZeRO-0/1/2) with a torch AdamW client optimizer and LambdaLR
    warm-up + cosine (no compiled DeepSpeed ops). Same interface as :class:`LocalEngine`.

    Precision as DeepSpeed does it: ``bf16`` = the module in bf16 with fp32 master partitions in the
    ZeRO optimizer; ``fp16`` = the same with dynamic loss scaling. DeepSpeed places the module on
    its accelerator's current device (CUDA: the worker's GPU, set by Ray Train), which must be ``device``.
    """

    def __init__(self, cfg: TrainJobConfig, model: torch.nn.Module, device: torch.device | str | None = None):
        import deepspeed

        ds = cfg.deepspeed
        self.device = as_device(device)
        self.precision = resolve_precision(cfg.optim.precision, self.device, "optim.precision")
        model.to(self.device)
        opt, sched = make_optimizer(cfg, model)
        config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": ds.zero_stage, "overlap_comm": False, "contiguous_gradients": True,
                                  "reduce_bucket_size": ds.reduce_bucket_size,
                                  "allgather_bucket_size": ds.allgather_bucket_size},
            "bf16": {"enabled": self.precision == "bf16"},
            "fp16": {"enabled": self.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=config)
        self.module = self.engine.module

    def autocast(self):
        """No-op: DeepSpeed already runs the module in its precision."""
        return contextlib.nullcontext()

    @property
    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    @property
    def last_grad_norm(self) -> float | None:
        g = self.engine.get_global_grad_norm()
        return None if g is None else float(g)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def get_lr(self) -> float:
        return float(self.engine.get_lr()[0])

    def save(self, d: str) -> None:
        self.engine.save_checkpoint(d, tag=ENGINE_TAG, save_latest=True)

    def load(self, d: str) -> None:
        path, _ = self.engine.load_checkpoint(d, tag=ENGINE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint (tag {ENGINE_TAG!r}) under {d}")


def freeze_embedding(model: torch.nn.Module) -> int:
    """Take the drafter's input embedding out of training (``models.freeze_embedding``): no gradient,
    no optimizer state. A head tied to it (SmolLM2, Llama-style tie_word_embeddings) is the same
    parameter and is frozen with it; an untied head stays trainable. Returns the frozen elements."""
    w = model.get_input_embeddings().weight
    w.requires_grad_(False)
    return w.numel()


def build_drafter_engine(cfg: TrainJobConfig, model: torch.nn.Module, distributed: bool,
                         device: torch.device | str | None = None):
    """DeepSpeed engine when ``deepspeed.enabled`` and torch.distributed is up, else :class:`LocalEngine`;
    either places the drafter on ``device`` (None = CPU) with fp32 master weights and applies
    ``models.freeze_embedding`` before the optimizer is built.

    Raises:
        ValueError: ``optim.precision`` fp16 on a CPU device.
    """
    model.train()
    if cfg.models.freeze_embedding:
        freeze_embedding(model)
    if distributed and cfg.deepspeed.enabled:
        return DeepSpeedDrafterEngine(cfg, model, device)
    return LocalEngine(cfg, model, device)


def disable_deepspeed_shm_op() -> None:
    """Keep DeepSpeed from JIT-compiling its shared-memory comm op on CPU (a JIT build on every fresh
    machine, docs/DESIGN.md sec 5): gloo collectives are enough for these engines."""
    try:
        import deepspeed.comm.torch as ds_torch

        ds_torch.build_shm_op = lambda: None
    except Exception:  # a DeepSpeed without that hook has nothing to disable
        pass


def load_models(cfg: TrainJobConfig, verifier_path: str,
                device: torch.device | str | None = None) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Set this process's torch threads (``run.threads_per_worker``) and seed (``optim.seed``), then
    load (teacher, drafter) on ``device`` (None = CPU): the verifier in ``models.dtype`` (frozen: a
    lower dtype only saves memory), and the drafter in fp32 (master weights) from a path or from the
    verifier's first ``models.drafter_layers`` layers (``bd_ray.models.init_drafter_from_verifier``,
    copied from the fp32 checkpoint before the teacher is cast).

    Raises:
        bd_ray.models.TokenizerMismatchError: a drafter path whose tokenizer differs from the verifier's.
    """
    torch.set_num_threads(cfg.run.threads_per_worker)  # this process's (worker's) share of the CPUs
    torch.manual_seed(cfg.optim.seed)
    teacher, tok = models.load_verifier(verifier_path, dtype=torch.float32)
    if cfg.models.drafter:
        # draft_vocab=None: training needs the full head (a subset is applied by the loss instead)
        drafter, _ = models.load_drafter(cfg.models.drafter, tok, dtype=torch.float32, verifier=teacher,
                                         draft_vocab=None)
    else:
        drafter = models.init_drafter_from_verifier(teacher, cfg.models.drafter_layers)
    drafter.requires_grad_(True)
    dev = as_device(device)
    teacher = teacher.to(device=dev, dtype=getattr(torch, cfg.models.dtype))
    return teacher, drafter.to(dev)
