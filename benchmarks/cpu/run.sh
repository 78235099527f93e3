#!/usr/bin/env bash
# CPU benchmarks on this project's 2-core machine. Absolute CPU times drift with load; compare the
# presets of one run as ratios. WAVs go to results/ (not committed).
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1
# 1) the CLI over tiny CSM, tiny Pocket TTS and hibari (real speech)
python -m lab.bench --presets hibari csm-cpu pocket-tts-cpu --weights tiny --runs 5 --max-seconds 3 \
  --out benchmarks/cpu/tiny --wavs results/cpu-tiny --history ""
# 2) Pocket TTS at real size, random weights: sdpa eager loop against the inductor-compiled step, one run
python -m lab.bench --presets pocket-tts-cpu pocket-tts-cpu-inductor --weights random --runs 10 --max-seconds 3 \
  --out benchmarks/cpu/pocket-random --wavs results/cpu-pocket --history ""
# 3) the quality guardrail over every hibari variant on the corpus (tests/data), and its own cost
python benchmarks/cpu/quality/run.py
# 4) issue 12: the CPU axes (float32 eager and inductor, int8-dynamic, int8-torchao; 1 and 2 threads) and
#    generate(), in one process, taking turns; and OpenMP's wait policy (fresh processes)
python benchmarks/cpu/axes.py --out "benchmarks/cpu/$(git rev-parse --short HEAD)"
python benchmarks/cpu/omp_wait.py --out "benchmarks/cpu/$(git rev-parse --short HEAD)/omp_wait.json"
# 5) issue 29: the default CPU presets against an earlier commit, taking turns (exit 1 if one is slower beyond the
#    spread); BASE is the commit to guard against
python benchmarks/cpu/regression.py --base "${BASE:-HEAD~1}"
