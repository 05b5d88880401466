#!/usr/bin/env bash
# Prepare what runs/gpu_check.sh carries to the GPU machine (no network there, Python 3.12, torch 2.11+CUDA):
# wheels of the packages its image lacks, for CPython 3.12 manylinux x86-64, into .whl/ (git-ignored), and a
# small tokenizer trained here into .gpu_tokenizer/. Run it here, with a network, before the GPU check.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
mkdir -p .whl
# Versions as pinned in pyproject.toml where they are pinned; --no-deps: the image has the rest.
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --dest .whl \
  rustbpe fastapi uvicorn pydantic pydantic-core starlette annotated-types typing-inspection \
  anyio sniffio h11 click openai httpx httpcore distro jiter
home="$(mktemp -d)"
PICOCHAT_HOME="$home" "$PY" -m picochat.cli tokenizer train --vocab-size 32768 --max-chars 20000000
rm -rf .gpu_tokenizer && cp -r "$home/tokenizer" .gpu_tokenizer
du -sh .whl .gpu_tokenizer
