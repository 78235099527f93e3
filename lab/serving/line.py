"""Who runs on a one-at-a-time model, and who may stop what.

- `Cancel`: the flag a run loop checks between frames, which remembers when it was raised.
- `ModelLine` and `Turn`: one comparison (or blind pair) on the model at a time, the others waiting first come
  first served, each told its place and how long the ones ahead should still take.
- `Sessions`: the cancels of each client's comparisons in flight, which Stop and a closed tab set.
"""
from __future__ import annotations

import threading
import time

from lab.errors import LabError


class Cancel:
    """A cancel flag that remembers when it was raised, so a cancelled run's record shows which frames came
    after it."""

    def __init__(self):
        self.event = threading.Event()
        self.at: float | None = None

    def set(self) -> None:
        if not self.event.is_set():
            self.at = time.perf_counter()
            self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()


class Sessions:
    """The cancels of each client's comparisons in flight, by the client's key (a page's session, or its
    listener id): Stop and a closed tab set them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, list[Cancel]] = {}

    def open(self, key: str, cancel: Cancel | None = None) -> Cancel:
        cancel = cancel or Cancel()
        with self._lock:
            if cancel not in self._open.setdefault(key, []):
                self._open[key].append(cancel)
        return cancel

    def close(self, key: str, cancel: Cancel) -> None:
        with self._lock:
            if cancel in self._open.get(key, []):
                self._open[key].remove(cancel)
            if not self._open.get(key):   # a long-lived server sees many sessions come and go
                self._open.pop(key, None)

    def cancel(self, key: str) -> int:
        with self._lock:
            cancels = list(self._open.get(key, []))
        for c in cancels:
            c.set()
        return len(cancels)


class LineFull(LabError):
    """The line is at its bound: `retry_after_s` is how long the one on the model should still take (an HTTP
    client gets it as Retry-After)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__("queue", message)
        self.retry_after_s = retry_after_s


class ModelLine:
    """One comparison (or blind pair) on the model at a time, the others waiting in line, first come first served.
    A waiting page shows its place and how long the ones ahead should still take, from this server's measured runs
    of their presets (lab.measure.history.estimate_s)."""

    def __init__(self, max_waiting: int | None = None, unknown_s: float = 30.0):
        self._cond = threading.Condition()
        self._line: list[Turn] = []
        self.max_waiting, self.unknown_s = max_waiting, unknown_s

    def turn(self, estimate_s: float | None, cancel: Cancel) -> "Turn":
        """A place at the end of the line; past `max_waiting` in line, a LabError that says when to come back
        (the line does not grow without end)."""
        with self._cond:
            if self.max_waiting is not None and len(self._line) >= self.max_waiting:
                head = self._line[0]   # the one on the model: a place frees when it is done
                ran_s = time.monotonic() - head.started_at if head.started_at is not None else 0.0
                left_s = self.unknown_s if head.estimate_s is None else head.estimate_s - ran_s
                retry_s = max(1, round(left_s))
                raise LineFull(f"busy: {len(self._line)} comparisons are in line (the most it takes); "
                               f"try again in {retry_s} s", retry_s)
        return Turn(self, estimate_s, cancel)


class Turn:
    """A place in the line; `with turn:` waits until it is first (or cancelled), the run loop's lock."""

    def __init__(self, line: ModelLine, estimate_s: float | None, cancel: Cancel):
        self.line, self.estimate_s, self.cancel = line, estimate_s, cancel
        self.started_at: float | None = None

    def __enter__(self) -> "Turn":
        with self.line._cond:
            self.line._line.append(self)
            while self.line._line[0] is not self and not self.cancel.is_set():
                self.line._cond.wait(0.2)   # a cancelled wait leaves the line: the loop then stops at once
            self.started_at = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        with self.line._cond:
            self.line._line.remove(self)
            self.line._cond.notify_all()

    def waiting(self) -> tuple[int, float | None]:
        """(turns ahead, seconds they should still take; None when one of them has no measured runs)."""
        with self.line._cond:
            ahead = self.line._line[: self.line._line.index(self)] if self in self.line._line else []
        left = 0.0
        for t in ahead:
            if t.estimate_s is None:
                return len(ahead), None
            ran_s = time.monotonic() - t.started_at if t.started_at is not None else 0.0
            left += max(0.0, t.estimate_s - ran_s)
        return len(ahead), left
