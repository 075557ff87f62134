"""The README demo (``make demo``): the main job on the embedded default, end to end.

Steps, each a job of its own (the same commands a cluster user submits with ``ray job submit``):

1. assets: the SmolLM2 verifier and the pg-mini books (``jobs/prepare_data.py``, cached);
2. offline teacher targets for a few 1K windows (``jobs/teacher_targets.py``, Ray Data);
3. a brief BudgetDraft run and a brief naive (L_A only) run from those targets
   (``jobs/train_drafter.py``, Ray Train + DeepSpeed);
4. evaluation of both plus the untrained init on held-out books at budgets {128, full}
   (``jobs/evaluate.py``): α, τ, speedup, a lossless check; table and plots under results/demo.

Finished steps are skipped on a rerun (delete ``runs/demo`` to start over). Brief means brief:
a few dozen optimizer steps on a CPU; the reference run (results/reference_2k) and the
paper train far longer.

Usage: ``python jobs/demo.py``
"""

from __future__ import annotations

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


def main() -> int:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TOKENIZERS_PARALLELISM="false")
    t0 = time.time()
    for i, (title, cmd, done_marker) in enumerate(STEPS, 1):
        print(f"\n=== [{i}/{len(STEPS)}] {title}  (elapsed {time.time() - t0:.0f} s)", flush=True)
        if done_marker is not None and done_marker.exists():
            print(f"    already done: {done_marker.relative_to(ROOT)}")
            continue
        print(f"    $ python {' '.join(cmd)}", flush=True)
        rc = subprocess.call([sys.executable, *cmd], cwd=ROOT, env=env)
        if rc != 0:
            print(f"demo: step {i} ({title}) failed with exit code {rc}", file=sys.stderr)
            return rc
    out = ROOT / "results" / "demo"
    print(f"\n=== demo finished in {time.time() - t0:.0f} s")
    print(f"table: {out / 'results.md'}")
    for png in sorted(out.glob("*.png")):
        print(f"plot:  {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
