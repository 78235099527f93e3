"""The server's objects, made once by `python app.py` and handed to every tab: the built variants, the model's line,
the pages' sessions and sockets, the comparisons clicks started, the history and the votes. No tab reaches a module
global; each gets this.

It also holds the click path that Compare and Blind A/B share: a click's start over the page's socket
(`on_command`) and the Gradio event that then finds it (`joined`), docs/DESIGN.md "From the click".
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from lab import availability, env, planning, presets, session
from lab.measure import history, quality
from lab.manager import ModelManager
from lab.serving.background import Background
from lab.serving.comparisons import Comparison, Comparisons
from lab.serving.line import Cancel, ModelLine, Sessions
from lab.serving.speech_api import SpeechService
from web.gradio_adapter import gone_check
from web.pcm import PcmHub

# How long a page's Gradio event waits for its click's start to arrive over the socket before starting the
# comparison itself (the start is sent first, on a socket that is already open: it normally arrives first).
CLICK_WAIT_S = 1.0
EXAMPLES = ["The quick brown fox jumps over the lazy dog. It runs back home before the rain. Then it sleeps.",
            "Hello! Thanks for calling. How can I help you today?",
            "Streaming speech starts playing before the whole sentence is generated, so the first chunk matters "
            "most."]
DEFAULT_MAX_AUDIO_S = 8


@dataclass(eq=False, repr=False)
class LabApp:
    presets_dir: str
    history: history.Journal   # every run, checked once: an unusable file is said on the banner, runs kept in memory
    votes: history.Journal
    memory_budget_gb: float
    max_waiting: int           # comparisons waiting for the model, at most (docs/OPERATIONS: limits)
    manager: ModelManager      # variants stay built between clicks, up to the budget; then the LRU one is freed
    line: ModelLine            # one comparison on the model at a time; the others wait and see their place
    catalog: availability.Catalog
    hub: PcmHub                # the PCM path to each page, the pages' reports back, and their clicks
    sessions: Sessions = field(default_factory=Sessions)
    comparisons: Comparisons = field(default_factory=Comparisons)   # by the id a page gives its click
    quality: Any = field(default_factory=quality.Worker)   # scores real speech after a comparison, never beside
    latest: dict = field(default_factory=dict)   # each page's newest CompareView: an older one stops filling in
    history_export_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="lab-history-"))
    demo: Any = None           # the page's Blocks, once made: Gradio's queue says when a client has gone
    starts: dict[str, tuple[Callable[[Comparison, dict], None], tuple[str, ...]]] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "LabApp":
        """The objects as `python app.py` makes them, from LAB_* variables (README, "Configuration")."""
        presets_dir = presets.directory()
        journals = [history.Journal(os.environ.get(var, os.path.join("runs", name)), var)
                    for var, name in (("LAB_HISTORY", "history.jsonl"), ("LAB_VOTES", "votes.jsonl"))]
        for journal in journals:
            if journal.problem is not None:
                print(f"warning: {journal.problem}", flush=True)
        budget_gb = float(os.environ.get("LAB_MEMORY_BUDGET_GB", "16"))
        max_waiting = int(os.environ.get("LAB_MAX_WAITING", "32"))
        lab = cls(presets_dir, *journals, budget_gb, max_waiting, ModelManager(int(budget_gb * 2**30)),
                  ModelLine(max_waiting), availability.Catalog(presets_dir), PcmHub())
        lab.hub.on_command = lab.on_command
        return lab

    def __post_init__(self):
        self.default_presets, self.default_random = self.catalog.default_selection(env.cuda_available())
        # Families with a preset that runs here; the others' presets are only in the folded "cannot run here" lines.
        self.family_order = [f for f, statuses in self.catalog.grouped(True).items()
                             if any(s.available for s in statuses)]
        # The speech API (/v1/audio/speech): another client of the same planning, line, run loop and history.
        self.speech = SpeechService(self.catalog, self.plan_speech, session.run_presets, self.manager, self.line,
                                    self.history, self.quality, self.comparisons, Background)

    def plan_speech(self, names, text, seed, max_audio_s, runs, weights) -> planning.Plan:
        return planning.plan(self.catalog, names, text, seed, max_audio_s, runs, weights=weights)

    def weights(self, random_weights) -> str | None:
        """The page's random-weights switch as lab.planning's weights: random, or each preset's own."""
        return "random" if random_weights else None

    def on_command(self, listener: str, message: dict) -> None:
        """A page's command over its socket (on the server's event loop: it returns at once). A click's start plans
        and runs in a thread of its own; Stop ends this page's comparisons at their next frame (or the one of `id`,
        a click's start that its Gradio event replaced)."""
        if message.get("type") == "stop":
            self.comparisons.stop(listener, str(message.get("id") or "")[:64])
            return
        start = self.starts.get(message.get("kind"))
        comparison_id = str(message.get("id") or "")[:64]
        inputs = message.get("inputs")
        if start is None or not comparison_id or not isinstance(inputs, dict):
            return
        stamps = {key: float(message[key]) if isinstance(message.get(key), (int, float)) else None
                  for key in ("t_click_s", "t_send_s", "t_received_s")}
        self.comparisons.begin(comparison_id, listener, lambda c: start[0](c, inputs), "click", **stamps)

    def joined(self, kind: str, request: gr.Request | None, listener_field: str, values: tuple) -> Comparison:
        """The comparison this Gradio event belongs to: the one its click started over the socket, or, for a client
        that has none (an API client, a page whose socket is down), one started here from the event's own values.
        `listener_field` is "listener:comparison id:socket" from the page (click_js), or empty."""
        listener, comparison_id, via = (str(listener_field or "") + "::").split(":")[:3]
        wait_s = CLICK_WAIT_S if via == "socket" and self.hub.connected(listener) else 0
        comparison = self.comparisons.get(comparison_id, wait_s)
        if comparison is None:
            start, names = self.starts[kind]
            inputs = dict(zip(names, values))
            comparison = self.comparisons.begin(comparison_id, listener, lambda c: start(c, inputs), "event")
        comparison.gone = gone_check(self.demo, request)
        return comparison

    def supersede(self, key: str) -> None:
        """The page's previous comparison stops filling in its quality: a new one (or the page closing) replaces it."""
        view = self.latest.pop(key, None)
        if view is not None:
            view.supersede()

    def on_unload(self, request: gr.Request) -> None:
        """A closed or reloaded tab ends its session: whatever it was generating stops."""
        self.sessions.cancel(request.session_hash)
        self.supersede(request.session_hash)

    def prewarm(self) -> None:
        """Builds the first click's presets as the server starts and runs each one's first run, the cold one,
        recorded once (source "build"): a visitor's first click then finds them warm, and its heard run is the first
        run after the click. It waits in the line like any comparison, so a click that comes meanwhile waits."""
        if not self.default_presets:   # no preset runs here: nothing to warm
            return
        chosen = planning.plan(self.catalog, self.default_presets, EXAMPLES[0], 0, DEFAULT_MAX_AUDIO_S, 1,
                               weights=self.weights(self.default_random))
        cancel = Cancel()
        for event in session.run_presets(self.manager, list(chosen.specs), chosen.request, 0, cancel, self.history,
                                         "build", self.line.turn(None, cancel), self.quality):
            if isinstance(event, session.Failed):
                print(f"prewarm: {event.message}", flush=True)


def session_key(request) -> str:
    """The page's session, or "api" for a caller with none."""
    return request.session_hash if request is not None else "api"
