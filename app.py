"""Speech Latency Lab, the web page: `python app.py` serves it on http://127.0.0.1:7860.

Compare: pick presets, hear each one stream into its own player, read TTFB/RTF side by side. Blind A/B: two
presets, same text and seed, vote, then see the names. History: every run this server made. This file lays out the
page and wires its events; the run loop is lab.session's (the CLI's too), the figures are lab.report's, and what
each event changes on the page is web.view's.
"""
from __future__ import annotations

import dataclasses
import datetime
import html
import os
import tempfile
import threading

import gradio as gr
import pandas as pd

from lab import ab, availability, concurrency, env, history, presets, quality, report, session
from lab.errors import LabError
from lab.manager import ModelManager
from lab.request import MAX_USER_AUDIO_BYTES, read_audio_file, validate_inputs, validate_user_audio
from lab.serving.background import Background
from lab.serving.comparisons import Comparisons
from lab.serving.line import Cancel, ModelLine, Sessions
from lab.streaming import pcm16
from web import listen, server
from web.pcm import PcmHub
from web.view import SLOT_FIELDS, CompareView, status_html

PRESETS_DIR = os.environ.get("LAB_PRESETS_DIR", presets.PRESETS_DIR)
HISTORY_PATH = os.environ.get("LAB_HISTORY", os.path.join("runs", "history.jsonl"))
VOTES_PATH = os.environ.get("LAB_VOTES", os.path.join("runs", "votes.jsonl"))
HISTORY_EXPORT_DIR = tempfile.mkdtemp(prefix="lab-history-")   # one folder, overwritten: a Space's disk stays small
MEMORY_BUDGET_GB = float(os.environ.get("LAB_MEMORY_BUDGET_GB", "16"))
MAX_SLOTS = 6   # players on the page; a comparison takes at most this many presets
# Comparisons waiting for the model, at most; past it a newcomer is told to come back (README, "Limits and failure").
MAX_WAITING = int(os.environ.get("LAB_MAX_WAITING", "32"))
# Checked once here: an unusable file is said in one line, on the page's banner, and runs are kept in memory.
HISTORY = history.Journal(HISTORY_PATH, "LAB_HISTORY")
VOTES = history.Journal(VOTES_PATH, "LAB_VOTES")
for problem in (HISTORY.problem, VOTES.problem):
    if problem is not None:
        print(f"warning: {problem}", flush=True)

# Variants stay built between clicks, up to this much memory; then the least recently used is freed.
MANAGER = ModelManager(memory_budget_bytes=int(MEMORY_BUDGET_GB * 2**30))
# One comparison or blind pair on the model at a time; the others wait in line and their pages say their place and
# about how long, from this server's measured runs (Gradio's own queue would average unrelated comparisons).
LINE = ModelLine(MAX_WAITING)
CATALOG = availability.Catalog(PRESETS_DIR)
SESSIONS = Sessions()
HUB = PcmHub()   # the PCM path to each page (WebSocket /lab/pcm), the pages' reports back, and their clicks
# Comparisons by the id the page gives a click: started over the socket, followed by the page's Gradio event.
COMPARISONS = Comparisons()
# How long a page's Gradio event waits for its click's start to arrive over the socket before starting the
# comparison itself (the start is sent first, on a socket that is already open: it normally arrives first).
CLICK_WAIT_S = 1.0
# The page's first redraw of a comparison (every slot, table and chart) waits until the click's first voice is on
# the socket, at most this long: a redraw in the browser's main thread while the first chunk arrives holds it there.
PAGE_HOLD_MAX_S = 2.0
# Scores each run of real speech (WER, MOS estimate, runaway) after the comparison, never beside a timed run.
QUALITY = quality.Worker()
LATEST: dict[str, CompareView] = {}   # each page's newest comparison: an older one stops filling in its quality
DEFAULT_PRESETS, DEFAULT_RANDOM = CATALOG.default_selection(env.cuda_available())
# Families with a preset that runs here; the others' presets are only in the folded "cannot run here" lines.
FAMILY_ORDER = [f for f, statuses in CATALOG.grouped(True).items() if any(s.available for s in statuses)]
TRANSPORTS = [("PCM over a WebSocket (low latency)", "pcm"), ("Gradio streaming audio (HLS, AAC)", "gradio")]
ERROR_AT = {"text": "text_error", "seed": "numbers_error", "max_audio_s": "numbers_error",
            "runs per preset": "numbers_error", "user_audio": "audio_error", "queue": "overall"}   # else: presets
DEFAULT_MAX_AUDIO_S = 8
EXAMPLES = ["The quick brown fox jumps over the lazy dog. It runs back home before the rain. Then it sleeps.",
            "Hello! Thanks for calling. How can I help you today?",
            "Streaming speech starts playing before the whole sentence is generated, so the first chunk matters "
            "most."]
# A chart's label on its own line: Gradio floats it over the image's top left, where it covered the chart's title.
CHART_CSS = '.chart label[data-testid="block-label"].float { position: static; margin: var(--block-label-margin); }'
C: dict = {}   # component by name, filled by the layout below; handlers speak in names


