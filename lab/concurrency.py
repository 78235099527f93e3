"""Many listeners at once: N streams into one engine, arriving together or as a Poisson process, and the
per-stream figures under load (docs/METRICS.md, "per-stream figures under load").

A batched engine (lab/engines/csm_batched.py) takes every stream at once. Any other engine serves them one after
another, as the page's queue does; `sequential` measures that, with each stream's wait in line counted in its
TTFB. Both report the same summary, so the two can be charted side by side.
"""
from __future__ import annotations

import time

import numpy as np

import dataclasses

from lab.errors import LabError
from lab.measure.metrics import PHASES, Timeline, figures, summarize
from lab.request import Request


def requests_for(texts: list[str], streams: int, max_audio_s: float, temperature: float = 0.0) -> list[Request]:
    """One request per stream: the texts in turn, each stream with its own seed, all capped at `max_audio_s`."""
    return [Request(texts[i % len(texts)], seed=i, max_audio_s=max_audio_s, temperature=temperature)
            for i in range(streams)]


def arrivals_s(streams: int, rate_hz: float | None, seed: int = 0) -> list[float]:
    """Arrival offsets: all at 0 ("together"), or a Poisson process at `rate_hz` (exponential gaps, seeded)."""
    if not rate_hz:
        return [0.0] * streams
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_hz, streams)
    return list(np.cumsum(gaps) - gaps[0])


def summary(timelines: list[Timeline], arrived: list[float], started: float) -> dict:
    """Per-stream TTFB (from its arrival, so a wait in line counts), steady RTF and underruns; and goodput, the
    audio seconds produced per wall second summed over streams."""
    per = [figures(t) for t in timelines]
    ttfb_ms = [(t.chunks[0][0] - at) * 1e3 for t, at in zip(timelines, arrived)]
    # Where a crowd's TTFB goes: "sent" (arrival to the request's own stamp: the caller handing it in), then the
    # phases of one run's TTFB (a batched engine's "session" is the wait for a slot).
    phases = {"sent": [(t.stamp("request") - at) * 1e3 for t, at in zip(timelines, arrived)],
              **{name: [f["phases_ms"][name] for f in per] for name in PHASES}}
    end = max(t.chunks[-1][0] for t in timelines)
    audio_s = sum(f["audio_s"] for f in per)
    return {
        "streams": len(timelines),
        "ttfb_ms": summarize(ttfb_ms),
        "ttfb_phases_ms": {name: summarize(values) for name, values in phases.items()},
        "steady_rtf": summarize([f["steady_rtf"] for f in per]),
        "rtf": summarize([f["rtf"] for f in per]),
        "underruns": int(sum(f["underruns"] for f in per)),
        "streams_with_underruns": int(sum(f["underruns"] > 0 for f in per)),
        "stall_s_max": max(f["stall_s"] for f in per),
        "audio_s": audio_s,
        "wall_s": end - started,
        "goodput_audio_s_per_s": audio_s / (end - started),
    }


def _arrive(started: float, offset_s: float) -> float:
    """Sleeps until the arrival `offset_s` after `started`; returns that arrival's time."""
    at = started + offset_s
    time.sleep(max(0.0, at - time.perf_counter()))
    return at


def batched(engine, requests: list[Request], offsets_s: list[float]) -> dict:
    """Every request into a batched engine at its arrival offset (`engine.open`), then each one's chunks drained.
    The chunks are stamped by the engine's scheduler when they reach the host, so draining late changes nothing."""
    frames_before, rows_before = engine.frames_run, engine.rows_run
    started = time.perf_counter()
    tickets, arrived = [], []
    for request, offset in zip(requests, offsets_s):
        arrived.append(_arrive(started, offset))
        tickets.append(engine.open(request, Timeline()))
    for ticket in tickets:
        for _ in ticket.chunks():
            pass
    out = summary([t.timeline for t in tickets], arrived, started)
    frames = engine.frames_run - frames_before
    out.update(frames_run=frames, mean_rows_per_frame=(engine.rows_run - rows_before) / max(frames, 1),
               ms_per_frame=out["wall_s"] * 1e3 / max(frames, 1))
    return out


def sequential(engine, requests: list[Request], offsets_s: list[float]) -> dict:
    """The requests through a one-at-a-time engine in arrival order, as the page's queue serves them: a stream that
    arrives while another runs waits, and its TTFB counts the wait."""
    started = time.perf_counter()
    timelines, arrived = [], []
    for request, offset in zip(requests, offsets_s):
        arrived.append(_arrive(started, offset))
        timeline = Timeline()
        for _ in engine.stream(request, timeline):
            pass
        timelines.append(timeline)
    return summary(timelines, arrived, started)


def parse_levels(text: str, most: int | None = None, field: str = "streams") -> list[int]:
    """"1,16,256" -> [1, 16, 256]: whole numbers of at least 1 (and at most `most`), or a LabError naming the field."""
    try:
        levels = [int(n) for n in str(text).replace(" ", "").split(",")]
    except ValueError:
        levels = [0]
    if not levels or min(levels) < 1:
        raise LabError(field, f"{text!r} is not a comma list of whole numbers of at least 1; use e.g. 1,16,256")
    if most is not None and max(levels) > most:
        raise LabError(field, f"{max(levels)} streams is more than this variant's {most} slots; use at most {most}")
    return levels


def sweep(engine, spec, request: Request, levels: list[int], rate_hz: float | None = None):
    """Each level in turn, as its figures come (the CLI and the page both consume this): `request` once per stream
    with the stream's own seed, batched into a batching engine, else one after another."""
    run = batched if spec.batches else sequential
    for n in levels:
        requests = [dataclasses.replace(request, seed=request.seed + i) for i in range(n)]
        yield {"preset": spec.name, "weights": spec.weights, "batches": spec.batches, "arrival_rate_hz": rate_hz,
               **run(engine, requests, arrivals_s(n, rate_hz, request.seed))}
