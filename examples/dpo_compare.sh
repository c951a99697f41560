#!/usr/bin/env bash
# DPO on pairs the embedded demo model makes itself: its own correct and wrong answers to "which is larger/smaller"
# questions become chosen and rejected, and DPO moves its held-out accuracy on that task.
#
#   bash examples/dpo_compare.sh                         # the full run: held-out accuracy before and after
#   PROMPTS=40 STEPS=2 HELDOUT=10 bash examples/dpo_compare.sh   # a quick check that the pipeline runs
#
# Writes OUT (default runs/dpo-compare): data/ (prompts.jsonl, heldout.jsonl), pairs.jsonl (with its provenance),
# the run folder NAME/ (adapter, metrics.jsonl with the DPO rewards and accuracy per step) and eval.json (greedy
# exact match of the base and of the adapter on the held-out items, printed side by side).
# NOMOAT and PYTHON name the commands to use (default: nomoat and python on the PATH).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-runs/dpo-compare}
NAME=${NAME:-dpo-compare}
TASK=${TASK:-compare}
PROMPTS=${PROMPTS:-600}
SAMPLES=${SAMPLES:-6}
STEPS=${STEPS:-54}
HELDOUT=${HELDOUT:-100}
SEED=${SEED:-0}
NOMOAT=${NOMOAT:-nomoat}
PYTHON=${PYTHON:-python}

$PYTHON "$here/dpo_data.py" "$OUT/data" --task "$TASK" --train "$PROMPTS" --heldout "$HELDOUT"
start=$(date +%s)
# The model answers each prompt SAMPLES times at temperature 1; exact match against `answer` ranks them: a right
# answer becomes `chosen`, a wrong one `rejected` (prompts answered all right or all wrong make no pair). A rerun
# reuses the pairs already in the file.
$NOMOAT synth demo --mode pairs --prompts "$OUT/data/prompts.jsonl" --out "$OUT/pairs.jsonl" --samples "$SAMPLES" \
    --temperature 1.0 --max-tokens 8 --reward exact_match --seed "$SEED" --no-progress
echo "pairs took $(( $(date +%s) - start )) s"
rm -rf "${OUT:?}/$NAME"  # this script's own run folder: a rerun starts over
start=$(date +%s)
$NOMOAT train demo --method dpo --data "$OUT/pairs.jsonl" --beta 0.1 --lr 5e-4 --batch-size 8 --max-steps "$STEPS" \
    --seq-len 128 --seed "$SEED" --name "$NAME" --output-dir "$OUT" --no-progress
echo "training took $(( $(date +%s) - start )) s"
rm -f "$OUT/eval.json"
$NOMOAT eval demo --data "$OUT/data/heldout.jsonl" --adapter "$OUT/$NAME/adapter" --match exact --max-tokens 8 \
    --no-progress --json "$OUT/eval.json"
