#!/usr/bin/env python
r"""Offline teacher targets: run the frozen teacher once over the training windows (Ray Data batch
inference, an actor pool holding the teacher) and write parquet shards that training reads with
``teacher.mode: offline`` (bd_ray/teacher_targets.py describes the layout).

    python jobs/teacher_targets.py --config jobs/configs/pg_mini_2k_targets.yaml [--set max_windows=32]
    python jobs/train_drafter.py --config jobs/configs/pg_mini_2k.yaml \
        --set teacher.mode=offline --set teacher.targets_path=runs/targets/pg_mini_2k

The output directory appears only when complete (written under <path>.tmp-*, then renamed);
an existing output is kept unless --overwrite.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job working dir

from bd_ray.cli import job_parser, load_job_config  # noqa: E402
from bd_ray.config.train import TeacherTargetsJobConfig, load_train_config  # noqa: E402


def main(argv=None) -> int:
    ap = job_parser(__doc__, "bd_ray.config.train.TeacherTargetsJobConfig", "max_windows=64")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = ap.parse_args(argv)
    cfg, code = load_job_config(args, lambda path, ov: load_train_config(path, ov, model=TeacherTargetsJobConfig))
    if cfg is None:
        return code
    from bd_ray.teacher_targets import write_teacher_targets

    try:
        m = write_teacher_targets(cfg, overwrite=args.overwrite)
    except FileExistsError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(json.dumps({k: v for k, v in m.items() if k not in ("config",)}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
