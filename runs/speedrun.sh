#!/usr/bin/env bash
# The reference run for one 8xH100 node: download ClimbMix shards (more in the background while the
# tokenizer trains), tokenizer on ~2B characters, a depth-26 base model (the depth nanochat measured to
# match GPT-2's CORE of 0.256), CORE eval, mid-training, SFT, chat evals, optional RL, report.md.
#
#   bash runs/speedrun.sh           # the real thing: needs GPUs and access to the Hugging Face hub
#   bash runs/speedrun.sh --smoke   # every command below with tiny sizes on the CPU: 2 processes with
#                                   # torchrun (gloo), the bundled corpus served by a local HTTP server
#   bash runs/speedrun.sh --dry-run # print every command the real run would execute, run nothing
#
# Every stage of the real run reads hub data: the pretraining shards, and SmolTalk, MMLU auxiliary-train,
# ARC and GSM8K for mid-training and SFT, GSM8K for RL, the full test sets for the chat evals (CORE's
# tasks are the bundled ones, 20 of 22: squad and coqa have no hub copy). The base model trains at a
# 2048-token context; mid-training, SFT, RL and the evals take theirs from the checkpoint.
#
# Sizes are environment variables, e.g. `DEPTH=20 SHARDS=240 NPROC=4 bash runs/speedrun.sh` (also
# DEVICE_BATCH_SIZE, RATIO = training tokens per parameter, GPU = h100|h200|a100|b200 for the plan).
# It starts with `picochat plan --check`, which stops the run if the device batch cannot fit in memory.
# WITH_RL=1 adds RL on GSM8K (and its eval) after SFT. Run it inside screen/tmux: it takes hours.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
SMOKE="${PICOCHAT_SMOKE:-0}"
DRY=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash runs/speedrun.sh [--smoke | --dry-run]" >&2; exit 2 ;;
esac
[ "$DRY" = 1 ] || bash runs/setup.sh
VENV="${PICOCHAT_VENV:-$REPO/.venv}"
PICO="$VENV/bin/picochat"
WITH_RL="${WITH_RL:-0}"

if [ "$SMOKE" = 1 ]; then
  export PICOCHAT_HOME="${PICOCHAT_HOME:-$(mktemp -d)}"
  export OMP_NUM_THREADS=1
  NPROC="${NPROC:-2}"
  # The "hub" is the bundled corpus served locally, so the download command runs for real.
  PORT="$("$VENV/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  "$VENV/bin/python" -m http.server --bind 127.0.0.1 --directory "$REPO/data/pretrain" "$PORT" >/dev/null 2>&1 &
  SERVER_PID=$!
  trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
  sleep 1
  HUB=(--base-url "http://127.0.0.1:$PORT" --num-shards-total 10)
  FIRST_SHARDS=2 SHARDS=4
  TOKENIZER=(--vocab-size 1024 --max-chars 2000000)
  TOKENIZER_EVAL=(--max-examples 20)
  PLAN=(--depth 2 --nproc "$NPROC" --max-seq-len 128 --device-batch-size 2 --total-batch-size 512
        --vocab-size 1024)
  BASE=(--depth 2 --max-seq-len 128 --device-batch-size 2 --total-batch-size 512 --num-iterations 4
        --eval-every 2 --eval-tokens 1024 --sample-every 4 --save-every 2)
  BASE_EVAL=(--max-per-task 2 --split-tokens 1024 --device-batch-size 2)
  MID=(--device-batch-size 2 --max-seq-len 128 --total-batch-size 512 --num-iterations 3 --eval-every 2
       --eval-tokens 512)
  SFT=(--device-batch-size 2 --max-seq-len 128 --target-examples-per-step 4 --num-iterations 3
       --eval-every 2 --eval-tokens 512 --eval-metrics-examples 2)
  RL=(--examples-per-step 2 --num-samples 2 --device-batch-size 2 --max-new-tokens 16 --num-iterations 2
      --eval-every 0 --eval-examples 2)
  CHAT_EVAL=(--max-per-task 2 --max-new-tokens 16)
  TASK_DATA=()  # no hub here: post-training reads the bundled task copies
