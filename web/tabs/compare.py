"""The Compare tab: pick presets, hear each one stream into its own player, read TTFB/RTF side by side. What each
event changes is web.view's; the plan is lab.planning's; this module lays the tab out and wires it."""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from lab import availability, env, planning, session
from lab.measure import report
from lab.errors import LabError
from lab.serving.background import Background
from web import listen
from web.gradio_adapter import forget_streams
from web.lab_app import DEFAULT_MAX_AUDIO_S, EXAMPLES, LabApp, session_key
from web.tabs.common import STOP_JS, WEIGHTS_SWITCH, chart, click_js, drawn, remember
from web.view import SLOT_FIELDS, CompareView, status_html

MAX_SLOTS = 6   # players on the page; a comparison takes at most this many presets
# The page's first redraw of a comparison (every slot, table and chart) waits until the click's first voice is on
# the socket, at most this long: a redraw in the browser's main thread while the first chunk arrives holds it there.
PAGE_HOLD_MAX_S = 2.0
TRANSPORTS = [("PCM over a WebSocket (low latency)", "pcm"), ("Gradio streaming audio (HLS, AAC)", "gradio")]
ERROR_AT = {"text": "text_error", "seed": "numbers_error", "max_audio_s": "numbers_error",
            "runs per preset": "numbers_error", "user_audio": "audio_error", "queue": "overall"}   # else: presets
QUALITY_FIELDS = ("overall", "summary", "runs_table", "parity", "builds")   # what fill_quality changes, and slots'


