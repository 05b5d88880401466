#!/usr/bin/env bash
# Prove picochat's GPU path on one GPU and measure it, in at most ~8 minutes; ends with one table and one
# JSON file (gpu_check.json) in OUT_DIR (default: $OUT, else ./gpu_check_out).
#
#   bash runs/gpu_check.sh [OUT_DIR]        # on the GPU machine (no network); carry .whl, .gpu_tokenizer
#   bash runs/gpu_check.sh --dry [OUT_DIR]  # the same steps, tiny, on the CPU (the test suite runs this)
#
# Steps: the wheels and the tokenizer carried in (real mode), the imports picochat needs, the CUDA tests
# (tests/test_cuda.py), bench/train.py at depths 12 and 20 in bf16 with torch.compile, bench/infer.py on
# the GPU, 100 steps of a depth-12 base run, 20 SFT steps, `picochat serve` answering the openai client.
# Each step's log is kept in OUT_DIR; a failing (or, after STEP_SECONDS, hung) step is recorded and the
# next one still runs. The GPU image (Python 3.12, torch 2.11) lacks rustbpe, fastapi, uvicorn,
# pydantic and openai: `bash runs/gpu_wheels.sh` (here, with a network) downloads them, pinned, into .whl/
# with a tokenizer trained here in .gpu_tokenizer/. They are installed into a folder of their own on
# PYTHONPATH (the image is left as it is); picochat itself runs from the source tree.
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
DRY=0
if [ "${1:-}" = "--dry" ]; then DRY=1; shift; fi
case "${1:-}" in -*) echo "usage: bash runs/gpu_check.sh [--dry] [OUT_DIR]" >&2; exit 2 ;; esac
PY="${PYTHON:-python3}"
OUT_DIR="${1:-${OUT:-$REPO/gpu_check_out}}"
mkdir -p "$OUT_DIR"
export PICOCHAT_HOME="${PICOCHAT_HOME:-$(mktemp -d)}"
SITE="$PICOCHAT_HOME/site-packages"  # the carried wheels go here, not into the image's Python
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
STEPS="$OUT_DIR/steps.jsonl"
: >"$STEPS"

# check NAME CMD...: run one step with its log in OUT, record its status and seconds. A step that hangs is
# stopped after STEP_SECONDS (rc 124) so that the others still run and the table is still written.
STEP_SECONDS="${STEP_SECONDS:-300}"
check() {
  local name="$1"; shift
  local t0=$SECONDS
  echo "==> $name: $*"
  timeout "$STEP_SECONDS" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >>"$STEPS"
  [ $rc = 0 ] || { echo "    failed (rc $rc); last lines:"; tail -5 "$OUT_DIR/$name.log"; }
}

if [ "$DRY" = 1 ]; then
  DEVICE=cpu
  # Sizes are the smallest that still run every step end to end (test_gpu_check.py runs this in the suite).
  TOKENIZER=("$PY" -m picochat.cli tokenizer train --vocab-size 512 --max-chars 50000)
  TESTS=(tests/test_cuda.py tests/test_gpt.py -k "cuda or flops or kv_cache_rows")
  BENCH_TRAIN=(--depths 2 --seq-len 64 --device-batch-size 2 --total-batch-size 128 --vocab-size 512
               --steps 1 --warmup-steps 0)
  BENCH_INFER=(--depth 2 --width 64 --vocab 512 --prompt-tokens 16 --new-tokens 16 --repeats 1 --batches 1 2)
  BASE=(--depth 1 --max-seq-len 256 --device-batch-size 2 --total-batch-size 512 --num-iterations 2)
  SFT=(--device-batch-size 2 --target-examples-per-step 2 --num-iterations 2 --eval-tokens 512
       --eval-metrics-examples 1)
else
  DEVICE=cuda
  if [ -f .whl/requirements.txt ]; then
    check wheels "$PY" -m pip install --no-deps --no-index --find-links .whl --target "$SITE" \
      -r .whl/requirements.txt
  else
    check wheels bash -c "echo 'no .whl/requirements.txt: run bash runs/gpu_wheels.sh with a network, carry .whl'; exit 1"
  fi
  TOKENIZER=(cp -r .gpu_tokenizer/. "$PICOCHAT_HOME/tokenizer/")  # trained here by runs/gpu_wheels.sh
  mkdir -p "$PICOCHAT_HOME/tokenizer"
  TESTS=(tests/test_cuda.py -rs)  # the rest of the suite does not use the GPU: it has passed here already
  BENCH_TRAIN=(--depths 12 20 --seq-len 2048 --device-batch-size 16 --total-batch-size 65536 --compile
               --device cuda --dtype bf16 --steps 5 --warmup-steps 2)
  BENCH_INFER=(--device cuda --depth 12 --width 768 --repeats 3)
  BASE=(--depth 12 --max-seq-len 2048 --device-batch-size 16 --total-batch-size 131072 --num-iterations 100)
  SFT=(--device-batch-size 16 --num-iterations 20)
fi

check tokenizer "${TOKENIZER[@]}"
check imports "$PY" -c "import rustbpe, tiktoken, pyarrow, fastapi, uvicorn, pydantic, openai, pytest, torch
import picochat.serve.app, picochat.train.base, picochat.train.sft
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.version.cuda)"
check tests "$PY" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}"
check bench_train "$PY" bench/train.py "${BENCH_TRAIN[@]}"
check bench_infer "$PY" bench/infer.py "${BENCH_INFER[@]}"
check base "$PY" -m picochat.train.base "${BASE[@]}" --device-type "$DEVICE" --eval-every 0 --sample-every 0 \
  --save-every 0 --eval-tokens 1024 --overwrite
check sft "$PY" -m picochat.train.sft -i base "${SFT[@]}" --device-type "$DEVICE" --eval-every 0 --overwrite
PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$PY" -m picochat.serve.app --stage sft --port "$PORT" --device-type "$DEVICE" >"$OUT_DIR/serve_server.log" 2>&1 &
SERVER_PID=$!
trap 'kill $SERVER_PID 2>/dev/null || true' EXIT
check serve "$PY" runs/gpu_check_client.py "http://127.0.0.1:$PORT/v1"
kill "$SERVER_PID" 2>/dev/null || true
"$PY" runs/gpu_check_summary.py "$OUT_DIR"
