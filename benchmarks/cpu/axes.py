"""Pocket TTS on this CPU (issue 12): float32 eager, float32 inductor, int8-dynamic and int8-torchao, and
int8-dynamic with the codec decoding on its own thread (decode: thread), each at 1 and 2 threads, and the model's own
`generate()` at 1 and 2 threads, in one process. Random weights at real size: latency only, the audio is noise.

The variants take turns run by run (one cold run each, then `--runs` rounds of one warm run of every variant and
one `generate()` per thread count), so a change of the shared machine's load lands on all of them alike. The int8
variants are compared with float32 eager on the same request (greedy): the relative error of their latents and of
their decoded audio.

    LAB_COMMIT=<sha> python benchmarks/cpu/axes.py --out benchmarks/cpu/<sha>
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lab import env, machine, presets, session  # noqa: E402  (before torch: lab sets OpenMP's wait policy)
from lab.measure import report  # noqa: E402
import torch  # noqa: E402
from lab.cli import DEFAULT_TEXT  # noqa: E402
from lab.manager import ModelManager  # noqa: E402
from lab.measure.metrics import summarize  # noqa: E402
from lab.request import Request  # noqa: E402

PRESETS = ("pocket-tts-cpu", "pocket-tts-cpu-inductor", "pocket-tts-cpu-int8", "pocket-tts-cpu-torchao",
           "pocket-tts-cpu-int8-decode-thread")
THREADS = ("1", "2")
REFERENCE = "pocket-tts-cpu"   # float32 eager: what the int8 errors are measured against


def load_average() -> list[float]:
    return list(os.getloadavg())


def generate_per_frame_ms(engine, request: Request, frames: int, threads: int) -> float:
    """The model's own generate() for the engine's prompt at `threads` threads, per frame once it runs: a call
    for `frames` frames less a call for one, over the frames between, so its prefill is not spread over the frames
    (the variants' steady RTF leaves their prefill out too). Latents only (no codec decode), end of speech off
    (random weights' head is noise)."""
    torch.set_num_threads(threads)
    prompt_ids, frames_after_eos = engine.build_prompt(request)

    def call_ms(new_frames: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        with torch.no_grad():
            out = engine.model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                                        max_new_tokens=new_frames, do_sample=False, frames_after_eos=frames_after_eos,
                                        eos_threshold=float("inf"), return_dict_in_generate=True)
        return (time.perf_counter() - t0) * 1e3, int(out.audio_latents_mask.sum())

    one_ms, _ = call_ms(1)
    all_ms, made = call_ms(frames)
    return (all_ms - one_ms) / (made - 1)


def relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64).ravel(), np.asarray(want, np.float64).ravel()
    n = min(len(got), len(want))
    return float(np.linalg.norm(got[:n] - want[:n]) / np.linalg.norm(want[:n]))


def spread(values: list[float]) -> dict:
    s = summarize(values)
    return {"median": s["median"], "lo": s["lo"], "hi": s["hi"], "n": s["n"]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--runs", type=int, default=10, help="warm runs per variant (after one cold run)")
    p.add_argument("--max-seconds", type=float, default=4.0)
    p.add_argument("--presets", nargs="+", default=list(PRESETS))
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    load_before = load_average()
    specs = [presets.load(name, weights="random").replace(name=f"{name}@{threads}t", threads=threads)
             for threads in THREADS for name in args.presets]
    for spec in specs:
        machine.require(spec, weights_here=lambda s: True)
    request = Request(DEFAULT_TEXT, max_audio_s=args.max_seconds)
    manager = ModelManager()
    engines, builds = {}, {}
    for spec in specs:
        print(f"building {spec.name}", file=sys.stderr, flush=True)
        engines[spec.name] = manager.get(spec)
        builds[spec.name] = engines[spec.name].report.to_dict()
    reference = {t: engines[f"{REFERENCE}@{t}t"] for t in THREADS}

    runs, latents, audio, generate_ms = [], {}, {}, {t: [] for t in THREADS}
    for run in range(args.runs + 1):
        for spec in specs:
            engine = engines[spec.name]
            record, samples = session.run_once(engine, spec, request, cold=not engine.served, run=run)
            record["env_commit"] = env.git_commit()
            runs.append(record)
            if run == 0:
                latents[spec.name], audio[spec.name] = engine.last_latents.clone(), samples
            print(f"run {run} {spec.name}: ttfb {record['ttfb_ms']:.0f} ms, steady RTF {record['steady_rtf']:.3f}",
                  file=sys.stderr, flush=True)
        frames = runs[-1]["timeline"]["frames"]
        for t in THREADS:   # run 0 warms generate() up, as the cold run does the variants
            ms = generate_per_frame_ms(reference[t], request, frames, int(t))
            if run:
                generate_ms[t].append(ms)
    load_after = load_average()

    frame_ms = 1e3 * reference[THREADS[0]].frame_samples / reference[THREADS[0]].sample_rate
    generate_median = {t: statistics.median(generate_ms[t]) for t in THREADS}
    best_generate = min(generate_median.values())
    summary = {"generate": {t: {"per_frame_ms": spread(generate_ms[t])} for t in THREADS}, "variants": {}}
    for spec in specs:
        warm = [r for r in runs if r["preset"] == spec.name and not r["cold"]]
        per_frame = [r["steady_rtf"] * frame_ms for r in warm]
        ref = f"{REFERENCE}@{spec.threads}t"
        summary["variants"][spec.name] = {
            "quantization": spec.quantization, "compile": spec.compile, "threads": int(spec.threads),
            "decode": spec.decode,
            "ttfb_ms": spread([r["ttfb_ms"] for r in warm]),
            "steady_rtf": spread([r["steady_rtf"] for r in warm]),
            "per_frame_ms": spread(per_frame),
            "x_generate_same_threads": generate_median[spec.threads] / statistics.median(per_frame),
            "x_best_generate": best_generate / statistics.median(per_frame),
            "memory_bytes": builds[spec.name]["memory_bytes"],
            "peak_rss_bytes": max(r["peak_mem_bytes"] for r in warm),
            "build_s": builds[spec.name]["load_s"] + builds[spec.name]["warmup_s"],
            # against float32 eager at the same thread count, on the same greedy request
            "latent_rel_error": relative_error(latents[spec.name], latents[ref]),
            "audio_rel_error": relative_error(audio[spec.name], audio[ref]),
        }
    results = {"env": env.environment(), "request": {"text": request.text, "seed": request.seed,
               "max_audio_s": request.max_audio_s, "temperature": request.temperature},
               "load_average_before": load_before, "load_average_after": load_after,
               "weights": "random (latency only: the audio is noise)", "runs": runs, "builds": builds,
               "errors": {}, "summary": summary}
    report.write_results(args.out, results)
    write_table(args.out, summary)
    chart(args.out, summary, results["env"])
    print(json.dumps({"load_before": load_before, "load_after": load_after, **summary}, indent=1))
    return 0


COLUMNS = ("variant", "threads", "TTFB ms", "steady RTF", "ms per frame", "x generate() same threads",
           "x best generate()", "memory MiB", "peak RSS MiB", "latent rel. error", "audio rel. error")


def write_table(out_dir: str, summary: dict) -> None:
    """summary.csv: one line per variant (and generate()), medians with their spread (p10-p90 of 10 warm runs)."""
    def cell(s, digits):
        return f"{s['median']:.{digits}f} ({s['lo']:.{digits}f}-{s['hi']:.{digits}f})"

    lines = [",".join(COLUMNS)]
    for t, g in summary["generate"].items():
        lines.append(",".join(["generate() (latents only, steady)", t, "", "", cell(g["per_frame_ms"], 1), "1.0", "", "",
                               "", "", ""]))
    for name, v in summary["variants"].items():
        lines.append(",".join([name.split("@")[0], str(v["threads"]), cell(v["ttfb_ms"], 0), cell(v["steady_rtf"], 3),
                               cell(v["per_frame_ms"], 1), f"{v['x_generate_same_threads']:.2f}",
                               f"{v['x_best_generate']:.2f}", f"{v['memory_bytes'] / 2 ** 20:.0f}",
                               f"{v['peak_rss_bytes'] / 2 ** 20:.0f}", f"{v['latent_rel_error']:.2e}",
                               f"{v['audio_rel_error']:.2e}"]))
    with open(os.path.join(out_dir, "summary.csv"), "w") as f:
        f.write("\n".join(lines) + "\n")


def chart(out_dir: str, summary: dict, environment: dict) -> None:
    """Per-frame time of every variant against generate()'s, and TTFB, medians with p10-p90 whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, key, unit in ((axes[0], "per_frame_ms", "ms per frame (steady, decode included)"),
                          (axes[1], "ttfb_ms", "TTFB ms")):
        med = [summary["variants"][n][key]["median"] for n in names]
        lo = [m - summary["variants"][n][key]["lo"] for m, n in zip(med, names)]
        hi = [summary["variants"][n][key]["hi"] - m for m, n in zip(med, names)]
        colours = ["#4c72b0" if summary["variants"][n]["threads"] == 1 else "#dd8452" for n in names]
        ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3, color=colours)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
    for t, g in summary["generate"].items():
        axes[0].axhline(g["per_frame_ms"]["median"], linestyle="--", color="grey" if t == "1" else "black",
                        linewidth=1, label=f"generate() at {t} thread{'s' * (t != '1')} (latents only)")
    axes[0].axhline(0.15 * 80, color="#55a868", linewidth=1, label="goal: steady RTF 0.15 = 12 ms a frame")
    axes[0].legend(fontsize=7)
    axes[1].axhline(80, color="#55a868", linewidth=1, label="goal: 80 ms")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Pocket TTS, random weights (latency only: the audio is noise) · blue 1 thread, orange 2 · "
                 f"{report.environment_title(environment)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "axes.png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
