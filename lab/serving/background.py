"""The run loop in a thread of its own, its events kept for whoever follows it.

A consumer that does slow work per event (a page encoding audio, drawing charts) must not do it inside the timed
loop, so the loop runs in its own thread. Its events are kept in order, so a consumer can also come late and still
see everything from the start: a click starts a comparison over the page's socket at once, and the page's Gradio
event, which renders tables and charts, follows it when it arrives.
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Iterator


class Background:
    """`events` (the run loop's generator) consumed in a new thread. `on_event` runs in that thread before an event
    is kept: for work that must happen at once (a chunk onto a socket) or before the loop goes on (waiting for the
    browser's report)."""

    def __init__(self, events: Iterator, on_event: Callable | None = None, cancel=None, name: str = "run loop",
                 keep_events: bool = True):
        # keep_events=False: `on_event` is the only consumer (an API stream), so chunks are not held for followers
        self.cancel, self.keep_events = cancel, keep_events
        self._events: list = []
        self._lock = threading.Lock()
        self._finished = threading.Event()
        self._failure: BaseException | None = None
        self.finished_at: float | None = None     # time.monotonic() at the end, for whoever keeps finished ones
        self._thread = threading.Thread(target=self._work, args=(events, on_event), daemon=True, name=name)
        self._thread.start()

    def _work(self, events, on_event) -> None:
        try:
            for event in events:
                if on_event is not None:
                    on_event(event)
                if self.keep_events:
                    with self._lock:
                        self._events.append(event)
        except BaseException as e:   # raised again in each follower's thread
            self._failure = e
        finally:
            self.finished_at = time.monotonic()
            self._finished.set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._finished.wait(timeout_s)

    def follow(self, tick_s: float = 0.1, cancel_on_close: bool = True) -> Iterator:
        """Every event from the first, then each new one; None when a `tick_s` went by with nothing new (a page
        refreshes its clocks then). The follower looks every `tick_s` and takes all that came, instead of waking
        for each event: every wake-up takes the GIL from the loop's thread. Closing this generator (a closed page)
        sets `cancel` when `cancel_on_close`, and returns once the loop has stopped, at its next frame."""
        index = 0
        try:
            while True:
                finished = self._finished.is_set()
                with self._lock:
                    batch = self._events[index:]
                index += len(batch)
                if not batch and not finished:
                    yield None
                yield from batch
                if finished and not batch:
                    if self._failure is not None:
                        raise self._failure
                    return
                if not finished:
                    self._finished.wait(tick_s)
        finally:
            if cancel_on_close and self._thread.is_alive() and self.cancel is not None:
                self.cancel.set()
                # Nothing is left generating behind a closed page, and no thread is still inside torch when the
                # process exits (which aborts it).
                self._thread.join(timeout=30)
