"""Drivers of a training run: :func:`run` dispatches on ``run.executor``.

* ``ray`` (default, :func:`run_ray`): Ray Data windows (or offline targets) + held-out windows,
  then a Ray Train ``TorchTrainer`` whose workers (bd_ray.train.worker) run DeepSpeed engines.
* ``local`` (:func:`run_offline_local`): the same :func:`bd_ray.train.loop.train_loop` in this
  process, without Ray or DeepSpeed, on offline teacher targets (jobs/teacher_targets.py output):
  :func:`run_local` with a plain-torch engine of identical semantics (also what the golden-numerics
  and resume tests call with their own windows and models).

Outputs under ``run.output_dir/run.name``: ``metrics.json``, ``curves.png``, ``final/`` (HF
drafter + tokenizer), and checkpoints (``ray/`` with Ray Train, ``checkpoints/step_*`` locally).

Checkpoint directory layout (every ``run.checkpoint_every`` steps and at the end)::

    state.json          step, world size, consumed windows, skipped count, restores, metrics history (rank 0)
    engine/...          DeepSpeed checkpoint (model, per-rank ZeRO optimizer partitions, scheduler)
    local_engine.pt     (instead of engine/ without DeepSpeed) model + optimizer + scheduler
    hf/                 the drafter as HF save_pretrained (safetensors) + tokenizer
    manifest.rankNNNNN.json   per rank, written last: size + SHA-256 of every file that rank wrote

Fault tolerance (bd_ray/checkpoints.py): a checkpoint is sealed by its manifests; a restore checks
them and falls back, with a warning, to the newest older intact checkpoint when the latest is
damaged. In Ray Train a dead worker makes the worker group restart (``run.max_failures``) from
the latest registered checkpoint; the windows are then replayed in the same order and split
(``preserve_order``) after skipping the ones already consumed, every rank restores its own ZeRO
optimizer partition, and the budget draws depend only on (seed, step, rank): a run resumed after a
crash or a stop, on one worker or several, ends with the same weights as an uninterrupted one. Model/tokenizer mismatches are found by
:func:`bd_ray.train.compat.check_models_compatible` in the driver, before any Ray worker starts.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch

from bd_ray import models
from bd_ray.checkpoints import select_local_checkpoint
from bd_ray.store import atomic_write_json, publish_dir
from bd_ray.config.train import TrainJobConfig
from bd_ray.data import build_window_dataset, eval_windows, offline_window_dataset
from bd_ray.device import dist_backend
from bd_ray.ray_connect import connect
from bd_ray.teacher import build_teacher
from bd_ray.teacher_targets import materialize_rows, read_target_rows
from bd_ray.train.compat import absolute_local_paths, check_models_compatible, check_offline_targets
from bd_ray.train.engines import build_drafter_engine, load_models
from bd_ray.train.loop import LoopContext, train_loop
from bd_ray.train.worker import train_loop_per_worker

__all__ = ["run", "run_ray", "run_offline_local", "run_local", "local_device"]


def run(cfg: TrainJobConfig, log: Callable[[str], None] = print) -> dict:
    """Train by ``run.executor``: ``ray`` -> :func:`run_ray`, ``local`` -> :func:`run_offline_local`.

    Returns the driver's summary (``out_dir``, ``metrics``: the last reported metrics, ...).
    Raises what the chosen driver raises (mismatches and missing paths before training starts).
    """
    if cfg.run.executor == "local":
        return run_offline_local(cfg, log=log)
    return run_ray(cfg, log=log)


def _driver_checks(cfg: TrainJobConfig) -> tuple[TrainJobConfig, str, dict | None]:
    """Everything checked without Ray, before any Ray process or model load: ``(cfg with absolute
    local paths, verifier path, offline targets manifest or None)``."""
    verifier_path = str(models.resolve_model_path(cfg.models.verifier))
    cfg = absolute_local_paths(cfg)
    check_models_compatible(cfg, verifier_path)
    man = check_offline_targets(cfg) if cfg.teacher.mode == "offline" else None
    return cfg, verifier_path, man


def _offline_held_out(cfg: TrainJobConfig) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Held-out windows and their teacher argmax from the ``eval`` split of ``teacher.targets_path``
    (the first ``data.eval_windows``; empty lists when the split was not written)."""
    rows = read_target_rows(cfg.teacher.targets_path, "eval", limit=cfg.data.eval_windows)
    return [r["input_ids"].astype(np.int64) for r in rows], [r["argmax"].astype(np.int64) for r in rows]


