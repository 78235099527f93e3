#!/usr/bin/env bash
# The speech API under load on the GPU machine (issue 26's goals), through HTTP on loopback, in one call:
#   1. poisson:     Poisson 100 requests/s of 6 s utterances for 30 s  -> audible TTFA p95 <= 150 ms, C100 = 100%
#   2. concurrency: 1024 concurrent streams of 20 s each                -> steady RTF p99 <= 0.5, no underrun
#   3. slo:         the highest Poisson rate whose audible TTFA p95 <= 150 ms with C100 = 100% (bisection)
# CSM-1B sizes with random weights (latency only: the audio is noise), preset csm-batched-inductor-cuda-graphs (the
# one the in-process figures the goals cite came from; about 240 s of inductor build), asked for as the model id
# "csm-batched-inductor-cuda-graphs:random" (MODEL= picks another; 7cb70f1's run used csm-batched-cuda-graphs). `python app.py` serves page and API on 127.0.0.1:7860; the load
# bench (`python -m lab.bench --endpoint`) runs in CLIENT_PROCESSES processes and records each one's CPU use, so a
# saturated client shows (client CPU in every level's line and JSON, and the send lag behind the schedule).
#
# Needs the wheels the app needs in .whl/ (docs/GPU.md: transformers 5.24, gradio 6.31 and its dependencies,
# fastapi, uvicorn, websockets), carried with the call:
#   device run: command "LAB_COMMIT=<sha> bash benchmarks/gpu/api_bench.sh", carry [".whl"], timeout_s 600
# Writes under $OUT (at most 9 files, 2 folders down): log.txt, nvidia-smi.txt, server.json (the server's own
# records per part), and per part load.json + its chart.
# PARTS picks parts (default "poisson concurrency slo"); SLO_PROBES caps the search's levels. The other variables
# below resize the goals, e.g. for a smoke run on the CPU: MODEL=csm-tiny-batched LAB_PRESETS_DIR=tests/presets
# RATE=2 ARRIVALS_S=3 STREAMS=4 STREAM_S=1 UTTERANCE_S=1 SEARCH_RANGE=1,4 SLO_PROBES=2 CLIENT_PROCESSES=2 PYTHON=venv/bin/python PORT=<free port>.
set -uo pipefail
OUT=${OUT:-/tmp/api-bench-out}
PARTS=${PARTS:-"poisson concurrency slo"}
CLIENT_PROCESSES=${CLIENT_PROCESSES:-8}
SLO_PROBES=${SLO_PROBES:-7}
MODEL=${MODEL:-csm-batched-inductor-cuda-graphs:random}
RATE=${RATE:-100} ARRIVALS_S=${ARRIVALS_S:-30} UTTERANCE_S=${UTTERANCE_S:-6}
STREAMS=${STREAMS:-1024} STREAM_S=${STREAM_S:-20}
SLO_MS=${SLO_MS:-150} SEARCH_RANGE=${SEARCH_RANGE:-25,400}
PORT=${PORT:-7860}
PYTHON=${PYTHON:-python3}
URL=http://127.0.0.1:$PORT
mkdir -p "$OUT"
LOG=$OUT/log.txt
exec > >(tee -a "$LOG") 2>&1

if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheels did not install"; exit 1; }
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/nvidia-smi.txt"
cat "$OUT/nvidia-smi.txt"
# 1024 streams are 1024 sockets on each side.
ulimit -n 65536 || ulimit -n "$(ulimit -Hn)"

WORK=$(mktemp -d /tmp/api-bench.XXXXXX)
echo "[$(date +%T)] starting python app.py"
PORT=$PORT GRADIO_SERVER_NAME=127.0.0.1 GRADIO_ANALYTICS_ENABLED=False LAB_PREWARM=0 LAB_MAX_WAITING=4096 \
    LAB_HISTORY=$WORK/history.jsonl LAB_VOTES=$WORK/votes.jsonl GRADIO_TEMP_DIR=$WORK/gradio \
    "$PYTHON" app.py > "$WORK/server.log" 2>&1 &
