"""Pocket TTS on this CPU (issue 4): the lab's loop, eager and inductor, against the model's own `generate()`,
in one process. Random weights at real size: latency only, the audio is noise.

    LAB_COMMIT=<sha> python benchmarks/cpu/pocket_vs_generate.py --out benchmarks/cpu/pocket-vs-generate
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lab import presets  # noqa: E402
from lab.cli import DEFAULT_TEXT, bench  # noqa: E402
from lab.manager import ModelManager  # noqa: E402
from lab.measure import report  # noqa: E402
from lab.request import Request  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=4.0)
    args = p.parse_args()
    manager = ModelManager()
    specs = [presets.load(n, weights="random") for n in ("pocket-tts-cpu", "pocket-tts-cpu-inductor")]
    results = bench(specs, Request(DEFAULT_TEXT, max_audio_s=args.max_seconds), args.runs, args.out, manager,
                    history_path=None, progress_bar=False, wav_dir="/tmp/pocket-wavs")
    # generate() on the eager preset's weights, same prompt, as many frames as the lab's runs made; end of speech
    # is off (random weights' head is noise), as in the lab's loop. Latents only: no codec decode is timed.
    engine = manager.get(specs[0])
    frames = max(r["timeline"]["frames"] for r in results["runs"])
    prompt_ids, frames_after_eos = engine.build_prompt(Request(DEFAULT_TEXT))
    per_frame_ms = []
    for run in range(4):   # the first warms up
        t0 = time.perf_counter()
        with torch.no_grad():
            out = engine.model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                        max_new_tokens=frames, do_sample=False, frames_after_eos=frames_after_eos,
                                        eos_threshold=float("inf"), return_dict_in_generate=True)
        made = int(out.audio_latents_mask.sum())
        if run:
            per_frame_ms.append((time.perf_counter() - t0) * 1e3 / made)
    frame_ms = 1e3 * engine.frame_samples / engine.sample_rate
    summary = {"generate_per_frame_ms": per_frame_ms, "frames": frames, "frame_ms": frame_ms}
    for spec in specs:
        warm = [r for r in results["runs"] if r["preset"] == spec.name and not r["cold"]]
        steady = sorted(r["steady_rtf"] * frame_ms for r in warm)
        summary[spec.name] = {"steady_per_frame_ms_median": statistics.median(steady),
                              "steady_per_frame_ms_range": [steady[0], steady[-1]],
                              "steady_rtf_median": statistics.median(r["steady_rtf"] for r in warm),
                              "ttfb_ms_median": statistics.median(r["ttfb_ms"] for r in warm),
                              "speedup_vs_generate": statistics.median(per_frame_ms) / statistics.median(steady)}
    with open(os.path.join(args.out, "vs_generate.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(report.table(report.summary_rows(results["runs"]), results["builds"]))
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
