#!/usr/bin/env bash
# The embedded default: the whole picochat pipeline on a CPU laptop, offline, on the bundled data.
# tokenizer -> base -> mid -> SFT -> short RL -> evals -> report.md, about 45 minutes on 2 quiet cores
# (estimated from a measured base step; see below).
#
# Every training stage is sized by optimiser steps, so every machine trains the same model: a slower or
# busier one takes longer instead of training less. Before the long work starts the script times a few
# steps of the base model here and prints the time each stage should take. Sets up .venv first if needed.
#
#   bash runs/cpu.sh              # the default run
#   bash runs/cpu.sh --dry-run    # print the time estimate and every command, run nothing
#
# Every size is an environment variable, e.g. DEPTH=6 BASE_STEPS=1000 bash runs/cpu.sh. A stage can be
# sized by time instead (the LR decay is fitted into the budget; a busy machine then trains less):
#   BASE_MINUTES=20 MID_MINUTES=8 SFT_MINUTES=4 RL_MINUTES=3 bash runs/cpu.sh
# STEP_SECONDS=0.6 skips the timing and estimates with 0.6 s per base step.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash runs/cpu.sh [--dry-run]" >&2; exit 2 ;;
esac
[ "$DRY" = 1 ] || bash runs/setup.sh
VENV="${PICOCHAT_VENV:-$REPO/.venv}"
PICO="$VENV/bin/picochat"
export PICOCHAT_HOME="${PICOCHAT_HOME:-$HOME/.cache/picochat}"

VOCAB_SIZE="${VOCAB_SIZE:-8192}"
DEPTH="${DEPTH:-4}"
BASE_BATCH="${BASE_BATCH:-2048}"   # tokens per base step: 4 rows of 512
BASE_STEPS="${BASE_STEPS:-2500}"
MID_STEPS="${MID_STEPS:-420}"
SFT_STEPS="${SFT_STEPS:-70}"
RL_STEPS="${RL_STEPS:-40}"
EVAL_PER_TASK="${EVAL_PER_TASK:-100}"
CORE_PER_TASK="${CORE_PER_TASK:-100}"

# What each stage costs in units of a 2,048-token base step (REF_STEP_SECONDS at depth 4 on a quiet
# 2-core CPU): a mid step trains 4,096 tokens, an SFT step 32 padded conversations, an RL step samples
# and trains 4 x 8 SpellingBee replies; the rest are whole stages. The estimate multiplies them by the
# step time measured here, so it follows this machine's speed. Which figure was measured and which
# estimated, and how: docs/recipe.md, "The laptop default".
REF_STEP_SECONDS=0.571
MID_STEP_COST=2.0
SFT_STEP_COST=6.0
RL_STEP_COST=8.0
TOKENIZER_COST=35
BASE_EVAL_COST=160
CHAT_EVAL_COST=120
REPORT_COST=10

# horizon STEPS MINUTES: the flags that size a stage: --num-iterations, or --max-minutes when set.
horizon() { if [ -n "$2" ]; then echo "--max-minutes $2"; else echo "--num-iterations $1"; fi; }
read -ra BASE_SIZE <<<"$(horizon "$BASE_STEPS" "${BASE_MINUTES:-}")"
read -ra MID_SIZE <<<"$(horizon "$MID_STEPS" "${MID_MINUTES:-}")"
read -ra SFT_SIZE <<<"$(horizon "$SFT_STEPS" "${SFT_MINUTES:-}")"
read -ra RL_SIZE <<<"$(horizon "$RL_STEPS" "${RL_MINUTES:-}")"

# Seconds per base step here: STEP_SECONDS, or a few timed steps of the real model (bench/train.py).
measure_step() {
  if [ -n "${STEP_SECONDS:-}" ]; then echo "$STEP_SECONDS"; return; fi
  local rows=$((BASE_BATCH / 512))
  "$VENV/bin/python" bench/train.py --depths "$DEPTH" --vocab-size "$VOCAB_SIZE" --seq-len 512 \
    --total-batch-size "$BASE_BATCH" --device-batch-size $((rows < 32 ? rows : 32)) \
    --warmup-steps 1 --steps 3 |
    sed -n 's/^depth [0-9]*: \([0-9,.]*\) tok\/s.*/\1/p' | tr -d , |
    awk -v batch="$BASE_BATCH" '{ printf "%.3f\n", batch / $1 }'
}

