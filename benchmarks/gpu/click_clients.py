"""Many clients clicking Compare at once, as the page does: over the page's own socket (issue 24).

    LAB_COMMIT=<sha> python benchmarks/gpu/click_clients.py --out DIR [--preset csm-batched-cuda-graphs]
        [--clients 32,64] [--gradio-clients 32]
    python benchmarks/gpu/click_clients.py --tiny --out /tmp/clicks      # the tests' tiny presets, on the CPU
    python benchmarks/gpu/click_clients.py --chart DIR/click_clients.json  # redraw DIR/click_clients.png

`python app.py` is started on a free loopback port. Each client opens the page's WebSocket (/lab/pcm), sends the
start message a click sends (web/player.js `lab.start`: the Compare form's values by name), reads the PCM chunks
of its heard run as a page would, and answers with the page's report and "played" notes so the run loop goes on
as it does for a page. The clients of one level click together (within a millisecond), in one asyncio process
whose CPU time is recorded, to show the client is not the bottleneck.

Per client: click -> first chunk received (the client's own clock), and from the server's run record
click -> request (the server's clock; both are this machine's monotonic clock), the model's TTFB, steady RTF and
the simulated player's underruns, plus the client's own underruns from the chunks' arrival times.
`--gradio-clients N`: N clients through Gradio's own event instead (gradio_client, no socket: the path the page
took before), submit -> first chunk, for before and after on the same server. Writes DIR/click_clients.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lab import env  # noqa: E402
from lab.measure.metrics import summarize, underruns  # noqa: E402

GRADIO_SEED = 900_000   # the Gradio clients' seeds start here, apart from every socket level's (1000 per level)
TEXT = "Streaming speech should start at once and keep pace with the listener, even on a busy machine tonight."


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Server:
    """`python app.py` on a free loopback port, its history in a temporary folder."""

    def __init__(self, folder: str, presets_dir: str | None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.history = os.path.join(folder, "history.jsonl")
        variables = {**os.environ, "PORT": str(self.port), "GRADIO_SERVER_NAME": "127.0.0.1", "HF_HUB_OFFLINE": "1",
                     "GRADIO_ANALYTICS_ENABLED": "False", "LAB_HISTORY": self.history, "LAB_PREWARM": "0",
                     "LAB_VOTES": os.path.join(folder, "votes.jsonl"), "GRADIO_TEMP_DIR": os.path.join(folder, "g"),
                     "LAB_MAX_WAITING": "256"}
        if presets_dir:
            variables["LAB_PRESETS_DIR"] = presets_dir
        self.log = open(os.path.join(folder, "server.log"), "w")
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=variables, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("app.py did not serve; see " + self.log.name)
                time.sleep(0.5)

    def records(self) -> list[dict]:
        if not os.path.exists(self.history):
            return []
        with open(self.history) as f:
            return [json.loads(line) for line in f if line.strip()]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def compare_inputs(preset: str, family: str, seed: int, max_audio_s: float, random_weights: bool) -> dict:
    """The Compare form's values by name, as web/player.js sends them (web.tabs.compare.CompareTab.input_names)."""
    return {"order": preset, "text": TEXT, "seed": seed, "max_audio_s": max_audio_s, "runs": 1,
            "random_weights": random_weights, "user_audio": None, "transport": "pcm", f"presets {family}": [preset]}


async def one_client(url: str, inputs: dict, go: asyncio.Event, out: dict) -> None:
    """A page's socket: waits for `go`, clicks, and reads its heard run as the page does."""
    import websockets

    listener = secrets.token_hex(8)
    ws_url = url.replace("http://", "ws://") + f"lab/pcm?listener={listener}"
    async with websockets.connect(ws_url, max_size=None, ping_interval=None) as ws:
        await go.wait()
        comparison_id = secrets.token_hex(8)
        t_click = time.perf_counter()
        await ws.send(json.dumps({"type": "start", "kind": "compare", "id": comparison_id, "inputs": inputs,
                                  "t_click_ms": None, "t_click_s": t_click}))
        out.update(comparison_id=comparison_id, t_click=t_click, arrivals=[])
        run_id, rate = None, 24000
        async for message in ws:
            now = time.perf_counter()
            if isinstance(message, bytes):
                n = int.from_bytes(message[:4], "little")
                header = json.loads(message[4:4 + n])
                if header["run_id"] == run_id:
                    rate = header["sample_rate"]
                    out["arrivals"].append((now, (len(message) - 4 - n) / 2 / rate))
                continue
            msg = json.loads(message)
            if msg["type"] == "run":
                run_id = msg["run_id"]
            elif msg["type"] == "end" and msg["run_id"] == run_id:
                first = out["arrivals"][0][0] if out["arrivals"] else None
                await ws.send(json.dumps({
                    "type": "report", "run_id": run_id, "transport": "pcm", "complete": True,
                    "click_to_received_ms": None if first is None else (first - t_click) * 1e3,
                    "chunks": len(out["arrivals"]), "underruns": underruns(out["arrivals"])[0]}))
                await ws.send(json.dumps({"type": "played", "run_id": run_id, "transport": "pcm"}))
            elif msg["type"] == "done":
                out["done"] = now
                return


