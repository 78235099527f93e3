"""What the Compare tab shows, made from lab.session's events. No Gradio here: the view returns plain values keyed
by field name ("overall", "summary", ...; per slot ("status", i), ...), and web/tabs/compare.py maps names to
components.

Everything the page echoes (preset names, error messages that quote the text) is escaped here.
"""
from __future__ import annotations

import html
import threading
import time
from typing import Iterator

import numpy as np

from lab import session
from lab.audio import pcm16
from lab.errors import LabError
from lab.measure import quality, report
from lab.serving.line import Turn
from lab.spec import VariantSpec

SLOT_FIELDS = ("box", "header", "status", "player", "pcm", "live", "quality")
# The page is sent what changed at most this often, because every update costs the server Python time (Gradio's
# postprocessing, under the GIL the run loop's thread needs too) and the browser a re-render
# (docs/RESULTS.md#the-page-and-the-servers-event-loop).
UI_PERIOD_S = 0.25
HEARTBEAT_S = 1.0   # with nothing to change, the page is still sent an empty update this often


def status_html(done: int, total: int, text: str, kind: str = "info") -> str:
    """A progress bar (when `total`) over one line of text; `text` is escaped."""
    colour = {"info": "inherit", "error": "#c0392b", "ok": "#1e8449", "warn": "#b9770e"}[kind]
    bar = f'<progress value="{done}" max="{max(total, 1)}" style="width:100%"></progress>' if total else ""
    role = ' role="alert"' if kind == "error" else ""
    return (f'<div class="lab-status lab-{kind}"{role}>{bar}<div style="color:{colour}">'
            f'{html.escape(text)}</div></div>')


def header_md(spec: VariantSpec, ignores_turn: bool) -> str:
    note = report.WEIGHTS_NOTE.get(spec.weights)
    return (f"### {html.escape(spec.name)}" + (f" · ⚠️ {note}" if note else "")
            + (" · ignores the spoken turn (it takes text only)" if ignores_turn else "")
            + (f"\n{html.escape(spec.description)}" if spec.description else ""))