SERVER=$!
stop_server() { kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null; echo "--- server log (tail)"; tail -n 30 "$WORK/server.log"; }
trap stop_server EXIT
for _ in $(seq 1 240); do
    curl -sf "$URL/v1/models" > "$WORK/models.json" && break
    kill -0 "$SERVER" 2>/dev/null || { echo "app.py exited"; exit 1; }
    sleep 0.5
done
"$PYTHON" - "$WORK/models.json" "$MODEL" <<'EOF' || exit 1
import json, sys
ids = [m["id"] for m in json.load(open(sys.argv[1]))["data"]]
print("models here:", ", ".join(ids))
sys.exit(0 if sys.argv[2] in ids else f"{sys.argv[2]} is not served here")
EOF

# The build (weights, one CUDA graph per bucket) and its cold run, before anything is measured.
echo "[$(date +%T)] building $MODEL through its first request"
curl -sS -o /dev/null -w "first request: HTTP %{http_code} in %{time_total} s\n" --max-time 500 "$URL/v1/audio/speech" \
    -H 'Content-Type: application/json' -d "{\"model\": \"$MODEL\", \"input\": \"Warm up.\", \"max_audio_s\": 2}"

TEXT="Streaming speech should start at once and keep pace with the listener, even on a busy machine tonight."
MARKS=$WORK/marks.txt   # "part first-record-line": which server records each part made
bench() {   # part name, then the bench's own arguments
    local part=$1; shift
    echo "[$(date +%T)] part $part"
    echo "$part $(( $(wc -l < "$WORK/history.jsonl" 2>/dev/null || echo 0) + 1 ))" >> "$MARKS"
    "$PYTHON" -m lab.bench --endpoint "$URL" --model "$MODEL" --text "$TEXT" --processes "$CLIENT_PROCESSES" \
        --timeout-s 240 --out "$OUT/$part" "$@"
}
for part in $PARTS; do
    case $part in
        poisson) bench poisson --rate "$RATE" --duration-s "$ARRIVALS_S" --requests 0 \
                     --max-audio-s "$UTTERANCE_S" --warmup 4 ;;
        concurrency) bench concurrency --concurrency "$STREAMS" --requests "$STREAMS" --max-audio-s "$STREAM_S" \
                         --warmup 0 ;;
        slo) bench slo --slo-ttfa-ms "$SLO_MS" --search rate --search-range "$SEARCH_RANGE" \
                 --search-probes "$SLO_PROBES" --duration-s 15 --requests 0 --max-audio-s "$UTTERANCE_S" --warmup 0 ;;
        *) echo "unknown part $part (poisson, concurrency, slo)"; exit 2 ;;
    esac
done
echo "[$(date +%T)] server-side records: $(wc -l < "$WORK/history.jsonl") runs"
# The server's own view of each part (its TTFB runs from the request's arrival at the server, so client TTFB less
# this is what HTTP and the client cost), to server.json.
"$PYTHON" - "$WORK/history.jsonl" "$MARKS" "$OUT/server.json" <<'EOF2'
import json, sys
from lab.measure.metrics import summarize
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
marks = [line.split() for line in open(sys.argv[2])]
out = {}
for i, (part, first) in enumerate(marks):
    end = int(marks[i + 1][1]) - 1 if i + 1 < len(marks) else len(records)
    runs = [r for r in records[int(first) - 1:end] if r.get("source") == "api"]
    pick = lambda key: [r.get(key) for r in runs]  # noqa: E731
    phase = lambda name: [(r.get("phases_ms") or {}).get(name) for r in runs]  # noqa: E731
    out[part] = {"runs": len(runs), "ttfb_ms": summarize(pick("ttfb_ms")), "steady_rtf": summarize(pick("steady_rtf")),
                 "wait_for_slot_ms": summarize(phase("session")), "prefill_ms": summarize(phase("prefill"))}
    s, f = out[part], lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    print(f"server side, {part}: {len(runs)} runs, TTFB p50 {f(s['ttfb_ms']['median'], '.0f')} p95 "
          f"{f(s['ttfb_ms']['p95'], '.0f')} ms, steady RTF p99 {f(s['steady_rtf']['p99'], '.3f')}, wait for a slot "
          f"p95 {f(s['wait_for_slot_ms']['p95'], '.0f')} ms")
json.dump(out, open(sys.argv[3], "w"), indent=1)
EOF2
