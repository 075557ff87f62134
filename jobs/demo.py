"""The README demo (``make demo``): the main job on the embedded default, end to end.

Steps, each a job of its own (the same commands a cluster user submits with ``ray job submit``):

1. assets: the SmolLM2 verifier and the pg-mini books (``jobs/prepare_data.py``, cached);
2. offline teacher targets for a few 1K windows (``jobs/teacher_targets.py``, Ray Data);
3. a brief BudgetDraft run and a brief naive (L_A only) run from those targets
   (``jobs/train_drafter.py``, Ray Train + DeepSpeed);
4. evaluation of both, the shipped stage-1 reference drafter (``reference-distill``) and the
   untrained init on held-out books at budgets {128, full}
   (``jobs/evaluate.py``): α, τ, speedup, a lossless check; table and plots under results/demo.

Output: one line per step with its time, then the result table and the output paths. Each step's
own output goes to ``runs/demo/logs/<step>.log`` (its last lines are shown when it fails);
``--verbose`` streams every step's output, Ray's included, to the console instead.

Finished steps are skipped on a rerun (delete ``runs/demo`` to start over). Brief means brief:
a few dozen optimizer steps on a CPU; the reference run (results/reference_2k) and the
paper train far longer.

Usage: ``python jobs/demo.py [--verbose]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "jobs" / "configs" / "demo"
STEPS = [
    ("embedded assets (verifier + books)", ["jobs/prepare_data.py"], None),
    ("offline teacher targets", ["jobs/teacher_targets.py", "--config", str(CFG / "targets.yaml")],
     ROOT / "runs" / "demo" / "targets"),
    ("train BudgetDraft drafter", ["jobs/train_drafter.py", "--config", str(CFG / "budgetdraft.yaml")],
     ROOT / "runs" / "demo" / "budgetdraft" / "final"),
    ("train naive drafter (L_A only)", ["jobs/train_drafter.py", "--config", str(CFG / "naive.yaml")],
     ROOT / "runs" / "demo" / "naive" / "final"),
    ("evaluate: BudgetDraft vs naive vs untrained",
     ["jobs/evaluate.py", "--config", str(CFG / "eval.yaml"), "--output", "results/demo"], None),
]


def _tail(path: Path, n: int = 30) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verbose", action="store_true", help="stream every step's output (Ray's included) here")
    args = ap.parse_args(argv)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    if args.verbose:
        env["BD_RAY_VERBOSE"] = "1"
    log_dir = ROOT / "runs" / "demo" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for i, (title, cmd, done_marker) in enumerate(STEPS, 1):
        head = f"[{i}/{len(STEPS)}] {title}"
        if done_marker is not None and done_marker.exists():
            print(f"{head}: already done ({done_marker.relative_to(ROOT)})", flush=True)
            continue
        t_step = time.time()
        if args.verbose:
            print(f"{head}\n    $ python {' '.join(cmd)}", flush=True)
            rc = subprocess.call([sys.executable, *cmd], cwd=ROOT, env=env)
            log = None
        else:
            print(f"{head} ...", end="", flush=True)
            log = log_dir / f"{i}-{cmd[0].split('/')[-1].removesuffix('.py')}.log"
            with open(log, "w") as f:
                f.write(f"$ python {' '.join(cmd)}\n")
                f.flush()
                rc = subprocess.call([sys.executable, *cmd], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        took = f"{time.time() - t_step:.0f} s, total {time.time() - t0:.0f} s"
        if rc != 0:
            print(f" FAILED (exit code {rc}, {took})" if log else f"{head}: FAILED (exit code {rc}, {took})")
            if log is not None:
                print(f"--- last lines of {log.relative_to(ROOT)}:\n{_tail(log)}", file=sys.stderr)
            return rc
        print(f" done ({took})" if log else f"{head}: done ({took})", flush=True)
    out = ROOT / "results" / "demo"
    print(f"\ndemo finished in {time.time() - t0:.0f} s\n")
    table = out / "results.md"
    if table.is_file():
        print(table.read_text().rstrip() + "\n")
    print(f"table: {table.relative_to(ROOT)}")
    for png in sorted(out.glob("*.png")):
        print(f"plot:  {png.relative_to(ROOT)}")
    print(f"runs:  {(ROOT / 'runs' / 'demo').relative_to(ROOT)}/ (drafters under */final, step logs under logs/)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
