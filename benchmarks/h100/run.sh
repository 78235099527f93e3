#!/usr/bin/env bash
# CSM-1B at real size with random weights on the H100 machine (the `device` tool), one part per call so each
# stays inside the 10-minute command limit (see fastpath.py for what each part runs):
#   fast: generate() reference, eager / inductor / cuda-graphs / inductor+cuda-graphs, replay checks
#   axes: eager attention, sdpa-flash, flash_attention_2, bnb nf4 (+ graphed), bnb int8, prefill, float32 checks
# Needs the wheels named in docs/GPU.md in .whl/ (transformers 5.24, bitsandbytes).
# Usage: LAB_COMMIT=<sha> bash benchmarks/h100/run.sh fast|axes OUTDIR
set -euo pipefail
part=$1 out=$2
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.txt"
python3 benchmarks/h100/fastpath.py --part "$part" --out "$out" 2>&1 | tee "$out/log.txt"
