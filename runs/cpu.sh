#!/usr/bin/env bash
# The embedded default: the whole picochat pipeline on a CPU laptop, offline, on the bundled data.
# tokenizer -> base -> mid -> SFT -> short RL -> evals -> report.md, sized for ~45 minutes on 2 cores.
# Sets up .venv first if needed. Every size below is an environment variable you can override, e.g.
#   BASE_MINUTES=30 DEPTH=6 bash runs/cpu.sh
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
bash runs/setup.sh
PICO="${PICOCHAT_VENV:-$REPO/.venv}/bin/picochat"
export PICOCHAT_HOME="${PICOCHAT_HOME:-$HOME/.cache/picochat}"

VOCAB_SIZE="${VOCAB_SIZE:-8192}"
DEPTH="${DEPTH:-4}"
BASE_MINUTES="${BASE_MINUTES:-20}"
MID_MINUTES="${MID_MINUTES:-8}"
SFT_MINUTES="${SFT_MINUTES:-4}"
RL_STEPS="${RL_STEPS:-30}"   # about 5 s each at depth 4
EVAL_PER_TASK="${EVAL_PER_TASK:-100}"
CORE_PER_TASK="${CORE_PER_TASK:-100}"

t_start=$(date +%s)
stage() {  # stage NAME CMD...: run one step and print its time
  local name="$1"; shift
  echo "==> $name"
  local t0; t0=$(date +%s)
  "$@"
  echo "==> $name done in $(( $(date +%s) - t0 )) s"
}
finish() {
  "$PICO" report --out "$REPO/report.md" && echo "==> report: $REPO/report.md"
  echo "==> total $(( ($(date +%s) - t_start) / 60 )) min; artifacts in $PICOCHAT_HOME"
}

stage "report reset"    "$PICO" report --reset
stage "tokenizer"       "$PICO" tokenizer train --vocab-size "$VOCAB_SIZE"
stage "tokenizer eval"  "$PICO" tokenizer eval
stage "base training"   "$PICO" train base --depth "$DEPTH" --max-minutes "$BASE_MINUTES" --overwrite
stage "base eval"       "$PICO" eval base --max-per-task "$CORE_PER_TASK"
stage "mid-training"    "$PICO" train mid --max-minutes "$MID_MINUTES" --overwrite
stage "mid eval"        "$PICO" eval chat -i mid --max-per-task "$EVAL_PER_TASK"
stage "SFT"             "$PICO" train sft --max-minutes "$SFT_MINUTES" --overwrite
stage "SFT eval"        "$PICO" eval chat -i sft --max-per-task "$EVAL_PER_TASK"
stage "RL"              "$PICO" train rl --num-iterations "$RL_STEPS" --overwrite \
  --examples-per-step 4 --num-samples 8 --device-batch-size 8 --max-new-tokens 128 --eval-every 0 --eval-examples 32
stage "RL eval"         "$PICO" eval chat -i rl --max-per-task "$EVAL_PER_TASK"
finish
cat <<TXT

Your model is ready. Talk to it:
  $PICO chat          # in the terminal
  $PICO serve         # web UI at http://127.0.0.1:8000 and an OpenAI-compatible API at /v1
TXT
