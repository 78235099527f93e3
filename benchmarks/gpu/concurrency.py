"""Many listeners on one GPU (issue 15): the batched CSM engine under a concurrency sweep, against the batch-1 fast
path served one request after another and transformers `generate()` on a padded batch, in one run.

    LAB_COMMIT=<sha> python benchmarks/gpu/concurrency.py --out DIR [--max-streams 2048]

CSM-1B at real size with random weights, bf16: latency figures only, the audio is noise. Each stream says a
20-word text for 80 frames (6.4 s), codec decode included, with KV room for 60 s of audio per stream. Writes
DIR/concurrency.json (every level's per-stream figures, the checks, the environment) and DIR/goodput.png.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lab import concurrency, env, presets  # noqa: E402
from lab import engines  # noqa: E402
from lab.engines import csm  # noqa: E402
from lab.engines.csm_batched import bucket  # noqa: E402
from lab.measure.metrics import Timeline, figures, summarize  # noqa: E402
from lab.request import Request  # noqa: E402

# 20-word texts, one per stream in turn, so neighbours say different things at different prompt lengths.
TEXTS = [
    "Streaming speech should start at once and keep pace with the listener, even on a busy machine tonight.",
    "Please hold the line for a moment while I look up the order you placed with us last week.",
    "The weather tomorrow looks clear in the morning, with light rain moving in from the west by evening.",
    "Your table for four is booked at seven thirty, and the kitchen will keep the vegetarian menu ready.",
]
FRAMES = 80
TTFB_GOALS_MS = {64: 150, 256: 400}   # issue 15's TTFB p99 goals for streams arriving together, drawn on the chart
SWEEP_FILLED = 192   # KV positions a sweep's stream reaches: its prompt (about 110 byte tokens) and 80 frames
PRESET = "csm-batched-cuda-graphs"
SMOKE = False   # --smoke: tiny weights on the CPU, to try the script here before spending device time


def load(name: str, **changes):
    if SMOKE:
        spec = presets.load(name, weights="tiny")
        compiled = "inductor" if spec.compile in csm.COMPILED else "off"
        spec = spec.replace(device="cpu", dtype="float32", compile=compiled, kernels="torch", attention="sdpa",
                            **changes)
        return spec
    return presets.load(name, weights="random").replace(**changes) if changes else presets.load(name, weights="random")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def codes_of(engine, request: Request) -> np.ndarray:
    ticket = engine.open(request, Timeline())
    for _ in ticket.chunks():
        pass
    return ticket.all_codes


def crowd(engine, requests: list[Request], target: Request, start_after_frames: int) -> np.ndarray:
    """`target` joins a batch of `requests` that started `start_after_frames` frames earlier: other rows, other
    positions, other texts. Returns the target's codes."""
    tickets = [engine.open(r, Timeline()) for r in requests]
    while min(t.frames for t in tickets) < start_after_frames:
        time.sleep(0.002)
    codes = codes_of(engine, target)
    for t in tickets:
        for _ in t.chunks():
            pass
    return codes


def same(a: np.ndarray, b: np.ndarray) -> dict:
    n = min(len(a), len(b))
    rows = (a[:n] == b[:n]).all(-1)
    return {"codes_equal": bool(len(a) == len(b) and rows.all()), "frames": [len(a), len(b)],
            "first_different_frame": None if rows.all() else int(np.flatnonzero(~rows)[0]),
            "equal_frames_fraction": float(rows.mean()) if n else None}


def checks(engine) -> dict:
    """A greedy stream's codes alone, beside 63 others that started 7 frames earlier, and beside 63 different
    others; and the same stream with graph replay off (the step called from Python)."""
    target = Request(TEXTS[0], seed=7, max_audio_s=40 / 12.5)
    others = lambda shift: concurrency.requests_for(TEXTS[shift:] + TEXTS[:shift], 63, 60 / csm.FRAME_RATE_HZ)  # noqa: E731
    alone = codes_of(engine, target)
    beside = crowd(engine, others(1), target, 7)
    beside_other = crowd(engine, others(2), target, 3)
    graphed, engine.use_graphs = engine.use_graphs, False
    try:
        eager = codes_of(engine, target)
    finally:
        engine.use_graphs = graphed
    return {"alone_vs_beside_63": same(alone, beside), "beside_63_vs_beside_63_others": same(beside, beside_other),
            "graph_replay_vs_eager_step": same(alone, eager),
            "note": "alone runs in the 1-row graph, beside others in the 64-row graph: cuBLAS may pick other "
                    "kernels (another summation order) for another number of rows, and random weights give "
                    "near-ties, so a difference there is rounding, not a leak between rows; rows in one bucket "
                    "are independent by construction (the second check)"}


