"""Offline teacher targets: run the frozen teacher once over the windows, write parquet shards.

Source: docs/DESIGN.md section 2 (teacher targets).

A Ray Data batch-inference job::

    windows (bd_ray.data.build_window_dataset: train split, seeded shuffle, first max_windows)
      -> map_batches(TeacherPredictor, actor pool; each actor holds one frozen teacher)
      -> write_parquet(<tmp>/train)   (<tmp> = .<out name>.tmp-* next to <out>)
    held-out windows (eval split, <= 2 per document, first data.eval_windows) -> same -> <tmp>/eval
    manifest.json (config, counts, timings) -> fsync, rename(<tmp>, <out>)

The rename is the commit point (``bd_ray.store.replace_dir``): ``<out>`` exists only once
every shard and the manifest are written and on disk, so a killed job leaves a ``.*.tmp-*``
directory and never a half-written ``<out>``; :func:`read_manifest` (used by training) also
refuses a directory without the manifest.

Each row: ``input_ids`` int32 ``[P+T]``, ``doc_id``, ``start``, ``argmax`` int32 ``[T]`` (the
teacher's full-cache greedy token at each continuation position) and, with ``top_k > 0``,
``topk_ids`` int32 ``[T*k]`` / ``topk_logprobs`` float32 ``[T*k]`` (row-major ``[T, k]``);
:func:`row_targets` reads a row back as :class:`bd_ray.losses.TeacherTargets`. The targets are
computed by the same :func:`bd_ray.teacher.compute_teacher_targets_batch` as online mode (chunked
no-grad prefill of the prefix, then the continuation in chunks), ``batch_size`` windows per forward,
so both modes give the same targets (tests/test_teacher_targets.py; batched == one at a time in fp32).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable

import numpy as np
import torch

from bd_ray import models
from bd_ray.store import atomic_write_json, replace_dir
from bd_ray.config.train import TeacherTargetsJobConfig
from bd_ray.data import build_window_dataset
from bd_ray.device import as_device, resolve_precision
from bd_ray.losses import TeacherTargets
from bd_ray.ray_connect import connect
from bd_ray.teacher import compute_teacher_targets_batch

__all__ = ["TeacherPredictor", "MANIFEST", "read_manifest", "read_target_rows", "row_targets",
           "materialize_rows", "write_teacher_targets"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class TeacherPredictor:
    """``map_batches`` callable class: one frozen teacher per actor, window rows -> rows + targets.

    A batch of windows (``batch_size`` of the job; all windows of a job have the same length) goes
    through the teacher as one batched forward (:func:`bd_ray.teacher.compute_teacher_targets_batch`).

    Args:
        verifier_path: the verifier checkpoint (= teacher).
        prefix_len: ``P``; windows are ``P + T`` tokens.
        top_k: store the top-k log-probs too (0 = argmax only).
        prefill_chunk, cont_chunk: as :func:`bd_ray.teacher.compute_teacher_targets_batch`.
        threads: torch intra-op threads of this actor.
        device: ``cuda`` for a GPU actor (``actor_num_gpus > 0``; Ray sets its visible device), else ``cpu``.
        precision: ``teacher.precision`` (fp32 | bf16 | fp16 | auto), resolved on ``device``.
    """

    def __init__(self, verifier_path: str, prefix_len: int, top_k: int = 0, prefill_chunk: int = 512,
                 cont_chunk: int = 64, threads: int = 1, device: str = "cpu", precision: str = "fp32"):
        torch.set_num_threads(threads)
        self.device = as_device(device)
        self.precision = resolve_precision(precision, self.device, "teacher.precision")
        self.model, _ = models.load_verifier(verifier_path, dtype=torch.float32)
        self.model = self.model.to(self.device).requires_grad_(False).eval()
        self.P, self.top_k = int(prefix_len), int(top_k)
        self.prefill_chunk, self.cont_chunk = int(prefill_chunk), int(cont_chunk)
        self.done = 0

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.time()
        ids = np.stack([np.asarray(w, dtype=np.int64) for w in batch["input_ids"]])
        tgts = compute_teacher_targets_batch(self.model, torch.from_numpy(ids), self.P, self.top_k,
                                             self.prefill_chunk, self.cont_chunk, precision=self.precision,
                                             device=self.device)
        self.done += len(tgts)
        print(f"[bd-ray] teacher windows {self.done - len(tgts) + 1}-{self.done}: {len(tgts)} x {ids.shape[1]} "
              f"tokens in {time.time() - t0:.1f}s ({self.precision}, {self.device})", flush=True)
        out = dict(batch)
        out["input_ids"] = ids.astype(np.int32)
        out["argmax"] = np.stack([t.argmax.numpy().astype(np.int32) for t in tgts])
        if self.top_k:
            out["topk_ids"] = np.stack([t.topk_ids.numpy().astype(np.int32).reshape(-1) for t in tgts])
            out["topk_logprobs"] = np.stack([t.topk_logprobs.numpy().astype(np.float32).reshape(-1) for t in tgts])
        return out


def read_manifest(path: str) -> dict:
    """The manifest of a finished targets directory.

    Raises:
        FileNotFoundError: ``path`` is missing or has no manifest (an unfinished or foreign directory).
    """
    m = os.path.join(path, MANIFEST)
    if not os.path.exists(m):
        raise FileNotFoundError(f"teacher.targets_path={path!r} is not a finished jobs/teacher_targets.py output "
                                f"(no {MANIFEST}); run jobs/teacher_targets.py first")
    with open(m) as f:
        return json.load(f)


def read_target_rows(path: str, split: str = "eval", limit: int | None = None) -> list[dict]:
    """Rows of one split of a targets directory as dicts of numpy arrays, in (doc_id, start) order
    (small splits only: the held-out set). ``[]`` when the split was not written."""
    import pyarrow.parquet as pq

    read_manifest(path)
    d = os.path.join(path, split)
    if not os.path.isdir(d):
        return []
    files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".parquet"))
    rows: list[dict] = []
    for f in files:
        rows += pq.read_table(f).to_pylist()
    rows.sort(key=lambda r: (str(r.get("doc_id")), int(r.get("start", 0))))
    rows = rows[:limit] if limit is not None else rows
    out = []
    for r in rows:
        r = dict(r)
        for c in ("input_ids", "argmax", "topk_ids", "topk_logprobs"):
            if c in r and r[c] is not None:
                r[c] = np.asarray(r[c]).reshape(-1)
        out.append(r)
    return out


def row_targets(row: dict, device: torch.device | str | None = None) -> TeacherTargets | None:
    """The teacher targets stored in one window row (the columns :class:`TeacherPredictor` writes:
    ``argmax`` ``[T]``, optional ``topk_ids`` / ``topk_logprobs`` ``[T*k]``; or the ``targets`` of a
    :func:`materialize_rows` row, as it is), or None when the row has no ``argmax`` column (online
    mode: the loop computes them). Read columns become tensors on ``device`` (None = CPU)."""
    if isinstance(row.get("targets"), TeacherTargets):
        return row["targets"]
    if "argmax" not in row:
        return None
    dev = as_device(device)
    t = TeacherTargets(argmax=torch.tensor(np.array(row["argmax"]), device=dev).long())
    if row.get("topk_ids") is not None and len(np.asarray(row["topk_ids"]).reshape(-1)):
        T = t.length
        t.topk_ids = torch.tensor(np.array(row["topk_ids"]), device=dev).long().view(T, -1)
        t.topk_logprobs = torch.tensor(np.array(row["topk_logprobs"]), device=dev).float().view(T, -1)
    return t


def materialize_rows(rows: list[dict], device: torch.device | str | None = None) -> list[dict]:
    """Target rows converted once to what the training loop consumes: ``input_ids`` as a long tensor
    ``[P+T]`` and ``targets`` (:class:`TeacherTargets`) on ``device``, so epochs over them neither
    re-read nor re-convert anything. Other columns are kept. Rows without targets keep only ids."""
    dev = as_device(device)
    out = []
    for r in rows:
        t = row_targets(r, dev)
        m = {k: v for k, v in r.items() if k not in ("argmax", "topk_ids", "topk_logprobs")}
        m["input_ids"] = torch.tensor(np.array(r["input_ids"]), device=dev).view(-1).long()
        if t is not None:
            m["targets"] = t
        out.append(m)
    return out


def _tag(batch: dict[str, np.ndarray], part: str) -> dict[str, np.ndarray]:
    batch = dict(batch)
    batch["part"] = np.array([part] * len(batch["input_ids"]), dtype=object)
    return batch


def _infer(ds, cfg: TeacherTargetsJobConfig, verifier_path: str):
    """``map_batches`` of :class:`TeacherPredictor`: ``batch_size`` windows per call, one teacher per
    actor, each actor on a GPU when ``actor_num_gpus > 0`` (Ray gives it a visible CUDA device)."""
    import ray.data

    gpu = cfg.actor_num_gpus > 0
    return ds.map_batches(
        TeacherPredictor,
        fn_constructor_kwargs={"verifier_path": verifier_path, "prefix_len": cfg.data.prefix_len,
                               "top_k": cfg.top_k, "prefill_chunk": cfg.prefill_chunk,
                               "cont_chunk": cfg.teacher.continuation_chunk, "threads": cfg.threads_per_actor,
                               "device": "cuda" if gpu else "cpu", "precision": cfg.teacher.precision},
        batch_size=cfg.batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_cpus=cfg.actor_num_cpus,
        **({"num_gpus": cfg.actor_num_gpus} if gpu else {}),
    )


def _count_rows(d: str) -> int:
    import pyarrow.parquet as pq

    if not os.path.isdir(d):
        return 0
    return sum(pq.ParquetFile(os.path.join(d, f)).metadata.num_rows for f in os.listdir(d) if f.endswith(".parquet"))


def write_teacher_targets(cfg: TeacherTargetsJobConfig, overwrite: bool = False,
                          log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the teacher over the train windows (and the held-out windows) and commit the parquet
    output at ``cfg.teacher.targets_path`` atomically. Needs a Ray cluster (``ray.init`` done or
    startable). Returns the manifest.

    Raises:
        FileExistsError: the output exists and ``overwrite`` is false.
        RuntimeError: no training window was produced (corpus too short for the window length).
    """
    import ray

    out = os.path.abspath(cfg.teacher.targets_path)
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to recompute)")
    connect(cfg.ray_address, cfg.ray_num_cpus,
            {"OMP_NUM_THREADS": str(cfg.threads_per_actor), "TOKENIZERS_PARALLELISM": "false"})
    verifier_path = str(models.resolve_model_path(cfg.models.verifier))
    t0 = time.time()
    done: dict[str, Any] = {}

    def build(tmp: str) -> None:
        # One tokenizer pool over both splits (windows of the whole corpus are small: materialised),
        # then one teacher pool over train (seeded shuffle, first max_windows) + held-out windows
        # (first eval_windows, at most 2 per document, like bd_ray.data.eval_windows).
        D = cfg.data
        wins, stats = build_window_dataset(D, verifier_path, split=[D.train_split, D.eval_split], shuffle=False)
        wins = wins.materialize()
        train = wins.filter(lambda r: r["split"] == D.train_split).random_shuffle(seed=D.shuffle_seed)
        if cfg.max_windows:
            train = train.limit(cfg.max_windows)
        two = 2 * (D.stride or D.window_len)
        held = wins.filter(lambda r: r["split"] == D.eval_split and r["start"] < two)
        parts = [train.map_batches(_tag, fn_kwargs={"part": "train"}, batch_format="numpy", num_cpus=0.1)]
        if D.eval_windows:
            held = held.limit(D.eval_windows)
            parts.append(held.map_batches(_tag, fn_kwargs={"part": "eval"}, batch_format="numpy", num_cpus=0.1))
        both = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        # small blocks, so every actor of the pool gets windows (a pool hands out whole blocks)
        both = both.repartition(min(max(1, (cfg.max_windows or 64) + D.eval_windows), 64 * cfg.num_actors))
        _infer(both, cfg, verifier_path).write_parquet(os.path.join(tmp, "_parts"), partition_cols=["part"])
        for part in ("train", "eval"):
            src = os.path.join(tmp, "_parts", f"part={part}")
            if os.path.isdir(src):
                os.rename(src, os.path.join(tmp, part))
        shutil.rmtree(os.path.join(tmp, "_parts"), ignore_errors=True)
        n_train, n_eval = _count_rows(os.path.join(tmp, "train")), _count_rows(os.path.join(tmp, "eval"))
        if n_train == 0:
            raise RuntimeError("no training window: no train-split document is at least "
                               f"{D.window_len} tokens long")
        wall = time.time() - t0
        done["manifest"] = {
            "format_version": FORMAT_VERSION, "verifier": cfg.models.verifier, "verifier_path": verifier_path,
            "prefix_len": cfg.data.prefix_len, "continuation_len": cfg.data.continuation_len,
            "top_k": cfg.top_k, "train_windows": n_train, "eval_windows": n_eval,
            "wall_s": round(wall, 1), "s_per_window": round(wall / max(1, n_train + n_eval), 2),
            "data_stats": ray.get(stats.summary.remote()), "config": cfg.model_dump(mode="json", by_alias=True),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        atomic_write_json(os.path.join(tmp, MANIFEST), done["manifest"], indent=1)

    # built next to <out>, fsynced, renamed over it (an existing output is replaced only now)
    replace_dir(out, build)
    manifest = done["manifest"]
    n_train, n_eval, wall = manifest["train_windows"], manifest["eval_windows"], manifest["wall_s"]
    log(f"[bd-ray] teacher targets committed to {out}: {n_train} train + {n_eval} held-out windows, {wall:.0f}s")
    return manifest
