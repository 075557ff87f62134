#!/usr/bin/env python
r"""Evaluate drafters: the acceptance/speedup matrix on held-out books (bd_ray.evaluate.driver).

Local (starts a private Ray instance; --set run.ray_address=auto joins a `ray start --head` cluster):
    python jobs/evaluate.py --config jobs/configs/eval_smoke.yaml [--set key=value ...] [--output DIR]

Against a running cluster (use an absolute output dir: the job's working dir is temporary; drafter
paths must be readable on every node):
    ray job submit --working-dir . -- python jobs/evaluate.py \
        --config jobs/configs/eval_reference.yaml --output /abs/path/results/reference

Parts of one matrix run apart (one context per process or machine, each with its own --output)
are joined by rerunning with --merge-journal DIR for each part: only what none measured is run.

Prints one line per measurement of this run (with elapsed time and ETA; journaled ones are only
counted), one line per cell completed in this run, then the
best-gamma table and the output paths (results.json, results.md, PNG plots).

Exit status: 0 ok; 2 invalid config (the message names the field); 3 lossless check failed (greedy
SD tokens differ from AR; names each cell and prompt); 4 some measurement raised; 5 held-out
assertion failed (a prompt could come from a training work).

Tools (each has its own --help):
    python jobs/evaluate.py journal drop --output DIR --prompts c4096-p4 [--adaptive | --fixed]
        [--unstamped] [--started-between START END]
                                  drop measurements from DIR's journal so the next run re-measures them
    python jobs/evaluate.py report table   --results results/reference/results.json
    python jobs/evaluate.py report summary --results results/reference/results.json
                                  the README table / headline figures of a finished matrix
    python jobs/evaluate.py report agreement --runs runs/reference_2k --out results/reference_2k
                                  held-out agreement table and curves of drafter training runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # ray job working dir

from bd_ray.cli import job_parser, load_job_config  # noqa: E402
from bd_ray.config.evaluate import ConfigError, load_eval_config  # noqa: E402


def journal_main(argv: list[str]) -> int:
    """``journal drop``: see :func:`bd_ray.evaluate.journal.drop_records`."""
    from bd_ray.evaluate.journal import drop_records

    ap = argparse.ArgumentParser(prog="jobs/evaluate.py journal", description="Edit an evaluation journal.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drop", description=drop_records.__doc__.split("\n\n")[0] + " (atomic rewrite; do not "
                       "run it on a journal a running evaluation appends to)")
    d.add_argument("--output", required=True, help="the run's output directory (holds runs.journal.jsonl)")
    d.add_argument("--prompts", nargs="+", required=True, help="prompt ids (c<context>-p<k>) whose measurements "
                   "may be dropped")
    kind = d.add_mutually_exclusive_group()
    kind.add_argument("--adaptive", action="store_true", help="only items of adaptive-γ modes (their AR included)")
    kind.add_argument("--fixed", action="store_true", help="only items of the other (fixed-γ) modes")
    d.add_argument("--unstamped", action="store_true", help="only records without started_at (measured "
                   "before the field existed)")
    d.add_argument("--started-between", nargs=2, metavar=("START", "END"),
                   help="only records whose started_at lies in [START, END] (ISO times, UTC)")
    args = ap.parse_args(argv)
    only = "adaptive" if args.adaptive else "fixed" if args.fixed else None
    try:
        dropped, kept = drop_records(args.output, args.prompts, only=only, unstamped=args.unstamped,
                                     started_between=args.started_between)
    except FileNotFoundError as exc:
        print(f"[bd-ray] journal drop: {exc}", file=sys.stderr)
        return 2
    print(f"{os.path.join(args.output, 'runs.journal.jsonl')}: dropped {dropped}, kept {kept}")
    return 0


def report_main(argv: list[str]) -> int:
    """``report table|summary|agreement``: README figures from finished results."""
    ap = argparse.ArgumentParser(prog="jobs/evaluate.py report", description="Print README figures.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, what in (("table", "the per-drafter summary table (Markdown)"), ("summary", "the headline figures")):
        p = sub.add_parser(name, description=f"Print {what} of a finished matrix from its results.json.")
        p.add_argument("--results", default="results/reference/results.json", help="results.json of a run")
        p.add_argument("--gamma", type=int, default=None,
                       help="γ of the α columns (default: the run's report.alpha_gamma, else its smallest γ)")
        p.add_argument("--budget", default="256", help="budget of the first-draft acceptance column (default 256)")
        p.add_argument("--mode", default="greedy", help="the fixed-γ mode (default greedy)")
    p = sub.add_parser("agreement", description="Collect drafter training runs' held-out agreement with the "
                       "teacher: agreement.json, agreement.md, curves.png (bd_ray.evaluate.agreement).")
    p.add_argument("--runs", default="runs/reference_2k", help="directory of the training runs")
    p.add_argument("--out", required=True, help="where agreement.json/.md and the curves go")
    p.add_argument("--label", action="append", default=[], metavar="NAME=LABEL",
                   help="a run to include and its table label, in order (default: every run, by name)")
    p.add_argument("--targets", help="manifest.json of the offline teacher targets (recorded in agreement.json)")
    p.add_argument("--init-label", default="untrained init (step-0 eval)", help="table label of the untrained init")
    p.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "agreement":
        from bd_ray.evaluate.agreement import write_agreement

        labels = dict(x.split("=", 1) for x in args.label) if args.label else None
        print(write_agreement(args.runs, args.out, labels, args.targets, plots=not args.no_plots,
                              init_label=args.init_label))
        return 0
    from bd_ray.evaluate.summaries import headline_summary, summary_table

    with open(args.results) as f:
        res = json.load(f)
    fn = summary_table if args.cmd == "table" else headline_summary
    cfg = res["config"]
    gamma = args.gamma or (cfg.get("report") or {}).get("alpha_gamma") or min(cfg["matrix"]["gammas"])
    print(fn(res, gamma=gamma, budget=args.budget, mode=args.mode))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["journal"]:
        return journal_main(argv[1:])
    if argv[:1] == ["report"]:
        return report_main(argv[1:])
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
    from bd_ray.evaluate.driver import EvalItemError, LosslessError, run_evaluation
    from bd_ray.evaluate.summaries import lossless_line
    from bd_ray.evaluate.prompts import HeldOutError

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
    print(f"\n[bd-ray] lossless check: {lossless_line(ll)}; {len(res['cells'])} cells in {time.time() - t0:.0f}s")
    print(f"[bd-ray] results: {paths['json']}\n[bd-ray] table:   {paths['markdown']}")
    for p in paths["plots"]:
        print(f"[bd-ray] plot:    {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
