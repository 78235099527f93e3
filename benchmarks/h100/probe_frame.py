"""Probe: milliseconds per graphed CSM frame (LM step alone, and codec decode alone) for a few ways of building
the step, with the replay checked against direct calls. A tool for choosing what the presets do; the figures the
README quotes come from fastpath.py.

    python benchmarks/h100/probe_frame.py [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lab import presets  # noqa: E402
from lab.engines import csm  # noqa: E402

CONFIGS = {   # name: (compile, inductor options)
    "cuda-graphs": ("cuda-graphs", {}),
    "inductor+cuda-graphs": ("inductor+cuda-graphs", {}),
    "inductor+cuda-graphs, freezing": ("inductor+cuda-graphs", {"freezing": True}),
}


@torch.no_grad()
def frames(engine, hidden, n: int, graphed: bool):
    engine.kv.reset()
    engine.prefill_step(hidden)
    run = engine._graphed_frame(0.0, 0) if graphed else (lambda h, u: engine.frame(h, u, 0.0, 0))
    h = engine.hidden_in.copy_(hidden[:, -1]) if graphed else hidden[:, -1].clone()
    out = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        codes, h = run(h, None)
        out.append(codes)
    torch.cuda.synchronize()
    return torch.cat(out), (time.perf_counter() - t0) * 1e3 / n


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--only", nargs="*")
    args = p.parse_args()
    base = presets.load("csm-cuda-graphs", weights="random")
    model, _ = csm.load_model(base)
    prompt = torch.randn(1, 40, model.config.hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
    results = {}
    for name, (compile_mode, options) in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        csm.INDUCTOR_OPTIONS = options
        torch.cuda.synchronize()
        mem0 = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        engine = csm.CsmEngine(base.replace(compile=compile_mode), model, None)
        graphs = engine.capture_graphs()
        torch.cuda.synchronize()
        build_s = time.perf_counter() - t0
        row = {"build_s": build_s, "graphs": graphs, "extra_mib": (torch.cuda.memory_allocated() - mem0) / 2**20}
        codes_g, _ = frames(engine, prompt, 20, graphed=True)
        codes_d, direct_ms = frames(engine, prompt, 20, graphed=False)
        row["replay_equals_direct"] = bool(torch.equal(codes_g, codes_d))
        row["direct_ms_per_frame"] = direct_ms
        row["graph_ms_per_frame"] = min(frames(engine, prompt, 100, graphed=True)[1] for _ in range(3))
        for n, (graph, codes_in, audio_out) in sorted(engine.decode_graphs.items()):
            engine.codec.reset()   # 20 chunks from position 0: well inside the codec's static KV
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                graph.replay()
            torch.cuda.synchronize()
            row[f"decode_{n}_frames_ms"] = (time.perf_counter() - t0) * 1e3 / 20
        results[name] = row
        print(name, json.dumps(row), flush=True)
        del engine
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
