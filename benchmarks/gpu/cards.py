"""The Spaces cards, emulated on the device machine (issue 28): every GPU preset on each card either builds and
streams, or is refused before loading with its reason; the batching preset's slots under the card's memory cap;
csm-triton-cuda-graphs in fp16 against bf16 on its codes; the ahead-of-time compiled CSM step (compile: aot, ZeroGPU's
route) against the inductor step. One run, under 9 minutes:

    LAB_COMMIT=<sha> python benchmarks/gpu/cards.py --out benchmarks/gpu/<sha>/cards [--budget-s 500]
    python benchmarks/gpu/cards.py --out DIR --plan-only      # the verdict matrix alone, on any machine

A card is emulated in a process of its own (LAB_CARD=<card>, lab.cards): its memory capped with
torch.cuda.set_per_process_memory_fraction, fp16 where it has no bf16, features masked as its compute capability has
them (Triton kernels below 8.0, PDL below 9.0). What emulation cannot show: the card's own speed, and kernels
compiled for its architecture. CSM-1B sizes, random weights: latency only. Each card's process has a deadline; a
cell not reached by then is recorded as "not run (time)". Writes DIR/cards.json and DIR/cards.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from lab import cards, env, gpu, presets  # noqa: E402
from lab.machine import Refusal  # noqa: E402

# The emulated cards: T4-like 16 GB without bf16, 24 GB at sm 8.6 and 8.9, 48 GB, 80 GB (sm 8.0). ZeroGPU's slice is
# in the verdict matrix; on the device its route is measured by the aot cell.
EMULATED = ("T4", "A10G", "L4", "L40S", "A100")
# Presets in the order a card's process builds them, until its deadline: the fast paths and the batching preset first.
ORDER = ("csm-triton-cuda-graphs", "csm-batched-cuda-graphs", "csm-cuda-graphs", "csm-sdpa", "pocket-tts-cuda",
         "csm-per-segment-cuda-graphs", "csm-batched-triton-cuda-graphs", "csm-sdpa-flash", "csm-eager",
         "csm-per-segment", "csm-bnb-nf4-cuda-graphs", "csm-bnb-nf4", "csm-bnb-int8", "csm-sdpa-inductor",
         "csm-inductor-cuda-graphs", "csm-batched-inductor-cuda-graphs")
TEXT = "Streaming speech should start at once and keep pace with the listener."
AUDIO_S = 2.0                # each cell's streamed run: 25 frames
PARITY_FRAMES = 40
CELL_MIN_S = 25              # a card's process starts no preset with less time than this left


def gpu_specs() -> dict:
    specs, _ = presets.load_all(presets.PRESETS_DIR)
    return {n: s.with_weights("random") for n, s in specs.items() if s.device == "cuda"}


def verdicts(card_names) -> dict:
    """{card: {preset: {"verdict": runs here | runs with changes | refused, "why": ...}}}, from lab.cards alone."""
    out = {}
    for name in card_names:
        card = gpu.SPACES_CARDS[name]
        out[name] = {}
        for preset, spec in sorted(gpu_specs().items()):
            v = cards.adapt(spec, card)
            out[name][preset] = ({"verdict": "refused", "why": v.sentence} if isinstance(v, Refusal) else
                                 {"verdict": "runs with changes" if v.changes else "runs here",
                                  "why": "; ".join(v.changes + v.notes)})
    return out


# -- children: each in a process of its own ---------------------------------------------------------------------
def _emit(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def child_card(card_name: str, names: list[str], deadline: float, out_path: str) -> None:
    """Under LAB_CARD=card_name: each preset built and streamed once (cold) and once warm, or its refusal."""
    import torch

    from lab import concurrency, session
    from lab.manager import ModelManager
    from lab.request import Request

    card = gpu.this_card()   # caps this process's memory to the card's
    manager = ModelManager()
    for name in names:
        spec = gpu_specs()[name]
        row = {"card": card_name, "preset": name, "cap_gb": card.memory_gb}
        verdict = cards.plan(spec, card)   # pretrained-only presets (MiniCPM-o) are refused without their weights
        if isinstance(verdict, Refusal):
            _emit(out_path, {**row, "status": "refused", "why": verdict.sentence, "code": verdict.code})
            continue
        if time.time() > deadline - CELL_MIN_S:
            _emit(out_path, {**row, "status": "not run (time)"})
            continue
        _emit(out_path, {**row, "status": "started"})   # a process killed mid-cell leaves this line
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            engine = manager.get(spec)
            request = Request(TEXT, max_audio_s=AUDIO_S)
            cold, _ = session.run_once(engine, spec, request, cold=True)
            warm, _ = session.run_once(engine, spec, request, run=1)
            row.update(status="ran", build_s=round(time.perf_counter() - t0, 1), spec=engine.spec.identity(),
                       notes=engine.report.notes, ttfb_cold_ms=cold.get("ttfb_ms"), ttfb_ms=warm.get("ttfb_ms"),
                       rtf=warm.get("rtf"))
            if spec.batches:   # every slot at once under the cap: the sweep must not run out of memory
                levels = [1, max(1, engine.rows // 2), engine.rows]
                row["slots"], row["kv_positions"] = engine.rows, engine.cache_positions
                row["sweep"] = [{k: v for k, v in lvl.items() if not isinstance(v, (list, dict))} | {"level": n}
                                for n, lvl in zip(levels, concurrency.sweep(engine, spec, request, levels))]
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="out of memory", why=str(e).splitlines()[0])
        except Exception as e:   # a cell's failure is its result; the next preset still runs
            row.update(status="failed", why=f"{type(e).__name__}: {e}"[:400], trace=traceback.format_exc()[-1500:])
        row["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / 1e9, 2)
        _emit(out_path, row)
        manager.evict(spec)


def child_parity(out_path: str) -> None:
    """csm-triton-cuda-graphs in bf16 and in fp16 (as on a T4 with sm 8.0 features: the Triton kernels kept),
    greedy, same random weights: how many leading frames' codes agree, and the codes' agreement overall."""
    import torch

    from lab import engines
    from lab.measure.metrics import Timeline
    from lab.request import Request

    base = gpu_specs()["csm-triton-cuda-graphs"]
    codes, head = {}, {}
    for dtype in ("bfloat16", "float16"):
        engine = engines.build(base.replace(dtype=dtype))   # random init from seed 0, in the dtype, on the GPU
        for _ in engine.stream(Request(TEXT, max_audio_s=PARITY_FRAMES / 12.5, seed=0), Timeline()):
            pass
        codes[dtype] = engine.last_codes.cpu()
        head[dtype] = engine.model.lm_head.weight.float().cpu()
        engine.close()
        torch.cuda.empty_cache()
    # The comparison means something only if both drew the same weights (each rounded to its dtype).
    weights_gap = float(((head["bfloat16"] - head["float16"]).abs().max() / head["float16"].abs().max()))
    a, b = codes["bfloat16"], codes["float16"]
    n = min(len(a), len(b))
    same_rows = (a[:n] == b[:n]).all(-1).tolist()
    leading = next((i for i, same in enumerate(same_rows) if not same), n)
    _emit(out_path, {"check": "fp16 vs bf16", "preset": "csm-triton-cuda-graphs", "frames": n,
                     "lm_head_max_relative_gap": weights_gap, "same_weights_to_rounding": weights_gap < 1e-2,
                     "equal_leading_frames": leading, "equal_frames": int(sum(same_rows)),
                     "codebook0_agreement": float((a[:n, 0] == b[:n, 0]).float().mean()) if n else None,
                     "all_codes_agreement": float((a[:n] == b[:n]).float().mean()) if n else None,
                     "frames_bf16": len(a), "frames_fp16": len(b)})


def child_aot(out_path: str, quiet_file: str, wait_s: float) -> None:
    """csm-sdpa-inductor against the same spec with compile: aot: both compiled first (CPU work, beside the card
    cells), then, once the GPU is quiet, the per-frame time of each, alternating, and their codes compared."""
    from lab import engines, session
    from lab.request import Request

    base = gpu_specs()["csm-sdpa-inductor"]
    built = {}
    for spec in (base, base.replace(compile="aot", name="csm-sdpa-aot")):
        t0 = time.perf_counter()
        built[spec.compile] = engines.build(spec)
        _emit(out_path, {"check": "aot build", "compile": spec.compile, "build_s": round(time.perf_counter() - t0, 1),
                         "notes": built[spec.compile].report.notes})
    end = time.time() + wait_s
    while not os.path.exists(quiet_file) and time.time() < end:
        time.sleep(1)
    request = Request(TEXT, max_audio_s=4.0)
    per_frame = {k: [] for k in built}
    for _ in range(5):
        for key, engine in built.items():
            record, _ = session.run_once(engine, engine.spec, request, run=1)
            per_frame[key].append(record.get("ms_per_frame") or 1e3 * record["rtf"] / 12.5)
    codes = {k: e.last_codes.cpu() for k, e in built.items()}
    n = min(len(c) for c in codes.values())
    median = {k: sorted(v)[len(v) // 2] for k, v in per_frame.items()}
    _emit(out_path, {"check": "aot vs inductor", "gpu_quiet": os.path.exists(quiet_file),
                     "ms_per_frame": per_frame, "median_ms_per_frame": median,
                     "aot_over_inductor": median["aot"] / median["inductor"],
                     "within_10_percent": median["aot"] <= 1.10 * median["inductor"],
                     "equal_frames": int((codes["aot"][:n] == codes["inductor"][:n]).all(-1).sum()), "frames": n})


# -- the parent ------------------------------------------------------------------------------------------------
def _spawn(args: list[str], cap_fraction: float | None, card: str | None, log) -> subprocess.Popen:
    child_env = {**os.environ}
    child_env.pop("LAB_CARD", None)
    if card:
        child_env["LAB_CARD"] = card
    if cap_fraction:
        child_env["LAB_CHILD_MEMORY_FRACTION"] = str(cap_fraction)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], env=child_env, stdout=log,
                            stderr=subprocess.STDOUT)


def run(out: str, budget_s: float) -> dict:
    import torch

    start = time.time()
    deadline = start + budget_s
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    rows_path, quiet = os.path.join(out, "cells.jsonl"), os.path.join(out, ".gpu-quiet")
    for path in (rows_path, quiet):
        if os.path.exists(path):
            os.remove(path)
    log = open(os.path.join(out, "log.txt"), "w")
    # The checks first, beside the cards: their compiles are CPU work (16 cores); the aot timing waits for quiet.
    side = [_spawn(["--child", "parity", "--rows", rows_path], 20 / total_gb, None, log),
            _spawn(["--child", "aot", "--rows", rows_path, "--quiet-file", quiet,
                    "--wait-s", str(budget_s - 120)], 20 / total_gb, None, log)]
    waiting = list(EMULATED)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    cards_end = deadline - 100   # room for the aot timing after the cards
    names = [n for n in ORDER if n in gpu_specs()] + sorted(set(gpu_specs()) - set(ORDER))
    while waiting or running:
        for name, (proc, own_end) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
            elif time.time() > own_end + 45:
                proc.kill()   # its cell in flight stays "started": timed out
                del running[name]
        # Cards run side by side while their caps and the two checks' (20 GB each) fit the device; each gets an
        # equal share of what is left of the cards' time, so a card's long list cannot starve the next card.
        used_gb = sum(gpu.SPACES_CARDS[n].memory_gb for n in running) + 40
        if waiting and (not running or used_gb + gpu.SPACES_CARDS[waiting[0]].memory_gb <= 0.95 * total_gb):
            name = waiting.pop(0)
            own_end = time.time() + (cards_end - time.time()) * (len(running) + 1) / (len(waiting) + len(running) + 1)
            running[name] = (_spawn(["--child", "card", "--card", name, "--presets", ",".join(names), "--deadline",
                                     str(own_end), "--rows", rows_path], None, name, log), own_end)
        time.sleep(1)
    open(quiet, "w").close()
    for proc in side:
        try:
            proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
    return collect(rows_path, start)


def collect(rows_path: str, start: float) -> dict:
    rows = [json.loads(line) for line in open(rows_path)] if os.path.exists(rows_path) else []
    cells: dict = {}
    for row in rows:
        if "preset" in row and "check" not in row:   # the last line of a cell wins; a lone "started" is a cell killed mid-way
            cells.setdefault(row["card"], {})[row["preset"]] = row
    for card in cells.values():
        for row in card.values():
            if row["status"] == "started":
                row["status"] = "timed out"
    checks = [r for r in rows if "check" in r]
    return {"cells": cells, "checks": checks, "wall_s": round(time.time() - start, 1)}


def chart(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(gpu_specs())
    columns = list(result["verdicts"])
    colour = {"ran": 2, "runs here": 2, "runs with changes": 1.5, "refused": 0.5, "out of memory": -1, "failed": -1,
              "timed out": 0, "not run (time)": 0}
    grid, text = [], []
    for preset in names:
        line, words = [], []
        for card in columns:
            cell = result["cells"].get(card, {}).get(preset)
            verdict = result["verdicts"][card][preset]["verdict"]
            status = cell["status"] if cell else verdict
            line.append(colour.get(status, 0))
            words.append({"ran": "ran" + (" *" if verdict == "runs with changes" else ""), "refused": "refused",
                          "runs here": "-", "runs with changes": "- *"}.get(status, status))
        grid.append(line)
        text.append(words)
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(columns), 0.35 * len(names) + 2))
    ax.imshow(grid, cmap="RdYlGn", vmin=-1, vmax=2, aspect="auto")
    ax.set_xticks(range(len(columns)), columns)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, words in enumerate(text):
        for j, w in enumerate(words):
            ax.text(j, i, w, ha="center", va="center", fontsize=7)
    ax.set_title(f"GPU presets on emulated Spaces cards ({result['env'].get('device')}, {result['env'].get('commit')})"
                 "\nran = built and streamed; * = with the card's changes; - = not run (verdict only)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="folder for cards.json, cards.png, cells.jsonl and log.txt")
    p.add_argument("--budget-s", type=float, default=500, help="the whole run's wall clock (default: %(default)s)")
    p.add_argument("--plan-only", action="store_true", help="the verdict matrix only: no GPU needed")
    p.add_argument("--child", choices=("card", "parity", "aot"), help=argparse.SUPPRESS)
    p.add_argument("--card", help=argparse.SUPPRESS)
    p.add_argument("--presets", help=argparse.SUPPRESS)
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    p.add_argument("--quiet-file", help=argparse.SUPPRESS)
    p.add_argument("--wait-s", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        if os.environ.get("LAB_CHILD_MEMORY_FRACTION"):   # the checks' own cap, beside the cards' processes
            import torch

            torch.cuda.set_per_process_memory_fraction(float(os.environ["LAB_CHILD_MEMORY_FRACTION"]), 0)
        try:
            if args.child == "card":
                child_card(args.card, args.presets.split(","), args.deadline, args.rows)
            elif args.child == "parity":
                child_parity(args.rows)
            else:
                child_aot(args.rows, args.quiet_file, args.wait_s)
        except Exception as e:
            _emit(args.rows, {"check": f"{args.child} failed", "card": None, "why": f"{type(e).__name__}: {e}"[:400],
                              "trace": traceback.format_exc()[-2000:]} if args.child != "card" else
                  {"card": args.card, "preset": "(process)", "status": "failed", "why": f"{type(e).__name__}: {e}"})
        return 0
    if not args.out:
        p.error("--out is required")
    os.makedirs(args.out, exist_ok=True)
    result = {"env": env.environment(), "emulated": list(EMULATED),
              "verdicts": verdicts((*EMULATED, "ZeroGPU", "H100", "H200")), "cells": {}, "checks": []}
    if not args.plan_only:
        result.update(run(args.out, args.budget_s))
    with open(os.path.join(args.out, "cards.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    chart(result, os.path.join(args.out, "cards.png"))
    for check in result["checks"]:
        print(json.dumps(check)[:400])
    print(f"wrote {args.out}/cards.json and cards.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
