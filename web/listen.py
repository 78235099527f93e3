"""The listener's side of a run: each preset's heard run (its first warm run, `RunStarted.heard`) goes to the page
as it is generated, and the page's own measurements come back into that run's record, from the click that
started the comparison (docs/METRICS.md, "click → heard").

`Listener.on_event` runs in the run loop's thread (lab.serving.background), so a chunk is on the socket the
moment it is ready, and the loop waits for the browser where waiting is right: before a heard run starts, until the
previous one has finished playing (one voice at a time, each starting as it would in production), and after a
heard run, until the page has received all of it and reported what it played. Nothing waits before the first
heard run: the click started the comparison over the socket, so no page re-render stands between it and the voice.
"""
from __future__ import annotations

import time
import uuid
from typing import Callable

from lab import ab, session
from lab.errors import LabError
from web.pcm import PcmHub

REPORT_WAIT_S = 8.0     # past the audio's first audible second; a page that never reports does not hold the loop
PLAYED_SLACK_S = 5.0    # past the previous clip's length, before the next heard run starts anyway


def browser_figures(report: dict, late_start_ms: float) -> dict:
    """The page's report as run-record figures (docs/METRICS.md, "Browser figures"). The page measures from the
    moment the run was announced; the engine's request stamp came `late_start_ms` after it."""
    def shifted(key):
        return None if report.get(key) is None else report[key] - late_start_ms

    return {"sent_ms": shifted("sent_ms"), "received_ms": shifted("received_ms"), "heard_ttfb_ms": shifted("heard_ms"),
            "browser_underruns": report.get("underruns"), "browser_gap_s": report.get("gap_s"),
            "browser_complete": report.get("complete"), "transport": report.get("transport"),
            "clock_uncertainty_ms": report.get("clock_uncertainty_ms"),
            "output_latency_ms": report.get("output_latency_ms"), "jitter_buffer_ms": report.get("jitter_buffer_ms"),
            # From the click, on the page's own clock: no clock relation between page and server enters them.
            "click_to_received_ms": report.get("click_to_received_ms"),
            "click_to_heard_ms": report.get("click_to_heard_ms")}


def click_figures(comparison, request_s: float | None) -> dict:
    """The click's side of a heard run: which comparison, how it started, and from the click (on the server's
    clock, which the page's ping-pong relates to its own) to the run's request stamp."""
    if comparison is None:
        return {}
    def ms(start_s, end_s):
        return None if start_s is None or end_s is None else (end_s - start_s) * 1e3

    c = comparison
    return {"comparison_id": c.id, "started_by": c.started_by, "click_to_request_ms": ms(c.t_click_s, request_s),
            # where that went: the page until it sent the start, the way to the server, the server until the request
            "click_path_ms": {"page": ms(c.t_click_s, c.t_send_s), "to_server": ms(c.t_send_s, c.t_received_s),
                              "server": ms(c.t_received_s, request_s)}}


