"""The README demo (``make demo``): the main job on the embedded default, end to end.

Steps, each a job of its own (the same commands a cluster user submits with ``ray job submit``):

1. assets: the SmolLM2 verifier and the pg-mini books (``jobs/prepare_data.py``, cached);
2. evaluation of the shipped reference drafters (``reference-budgetdraft``, ``reference-naive``,
   drafters/, loaded by name and checksum-verified) and the untrained init on held-out books at a
   4K context, KV budgets {128, 256, full}, fixed γ = 4 and adaptive γ (``jobs/evaluate.py``):
   α, τ, speedup vs plain decoding, a lossless check; table and plots under results/demo;
3. offline teacher targets for a few 1K windows (``jobs/teacher_targets.py``, Ray Data);
4. a brief BudgetDraft fine-tune of the shipped drafter from those targets
   (``jobs/train_drafter.py``, Ray Train with 2 workers + DeepSpeed ZeRO-2): the training pipeline,
   with held-out agreement before and after.

Output: one line per step with its time, then the result table, what it shows in plain words, the
fine-tune's agreement and the output paths. Each step's own output goes to
``runs/demo/logs/<step>.log`` (its last lines are shown when it fails); ``--verbose`` streams every
step's output, Ray's included, to the console instead.

Finished steps are skipped on a rerun (delete ``runs/demo`` to start over; step 2 reuses what its
journal under results/demo measured).

Usage: ``python jobs/demo.py [--verbose]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bd_ray.evaluate.summaries import plain_summary, summary_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "jobs" / "configs" / "demo"
STEPS = [
    ("embedded assets (verifier + books)", ["jobs/prepare_data.py"], None),
    ("evaluate the shipped drafters at 4K: BudgetDraft vs naive vs untrained",
     ["jobs/evaluate.py", "--config", str(CFG / "eval.yaml"), "--output", "results/demo"], None),
    ("offline teacher targets for the fine-tune", ["jobs/teacher_targets.py", "--config", str(CFG / "targets.yaml")],
     ROOT / "runs" / "demo" / "targets"),
    ("fine-tune the shipped BudgetDraft drafter (Ray Train + DeepSpeed, 2 workers)",
     ["jobs/train_drafter.py", "--config", str(CFG / "finetune.yaml")], ROOT / "runs" / "demo" / "finetune" / "final"),
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
    print(f"\ndemo finished in {time.time() - t0:.0f} s\n")
    summary = _summary(ROOT / "results" / "demo", ROOT / "runs" / "demo" / "finetune")
    print(summary)
    (ROOT / "results" / "demo" / "summary.md").write_text(summary + "\n")
    print("summary: results/demo/summary.md; every cell with its intervals: results/demo/results.md")
    for png in sorted((ROOT / "results" / "demo").glob("*.png")):
        print(f"plot:    {png.relative_to(ROOT)}")
    print("runs:    runs/demo/ (the fine-tuned drafter under finetune/final, step logs under logs/)")
    return 0


def _summary(results_dir: Path, finetune_dir: Path) -> str:
    """The demo's closing text: the per-drafter table (α at γ = 4 per budget, speedups), what it
    shows in plain words, and the fine-tune's held-out agreement before and after."""
    res = json.loads((results_dir / "results.json").read_text())
    parts = ["## Shipped drafters at 4K (held-out books)", "",
             summary_table(res, gamma=4, budget="256"), "", plain_summary(res, budget="256", gamma=4)]
    metrics = finetune_dir / "metrics.json"
    if metrics.is_file():
        hist = json.loads(metrics.read_text()).get("eval_history", [])
        if len(hist) >= 2:
            first, last = hist[0], hist[-1]
            keys = [k for k in first if k.startswith("agree_")]
            parts += ["", f"## Brief fine-tune (steps {first['step']} -> {last['step']}, Ray Train + DeepSpeed)", "",
                      "held-out agreement with the verifier (teacher-forced): "
                      + ", ".join(f"{k.removeprefix('agree_')} {first[k]:.3f} -> {last.get(k, float('nan')):.3f}"
                                  for k in keys)]
    return "\n".join(parts)

if __name__ == "__main__":
    sys.exit(main())
