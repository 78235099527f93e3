"""The app on the GPU machine (issue 15): `python app.py` served for real, driven by gradio_client.

    LAB_COMMIT=<sha> python benchmarks/gpu/app_clients.py --out DIR [--clients 32]
    LAB_GRADIO_SKIPS=rebuild ... (the server as Gradio post-processes by itself, to measure against)

1. The GPU default compare: csm-sdpa against csm-triton-cuda-graphs (random weights: latency only).
2. `--clients` users at once on csm-batched-cuda-graphs, which batches: no line, every stream in one step.
3. The same number at once on csm-triton-cuda-graphs, which serves one request at a time: the page's line.

No browser plays here (the machine has none): the figures are the server's own run records, and underruns are
lab.measure.metrics' simulated real-time player (one that starts at the first chunk). TTFB from submit is each
client's first run's first chunk against the moment that client submitted, on the same clock, so a wait in line
counts. Writes DIR/app_clients.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lab import env  # noqa: E402
from lab.measure.metrics import summarize  # noqa: E402
from tests.harness import AppProcess  # noqa: E402

TEXT = "Streaming speech should start at once and keep pace with the listener, even on a busy machine tonight."
FRAMES = 80


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


RANDOM_WEIGHTS = True   # --tiny: the tests' tiny presets on the CPU, to try the script here


def compare_args(client, presets: list[str], seed: int, runs: int) -> list:
    """/compare's arguments by their labels, so the script does not depend on which families have a column here."""
    values = {"text": TEXT, "seed": seed, "max_audio_s": FRAMES / 12.5, "runs": runs, "random_weights": RANDOM_WEIGHTS,
              "user_audio": None, "transport": "pcm", "listener": "", "order": ""}
    args = []
    for p in client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/compare"]["parameters"]:
        label = p.get("label") or ""
        if label.endswith(" presets"):
            family_choices = str(p.get("python_type", {}).get("type", ""))
            args.append([n for n in presets if f"'{n}'" in family_choices])
        else:
            args.append(values[p["parameter_name"]])
    return args


def records(app: AppProcess) -> list[dict]:
    if not os.path.exists(app.history):
        return []
    with open(app.history) as f:
        return [json.loads(line) for line in f if line.strip()]


def clients_at_once(app: AppProcess, preset: str, n: int, seed0: int, runs: int = 1) -> dict:
    from gradio_client import Client

    submitted, finished = {}, {}

    def one(i: int):
        client = Client(app.url, verbose=False, download_files=False)
        args = compare_args(client, [preset], seed0 + i, runs)
        submitted[i] = time.time()
        client.submit(*args, api_name="/compare").result(timeout=600)
        finished[i] = time.time()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    mine = [r for r in records(app) if r.get("preset") == preset and seed0 <= r.get("seed", -1) < seed0 + n
            and not r.get("cancelled")]
    per_client = []
    for i in range(n):
        runs_i = sorted((r for r in mine if r["seed"] == seed0 + i), key=lambda r: r["run"])
        if not runs_i:
            per_client.append({"client": i, "error": "no run recorded"})
            continue
        first = runs_i[0]
        first_chunk_at = first["time"] - first["wall_s"] + first["ttfb_ms"] / 1e3
        per_client.append({"client": i, "ttfb_from_submit_ms": (first_chunk_at - submitted[i]) * 1e3,
                           "ttfb_ms": [r["ttfb_ms"] for r in runs_i], "steady_rtf": [r["steady_rtf"] for r in runs_i],
                           "underruns": sum(r["underruns"] for r in runs_i), "done_s": finished[i] - submitted[i]})
    ok = [c for c in per_client if "error" not in c]
    return {"preset": preset, "clients": n, "runs_per_client": runs + 1, "per_client": per_client,
            "ttfb_from_submit_ms": summarize([c["ttfb_from_submit_ms"] for c in ok]),
            "ttfb_ms": summarize([t for c in ok for t in c["ttfb_ms"]]),
            "steady_rtf": summarize([t for c in ok for t in c["steady_rtf"] if t is not None]),
            "underruns": sum(c["underruns"] for c in ok), "clients_without_record": n - len(ok),
            "done_s": summarize([c["done_s"] for c in ok])}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--default", default="csm-sdpa,csm-triton-cuda-graphs")
    parser.add_argument("--batched", default="csm-batched-cuda-graphs")
    parser.add_argument("--queued", default="csm-triton-cuda-graphs")
    parser.add_argument("--presets-dir", default=None, help="LAB_PRESETS_DIR for the app (default: presets/)")
    parser.add_argument("--skip-default", action="store_true", help="leave out the default compare")
    parser.add_argument("--skip-queued", action="store_true", help="leave out the clients through the line")
    parser.add_argument("--tiny", action="store_true", help="tests/presets with tiny weights (CPU): measures nothing")
    args = parser.parse_args()
    global RANDOM_WEIGHTS
    RANDOM_WEIGHTS = not args.tiny
    default_presets = args.default.split(",")
    os.makedirs(args.out, exist_ok=True)
    result = {"env": env.environment(), "text": TEXT, "frames": FRAMES, "weights": "random (latency only)",
              "measured": "server run records (no browser: underruns are lab.measure.metrics' simulated player)",
              # LAB_GRADIO_SKIPS=rebuild: Gradio's own handling of outputs an update leaves out (docs/DESIGN.md)
              "gradio_skips": os.environ.get("LAB_GRADIO_SKIPS") or "left out (web.gradio_adapter.skip_without_rebuilding)"}
    path = os.path.join(args.out, "app_clients.json")
    app = AppProcess(tempfile.mkdtemp(prefix="lab-app-"), presets_dir="tests/presets" if args.tiny else args.presets_dir,
                     timeout_s=300)
    log(f"app.py serves {app.url}")
    try:
        from gradio_client import Client

        client = Client(app.url, verbose=False, download_files=False)
        if not args.skip_default:
            t0 = time.time()
            client.submit(*compare_args(client, default_presets, 1000, 3), api_name="/compare").result(timeout=600)
            default = [r for r in records(app) if r.get("seed") == 1000]
            result["default_compare"] = {
                "presets": default_presets, "wall_s": time.time() - t0,
                "runs": [{k: r.get(k) for k in ("preset", "run", "cold", "ttfb_ms", "steady_rtf", "rtf", "underruns")}
                         for r in default]}
            log(f"default compare: {json.dumps(result['default_compare']['runs'])}")
        # The batching preset's build (graphs per bucket) happens in a first compare of its own.
        t0 = time.time()
        client.submit(*compare_args(client, [args.batched], 2000, 1), api_name="/compare").result(
            timeout=600)
        result["batched_first_compare_s"] = time.time() - t0
        log(f"{args.batched}: first compare (its build) {result['batched_first_compare_s']:.0f} s")
        levels = [("batched", args.batched, 0)] + ([] if args.skip_queued else [("queued", args.queued, 100)])
        for name, preset, seed0 in levels:
            result[name] = level = clients_at_once(app, preset, args.clients, seed0)
            log(f"{args.clients} clients on {preset}: ttfb from submit p50 {level['ttfb_from_submit_ms']['median']:.0f}"
                f" p99 {level['ttfb_from_submit_ms']['p99']:.0f} ms, steady rtf p99 {level['steady_rtf']['p99']}, "
                f"underruns {level['underruns']}, missing {level['clients_without_record']}")
            with open(path, "w") as f:
                json.dump(result, f, indent=1, default=str)
    finally:
        app.stop()
        with open(app.log_path) as f:
            result["server_log_tail"] = f.read()[-4000:]
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