async def click_together(url: str, inputs_for, clients: int, timeout_s: float) -> list[dict]:
    go = asyncio.Event()
    outs = [{} for _ in range(clients)]
    tasks = [asyncio.create_task(one_client(url, inputs_for(i), go, outs[i])) for i in range(clients)]
    await asyncio.sleep(1.0)   # every socket open before anyone clicks
    go.set()
    done, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    for task, out in zip(tasks, outs):
        if task in done and task.exception() is not None:
            out["error"] = repr(task.exception())
    return outs


def level(server: Server, outs: list[dict], cpu_s: float, wall_s: float) -> dict:
    """Per-client figures of one level, joined with the server's heard-run records by comparison id."""
    heard = {r.get("comparison_id"): r for r in server.records() if r.get("heard") and r.get("comparison_id")}
    rows = []
    for out in outs:
        record = heard.get(out.get("comparison_id"), {})
        arrivals = out.get("arrivals") or []
        rows.append({
            "click_to_first_chunk_ms": (arrivals[0][0] - out["t_click"]) * 1e3 if arrivals else None,
            "click_to_request_ms": record.get("click_to_request_ms"), "ttfb_ms": record.get("ttfb_ms"),
            "steady_rtf": record.get("steady_rtf"), "server_underruns": record.get("underruns"),
            "client_underruns": underruns(arrivals)[0] if arrivals else None,
            "client_stall_s": underruns(arrivals)[1] if arrivals else None,
            "audio_s": sum(a for _, a in arrivals), "phases_ms": record.get("phases_ms"), "error": out.get("error")})
    return {"clients": len(outs), "per_client": rows,
            "click_to_first_chunk_ms": summarize([r["click_to_first_chunk_ms"] for r in rows]),
            "click_to_request_ms": summarize([r["click_to_request_ms"] for r in rows]),
            "ttfb_ms": summarize([r["ttfb_ms"] for r in rows]),
            "ttfb_phases_ms": {p: summarize([(r["phases_ms"] or {}).get(p) for r in rows])
                               for p in ("session", "prefill", "generator", "first_frame", "first_decode")},
            "steady_rtf": summarize([r["steady_rtf"] for r in rows]),
            "clients_with_underruns": sum(bool(r["client_underruns"]) for r in rows),
            "missing": sum(r["click_to_first_chunk_ms"] is None for r in rows),
            "client_cpu_s": cpu_s, "client_wall_s": wall_s}


def gradio_clients(server: Server, preset: str, family: str, clients: int, random_weights: bool) -> dict:
    """The path before: each client submits Gradio's /compare event (no socket), submit -> first chunk."""
    from gradio_client import Client

    submitted, jobs = {}, []
    made = [Client(server.url, verbose=False, download_files=False) for _ in range(clients)]
    params = made[0].view_api(return_format="dict", print_info=False)["named_endpoints"]["/compare"]["parameters"]
    for i, client in enumerate(made):
        inputs = {**compare_inputs(preset, family, GRADIO_SEED + i, 6.4, random_weights), "listener": ""}
        args = [inputs.get(p["parameter_name"], inputs.get(p.get("label") or "", []))
                if not (p.get("label") or "").endswith(" presets") else
                ([preset] if p["label"] == f"{family} presets" else []) for p in params]
        submitted[GRADIO_SEED + i] = time.time()
        jobs.append(client.submit(*args, api_name="/compare"))
    for job in jobs:
        job.result(timeout=600)
    rows = []
    for r in server.records():
        if r.get("heard") and r.get("seed") in submitted and "ttfb_ms" in r:
            first_chunk_wall = r["time"] - r["wall_s"] + r["ttfb_ms"] / 1e3
            rows.append((first_chunk_wall - submitted[r["seed"]]) * 1e3)
    return {"clients": clients, "submit_to_first_chunk_ms": summarize(rows), "missing": clients - len(rows)}


GOALS_MS = {32: 400, 64: 600}   # issue 24: click -> first chunk received, p99


