"""The notes' question at real size (issue 27): Qwen2.5-Omni-7B streaming speech on one GPU, every axis in one run.

    LAB_COMMIT=<sha> python benchmarks/gpu/qwen_omni.py --out DIR [--budget-s 540] [--runs 3]
    python benchmarks/gpu/qwen_omni.py --out /tmp/h27-smoke --smoke     # tiny weights on the CPU, to try it here

Qwen2.5-Omni-7B at real size (qwen_omni.real_size_config(): the 7B's published sizes), random weights (latency
only: the audio is noise), bf16, vision tower left out. One model is built and every row's engine wraps it
(attention, compile, prefill, CUDA graphs, DiT steps and chunking are the engine's; bitsandbytes rows load their
own quantized copy, last, if the package is there and time is left). Each row: a text prompt -> first audio, and
a 5 s spoken turn -> first audio, `--runs` warm runs each after one cold run, with TTFB, the phases (PHASE_NAMES),
RTF, steady RTF and peak memory; transformers' generate(return_audio=True) on the same prompts is the
"x generate()" baseline (its first audio is its whole waveform). Rows are time-boxed: one that would not fit the
budget is skipped and named. Writes DIR/qwen_omni.json and DIR/qwen_omni.png (TTFB stacked by phase per row, the
notes' MiniCPM-o figures drawn beside).
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
from lab.engines import qwen_omni as qo  # noqa: E402
from lab.engines import torch_common as tc  # noqa: E402
from lab.measure.metrics import PHASES, Timeline, figures  # noqa: E402
from lab.request import Request  # noqa: E402

TEXT = "Tell me in two sentences why the sky looks blue on a clear afternoon."
SPOKEN_S = 5.0
MAX_AUDIO_S = 4.0
NOTES = {"MiniCPM-o 2.6, SDPA + compile + batched prefill, H100 (the notes)": {"ttfb_ms": 840, "rtf": 0.54},
         "MiniCPM-o 2.6, same, A10G (the notes)": {"ttfb_ms": 1200, "rtf": 0.72}}
GOALS = {"text_ttfb_ms": 300, "spoken_ttfb_ms": 400, "steady_rtf": 0.2}   # issue 27
# The fast path first: a row the time box skips should be one of the slow-to-build inductor rows.
ROWS = ["qwen-omni-sdpa", "qwen-omni-cuda-graphs", "qwen-omni-cuda-graphs-fast-dit", "qwen-omni-sdpa-flash",
        "qwen-omni-fa2", "qwen-omni-sdpa-compile", "qwen-omni-sdpa-compile-per-segment"]
BNB_ROWS = ["qwen-omni-bnb-nf4", "qwen-omni-bnb-int8"]
COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]   # one per phase, in PHASES order
ROW_RESERVE_S = {"default": 45, "inductor": 150, "bnb": 200}   # what a row needs at least; skipped with less left


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def spec_for(name: str, smoke: bool):
    spec = presets.load(name, weights="tiny" if smoke else "random")
    if smoke:   # the same code paths, on the CPU
        spec = spec.replace(device="cpu", dtype="float32", threads="1",
                            attention="sdpa" if spec.attention != "eager" else "eager",
                            compile="off",
                            quantization="none")
    return spec


def requests(smoke: bool) -> dict[str, Request]:
    rate = qo.INPUT_SAMPLE_RATE_HZ
    rng = np.random.default_rng(0)
    spoken = (0.1 * rng.standard_normal(int(SPOKEN_S * rate))).astype(np.float32)   # 5 s of audio in; content
    cap = 1.0 if smoke else MAX_AUDIO_S                                            # is noise to random weights
    return {"text": Request(TEXT, max_audio_s=cap, seed=0),
            "spoken": Request("Answer what I said.", max_audio_s=cap, seed=0, user_audio=spoken,
                              user_audio_sample_rate=rate)}


def measure(engine, request: Request, runs: int) -> dict:
    """One cold run, then `runs` warm ones: each one's figures and peak memory; the median run's phases."""
    out = []
    for i in range(runs + 1):
        timeline = Timeline()
        engine.reset_peak_memory()
        for _ in engine.stream(request, timeline):
            pass
        f = figures(timeline)
        f["peak_mem_bytes"] = engine.peak_memory_bytes()
        f["cold"] = i == 0
        out.append(f)
    warm = [f for f in out if not f["cold"]] or out
    by_ttfb = sorted(warm, key=lambda f: f["ttfb_ms"])
    mid = by_ttfb[(len(by_ttfb) - 1) // 2]
    return {"runs": out, "ttfb_ms": statistics.median(f["ttfb_ms"] for f in warm),
            "ttfb_ms_min_max": [by_ttfb[0]["ttfb_ms"], by_ttfb[-1]["ttfb_ms"]],
            "cold_ttfb_ms": out[0]["ttfb_ms"], "rtf": statistics.median(f["rtf"] for f in warm),
            "steady_rtf": statistics.median(f["steady_rtf"] for f in warm if f["steady_rtf"] is not None)
            if any(f["steady_rtf"] is not None for f in warm) else None,
            "audio_s": mid["audio_s"], "phases_ms": {qo.PHASE_NAMES[p]: mid["phases_ms"][p] for p in PHASES},
            "peak_mem_bytes": max(f["peak_mem_bytes"] for f in out), "codes": len(engine.last_codes),
            "thinker_tokens": len(engine.last_tokens)}


class CodecRange:
    """A logits processor for generate()'s talker with random weights: no code past the DiT's codebook (which
    would index past its embedding), the engine's own rule (QwenOmniEngine.talker_logit_mask)."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, input_ids, scores):
        return scores + self.mask.to(scores.device)