def replay_ms(graph, runs: int = 20) -> list[float]:
    """A graph's replays timed with CUDA events, after 3 warm-ups: ms each."""
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def bucket_times(engine) -> list[dict]:
    """The graphed step alone, per bucket of rows (greedy): ms per replay over 20, with every row's backbone cache
    (and the codec transformer's ring) filled as far as a sweep's stream gets (a 20-word prompt and 80 frames) and
    as far as the room allows (60 s of audio in every stream): attention reads what the streams have reached. No
    stream is active, so no row moves on."""
    out = []
    if not engine.use_graphs:
        return out
    codec_kv = engine.row_codec.static_kv
    for rows in engine.row_buckets:
        for filled in (SWEEP_FILLED, engine.cache_positions - 2):
            length = bucket(filled + 2, engine.length_buckets)
            engine.row_kv.pos.fill_(filled)
            codec_kv.pos.fill_(2 * filled)   # two codec transformer positions a frame; a ring of its window
            times = replay_ms(engine.step_graphs[(rows, length, False)][0])
            out.append({"rows": rows, "kv_filled": filled, "kv_length": length, "ms_per_frame": summarize(times)})
            log(f"step rows {rows:5d} kv filled {filled:5d} (view {length:5d}): {statistics.median(times):.2f} ms")
    engine.row_kv.pos.zero_()
    engine.row_codec.reset()
    return out