def chart(results: dict, path: str) -> None:
    """Each level's clients, click -> first chunk and click -> request (dots, one per client), with the goals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = results["levels"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(levels) + 2), 4.2))
    for i, lvl in enumerate(levels):
        for key, colour, dx in (("click_to_first_chunk_ms", "#4c72b0", 0.12), ("click_to_request_ms", "#dd8452", -0.12)):
            ys = [r[key] for r in lvl["per_client"] if r[key] is not None]
            ax.scatter([i + dx] * len(ys), ys, s=8, color=colour, alpha=0.6,
                       label={"click_to_first_chunk_ms": "click → first chunk received",
                              "click_to_request_ms": "click → request (server)"}[key] if i == 0 else None)
        goal = GOALS_MS.get(lvl["clients"])
        if goal:
            ax.hlines(goal, i - 0.3, i + 0.3, color="#c44e52", ls="--", lw=1, label="goal, p99" if i == 0 else None)
    ax.set_xticks(range(len(levels)), [f"{lvl['clients']} clients\n(level {i + 1})" for i, lvl in enumerate(levels)],
                  fontsize=8)
    ax.set_ylabel("ms from the click", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    env_ = results["env"]
    ax.set_title(f"{results['preset']} ({results['weights']} weights: latency only), clicks together over the page's "
                 f"socket\n{env_['device']} · torch {env_['torch']} · commit {env_['commit']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--chart", metavar="JSON", help="only draw DIR/click_clients.png from a results file")
    p.add_argument("--out")
    p.add_argument("--preset", default="csm-batched-cuda-graphs")
    p.add_argument("--clients", default="32,64")
    p.add_argument("--gradio-clients", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=6.4)
    p.add_argument("--tiny", action="store_true", help="the tests' presets (csm-tiny-batched), on the CPU")
    args = p.parse_args()
    if args.chart:
        with open(args.chart) as f:
            chart(json.load(f), os.path.join(os.path.dirname(args.chart), "click_clients.png"))
        return 0
    if not args.out:
        p.error("--out DIR is needed")
    os.makedirs(args.out, exist_ok=True)
    presets_dir = os.path.join(ROOT, "tests", "presets") if args.tiny else None
    preset = "csm-tiny-batched" if args.tiny else args.preset
    random_weights = not args.tiny
    family = "csm"
    folder = tempfile.mkdtemp(prefix="clicks-")
    server = Server(folder, presets_dir)
    log(f"app.py serves {server.url}")
    results = {"env": env.environment(), "preset": preset, "weights": "tiny" if args.tiny else "random",
               "text": TEXT, "max_audio_s": args.max_seconds, "levels": []}
    try:
        def inputs_for(base):
            return lambda i: compare_inputs(preset, family, base + i, args.max_seconds, random_weights)

        t0 = time.perf_counter()
        asyncio.run(click_together(server.url, inputs_for(0), 1, 900))   # the build, and its cold run
        log(f"{preset}: first click (its build) {time.perf_counter() - t0:.0f} s")
        for n, clients in enumerate(int(c) for c in args.clients.split(",")):
            cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            outs = asyncio.run(click_together(server.url, inputs_for(1000 * (n + 1)), clients, 600))
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            time.sleep(1.0)    # the last records reach the history
            row = level(server, outs, cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime,
                        time.perf_counter() - wall0)
            results["levels"].append(row)
            c, q = row["click_to_first_chunk_ms"], row["click_to_request_ms"]
            log(f"{clients} clients: click -> first chunk p50 {c['median']:.0f} p99 {c['p99']:.0f} ms; click -> "
                f"request p50 {q['median'] or 0:.0f} p99 {q['p99'] or 0:.0f} ms; TTFB p99 {row['ttfb_ms']['p99'] or 0:.0f}"
                f" ms (phases p99: " + ", ".join(f"{k} {v['p99'] or 0:.0f}" for k, v in row["ttfb_phases_ms"].items())
                + f"); steady RTF p99 {row['steady_rtf']['p99'] or 0:.3f}; clients with underruns "
                f"{row['clients_with_underruns']}; missing {row['missing']}; client CPU {row['client_cpu_s']:.2f} s "
                f"in {row['client_wall_s']:.1f} s")
        if args.gradio_clients:
            g = gradio_clients(server, preset, family, args.gradio_clients, random_weights)
            results["gradio_event_path"] = g
            s = g["submit_to_first_chunk_ms"]
            log(f"{args.gradio_clients} clients through Gradio's event (before): submit -> first chunk p50 "
                f"{s['median'] or 0:.0f} p99 {s['p99'] or 0:.0f} ms; missing {g['missing']}")
    finally:
        server.stop()
        with open(os.path.join(args.out, "click_clients.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        if results["levels"]:
            chart(results, os.path.join(args.out, "click_clients.png"))
        log(f"wrote {args.out}/click_clients.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
