#!/usr/bin/env bash
# CSM-1B at real size with random weights on the H100 machine (the `device` tool), one part per call
# so each stays inside the 10-minute command limit:
#   part a: eager, sdpa, sdpa-flash, sdpa + inductor      part b: bnb-int8, bnb-nf4
# Needs the wheels named in ../shared/GPU.md in .whl/ (transformers 5.24, bitsandbytes).
# Usage: LAB_COMMIT=<sha> bash benchmarks/h100/run.sh a|b OUTDIR
set -euo pipefail
part=$1 out=$2
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
case $part in
  a) presets="csm-eager csm-sdpa csm-sdpa-flash csm-sdpa-inductor" ;;
  b) presets="csm-bnb-int8 csm-bnb-nf4" ;;
  *) echo "part must be a or b" >&2; exit 2 ;;
esac
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/nvidia-smi.txt"
# 3.2 s of audio = 40 frames, as in ../shared/GPU.md's baseline.
python3 -m lab.bench --presets $presets --weights random --runs 5 --max-seconds 3.2 \
  --out "$out" --wavs /tmp/wavs --history "$out/history.jsonl" 2>&1 | tr '\r' '\n' | grep -v '^\s*$' | grep -vE '(it/s|s/run|run/s)\]\s*$' | tail -n 40