class CompareView:
    """One comparison on the page: which slot shows which preset, and what each event changes."""

    def __init__(self, specs: list[VariantSpec], runs: int, has_turn: bool, transport: str, env_title: str,
                 place: Turn | None = None):
        self.specs, self.runs, self.transport, self.env_title, self.place = specs, runs, transport, env_title, place
        self.total = runs + 1
        self.ignores_turn = {i: has_turn and not s.takes_user_audio for i, s in enumerate(specs)}
        self.records: list[dict] = []
        self.builds: dict[str, dict] = {}
        self.runs_done: dict[int, int] = {}
        self.stage: dict[int, tuple[str, float, float]] = {}     # slot -> (stage, seconds then, when)
        self.started_at = time.perf_counter()
        self.holds_model = False
        self._ticked: dict = {}   # what the last ticks sent, so a tick sends only what changed
        self.not_saved: str | None = None    # the history could not be written: said at the end too
        # The quality handler comes after the runs over a Gradio event of its own; a newer comparison on the page
        # (or the page closing) supersedes this one, and must not start writing until that handler has let go.
        self.final: tuple[int, str, str] | None = None   # (done, text, kind) once `finish` has said the last word
        self._superseded = threading.Event()
        self._quality_lock = threading.Lock()
        self._quality_claimed = False
        self._quality_let_go = threading.Event()

    def start(self) -> dict:
        """Every slot in tick order, waiting; last comparison's charts and tables cleared."""
        ui = {"overall": status_html(0, 0, "waiting for the model"), "chart_main": None, "chart_stalls": None,
              "chart_heard": None, "summary": None, "builds": None, "runs_table": None, "parity": None}
        for i, spec in enumerate(self.specs):
            ui[("header", i)] = header_md(spec, self.ignores_turn[i])
            ui[("status", i)] = status_html(0, self.total, "waiting")
            ui[("live", i)] = ""
            ui[("quality", i)] = ""
        return ui

    def tick(self) -> dict:
        """Nothing new for a while: keep the build clocks moving, and say how long the model has been waited for.
        Only what changed since the last tick (the clocks move in whole seconds): a page waiting in line would
        otherwise be sent the same line ten times a second, and with many pages waiting those updates would take
        the CPU from the comparison on the model (docs/RESULTS.md#the-page-and-the-servers-event-loop)."""
        ui = {("status", slot): status_html(0, self.total, f"{stage} {s + time.perf_counter() - since:.0f} s")
              for slot, (stage, s, since) in self.stage.items()}
        if not self.holds_model and self.place is not None:
            ahead, left_s = self.place.waiting()
            estimate = (f"about {left_s:.0f} s left, from this server's measured runs of their presets"
                        if left_s is not None else "no measured runs of their presets yet to estimate from")
            ui["overall"] = status_html(0, 0, f"waiting for the model: {ahead} comparison{'s' * (ahead != 1)} ahead "
                                              f"({estimate}); waited {time.perf_counter() - self.started_at:.0f} s")
        changed = {key: value for key, value in ui.items() if self._ticked.get(key) != value}
        self._ticked.update(changed)
        return changed

    def on(self, event) -> dict:
        handler = getattr(self, f"_on_{type(event).__name__.lower()}", None)
        return handler(event) if handler else {}

    def updates(self, events) -> Iterator[dict]:
        """What to send the page for a stream of events (None: nothing new for a while), folded together and sent
        at most every UI_PERIOD_S; the start of a heard run goes at once (the listener is told to listen)."""
        pending, sent_at = {}, 0.0
        for event in events:
            for key, value in (self.tick() if event is None else self.on(event)).items():
                pending[key] = _joined(pending.get(key), value) if key[0] == "player" else value
            urgent = isinstance(event, session.RunStarted) and event.heard
            now = time.perf_counter()
            if pending and (urgent or event is None or now - sent_at >= UI_PERIOD_S):
                yield pending
                pending, sent_at = {}, now
            elif event is None and now - sent_at >= HEARTBEAT_S:
                yield {}   # nothing to change; the handler still yields, which is how a closed page is noticed
                sent_at = now
        if pending:
            yield pending

    def _on_started(self, event) -> dict:
        self.holds_model = True
        return {"overall": status_html(0, 0, "running")}

    def _on_stage(self, e: session.Stage) -> dict:
        self.stage[e.slot] = (e.stage, e.seconds, time.perf_counter())
        return {("status", e.slot): status_html(0, self.total, f"{e.stage} {e.seconds:.0f} s")}

    def _on_built(self, e: session.Built) -> dict:
        self.stage.pop(e.slot, None)
        self.builds[e.preset] = e.report.to_dict()
        return {("status", e.slot): status_html(0, self.total, f"built: {e.report.load_s:.1f} s load + "
                                                               f"{e.report.warmup_s:.1f} s warm-up/compile")}

    def _on_runstarted(self, e: session.RunStarted) -> dict:
        kind = "cold" if e.cold else "warm"
        text = f"run {e.run + 1}/{self.total} ({kind}) running"
        if e.heard:   # the one the listener hears (its first warm run, `RunStarted.heard`): say so the moment it starts
            text = f"▶ run {e.run + 1}/{self.total} ({kind}) started: listen now"
        return {("status", e.slot): status_html(self.runs_done.get(e.slot, 0), self.total, text)}

    def _on_chunk(self, e: session.Chunk) -> dict:
        ui = {("live", e.slot): report.live_line(e.run, self.runs, e.cold, e.figures())}
        if self.transport == "gradio" and e.heard:
            ui[("player", e.slot)] = (e.chunk.sample_rate, pcm16(e.chunk.samples))
        return ui

    def _on_rundone(self, e: session.RunDone) -> dict:
        self.records.append(e.record)
        self.runs_done[e.slot] = self.runs_done.get(e.slot, 0) + 1
        done = self.runs_done[e.slot]
        return {("status", e.slot): status_html(done, self.total, f"run {done}/{self.total} done")}

    def _on_failed(self, e: session.Failed) -> dict:
        self.stage.pop(e.slot, None)
        return {("status", e.slot): status_html(self.runs_done.get(e.slot, 0), self.total, f"⚠️ {e.message}",
                                                "error")}

    def _on_stopped(self, e: session.Stopped) -> dict:
        self.stage.pop(e.slot, None)
        return {("status", e.slot): status_html(self.runs_done.get(e.slot, 0), self.total,
                                                "stopped: generation cancelled", "warn")}

    def _on_notsaved(self, e: session.NotSaved) -> dict:
        self.not_saved = e.message
        return {"overall": status_html(0, 0, f"running · ⚠️ {e.message}", "warn")}

    def _on_presetdone(self, e: session.PresetDone) -> dict:
        """A preset's result line. Charts and tables wait for the end: drawing them here would run beside the next
        preset's timed runs and slow them."""
        self.stage.pop(e.slot, None)
        rows = report.summary_rows([r for r in self.records if r["preset"] == e.preset])
        if not rows:
            return {}
        return {("status", e.slot): status_html(self.total, self.total, f"done: {rows[0]['warm_runs'] + 1} runs",
                                                "ok"),
                ("live", e.slot): report.result_line(rows[0]), **self._quality_lines([e.slot])}

    def results(self, stopped: bool = False) -> dict:
        records = self.records
        title = self.env_title + (" · STOPPED: partial results" if stopped else "")
        charts = ((report.chart(records, title), report.stall_chart(records, title), report.heard_chart(records, title))
                  if records else (None, None, None))
        for fig in charts:   # Gradio only saves them as images; open pyplot figures would pile up across clicks
            if fig is not None:
                report.close(fig)
        return {"chart_main": charts[0], "chart_stalls": charts[1], "chart_heard": charts[2], **self.tables()}

    def tables(self) -> dict:
        records = self.records
        return {"summary": report.summary_table(report.summary_rows(records)) if records else None,
                "builds": report.build_table(self.builds) if self.builds else None,
                "runs_table": report.run_table(records) if records else None,
                "parity": quality.parity_table(records) or None}

    def finish(self, stopped: bool) -> dict:
        """The last word: stopped, or done with how many presets failed. Not "done" after a Stop."""
        ran = {r["preset"] for r in self.records}
        failed = len(self.specs) - len(ran)
        if stopped:
            text, kind, done = f"stopped after {len(self.records)} runs; finished runs are kept in History", "warn", 0
        else:
            text = f"done: {len(self.records)} runs of {len(ran)} presets" + (
                f"; {failed} failed (see its status)" if failed else "")
            kind, done = ("warn" if failed else "ok"), 1
        if self.not_saved:   # the runs are shown all the same; bookkeeping comes second
            text, kind = f"{text} · ⚠️ {self.not_saved}", "warn"
        self.final = (done, text, kind)
        return {"overall": status_html(done, 1, text + self._scoring(), kind), **self.results(stopped)}

    # -- the quality guardrail's figures, which come after the runs (lab.measure.quality.Worker) -----------------
    def _pending(self) -> int:
        return sum(r.get("quality") == quality.PENDING for r in self.records)

    def _scoring(self) -> str:
        pending = self._pending()
        return f"; quality: scoring {pending} runs of real speech" if pending else ""

    def _quality_lines(self, slots) -> dict:
        badges = {p["preset"]: p["badge"] for p in quality.parity(self.records)}
        return {("quality", slot): quality.summary_line(mine, badges.get(self.specs[slot].name, ""))
                for slot in slots if (mine := [r for r in self.records if r["preset"] == self.specs[slot].name])}

    def quality_updates(self, poll_s: float = UI_PERIOD_S, timeout_s: float = 600.0) -> Iterator[dict]:
        """After `finish`: each time the worker has scored more runs, their quality lines, badges and tables; {}
        between (so a closed page is noticed). Ends when all are scored, or when superseded (a closed page, or a
        newer comparison on the same page, whose tables these would overwrite). One handler at a time: a second,
        or one before `finish`, gets nothing."""
        with self._quality_lock:
            if self._quality_claimed or self.final is None or self._superseded.is_set():
                return
            self._quality_claimed = True
        try:
            pending, deadline = self._pending(), time.monotonic() + timeout_s
            while pending and time.monotonic() < deadline:
                if self._superseded.wait(poll_s):
                    return
                now = self._pending()
                if now == pending:
                    yield {}
                    continue
                pending = now
                done, text, kind = self.final
                yield {"overall": status_html(done, 1, text + (self._scoring() or "; quality scored"), kind),
                       **self._quality_lines(range(len(self.specs))), **self.tables()}
        finally:
            # Gradio asks a generator for its next update only once it has sent the last one, so once this runs,
            # every update this handler made is on its way before anything the superseding comparison sends.
            self._quality_let_go.set()

    def supersede(self, wait_s: float = 2 * UI_PERIOD_S) -> None:
        """A newer comparison on the page (or the page closing): the quality handler stops. Waits until it has let
        go, so its last update cannot land after the newer comparison's first (which clears these tables)."""
        with self._quality_lock:
            self._superseded.set()
            running = self._quality_claimed
        if running:
            self._quality_let_go.wait(wait_s)


def _joined(before, after):
    """Two pieces of one player's stream, sent as one (Gradio's streaming audio takes a piece per update)."""
    if before is None or after is None or not isinstance(before, tuple):
        return after
    return after[0], np.concatenate([before[1], after[1]])
