#!/usr/bin/env python
r"""Train a BudgetDraft drafter: on Ray (Ray Data windows -> Ray Train + DeepSpeed workers; the
default, `run.executor=ray`) or in this process on offline teacher targets (`run.executor=local`).

Local (starts a Ray instance when none is running, or joins one started with `ray start --head`):
    python jobs/train_drafter.py --config jobs/configs/pg_mini_2k.yaml [--set optim.max_steps=200]

Without Ray (offline targets from jobs/teacher_targets.py; checkpoints under checkpoints/step_*):
    python jobs/train_drafter.py --config results/reference_2k/configs/budgetdraft.yaml --set run.executor=local

Against a running cluster (use an absolute run.output_dir: the job's working dir is temporary):
    ray job submit --working-dir . -- python jobs/train_drafter.py \
        --config jobs/configs/pg_mini_2k.yaml --set run.output_dir=/abs/path/runs

Ablations: --set loss.full_cache_only=true (naive, L_A only) | --set loss.fixed_budget=256 |
--set loss.lambda=1.0. Outputs under run.output_dir/run.name: metrics.json, curves.png,
data_stats.json (Ray), final/ (HF save_pretrained drafter + tokenizer), ray/ or checkpoints/
(checkpoints; rerunning the same run.name resumes from the latest).

Exit status: 0 trained; 2 invalid config, models that do not fit together, or a missing path
(verifier, drafter, teacher.targets_path; one line naming it, found before Ray starts).
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job working dir

from bd_ray.cli import job_parser, load_job_config  # noqa: E402
from bd_ray.config.train import load_train_config  # noqa: E402


def main(argv=None) -> int:
    args = job_parser(__doc__, "bd_ray.config.train.TrainJobConfig", "optim.lr=1e-4").parse_args(argv)
    cfg, code = load_job_config(args, load_train_config)
    if cfg is None:
        return code
    from bd_ray.config import ConfigError
    from bd_ray.models import TokenizerMismatchError
    from bd_ray.train.compat import ModelCompatError
    from bd_ray.train.driver import run

    t0 = time.time()
    try:
        summary = run(cfg)
    except (TokenizerMismatchError, ModelCompatError) as exc:  # found in the driver, before training starts
        print(f"[bd-ray] error: the models do not fit together or the config: {exc}", file=sys.stderr)
        return 2
    except (ConfigError, FileNotFoundError) as exc:  # a bad path in the config, also found in the driver
        print(f"[bd-ray] error: {exc}", file=sys.stderr)
        return 2
    print(f"[bd-ray] training finished in {time.time() - t0:.0f}s; outputs in {summary['out_dir']}")
    if summary.get("data_stats"):
        for split, s in summary["data_stats"].items():
            print(f"[bd-ray] data {split}: {s['documents']} documents, {s['windows']} windows, ok {s['ok']}, "
                  f"too short {s['too_short']}, empty {s['empty']}, undecodable {s['undecodable']}, "
                  f"bad json {s['bad_json']}, unreadable shards {s.get('unreadable', 0)}")
    print(json.dumps({k: v for k, v in (summary.get("metrics") or {}).items()}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
