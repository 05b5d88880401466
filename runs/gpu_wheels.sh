#!/usr/bin/env bash
# Prepare what runs/gpu_check.sh carries to the GPU machine (no network there, Python 3.12, torch 2.11+CUDA):
# wheels of the packages its image lacks, for CPython 3.12 manylinux x86-64, into .whl/ (git-ignored), and a
# small tokenizer trained here into .gpu_tokenizer/. Run it here, with a network, before the GPU check:
#
#   PYTHON=/path/to/picochat/venv/bin/python bash runs/gpu_wheels.sh
#
# runs/gpu_check_wheels.py lists the packages, each pinned to the version installed in that environment
# (the one picochat's tests passed with), into .whl/requirements.txt; gpu_check.sh installs exactly those.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"
rm -rf .whl && mkdir -p .whl  # no wheel of an older run may linger beside its replacement
"$PY" runs/gpu_check_wheels.py >.whl/requirements.txt
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --dest .whl -r .whl/requirements.txt
home="$(mktemp -d)"
PICOCHAT_HOME="$home" "$PY" -m picochat.cli tokenizer train --vocab-size 32768 --max-chars 20000000
rm -rf .gpu_tokenizer && cp -r "$home/tokenizer" .gpu_tokenizer
rm -rf "$home"
du -sh .whl .gpu_tokenizer