def chart(label: str, elem_id: str, visible: bool = False) -> gr.Plot:
    """A chart slot: a matplotlib figure sent as PNG, hidden until the first one arrives (History's shows at once)."""
    return gr.Plot(label=label, elem_id=elem_id, elem_classes=["chart"], format="png", visible=visible)


def drawn(plot: gr.Plot, fig):
    """The chart as the page gets it (a PNG), encoded here in the handler's thread by the component's own
    postprocess, which also closes the figure. Handed the figure, Gradio encodes it on the server's event loop,
    where every page's updates and the PCM sockets wait: with the skipped outputs no longer rebuilt
    (web.server.skip_without_rebuilding), that encoding was a third of the loop's time with 16 pages comparing
    (docs/DESIGN.md, Serving many pages)."""
    return plot.postprocess(fig)


def ui(values: dict) -> dict:
    """Names (and (field, slot) pairs) to components; tables to DataFrames, hidden while empty."""
    out = {}
    for name, value in values.items():
        component = C[name] if isinstance(name, str) else C[name[0]][name[1]]
        if isinstance(value, list) and value and isinstance(value[0], dict):
            value = gr.update(value=pd.DataFrame(value), visible=True)
        elif value is not None and isinstance(component, gr.Plot):
            value = gr.update(value=drawn(component, value), visible=True)
        elif value is None and isinstance(component, (gr.Dataframe, gr.Plot)):
            value = gr.update(value=None, visible=False)
        out[component] = value
    # An empty dict would read as one output value; a generator must still yield to notice a closed page.
    return out or {C["overall"]: gr.skip()}


def ticked(order: list[str], groups) -> list[str]:
    """The ticked presets in the order they were ticked (the page's hidden order field), then any it does not
    know."""
    names = [n for g in groups for n in (g or [])]
    return sorted(names, key=lambda n: order.index(n) if n in order else len(order) + names.index(n))


def weights_notice(random_weights) -> str:
    folded = CATALOG.unavailable_by_reason(random_weights)
    lines = "".join(f"<details><summary>{len(names)} of the presets {reason}: show</summary>"
                    f"{html.escape(', '.join(names))}</details>" for reason, names in folded.items())
    return f'<div id="unavailable">{lines}</div>'


# -- Compare -----------------------------------------------------------------------------------------------------
def plan(names, text, seed, max_audio_s, runs, random_weights, user_audio):
    """The comparison the form asks for, or a LabError naming the field."""
    if not names:
        raise LabError("presets", "none ticked; tick at least one preset above")
    if len(names) > MAX_SLOTS:
        raise LabError("presets", f"{len(names)} ticked; a comparison takes at most {MAX_SLOTS}, untick some")
    request, runs = validate_inputs(text, seed, max_audio_s, runs)
    specs = [CATALOG.runnable_spec(n, random_weights) for n in names]
    if user_audio is not None:   # a file, read here: what is not audio is refused by name, whoever would hear it
        samples, sample_rate = read_audio_file(user_audio)
        samples = validate_user_audio(samples, sample_rate)
        if any(s.takes_user_audio for s in specs):
            request = dataclasses.replace(request, user_audio=samples, user_audio_sample_rate=int(sample_rate))
    return specs, request, runs


def errors_cleared(notes=()) -> dict:
    """Every field's error cleared; under the text, what was changed in it before synthesis (escaped)."""
    cleared = {field: "" for field in {*ERROR_AT.values(), "presets_error"} if field != "overall"}
    if notes:
        cleared["text_error"] = "ℹ️ text changed before synthesis: " + html.escape("; ".join(notes))
    return cleared


def refused(e: LabError) -> dict:
    """The error at its field, and the page says nothing ran."""
    if e.where == "queue":   # not the form's fault: come back later
        return {**errors_cleared(), "overall": status_html(0, 0, str(e), "warn")}
    return {**errors_cleared(), ERROR_AT.get(e.where, "presets_error"): f"⚠️ {html.escape(str(e))}",
            "overall": status_html(0, 0, f"not run: fix {e.where}", "error")}


# The inputs of Compare and Play by name, in the order their Gradio events list them after the listener: the page
# sends the same values over its socket on the click (click_js below), so both starts plan from one dict.
COMPARE_INPUTS = ("order", "text", "seed", "max_audio_s", "runs", "random_weights", "user_audio", "transport",
                  *(f"presets {family}" for family in FAMILY_ORDER))
AB_INPUTS = ("first", "second", "text", "seed", "random_weights", "mode")


def start_compare(comparison, inputs: dict) -> None:
    """A comparison from the form's values (in its planning thread): the plan, a place in the line, and the run
    loop started, with each heard run going to the comparison's page as it is generated."""
    groups = [inputs.get(f"presets {family}") or [] for family in FAMILY_ORDER]
    names = ticked(str(inputs.get("order") or "").split("\n"), groups)
    specs, shared, runs = plan(names, inputs.get("text"), inputs.get("seed"), inputs.get("max_audio_s"),
                               inputs.get("runs"), bool(inputs.get("random_weights")), inputs.get("user_audio"))
    transport = "gradio" if inputs.get("transport") == "gradio" else "pcm"
    place = LINE.turn(HISTORY.estimate_s([s.name for s in specs], runs), comparison.cancel)
    events = session.run_presets(MANAGER, specs, shared, runs, comparison.cancel, HISTORY, "app", place, QUALITY)
    hook = listen.Listener(HUB, comparison.listener, transport, cancel=comparison.cancel, gone=comparison.client_gone,
                           comparison=comparison)
    comparison.plan = (specs, shared, runs, transport, place)
    comparison.run = Background(events, hook.on_event, comparison.cancel)


