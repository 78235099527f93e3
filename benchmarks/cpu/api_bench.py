"""The speech API against the CLI, and what HTTP costs, on this machine, in one run.

    python benchmarks/cpu/api_bench.py --out benchmarks/cpu/<commit>/api [--rounds 4] [--runs 3]

1. **API against the CLI**, hibari (real speech) and tiny CSM (tests/presets: noise, test-sized): each round runs
   `python -m lab.bench` (a fresh process: build, a cold run, `--runs` warm runs) and `--runs` requests to the
   speech API of `python app.py` (its variant built once, before the first round), alternating which goes first.
   The CLI's TTFB is the engine's (request stamp to first chunk on the host); the API's is counted twice: by its
   history records (the same engine stamps, through the page's planning, line and run loop) and by the client
   (sending the POST to the first audio byte received). The goal: the API's hibari TTFB within the CLI's spread.
2. **What HTTP costs**: the load bench (lab.loadbench) pointed at the server and at the engine in this process
   (`--endpoint inproc`), alternating, closed loop at 1 and 2 concurrent requests: the same client-side figures
   with and without HTTP, server and client in between.

Writes results.json, api_vs_cli.png, http_cost.png. Absolute times are this shared 2-core machine's: read the
ratios measured in the same run.
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

from lab import env, loadbench  # noqa: E402
from lab.measure import report  # noqa: E402
from lab.measure.metrics import summarize  # noqa: E402
from tests.harness import AppProcess  # noqa: E402

PRESETS_DIR = os.path.join(ROOT, "tests", "presets")
CASES = {   # preset: (text, cap on audio s)
    "hibari": ("The birch canoe slid on the smooth planks.", 10.0),
    "csm-tiny": ("The birch canoe slid on the smooth planks.", 2.0),
}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def cli_round(preset: str, runs: int, work: str) -> list[float]:
    """`python -m lab.bench` on the preset's file: the warm runs' TTFB (the cold one is reported apart there)."""
    text, cap = CASES[preset]
    out = tempfile.mkdtemp(dir=work, prefix=f"cli-{preset}-")
    subprocess.run([sys.executable, "-m", "lab.bench", "--preset-file", os.path.join(PRESETS_DIR, f"{preset}.yaml"),
                    "--runs", str(runs), "--text", text, "--max-seconds", str(cap), "--history", "", "--out", out],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    with open(os.path.join(out, "results.json")) as f:
        return [r["ttfb_ms"] for r in json.load(f)["runs"] if not r["cold"]]


def api_round(endpoint: loadbench.Endpoint, preset: str, runs: int) -> list[dict]:
    """`runs` requests one after another: each one's client figures and its request id."""
    import asyncio

    text, cap = CASES[preset]
    out = []
    for seed in range(runs):
        received = loadbench.Received(text, time.perf_counter())
        body = {"model": preset, "input": text, "max_audio_s": cap, "seed": seed}
        asyncio.run(loadbench.http_speech(endpoint, body, received, 24000, 120))
        if received.error:
            raise RuntimeError(f"{preset}: {received.error}")
        out.append(received.figures())
    return out


