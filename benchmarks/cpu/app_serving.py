"""The app serving many pages at once on this machine, with and without web.gradio_adapter.skip_without_rebuilding.

    LAB_COMMIT=<sha> python benchmarks/cpu/app_serving.py --out benchmarks/cpu/<commit>/app-serving [--rounds 3]

`python app.py` on the tests' tiny presets (test-sized CSM: the audio is noise, and the absolute times are this
machine's), driven by `--clients` gradio_client users submitting at once, as benchmarks/gpu/app_clients.py does:
first on `csm-tiny-batched` (every stream in one batched step, no line), then on `csm-tiny` (one at a time, the
page's line). Each round starts one server with the skipped outputs post-processed as Gradio 6.31 does
(`LAB_GRADIO_SKIPS=rebuild`: every output left out of an update rebuilt) and one without, alternating, so both
see the same machine. The CLI's own figure for the same streams (`lab.bench --streams`) runs in the same
invocation, as the floor. Writes app_serving.json and app_serving.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))

import app_clients  # noqa: E402
from lab import env  # noqa: E402
from tests.harness import AppProcess  # noqa: E402

BATCHED, QUEUED = "csm-tiny-batched", "csm-tiny"
MODES = {"gradio": {"LAB_GRADIO_SKIPS": "rebuild"}, "lab": {}}   # each server's own variables


def one_round(mode: str, clients: int, seed0: int) -> dict:
    app = AppProcess(tempfile.mkdtemp(prefix="lab-serving-"), presets_dir="tests/presets", timeout_s=300,
                     env=MODES[mode])
    try:
        from gradio_client import Client

        client = Client(app.url, verbose=False, download_files=False)   # the batched engine's build, first
        client.submit(*app_clients.compare_args(client, [BATCHED], seed0 + 900, 1), api_name="/compare").result(
            timeout=600)
        out = {}
        for name, preset, offset in (("batched", BATCHED, 0), ("queued", QUEUED, 100)):
            level = app_clients.clients_at_once(app, preset, clients, seed0 + offset)
            out[name] = {k: level[k] for k in ("ttfb_from_submit_ms", "ttfb_ms", "steady_rtf", "underruns",
                                               "clients_without_record", "done_s")}
            app_clients.log(f"{mode}: {clients} clients on {preset}: TTFB from submit p50 "
                            f"{level['ttfb_from_submit_ms']['median']:.0f} ms, server TTFB p50 "
                            f"{level['ttfb_ms']['median']:.0f} ms, steady RTF p99 {level['steady_rtf']['p99']:.3f}, "
                            f"underruns {level['underruns']}, done p99 {level['done_s']['p99']:.1f} s")
        return out
    finally:
        app.stop()


def cli_floor(clients: int, out_dir: str) -> dict:
    """The same streams through the CLI (no page, no Gradio), as sweep.json's level."""
    folder = os.path.join(out_dir, "cli")
    subprocess.run([sys.executable, "-m", "lab.bench", "--preset-file", f"tests/presets/{BATCHED}.yaml",
                    "--streams", str(clients), "--max-seconds", str(app_clients.FRAMES / 12.5), "--out", folder],
                   cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    with open(os.path.join(folder, "sweep.json")) as f:
        return json.load(f)


def chart(result: dict, path: str) -> None:
    from lab.measure import report

    plt = report._pyplot()
    fields = [("ttfb_from_submit_ms", "median", "TTFB from submit p50, ms"), ("ttfb_ms", "median",
              "server TTFB p50, ms"), ("steady_rtf", "p99", "steady RTF p99"), ("underruns", None, "underruns")]
    fig, axes = plt.subplots(2, len(fields), figsize=(13, 6))
    for row, name in enumerate(("batched", "queued")):
        for ax, (field, stat, label) in zip(axes[row], fields):
            for x, mode in enumerate(MODES):
                ys = [r[mode][name][field] if stat is None else r[mode][name][field][stat] for r in result["rounds"]]
                ax.scatter([x] * len(ys), ys, color=f"C{x}")
                ax.hlines(statistics.median(ys), x - 0.25, x + 0.25, color=f"C{x}")
            cli = (result.get("cli") or {}).get("levels", [{}])[-1]
            if name == "batched" and field in ("ttfb_ms", "steady_rtf", "underruns") and field in cli:
                floor = cli[field] if stat is None else cli[field][stat]
                ax.axhline(floor, color="grey", linestyle="--", linewidth=1)
                ax.annotate("CLI, no page", (len(MODES) - 0.55, floor), fontsize=7, color="grey", va="bottom")
            ax.set_xticks(range(len(MODES)), ["Gradio's skips", "skips left out"])
            ax.set_xlim(-0.6, len(MODES) - 0.4)
            ax.set_title(f"{label}\n{BATCHED if name == 'batched' else QUEUED}", fontsize=9)
            ax.set_ylim(bottom=0)
    fig.suptitle(f"{result['clients']} pages comparing at once, {result['env'].get('cpu_model', 'CPU')}: "
                 "tiny weights (audio is noise), dots = rounds, bar = median", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    app_clients.RANDOM_WEIGHTS = False   # tiny presets run without the switch
    result = {"env": env.environment(), "clients": args.clients, "frames": app_clients.FRAMES,
              "text": app_clients.TEXT, "weights": "tiny (test-sized; audio is noise; this machine's times)",
              "measured": "server run records (no browser: underruns are lab.measure.metrics' simulated player)",
              "modes": {"gradio": "LAB_GRADIO_SKIPS=rebuild: every output an update leaves out rebuilt (Gradio 6.31)",
                        "lab": "web.gradio_adapter.skip_without_rebuilding: only the outputs an update changes"},
              "rounds": []}

    def save():   # after every round, so that a run cut short keeps what it measured
        with open(os.path.join(args.out, "app_serving.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)

    for r in range(args.rounds):
        result["rounds"].append({mode: one_round(mode, args.clients, 1000 * (2 * r + i))
                                 for i, mode in enumerate(MODES)})
        save()
    t0 = time.time()
    result["cli"] = cli_floor(args.clients, args.out)
    result["cli_s"] = time.time() - t0
    save()
    chart(result, os.path.join(args.out, "app_serving.png"))
    print(f"wrote {args.out}/app_serving.json and app_serving.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
