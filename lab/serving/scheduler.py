"""Who runs in the next batched step: the slots, the line of requests waiting for one, and when to admit whom.

It knows no tensors and runs no model (vLLM keeps its scheduler apart from its model runner the same way): the
batched engine (lab.engines.csm_batched) asks it at every frame boundary which waiting requests take which free
rows, and tells it when a stream ends. A request here is anything with `prompt_len`, `row`, `abandoned`, `cancel`
and `playing` (it has sent a chunk). The clock and the wait are passed in, so tests run it on a fake clock.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class AdmissionPolicy:
    """When arrivals join. Admission is a prefill (eager: a few hundred kernel launches) and a sync, paid by every
    stream in the batch. While streams run, a trickle of arrivals is gathered for up to `every_frames` frames, or
    until `batch` wait, and prefilled together; while any stream is playing, at most `max_positions` padded prompt
    positions at a time (about 35 ms on the H200), so a crowd delays the playing streams' frames a little at a time.
    With no stream in a slot, arrivals gather while they keep coming (each within `quiet_s` of the last, up to
    `gather_max_s`) and the burst is prefilled at once, before any of it plays: while chunks double, every frame
    interval of a playing stream must stay under half a frame of audio, and a neighbour's prefill inside one is a
    stall (docs/GPU.md, 1024 streams)."""
    every_frames: int = 4
    batch: int = 8
    max_positions: int = 4096
    quiet_s: float = 0.005
    gather_max_s: float = 0.25


def wait_on(condition: threading.Condition, seconds: float) -> None:
    condition.wait(seconds)


class Scheduler:
    """Slots (one per row of the batched step) and the waiting line, under one condition (`wake`) that an arrival
    or `close` notifies."""

    def __init__(self, rows: int, policy: AdmissionPolicy = AdmissionPolicy(),
                 clock: Callable[[], float] = time.perf_counter,
                 wait: Callable[[threading.Condition, float], None] = wait_on):
        self.slots: list[Any | None] = [None] * rows
        self.waiting: collections.deque = collections.deque()
        self.wake = threading.Condition()
        self.policy, self.clock, self.wait = policy, clock, wait
        self.closing = False
        self.frames_since_admission = 0

    def add(self, request) -> None:
        with self.wake:
            self.waiting.append(request)
            self.wake.notify()

    def place_in_line(self, request) -> int:
        """0 once the request has a slot (or has ended); else its place among the requests waiting for one."""
        with self.wake:
            waiting = list(self.waiting)
        return waiting.index(request) + 1 if request in waiting else 0

    def busy(self) -> bool:
        return bool(self.waiting) or any(self.slots)

    def close(self) -> None:
        with self.wake:
            self.closing = True
            self.wake.notify()

    def next_frame(self, in_flight: bool) -> tuple[list, list] | None:
        """Blocks until there is work (a waiting request, a stream in a slot, or a frame still `in_flight`), then
        returns (requests cancelled while they waited, requests admitted now, each given its row), or None once
        closing."""
        with self.wake:
            while not self.closing and not self.waiting and not any(self.slots) and not in_flight:
                self.wake.wait()
            # Arrivals and no stream in a slot: let a burst gather behind the first. Not only at an idle engine: a
            # burst that comes while the last frame of the streams before it is still in flight was split in two
            # (202 and 310 of 512 arriving together, on the CPU; stalls for the first ones on the H200).
            if self.waiting and not any(self.slots):
                self._gather()
            if self.closing:
                return None
            cancelled = [r for r in self.waiting if r.abandoned or (r.cancel is not None and r.cancel.is_set())]
            for request in cancelled:
                self.waiting.remove(request)
            free = [row for row, r in enumerate(self.slots) if r is None]
            due = (not any(self.slots) or self.frames_since_admission >= self.policy.every_frames
                   or len(self.waiting) >= min(self.policy.batch, len(free)))
            admit = self.admissible(len(free)) if due else []
            self.frames_since_admission = 0 if admit else self.frames_since_admission + 1
            for row, request in zip(free, admit):
                request.row, self.slots[row] = row, request
            return cancelled, admit

    def release(self, request) -> bool:
        """Frees the request's slot; whether it held one (its row is then free for the next admission)."""
        with self.wake:
            if request.row >= 0 and self.slots[request.row] is request:
                self.slots[request.row] = None
                return True
        return False

    def _gather(self) -> None:
        """(Holding `wake`.) Waits until no request has arrived for `quiet_s`, or `gather_max_s` have passed."""
        start = last = self.clock()
        seen = len(self.waiting)
        while not self.closing:
            now = self.clock()
            if len(self.waiting) != seen:
                seen, last = len(self.waiting), now
            wait_s = min(last + self.policy.quiet_s, start + self.policy.gather_max_s) - now
            if wait_s <= 0:
                return
            self.wait(self.wake, wait_s)

    def admissible(self, free: int) -> list:
        """(Holding `wake`.) The waiting requests to admit now, first come first: as many as there are free slots;
        while a stream is playing, no more than `max_positions` padded positions (always at least one request).
        Streams admitted but not yet playing only start later, so the rest of a burst that came with a pause in it
        joins at once."""
        playing = any(r is not None and r.playing for r in self.slots)
        admit, longest = [], 0
        while self.waiting and len(admit) < free:
            longest_next = max(longest, self.waiting[0].prompt_len)
            if playing and admit and (len(admit) + 1) * longest_next > self.policy.max_positions:
                break
            admit.append(self.waiting.popleft())
            longest = longest_next
        return admit
