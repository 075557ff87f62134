#!/usr/bin/env bash
# The 2K reference run (results/reference_2k/README.md). Run from the repository root:
#   bash results/reference_2k/run.sh            # (re)run; finished drafters are skipped, others resume
#   MODE=ray bash results/reference_2k/run.sh   # drafters on Ray Train + DeepSpeed (run.executor=ray)
# 1. offline teacher targets (once; skipped when runs/targets/pg_mini_2k/manifest.json exists)
# 2. three drafters from those same targets, concurrently, with jobs/train_drafter.py: MODE=local
#    (default; what produced the committed numbers, README "Ray Train") = --set run.executor=local,
#    one process each without Ray; MODE=ray = one private Ray cluster each
# 3. collect: agreement JSON/table + curves under results/reference_2k/
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
LOG=runs/reference_2k
mkdir -p $LOG
if [ ! -f runs/targets/pg_mini_2k/manifest.json ]; then
  /usr/bin/time -f "teacher_targets wall %e s" $PY jobs/teacher_targets.py \
    --config jobs/configs/pg_mini_2k_targets.yaml --set max_windows=8 --set data.eval_windows=4 --set num_actors=2 > $LOG/teacher_targets.log 2>&1 || exit 1
fi
pids=()
for name in budgetdraft naive fixed_256; do
  if [ -f $LOG/$name/final/config.json ]; then echo "$name: already finished"; continue; fi
  if [ "${MODE:-local}" = ray ]; then executor=ray; else executor=local; fi
  /usr/bin/time -f "$name wall %e s" $PY jobs/train_drafter.py \
    --config results/reference_2k/configs/$name.yaml --set run.executor=$executor >> $LOG/$name.log 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait $p; done
$PY jobs/evaluate.py report agreement --runs runs/reference_2k --out results/reference_2k \
  --targets runs/targets/pg_mini_2k/manifest.json --init-label "untrained init (verifier's first 4 layers)" \
  --label "budgetdraft=BudgetDraft (L_A + 0.5 L_C, sampled B)" --label "naive=naive (L_A only)" \
  --label "fixed_256=fixed budget 256 (L_A + 0.5 L_C)"