def local_device(cfg: TrainJobConfig) -> torch.device:
    """The device of a single-process run: CUDA with ``run.use_gpu``, else CPU.

    Raises:
        ValueError: ``run.use_gpu`` without a CUDA device (the message names the field).
    """
    if cfg.run.use_gpu:
        if not torch.cuda.is_available():
            raise ValueError("run.use_gpu: true, but torch sees no CUDA device here")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run_local(cfg: TrainJobConfig, windows: Iterable[dict] | Callable[[int], Iterator[dict]],
              teacher: torch.nn.Module | None, drafter: torch.nn.Module,
              eval_windows: list[np.ndarray] | None = None, out_dir: str | None = None,
              tokenizer_path: str | None = None, resume: bool | None = None,
              log: Callable[[str], None] = print, eval_targets: list | None = None,
              device: torch.device | str | None = None) -> dict:
    """Single process, no Ray, no DeepSpeed: :func:`train_loop` with :class:`~bd_ray.train.engines.LocalEngine`
    on ``device`` (None = :func:`local_device`): the drafter, the (dense) teacher, every window and
    target are moved there.

    Checkpoints go to ``out_dir/checkpoints/step_XXXXXXX`` (the newest ``run.keep_checkpoints``);
    with ``resume`` (default ``run.resume``) the newest intact one is loaded first. ``windows``: a
    list / iterable of rows (re-iterated per epoch when it is a list) or ``skip -> iterator``.
    ``teacher``: None when every row (an ``argmax`` column) and ``eval_targets`` are offline targets.

    Returns the loop's summary plus ``engine`` and ``metrics`` (the last reported metrics).
    """
    out_dir = out_dir or os.path.join(cfg.run.output_dir, cfg.run.name)
    ck_root = os.path.join(out_dir, "checkpoints")
    resume = cfg.run.resume if resume is None else resume
    device = local_device(cfg) if device is None else torch.device(device)
    engine = build_drafter_engine(cfg, drafter, distributed=False, device=device)
    if teacher is not None:
        teacher, _ = build_teacher(cfg, teacher, distributed=False, device=device)

    if callable(windows):
        make = windows
    else:
        rows = list(windows)

        def make(skip: int) -> Iterator[dict]:
            def gen():
                i = 0
                while True:
                    for r in rows:
                        if i >= skip:
                            yield r
                        i += 1
            return gen()

    reported: dict[str, Any] = {}

    def report(metrics: dict, d: str | None) -> None:
        reported.clear()
        reported.update(metrics)
        if d is None:
            return
        dest = os.path.join(ck_root, f"step_{metrics['step']:07d}")
        publish_dir(d, dest)  # copy to a temp sibling, fsync, rename: never half-written
        kept = sorted(x for x in os.listdir(ck_root) if x.startswith("step_") and ".tmp-" not in x)
        for old in kept[:-cfg.run.keep_checkpoints]:
            shutil.rmtree(os.path.join(ck_root, old), ignore_errors=True)

    ctx = LoopContext(rank=0, world=1, windows=make, eval_windows=list(eval_windows or []), report=report,
                      restore_dir=select_local_checkpoint(ck_root, log=log) if resume else None, out_dir=out_dir,
                      tokenizer_path=tokenizer_path, log=log, eval_targets=eval_targets, device=device)
    summary = train_loop(cfg, ctx, teacher, engine)
    summary["engine"] = engine
    summary["metrics"] = dict(reported)
    return summary


def run_offline_local(cfg: TrainJobConfig, log: Callable[[str], None] = print) -> dict:
    """``run.executor=local``: train in this process (no Ray, no DeepSpeed) on the offline teacher
    targets at ``teacher.targets_path``. The training rows are taken in a seeded order
    (``data.shuffle_seed``, the same order every epoch), read and converted to tensors on the run's
    device once (:func:`~bd_ray.teacher_targets.materialize_rows`: no re-reading or re-conversion per
    epoch); the held-out windows are the targets' ``eval`` split. Resumes from the newest intact
    ``checkpoints/step_*`` when ``run.resume``.

    Returns the :func:`run_local` summary plus ``out_dir``.

    Raises:
        bd_ray.models.TokenizerMismatchError, ModelCompatError: as :func:`run_ray`, before training.
        FileNotFoundError: no verifier, or ``teacher.targets_path`` is not a finished targets output.
        ValueError: ``teacher.mode`` is not offline (the config refuses that combination too).
    """
    if cfg.teacher.mode != "offline":
        raise ValueError("run.executor=local trains from offline targets only (teacher.mode=offline)")
    cfg, verifier_path, _ = _driver_checks(cfg)
    device = local_device(cfg)
    rows = read_target_rows(cfg.teacher.targets_path, "train")
    order = np.random.default_rng(cfg.data.shuffle_seed).permutation(len(rows))
    rows = materialize_rows([rows[i] for i in order], device)
    evals, eval_targets = _offline_held_out(cfg)
    teacher, drafter = load_models(cfg, verifier_path)  # on the CPU; run_local moves the drafter
    del teacher  # every target is precomputed
    out_dir = os.path.abspath(os.path.join(cfg.run.output_dir, cfg.run.name))
    log(f"[bd-ray] local executor: {len(rows)} training windows, {len(evals)} held-out windows")
    summary = run_local(cfg, rows, None, drafter, eval_windows=evals, eval_targets=eval_targets, out_dir=out_dir,
                        tokenizer_path=verifier_path, log=log, device=device)
    summary["out_dir"] = out_dir
    return summary