# estimate STEP_S: the expected minutes of each stage and in total, before anything long runs.
estimate() {
  awk -v step="$1" -v batch="$BASE_BATCH" -v ref="$REF_STEP_SECONDS" -v depth="$DEPTH" \
    -v base="$BASE_STEPS" -v mid="$MID_STEPS" -v sft="$SFT_STEPS" -v rl="$RL_STEPS" \
    -v base_min="${BASE_MINUTES:-}" -v mid_min="${MID_MINUTES:-}" -v sft_min="${SFT_MINUTES:-}" \
    -v rl_min="${RL_MINUTES:-}" -v mid_c="$MID_STEP_COST" -v sft_c="$SFT_STEP_COST" -v rl_c="$RL_STEP_COST" \
    -v tok_c="$TOKENIZER_COST" -v base_eval_c="$BASE_EVAL_COST" -v chat_eval_c="$CHAT_EVAL_COST" \
    -v report_c="$REPORT_COST" '
    function row(name, what, seconds) { printf "    %-16s %-18s %5.1f min\n", name, what, seconds / 60; total += seconds }
    function trained(name, steps, cost, minutes) {
      if (minutes != "") row(name, "--max-minutes " minutes, 60 * minutes)
      else row(name, steps " steps", steps * cost * s)
    }
    BEGIN {
      s = step * 2048 / batch  # seconds per unit of cost
      printf "==> time estimate: a depth-%d base step of %d tokens takes %.3f s here", depth, batch, step
      printf " (%.3f s at depth 4 and 2,048 tokens on the quiet 2-core reference)\n", ref
      row("tokenizer", "train + eval", tok_c * s)
      trained("base training", base, batch / 2048, base_min)
      row("base eval", "CORE", base_eval_c * s)
      trained("mid-training", mid, mid_c, mid_min)
      trained("SFT", sft, sft_c, sft_min)
      trained("RL", rl, rl_c, rl_min)
      row("chat evals", "mid, SFT, RL", 3 * chat_eval_c * s)
      row("report", "", report_c * s)
      printf "    %-35s %5.1f min\n", "total", total / 60
    }'
}

# run CMD...: execute it, or with --dry-run print it (one line, shell-quoted) and run nothing.
run() {
  if [ "$DRY" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}
t_start=$(date +%s)
stage() {  # stage NAME CMD...: run one step and print its time
  local name="$1"; shift
  [ "$DRY" = 1 ] || echo "==> $name"
  local t0; t0=$(date +%s)
  run "$@"
  [ "$DRY" = 1 ] || echo "==> $name done in $(( $(date +%s) - t0 )) s"
}

step_s="$(measure_step)"
if [ -z "$step_s" ]; then echo "error: timing the base model failed (bench/train.py); set STEP_SECONDS" >&2; exit 1; fi
estimate "$step_s"

stage "report reset"    "$PICO" report --reset
stage "tokenizer"       "$PICO" tokenizer train --vocab-size "$VOCAB_SIZE"
stage "tokenizer eval"  "$PICO" tokenizer eval
stage "base training"   "$PICO" train base --depth "$DEPTH" --total-batch-size "$BASE_BATCH" "${BASE_SIZE[@]}" --overwrite
stage "base eval"       "$PICO" eval base --max-per-task "$CORE_PER_TASK"
stage "mid-training"    "$PICO" train mid "${MID_SIZE[@]}" --overwrite
stage "mid eval"        "$PICO" eval chat -i mid --max-per-task "$EVAL_PER_TASK"
stage "SFT"             "$PICO" train sft "${SFT_SIZE[@]}" --overwrite
stage "SFT eval"        "$PICO" eval chat -i sft --max-per-task "$EVAL_PER_TASK"
stage "RL"              "$PICO" train rl --task spellingbee "${RL_SIZE[@]}" --overwrite \
  --examples-per-step 4 --num-samples 8 --device-batch-size 8 --max-new-tokens 128 --init-lr-frac 0.2 \
  --eval-every 0 --eval-examples 32
stage "RL eval"         "$PICO" eval chat -i rl --max-per-task "$EVAL_PER_TASK"
stage "report"          "$PICO" report --out "$REPO/report.md"
[ "$DRY" = 1 ] && exit 0
echo "==> report: $REPO/report.md"
echo "==> total $(( ($(date +%s) - t_start) / 60 )) min; artifacts in $PICOCHAT_HOME"
cat <<TXT

Your model is ready. Talk to it:
  $PICO chat          # in the terminal
  $PICO serve         # web UI at http://127.0.0.1:8000 and an OpenAI-compatible API at /v1
TXT
