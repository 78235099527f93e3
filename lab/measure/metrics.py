"""Timeline of one request, and every figure derived from it, as docs/METRICS.md defines them.

The app and the CLI both call `figures()`, so a number means the same thing everywhere.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# The phases of TTFB, in order. Each ends at the stamp of the same name; the first starts at "request".
# Engines stamp every one; a model without a phase stamps it at once, so the phase shows as 0 ms.
PHASES = ("session", "prefill", "generator", "first_frame", "first_decode")
# "Audible": a 10 ms window of the stream whose RMS level reaches -50 dBFS (full scale = 1.0). Below that, a
# chunk is silence or a click-free fade-in that a listener does not hear as the voice starting.
AUDIBLE_DBFS = -50.0
AUDIBLE_WINDOW_S = 0.010


@dataclass
class Timeline:
    """perf_counter stamps of one request. `sync` runs before each stamp (torch.cuda.synchronize on a GPU),
    so a stamp marks work finished on the device, not merely queued."""

    sync: Callable[[], None] = lambda: None
    events: list[tuple[str, float]] = field(default_factory=list)
    chunks: list[tuple[float, float]] = field(default_factory=list)  # (stamp, audio seconds in this chunk)
    frames: list[float] = field(default_factory=list)                # stamp of every generated frame, if known
    # (chunk index, seconds into the stream) of the first audible sample; set by whoever sees the samples.
    first_audible: tuple[int, float] | None = None

    def mark(self, name: str) -> float:
        self.sync()
        t = time.perf_counter()
        self.events.append((name, t))
        return t

    def frame(self) -> None:
        # No sync here: stamping each frame must not add a host sync to the hot loop. These stamps are
        # for "did generation stop after cancel", not for timing.
        self.frames.append(time.perf_counter())

    def chunk(self, audio_s: float) -> float:
        self.sync()
        t = time.perf_counter()
        self.chunks.append((t, audio_s))
        return t

    def stamp(self, name: str) -> float | None:
        return next((t for n, t in self.events if n == name), None)

    def listen(self, samples: np.ndarray, sample_rate: int) -> int:
        """Note where the stream first becomes audible, given the samples of the chunk just stamped. Returns that
        sample's index inside this chunk, or -1 (not in this chunk, or found earlier)."""
        if self.first_audible is not None:
            return -1
        at = audible_index(samples, sample_rate)
        if at >= 0:
            streamed_s = sum(a for _, a in self.chunks[:-1])
            self.first_audible = (len(self.chunks) - 1, streamed_s + at / sample_rate)
        return at

    def copy(self) -> "Timeline":
        """A snapshot for another thread: the lists are copied, the stamps are immutable tuples."""
        return Timeline(events=list(self.events), chunks=list(self.chunks), first_audible=self.first_audible)

    def to_dict(self) -> dict:
        t0 = self.stamp("request") or 0.0
        return {"events": [(n, t - t0) for n, t in self.events],
                "chunks": [(t - t0, a) for t, a in self.chunks],
                "frames": len(self.frames)}


def audible_index(samples: np.ndarray, sample_rate: int) -> int:
    """Index of the first sample of the first AUDIBLE_WINDOW_S window whose RMS reaches AUDIBLE_DBFS, or -1."""
    window = max(1, int(AUDIBLE_WINDOW_S * sample_rate))
    usable = len(samples) // window * window
    if usable == 0:
        return -1
    power = np.square(samples[:usable].astype(np.float64)).reshape(-1, window).mean(axis=1)
    loud = np.flatnonzero(power >= 10 ** (AUDIBLE_DBFS / 10))
    return int(loud[0]) * window if len(loud) else -1


def stalls(chunks: list[tuple[float, float]]) -> list[float]:
    """A player starts at the first chunk's arrival and plays in real time; a chunk that arrives after the player
    ran dry stalls it until it arrives. Returns each stall's seconds, in order (the worst gap gives continuity)."""
    if not chunks:
        return []
    play_at = chunks[0][0]          # when the next chunk must be there
    waits = []
    for arrived, audio_s in chunks:
        if arrived > play_at + 1e-9:
            waits.append(arrived - play_at)
            play_at = arrived
        play_at += audio_s
    return waits


def underruns(chunks: list[tuple[float, float]]) -> tuple[int, float]:
    """The simulated player of `stalls`: (chunks that arrived late, total stall seconds)."""
    waits = stalls(chunks)
    return len(waits), sum(waits, 0.0)


def figures(timeline: Timeline) -> dict:
    """TTFB with its phases, RTF, steady RTF, underruns and stall, from one request's timeline."""
    t0 = timeline.stamp("request")
    if t0 is None or not timeline.chunks:
        raise ValueError("timeline has no request stamp or no chunks: the request produced no audio")
    first_t, first_audio_s = timeline.chunks[0]
    last_t = timeline.chunks[-1][0]
    audio_s = sum(a for _, a in timeline.chunks)

    phases_ms, start = {}, t0
    for name in PHASES:
        end = timeline.stamp(name)
        end = start if end is None else min(max(end, start), first_t)
        phases_ms[name] = (end - start) * 1e3
        start = end
    # Whatever the engine did after its last phase stamp and before the chunk was on the host.
    phases_ms["first_decode"] += (first_t - start) * 1e3

    steady_audio_s = audio_s - first_audio_s
    late, stall_s = underruns(timeline.chunks)
    audible_chunk, audible_s = timeline.first_audible if timeline.first_audible else (None, None)
    return {
        "ttfb_ms": (first_t - t0) * 1e3,
        # When the chunk holding the first audible sample was ready (None: nothing audible, e.g. a silent run).
        "first_audible_ms": None if audible_chunk is None else (timeline.chunks[audible_chunk][0] - t0) * 1e3,
        "first_audible_s": audible_s,     # where that sample sits in the stream: what a player adds on top
        "phases_ms": phases_ms,
        "rtf": (last_t - t0) / audio_s if audio_s > 0 else float("inf"),
        "steady_rtf": (last_t - first_t) / steady_audio_s if steady_audio_s > 0 else None,
        "audio_s": audio_s,
        "chunks": len(timeline.chunks),
        "underruns": late,
        "stall_s": stall_s,
        "wall_s": last_t - t0,
    }


def summarize(values: list[float]) -> dict:
    """Median and spread of warm runs (p10–p90 when there are 10 or more, else min–max), and the tails p90 and
    p99 (with few runs, p99 sits next to the slowest run)."""
    vals = sorted(v for v in values if v is not None)
    if not vals:
        return {"median": None, "lo": None, "hi": None, "p90": None, "p95": None, "p99": None, "n": 0}

    def q(p):
        i = p * (len(vals) - 1)
        lo, hi = int(i), min(int(i) + 1, len(vals) - 1)
        return vals[lo] + (vals[hi] - vals[lo]) * (i - lo)

    lo, hi = (q(0.1), q(0.9)) if len(vals) >= 10 else (vals[0], vals[-1])
    # p95: the served figures' SLO percentile (docs/METRICS.md, "A speech server under load")
    return {"median": q(0.5), "lo": lo, "hi": hi, "p90": q(0.9), "p95": q(0.95), "p99": q(0.99), "n": len(vals)}