class Listener:
    """One page listening to one comparison (or one blind pair)."""

    def __init__(self, hub: PcmHub, listener: str, transport: str, slot_offset: int = 0,
                 labels: list[str] | None = None, cancel: session.Cancel | None = None,
                 gone: Callable[[], bool] | None = None, comparison=None):
        self.hub, self.listener, self.transport = hub, listener or "", transport
        self.slot_offset, self.labels, self.cancel, self.gone = slot_offset, labels, cancel, gone
        self.comparison = comparison    # lab.serving.comparisons.Comparison: its id and the click
        self.run_id: str | None = None
        self.previous: tuple[str, float] | None = None   # (run id, audio seconds) of the last heard run
        # A page heard over PCM whose socket then closes has gone (or lost its audio): a dropped connection is a
        # cancel, so the model is not kept busy for nobody.
        self.was_connected = transport == "pcm" and bool(self.listener) and hub.connected(self.listener)

    def on_event(self, e) -> None:
        self._handle(e)
        if self.comparison is not None and not self.comparison.voice_sent.is_set() and self._voice_on_its_way(e):
            self.comparison.voice_sent.set()

    def _handle(self, e) -> None:
        self.stop_if_gone(e)
        if not self.listener or not self.hub.connected(self.listener):
            if self.was_connected and self.cancel is not None:
                self.cancel.set()
            return   # an API client, or a page whose socket is gone: the loop runs as the CLI's does
        if isinstance(e, session.Finished):   # a client of the socket alone learns here that nothing more comes
            self.hub.publish_text(self.listener, {"type": "done", "comparison_id": getattr(self.comparison, "id", ""),
                                                  "stopped": e.stopped})
        elif isinstance(e, session.RunStarted) and e.heard:
            self._start(e)
        elif self.run_id is None:
            return
        elif isinstance(e, session.Chunk) and e.heard:
            self._chunk(e)
        elif isinstance(e, session.RunDone) and e.heard:
            self._done(e)
        elif isinstance(e, (session.Stopped, session.Failed)):
            self.hub.end_run(self.listener, self.run_id, self.chunks, self.samples)
            self.run_id = None

    def _voice_on_its_way(self, e) -> bool:
        """Whether the page may redraw now: the first heard chunk went onto its socket (this event comes after the
        hook sent it), the page has something else to show first (a build), or no voice will go over the socket."""
        if self.transport != "pcm" or not self.listener or not self.hub.connected(self.listener):
            return True
        return isinstance(e, (session.Stage, session.Failed, session.Stopped, session.Finished)) or (
            isinstance(e, session.Chunk) and e.heard)

    def stop_if_gone(self, e) -> None:
        """A client that went away (Gradio's queue let go of its job) stops the loop at its next frame; alone, the
        hook for a run nobody hears as it is made (a pre-buffered pair)."""
        if self.cancel is not None and self.gone is not None and self.gone():
            self.cancel.set()

    def _start(self, e: session.RunStarted) -> None:
        if self.previous is not None:
            run_id, audio_s = self.previous
            self.hub.wait_played(run_id, audio_s + PLAYED_SLACK_S)
        self.run_id, self.chunks, self.samples = uuid.uuid4().hex, 0, 0
        self.announced_s, self.request_s = time.perf_counter(), None
        label = self.labels[e.slot] if self.labels else e.preset
        # The comparison's id lets the page measure this run from the click it remembers under that id.
        self.hub.start_run(self.listener, self.run_id, e.slot + self.slot_offset, 0, self.announced_s, label=label,
                           transport=self.transport, comparison_id=getattr(self.comparison, "id", ""))

    def _chunk(self, e: session.Chunk) -> None:
        if self.request_s is None:
            self.request_s = e.timeline.stamp("request")
        if self.transport == "pcm":
            self.hub.send_chunk(self.listener, self.run_id, e.chunk.index, e.chunk.samples, e.timeline.chunks[-1][0],
                                e.audible_at, slot=e.slot + self.slot_offset, sample_rate=e.chunk.sample_rate)
        self.chunks += 1
        self.samples += len(e.chunk.samples)

    def _done(self, e: session.RunDone) -> None:
        first_audible_s = e.record.get("first_audible_s") or 0.0
        self.hub.end_run(self.listener, self.run_id, self.chunks, self.samples, first_audible_s=first_audible_s)
        report = self.hub.wait_report(self.run_id, REPORT_WAIT_S + first_audible_s)
        # The loop appends the record to the history once this returns.
        e.record.update(click_figures(self.comparison, self.request_s))
        if report is not None:
            e.record.update(browser_figures(report, ((self.request_s or self.announced_s) - self.announced_s) * 1e3))
        self.previous, self.run_id = (self.run_id, e.record["audio_s"]), None


def ab_hook(hub: PcmHub, listener: str, mode: str, comparison) -> Callable:
    """The run loop's hook for a blind pair: "streamed" plays each side to the page as it is generated (slots 6 and
    7, labelled A and B only); "prebuffered" plays nothing while it is made, and only watches for a client that
    went away."""
    hook = Listener(hub, listener, "pcm" if mode == "streamed" else "none", slot_offset=6, labels=["A", "B"],
                    cancel=comparison.cancel, gone=comparison.client_gone, comparison=comparison)
    return hook.on_event if mode == "streamed" else hook.stop_if_gone


def ab_pair(events, mode: str):
    """A blind pair's audio from its run loop's events, A then B, as [(sample rate, samples)]: each side's heard
    run ("prebuffered": loudness matched), and a warning (or None) when the history could not be written."""
    heard: dict[int, tuple[int, object]] = {}
    warning = None
    for e in events:
        if isinstance(e, session.RunDone) and e.heard:
            heard[e.slot] = (e.record["sample_rate"], e.audio)
        elif isinstance(e, session.Failed):
            raise LabError("A/B", f"{'AB'[e.slot]} could not run: {e.message}")
        elif isinstance(e, session.Stopped):
            raise LabError("A/B", "stopped before both sides were generated")
        elif isinstance(e, session.NotSaved):
            warning = e.message
    pair = [heard[0], heard[1]]
    if mode == "prebuffered":
        pair = [(rate, ab.loudness_matched(samples)) for rate, samples in pair]
    return pair, warning