def start_ab(comparison, inputs: dict) -> None:
    """A blind pair (in its planning thread): which plays as A is drawn here, once; then as start_compare."""
    mode = inputs.get("mode") if inputs.get("mode") in ab.MODES else "streamed"
    req, _ = validate_inputs(inputs.get("text"), inputs.get("seed"), 10.0, 1)
    a, b = ab.blind_order(inputs.get("first"), inputs.get("second"))
    specs = [CATALOG.runnable_spec(n, bool(inputs.get("random_weights"))) for n in (a, b)]
    place = LINE.turn(HISTORY.estimate_s([s.name for s in specs], 1), comparison.cancel)
    events = session.run_presets(MANAGER, specs, req, 1, comparison.cancel, HISTORY, "ab", place)
    trial = {"a": a, "b": b, "text": req.text, "seed": req.seed, "mode": mode,
             "weights": {s.name: s.weights for s in specs}}
    comparison.plan = (specs, req, trial)
    comparison.run = Background(events, listen.ab_hook(HUB, comparison.listener, mode, comparison), comparison.cancel)


STARTS = {"compare": (start_compare, COMPARE_INPUTS), "ab": (start_ab, AB_INPUTS)}


def on_command(listener: str, message: dict) -> None:
    """A page's command over its socket (on the server's event loop: it returns at once). A click's start plans
    and runs in a thread of its own; Stop ends this page's comparisons at their next frame (or the one of `id`, a
    click's start that its Gradio event replaced)."""
    if message.get("type") == "stop":
        COMPARISONS.stop(listener, str(message.get("id") or "")[:64])
        return
    start = STARTS.get(message.get("kind"))
    comparison_id = str(message.get("id") or "")[:64]
    inputs = message.get("inputs")
    if start is None or not comparison_id or not isinstance(inputs, dict):
        return
    stamps = {key: float(message[key]) if isinstance(message.get(key), (int, float)) else None
              for key in ("t_click_s", "t_send_s", "t_received_s")}
    COMPARISONS.begin(comparison_id, listener, lambda c: start[0](c, inputs), "click", **stamps)


HUB.on_command = on_command


def joined(kind: str, request: gr.Request | None, listener_field: str, values: tuple):
    """The comparison this Gradio event belongs to: the one its click started over the socket, or, for a client
    that has none (an API client, a page whose socket is down), one started here from the event's own values.
    `listener_field` is "listener:comparison id:socket" from the page (click_js), or empty."""
    listener, comparison_id, via = (str(listener_field or "") + "::").split(":")[:3]
    comparison = COMPARISONS.get(comparison_id, CLICK_WAIT_S if via == "socket" and HUB.connected(listener) else 0)
    if comparison is None:
        start, names = STARTS[kind]
        inputs = dict(zip(names, values))
        comparison = COMPARISONS.begin(comparison_id, listener, lambda c: start(c, inputs), "event")
    comparison.gone = server.gone_check(demo, request)
    return comparison


def compare(request: gr.Request, listener, order, text, seed, max_audio_s, runs, random_weights, user_audio, transport,
            *groups):
    """Follows the comparison the click started (or starts it), and shows its presets' figures as they run, each
    streaming its first warm run to its player. (`request` comes first: Gradio injects it only among positional
    parameters, before the *groups.)"""
    key = request.session_hash if request is not None else "api"
    supersede(key)   # the page's previous comparison stops filling in its quality: these tables replace it
    comparison = joined("compare", request, listener,
                        (order, text, seed, max_audio_s, runs, random_weights, user_audio, transport, *groups))
    SESSIONS.open(key, comparison.cancel)
    try:
        if comparison.wait_planned() is not None:
            yield ui(refused(comparison.error))
            return
        specs, shared, runs, transport, place = comparison.plan
        if place.waiting()[0] == 0:   # not behind others in the line: its voice comes first, then the page's redraw
            comparison.voice_sent.wait(PAGE_HOLD_MAX_S)
        server.forget_streams(demo, request.session_hash if request is not None else None)
        view = CompareView(specs, runs, shared.user_audio is not None, transport,
                           report.environment_title(env.environment()), place)
        LATEST[key] = view
        # An earlier Stop's note goes with the comparison it stopped.
        yield ui({**errors_cleared(shared.text_notes), **view.start(), **slots_for(specs, transport), "stop_note": ""})
        for values in view.updates(comparison.run.follow()):
            yield ui(values)
    finally:
        SESSIONS.close(key, comparison.cancel)
        env.trim_heap()
    yield ui(view.finish(comparison.cancel.is_set()))


