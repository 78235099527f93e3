"""Run records appended to a JSONL history that a crash cannot corrupt.

Each record is one line written with a single os.write on an O_APPEND descriptor. A process killed
mid-write can leave at most one partial last line: the reader skips it, and the next writer starts on
a fresh line so the partial line never swallows a good record.
"""
from __future__ import annotations

import json
import os
import statistics
import threading

_lock = threading.Lock()


def append(path: str, record: dict) -> None:
    line = (json.dumps(record, default=_jsonable) + "\n").encode()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with _lock:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size:
                with open(path, "rb") as f:
                    f.seek(size - 1)
                    if f.read(1) != b"\n":
                        line = b"\n" + line   # close a partial line left by a killed writer
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


def read(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    records = []
    with open(path, "rb") as f:
        for raw in f:
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue   # a line cut short by a crash
            if isinstance(rec, dict):
                records.append(rec)
    return records


def _jsonable(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if hasattr(obj, "__dict__"):
        return obj.__dict__
    return str(obj)


def filter_runs(records: list[dict], presets: list[str] | None = None, weights: list[str] | None = None,
                kind: str = "all", text_contains: str = "", source: str = "") -> list[dict]:
    """The records a History view asks for. `kind`: all, cold, warm or cancelled (a cancelled run has no
    figures, only its frame times); `source`: "app", "ab" or "" for any (the CLI writes no source)."""
    if kind not in ("all", "cold", "warm", "cancelled"):
        raise ValueError(f"kind: {kind!r} is not one of all|cold|warm|cancelled")
    out = []
    for r in records:
        if "preset" not in r:
            continue
        if presets and r["preset"] not in presets:
            continue
        if weights and r.get("weights") not in weights:
            continue
        cancelled = bool(r.get("cancelled"))
        if kind == "cancelled" and not cancelled:
            continue
        if kind in ("cold", "warm") and (cancelled or bool(r.get("cold")) != (kind == "cold")):
            continue
        if text_contains and text_contains.lower() not in str(r.get("text", "")).lower():
            continue
        if source and r.get("source", "cli") != source:
            continue
        out.append(r)
    return out


def export(records: list[dict], folder: str, title: str) -> dict:
    """CSV, JSON and a chart PNG of `records`, overwritten in `folder` (a long-running Space must not fill its
    disk): their paths, and the chart's figure (None when no run has figures)."""
    from lab import report

    paths = {ext: os.path.join(folder, f"history.{ext}") for ext in ("csv", "json", "png")}
    complete = [r for r in records if not r.get("cancelled") and "ttfb_ms" in r]
    with open(paths["csv"], "w") as f:
        f.write(report.to_csv(complete))
    with open(paths["json"], "w") as f:
        json.dump(records, f, indent=1)
    figure = None
    if complete:
        figure = report.chart(complete, title, paths["png"])
    else:
        paths["png"] = None
    return {**paths, "figure": figure}


def estimate_s(records: list[dict], presets: list[str], runs: int) -> float | None:
    """How long a comparison of these presets should take, from this history: each preset's median wall time
    over its last 20 finished warm runs (RTF × audio seconds), times its runs; None when a preset never ran here
    (its build, if it is not built yet, is not counted)."""
    total = 0.0
    for preset in presets:
        walls = [r["rtf"] * r["audio_s"] for r in records if r.get("preset") == preset and not r.get("cold")
                 and not r.get("cancelled") and "rtf" in r][-20:]
        if not walls:
            return None
        total += statistics.median(walls) * (runs + 1)
    return total