class CompareTab:
    """The tab's components by name (`self.out`: what the comparison's handler changes; per slot a list) and its
    handlers, over the server's objects (`lab`)."""

    def __init__(self, lab: LabApp, listener: gr.Textbox):
        self.lab, self.listener = lab, listener
        # The inputs of Compare by name, in the order its Gradio event lists them after the listener: the page sends
        # the same values over its socket on the click (click_js), so both starts plan from one dict.
        self.input_names = ("order", "text", "seed", "max_audio_s", "runs", "random_weights", "user_audio",
                            "transport", *(f"presets {family}" for family in lab.family_order))
        self.out: dict = {}
        with gr.Tab("Compare", id="compare"):
            self.inputs = self._form()
            self._buttons_and_slots()
            self._results()
        self._wire()
        lab.starts["compare"] = (self.start, self.input_names)

    # -- layout ----------------------------------------------------------------------------------------------------
    def _form(self) -> dict:
        lab, out = self.lab, self.out
        groups = []
        with gr.Row():
            for family in lab.family_order:
                choices = self.preset_choices(family)
                batching = lab.catalog.batching(choices)
                groups.append(gr.CheckboxGroup(choices, value=[n for n in lab.default_presets if n in choices],
                                               label=f"{family} presets", elem_id=f"presets-{family}",
                                               min_width=200, info=f"{', '.join(batching)}: many listeners at once, "
                                               f"no waiting in line; the others serve one comparison at a time"
                                               if batching else None))
        order = gr.Textbox("\n".join(lab.default_presets), visible=False, elem_id="order")
        self.unavailable = gr.HTML(self.weights_notice(lab.default_random))
        out["presets_error"] = gr.Markdown(elem_id="presets-error")
        random_weights = gr.Checkbox(lab.default_random, label=WEIGHTS_SWITCH,
                                     info="Real-size models with random initialisation: needs no download. hibari "
                                          "keeps its own voice.", elem_id="random-weights")
        text = gr.Textbox(EXAMPLES[0], label="Text", lines=2, elem_id="text")
        out["text_error"] = gr.Markdown(elem_id="text-error")
        gr.Examples([[e] for e in EXAMPLES], inputs=[text])
        with gr.Row():
            # No rounding by the component (precision None): lab.request refuses 1.5 or "12abc" with its own words.
            seed = gr.Number(0, label="Seed", precision=None, info="0 to 4294967295", elem_id="seed")
            max_audio_s = gr.Number(DEFAULT_MAX_AUDIO_S, label="Cap on audio length (s)", info="(0, 120]",
                                    elem_id="max-audio-s")
            runs = gr.Number(2, label="Warm runs per preset", precision=None,
                             info="1 to 20; a cold run comes first, the first warm run is the one you hear",
                             elem_id="runs")
        out["numbers_error"] = gr.Markdown(elem_id="numbers-error")
        with gr.Row():
            transport = gr.Radio(TRANSPORTS, value="pcm", label="Audio to the browser", elem_id="transport")
            # Read by web/player.js at each run's start; the server needs no copy of it.
            gr.Number(60, label="Jitter buffer (ms, PCM)", precision=0, elem_id="jitter-ms", interactive=True,
                      info="audio held before playing starts, to absorb late chunks; a first chunk that long plays at "
                           "once")
        user_audio = gr.Audio(label="Your spoken turn (for models that take speech input)", type="filepath",
                              sources=["upload", "microphone"], visible=False)
        out["audio_error"] = gr.Markdown(elem_id="audio-error")
        return dict(zip(self.input_names, [order, text, seed, max_audio_s, runs, random_weights, user_audio,
                                           transport, *groups]))

    def _buttons_and_slots(self) -> None:
        out = self.out
        with gr.Row():
            self.go = gr.Button("Compare", variant="primary", elem_id="compare-btn")
            self.stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
        # Stop's own answer has its own place: written into #overall, it could land after the comparison's last word
        # ("stopped after N runs") and replace it, since the two come back over different connections.
        out["stop_note"] = gr.HTML(elem_id="stop-note")
        out["overall"] = gr.HTML(elem_id="overall")
        for name in SLOT_FIELDS:
            out[name] = []
        defaults = self.lab.default_presets
        with gr.Row(equal_height=False):
            for i in range(MAX_SLOTS):
                with gr.Column(visible=i < len(defaults), min_width=300, elem_id=f"slot-{i}") as box:
                    out["box"].append(box)
                    out["header"].append(gr.Markdown(f"### {defaults[i]}" if i < len(defaults) else "",
                                                     elem_id=f"header-{i}"))
                    out["status"].append(gr.HTML(elem_id=f"status-{i}"))
                    out["pcm"].append(gr.HTML(f'<div id="pcm-slot-{i}" class="pcm-slot"></div>'))
                    out["player"].append(gr.Audio(label="streamed as generated", streaming=True, autoplay=True,
                                                  elem_id=f"player-{i}", interactive=False, visible=False))
                    out["live"].append(gr.Markdown(elem_id=f"live-{i}"))
                    out["quality"].append(gr.Markdown(elem_id=f"quality-{i}"))

    def _results(self) -> None:
        out = self.out
        out["chart_main"] = chart("TTFB, RTF (warm median, bars = spread, hollow = cold) and TTFB phases",
                                  "chart-main")
        out["chart_heard"] = chart("From the click: request → model TTFB → first audible → sent → received → heard",
                                   "chart-heard")
        out["chart_stalls"] = chart("Underruns and stall", "chart-stalls")
        out["summary"] = gr.Dataframe(label="Per preset: warm median, spread, tails, cold apart", elem_id="summary",
                                      interactive=False, visible=False)
        out["parity"] = gr.Dataframe(label="Variant parity: ΔWER and ΔMOS against each family's reference (its first "
                                           "preset here), paired runs, median (spread)", elem_id="parity",
                                     interactive=False, visible=False)
        out["builds"] = gr.Dataframe(label="Build cost: load, warm-up/compile and memory", elem_id="builds",
                                     interactive=False, visible=False)
        with gr.Accordion("Every run of this comparison", open=False):
            out["runs_table"] = gr.Dataframe(interactive=False, elem_id="runs-table", visible=False)
        with gr.Accordion("Environment: device, versions, threads, what each option needs", open=False):
            gr.Markdown(self.environment_md())
            gr.Dataframe(pd.DataFrame(availability.option_requirements()), interactive=False,
                         label="Options and what they need (here = available on this machine)")
            gr.Dataframe(pd.DataFrame(self.lab.catalog.card_rows(), columns=["preset", "card", "status", "what"]),
                         interactive=False, label="GPU presets on this card: runs here, with changes, or cannot run")

    def _wire(self) -> None:
        inputs, lab = list(self.inputs.values()), self.lab
        outputs = [c for v in self.out.values() for c in (v if isinstance(v, list) else [v])]
        compared = self.go.click(self.compare, [self.listener, *inputs], outputs,
                                 js=click_js("compare", self.input_names),
                                 # every click starts at once and waits in the line, which shows its place; no
                                 # spinner: an animation re-drawn every frame costs the machine the model runs on
                                 concurrency_limit=None, show_progress="hidden", api_name="compare")
        compared.then(self.fill_quality, None, [self.out[n] for n in QUALITY_FIELDS] + self.out["quality"],
                      concurrency_limit=None, show_progress="hidden", api_name="quality")
        # Stop sets the comparison's cancel flag: generation ends at its next frame, and the comparison's own handler
        # then says what stopped and keeps what finished (Gradio's `cancels` would cut it off before it could).
        self.stop_btn.click(self.stop, self.listener, self.out["stop_note"], api_name="stop", queue=False, js=STOP_JS)
        remember(lab.demo, "compare", self.input_names, inputs, compared)
        self.inputs["random_weights"].change(self.weights_notice, self.inputs["random_weights"], self.unavailable,
                                             api_visibility="private")
        groups = [self.inputs[f"presets {f}"] for f in lab.family_order]
        for g in groups:
            g.change(self.on_pick, [self.inputs["order"], *groups], [self.inputs["order"], self.inputs["user_audio"]],
                     api_visibility="private")

    # -- the comparison --------------------------------------------------------------------------------------------
    def plan(self, inputs: dict) -> planning.Plan:
        """The form's values by name (COMPARE's input_names) as lab.planning's plan, or its LabError."""
        groups = [inputs.get(f"presets {family}") or [] for family in self.lab.family_order]
        names = ticked(str(inputs.get("order") or "").split("\n"), groups)
        return planning.plan(self.lab.catalog, names, inputs.get("text"), inputs.get("seed"),
                             inputs.get("max_audio_s"), inputs.get("runs"),
                             weights=self.lab.weights(inputs.get("random_weights")),
                             user_audio=inputs.get("user_audio"), most_presets=MAX_SLOTS)

    def start(self, comparison, inputs: dict) -> None:
        """A comparison from the form's values (in its planning thread): the plan, a place in the line, and the run
        loop started, with each heard run going to the comparison's page as it is generated."""
        lab, chosen = self.lab, self.plan(inputs)
        transport = "gradio" if inputs.get("transport") == "gradio" else "pcm"
        specs = list(chosen.specs)
        place = lab.line.turn(lab.history.estimate_s([s.name for s in specs], chosen.runs), comparison.cancel)
        events = session.run_presets(lab.manager, specs, chosen.request, chosen.runs, comparison.cancel, lab.history,
                                     "app", place, lab.quality)
        hook = listen.Listener(lab.hub, comparison.listener, transport, cancel=comparison.cancel,
                               gone=comparison.client_gone, comparison=comparison)
        comparison.plan = (chosen, transport, place)
        comparison.run = Background(events, hook.on_event, comparison.cancel)

    def compare(self, request: gr.Request, listener, *values):
        """Follows the comparison the click started (or starts it), and shows its presets' figures as they run,
        each streaming its first warm run to its player. (`request` comes first: Gradio injects it only among
        positional parameters, before the form's values.)"""
        lab, key = self.lab, session_key(request)
        lab.supersede(key)   # the page's previous comparison stops filling in its quality: these tables replace it
        comparison = lab.joined("compare", request, listener, values)
        lab.sessions.open(key, comparison.cancel)
        try:
            if comparison.wait_planned() is not None:
                yield self.ui(refused(comparison.error))
                return
            chosen, transport, place = comparison.plan
            if place.waiting()[0] == 0:   # not behind others in the line: its voice first, then the page's redraw
                comparison.voice_sent.wait(PAGE_HOLD_MAX_S)
            forget_streams(lab.demo, request.session_hash if request is not None else None)
            view = CompareView(list(chosen.specs), chosen.runs, chosen.request.user_audio is not None, transport,
                               report.environment_title(env.environment()), place)
            lab.latest[key] = view
            # An earlier Stop's note goes with the comparison it stopped; a Stop of this one, which may come before
            # this first redraw (the page hands Gradio the click once the voice plays), keeps its note.
            note = gr.skip() if comparison.cancel.is_set() else ""
            yield self.ui({**errors_cleared(chosen), **view.start(), **slots_for(chosen.specs, transport),
                           "stop_note": note})
            for values in view.updates(comparison.run.follow()):
                yield self.ui(values)
        finally:
            lab.sessions.close(key, comparison.cancel)
            env.trim_heap()
        yield self.ui(view.finish(comparison.cancel.is_set()))

    def fill_quality(self, request: gr.Request):
        """After a comparison (chained to it, so Compare can be clicked again meanwhile): its runs' quality as the
        worker scores them, until the page starts another comparison or closes."""
        view = self.lab.latest.get(session_key(request))
        # One update that changes nothing, first: a generator that yields nothing (no runs to score, as after a Stop
        # or with random weights) would have Gradio set every output to empty, and the comparison's last word go.
        yield self.ui({})
        if view is None:
            return
        for values in view.quality_updates():
            yield self.ui(values)

    def stop(self, listener_field, request: gr.Request):
        n = self.lab.sessions.cancel(session_key(request))
        n += self.lab.comparisons.stop(str(listener_field or "").split(":")[0])
        # A build in progress cannot be interrupted: generation stops at once, a load or compile runs to its end.
        return status_html(0, 1, "stopped: generation was cancelled (a build in progress finishes first); finished "
                                 "runs are kept in History" if n else "nothing was running", "warn")

    # -- helpers ---------------------------------------------------------------------------------------------------
    def ui(self, values: dict) -> dict:
        """Names (and (field, slot) pairs) to components; tables to DataFrames, hidden while empty."""
        out = {}
        for name, value in values.items():
            component = self.out[name] if isinstance(name, str) else self.out[name[0]][name[1]]
            if isinstance(value, list) and value and isinstance(value[0], dict):
                value = gr.update(value=pd.DataFrame(value), visible=True)
            elif value is not None and isinstance(component, gr.Plot):
                value = gr.update(value=drawn(component, value), visible=True)
            elif value is None and isinstance(component, (gr.Dataframe, gr.Plot)):
                value = gr.update(value=None, visible=False)
            out[component] = value
        # An empty dict would read as one output value; a generator must still yield to notice a closed page.
        return out or {self.out["overall"]: gr.skip()}

    def on_pick(self, order, *groups):
        """Keeps the tick order (slots follow it), and shows the audio upload when a ticked preset takes a turn. The
        order is a hidden field's text, one name a line, so that the page holds it and can send it with a click."""
        names = [n for g in groups for n in (g or [])]
        before = str(order or "").split("\n")
        kept = [n for n in before if n in names] + [n for n in names if n not in before]
        specs = self.lab.catalog.specs
        takes = any(specs[n].takes_user_audio for n in names if n in specs)
        return "\n".join(kept), gr.update(visible=takes)

    def preset_choices(self, family: str) -> list[str]:
        """The family's presets that run here, with the random-weights switch on or off: a pretrained one without
        its weights stays offered, and ticking it without the switch says so at the presets."""
        return [s.name for s in self.lab.catalog.grouped(True).get(family, []) if s.available]

    def weights_notice(self, random_weights) -> str:
        folded = self.lab.catalog.unavailable_by_reason(random_weights)
        lines = "".join(f"<details><summary>{len(names)} of the presets {reason}: show</summary>"
                        f"{html.escape(', '.join(names))}</details>" for reason, names in folded.items())
        return f'<div id="unavailable">{lines}</div>'

    def environment_md(self) -> str:
        lab, e = self.lab, env.environment()
        keys = ["device", "cuda", "driver", "cpu_model", "cpu_isa", "cpu_count", "torch_threads",
                "torch_interop_threads", "omp_num_threads", "omp_wait_policy", "python", "torch", "transformers",
                "gradio", "flash_attn", "bitsandbytes", "torchao", "onnxruntime", "hibari_tts", "commit"]
        rows = "\n".join(f"| {k} | {e.get(k) if e.get(k) is not None else 'not installed / none'} |" for k in keys)
        return (f"| | |\n|---|---|\n{rows}\n\nEach variant runs on its own thread count (`threads`, in every result; "
                f"`auto` is one per core less one); torch_threads is the process's count at start. Memory budget for "
                f"built variants: **{lab.memory_budget_gb:g} GB** (`LAB_MEMORY_BUDGET_GB`). History: "
                f"`{lab.history.shown}`. Votes: `{lab.votes.shown}`. Presets: `{env.shown_path(lab.presets_dir)}`.")


