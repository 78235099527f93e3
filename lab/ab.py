"""Blind A/B listening: which preset plays as A, persisted votes, and a tally per pair with a 95% interval.

A vote is one JSONL line (through lab.measure.history's crash-safe append). The tally asks one question per pair:
of the votes that picked a side, what share preferred the first preset (names sorted)? Its 95% interval is
Wilson's score interval for a binomial proportion; "same" votes are counted and shown but pick no side.
"""
from __future__ import annotations

import math
import random
import time

from lab.errors import LabError
from lab.measure import history

CHOICES = ("A", "B", "same")
Z_95 = 1.959963984540054   # two-sided 95% normal quantile


def blind_order(preset_1: str, preset_2: str, rng: random.Random | None = None) -> tuple[str, str]:
    """(preset playing as A, preset playing as B), in random order so the listener cannot tell from position."""
    if not preset_1 or not preset_2:
        raise LabError("A/B presets", "pick two presets to compare")
    if preset_1 == preset_2:
        raise LabError("A/B presets", f"both are {preset_1!r}; pick two different presets")
    pair = [preset_1, preset_2]
    (rng or random.SystemRandom()).shuffle(pair)
    return pair[0], pair[1]


MODES = ("streamed", "prebuffered")   # each side at its real start delay; or both generated first, loudness matched
TARGET_RMS_DBFS = -23.0                 # pre-buffered pairs are matched to this level, so loudness does not decide


def vote_record(a: str, b: str, choice: str, text: str = "", seed: int = 0, weights: dict | None = None,
                mode: str = "streamed") -> dict:
    if choice not in CHOICES:
        raise LabError("vote", f"{choice!r} is not one of {', '.join(CHOICES)}")
    if mode not in MODES:
        raise LabError("listening mode", f"{mode!r} is not one of {', '.join(MODES)}")
    return {"a": a, "b": b, "choice": choice, "pair": sorted((a, b)), "mode": mode,
            "winner": {"A": a, "B": b}.get(choice), "text": text, "seed": seed, "weights": weights or {},
            "time": time.time()}


def loudness_matched(samples, target_dbfs: float = TARGET_RMS_DBFS):
    """The clip scaled to `target_dbfs` RMS, lowered further if a peak would clip."""
    import numpy as np

    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if len(samples) else 0.0
    if rms == 0.0:
        return samples
    gain = 10 ** (target_dbfs / 20) / rms
    peak = float(np.max(np.abs(samples))) * gain
    return (samples * (gain * min(1.0, 0.99 / peak) if peak > 0 else gain)).astype(np.float32)


def record_vote(path: str, a: str, b: str, choice: str, **fields) -> dict:
    rec = vote_record(a, b, choice, **fields)
    history.append(path, rec)
    return rec


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there are no trials."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def tally(votes: list[dict]) -> list[dict]:
    """One row per pair: votes for each side and "same", the first preset's share of decided votes, its
    95% interval, and a verdict that says "no clear preference" while the interval still holds 0.5."""
    pairs: dict[tuple[str, str], dict] = {}
    for v in votes:
        if v.get("choice") not in CHOICES or not isinstance(v.get("pair"), list) or len(v["pair"]) != 2:
            continue   # not a vote record
        first, second = v["pair"]
        row = pairs.setdefault((first, second), {"first": first, "second": second, "first_wins": 0,
                                                 "second_wins": 0, "same": 0})
        if v["winner"] is None:
            row["same"] += 1
        elif v["winner"] == first:
            row["first_wins"] += 1
        else:
            row["second_wins"] += 1
    rows = []
    for row in pairs.values():
        decided = row["first_wins"] + row["second_wins"]
        lo, hi = wilson_interval(row["first_wins"], decided)
        share = row["first_wins"] / decided if decided else None
        if decided == 0:
            verdict = "no decided votes yet"
        elif lo > 0.5:
            verdict = f"{row['first']} preferred"
        elif hi < 0.5:
            verdict = f"{row['second']} preferred"
        else:
            verdict = "no clear preference (the interval holds 50%)"
        rows.append({**row, "votes": decided + row["same"], "first_share": share, "ci95_lo": lo, "ci95_hi": hi,
                     "verdict": verdict})
    return rows


def tally_table(votes: list[dict]) -> list[dict]:
    """The tally as the page shows it."""
    return [{"pair": f"{r['first']} vs {r['second']}", "votes": r["votes"], "prefer first": r["first_wins"],
             "prefer second": r["second_wins"], "same": r["same"],
             "first's share": None if r["first_share"] is None else round(r["first_share"], 3),
             "95% interval": f"{r['ci95_lo']:.2f} – {r['ci95_hi']:.2f}", "verdict": r["verdict"]}
            for r in tally(votes)] or [{"pair": "no votes yet"}]