def prewarm() -> None:
    """Builds the first click's presets as the server starts and runs each one's first run, the cold one, recorded
    once (source "build"): a visitor's first click then finds them warm, and its heard run is the first run after
    the click. It waits in the line like any comparison, so a click that comes meanwhile waits for it."""
    specs = [CATALOG.runnable_spec(n, DEFAULT_RANDOM) for n in DEFAULT_PRESETS]
    request, _ = validate_inputs(EXAMPLES[0], 0, DEFAULT_MAX_AUDIO_S, 1)
    cancel = Cancel()
    for event in session.run_presets(MANAGER, specs, request, 0, cancel, HISTORY, "build", LINE.turn(None, cancel),
                                     QUALITY):
        if isinstance(event, session.Failed):
            print(f"prewarm: {event.message}", flush=True)


# What fill_quality changes, besides each slot's C["quality"].
QUALITY_FIELDS = ("overall", "summary", "runs_table", "parity", "builds")


def fill_quality(request: gr.Request):
    """After a comparison (chained to it, so Compare can be clicked again meanwhile): its runs' quality as the
    worker scores them, until the page starts another comparison or closes."""
    key = request.session_hash if request is not None else "api"
    view = LATEST.get(key)
    # One update that changes nothing, first: a generator that yields nothing (no runs to score, as after a Stop or
    # with random weights) would have Gradio set every output to empty, and the comparison's last word would go.
    yield ui({})
    if view is None:
        return
    for values in view.quality_updates():
        yield ui(values)


def supersede(key: str) -> None:
    view = LATEST.pop(key, None)
    if view is not None:
        view.supersede()


def slots_for(specs, transport) -> dict:
    shown = {("box", i): gr.update(visible=i < len(specs)) for i in range(MAX_SLOTS)}
    players = {("player", i): gr.update(value=None, visible=transport == "gradio") for i in range(MAX_SLOTS)}
    return {**shown, **players}


def stop(listener_field, request: gr.Request):
    n = SESSIONS.cancel(request.session_hash if request is not None else "api")
    n += COMPARISONS.stop(str(listener_field or "").split(":")[0])
    # A build in progress cannot be interrupted: generation stops at once, a load or compile runs to its end.
    return status_html(0, 1, "stopped: generation was cancelled (a build in progress finishes first); finished "
                             "runs are kept in History" if n else "nothing was running", "warn")


def on_unload(request: gr.Request) -> None:
    SESSIONS.cancel(request.session_hash)
    supersede(request.session_hash)


def on_pick(order, *groups):
    """Keeps the tick order (slots follow it), and shows the audio upload when a ticked preset takes a turn. The
    order is a hidden field's text, one name a line, so that the page holds it and can send it with a click."""
    names = [n for g in groups for n in (g or [])]
    before = str(order or "").split("\n")
    kept = [n for n in before if n in names] + [n for n in names if n not in before]
    takes = any(CATALOG.specs[n].takes_user_audio for n in names if n in CATALOG.specs)
    return "\n".join(kept), gr.update(visible=takes)


def preset_choices(family: str) -> list[str]:
    """The family's presets that run here, with the random-weights switch on or off: a pretrained one without its
    weights stays offered, and ticking it without the switch says so at the presets."""
    return [s.name for s in CATALOG.grouped(True).get(family, []) if s.available]


# -- Blind A/B ---------------------------------------------------------------------------------------------------
def ab_play(listener, first, second, text, seed, random_weights, mode, request: gr.Request):
    """Both presets say the same text with the same seed; which plays as A is random; the names stay on the server
    (gr.State) until the vote. `mode`: "streamed" (each side at its real start delay) or "prebuffered"."""
    hidden = gr.update(interactive=False)
    key = request.session_hash if request is not None else "api"
    comparison = joined("ab", request, listener, (first, second, text, seed, random_weights, mode))
    SESSIONS.open(key, comparison.cancel)
    try:
        if comparison.wait_planned() is not None:
            raise comparison.error
        specs, req, trial = comparison.plan
        audio, not_saved = listen.ab_pair(comparison.run.follow(), trial["mode"])
    except LabError as e:
        return None, None, f"⚠️ {html.escape(str(e))}", None, hidden, hidden, hidden
    finally:
        SESSIONS.close(key, comparison.cancel)
        env.trim_heap()
    notes = [report.WEIGHTS_NOTE.get(s.weights, "") for s in specs]
    msg = "Listen to both, then vote. The names are shown after your vote."
    if req.text_notes:
        msg += "\n\nℹ️ text changed before synthesis: " + html.escape("; ".join(req.text_notes))
    if not_saved:
        msg += f"\n\n⚠️ {html.escape(not_saved)}"
    if len({s.weights for s in specs}) > 1:
        msg += "\n\n⚠️ A and B use different weights, and each player says which: this pair is not blind."
    on = gr.update(interactive=True)
    players = [gr.update(value=(sr, pcm16(x)), label=side + (f": {note}" if note else ""))
               for side, (sr, x), note in zip("AB", audio, notes)]
    return (*players, msg, trial, on, on, on)


def ab_vote(choice, trial):
    off = gr.update(interactive=False)
    if not trial:
        return "⚠️ vote: play a pair first", None, tally_table(), off, off, off
    try:
        ab.record_vote(VOTES, trial["a"], trial["b"], choice, text=trial["text"], seed=trial["seed"],
                       weights=trial["weights"], mode=trial["mode"])
        unsaved = ""
    except history.NotWritten as e:   # the vote is kept in memory and counted; the reveal is not withheld
        unsaved = f"\n\n⚠️ vote not written: {html.escape(str(e))}"
    picked = {"A": f"A ({trial['a']})", "B": f"B ({trial['b']})", "same": "same"}[choice]
    return (f"You voted **{picked}**. A was **{trial['a']}**, B was **{trial['b']}**.{unsaved}", None,
            tally_table(), off, off, off)