else
  export PICOCHAT_HOME="${PICOCHAT_HOME:-$HOME/.cache/picochat}"
  NPROC="${NPROC:-8}"
  DEPTH="${DEPTH:-26}"
  HUB=()
  # ~250M characters (~55M tokens) per shard: 170 shards cover depth 26 at RATIO 8.25 (7.6B tokens).
  FIRST_SHARDS="${FIRST_SHARDS:-8}" SHARDS="${SHARDS:-170}"
  TOKENIZER=(--vocab-size 65536 --max-chars 2000000000)
  TOKENIZER_EVAL=()
  # 8 rows: with value embeddings (13 tables of 65,536 x 1,664 at d26) 16 rows do not fit 80 GB under
  # plain DDP (`picochat plan` counts them); gradient accumulation keeps the update the same.
  DEVICE_BATCH_SIZE="${DEVICE_BATCH_SIZE:-8}"
  # nanochat's d26 leaderboard run trains 8.25 tokens per scaling parameter (20 would take ~2.4x longer).
  RATIO="${RATIO:-8.25}"
  SIZE=(--depth "$DEPTH" --max-seq-len 2048 --device-batch-size "$DEVICE_BATCH_SIZE"
        --target-param-data-ratio "$RATIO")
  # Full attention everywhere: on CUDA picochat runs a sliding-window layer as masked SDPA (the
  # memory-efficient kernel over the whole square), likely slower than flash; no bigram table (at
  # vocab 65,536 it would hold 5 x 65,536 x width parameters, each step all-reduced and updated):
  # neither is measured on GPU yet (docs/recipe.md). The plan sizes the same model.
  ARCH=(--window-pattern L --bigram-embeds 0)
  PLAN=("${SIZE[@]}" "${ARCH[@]}" --nproc "$NPROC" --gpu "${GPU:-h100}" --vocab-size 65536)
  BASE=("${SIZE[@]}" "${ARCH[@]}" --run speedrun)
  BASE_EVAL=()
  MID=(--device-batch-size "$DEVICE_BATCH_SIZE" --run speedrun-mid)
  SFT=(--run speedrun-sft)
  RL=(--run speedrun-rl)
  CHAT_EVAL=()
  TASK_DATA=(--source hub)
fi

# run CMD...: execute it, or with --dry-run print it (one line, shell-quoted) and run nothing.
run() {
  if [ "$DRY" = 1 ]; then printf '%q ' "$@" | sed 's/ $//'; echo; else "$@"; fi
}

launch() {  # launch MODULE ARGS...: one stage on NPROC processes of this node
  run "$VENV/bin/torchrun" --standalone --nproc_per_node="$NPROC" -m "$@"
}
t_start=$(date +%s)
step() { [ "$DRY" = 1 ] || echo "==> $* ($(( ($(date +%s) - t_start) / 60 )) min in)"; }

step "plan: tokens, hours, memory per GPU, cost (stops here if the device batch cannot fit)"
run "$PICO" plan --check "${PLAN[@]}"
step "report reset"
run "$PICO" report --reset
step "download the first $FIRST_SHARDS shards (and the validation shard)"
run "$PICO" download --shards "$FIRST_SHARDS" "${HUB[@]}"
step "download up to $SHARDS shards in the background"
if [ "$DRY" = 1 ]; then
  run "$PICO" download --shards "$SHARDS" "${HUB[@]}"
else
  "$PICO" download --shards "$SHARDS" "${HUB[@]}" >"$PICOCHAT_HOME/download.log" 2>&1 &
  DOWNLOAD_PID=$!
fi
step "tokenizer"
run "$PICO" tokenizer train --source hub "${TOKENIZER[@]}"
run "$PICO" tokenizer eval --source hub "${TOKENIZER_EVAL[@]}"
step "waiting for the shards"
if [ "$DRY" = 0 ] && ! wait "$DOWNLOAD_PID"; then
  echo "error: the background download failed; see $PICOCHAT_HOME/download.log" >&2
  exit 1
fi
step "base pretraining"
launch picochat.train.base --source hub --overwrite "${BASE[@]}"
launch picochat.evals.core --source hub "${BASE_EVAL[@]}"
step "mid-training"
launch picochat.train.mid --overwrite "${TASK_DATA[@]}" "${MID[@]}"
launch picochat.evals.chat -i mid "${TASK_DATA[@]}" "${CHAT_EVAL[@]}"
step "SFT"
launch picochat.train.sft --overwrite "${TASK_DATA[@]}" "${SFT[@]}"
launch picochat.evals.chat -i sft "${TASK_DATA[@]}" "${CHAT_EVAL[@]}"
if [ "$WITH_RL" = 1 ]; then
  step "RL"
  launch picochat.train.rl --overwrite "${TASK_DATA[@]}" "${RL[@]}"
  launch picochat.evals.chat -i rl -a GSM8K "${TASK_DATA[@]}" "${CHAT_EVAL[@]}"
fi
step "report"
run "$PICO" report --out "$PICOCHAT_HOME/report.md"
[ "$DRY" = 1 ] && exit 0
echo "==> done in $(( ($(date +%s) - t_start) / 60 )) min: $PICOCHAT_HOME/report.md"
echo "    talk to it: $PICO chat   or   $PICO serve"
