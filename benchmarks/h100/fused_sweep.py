"""Block shapes for lab/engines/fused.py's kernels at CSM-1B's matrix shapes, picked on the H100, then the frame.

    LAB_COMMIT=<sha> python benchmarks/h100/fused_sweep.py --out DIR [--sweep linear,qkv,attention]

1. Every candidate block shape of each kernel at each shape CSM-1B uses, timed as the frame runs it: many launches
   in one CUDA graph, each on another copy of the weights (more bytes than the 50 MB L2 holds, so weights come
   from memory as they do in a frame), against torch's F.linear timed the same way. Prints the fastest shape of
   each as the dicts lab/engines/fused.py keeps (LINEAR_BLOCKS, QKV_BLOCKS, ATTENTION_BLOCKS): paste them there, so
   every build uses the same shapes (and sums in the same order).
2. csm-triton-cuda-graphs with those shapes: build time, graph replay against the unwrapped step (must be
   bit-exact), two runs of one request (must be equal), codes against the torch kernels' graphed step (bf16
   sums in another order: the first differing frame is reported, not required to be none), the frame graph
   alone in ms, a kernel profile, and 10 warm streamed runs through lab.bench.
Writes DIR/sweep.json and DIR/frame.json. Random weights: latency figures only.
"""
from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lab import env, presets  # noqa: E402
from lab.engines import fused  # noqa: E402
from lab.request import Request  # noqa: E402

L2_BYTES = 50e6
DT = torch.bfloat16
# CSM-1B: backbone width 2048, 32 heads / 8 kv heads of 64; depth decoder width 1024, 8 / 2 heads of 128;
# both MLPs 8192 wide; vocab 2051.
LINEAR_SHAPES = {   # name: (N, K, glu, stored (K, N) i.e. contiguous along outputs, norm)
    "backbone o_proj": (2048, 2048, False, False, False),
    "backbone gate_up": (8192, 2048, True, False, True),
    "backbone down": (2048, 8192, False, False, False),
    "lm_head": (2051, 2048, False, False, False),
    "depth projector": (1024, 2048, False, False, False),
    "depth o_proj": (1024, 1024, False, False, False),
    "depth gate_up": (8192, 1024, True, False, True),
    "depth down": (1024, 8192, False, False, False),
    "codebooks head": (2051, 1024, False, False, False),   # stored (vocab, width) by TritonKernels
}
QKV_SHAPES = {"backbone qkv": (32, 8, 64, 2048), "depth qkv": (8, 2, 128, 1024)}   # heads, kv heads, dim, K
ATTENTION_SHAPES = {"backbone attention": (32, 8, 64, 2048, 150), "depth attention": (8, 2, 128, 32, 16)}
# A first sweep (rows 4..32, steps 128..512, plus (2, 1024)) found (2, 1024, 4) fastest at every shape: few rows
# per program, long steps. This one searches around it.
LINEAR_CANDIDATES = list(itertools.product((1, 2, 4), (512, 1024, 2048), (2, 4, 8)))
TRANSPOSED_CANDIDATES = list(itertools.product((32, 64, 128, 256), (16, 32, 64), (4, 8)))
QKV_CANDIDATES = list(itertools.product((1, 2, 4, 8), (512, 1024), (2, 4, 8)))
ATTENTION_CANDIDATES = list(itertools.product((16, 32, 64, 128), (1, 2, 4)))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def graph_us(launches: list, replays: int = 10) -> float:
    """Microseconds per launch: all `launches` captured in one graph, replayed `replays` times."""
    for f in launches[:2]:
        f()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in launches:
            f()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(3):
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / replays / len(launches))
    return sorted(times)[1]


def pdl() -> bool:
    """The kernels are timed as a build on this device launches them (lab/engines/fused.py's tables: PDL on)."""
    return fused.pdl_available()


def copies_for(nbytes: int) -> int:
    return max(4, min(64, int(3 * L2_BYTES / nbytes) + 1))


