"""The Ray Train worker: one per data-parallel rank on its device (its GPU with ``run.use_gpu``, else
CPU), DeepSpeed engines over the device's backend (NCCL / gloo), the training loop fed by the
worker's Ray Data shard, checkpoints handed to ``ray.train.report``.

Source: docs/DESIGN.md section 5 (the stack). Started by :func:`bd_ray.train.driver.run_ray`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bd_ray.checkpoints import restorable_checkpoint_dir
from bd_ray.config.train import TrainJobConfig
from bd_ray.data import iter_rows
from bd_ray.device import dist_backend
from bd_ray.teacher import build_teacher, local_param_fraction, teacher_dense_max_abs_diff
from bd_ray.train.engines import build_drafter_engine, disable_deepspeed_shm_op, load_models
from bd_ray.train.loop import LoopContext, train_loop

__all__ = ["train_loop_per_worker"]


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point (one per worker). ``config``: ``cfg`` (TrainJobConfig dump),
    ``verifier_path``, ``eval_windows``, ``eval_targets`` (offline held-out argmax or None),
    ``out_dir``, ``data_stats`` (optional)."""
    import ray.train
    import ray.train.torch

    cfg = TrainJobConfig.model_validate(config["cfg"])
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device() if cfg.run.use_gpu else torch.device("cpu")
    distributed = world > 1 or torch.distributed.is_initialized()
    if distributed and cfg.deepspeed.enabled:
        import deepspeed

        disable_deepspeed_shm_op()
        deepspeed.init_distributed(dist_backend(device))
    teacher_model, drafter = load_models(cfg, config["verifier_path"], device)
    engine = build_drafter_engine(cfg, drafter, distributed, device)
    eval_targets = config.get("eval_targets")
    offline = cfg.teacher.mode == "offline" and (eval_targets is not None or not config["eval_windows"])
    if offline:  # every target is precomputed: no teacher in the workers (memory, no ZeRO-3 collectives)
        teacher, teacher_engine = None, None
        del teacher_model
    else:
        # ZeRO-3 over a single rank partitions nothing and only adds per-module gather hooks
        # (the held-out teacher forwards of the distillation run took over twice as long); one
        # worker keeps a dense teacher.
        teacher, teacher_engine = build_teacher(cfg, teacher_model, distributed and world > 1, device)
    extra: dict[str, Any] = {"world_size": world, "data_stats": config.get("data_stats"),
                             "teacher_mode": cfg.teacher.mode}
    if cfg.run.check_teacher_dense and teacher is not None:
        w = config["eval_windows"][0] if config["eval_windows"] else np.arange(cfg.data.window_len) % 7
        extra["teacher_dense_max_abs_diff"] = teacher_dense_max_abs_diff(teacher, config["verifier_path"], w,
                                                                         cfg.data.prefix_len, device)
        if teacher_engine is not None:
            extra["teacher_param_fraction_local"] = local_param_fraction(teacher)

    shard = ray.train.get_dataset_shard("train")
    ckpt = ray.train.get_checkpoint()

    def report(metrics: dict, d: str | None) -> None:
        if d is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def run(restore_dir):
        ctx = LoopContext(rank=rank, world=world, windows=lambda skip: iter_rows(shard, skip=skip),
                          eval_windows=list(config["eval_windows"]), report=report, restore_dir=restore_dir,
                          out_dir=config["out_dir"], tokenizer_path=config["verifier_path"], extra=extra,
                          eval_targets=eval_targets, device=device)
        return train_loop(cfg, ctx, teacher, engine)

    if ckpt is not None:
        # The latest registered checkpoint, verified against its manifests; a damaged one is
        # replaced (with a warning) by the newest older intact checkpoint of the same run.
        with restorable_checkpoint_dir(ckpt, log=print) as d:
            # as_directory may hand out a temp copy; the loop reads everything it needs at its start
            summary = run(d)
    else:
        summary = run(None)
    if rank == 0:
        print(f"[bd-ray] worker 0 done: step {summary['step']}, skipped {summary['skipped']}", flush=True)
