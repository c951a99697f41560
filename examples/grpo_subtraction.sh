#!/usr/bin/env bash
# GRPO on the embedded demo model: an exact-match reward lifts its subtraction accuracy on 100 held-out items.
#
#   bash examples/grpo_subtraction.sh            # the full run: held-out accuracy before and after, side by side
#   STEPS=2 HELDOUT=10 bash examples/grpo_subtraction.sh   # a quick check that the pipeline runs
#
# Writes OUT (default runs/grpo-subtraction): data/ (train.jsonl, heldout.jsonl), the run folder NAME/ (adapter,
# metrics.jsonl with the reward per step, rollouts.jsonl) and eval.json (accuracy of the base and of the adapter).
# NOMOAT and PYTHON name the commands to use (default: nomoat and python on the PATH); REWARD (exact_match, or
# digit_match for partial credit by place), GENERATIONS, BATCH, TEMPERATURE and LR override the training settings.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-runs/grpo-subtraction}
NAME=${NAME:-grpo-sub}
STEPS=${STEPS:-200}
HELDOUT=${HELDOUT:-100}
REWARD=${REWARD:-exact_match}
GENERATIONS=${GENERATIONS:-8}
BATCH=${BATCH:-8}
TEMPERATURE=${TEMPERATURE:-0.7}
LR=${LR:-1e-3}
NOMOAT=${NOMOAT:-nomoat}
PYTHON=${PYTHON:-python}

$PYTHON "$here/subtraction_data.py" "$OUT/data" --train 3000 --heldout "$HELDOUT"
rm -rf "${OUT:?}/$NAME"  # this script's own run folder: a rerun starts over
start=$(date +%s)
$NOMOAT train demo --method grpo --data "$OUT/data/train.jsonl" --reward "$REWARD" \
    --num-generations "$GENERATIONS" --batch-size "$BATCH" --max-new-tokens 6 --temperature "$TEMPERATURE" --lr "$LR" \
    --max-steps "$STEPS" --seq-len 96 --name "$NAME" --output-dir "$OUT" --no-progress
echo "training took $(( $(date +%s) - start )) s"
rm -f "$OUT/eval.json"
$NOMOAT eval demo --data "$OUT/data/heldout.jsonl" --adapter "$OUT/$NAME/adapter" --match exact --max-tokens 8 \
    --no-progress --json "$OUT/eval.json"