def tally_table() -> pd.DataFrame:
    return pd.DataFrame(ab.tally_table(history.read(VOTES)))


# -- History -----------------------------------------------------------------------------------------------------
def history_view(picked, weights, kind, text_contains):
    """The filtered history as a table, a chart, and CSV/JSON/PNG files to download."""
    records = quality.merged(history.read(HISTORY))
    names = sorted({*CATALOG.statuses[False], *(r["preset"] for r in records if "preset" in r)})
    chosen = history.filter_runs(records, picked or None, weights or None, kind or "all", text_contains or "")
    exports = history.export(chosen, HISTORY_EXPORT_DIR, f"history: {len(chosen)} runs")
    kept = f"; ⚠️ {HISTORY.problem}" if HISTORY.problem else ""
    note = f"{len(chosen)} of {len(records)} records (file: `{HISTORY.shown}`{html.escape(kept)})"
    newest_first = [{"when": datetime.datetime.fromtimestamp(r.get("time", 0)).strftime("%Y-%m-%d %H:%M:%S"),
                     "source": r.get("source", "cli"), **r} for r in reversed(chosen)]
    table = pd.DataFrame(report.run_table(newest_first, extra=("when", "source", "text")))
    return (table, drawn(h_chart, exports["figure"]),
            gr.update(choices=names, value=[n for n in (picked or []) if n in names]), note,
            exports["csv"], exports["json"], exports["png"])


def environment_md() -> str:
    e = env.environment()
    keys = ["device", "cuda", "driver", "cpu_model", "cpu_isa", "cpu_count", "torch_threads", "torch_interop_threads",
            "omp_num_threads", "omp_wait_policy", "python", "torch", "transformers", "gradio", "flash_attn",
            "bitsandbytes", "torchao", "onnxruntime", "hibari_tts", "commit"]
    rows = "\n".join(f"| {k} | {e.get(k) if e.get(k) is not None else 'not installed / none'} |" for k in keys)
    return (f"| | |\n|---|---|\n{rows}\n\nEach variant runs on its own thread count (`threads`, in every result; "
            f"`auto` is one per core less one); torch_threads is the process's count at start. Memory budget for built "
            f"variants: **{MEMORY_BUDGET_GB:g} GB** (`LAB_MEMORY_BUDGET_GB`). History: `{HISTORY.shown}`. Votes: "
            f"`{VOTES.shown}`. Presets: `{env.shown_path(PRESETS_DIR)}`.")


# -- the page ----------------------------------------------------------------------------------------------------
# Gradio's event for a compare or a blind pair first hands the click's start its values (web/player.js's lab.start:
# the click itself started it when the form's last change events had these values); the listener field becomes
# "listener:comparison id:socket". The event goes once the click's first voice is scheduled.
def click_js(kind: str, names: tuple[str, ...]) -> str:
    return f"""(...args) => {{
  if (!window.labAudio) {{ document.querySelectorAll('audio').forEach(a => {{ a.pause(); a.currentTime = 0; }}); return args; }}
  args[0] = window.labAudio.start({kind!r}, {list(names)!r}, args.slice(1));
  return window.labAudio.afterVoice(args[0], args); }}"""


def remember_js(kind: str, names: tuple[str, ...]) -> str:
    """The page keeps the form's values as they change (in the browser only), so a click can send its start before
    Gradio's own click handling runs."""
    return f"(...args) => window.labAudio ? window.labAudio.remember({kind!r}, {list(names)!r}, args) : []"


def remember(demo, kind: str, names: tuple[str, ...], inputs: list, event) -> None:
    """Wires the page's side of a click's early start: the form's values as they change, and the end of the click's
    Gradio event (until then Gradio takes no other click, so the page sends no start either)."""
    for component in inputs:
        component.change(None, inputs, None, js=remember_js(kind, names), api_visibility="private")
    demo.load(None, inputs, None, js=remember_js(kind, names), api_visibility="private")
    event.then(None, None, None, js=f"() => window.labAudio ? window.labAudio.ended({kind!r}) : []",
               api_visibility="private")


STOP_JS = "(listener) => { if (window.labAudio) window.labAudio.stop(); return [listener]; }"

SWEEP_TEXT = "Streaming speech should start at once and keep pace with the listener, even on a busy machine tonight."


