#!/usr/bin/env python
r"""Evaluate drafters: the acceptance/speedup matrix on held-out books (bd_ray.evaluate).

Local (starts a private Ray instance; --set run.ray_address=auto joins a `ray start --head` cluster):
    python jobs/evaluate.py --config jobs/configs/eval_smoke.yaml [--set key=value ...] [--output DIR]

Against a running cluster (use an absolute output dir: the job's working dir is temporary; drafter
paths must be readable on every node):
    ray job submit --working-dir . -- python jobs/evaluate.py \
        --config jobs/configs/eval_reference.yaml --output /abs/path/results/reference

Parts of one matrix run apart (one context per process or machine, each with its own --output)
are joined by rerunning with --merge-journal DIR for each part: only what none measured is run.

Prints one line per measurement (with elapsed time and ETA), one line per completed cell, then the
best-gamma table and the output paths (results.json, results.md, PNG plots).

Exit status: 0 ok; 2 invalid config (the message names the field); 3 lossless check failed (greedy
SD tokens differ from AR; names each cell and prompt); 4 some measurement raised; 5 held-out
assertion failed (a prompt could come from a training work).
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job working dir

from bd_ray.cli import job_parser, load_job_config  # noqa: E402
from bd_ray.config.evaluate import ConfigError, load_eval_config  # noqa: E402


def main(argv=None) -> int:
    ap = job_parser(__doc__, "bd_ray.config.evaluate.EvalJobConfig", "matrix.gammas=[2,4]")
    ap.add_argument("--output", help="output directory (overrides run.output_dir)")
    ap.add_argument("--report-only", action="store_true",
                    help="measure nothing: write results.json/.md and plots from the journaled measurements "
                         "(a snapshot of a matrix still being measured)")
    ap.add_argument("--merge-journal", action="append", default=[], metavar="DIR",
                    help="output directory of a run of part of the same matrix (e.g. one context per "
                         "process); its measurements are merged into this run's journal and reused")
    args = ap.parse_args(argv)
    cfg, code = load_job_config(args, load_eval_config)
    if cfg is None:
        return code

    for d in args.merge_journal:
        if not os.path.isfile(os.path.join(d, "runs.journal.jsonl")):
            print(f"[bd-ray] --merge-journal {d}: no runs.journal.jsonl there", file=sys.stderr)
            return 2
    from bd_ray.evaluate import EvalItemError, HeldOutError, LosslessError, run_evaluation

    t0 = time.time()
    log = lambda s: print(s, flush=True)  # noqa: E731
    try:
        out = run_evaluation(cfg, log=log, output_dir=args.output, merge_journals=args.merge_journal,
                             report_only=args.report_only)
    except ConfigError as exc:
        print(f"[bd-ray] config error: {exc}", file=sys.stderr)
        return 2
    except LosslessError as exc:
        print(f"[bd-ray] LOSSLESS CHECK FAILED after {time.time() - t0:.0f}s: {exc}", file=sys.stderr, flush=True)
        return 3
    except EvalItemError as exc:
        print(f"[bd-ray] evaluation incomplete: {exc}", file=sys.stderr, flush=True)
        return 4
    except HeldOutError as exc:
        print(f"[bd-ray] held-out assertion failed: {exc}", file=sys.stderr, flush=True)
        return 5
    res, paths = out["results"], out["paths"]
    md = open(paths["markdown"]).read()
    best = md.split("## All cells")[0].split("## Best gamma")[1] if "## Best gamma" in md else md
    print("\n## Best gamma" + best.rstrip())
    if res.get("needle"):
        print("\n## Needle" + md.split("## Needle")[1].split("## Lossless")[0].rstrip())
    ll = res["lossless"]
    print(f"\n[bd-ray] lossless check: {ll['checked']} greedy runs equal to AR; "
          f"{len(res['cells'])} cells in {time.time() - t0:.0f}s")
    print(f"[bd-ray] results: {paths['json']}\n[bd-ray] table:   {paths['markdown']}")
    for p in paths["plots"]:
        print(f"[bd-ray] plot:    {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
