"""Memory over time (not a CI test): `python app.py` on the test presets, then N compares of a tiny preset, one
after another, as a long-lived Space would see them; the server's resident memory (VmRSS) after each one.

    python benchmarks/cpu/soak.py --compares 200 --warmup 20

Writes benchmarks/cpu/soak-<commit>/soak.json and soak.png: RSS after each compare, and the growth from the end of
the warm-up to the end (the goal: at most 50 MB). Each compare ticks csm-tiny with Gradio's streaming audio (the
transport that keeps the most per run: HLS segments) and a new page session every 10 compares, as visitors come
and go; the History tab is read every 10 compares.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from test_app import compare_args  # noqa: E402  (the page's form, in the API's order)
from tests.harness import AppProcess  # noqa: E402


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compares", type=int, default=200)
    p.add_argument("--warmup", type=int, default=20, help="compares before the baseline is taken")
    p.add_argument("--transport", default="gradio", choices=["gradio", "pcm"])
    p.add_argument("--session-every", type=int, default=10, help="compares per page session (0: one session)")
    p.add_argument("--out", help="default: benchmarks/cpu/soak-<commit>/")
    args = p.parse_args()
    from gradio_client import Client

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = args.out or os.path.join(ROOT, "benchmarks", "cpu", f"soak-{commit}")
    os.makedirs(out, exist_ok=True)
    folder = tempfile.mkdtemp(prefix="lab-soak-")
    app = AppProcess(folder, presets_dir=os.path.join(ROOT, "tests", "presets"))
    samples, started = [], time.monotonic()
    try:
        client = None
        for i in range(args.compares):
            if i == 0 or (args.session_every and i % args.session_every == 0):
                client = Client(app.url, verbose=False, download_files=False, httpx_kwargs={"timeout": 120})
                client.predict([], [], "all", "", api_name="/history")
            t0, error = time.monotonic(), None
            try:
                client.predict(*compare_args(text=f"Soak number {i}.", seed=i, max_audio_s=1.0, runs=1,
                                             transport=args.transport, csm=["csm-tiny"]), api_name="/compare")
            except Exception as e:   # counted, not fatal: a soak measures memory over many compares
                error = f"{type(e).__name__}: {e}"
                client = Client(app.url, verbose=False, download_files=False, httpx_kwargs={"timeout": 120})
            samples.append({"compare": i + 1, "rss_bytes": rss_bytes(app.proc.pid),
                            "compare_s": round(time.monotonic() - t0, 3), "error": error})
            if (i + 1) % 10 == 0:
                print(f"{i + 1} compares: RSS {samples[-1]['rss_bytes'] / 2**20:.0f} MiB", flush=True)
    finally:
        app.stop()
    base = samples[min(args.warmup, len(samples)) - 1]["rss_bytes"]
    growth = samples[-1]["rss_bytes"] - base
    result = {"compares": len(samples), "warmup": args.warmup, "transport": args.transport, "commit": commit,
              "session_every": args.session_every,
              "rss_after_warmup_mib": round(base / 2**20, 1),
              "rss_at_end_mib": round(samples[-1]["rss_bytes"] / 2**20, 1),
              "growth_after_warmup_mib": round(growth / 2**20, 1), "goal_mib": 50,
              "failed_compares": sum(1 for s in samples if s["error"]),
              "wall_s": round(time.monotonic() - started, 1), "cpu_count": os.cpu_count(), "samples": samples}
    with open(os.path.join(out, "soak.json"), "w") as f:
        json.dump(result, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s["compare"] for s in samples], [s["rss_bytes"] / 2**20 for s in samples])
    ax.axvline(args.warmup, color="grey", ls=":", label="end of warm-up")
    ax.axhline(base / 2**20 + 50, color="red", ls="--", label="goal: warm-up + 50 MB")
    ax.set(xlabel="compares", ylabel="server RSS (MiB)",
           title=f"soak at {commit}: +{growth / 2**20:.1f} MiB after compare {args.warmup}")
    ax.legend()
    fig.savefig(os.path.join(out, "soak.png"), dpi=100, bbox_inches="tight")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
