"""Comparisons that clients started, by id, so that a click's run and the page's later event are one comparison.

A click on Compare (or Play) starts its comparison at once, over the page's open socket: planning and the run loop
begin before Gradio has even sent the page's event. That event, which carries the same settings and renders the
tables and charts, then finds the comparison by the id the page gave both and follows its events from the start
(lab.serving.background). A client with no socket (an API client, a page whose socket is down) starts the
comparison from its event instead: one code path either way, whoever starts it.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from lab.errors import LabError
from lab.serving.background import Background
from lab.serving.line import Cancel


class Comparison:
    """One comparison (or blind pair): its id, the listener (page socket) it plays to, its cancel, the click that
    started it, and once planned either its run loop (`run`) and what the front end planned (`plan`), or the
    LabError that refused it (`error`)."""

    def __init__(self, comparison_id: str, listener: str, started_by: str, t_click_s: float | None = None,
                 t_send_s: float | None = None, t_received_s: float | None = None):
        self.id, self.listener, self.started_by = comparison_id, listener, started_by
        # On the server's clock (perf_counter s), or None: the click, when the page sent its start (both through
        # the page's clock offset), and when the server received it.
        self.t_click_s, self.t_send_s, self.t_received_s = t_click_s, t_send_s, t_received_s
        self.cancel = Cancel()
        self.planned = threading.Event()
        self.error: LabError | None = None
        self.run: Background | None = None
        self.plan: Any = None
        self.planned_at: float | None = None
        # Set by a front end that follows it and can tell when its own client went away (Gradio's queue job).
        self.gone: Callable[[], bool] | None = None
        # Set once the click's first voice is on its way to the page (or nothing will go there): a page's redraw
        # of the whole comparison waits for it, so that it never holds the first chunk up in the browser.
        self.voice_sent = threading.Event()

    def client_gone(self) -> bool:
        return self.gone is not None and self.gone()

    def wait_planned(self, timeout_s: float = 30.0) -> LabError | None:
        """Blocks until planning ended, and returns the LabError that refused it, or None (then `run` is set)."""
        if not self.planned.wait(timeout_s):
            self.error = LabError("queue", "the comparison could not be planned in time; try again")
        return self.error

    @property
    def ended_at(self) -> float | None:
        """time.monotonic() when its run loop ended, or it was refused; None while it runs."""
        if not self.planned.is_set():
            return None
        return self.run.finished_at if self.run is not None else self.planned_at

    @property
    def finished(self) -> bool:
        return self.planned.is_set() and (self.run is None or self.run.finished)


class Comparisons:
    """Every comparison started in the last `keep_s` seconds (finished ones are dropped after that, and never more
    than `most` are kept), by id. Thread-safe."""

    def __init__(self, keep_s: float = 120.0, most: int = 256):
        self.keep_s, self.most = keep_s, most
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._by_id: OrderedDict[str, Comparison] = OrderedDict()

    def begin(self, comparison_id: str, listener: str, plan: Callable[[Comparison], None], started_by: str,
              **stamps: float | None) -> Comparison:
        """The comparison of this id, started now in a thread of its own by `plan(comparison)` (which sets `plan`
        and `run`, or raises a LabError) unless one of this id exists already: the first caller starts it, a
        later one gets the same comparison. `stamps`: the click's (Comparison's t_click_s, t_send_s, t_received_s)."""
        with self._cond:
            self._drop_old()
            existing = self._by_id.get(comparison_id) if comparison_id else None
            if existing is not None:
                return existing
            comparison = Comparison(comparison_id, listener, started_by, **stamps)
            if comparison_id:
                self._by_id[comparison_id] = comparison
            self._cond.notify_all()
        threading.Thread(target=self._plan, args=(comparison, plan), daemon=True,
                         name=f"plan {comparison_id[:8]}").start()
        return comparison

    @staticmethod
    def _plan(comparison: Comparison, plan: Callable[[Comparison], None]) -> None:
        try:
            plan(comparison)
        except LabError as e:
            comparison.error = e
        except Exception as e:   # a bug must not leave the follower waiting forever
            import traceback

            traceback.print_exception(e)
            comparison.error = LabError("comparison", f"{type(e).__name__}: {e} (an unexpected failure; the log "
                                                      f"has the details)")
        finally:
            comparison.planned_at = time.monotonic()
            if comparison.error is not None:
                comparison.voice_sent.set()
            comparison.planned.set()

    def get(self, comparison_id: str, wait_s: float = 0.0) -> Comparison | None:
        """The comparison of this id, waiting up to `wait_s` for a click's start to arrive."""
        if not comparison_id:
            return None
        deadline = time.monotonic() + wait_s
        with self._cond:
            while comparison_id not in self._by_id:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            return self._by_id[comparison_id]

    def stop(self, listener: str, comparison_id: str = "", within_s: float = 10.0) -> int:
        """Stops the listener's comparisons in flight (only the one of `comparison_id`, if given), and returns how
        many it stopped, counting those a stop raised in the last `within_s` seconds: the page's Stop comes twice,
        over its socket and as Gradio's event, and whichever comes second must still say what was stopped."""
        if not listener:
            return 0
        now = time.perf_counter()
        with self._lock:
            mine = [c for c in self._by_id.values()
                    if c.listener == listener and (not comparison_id or c.id == comparison_id)]
        stopped = 0
        for c in mine:
            if not c.finished:
                c.cancel.set()
            if c.cancel.at is not None and now - c.cancel.at <= within_s:
                stopped += 1
        return stopped

    def _drop_old(self) -> None:
        now = time.monotonic()
        for key, c in list(self._by_id.items()):
            ended = c.ended_at
            if ended is not None and (len(self._by_id) > self.most or now - ended > self.keep_s):
                del self._by_id[key]