def how_many(preset, streams, seconds, text, random_weights):
    """A concurrency sweep of one batching preset (lab.concurrency.sweep, as the CLI's --streams): a table row and
    the chart redrawn after each level."""
    try:
        if not preset:
            raise LabError("preset", "none picked; pick a batching preset")
        spec = CATALOG.runnable_spec(preset, random_weights)
        request, _ = validate_inputs(text, 0, seconds, 1)
        levels = concurrency.parse_levels(streams, most=spec.max_streams)
    except LabError as e:
        yield f"⚠️ {html.escape(str(e))}", None, None
        return
    yield f"building {html.escape(spec.name)} (once; later sweeps reuse it)…", None, None
    engine = MANAGER.get(spec)
    done = []
    for level in concurrency.sweep(engine, spec, request, levels):
        done.append(level)
        chart = drawn(m_chart, report.sweep_chart(done, f"{spec.name}, {request.max_audio_s:g} s per stream"))
        yield (f"{len(done)} of {len(levels)} levels",
               gr.update(value=pd.DataFrame(report.sweep_table(done)), visible=True), gr.update(value=chart, visible=True))


with gr.Blocks(title="Speech Latency Lab") as demo:
    gr.Markdown("# Speech Latency Lab\nHear streaming voice models and compare their time-to-first-byte (TTFB) and "
                "real-time factor (RTF), measured the same way every time. **Random weights give real latency but "
                "noise for audio**; hibari is real speech.")
    gr.Markdown("\n\n".join(f"⚠️ {html.escape(str(p))}" for p in (HISTORY.problem, VOTES.problem) if p),
                elem_id="bookkeeping-banner")
    listener = gr.Textbox(visible=False, elem_id="listener-id")
    with gr.Tab("Compare", id="compare"):
        groups = []
        with gr.Row():
            for family in FAMILY_ORDER:
                choices = preset_choices(family)
                batching = CATALOG.batching(choices)
                groups.append(gr.CheckboxGroup(choices, value=[n for n in DEFAULT_PRESETS if n in choices],
                                               label=f"{family} presets", elem_id=f"presets-{family}",
                                               min_width=200, info=f"{', '.join(batching)}: many listeners at once, "
                                               f"no waiting in line; the others serve one comparison at a time"
                                               if batching else None))
        order = gr.Textbox("\n".join(DEFAULT_PRESETS), visible=False, elem_id="order")
        C["unavailable"] = gr.HTML(weights_notice(DEFAULT_RANDOM))
        C["presets_error"] = gr.Markdown(elem_id="presets-error")
        random_weights = gr.Checkbox(DEFAULT_RANDOM, label="random weights (latency only: the audio is noise)",
                                     info="Real-size models with random initialisation: needs no download. hibari "
                                          "keeps its own voice.", elem_id="random-weights")
        text = gr.Textbox(EXAMPLES[0], label="Text", lines=2, elem_id="text")
        C["text_error"] = gr.Markdown(elem_id="text-error")
        gr.Examples([[e] for e in EXAMPLES], inputs=[text])
        with gr.Row():
            # No rounding by the component (precision None): lab.request refuses 1.5 or "12abc" with its own words.
            seed = gr.Number(0, label="Seed", precision=None, info="0 to 4294967295", elem_id="seed")
            max_audio_s = gr.Number(DEFAULT_MAX_AUDIO_S, label="Cap on audio length (s)", info="(0, 120]",
                                    elem_id="max-audio-s")
            runs = gr.Number(2, label="Warm runs per preset", precision=None,
                             info="1 to 20; a cold run comes first, the first warm run is the one you hear",
                             elem_id="runs")
        C["numbers_error"] = gr.Markdown(elem_id="numbers-error")
        with gr.Row():
            transport = gr.Radio(TRANSPORTS, value="pcm", label="Audio to the browser", elem_id="transport")
            # Read by web/player.js at each run's start; the server needs no copy of it.
            gr.Number(60, label="Jitter buffer (ms, PCM)", precision=0, elem_id="jitter-ms", interactive=True,
                      info="audio held before playing starts, to absorb late chunks; a first chunk that long plays at once")
        user_audio = gr.Audio(label="Your spoken turn (for models that take speech input)", type="filepath",
                              sources=["upload", "microphone"], visible=False)
        C["audio_error"] = gr.Markdown(elem_id="audio-error")
        with gr.Row():
            go = gr.Button("Compare", variant="primary", elem_id="compare-btn")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
        # Stop's own answer has its own place: written into #overall, it could land after the comparison's last word
        # ("stopped after N runs") and replace it, since the two come back over different connections.
        C["stop_note"] = gr.HTML(elem_id="stop-note")
        C["overall"] = gr.HTML(elem_id="overall")
        for name in SLOT_FIELDS:
            C[name] = []
        with gr.Row(equal_height=False):
            for i in range(MAX_SLOTS):
                with gr.Column(visible=i < len(DEFAULT_PRESETS), min_width=300, elem_id=f"slot-{i}") as box:
                    C["box"].append(box)
                    C["header"].append(gr.Markdown(f"### {DEFAULT_PRESETS[i]}" if i < len(DEFAULT_PRESETS) else "",
                                                   elem_id=f"header-{i}"))
                    C["status"].append(gr.HTML(elem_id=f"status-{i}"))
                    C["pcm"].append(gr.HTML(f'<div id="pcm-slot-{i}" class="pcm-slot"></div>'))
                    C["player"].append(gr.Audio(label="streamed as generated", streaming=True, autoplay=True,
                                                elem_id=f"player-{i}", interactive=False, visible=False))
                    C["live"].append(gr.Markdown(elem_id=f"live-{i}"))
                    C["quality"].append(gr.Markdown(elem_id=f"quality-{i}"))
        C["chart_main"] = chart("TTFB, RTF (warm median, bars = spread, hollow = cold) and TTFB phases", "chart-main")
        C["chart_heard"] = chart("From the click: request → model TTFB → first audible → sent → received → heard",
                                 "chart-heard")
        C["chart_stalls"] = chart("Underruns and stall", "chart-stalls")
        C["summary"] = gr.Dataframe(label="Per preset: warm median, spread, tails, cold apart", elem_id="summary",
                                    interactive=False, visible=False)
        C["parity"] = gr.Dataframe(label="Variant parity: ΔWER and ΔMOS against each family's reference (its first "
                                         "preset here), paired runs, median (spread)", elem_id="parity",
                                   interactive=False, visible=False)
        C["builds"] = gr.Dataframe(label="Build cost: load, warm-up/compile and memory", elem_id="builds",
                                   interactive=False, visible=False)
        with gr.Accordion("Every run of this comparison", open=False):
            C["runs_table"] = gr.Dataframe(interactive=False, elem_id="runs-table", visible=False)
        with gr.Accordion("Environment: device, versions, threads, what each option needs", open=False):
            gr.Markdown(environment_md())
            gr.Dataframe(pd.DataFrame(availability.option_requirements()), interactive=False,
                         label="Options and what they need (here = available on this machine)")
            gr.Dataframe(pd.DataFrame(CATALOG.card_rows(), columns=["preset", "card", "status", "what"]),
                         interactive=False, label="GPU presets on this card: runs here, with changes, or cannot run")

    compare_outputs = [c for name, v in C.items() if name != "unavailable" for c in (v if isinstance(v, list) else [v])]
    compared = go.click(compare, [listener, order, text, seed, max_audio_s, runs, random_weights, user_audio,
                                       transport, *groups], compare_outputs, js=click_js("compare", COMPARE_INPUTS),
                             # every click starts at once and waits in LINE, which shows its place; no spinner: an
                             # animation re-drawn every frame costs the 2-core machine the model runs on
                             concurrency_limit=None, show_progress="hidden", api_name="compare")
    compared.then(fill_quality, None, [C[name] for name in QUALITY_FIELDS] + C["quality"], concurrency_limit=None,
        show_progress="hidden", api_name="quality")
    # Stop sets the comparison's cancel flag: generation ends at its next frame, and the comparison's own handler
    # then says what stopped and keeps what finished (Gradio's `cancels` would cut it off before it could say so).
    stop_btn.click(stop, listener, C["stop_note"], api_name="stop", queue=False, js=STOP_JS)
    remember(demo, "compare", COMPARE_INPUTS, [order, text, seed, max_audio_s, runs, random_weights, user_audio,
                                               transport, *groups], compared)
    random_weights.change(weights_notice, random_weights, C["unavailable"], api_visibility="private")
    for g in groups:
        g.change(on_pick, [order, *groups], [order, user_audio], api_visibility="private")

    with gr.Tab("Blind A/B", id="ab"):
        gr.Markdown("Two presets say the same text with the same seed. Which one plays as **A** is random; the names "
                    "are shown after you vote. *As it streams*: each side plays as it is generated, with its real "
                    "start delay, so latency is judged too. *Pre-buffered*: both are generated first and loudness "
                    "matched, so only the sound is judged.")
        runnable = [n for n, s in CATALOG.statuses[True].items() if s.available]
        with gr.Row():   # the default pair is the first click's: on a CPU, two real voices
            ab_first = gr.Dropdown(runnable, value=(DEFAULT_PRESETS + [None])[0], label="Preset 1",
                                   elem_id="ab-first")
            ab_second = gr.Dropdown(runnable, value=(DEFAULT_PRESETS + [None, None])[1], label="Preset 2",
                                    elem_id="ab-second")
            ab_random = gr.Checkbox(False, label="random weights (latency only: the audio is noise)")
        with gr.Row():
            ab_text = gr.Textbox(EXAMPLES[1], label="Text", elem_id="ab-text")
            ab_seed = gr.Number(0, label="Seed", precision=None)
            ab_mode = gr.Radio([("as it streams", "streamed"), ("pre-buffered, loudness matched", "prebuffered")],
                               value="streamed", label="Listening mode", elem_id="ab-mode")
        ab_go = gr.Button("Play a blind pair", variant="primary", elem_id="ab-play")
        ab_msg = gr.Markdown(elem_id="ab-msg")
        with gr.Row():
            gr.HTML('<div id="pcm-slot-6" class="pcm-slot"></div>')
            gr.HTML('<div id="pcm-slot-7" class="pcm-slot"></div>')
        with gr.Row():
            player_a = gr.Audio(label="A", interactive=False, elem_id="player-a")
            player_b = gr.Audio(label="B", interactive=False, elem_id="player-b")
        with gr.Row():
            vote_a = gr.Button("A sounds better", interactive=False, elem_id="vote-a")
            vote_same = gr.Button("Same", interactive=False, elem_id="vote-same")
            vote_b = gr.Button("B sounds better", interactive=False, elem_id="vote-b")
        trial = gr.State(None)
        ab_tally = gr.Dataframe(tally_table, label="Tally per pair: share of decided votes for the first preset, "
                                "binomial 95% interval (Wilson)", interactive=False, elem_id="ab-tally")
        played = ab_go.click(ab_play, [listener, ab_first, ab_second, ab_text, ab_seed, ab_random, ab_mode],
                    [player_a, player_b, ab_msg, trial, vote_a, vote_same, vote_b], js=click_js("ab", AB_INPUTS),
                    concurrency_limit=None, api_name="ab_play", show_progress_on=[ab_msg])
        remember(demo, "ab", AB_INPUTS, [ab_first, ab_second, ab_text, ab_seed, ab_random, ab_mode], played)
        for button, choice in ((vote_a, "A"), (vote_b, "B"), (vote_same, "same")):
            button.click(lambda t, c=choice: ab_vote(c, t), [trial], [ab_msg, trial, ab_tally, vote_a, vote_same,
                                                                        vote_b], api_name=f"vote_{choice.lower()}")

    with gr.Tab("How many", id="how-many"):
        batching = CATALOG.batching([n for f in FAMILY_ORDER for n in preset_choices(f)])
        gr.Markdown("How many listeners one variant holds: that many streams at once, each saying the text, and "
                    "each stream's TTFB (from the moment all were sent), steady RTF, stalls, and the audio seconds "
                    "made per second. " + ("" if batching else "**No batching preset runs here**: they need a GPU "
                                           "(`csm-batched-inductor-cuda-graphs` is the fastest: 1024 streams in "
                                           "real time on an H200, README How many)."))
        with gr.Row():
            m_preset = gr.Dropdown(batching, value=batching[0] if batching else None, label="batching preset",
                                   elem_id="m-preset")
            m_streams = gr.Textbox("1,4,16,64", label="streams at once", info="comma list, e.g. 1,16,256",
                                   elem_id="m-streams")
            m_seconds = gr.Number(6.4, label="audio per stream (s)", elem_id="m-seconds")
            m_random = gr.Checkbox(DEFAULT_RANDOM, label="random weights (latency only: the audio is noise)")
        m_text = gr.Textbox(SWEEP_TEXT, label="text each stream says", elem_id="m-text")
        m_go = gr.Button("Sweep", variant="primary", interactive=bool(batching), elem_id="m-go")
        m_status = gr.Markdown(elem_id="m-status")
        m_chart = chart("Goodput and per-stream figures", "m-chart")
        m_table = gr.Dataframe(interactive=False, elem_id="m-table", visible=False)   # shown with the first level
        m_go.click(how_many, [m_preset, m_streams, m_seconds, m_text, m_random], [m_status, m_table, m_chart],
                   concurrency_limit=1, api_name="how_many")

    with gr.Tab("History", id="history") as history_tab:
        gr.Markdown("Every run this server has made (and the CLI's, if they share the file), newest first.")
        with gr.Row():
            h_presets = gr.CheckboxGroup(sorted(CATALOG.statuses[False]), label="presets (none ticked = all)",
                                         elem_id="h-presets")
            h_weights = gr.CheckboxGroup(["pretrained", "random", "tiny"], label="weights (none = all)")
            h_kind = gr.Radio(["all", "cold", "warm", "cancelled"], value="all", label="runs")
            h_text = gr.Textbox(label="text contains")
        h_refresh = gr.Button("Refresh", elem_id="h-refresh")
        h_note = gr.Markdown()
        h_chart = chart("Filtered runs", "h-chart", visible=True)
        h_table = gr.Dataframe(interactive=False, elem_id="h-table")
        with gr.Row():
            h_csv = gr.DownloadButton("Download CSV", elem_id="h-csv")
            h_json = gr.DownloadButton("Download JSON", elem_id="h-json")
            h_png = gr.DownloadButton("Download chart PNG", elem_id="h-png")
        h_inputs = [h_presets, h_weights, h_kind, h_text]
        h_outputs = [h_table, h_chart, h_presets, h_note, h_csv, h_json, h_png]
        h_refresh.click(history_view, h_inputs, h_outputs, api_name="history")
        history_tab.select(history_view, h_inputs, h_outputs, api_visibility="private")
        for control in (h_weights, h_kind):
            control.change(history_view, h_inputs, h_outputs, api_visibility="private")
        h_text.submit(history_view, h_inputs, h_outputs, api_visibility="private")

    # A closed or reloaded tab ends its session: stop whatever it was generating.
    demo.unload(on_unload)
# Sessions whose page state Gradio keeps in memory, the oldest dropped first (its default is 10000).
demo.state_session_capacity = int(os.environ.get("LAB_MAX_SESSIONS", "256"))


if __name__ == "__main__":
    if os.environ.get("LAB_PREWARM", "1") != "0":
        threading.Thread(target=prewarm, daemon=True, name="prewarm").start()
    # Gradio's own queue is bounded too (events other than compare and A/B, which wait in LINE).
    server.serve(demo.queue(default_concurrency_limit=4, max_size=4 * MAX_WAITING),
                 host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                 port=int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860), hub=HUB,
                 # Refuse big uploads before they are decoded; lab.request.validate_user_audio caps length and size.
                 max_file_size=f"{MAX_USER_AUDIO_BYTES // 2**20}mb", css=CHART_CSS)
