#!/usr/bin/env python
"""Fallback driver for the reference run: the same bd_ray.train.train_loop in ONE process, without
Ray or DeepSpeed (bd_ray.train.run_local + LocalEngine, the engine the golden/resume tests use),
on the same offline teacher targets. Used because on the overloaded shared 2-core box the Ray
Train + Ray Data path sat for minutes without scheduling its parquet read task (README).

    python results/reference_2k/train_local.py --config results/reference_2k/configs/budgetdraft.yaml

Outputs like jobs/train_drafter.py: run.output_dir/run.name/{metrics.json, curves.png, final/,
checkpoints/step_*} (rerunning resumes from the newest checkpoint).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bd_ray import models  # noqa: E402
from bd_ray.teacher_targets import read_manifest, read_target_rows  # noqa: E402
from bd_ray.train import load_models, run_local  # noqa: E402
from bd_ray.config.train import load_train_config  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    a = ap.parse_args()
    cfg = load_train_config(a.config, a.overrides)
    torch.set_num_threads(cfg.run.threads_per_worker)
    torch.manual_seed(cfg.optim.seed)
    assert cfg.teacher.mode == "offline", "this driver trains from offline targets only"
    man = read_manifest(cfg.teacher.targets_path)
    assert (man["prefix_len"], man["continuation_len"]) == (cfg.data.prefix_len, cfg.data.continuation_len)
    rows = read_target_rows(cfg.teacher.targets_path, "train")
    rng = np.random.default_rng(cfg.data.shuffle_seed)
    rows = [rows[i] for i in rng.permutation(len(rows))]  # seeded order (repeated each epoch)
    evals = read_target_rows(cfg.teacher.targets_path, "eval", limit=cfg.data.eval_windows)
    vpath = str(models.resolve_model_path(cfg.models.verifier))
    teacher, drafter = load_models(cfg, vpath)
    del teacher  # every target is precomputed
    t0 = time.time()
    s = run_local(cfg, rows, None, drafter, eval_windows=[r["input_ids"].astype(np.int64) for r in evals],
                  eval_targets=[r["argmax"] for r in evals], tokenizer_path=vpath,
                  log=lambda m: print(m, flush=True))
    print(f"[bd-ray] {cfg.run.name}: {s['step']} steps in {time.time() - t0:.0f}s; export {s.get('export_path')}",
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
