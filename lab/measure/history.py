"""Run records appended to a JSONL history that a crash cannot corrupt.

Each record is one line written with a single os.write on an O_APPEND descriptor. A process killed
mid-write can leave at most one partial last line: the reader skips it, and the next writer starts on
a fresh line so the partial line never swallows a good record.

Bookkeeping comes second to results: a record that cannot be written (a full disk, a read-only volume, a
directory where the file should be) raises NotWritten, a LabError naming the file and the fix, which the run loop
reports and goes past. A Journal checks its file once at start-up and, if the file is unusable, keeps records in
memory instead (bounded), so a server still serves and shows what it ran.
"""
from __future__ import annotations

import json
import os
import statistics
import threading
from collections import deque

from lab.env import shown_path
from lab.errors import LabError

_lock = threading.Lock()
KEPT_IN_MEMORY = 1000   # records a Journal holds when its file is unusable (the oldest are dropped)
ESTIMATE_RUNS = 20      # a preset's latest warm runs that estimate how long its next comparison takes
TAIL_BYTES = 4 * 2**20  # what read(..., tail=True) reads: enough for estimates, not the whole of a long history


class NotWritten(LabError):
    """A record was not written to its file; the run it describes finished and is kept."""


def _unwritable(path: str, e: OSError, env_var: str) -> NotWritten:
    reason = "is a directory" if isinstance(e, IsADirectoryError) or os.path.isdir(path) else (
        e.strerror or type(e).__name__)
    return NotWritten(shown_path(path), f"cannot be written ({reason}); runs are kept in memory only until the "
                                        f"server restarts: free disk space, or set {env_var} to a writable file")


def check(path: str, env_var: str = "LAB_HISTORY") -> NotWritten | None:
    """Whether records can be appended to `path`, asked once at start-up: None, or why not (with the fix)."""
    try:
        if os.path.isdir(path):
            raise IsADirectoryError(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644))
    except OSError as e:
        return _unwritable(path, e, env_var)
    return None


class Journal:
    """A history (or votes) file for a long-running server: checked at start-up; when unusable, or when a write
    fails, the records it could not write are kept in memory (the last KEPT_IN_MEMORY) and read back with the
    file's."""

    def __init__(self, path: str, env_var: str = "LAB_HISTORY"):
        self.path, self.env_var = path, env_var
        self.problem: NotWritten | None = check(path, env_var)
        self.memory: deque[dict] = deque(maxlen=KEPT_IN_MEMORY)
        # Each preset's latest warm wall times, read from the file once and kept up to date by append: an estimate
        # per click that parsed the file's tail instead took the GIL from every stream for the whole parse.
        self._walls: dict[str, deque[float]] | None = None
        self._walls_lock = threading.Lock()

    def estimate_s(self, presets: list[str], runs: int) -> float | None:
        """`estimate_s` over this history, from its kept wall times."""
        with self._walls_lock:
            if self._walls is None:
                self._walls = {}
                for record in self.read(tail=True):
                    self._note(record)
            walls = [list(self._walls.get(p, ())) for p in presets]
        if not all(walls):
            return None
        return sum(statistics.median(w) * (runs + 1) for w in walls)

    def _note(self, record: dict) -> None:
        if (record.get("preset") and not record.get("cold") and not record.get("cancelled") and "rtf" in record
                and "audio_s" in record):
            self._walls.setdefault(record["preset"], deque(maxlen=ESTIMATE_RUNS)).append(
                record["rtf"] * record["audio_s"])

    def append(self, record: dict) -> None:
        with self._walls_lock:
            if self._walls is not None:
                self._note(record)
        if self.problem is None:
            try:
                return _append_file(self.path, record, self.env_var)
            except NotWritten as e:
                self.problem = e   # a full disk stays full: later records go to memory without trying again
        self.memory.append(record)
        raise self.problem

    def read(self, tail: bool = False) -> list[dict]:
        on_disk = _read_file(self.path, tail) if not os.path.isdir(self.path) else []
        return on_disk + list(self.memory)

    @property
    def shown(self) -> str:
        return shown_path(self.path)


def append(path: "str | Journal", record: dict) -> None:
    """Appends one record; raises NotWritten (after a Journal kept it in memory) when it cannot be written."""
    if isinstance(path, Journal):
        return path.append(record)
    return _append_file(path, record)


def _append_file(path: str, record: dict, env_var: str = "LAB_HISTORY") -> None:
    line = (json.dumps(record, default=_jsonable) + "\n").encode()
    try:
        _write_line(path, line)
    except OSError as e:
        raise _unwritable(path, e, env_var) from e


def _write_line(path: str, line: bytes) -> None:
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


def read(path: "str | Journal", tail: bool = False) -> list[dict]:
    """The records, oldest first; `tail`: only those in the last TAIL_BYTES (for estimates on every click)."""
    if isinstance(path, Journal):
        return path.read(tail)
    return _read_file(path, tail)


def _read_file(path: str, tail: bool = False) -> list[dict]:
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, "rb") as f:
        if tail and os.fstat(f.fileno()).st_size > TAIL_BYTES:
            f.seek(-TAIL_BYTES, os.SEEK_END)
            f.readline()   # the first line read from the middle is cut
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


def estimate_s(records: list[dict], presets: list[str], runs: int) -> float | None:
    """How long a comparison of these presets should take, from this history: each preset's median wall time
    over its last ESTIMATE_RUNS finished warm runs (RTF × audio seconds), times its runs; None when a preset never
    ran here (its build, if it is not built yet, is not counted)."""
    total = 0.0
    for preset in presets:
        walls = [r["rtf"] * r["audio_s"] for r in records if r.get("preset") == preset and not r.get("cold")
                 and not r.get("cancelled") and "rtf" in r][-ESTIMATE_RUNS:]
        if not walls:
            return None
        total += statistics.median(walls) * (runs + 1)
    return total
