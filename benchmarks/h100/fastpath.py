"""The GPU fast-path benchmark (issue 4): builds, checks and times CSM-1B's variants in one run on the H100.

    LAB_COMMIT=<sha> python benchmarks/h100/fastpath.py --part fast --out DIR
    LAB_COMMIT=<sha> python benchmarks/h100/fastpath.py --part axes --out DIR

Random weights at CSM-1B's real size, bf16: latency figures only, the audio is noise. Each part fits the device
tool's 10-minute command limit:
- `fast`: transformers `generate()` with SDPA on the same weights (the reference), then the lab's loop eager,
  compiled, CUDA-graphed, and compiled + graphed; plus the checks that a graph replays exactly its unwrapped
  step.
- `axes`: the other attention kernels, bitsandbytes, batched against per-segment prefill for a multi-turn
  context with audio turns, and float32 equality of the eager and graphed loops with `generate()`.
Writes DIR/results.json, results.csv and chart.png (lab.bench's format, every warm and cold run), and
DIR/fastpath.json (reference, checks, per-frame speed-ups) with DIR/fastpath.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lab import env, presets  # noqa: E402
from lab.cli import bench  # noqa: E402
from lab.engines import csm  # noqa: E402
from lab.manager import ModelManager  # noqa: E402
from lab.measure.metrics import Timeline  # noqa: E402
from lab.request import ContextTurn, Request  # noqa: E402

# 20 words, as the issue asks.
TEXT = "Streaming speech should start at once and keep pace with the listener, even on a busy machine tonight."
FRAME_MS = 80.0
PARTS = {
    "fast": ["csm-sdpa", "csm-sdpa-inductor", "csm-cuda-graphs", "csm-inductor-cuda-graphs", "csm-triton-cuda-graphs",
             "csm-triton-no-graph"],
    "axes": ["csm-eager", "csm-sdpa-flash", "csm-fa2", "csm-bnb-nf4", "csm-bnb-nf4-cuda-graphs", "csm-bnb-int8"],
}
PREFILL_PAIRS = [("csm-sdpa", "csm-per-segment"), ("csm-cuda-graphs", "csm-per-segment-cuda-graphs"),
                 ("csm-triton-cuda-graphs", "csm-per-segment-triton-cuda-graphs")]
# Variants measured here that are no preset: (name, preset, changes).
DERIVED = {"csm-triton-no-graph": ("csm-triton-cuda-graphs", {"compile": "off"}),
           "csm-per-segment-triton-cuda-graphs": ("csm-triton-cuda-graphs", {"prefill": "per-segment"})}


def load(name: str):
    if name in DERIVED:
        base, changes = DERIVED[name]
        return presets.load(base, weights="random").replace(name=name, description="", **changes)
    return presets.load(name, weights="random")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def spread(values: list[float]) -> dict:
    values = sorted(values)
    return {"median": statistics.median(values), "min": values[0], "max": values[-1], "n": len(values)}


def reference_generate(engine, frames: int, runs: int) -> dict:
    """transformers `generate()` on the same weights and attention: milliseconds per frame, language model only
    (no codec decode), the way docs/GPU.md measures its baseline. The first call warms up and is dropped."""
    model = engine.model
    ids = torch.tensor([engine.tokenizer(f"[0]{TEXT}")], device=engine.device)
    per_frame_ms = []
    for run in range(runs + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False,
                                 max_new_tokens=frames)
        torch.cuda.synchronize()
        made = out.shape[1]   # (batch, frames, codebooks)
        if run:
            per_frame_ms.append((time.perf_counter() - t0) * 1e3 / made)
        log(f"generate() run {run}: {made} frames, {(time.perf_counter() - t0) * 1e3 / made:.1f} ms/frame")
    return {"what": "transformers generate(), sdpa, bf16, LM only", "frames": frames,
            "prompt_tokens": ids.shape[1], "per_frame_ms": spread(per_frame_ms), "runs_ms": per_frame_ms}


def codes_of(engine, request: Request):
    chunks = list(engine.stream(request, Timeline()))
    audio = np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)
    return engine.last_codes.clone(), audio


def compare(a_codes, a_audio, b_codes, b_audio) -> dict:
    n = min(len(a_codes), len(b_codes))
    same_rows = (a_codes[:n] == b_codes[:n]).all(-1).cpu()
    first_diff = None if bool(same_rows.all()) else int((~same_rows).nonzero()[0, 0])
    m = min(len(a_audio), len(b_audio))
    return {"codes_equal": bool(torch.equal(a_codes, b_codes)), "frames": [len(a_codes), len(b_codes)],
            "first_different_frame": first_diff,
            "audio_max_abs_diff": float(np.abs(a_audio[:m] - b_audio[:m]).max()) if m else None}


def check_replay(engine, request: Request) -> dict:
    """A graphed engine against itself with graph replay switched off: the same functions (the same compiled
    kernels, for inductor+cuda-graphs), called from Python. A replay must give exactly the same codes."""
    out = {}
    for i, req in enumerate([request, Request(TEXT + " Again, once more.", max_audio_s=request.max_audio_s)]):
        g_codes, g_audio = codes_of(engine, req)
        engine.use_graphs = False
        try:
            p_codes, p_audio = codes_of(engine, req)
        finally:
            engine.use_graphs = True
        out[f"request_{i}"] = compare(g_codes, g_audio, p_codes, p_audio)
    out["against"] = "the same engine and step functions, graph replay off"
    return out


def check_float32_against_generate(frames: int) -> dict:
    """Float32 random weights on the GPU: the eager loop, the graphed loop and the graphed Triton kernels against
    `generate()`."""
    out = {}
    base = presets.load("csm-sdpa", weights="random").replace(dtype="float32", name="csm-sdpa-f32")
    eager = csm.build(base, lambda s, t: None)
    ids = torch.tensor([eager.tokenizer(f"[0]{TEXT}")], device=eager.device)
    with torch.no_grad():
        ref = eager.model.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False,
                                   max_new_tokens=frames)[0]
    for name, changes in [("eager", None), ("cuda-graphs", {"compile": "cuda-graphs"}),
                          ("triton cuda-graphs", {"compile": "cuda-graphs", "kernels": "triton"})]:
        # The same model each time (the Triton engine re-lays some weights out in place: values unchanged).
        engine = eager if changes is None else csm.CsmEngine(base.replace(**changes), eager.model, None)
        if engine.graphed:
            engine.capture_graphs()
        codes, _ = codes_of(engine, Request(TEXT, max_audio_s=frames / 12.5))
        n = min(len(ref), len(codes))
        same = (ref[:n] == codes[:n]).all(-1).cpu()
        out[name] = {"codes_equal": bool(torch.equal(ref, codes)), "frames": [len(ref), len(codes)],
                     "first_different_frame": None if bool(same.all()) else int((~same).nonzero()[0, 0])}
        log(f"float32 {name} vs generate(): {out[name]}")
    return out


def context_request(max_audio_s: float) -> Request:
    """Three earlier turns, two with 2 s of audio (a synthetic vowel-like tone: the codec encodes any audio),
    then the text to speak: the multi-turn prompt where batched and per-segment prefill differ."""
    t = np.arange(48000) / 24000
    tone = (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    turns = (ContextTurn("Hello, can you hear me clearly now?", audio=tone, speaker=1),
             ContextTurn("Yes, I can hear you very well.", audio=tone[::-1].copy(), speaker=0),
             ContextTurn("Great, then please read the next line.", speaker=1))
    return Request(TEXT, max_audio_s=max_audio_s, context=turns)


def chart(summary: dict, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(k, v) for k, v in summary["per_frame_ms"].items()]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.8))
    names = [k for k, _ in rows]
    med = [v["median"] for _, v in rows]
    lo = [v["median"] - v["min"] for _, v in rows]
    hi = [v["max"] - v["median"] for _, v in rows]
    ax.barh(names, med, xerr=[lo, hi], color=["#999" if k.startswith("generate") else "#3a7" for k in names])
    ax.axvline(FRAME_MS, color="r", ls="--", lw=1, label="real time (80 ms of audio per frame)")
    ax.axvline(FRAME_MS * 0.08, color="b", ls=":", lw=1, label="goal: RTF 0.08 (6.4 ms per frame)")
    for i, m in enumerate(med):
        ax.text(m * 1.05, i, f"{m:.1f} ms", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds per 80 ms frame (log scale; median, bars min-max) - random weights, latency only")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--part", choices=list(PARTS), required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--frames", type=int, default=None, help="frames per request (80 ms each); default 80 for "
                   "the fast part, 40 for the axes part (bitsandbytes int8 runs at RTF ~8)")
    p.add_argument("--slow-runs", type=int, default=None, help="warm runs for variants slower than real time "
                   "(default 5; 3 in the axes part)")
    args = p.parse_args()
    args.frames = args.frames or (80 if args.part == "fast" else 40)
    args.slow_runs = args.slow_runs or (5 if args.part == "fast" else 3)
    os.makedirs(args.out, exist_ok=True)
    max_audio_s = args.frames / 12.5
    request = Request(TEXT, max_audio_s=max_audio_s)
    manager = ModelManager()
    summary: dict = {"env": env.environment(), "part": args.part, "text": TEXT, "frames": args.frames,
                     "weights": "random (latency only: the audio is noise)", "checks": {}, "errors": {}}

    specs = []
    for name in PARTS[args.part]:
        try:
            specs.append(load(name))
        except Exception as e:   # refused before any build (a missing package): recorded with its reason
            summary["errors"][name] = str(e)
            log(f"{name}: refused: {e}")
    fast = [s for s in specs if s.compile != "off" and s.quantization != "bnb-int8"]
    slow = [s for s in specs if s not in fast]
    log(f"benchmarking {[s.name for s in fast]} x{args.runs} and {[s.name for s in slow]} x{args.slow_runs}")
    results = bench(fast, request, args.runs, args.out, manager, history_path=None, progress_bar=False,
                    wav_dir="/tmp/wavs")
    if slow:
        slow_results = bench(slow, request, args.slow_runs, "/tmp/slow", manager, history_path=None,
                             progress_bar=False, wav_dir="/tmp/wavs")
        results["runs"] += slow_results["runs"]
        for key in ("builds", "errors"):
            results[key].update(slow_results[key])
    log(f"errors: {results['errors']}")

    if args.part == "fast":
        for name in ("csm-cuda-graphs", "csm-inductor-cuda-graphs", "csm-triton-cuda-graphs"):
            spec = next(s for s in specs if s.name == name)
            try:
                engine = manager.get(spec)
                summary["checks"][f"{name} replay vs unwrapped step"] = check_replay(engine, request)
                summary["checks"][f"{name} run vs run"] = compare(*codes_of(engine, request),
                                                                  *codes_of(engine, request))
                log(f"check {name}: {summary['checks'][f'{name} replay vs unwrapped step']}, "
                    f"run vs run: {summary['checks'][f'{name} run vs run']}")
            except Exception as e:
                summary["errors"][f"check {name}"] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
        try:   # the same weights through the two kernel sets, graphed: bf16 sums run in another order (reported)
            triton_engine = manager.get(next(s for s in specs if s.name == "csm-triton-cuda-graphs"))
            torch_engine = manager.get(next(s for s in specs if s.name == "csm-cuda-graphs"))
            summary["checks"]["csm-triton-cuda-graphs vs csm-cuda-graphs (the same seed-0 random weights)"] = compare(
                *codes_of(triton_engine, request), *codes_of(torch_engine, request))
        except Exception as e:
            summary["errors"]["check triton vs torch"] = f"{type(e).__name__}: {e}"
        try:
            summary["reference"] = reference_generate(manager.get(specs[0]), args.frames, runs=3)
        except Exception as e:
            summary["errors"]["reference"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
    else:
        try:
            summary["checks"]["float32 vs generate()"] = check_float32_against_generate(40)
        except Exception as e:
            summary["errors"]["float32 check"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        creq = context_request(max_audio_s)
        names = sorted({n for pair in PREFILL_PAIRS for n in pair})
        pre = bench([load(n) for n in names], creq, 5, "/tmp/prefill", manager,
                    history_path=None, progress_bar=False, wav_dir="/tmp/wavs")
        for r in pre["runs"]:
            r["preset"] += " (3-turn context)"
        results["runs"] += pre["runs"]
        results["errors"].update({f"{k} (3-turn context)": v for k, v in pre["errors"].items()})
        summary["prefill"] = {}
        for batched, per_segment in PREFILL_PAIRS:
            row = {}
            for n in (batched, per_segment):
                warm = [r for r in pre["runs"] if r["preset"].startswith(n + " ") and not r["cold"]]
                if warm:
                    row[n] = {"prefill_ms": spread([r["phases_ms"]["prefill"] for r in warm]),
                              "ttfb_ms": spread([r["ttfb_ms"] for r in warm])}
            summary["prefill"][f"{batched} vs {per_segment}"] = row

    # Per-frame speed: steady RTF x 80 ms is the wall time per frame once streaming, codec decode included.
    per_frame = {}
    if "reference" in summary:
        per_frame["generate() sdpa (LM only)"] = summary["reference"]["per_frame_ms"]
    for name in [s.name for s in specs]:
        warm = [r for r in results["runs"] if r["preset"] == name and not r["cold"]]
        if warm:
            per_frame[name] = spread([r["steady_rtf"] * FRAME_MS for r in warm])
    summary["per_frame_ms"] = per_frame
    if "reference" in summary:
        ref = summary["reference"]["per_frame_ms"]["median"]
        summary["speedup_vs_generate"] = {k: ref / v["median"] for k, v in per_frame.items()}
    summary["builds"] = results["builds"]
    summary["errors"].update(results["errors"])
    from lab.measure import report

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.csv"), "w") as f:
        f.write(report.to_csv(results["runs"]))
    with open(os.path.join(args.out, "fastpath.json"), "w") as f:
        json.dump(summary, f, indent=1)
    e = summary["env"]
    chart(summary, os.path.join(args.out, "fastpath.png"),
          f"CSM-1B sizes, bf16, random weights - {e['device']} - torch {e['torch']} - commit {e['commit']}")
    report.chart(results["runs"], f"{e['device']} - torch {e['torch']} - commit {e['commit']} - random weights",
                 os.path.join(args.out, "chart.png"))
    print(report.table(report.summary_rows(results["runs"]), results["builds"]))
    print(json.dumps({k: summary[k] for k in ("per_frame_ms", "speedup_vs_generate", "checks", "prefill", "errors")
                      if k in summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