def generate_baseline(engine, request: Request, runs: int, codes: int, tokens: int) -> dict:
    """transformers' own generate(return_audio=True): the whole waveform at the end, so its first audio is its wall
    time. The same prompt, the same thinker token cap and code count as the engine's run of it, greedy."""
    model = engine.model
    ids, _, features, mask = engine.build_prompt(request, request.user_audio)
    kwargs = {} if features is None else dict(input_features=features.to(engine.device),
                                               feature_attention_mask=mask.to(engine.device))
    from transformers import LogitsProcessorList

    walls = []
    for i in range(runs + 1):
        sync()
        t0 = time.perf_counter()
        _, wav = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), speaker=qo.SPEAKER,
                                thinker_max_new_tokens=max(2, tokens + 1), thinker_do_sample=False,
                                talker_do_sample=False, talker_max_new_tokens=codes,
                                talker_logits_processor=LogitsProcessorList([CodecRange(engine.talker_logit_mask)]),
                                token2wav_num_steps=engine.spec.dit_steps, **kwargs)
        sync()
        walls.append((time.perf_counter() - t0) * 1e3)
    audio_s = len(wav) / qo.OUTPUT_SAMPLE_RATE_HZ
    warm = walls[1:] or walls
    return {"ttfb_ms": statistics.median(warm), "cold_ttfb_ms": walls[0], "audio_s": audio_s,
            "rtf": statistics.median(warm) / 1e3 / audio_s if audio_s else None}


def build_engine(spec, model):
    """An engine of `spec` over an already loaded model, warmed up as lab.engines.build warms its own."""
    t0 = time.perf_counter()
    if spec.attention == "flash_attention_2":
        model.thinker.set_attn_implementation("flash_attention_2")
        model.talker.set_attn_implementation("flash_attention_2")
    engine = qo.QwenOmniEngine(spec, model, None)
    graphs = engine.capture_graphs() if engine.graphed else 0
    for _ in engine.stream(Request("Say hello.", max_audio_s=0.5), Timeline()):
        pass
    sync()
    # What the GPU holds for this row (the shared weights, its caches and graph pools, and earlier rows' leftovers),
    # so a run's peak memory counts it: an upper bound of the row's own.
    engine.report.memory_bytes = tc.allocated_bytes(spec.device)
    return engine, {"warmup_s": time.perf_counter() - t0, "notes": engine.build_notes(graphs),
                    "held_bytes": engine.report.memory_bytes}


def restore_attention(model):
    model.thinker.set_attn_implementation("sdpa")
    model.talker.set_attn_implementation("sdpa")


def chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, r) for name, r in result["rows"].items() if "text" in r]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.55 * max(4, len(rows) + 3) + 1.5), sharey=True)
    for ax, kind in zip(axes, ("text", "spoken")):
        labels = []
        for y, (name, r) in enumerate(rows):
            left = 0.0
            for color, (phase, ms) in zip(COLORS, r[kind]["phases_ms"].items()):
                ax.barh(y, ms, left=left, color=color, label=phase if y == 0 else None)
                left += ms
            labels.append(f"{name} (RTF {r[kind]['rtf']:.2f})")
        base = result.get("generate", {}).get(kind)
        y = len(rows)
        if base:
            ax.barh(y, base["ttfb_ms"], color="grey", label="generate(): whole waveform")
            labels.append(f"generate() (RTF {base['rtf']:.2f})")
            y += 1
        for note, v in NOTES.items():
            ax.axvline(v["ttfb_ms"], ls="--", lw=1, color="k" if "H100" in note else "tab:grey")
        ax.axvline(GOALS[f"{kind}_ttfb_ms"], ls=":", color="tab:red", lw=1.5)
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xlabel("TTFB ms, median warm run\ndashed: the notes' MiniCPM-o (H100, A10G); dotted: goal")
        ax.set_title(f"{'text prompt' if kind == 'text' else f'{SPOKEN_S:.0f} s spoken turn'} -> first audio")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Qwen2.5-Omni-7B, random weights (latency only), bf16, {result['env'].get('device', '?')}, "
                 f"commit {result['commit']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--budget-s", type=float, default=540.0, help="stop starting rows after this many seconds")
    parser.add_argument("--runs", type=int, default=3, help="warm runs per prompt, after one cold run")
    parser.add_argument("--smoke", action="store_true", help="tiny weights on the CPU: try the script here")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    left = lambda: args.budget_s - (time.perf_counter() - start)  # noqa: E731
    result = {"commit": os.environ.get("LAB_COMMIT", "unknown"), "env": env.environment(),
              "weights": "tiny (smoke)" if args.smoke else "random (latency only; the audio is noise)",
              "text": TEXT, "spoken_s": SPOKEN_S, "max_audio_s": MAX_AUDIO_S, "notes_reference": NOTES,
              "goals": GOALS, "rows": {}, "skipped": {}}
    if torch.cuda.is_available():
        result["env"]["device"] = torch.cuda.get_device_name()
    result["env"].update(torch=torch.__version__, transformers=__import__("transformers").__version__,
                         flash_attn=env.has_package("flash_attn"), bitsandbytes=env.has_package("bitsandbytes"))
    out_json = os.path.join(args.out, "qwen_omni.json")

    def save():
        with open(out_json, "w") as f:
            json.dump(result, f, indent=1, default=str)

    base_spec = spec_for("qwen-omni-sdpa", args.smoke)
    t0 = time.perf_counter()
    model, _ = qo.load(base_spec)
    sync()
    result["load_s"] = time.perf_counter() - t0
    result["params"] = tc.param_count(model)
    result["weights_bytes"] = tc.allocated_bytes(base_spec.device)
    print(f"loaded {result['params'] / 1e9:.2f}B params in {result['load_s']:.1f} s", flush=True)
    reqs = requests(args.smoke)

    def baseline(engine, row):
        try:
            result["generate"] = {k: generate_baseline(engine, r, max(1, args.runs - 1), row[k]["codes"],
                                                       row[k]["thinker_tokens"]) for k, r in reqs.items()}
            print("generate()", {k: round(v["ttfb_ms"]) for k, v in result["generate"].items()}, flush=True)
        except Exception as e:
            result["skipped"]["generate()"] = f"failed: {type(e).__name__}: {e}"
            traceback.print_exc()

    first_engine = None
    for name in ROWS:
        spec = spec_for(name, args.smoke)
        kind = "inductor" if spec.compile == "inductor" else "default"
        if spec.attention == "flash_attention_2" and not env.has_package("flash_attn"):
            result["skipped"][name] = "flash-attn is not installed (qwen-omni-sdpa-flash is PyTorch's FA2 kernel)"
            continue
        if left() < ROW_RESERVE_S[kind]:
            result["skipped"][name] = f"time box: {left():.0f} s left, the row needs about {ROW_RESERVE_S[kind]} s"
            continue
        try:
            engine, build = build_engine(spec, model)
            row = {"spec": spec.identity(), **build}
            for kind_name, request in reqs.items():
                row[kind_name] = measure(engine, request, args.runs)
            result["rows"][name] = row
            print(name, {k: round(row[k]["ttfb_ms"]) for k in reqs}, flush=True)
            if first_engine is None:   # the baseline next, while the time box has room for it
                first_engine = engine
                baseline(first_engine, row)
        except Exception as e:   # a row that fails is reported, the others still run
            result["skipped"][name] = f"failed: {type(e).__name__}: {e}"
            traceback.print_exc()
        finally:
            if spec.attention == "flash_attention_2":
                restore_attention(model)
        save()

    if first_engine is None:
        result["skipped"]["generate()"] = "no row ran"
    for row in result["rows"].values():
        if "generate" in result:
            row["x_generate"] = {k: result["generate"][k]["ttfb_ms"] / row[k]["ttfb_ms"] for k in reqs}
    save()

    del model, first_engine
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for name in BNB_ROWS:
        if args.smoke or not (torch.cuda.is_available() and env.has_package("bitsandbytes")):
            result["skipped"][name] = "bitsandbytes needs CUDA and the package (pip install bitsandbytes)"
            continue
        if left() < ROW_RESERVE_S["bnb"]:
            result["skipped"][name] = f"time box: {left():.0f} s left, a quantized reload needs about " \
                                      f"{ROW_RESERVE_S['bnb']} s"
            continue
        try:
            from lab import engines

            spec = spec_for(name, False)
            engine = engines.build(spec)
            row = {"spec": spec.identity(), "build": engine.report.to_dict()}
            for kind_name, request in reqs.items():
                row[kind_name] = measure(engine, request, max(1, args.runs - 1))
            result["rows"][name] = row
            engine.close()
        except Exception as e:
            result["skipped"][name] = f"failed: {type(e).__name__}: {e}"
            traceback.print_exc()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        save()
    result["skipped"]["16 concurrent streams"] = ("not run: the qwen2.5-omni engine serves one stream at a time "
                                                  "(no batched step yet); 16 streams would only queue")
    result["wall_s"] = time.perf_counter() - start
    save()
    try:
        chart(result, os.path.join(args.out, "qwen_omni.png"))
    except ImportError as e:   # the JSON holds every figure; the chart can be drawn from it elsewhere
        result["skipped"]["chart"] = f"matplotlib is not installed here ({e}); draw it from qwen_omni.json"
        save()
    print(json.dumps({n: {k: round(r[k]["ttfb_ms"]) for k in reqs} for n, r in result["rows"].items()}))
    print("skipped:", json.dumps(result["skipped"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