def run_ray(cfg: TrainJobConfig, log: Callable[[str], None] = print,
            eval_windows_override: list[np.ndarray] | None = None) -> dict:
    """Driver: Ray Data windows + held-out windows, then a Ray Train ``TorchTrainer`` (DeepSpeed; NCCL
    between GPU workers with ``run.use_gpu``, else gloo: :func:`bd_ray.device.dist_backend`).

    Resumes from the latest checkpoint of the run ``run.name`` under ``run.output_dir`` (Ray Train
    restores a run with the same name and storage path); ``run.resume=false`` starts a new run name.
    Returns a summary: output paths, data counts, the final metrics and the Ray Train result path.
    ``eval_windows_override``: precomputed held-out windows (skips the held-out Ray Data pass).

    A worker that dies is replaced and resumes from the latest intact checkpoint up to
    ``run.max_failures`` times (Ray Train ``FailureConfig``); ``metrics.json`` lists the restores.

    Raises:
        bd_ray.models.TokenizerMismatchError, ModelCompatError: teacher/drafter/config mismatch,
            found before Ray starts (:func:`~bd_ray.train.compat.check_models_compatible`; offline
            targets made for other window lengths than ``data``'s).
        FileNotFoundError: no verifier at ``models.verifier``, or ``teacher.targets_path`` is not
            a finished jobs/teacher_targets.py output; also found before Ray starts.
        ray.train.TrainingFailedError: a worker failed more than ``run.max_failures`` times.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # Everything that can be checked without Ray is checked here, in the driver, before any Ray
    # process starts: a mismatch is one clear error, not a crash inside a worker.
    cfg, verifier_path, man = _driver_checks(cfg)
    connect(cfg.run.ray_address, cfg.run.ray_num_cpus,
            {"OMP_NUM_THREADS": str(cfg.run.threads_per_worker), "TOKENIZERS_PARALLELISM": "false"})
    out_dir = os.path.abspath(os.path.join(cfg.run.output_dir, cfg.run.name))
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.time()
    if man is not None:
        train_ds, stats = offline_window_dataset(os.path.join(cfg.teacher.targets_path, "train"),
                                                 shuffle_seed=cfg.data.shuffle_seed), None
    else:
        train_ds, stats = build_window_dataset(cfg.data, verifier_path)
    eval_targets = None
    if eval_windows_override is not None:
        evals = [np.asarray(w, dtype=np.int64) for w in eval_windows_override]
    elif man is not None and man.get("eval_windows"):
        evals, eval_targets = _offline_held_out(cfg)
    else:
        evals = eval_windows(cfg.data, verifier_path, stats=stats) if cfg.data.eval_windows else []
    log(f"[bd-ray] {len(evals)} held-out windows ({time.time() - t0:.1f}s); workers: {cfg.run.num_workers}")
    name = cfg.run.name if cfg.run.resume else f"{cfg.run.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(mode="json", by_alias=True), "verifier_path": verifier_path,
                           "eval_windows": evals, "eval_targets": eval_targets, "out_dir": out_dir},
        torch_config=TorchConfig(backend=dist_backend("cuda" if cfg.run.use_gpu else "cpu")),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.run.num_workers, use_gpu=cfg.run.use_gpu,
                                               resources_per_worker=cfg.run.worker_resources()),
        run_config=ray.train.RunConfig(
            name=name, storage_path=os.path.join(out_dir, "ray"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.run.max_failures)),
        datasets={"train": train_ds},
        dataset_config=_ordered_data_config(),
    )
    result = trainer.fit()
    summary: dict[str, Any] = {"out_dir": out_dir, "ray_result_path": getattr(result, "path", None),
                               "checkpoint": getattr(result.checkpoint, "path", None) if result.checkpoint else None,
                               "metrics": result.metrics}
    if stats is not None:
        summary["data_stats"] = ray.get(stats.summary.remote())
        with open(os.path.join(out_dir, "data_stats.json"), "w") as f:
            json.dump(summary["data_stats"], f, indent=1)
        mpath = os.path.join(out_dir, "metrics.json")
        if os.path.exists(mpath):
            with open(mpath) as f:
                m = json.load(f)
            m["data_stats"] = summary["data_stats"]
            atomic_write_json(mpath, m, indent=1)
    return summary


def _ordered_data_config():
    """Ray Train ``DataConfig`` with Ray's default ingest options plus ``preserve_order``: windows
    reach each worker in the same order on every (re)start, so skipping the windows a checkpoint
    already consumed resumes exactly. With several workers the split is the same too: with
    ``preserve_order`` Ray's output splitter ignores locality and hands the ordered blocks, in
    order, to the worker with the fewest rows so far (tests/test_faults_train.py checks a
    2-worker resume)."""
    import ray.train

    opts = ray.train.DataConfig.default_ingest_options()
    opts.preserve_order = True
    return ray.train.DataConfig(execution_options=opts)