def ticked(order: list[str], groups) -> list[str]:
    """The ticked presets in the order they were ticked (the page's hidden order field), then any it does not
    know."""
    names = [n for g in groups for n in (g or [])]
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order) + names.index(n))


def errors_cleared(chosen: planning.Plan | None = None) -> dict:
    """Every field's error cleared; under the text, what was changed in it before synthesis, and under the spoken
    turn, which presets it did not reach (escaped)."""
    cleared = {field: "" for field in {*ERROR_AT.values(), "presets_error"} if field != "overall"}
    notes = chosen.notes_at("text") if chosen else []
    if notes:
        cleared["text_error"] = "ℹ️ text changed before synthesis: " + html.escape("; ".join(notes))
    turn = chosen.notes_at("user_audio") if chosen else []
    if turn:
        cleared["audio_error"] = "ℹ️ spoken turn " + html.escape("; ".join(turn))
    return cleared


def refused(e: LabError) -> dict:
    """The error at its field, and the page says nothing ran."""
    if e.where == "queue":   # not the form's fault: come back later
        return {**errors_cleared(), "overall": status_html(0, 0, str(e), "warn")}
    return {**errors_cleared(), ERROR_AT.get(e.where, "presets_error"): f"⚠️ {html.escape(str(e))}",
            "overall": status_html(0, 0, f"not run: fix {e.where}", "error")}


def slots_for(specs, transport) -> dict:
    shown = {("box", i): gr.update(visible=i < len(specs)) for i in range(MAX_SLOTS)}
    players = {("player", i): gr.update(value=None, visible=transport == "gradio") for i in range(MAX_SLOTS)}
    return {**shown, **players}
