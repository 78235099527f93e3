"""What a side-by-side comparison needs besides the runs themselves: its inputs checked (each error names the
field and the fix), the build-cost rows, and the record of a run that was cancelled.

The app calls these; they hold no UI, so a bug in a number or a message is fixed here for every caller.
"""
from __future__ import annotations

import math
import time

from lab.errors import LabError
from lab.metrics import Timeline
from lab.request import MAX_TEXT_CHARS, Request, validate_request
from lab.spec import VariantSpec

MAX_RUNS = 20           # warm runs per preset; one cold run comes first
MAX_SEED = 2**32 - 1    # numpy's and torch's seeded generators both take this range


def _whole_number(value, field: str, example: str) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise LabError(field, f"is empty; type a whole number, e.g. {example}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabError(field, f"{value!r} is not a number; type a whole number, e.g. {example}") from None
    if not math.isfinite(number):
        raise LabError(field, f"{value!r} is not a finite number; type a whole number, e.g. {example}")
    if number != int(number):
        raise LabError(field, f"{value} is not a whole number; type e.g. {example}")
    return int(number)


def validate_inputs(text, seed, max_audio_s, runs, max_chars: int = MAX_TEXT_CHARS) -> tuple[Request, int]:
    """The comparison's shared request (the same text, seed and cap for every preset) and the warm runs."""
    seed = _whole_number(seed, "seed", "0")
    if not 0 <= seed <= MAX_SEED:
        raise LabError("seed", f"{seed} is out of range; use 0 to {MAX_SEED}")
    runs = _whole_number(runs, "runs per preset", "3")
    if not 1 <= runs <= MAX_RUNS:
        raise LabError("runs per preset", f"{runs} is out of range; use 1 to {MAX_RUNS} "
                                          f"(one cold run comes first and is reported apart)")
    if max_audio_s is None:
        raise LabError("max_audio_s", "is empty; type a cap on audio length in seconds, e.g. 8")
    try:
        max_audio_s = float(max_audio_s)
    except (TypeError, ValueError):
        raise LabError("max_audio_s", f"{max_audio_s!r} is not a number of seconds, e.g. 8") from None
    request = Request(text if isinstance(text, str) else "", seed=seed, max_audio_s=max_audio_s)
    request = validate_request(request, max_chars)
    return Request(request.text.strip(), seed=seed, max_audio_s=max_audio_s), runs


def figures_line(row: dict) -> str:
    """A preset's result line under its player, from `report.summary_rows`. A preset whose warm runs all failed
    has only its cold run: no warm median, and no crash formatting a missing one."""
    line = (f"warm median TTFB **{row['ttfb_ms']:.0f} ms** · RTF **{row['rtf']:.3g}** · underruns "
            f"{row['underruns']:.0f}" if row.get("warm_runs") else "cold run only")
    if row.get("cold_ttfb_ms") is not None:
        line += f" · cold TTFB {row['cold_ttfb_ms']:.0f} ms"
    return line


def build_row(name: str, report) -> dict:
    """One row of the build-cost table from an engine's BuildReport."""
    return {"preset": name, "load_s": report.load_s, "warmup_or_compile_s": report.warmup_s,
            "memory_mib": report.memory_bytes / 2**20, "build_peak_mib": report.peak_mem_bytes / 2**20,
            "params_m": report.params / 1e6, "tokenizer": report.tokenizer}


def cancelled_record(spec: VariantSpec, request: Request, timeline: Timeline, cancel_at: float | None,
                     run: int, cold: bool) -> dict:
    """A run stopped by the user or a closed page: which frames were generated, and when, against the moment
    the cancel was asked for (seconds from the request stamp), so a test or a reader can check that
    generation stopped."""
    t0 = timeline.stamp("request")
    if t0 is None:
        t0 = timeline.frames[0] if timeline.frames else (cancel_at or time.perf_counter())
    return {
        "preset": spec.name, "run": run, "cold": cold, "cancelled": True, "weights": spec.weights,
        "family": spec.family, "text": request.text, "seed": request.seed, "max_audio_s": request.max_audio_s,
        "frame_s": [t - t0 for t in timeline.frames],
        "chunk_s": [t - t0 for t, _ in timeline.chunks],
        "cancel_s": None if cancel_at is None else cancel_at - t0,
        "audio_s": sum(a for _, a in timeline.chunks), "time": time.time(),
    }