def prefill_times(engine, batches=(1, 16, 64, 256), positions=(100, 101)) -> list[dict]:
    """The crowd's prefill (the backbone over right-padded prompts, eager) alone: its first call at a new shape and
    the best of three after, with SDPA choosing its kernel and with SDPA kept to flash and memory-efficient
    attention, on the engine's unwrapped `_prefill_rows` so that each context here is the only one. A first call much
    slower than the rest is set-up work paid at every new prompt shape. Diagnostic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lab.engines.kv import GrowingKV

    out = []
    width = engine.config.hidden_size
    for label, backends in (("sdpa", None), ("flash+efficient", [SDPBackend.FLASH_ATTENTION,
                                                                  SDPBackend.EFFICIENT_ATTENTION])):
        for batch in batches:
            for n in positions:
                embeds = torch.randn(batch, n + (label != "sdpa") * 7, width, device=engine.device,
                                     dtype=engine.hidden_rows.dtype)
                times = []
                with sdpa_kernel(backends) if backends else contextlib.nullcontext(), torch.no_grad():
                    for _ in range(4):
                        sync()
                        t0 = time.perf_counter()
                        engine._prefill_rows(embeds, GrowingKV(engine.config.num_hidden_layers))
                        sync()
                        times.append((time.perf_counter() - t0) * 1e3)
                row = {"attention": label, "batch": batch, "positions": embeds.shape[1], "first_ms": times[0],
                       "best_after_ms": min(times[1:])}
                out.append(row)
                log(f"prefill {label:15s} batch {batch:4d} x {embeds.shape[1]:4d}: first {times[0]:.1f} ms, "
                    f"then {min(times[1:]):.1f} ms")
    return out


@torch.no_grad()   # as the engine captures: under autograd a compiled step is traced for a backward it cannot have
def breakdown(engine) -> list[dict]:
    """Where a batched frame's time goes: the language-model part (backbone + 31 depth steps + picks) and the codec
    decode, each captured alone per bucket of rows (caches filled as a sweep's stream fills them), the codec with
    cuDNN's autotuner off and on.
    Diagnostic only: it reaches into the engine's step (`_bind`, `frame`, `decode_rows`)."""
    from lab.engines import torch_common as tc

    out = []
    if not engine.use_graphs:
        return out
    codes = torch.zeros(engine.rows, engine.num_codebooks, dtype=torch.long, device=engine.device)
    engine.row_kv.pos.fill_(SWEEP_FILLED)
    for rows in [r for r in (1, 64, 256, 1024) if r <= engine.rows]:
        engine._bind(rows, bucket(SWEEP_FILLED + 2, engine.length_buckets))
        lm, _ = tc.capture_graph(lambda: engine.frame(engine.hidden_rows[:rows], None, 0.0, 50), warmup_runs=1,
                                 pool=engine.pool)
        row = {"rows": rows, "lm_ms": statistics.median(replay_ms(lm, 15))}
        for tuned in (False, True):
            torch.backends.cudnn.benchmark = tuned
            codec, _ = tc.capture_graph(lambda: engine.decode_rows(codes[:rows]), warmup_runs=2,
                                        pool=engine.pool)
            row[f"codec_ms_cudnn_benchmark_{tuned}"] = statistics.median(replay_ms(codec, 15))
            del codec
        del lm
        torch.backends.cudnn.benchmark = False
        out.append(row)
        log(f"breakdown rows {rows}: {row}")
    engine.row_codec.reset()
    engine.row_kv.pos.zero_()
    return out


# First match wins: attention before matmul (cuDNN's attention kernels are named "..._sdpa_sm90_flash_...").
KERNEL_KINDS = (("attention", ("fmha", "flash", "attention", "sdpa")),
                ("matmul", ("gemm", "nvjet", "xmma", "cutlass")),
                ("convolution", ("conv", "cudnn", "implicit", "winograd", "dgrad")), ("copy", ("memcpy", "memset", "copy")))


def profile(engine, rows: int) -> dict:
    """Where the batched step's device time goes at `rows` rows, every cache filled as far as a sweep's stream gets,
    by kernel: torch.profiler over the step run eagerly (a graph replays the same kernels, without the launch gaps
    between them). Diagnostic only."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    rows, steps = min(rows, engine.rows), 3
    length = bucket(SWEEP_FILLED + 2, engine.length_buckets)
    engine.row_kv.pos.fill_(SWEEP_FILLED)
    cuda = engine.device.type == "cuda"   # --smoke profiles the CPU's operators instead
    spent = "self_device_time_total" if cuda else "self_cpu_time_total"
    engine.use_graphs = False
    try:
        for _ in range(2):
            engine._run_step(rows, length, False)
        engine.sync()
        with torch_profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                engine._run_step(rows, length, False)
            engine.sync()
    finally:
        engine.use_graphs = engine.graphed
        engine.row_codec.reset()
        engine.row_kv.pos.zero_()
    events = [e for e in prof.key_averages() if getattr(e, spent, 0) > 0]
    events.sort(key=lambda e: getattr(e, spent), reverse=True)
    total_ms = sum(getattr(e, spent) for e in events) / 1e3 / steps
    kinds: dict[str, float] = {}
    for e in events:
        kind = next((k for k, words in KERNEL_KINDS if any(w in e.key.lower() for w in words)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + getattr(e, spent) / 1e3 / steps
    top = [{"kernel": e.key[:160], "calls": e.count // steps, "ms": getattr(e, spent) / 1e3 / steps}
           for e in events[:40]]
    log(f"profile rows {rows} kv {length}: {total_ms:.1f} ms of kernels a step; "
        + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
    for t in top[:25]:
        log(f"  {t['ms']:7.3f} ms {t['calls']:5d}x  {t['kernel']}")
    return {"rows": rows, "length": length, "kernel_ms_per_step": total_ms, "by_kind_ms": kinds, "top": top}


def attention_options(engine, rows_list=(64, 256, 1024)) -> list[dict]:
    """The batched step (KV length 256, greedy, codec included) captured with each attention kernel, from the same
    state: SDPA as it chooses (cuDNN's flash kernel here), SDPA pinned to its memory-efficient and math kernels, and
    lab.engines.fused.rows_attention (one program per row and kv head). Times, and codes against SDPA's. Diagnostic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lab.engines import fused
    from lab.engines import torch_common as tc

    if not engine.use_graphs:
        return []
    torch.cuda.empty_cache()   # what the sweep's crowd prefills left cached: the extra graphs need it
    length = engine.length_buckets[0]
    hidden0 = torch.randn(engine.rows, engine.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(
        engine.hidden_rows)
    options = {"sdpa": None, "sdpa efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa math": SDPBackend.MATH,
               fused.ROWS_ATTENTION: "rows"}
    out = []
    for rows in [r for r in rows_list if r <= engine.rows]:
        reference = None
        for label, option in options.items():
            def fresh():
                engine.row_kv.pos.zero_()
                engine.row_codec.reset()
                engine.hidden_rows.copy_(hidden0)
            fresh()
            engine._bind(rows, length)
            stacks = engine.attention_stacks()
            before = [s.config._attn_implementation for s in stacks]
            try:
                if option == "rows":
                    fused.use_rows_attention(*stacks)
                context = sdpa_kernel([option]) if isinstance(option, SDPBackend) else contextlib.nullcontext()
                with context:
                    graph, (codes, audio) = tc.capture_graph(lambda: engine._batch_step(rows, False), warmup_runs=2,
                                                             pool=engine.pool)
                fresh()
                graph.replay()
                codes = codes.clone()
                audio = audio.float().clone()
                ms = statistics.median(replay_ms(graph, 15))
                row = {"rows": rows, "attention": label, "ms": ms}
                if reference is None:
                    reference = codes, audio
                else:
                    row["codes_equal_to_sdpa"] = float((codes == reference[0]).float().mean())
                    row["audio_rel_diff"] = float((audio - reference[1]).norm() / reference[1].norm().clamp(min=1e-9))
                del graph
            except Exception as e:
                row = {"rows": rows, "attention": label, "error": f"{type(e).__name__}: {e}"}
            finally:
                for s, b in zip(stacks, before):
                    s.config._attn_implementation = b
            out.append(row)
            log(f"attention rows {rows:5d} {label:15s}: {row}")
    engine.row_kv.pos.zero_()
    engine.row_codec.reset()
    return out


def together_level(engine, n: int, label: str) -> dict:
    level = concurrency.batched(engine, concurrency.requests_for(TEXTS, n, FRAMES / csm.FRAME_RATE_HZ), [0.0] * n)
    log(f"{label} {n:5d}: ttfb p50 {level['ttfb_ms']['median']:.0f} p99 {level['ttfb_ms']['p99']:.0f} ms, "
            f"steady rtf p50 {level['steady_rtf']['median']:.3f} p99 {level['steady_rtf']['p99']:.3f}, "
            f"underruns {level['underruns']} ({level['streams_with_underruns']} streams), "
            f"{level['ms_per_frame']:.1f} ms/frame, goodput {level['goodput_audio_s_per_s']:.0f} audio s/s; ttfb "
            f"phases p50 " + " ".join(f"{k} {v['median']:.0f}" for k, v in level["ttfb_phases_ms"].items()))
    return level


def sweep(engine, levels: list[int], rates: list[float], poisson_s: float, runs: int = 1) -> dict:
    """Each level arriving together (`runs` times: the first in "together", which the chart draws, the others in
    "together_run2", ... for the spread between runs), then each Poisson rate once."""
    out = {"together": [], "poisson": []}
    for run in range(runs):
        key = "together" if run == 0 else f"together_run{run + 1}"
        out[key] = [together_level(engine, n, key) for n in levels]
    for rate in rates:
        n = int(rate * poisson_s)
        level = concurrency.batched(engine, concurrency.requests_for(TEXTS, n, FRAMES / csm.FRAME_RATE_HZ),
                                    concurrency.arrivals_s(n, rate))
        level["rate_hz"] = rate
        out["poisson"].append(level)
        log(f"poisson {rate:5.0f}/s ({n} streams): ttfb p50 {level['ttfb_ms']['median']:.0f} p99 "
            f"{level['ttfb_ms']['p99']:.0f} ms, steady rtf p99 {level['steady_rtf']['p99']:.3f}, underruns "
            f"{level['underruns']}, mean {level['mean_rows_per_frame']:.0f} rows/frame")
    return out


def batch1_baseline(levels: list[int]) -> dict:
    """The fastest single-stream preset: its own speed (10 warm runs), then served one request after another."""
    spec = load("csm-triton-cuda-graphs")
    t0 = time.perf_counter()
    engine = csm.build(spec, lambda s, t: None)
    build_s = time.perf_counter() - t0
    runs = []
    for i in range(11):
        timeline = Timeline()
        for _ in engine.stream(Request(TEXTS[0], max_audio_s=FRAMES / 12.5), timeline):
            pass
        if i:
            runs.append(figures(timeline))
    ms_per_frame = [f["steady_rtf"] * 80.0 for f in runs]
    out = {"preset": spec.name, "build_s": build_s, "ttfb_ms": summarize([f["ttfb_ms"] for f in runs]),
           "steady_rtf": summarize([f["steady_rtf"] for f in runs]), "ms_per_frame": summarize(ms_per_frame),
           "queue": []}
    log(f"batch-1 {spec.name}: {statistics.median(ms_per_frame):.2f} ms/frame, ttfb "
        f"{out['ttfb_ms']['median']:.0f} ms")
    for n in levels:
        requests = concurrency.requests_for(TEXTS, n, FRAMES / csm.FRAME_RATE_HZ)
        level = concurrency.sequential(engine, requests, [0.0] * n)
        out["queue"].append(level)
        log(f"queue {n:3d}: ttfb p50 {level['ttfb_ms']['median']:.0f} p99 {level['ttfb_ms']['p99']:.0f} ms, "
            f"goodput {level['goodput_audio_s_per_s']:.1f} audio s/s")
    engine.close()
    return out


def generate_baseline(batches: list[int], frames: int) -> dict:
    """transformers `generate()` on a batch of the same prompt (equal lengths: no padding needed), LM only, as a
    user would try first: nothing streams, so every stream's first audio comes when the whole call returns."""
    spec = load("csm-sdpa")
    engine = csm.build(spec, lambda s, t: None)
    ids = torch.tensor([engine.tokenizer(f"[0]{TEXTS[0]}")], device=engine.device)
    out = {"what": "transformers generate(), sdpa, bf16, LM only (codec decode left out)", "frames": frames,
           "levels": []}
    with torch.no_grad():
        engine.model.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=4)
        for n in batches:
            sync()
            t0 = time.perf_counter()
            made = engine.model.generate(input_ids=ids.expand(n, -1), do_sample=False, depth_decoder_do_sample=False,
                                         max_new_tokens=frames)
            sync()
            wall_s = time.perf_counter() - t0
            made_frames = made.shape[1]
            level = {"streams": n, "wall_s": wall_s, "frames": made_frames, "ms_per_frame": wall_s * 1e3 / made_frames,
                     "first_audio_ms": wall_s * 1e3,
                     "goodput_audio_s_per_s": n * made_frames / 12.5 / wall_s}
            out["levels"].append(level)
            log(f"generate() batch {n}: {level['ms_per_frame']:.0f} ms/frame, goodput "
                f"{level['goodput_audio_s_per_s']:.1f} audio s/s")
    engine.close()
    return out


def chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5))
    together = result["sweep"]["together"]
    n = [lvl["streams"] for lvl in together]
    ax.plot(n, [lvl["goodput_audio_s_per_s"] for lvl in together], "o-", label=f"{result['preset']} (streams together)")
    if result.get("batch1"):
        q = result["batch1"]["queue"]
        ax.plot([lvl["streams"] for lvl in q], [lvl["goodput_audio_s_per_s"] for lvl in q], "s-",
                label=f"{result['batch1']['preset']}, one after another (today's queue)")
    if result.get("generate"):
        g = result["generate"]["levels"]
        ax.plot([lvl["streams"] for lvl in g], [lvl["goodput_audio_s_per_s"] for lvl in g], "^-",
                label="generate(), batch (LM only, nothing streams)")
    ax.plot(n, n, ":", color="grey", label="every stream in real time (RTF 1)")
    ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="goodput: audio s per wall s",
           title="Goodput against streams")
    ax.legend(fontsize=8)
    bx.plot(n, [lvl["steady_rtf"]["p99"] for lvl in together], "o-", label="steady RTF p99")
    bx.plot(n, [lvl["steady_rtf"]["median"] for lvl in together], "o--", label="steady RTF p50")
    bx.axhline(0.5, color="grey", ls=":", label="goal 0.5")
    for lvl in together:   # a stall is what a listener notices: say how many streams had one, where any did
        if lvl["streams_with_underruns"]:
            bx.annotate(f"{lvl['streams_with_underruns']} stalled", (lvl["streams"], lvl["steady_rtf"]["p99"]),
                        textcoords="offset points", xytext=(-62, 0), fontsize=7, color="tab:blue")
    bx2 = bx.twinx()
    bx2.plot(n, [lvl["ttfb_ms"]["p99"] for lvl in together], "s-", color="tab:red", label="TTFB p99 (ms)")
    bx2.plot(list(TTFB_GOALS_MS), list(TTFB_GOALS_MS.values()), "v", color="tab:red", mfc="none", ms=9,
             label="TTFB p99 goals")
    bx2.set_ylabel("TTFB p99 from arrival, ms")
    bx.set_ylim(bottom=0)
    bx2.set_ylim(bottom=0)
    bx.set(xscale="log", xlabel="concurrent streams (arriving together)", ylabel="steady RTF per stream",
           title="Per stream under load")
    bx.legend(loc="upper left", fontsize=8)
    bx2.legend(loc="lower right", fontsize=8)
    e = result["env"]
    fig.suptitle(f"CSM-1B, random weights (latency only), bf16, 80 frames per stream, codec included - "
                 f"{e.get('device_name', e.get('device', '?'))} - commit {e.get('commit', '?')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--preset", default=PRESET, help="a batching preset (max_streams > 1)")
    parser.add_argument("--max-streams", type=int, default=2048)
    parser.add_argument("--levels", default="1,2,4,8,16,32,64,128,256,512,1024,2048")
    parser.add_argument("--rates", default="50,150,300")
    parser.add_argument("--poisson-s", type=float, default=6.0)
    parser.add_argument("--runs", type=int, default=1, help="times each together level runs (the spread between runs)")
    parser.add_argument("--smoke", action="store_true", help="tiny weights on the CPU: tries the script, measures nothing")
    parser.add_argument("--skip", default="", help="comma list of parts to leave out: checks, bucket_times, sweep, "
                                                   "prefill, breakdown, profile, attention, batch1, generate")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"env": env.environment(), "preset": args.preset, "texts": TEXTS, "frames": FRAMES,
                    "weights": "random (latency only)"}
    path = os.path.join(args.out, "concurrency.json")

    def save():
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)

    global SMOKE
    SMOKE = args.smoke
    spec = load(args.preset, max_streams=args.max_streams)
    log(f"building {spec.name} with {args.max_streams} slots")
    t0 = time.perf_counter()
    stages = {}
    engine = engines.build(spec, lambda stage, s: stages.__setitem__(stage, s))
    result["build"] = {"s": time.perf_counter() - t0, "stages_s": stages, **engine.report.to_dict(),
                       "rows": engine.rows, "graphs": len(engine.step_graphs),
                       "memory_allocated_gib": torch.cuda.memory_allocated() / 2**30 if not SMOKE else 0}
    log(f"built in {result['build']['s']:.1f} s: {engine.report.notes}, "
        f"{result['build']['memory_allocated_gib']:.1f} GiB allocated")
    save()
    parts = [("checks", lambda: checks(engine)), ("bucket_times", lambda: bucket_times(engine)),
             ("sweep", lambda: sweep(engine, [n for n in map(int, args.levels.split(",")) if n <= engine.rows],
                                     [float(r) for r in args.rates.split(",")], args.poisson_s, args.runs)),
             ("prefill", lambda: prefill_times(engine)),
             ("breakdown", lambda: breakdown(engine)),   # after the sweep: its extra graphs take memory the sweep needs
             ("profile", lambda: [profile(engine, rows) for rows in (256, 1024)]),
             ("attention", lambda: attention_options(engine))]
    def run_parts(named) -> None:
        """Each part in turn; one that fails is recorded and the rest still run (the device time is spent anyway)."""
        for name, part in named:
            if name in skip:
                continue
            try:
                result[name] = part()
            except Exception as e:
                traceback.print_exc()
                result[name + "_error"] = f"{type(e).__name__}: {e}"
            save()

    run_parts(parts)
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if not SMOKE else 0
    engine.close()
    del engine
    if not SMOKE:
        torch.cuda.empty_cache()
    run_parts([("batch1", lambda: batch1_baseline([1, 4, 16])), ("generate", lambda: generate_baseline([1, 16, 64], 24))])
    if "sweep" in result:
        chart(result, os.path.join(args.out, "goodput.png"))
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