def wait_scored(history: str, timeout_s: float = 300.0) -> None:
    """Until the server's quality guardrail has scored every API run of real speech: it scores while no run holds
    it, and would otherwise share the CPU with the CLI or the in-process engine measured next."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(history) as f:
            records = [json.loads(line) for line in f if line.strip()]
        waiting = sum(r.get("quality") == "pending" for r in records) - sum("quality_of" in r for r in records)
        if waiting <= 0:
            return
        time.sleep(0.5)
    log("warning: the guardrail is still scoring; the next figures share the CPU with it")


def compare_api_cli(app: AppProcess, rounds: int, runs: int, work: str) -> dict:
    endpoint = loadbench.Endpoint.parse(app.url)
    for preset in CASES:   # built, and its cold run made, before the rounds: the API serves a built variant
        api_round(endpoint, preset, 1)
    started = len(open(app.history).read().splitlines())
    cli: dict[str, list[float]] = {p: [] for p in CASES}
    client: dict[str, list[float]] = {p: [] for p in CASES}
    for r in range(rounds):
        for preset in CASES:
            order = ("cli", "api") if r % 2 == 0 else ("api", "cli")
            for side in order:
                if side == "cli":
                    wait_scored(app.history)
                    cli[preset] += cli_round(preset, runs, work)
                else:
                    client[preset] += [f["ttfb_ms"] for f in api_round(endpoint, preset, runs)]
            log(f"round {r + 1}/{rounds}, {preset}: CLI TTFB median {summarize(cli[preset])['median']:.1f} ms, API "
                f"(client) {summarize(client[preset])['median']:.1f} ms so far")
    lines = open(app.history).read().splitlines()[started:]
    server: dict[str, list[float]] = {p: [] for p in CASES}
    for line in lines:
        rec = json.loads(line)
        if rec.get("source") == "api" and "ttfb_ms" in rec and not rec.get("cold"):
            server[rec["preset"]].append(rec["ttfb_ms"])
    out = {}
    for preset in CASES:
        c, s, k = summarize(cli[preset]), summarize(server[preset]), summarize(client[preset])
        out[preset] = {"cli_ttfb_ms": c, "api_server_ttfb_ms": s, "api_client_ttfb_ms": k,
                       "api_client_within_cli_spread": c["lo"] <= k["median"] <= c["hi"],
                       "api_server_within_cli_spread": c["lo"] <= s["median"] <= c["hi"],
                       "values": {"cli": cli[preset], "api_server": server[preset], "api_client": client[preset]}}
        log(f"{preset}: CLI {fmt(c)}; API server {fmt(s)}; API client {fmt(k)} (ms, median (spread))")
    return out


def fmt(s: dict) -> str:
    return f"{s['median']:.1f} ({s['lo']:.1f}-{s['hi']:.1f}), n={s['n']}"


def http_cost(app: AppProcess, rounds: int, requests: int) -> dict:
    """The load bench at the server and at the engine in this process, alternating, for hibari."""
    preset = "hibari"
    target = loadbench.InProcess(preset, PRESETS_DIR, 4)
    options = {"endpoint": app.url, "body": {"model": preset, "response_format": "pcm"},
               "texts": list(loadbench.DEFAULT_TEXTS), "requests": requests, "duration_s": 0, "processes": 1,
               "seed": 0, "timeout_s": 120, "default_rate": 24000, "wer_requests": 0}
    levels: dict[str, list[dict]] = {"http": [], "inproc": []}
    for warm in (None, target):   # a warm-up of each (the server's is built already; this process's is not)
        loadbench.run_level({**options, "requests": 2}, "closed", 1, warm)
    for r in range(rounds):
        for concurrency in (1, 2):
            for side in (("http", "inproc") if r % 2 == 0 else ("inproc", "http")):
                wait_scored(app.history)
                level = loadbench.run_level(options, "closed", concurrency, target if side == "inproc" else None)
                level["target"] = side
                levels[side].append(level)
                log(f"round {r + 1}/{rounds}, {side}: {loadbench.level_line(level)}")
    out = {"preset": preset, "rounds": rounds, "requests_per_level": requests, "levels": levels}
    for concurrency in (1, 2):
        per = {side: [lvl for lvl in levels[side] if lvl["concurrency"] == concurrency] for side in levels}
        ttfb = {side: summarize([lvl["ttfb_ms"]["median"] for lvl in per[side]]) for side in per}
        ttfa = {side: summarize([lvl["audible_ttfa_ms"]["median"] for lvl in per[side]]) for side in per}
        out[f"concurrency_{concurrency}"] = {
            "ttfb_median_ms": ttfb, "audible_ttfa_median_ms": ttfa,
            "http_cost_ms": ttfb["http"]["median"] - ttfb["inproc"]["median"]}
        log(f"concurrency {concurrency}: TTFB median of level medians: HTTP {fmt(ttfb['http'])}, in-process "
            f"{fmt(ttfb['inproc'])}: HTTP costs {out[f'concurrency_{concurrency}']['http_cost_ms']:.1f} ms")
    return out


def charts(results: dict, out_dir: str) -> None:
    plt = report._pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (preset, r) in zip(axes, results["api_vs_cli"].items()):
        series = [("CLI (engine)", r["values"]["cli"]), ("API (server records)", r["values"]["api_server"]),
                  ("API (client: first byte)", r["values"]["api_client"])]
        ax.boxplot([v for _, v in series], whis=(0, 100))
        ax.set_xticks(range(1, 4), [n for n, _ in series], fontsize=8)
        ax.set(ylabel="TTFB ms (warm runs)", title=f"{preset}" + (" (tiny weights: noise)" if "csm" in preset else ""))
    fig.suptitle(f"API against CLI, {results['rounds']} alternating rounds, same machine, commit {results['commit']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "api_vs_cli.png"), dpi=110)
    report.close(fig)
    cost = results["http_cost"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, marker in (("http", "o"), ("inproc", "s")):
        for lvl in cost["levels"][side]:
            ax.plot(lvl["concurrency"] + (0.05 if side == "http" else -0.05), lvl["ttfb_ms"]["median"], marker,
                    color="#4c72b0" if side == "http" else "#55a868")
        ax.plot([], [], marker, color="#4c72b0" if side == "http" else "#55a868",
                label="through the server (HTTP)" if side == "http" else "engine in the bench's process")
    ax.set(xlabel="concurrent requests", ylabel="client TTFB median per level, ms", xticks=[1, 2],
           title=f"What HTTP costs: {cost['preset']}, load bench, {cost['rounds']} alternating rounds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "http_cost.png"), dpi=110)
    report.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--runs", type=int, default=3, help="warm runs (CLI) and requests (API) per round and preset")
    p.add_argument("--load-requests", type=int, default=12, help="requests per load level")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="h26-api-bench-")
    app = AppProcess(work, presets_dir=PRESETS_DIR, timeout_s=300, env={"LAB_PREWARM": "0"})
    try:
        log(f"server at {app.url}")
        results = {"commit": env.git_commit(), "env": env.environment(), "rounds": args.rounds, "runs": args.runs}
        results["api_vs_cli"] = compare_api_cli(app, args.rounds, args.runs, work)
        results["http_cost"] = http_cost(app, max(2, args.rounds // 2), args.load_requests)
    finally:
        app.stop()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    charts(results, args.out)
    log(f"wrote {args.out}/results.json, api_vs_cli.png, http_cost.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
