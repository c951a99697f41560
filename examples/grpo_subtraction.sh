#!/usr/bin/env bash
# GRPO on the embedded demo model: an exact-match reward on subtraction questions, held-out accuracy before and after.
#
#   bash examples/grpo_subtraction.sh            # the full run: held-out accuracy before and after, side by side
#   STEPS=2 HELDOUT=10 bash examples/grpo_subtraction.sh   # a quick check that the pipeline runs
#
# Writes OUT (default runs/grpo-subtraction): data/ (train.jsonl, heldout.jsonl; no training question is about a
# held-out pair of numbers), the run folder NAME/ (adapter, metrics.jsonl with the reward and the share of flat
# groups per step, rollouts.jsonl) and eval.json (greedy accuracy of the base and of the adapter).
# NOMOAT and PYTHON name the commands to use (default: nomoat and python on the PATH); TRAIN (training questions),
# REWARD (exact_match, or digit_match for partial credit by place), GENERATIONS, BATCH, TEMPERATURE, LR, SCHEDULE,
# FILTER (1: --filter-groups, 0: off) and REFILL (--refill-rounds) override the training settings.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-runs/grpo-subtraction}
NAME=${NAME:-grpo-sub}
STEPS=${STEPS:-300}
TRAIN=${TRAIN:-3000}
HELDOUT=${HELDOUT:-100}
REWARD=${REWARD:-exact_match}
GENERATIONS=${GENERATIONS:-16}
BATCH=${BATCH:-8}
TEMPERATURE=${TEMPERATURE:-1.0}
LR=${LR:-1e-3}
SCHEDULE=${SCHEDULE:-cosine}
FILTER=${FILTER:-1}
REFILL=${REFILL:-0}
NOMOAT=${NOMOAT:-nomoat}
PYTHON=${PYTHON:-python}

filter=--no-filter-groups
if [ "$FILTER" = 1 ]; then filter=--filter-groups; fi
$PYTHON "$here/subtraction_data.py" "$OUT/data" --train "$TRAIN" --heldout "$HELDOUT"
rm -rf "${OUT:?}/$NAME"  # this script's own run folder: a rerun starts over
start=$(date +%s)
$NOMOAT train demo --method grpo --data "$OUT/data/train.jsonl" --reward "$REWARD" \
    --num-generations "$GENERATIONS" --batch-size "$BATCH" --max-new-tokens 6 --temperature "$TEMPERATURE" --lr "$LR" \
    --schedule "$SCHEDULE" "$filter" --refill-rounds "$REFILL" --max-steps "$STEPS" --seq-len 96 --name "$NAME" \
    --output-dir "$OUT" --no-progress
echo "training took $(( $(date +%s) - start )) s"
rm -f "$OUT/eval.json"
$NOMOAT eval demo --data "$OUT/data/heldout.jsonl" --adapter "$OUT/$NAME/adapter" --match exact --max-tokens 8 \
    --no-progress --json "$OUT/eval.json"