def sweep_linear(name, n, k, glu, transposed, norm) -> dict:
    rows_total = 2 * n if glu else n
    shape = (k, rows_total) if transposed else (rows_total, k)
    nbytes = rows_total * k * 2
    weights = [torch.randn(*shape, device="cuda", dtype=DT) * 0.02 for _ in range(copies_for(nbytes))]
    x = torch.randn(1, k, device="cuda", dtype=DT)
    g = torch.randn(k, device="cuda", dtype=DT) if norm else None
    ref = torch.nn.functional.linear(x, weights[0].T if transposed else weights[0])
    ref = torch.nn.functional.silu(ref[:, :n]) * ref[:, n:] if glu else ref
    out = {"bytes": nbytes, "torch_us": graph_us([lambda w=w: torch.nn.functional.linear(
        x, w.T if transposed else w) for w in weights]), "configs": {}}
    key = (n, k, glu, transposed)
    saved = fused.LINEAR_BLOCKS.pop(key, None)   # put back below: the committed table stays as it was
    for cfg in TRANSPOSED_CANDIDATES if transposed else LINEAR_CANDIDATES:
        fused.LINEAR_BLOCKS[key] = cfg
        try:
            if not glu and not norm:
                got = fused.linear(x, weights[0], transposed=transposed, pdl=pdl())
                err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
                if not err < 1e-2:
                    raise AssertionError(f"relative error {err}")
            us = graph_us([lambda w=w: fused.linear(x, w, norm=g, eps=1e-5, glu=glu, transposed=transposed,
                                                   pdl=pdl())
                           for w in weights])
            out["configs"][str(cfg)] = us
        except Exception as e:   # a shape Triton cannot compile (too many registers): skipped, recorded
            out["configs"][str(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
    fused.LINEAR_BLOCKS.pop(key, None)
    if saved:
        fused.LINEAR_BLOCKS[key] = saved
    return out


def sweep_qkv(name, heads, kv_heads, dim, k) -> dict:
    rows = (heads + 2 * kv_heads) * dim
    weights = [torch.randn(rows, k, device="cuda", dtype=DT) * 0.02 for _ in range(copies_for(rows * k * 2))]
    x, g = torch.randn(1, k, device="cuda", dtype=DT), torch.randn(k, device="cuda", dtype=DT)
    cos, sin = torch.randn(2048, dim, device="cuda", dtype=DT), torch.randn(2048, dim, device="cuda", dtype=DT)
    pos = torch.tensor(100, device="cuda")
    q = torch.empty(1, heads, dim, device="cuda", dtype=DT)
    keys, values = (torch.zeros(1, kv_heads, 2048, dim, device="cuda", dtype=DT) for _ in range(2))
    out = {"bytes": rows * k * 2, "configs": {}}
    key = (heads + 2 * kv_heads, dim, k)
    saved = fused.QKV_BLOCKS.pop(key, None)
    for cfg in QKV_CANDIDATES:
        if cfg[0] > dim // 2:
            continue
        fused.QKV_BLOCKS[key] = cfg
        try:
            out["configs"][str(cfg)] = graph_us([lambda w=w: fused.qkv_rope(x, w, g, 1e-5, cos, sin, pos, q, keys,
                                                                            values, kv_heads, pdl=pdl())
                                                for w in weights])
        except Exception as e:
            out["configs"][str(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
    fused.QKV_BLOCKS.pop(key, None)
    if saved:
        fused.QKV_BLOCKS[key] = saved
    return out


def sweep_attention(name, heads, kv_heads, dim, slots, filled) -> dict:
    q = torch.randn(1, heads, dim, device="cuda", dtype=DT)
    caches = [[torch.randn(1, kv_heads, slots, dim, device="cuda", dtype=DT) for _ in range(2)] for _ in range(8)]
    pos = torch.tensor(filled - 1, device="cuda")
    o = torch.empty(1, heads * dim, device="cuda", dtype=DT)
    out = {"filled": filled, "configs": {}}
    saved = fused.ATTENTION_BLOCKS.pop((dim, slots), None)
    for cfg in ATTENTION_CANDIDATES:
        if cfg[0] > slots:
            continue
        fused.ATTENTION_BLOCKS[(dim, slots)] = cfg
        try:
            out["configs"][str(cfg)] = graph_us([lambda c=c: fused.attention(q, c[0], c[1], pos, o, dim ** -0.5, pdl=pdl())
                                                 for c in caches])
        except Exception as e:
            out["configs"][str(cfg)] = f"{type(e).__name__}: {str(e)[:120]}"
    fused.ATTENTION_BLOCKS.pop((dim, slots), None)
    if saved:
        fused.ATTENTION_BLOCKS[(dim, slots)] = saved
    return out


def best(configs: dict) -> tuple[str, float]:
    timed = {c: t for c, t in configs.items() if isinstance(t, float)}
    if not timed:
        raise RuntimeError(f"every candidate failed: {configs}")
    c = min(timed, key=timed.get)
    return c, timed[c]


def run_sweep(kinds: list[str]) -> dict:
    result = {"linear": {}, "qkv": {}, "attention": {}}
    shapes = {"linear": LINEAR_SHAPES, "qkv": QKV_SHAPES, "attention": ATTENTION_SHAPES}
    LINEAR, QKV, ATTENTION = ({} if kind not in kinds else shapes[kind] for kind in ("linear", "qkv", "attention"))
    for name, shape in LINEAR.items():
        r = result["linear"][name] = sweep_linear(name, *shape)
        c, us = best(r["configs"])
        r["best"], r["best_us"] = c, us
        torch_gbs = r["bytes"] / r["torch_us"] / 1e3
        log(f"{name:18s} {r['bytes'] / 1e6:6.1f} MB  torch {r['torch_us']:6.1f} us ({torch_gbs:5.0f} GB/s)  "
            f"best {c} {us:6.1f} us ({r['bytes'] / us / 1e3:5.0f} GB/s)")
    for name, shape in QKV.items():
        r = result["qkv"][name] = sweep_qkv(name, *shape)
        c, us = best(r["configs"])
        r["best"], r["best_us"] = c, us
        log(f"{name:18s} {r['bytes'] / 1e6:6.1f} MB  best {c} {us:6.1f} us ({r['bytes'] / us / 1e3:5.0f} GB/s)")
    for name, shape in ATTENTION.items():
        r = result["attention"][name] = sweep_attention(name, *shape)
        c, us = best(r["configs"])
        r["best"], r["best_us"] = c, us
        log(f"{name:18s} best {c} {us:6.1f} us")
    linear = {(s[0], s[1], s[2], s[3]): ast.literal_eval(result["linear"][n]["best"]) for n, s in LINEAR.items()}
    qkv = {(s[0] + 2 * s[1], s[2], s[3]): ast.literal_eval(result["qkv"][n]["best"]) for n, s in QKV.items()}
    attn = {(s[2], s[3]): ast.literal_eval(result["attention"][n]["best"]) for n, s in ATTENTION.items()}
    result["tables"] = {"LINEAR_BLOCKS": repr(linear), "QKV_BLOCKS": repr(qkv), "ATTENTION_BLOCKS": repr(attn)}
    fused.LINEAR_BLOCKS.update(linear)
    fused.QKV_BLOCKS.update(qkv)
    fused.ATTENTION_BLOCKS.update(attn)
    print("\n".join(f"{k} = {v}" for k, v in result["tables"].items()), flush=True)
    return result


def time_frame_graph(engine, run) -> dict:
    """Milliseconds per replay of the frame graph, 5 rounds of 20 replays from position 40."""
    from fastpath import spread

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        engine.kv.pos.fill_(40)
        start.record()
        for _ in range(20):
            run(engine.hidden_in, None)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 20)
    return spread(times)


def frame_checks(out_dir: str, runs: int) -> dict:
    from fastpath import TEXT, check_replay, codes_of, compare, spread
    from lab.cli import bench
    from lab.engines import csm
    from lab.manager import ModelManager

    result: dict = {"blocks": {"LINEAR_BLOCKS": repr(fused.LINEAR_BLOCKS), "QKV_BLOCKS": repr(fused.QKV_BLOCKS),
                               "ATTENTION_BLOCKS": repr(fused.ATTENTION_BLOCKS)}}
    spec = presets.load("csm-triton-cuda-graphs", weights="random")
    request = Request(TEXT, max_audio_s=80 / 12.5)
    manager = ModelManager()
    t0 = time.perf_counter()
    engine = manager.get(spec)
    result["build_s"] = time.perf_counter() - t0
    log(f"built in {result['build_s']:.1f} s: {engine.report}")
    result["replay vs unwrapped step"] = check_replay(engine, request)
    log(f"replay: {result['replay vs unwrapped step']}")
    a, b = codes_of(engine, request), codes_of(engine, request)
    result["run vs run"] = compare(*a, *b)
    log(f"run vs run: {result['run vs run']}")
    torch_graphs = csm.CsmEngine(spec.replace(kernels="torch"), engine.model, None)
    torch_graphs.capture_graphs()
    result["vs torch kernels, graphed (bf16)"] = compare(*a, *codes_of(torch_graphs, request))
    log(f"vs torch kernels: {result['vs torch kernels, graphed (bf16)']}")
    del torch_graphs

    # The frame graph alone: no host work, no codec; with programmatic dependent launch (PDL) and without.
    engine.kv.reset()
    for seg in engine.build_prompt(request):
        engine.hidden_in.copy_(engine.prefill_step(seg))
    pdl = engine.kernels.pdl    # what the build chose for this device
    for label, on in (("without PDL", False), ("with PDL", pdl)):
        engine.kernels.pdl = on   # read at every launch: the graph captured next runs with it
        engine.frame_graphs.clear()
        run = engine.graphed_frame(0.0, 0)
        result[f"frame_graph_ms {label}"] = time_frame_graph(engine, run)
        log(f"frame graph alone, {label}: {result[f'frame_graph_ms {label}']}")
    result["pdl"] = pdl
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run(engine.hidden_in, None)
        torch.cuda.synchronize()
    per_kernel: dict = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            name = ev.name[:70]
            t, c = per_kernel.get(name, (0.0, 0))
            per_kernel[name] = (t + ev.device_time_total / 5, c + 1 / 5)
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:15]
    result["profile_per_frame"] = {k: {"us": round(t, 1), "launches": round(c)} for k, (t, c) in top}
    result["profile_busy_ms"] = sum(t for t, _ in per_kernel.values()) / 1e3
    log(f"busy {result['profile_busy_ms']:.2f} ms/frame; top: " + json.dumps(result["profile_per_frame"], indent=0))

    # Where a streamed request's time goes beyond the frame graphs: each codec decode graph alone, and the GPU's
    # busy time over one whole request against its wall time.
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    result["decode_graph_ms"] = {}
    for frames, (graph, _, _) in sorted(engine.decode_graphs.items()):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        result["decode_graph_ms"][frames] = start.elapsed_time(end) / 10
    log(f"decode graphs, ms by chunk frames: {result['decode_graph_ms']}")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        codes_of(engine, request)
        wall_ms = (time.perf_counter() - t0) * 1e3
    busy_ms = sum(ev.device_time_total for ev in prof.events()
                  if ev.device_type == torch.autograd.DeviceType.CUDA) / 1e3
    result["one_request"] = {"wall_ms": wall_ms, "gpu_busy_ms": busy_ms, "frames": 80}
    log(f"one request: {result['one_request']}")

    # Streamed, as lab.bench measures every variant; also with longer later chunks (fewer codec calls and syncs).
    for chunk in (spec.max_chunk_frames, 32):
        variant = spec if chunk == spec.max_chunk_frames else spec.replace(max_chunk_frames=chunk,
                                                                             name=f"{spec.name}-chunk{chunk}")
        results = bench([variant], request, runs, os.path.join(out_dir, f"chunk{chunk}"), manager,
                        history_path=None, progress_bar=False, wav_dir="/tmp/wavs")
        warm = [r for r in results["runs"] if not r["cold"]]
        row = result[f"streamed, max_chunk_frames {chunk}"] = {
            "steady_rtf": spread([r["steady_rtf"] for r in warm]), "ttfb_ms": spread([r["ttfb_ms"] for r in warm]),
            "per_frame_ms": spread([r["steady_rtf"] * 80 for r in warm])}
        log(f"streamed, chunks up to {chunk}: {row}")
    return result


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--sweep", default="linear,qkv,attention", help="kernels to sweep (comma-separated; '' for "
                   "none); the others keep the tables in lab/engines/fused.py")
    p.add_argument("--runs", type=int, default=10)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    summary = {"env": env.environment(), "weights": "random (latency only)"}
    if args.sweep:
        summary["sweep"] = run_sweep(args.sweep.split(","))
        with open(os.path.join(args.out, "sweep.json"), "w") as f:
            json.dump(summary, f, indent=1)
    summary["frame"] = frame_checks(args.out, args.runs)
    with open(os.path.join(args.out, "frame.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
