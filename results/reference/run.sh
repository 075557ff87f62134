#!/usr/bin/env bash
# The reference evaluation matrix (issue 6), grown one held-out prompt per context at a time so a
# stopped run leaves a complete smaller matrix behind. Every finished measurement is journaled
# (results/reference/runs.journal.jsonl); rerunning this script skips what is already measured.
#   bash results/reference/run.sh [max_prompts]
# On a 2-core machine the two contexts can grow side by side, one process per core, the second one
# journaling into its own directory; then join the parts (only what none measured is run):
#   CONTEXTS='[4096]' bash results/reference/run.sh 5 &
#   CONTEXTS='[2048]' OUT=runs/reference_2k_part bash results/reference/run.sh 5 &
#   .venv/bin/python jobs/evaluate.py --config jobs/configs/eval_reference.yaml --output results/reference \
#     --merge-journal runs/reference_2k_part --set ...   (the same --set lines as below, data.prompts_per_context=5)
# Drafters: the 2K reference run (results/reference_2k/README.md): runs/reference_2k/{budgetdraft,naive}/final,
# plus the untrained init (the verifier's first 4 layers). Modes: greedy with fixed gamma (the
# paper's protocol) and greedy with adaptive gamma (gamma = cap; stops speculating when it cannot pay).
set -u
cd "$(dirname "$0")/../.."
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
for n in $(seq 1 "${1:-5}"); do
  .venv/bin/python jobs/evaluate.py --config jobs/configs/eval_reference.yaml --output "${OUT:-results/reference}" \
    --set "matrix.contexts=${CONTEXTS:-[2048, 4096]}" \
    --set models.drafters.budgetdraft=runs/reference_2k/budgetdraft/final \
    --set models.drafters.naive=runs/reference_2k/naive/final \
    --set run.executor=local --set run.torch_threads=1 \
    --set data.prompts_per_context=$n || exit $?
done
