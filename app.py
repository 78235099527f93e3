"""Speech Latency Lab, the web page: `python app.py` serves it on http://127.0.0.1:7860.

Compare: pick presets, hear each one stream into its own player, read TTFB/RTF side by side. History: every
run this server made. Blind A/B: two presets, same text and seed, vote, then see the names. All model logic
and every figure live in lab/; this file lays out the page and moves events between it and the library.

Measuring stays off Gradio's path: one worker thread per click runs the presets through lab.bench.run_once
(the CLI's code path) and hands chunks and records to the page through a queue, so encoding audio for the
browser is never inside a timed span.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import queue
import tempfile
import threading
import time
import traceback

import gradio as gr
import numpy as np
import pandas as pd

from lab import ab, availability, env, history, presets, report
from lab.bench import run_once
from lab.compare import build_row, cancelled_record, figures_line, validate_inputs
from lab.errors import Cancelled, LabError
from lab.manager import ModelManager
from lab.metrics import Timeline, figures
from lab.request import MAX_USER_AUDIO_BYTES, Request, validate_user_audio
from lab.spec import FAMILIES

PRESETS_DIR = os.environ.get("LAB_PRESETS_DIR", presets.PRESETS_DIR)
HISTORY_PATH = os.environ.get("LAB_HISTORY", os.path.join("runs", "history.jsonl"))
VOTES_PATH = os.environ.get("LAB_VOTES", os.path.join("runs", "votes.jsonl"))
HISTORY_EXPORT_DIR = tempfile.mkdtemp(prefix="lab-history-")
MEMORY_BUDGET_GB = float(os.environ.get("LAB_MEMORY_BUDGET_GB", "16"))
MAX_SLOTS = 6   # players on the page; a comparison takes at most this many presets

# Variants stay built between clicks, up to this much memory; then the least recently used is freed.
MANAGER = ModelManager(memory_budget_bytes=int(MEMORY_BUDGET_GB * 2**30))
# One run on the model at a time. Gradio's queue (concurrency_id "gpu", limit 1) already serialises the compare
# and A/B events and shows waiting users their place; the lock also covers a cancelled run still winding down.
GPU_LOCK = threading.Lock()
SPECS, REFUSED = presets.load_all(PRESETS_DIR)
CUDA = env.cuda_available()
STATUSES = {rw: availability.preset_statuses(SPECS, REFUSED, rw, PRESETS_DIR) for rw in (False, True)}
DEFAULT_PRESETS, DEFAULT_RANDOM = availability.default_selection(STATUSES[False], STATUSES[True], CUDA)
FAMILY_ORDER = list(availability.grouped(STATUSES[False]))
def without_user_audio(request: Request) -> Request:
    return dataclasses.replace(request, user_audio=None) if request.user_audio is not None else request


EXAMPLES = ["The quick brown fox jumps over the lazy dog.",
            "Hello! Thanks for calling. How can I help you today?",
            "Streaming speech starts playing before the whole sentence is generated, so the first chunk matters "
            "most."]


class Cancel:
    """A cancel flag that remembers when it was raised, so a cancelled run's record can show which frames
    came after it."""

    def __init__(self):
        self.event = threading.Event()
        self.at: float | None = None

    def set(self) -> None:
        if not self.event.is_set():
            self.at = time.perf_counter()
            self.event.set()


ACTIVE: dict[str, list[Cancel]] = {}     # session -> cancels of its runs in flight (Stop and a closed tab set them)
ACTIVE_LOCK = threading.Lock()


def _register(session: str, cancel: Cancel) -> None:
    with ACTIVE_LOCK:
        ACTIVE.setdefault(session, []).append(cancel)


def _unregister(session: str, cancel: Cancel) -> None:
    with ACTIVE_LOCK:
        if cancel in ACTIVE.get(session, []):
            ACTIVE[session].remove(cancel)


def cancel_session(request: gr.Request | None) -> int:
    if request is None:
        return 0
    with ACTIVE_LOCK:
        cancels = list(ACTIVE.get(request.session_hash, []))
    for c in cancels:
        c.set()
    return len(cancels)


def error_text(e: BaseException) -> str:
    """One line for the page: the lab's own message names the field and the fix; anything else is named by its
    type, and its traceback goes to the server log only."""
    if isinstance(e, LabError):
        return str(e)
    traceback.print_exception(e)
    return f"{type(e).__name__}: {e} (an unexpected failure; the server log has the details)"


def weights_note(weights: str) -> str:
    return report.WEIGHTS_NOTE.get(weights, "")


def pcm16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1, 1) * 32767).astype(np.int16)


# -- the worker: every preset of one click, in order, outside Gradio --------------------------------------------
def produce(jobs: list[tuple[int, object]], request: Request, runs: int, out: queue.Queue, cancel: Cancel) -> None:
    """Build each preset (once; the manager keeps it), then run it `runs + 1` times. Events go to `out`, tagged
    with the preset's slot: ("build", stage, s), ("built", report), ("chunk", run, chunk, timeline copy),
    ("run", record), ("error", text), ("cancelled", record), then ("end",). ("started",) says it holds the lock."""
    with GPU_LOCK:
        out.put((None, "started"))
        for slot, spec in jobs:
            if cancel.event.is_set():
                break
            try:
                engine = MANAGER.get(spec, lambda stage, s, slot=slot: out.put((slot, "build", stage, s)))
                out.put((slot, "built", engine.report))
                for run in range(runs + 1):
                    if cancel.event.is_set():
                        raise Cancelled()
                    cold, timeline = not engine.served, Timeline()
                    # A family that takes no spoken turn gets the request without it (its status says so).
                    own = request if FAMILIES[spec.family]["user_audio"] else without_user_audio(request)
                    try:
                        record, _ = run_once(engine, spec, own, cold=cold, run=run, cancel=cancel.event,
                                             timeline=timeline, on_chunk=lambda chunk, tl, run=run, cold=cold: out.put(
                                                 (slot, "chunk", run, cold, chunk, list(tl.events),
                                                  list(tl.chunks))))
                    except Cancelled:
                        record = cancelled_record(spec, request, timeline, cancel.at, run, cold)
                        history.append(HISTORY_PATH, {**record, "source": "app"})
                        out.put((slot, "cancelled", record))
                        return
                    record.update(source="app", env_commit=env.git_commit())
                    history.append(HISTORY_PATH, record)
                    out.put((slot, "run", record))
            except Cancelled:
                out.put((slot, "cancelled", None))
                return
            except Exception as e:  # one failing preset must not stop the others
                out.put((slot, "error", error_text(e)))
            finally:
                out.put((slot, "end"))


# -- what the page shows -----------------------------------------------------------------------------------------
def status_html(done: int, total: int, text: str, kind: str = "info") -> str:
    colour = {"info": "inherit", "error": "#c0392b", "ok": "#1e8449", "warn": "#b9770e"}[kind]
    bar = f'<progress value="{done}" max="{max(total, 1)}" style="width:100%"></progress>' if total else ""
    role = ' role="alert"' if kind == "error" else ""
    return f'<div class="lab-status lab-{kind}"{role}>{bar}<div style="color:{colour}">{text}</div></div>'


def live_line(run: int, runs: int, cold: bool, events, chunks) -> str:
    """This run's figures so far, from a copy of its timeline: the same lab.metrics.figures as the final ones."""
    f = figures(Timeline(events=list(events), chunks=list(chunks)))
    kind = "cold" if cold else "warm"
    return (f"run {run + 1}/{runs + 1} ({kind}) · TTFB **{f['ttfb_ms']:.0f} ms** · {f['audio_s']:.2f} s of audio "
            f"in {f['wall_s']:.2f} s · RTF so far **{f['rtf']:.3g}** · underruns {f['underruns']}")


def runs_table(records: list[dict]) -> pd.DataFrame:
    rows = [{"preset": r["preset"], "weights": r["weights"], "run": r["run"], "cold/warm": "cold" if r["cold"] else
             "warm", "TTFB ms": round(r["ttfb_ms"], 1), "RTF": float(f"{r['rtf']:.3g}"),
             "steady RTF": None if r["steady_rtf"] is None else float(f"{r['steady_rtf']:.3g}"),
             "audio s": round(r["audio_s"], 2), "underruns": r["underruns"], "stall s": round(r["stall_s"], 3),
             "peak MiB": round(r["peak_mem_bytes"] / 2**20)} for r in records]
    return pd.DataFrame(rows)


def summary_table(records: list[dict]) -> pd.DataFrame:
    rows = []
    for r in report.summary_rows(records):
        rows.append({"preset": r["preset"], "weights": r["weights"] + (" (audio is noise)" if r["weights"] != "pretrained"
                                                                       else ""),
                     "warm runs": r["warm_runs"], "TTFB ms (warm median)": _round(r["ttfb_ms"], 1),
                     "TTFB spread ms": _spread(r, "ttfb_ms", 1), "cold TTFB ms": _round(r["cold_ttfb_ms"], 1),
                     "RTF": _round(r["rtf"], 3), "RTF spread": _spread(r, "rtf", 3),
                     "steady RTF": _round(r["steady_rtf"], 3), "underruns": r["underruns"],
                     "stall s": _round(r["stall_s"], 3), "peak MiB": round(r["peak_mem_bytes"] / 2**20)})
    return pd.DataFrame(rows)


def _round(v, digits):
    return None if v is None else round(v, digits)


def _spread(row, name, digits):
    lo, hi = row[f"{name}_lo"], row[f"{name}_hi"]
    return "-" if lo is None else f"{lo:.{digits}f} – {hi:.{digits}f}"


def build_table(builds: dict[str, dict]) -> pd.DataFrame:
    return pd.DataFrame([{"preset": b["preset"], "load s": round(b["load_s"], 2),
                          "warm-up / compile s": round(b["warmup_or_compile_s"], 2),
                          "memory MiB": round(b["memory_mib"], 1), "build peak MiB": round(b["build_peak_mib"]),
                          "params M": round(b["params_m"], 2), "tokenizer": b["tokenizer"]} for b in builds.values()])


def charts(records: list[dict]):
    """The comparison's figures: TTFB/RTF/phases, and underruns/stall. Closed right away: Gradio only needs
    to save them as images, and open pyplot figures would pile up across clicks."""
    import matplotlib.pyplot as plt

    if not records:
        return None, None
    e = env.environment()
    main = report.chart(records, f"{e['device']} · torch {e['torch']} · commit {e['commit']}")
    stalls = report.stall_chart(records)
    plt.close(main)
    plt.close(stalls)
    return main, stalls


def preset_choices(random_weights: bool) -> dict[str, list[tuple[str, str]]]:
    groups = availability.grouped(STATUSES[bool(random_weights)])
    return {family: [(s.label, s.name) for s in groups.get(family, [])] for family in FAMILY_ORDER}


def unavailable_md(random_weights: bool, family: str) -> str:
    """Why each unavailable preset of a family cannot run, one line per reason (most share one: no GPU)."""
    by_reason: dict[str, list[str]] = {}
    for s in availability.grouped(STATUSES[bool(random_weights)]).get(family, []):
        if not s.available:
            by_reason.setdefault(s.detail.split(": ", 1)[1], []).append(s.name)
    return "\n".join(f"- **{', '.join(names)}**: {why}" for why, names in by_reason.items())


def takes_user_audio(names: list[str]) -> bool:
    return any(FAMILIES[SPECS[n].family].get("user_audio") for n in names if n in SPECS)


# -- Compare -----------------------------------------------------------------------------------------------------
def compare(request: gr.Request, text, seed, max_audio_s, runs, random_weights, user_audio, *groups):
    """Run the picked presets one after another: build status under a progress bar, audio streaming into each
    preset's own player, live figures, then charts and tables. A generator: Gradio streams every yield.
    (`request` comes first: Gradio injects it only among positional parameters, before the *groups.)"""
    session = request.session_hash if request is not None else "api"
    names = [n for group in groups for n in (group or [])]
    ui = {overall: status_html(0, 0, ""), input_error: ""}
    for i, (box, header, status, player, live) in enumerate(SLOTS):
        shown = i < len(names)
        ui[box] = gr.update(visible=shown)
        ui[status] = status_html(0, 0, "waiting" if shown else "")
        ui[live] = ""
        ui[player] = None

    try:
        if not names:
            raise LabError("presets", "none ticked; tick at least one preset above")
        if len(names) > MAX_SLOTS:
            raise LabError("presets", f"{len(names)} ticked; a comparison takes at most {MAX_SLOTS}, untick some")
        shared_request, runs = validate_inputs(text, seed, max_audio_s, runs)
        if user_audio is not None and takes_user_audio(names):
            sample_rate, samples = user_audio
            shared_request = Request(shared_request.text, seed=shared_request.seed,
                                      max_audio_s=shared_request.max_audio_s,
                                      user_audio=validate_user_audio(samples, sample_rate),
                                      user_audio_sample_rate=int(sample_rate))
    except LabError as e:
        ui[input_error] = f"⚠️ {e}"
        for i, name in enumerate(names[:MAX_SLOTS]):
            ui[SLOTS[i][1]] = f"### {name}"
            ui[SLOTS[i][2]] = status_html(0, 0, f"not run: fix <b>{e.where}</b> above", "error")
        yield ui
        return

    statuses = {s.name: s for s in STATUSES[bool(random_weights)]}
    jobs, total = [], runs + 1
    for i, name in enumerate(names):
        header, status, player = SLOTS[i][1], SLOTS[i][2], SLOTS[i][3]
        s = statuses.get(name)
        ui[header] = f"### {name}"
        try:
            if s is None or not s.available:
                raise LabError(f"preset {name!r}", s.detail.split(": ", 1)[1] if s else "no such preset")
            spec = presets.load(name, PRESETS_DIR, weights="random" if random_weights else None)
        except LabError as e:
            ui[status] = status_html(0, 0, f"⚠️ {e}", "error")
            continue
        note = weights_note(spec.weights)
        ignores = (" · ignores the spoken turn (it takes text only)"
                   if shared_request.user_audio is not None and not FAMILIES[spec.family]["user_audio"] else "")
        ui[header] = (f"### {name}" + (f" · ⚠️ {note}" if note else "") + ignores
                      + (f"\n{spec.description}" if spec.description else ""))
        ui[player] = gr.update(value=None, label=f"{name}: {note}" if note else f"{name}: streamed as generated")
        jobs.append((i, spec))
    yield ui

    records, builds, cancel = [], {}, Cancel()
    out: queue.Queue = queue.Queue()
    _register(session, cancel)
    worker = threading.Thread(target=produce, args=(jobs, shared_request, runs, out, cancel), daemon=True)
    worker.start()
    stage, stage_s, done, started, has_lock = {}, {}, {}, time.perf_counter(), False
    try:
        while True:
            try:
                slot, kind, *rest = out.get(timeout=0.25)
            except queue.Empty:
                if not worker.is_alive() and out.empty():
                    break
                # Yield even when nothing changed: a generator is closed (Stop, closed page) only between yields.
                tick = {overall: gr.skip()}
                for s in stage:   # keep the clock of a build stage moving
                    stage_s[s] += 0.25
                    tick[SLOTS[s][2]] = status_html(0, total, f"{stage[s]} {stage_s[s]:.0f} s")
                if not has_lock and time.perf_counter() - started > 1:
                    tick[overall] = status_html(0, 0, f"waiting for the model ({time.perf_counter() - started:.0f} s)")
                yield tick
                continue
            if kind == "started":
                has_lock = True
                yield {overall: status_html(0, 0, "running")}
                continue
            name = dict(jobs)[slot].name
            status, player, live = SLOTS[slot][2], SLOTS[slot][3], SLOTS[slot][4]
            if kind == "build":
                stage[slot], stage_s[slot] = rest[0], rest[1]
                yield {status: status_html(0, total, f"{rest[0]} {rest[1]:.0f} s")}
            elif kind == "built":
                stage.pop(slot, None)
                builds[name] = {"preset": name, **build_row(name, rest[0])}
                yield {status: status_html(0, total, f"built: {rest[0].load_s:.1f} s load + "
                                                     f"{rest[0].warmup_s:.1f} s warm-up/compile; running")}
            elif kind == "chunk":
                run, cold, chunk, events, chunks = rest
                update = {live: live_line(run, runs, cold, events, chunks)}
                if run == 0:   # the first run streams into the player; warm runs repeat the same seeded audio
                    update[player] = (chunk.sample_rate, pcm16(chunk.samples))
                yield update
            elif kind == "run":
                records.append(rest[0])
                done[slot] = done.get(slot, 0) + 1
                yield {status: status_html(done[slot], total, f"run {done[slot]}/{total} done")}
            elif kind == "error":
                stage.pop(slot, None)
                yield {status: status_html(done.get(slot, 0), total, f"⚠️ {rest[0]}", "error")}
            elif kind == "cancelled":
                stage.pop(slot, None)
                yield {status: status_html(done.get(slot, 0), total, "stopped: generation cancelled", "warn")}
            elif kind == "end":
                stage.pop(slot, None)
                mine = [r for r in records if r["preset"] == name]
                if mine and not cancel.event.is_set():
                    main, stalls = charts(records)   # between presets: drawing never competes with a timed run
                    row = report.summary_rows(mine)[0]
                    figures_md = figures_line(row)
                    if weights_note(row["weights"]):
                        figures_md += f" · ⚠️ {weights_note(row['weights'])}"
                    yield {status: status_html(total, total, f"done: {len(mine)} runs", "ok"), live: figures_md,
                           chart_main: main, chart_stalls: stalls, summary: summary_table(records),
                           builds_df: build_table(builds), runs_df: runs_table(records)}
                if not worker.is_alive() and out.empty():
                    break
    finally:
        if worker.is_alive():   # closed mid-run (Stop, a closed page): end generation; the worker frees the lock
            cancel.set()
        _unregister(session, cancel)
    stopped = cancel.event.is_set()
    failed = len(names) - len({r["preset"] for r in records})
    text_out = (f"stopped after {len(records)} runs" if stopped else
                f"done: {len(records)} runs of {len(names) - failed} presets" + (f"; {failed} failed (see below)"
                                                                                  if failed else ""))
    yield {overall: status_html(1, 1, text_out, "warn" if stopped or failed else "ok"),
           summary: summary_table(records), builds_df: build_table(builds), runs_df: runs_table(records)}


def on_unload(request: gr.Request) -> None:
    cancel_session(request)


def stop(request: gr.Request):
    n = cancel_session(request)
    # A build in progress cannot be interrupted: generation stops at once, a load or compile runs to its end.
    return status_html(1, 1, "stopped: generation was cancelled (a build in progress finishes first); finished "
                       "runs are kept in History" if n else "nothing was running", "warn")


def on_random_switch(random_weights, *groups):
    choices = preset_choices(random_weights)
    updates = []
    for family, group in zip(FAMILY_ORDER, groups):
        names = {v for _, v in choices[family]}
        updates.append(gr.update(choices=choices[family], value=[n for n in (group or []) if n in names]))
    updates += [unavailable_md(random_weights, f) for f in FAMILY_ORDER]
    return updates


def on_pick(*groups):
    names = [n for g in groups for n in (g or [])]
    return gr.update(visible=takes_user_audio(names))


# -- Blind A/B ---------------------------------------------------------------------------------------------------
def ab_play(first, second, text, seed, random_weights, request: gr.Request, progress=gr.Progress()):
    """Both presets get the same text and seed; which one plays as A is random. The names stay on the server
    (gr.State) until the vote."""
    session = request.session_hash if request is not None else "api"
    hidden = gr.update(interactive=False)
    try:
        req, _ = validate_inputs(text, seed, 10.0, 1)
        a, b = ab.blind_order(first, second)
        statuses = {s.name: s for s in STATUSES[bool(random_weights)]}
        for name in (a, b):
            if name not in statuses or not statuses[name].available:
                raise LabError(f"preset {name!r}", statuses[name].detail.split(": ", 1)[1] if name in statuses
                               else "no such preset")
        specs = {n: presets.load(n, PRESETS_DIR, weights="random" if random_weights else None) for n in (a, b)}
    except LabError as e:
        return None, None, f"⚠️ {e}", None, hidden, hidden, hidden
    audio, cancel = {}, Cancel()
    _register(session, cancel)
    try:
        with GPU_LOCK:
            for i, name in enumerate((a, b)):
                spec = specs[name]
                # Neutral progress: naming the build stage ("compiling") would tell the listener which is which.
                engine = MANAGER.get(spec, lambda stage, s, i=i: progress((i, 2), desc=f"preparing the pair… {s:.0f} s"))
                progress((i, 2), desc="generating the pair…")
                record, samples = run_once(engine, spec, req, cold=not engine.served, run=0, cancel=cancel.event)
                history.append(HISTORY_PATH, {**record, "source": "ab", "env_commit": env.git_commit()})
                audio[name] = (engine.sample_rate, pcm16(samples))
    except Exception as e:  # Cancelled (Stop, a closed tab) or a failed build: one line on the page
        msg = "stopped" if isinstance(e, Cancelled) else error_text(e)
        return None, None, f"⚠️ {msg}", None, hidden, hidden, hidden
    finally:
        _unregister(session, cancel)
    kinds = {specs[a].weights, specs[b].weights}
    note_a, note_b = weights_note(specs[a].weights), weights_note(specs[b].weights)
    msg = "Listen to both, then vote. The names are shown after your vote."
    if len(kinds) > 1:
        msg += ("\n\n⚠️ A and B use different weights, and each player says which, so this pair is not blind "
                "for audio quality.")
    trial = {"a": a, "b": b, "text": req.text, "seed": req.seed, "weights": {n: specs[n].weights for n in (a, b)}}
    on = gr.update(interactive=True)
    return (gr.update(value=audio[a], label="A" + (f": {note_a}" if note_a else "")),
            gr.update(value=audio[b], label="B" + (f": {note_b}" if note_b else "")), msg, trial, on, on, on)


def ab_vote(choice, trial):
    off = gr.update(interactive=False)
    if not trial:
        return "⚠️ vote: play a pair first", None, tally_table(), off, off, off
    ab.record_vote(VOTES_PATH, trial["a"], trial["b"], choice, text=trial["text"], seed=trial["seed"],
                   weights=trial["weights"])
    picked = {"A": f"A ({trial['a']})", "B": f"B ({trial['b']})", "same": "same"}[choice]
    return (f"You voted **{picked}**. A was **{trial['a']}**, B was **{trial['b']}**.", None, tally_table(),
            off, off, off)


def tally_table() -> pd.DataFrame:
    rows = ab.tally(history.read(VOTES_PATH))
    return pd.DataFrame([{"pair": f"{r['first']} vs {r['second']}", "votes": r["votes"],
                          "prefer first": r["first_wins"], "prefer second": r["second_wins"], "same": r["same"],
                          "first's share": None if r["first_share"] is None else round(r["first_share"], 3),
                          "95% interval": f"{r['ci95_lo']:.2f} – {r['ci95_hi']:.2f}", "verdict": r["verdict"]}
                         for r in rows], columns=["pair", "votes", "prefer first", "prefer second", "same",
                                                  "first's share", "95% interval", "verdict"])


# -- History -----------------------------------------------------------------------------------------------------
def history_presets(records: list[dict]) -> list[str]:
    """Filter choices: this server's presets and any other name the history holds (the CLI's, older files)."""
    return sorted({*SPECS, *REFUSED, *(r["preset"] for r in records if "preset" in r)})


def history_view(picked, weights, kind, text_contains):
    """The filtered history as a table, a chart, and CSV/JSON/PNG files to download."""
    records = history.read(HISTORY_PATH)
    names = history_presets(records)
    chosen = history.filter_runs(records, picked or None, weights or None, kind or "all", text_contains or "")
    complete = [r for r in chosen if not r.get("cancelled") and "ttfb_ms" in r]
    table = pd.DataFrame([{
        "time": datetime.datetime.fromtimestamp(r.get("time", 0)).strftime("%Y-%m-%d %H:%M:%S"),
        "preset": r["preset"], "weights": r.get("weights"), "source": r.get("source", "cli"), "run": r.get("run"),
        "cold/warm": "cancelled" if r.get("cancelled") else ("cold" if r.get("cold") else "warm"),
        "TTFB ms": _round(r.get("ttfb_ms"), 1), "RTF": _round(r.get("rtf"), 3), "underruns": r.get("underruns"),
        "stall s": _round(r.get("stall_s"), 3), "audio s": _round(r.get("audio_s"), 2), "text": r.get("text", "")}
        for r in reversed(chosen)])
    folder = HISTORY_EXPORT_DIR   # one folder, overwritten: a long-running Space must not fill its disk
    csv_path, json_path, png_path = (os.path.join(folder, f"history.{ext}") for ext in ("csv", "json", "png"))
    with open(csv_path, "w") as f:
        f.write(report.to_csv(complete))
    with open(json_path, "w") as f:
        json.dump(chosen, f, indent=1)
    fig = None
    if complete:
        import matplotlib.pyplot as plt

        fig = report.chart(complete, f"history: {len(complete)} runs")
        fig.savefig(png_path, dpi=110)
        plt.close(fig)
    note = f"{len(chosen)} of {len(records)} records (file: `{HISTORY_PATH}`)"
    return (table, fig, gr.update(choices=names, value=[n for n in (picked or []) if n in names]), note,
            csv_path, json_path, png_path if complete else None)


# -- Environment -------------------------------------------------------------------------------------------------
def environment_md() -> str:
    e = env.environment()
    keys = ["device", "cuda", "driver", "cpu_count", "python", "torch", "transformers", "gradio", "flash_attn",
            "bitsandbytes", "onnxruntime", "hibari_tts", "commit"]
    rows = "\n".join(f"| {k} | {e.get(k) if e.get(k) is not None else 'not installed / none'} |" for k in keys)
    return (f"| | |\n|---|---|\n{rows}\n\nMemory budget for built variants: **{MEMORY_BUDGET_GB:g} GB** "
            f"(`LAB_MEMORY_BUDGET_GB`). History: `{HISTORY_PATH}` (`LAB_HISTORY`). Votes: `{VOTES_PATH}` (`LAB_VOTES`). "
            f"Presets: `{PRESETS_DIR}`.")


# -- the page ----------------------------------------------------------------------------------------------------
with gr.Blocks(title="Speech Latency Lab") as demo:
    gr.Markdown("# Speech Latency Lab\nHear streaming voice models and compare their time-to-first-byte (TTFB) and "
                "real-time factor (RTF), measured the same way every time. **Random weights give real latency but "
                "noise for audio**; hibari is real speech.")
    with gr.Tab("Compare", id="compare"):
        choices = preset_choices(DEFAULT_RANDOM)
        groups, unavailable_notes = [], []
        with gr.Row():
            for family in FAMILY_ORDER:
                with gr.Column(min_width=220):
                    groups.append(gr.CheckboxGroup(choices[family], value=[n for n in DEFAULT_PRESETS if n in
                                                   {v for _, v in choices[family]}], label=f"{family} presets",
                                                   elem_id=f"presets-{family}"))
                    unavailable_notes.append(gr.Markdown(unavailable_md(DEFAULT_RANDOM, family)))
        random_weights = gr.Checkbox(DEFAULT_RANDOM, label="random weights (latency only: the audio is noise)",
                                     info="Real-size models with random initialisation: needs no download. hibari "
                                          "keeps its own voice.", elem_id="random-weights")
        text = gr.Textbox(EXAMPLES[0], label="Text", lines=2, elem_id="text")
        gr.Examples([[e] for e in EXAMPLES], inputs=[text])
        with gr.Row():
            seed = gr.Number(0, label="Seed", precision=0, info="0 to 4294967295", elem_id="seed")
            max_audio_s = gr.Number(6, label="Cap on audio length (s)", info="(0, 120]", elem_id="max-audio-s")
            runs = gr.Number(2, label="Warm runs per preset", precision=0,
                             info="1 to 20; one cold run comes first", elem_id="runs")
        user_audio = gr.Audio(label="Your spoken turn (for models that take speech input)", type="numpy",
                              sources=["upload", "microphone"], visible=takes_user_audio(DEFAULT_PRESETS))
        input_error = gr.Markdown(elem_id="input-error")
        with gr.Row():
            go = gr.Button("Compare", variant="primary", elem_id="compare-btn")
            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn")
        overall = gr.HTML(elem_id="overall")
        SLOTS = []
        with gr.Row(equal_height=False):
            for i in range(MAX_SLOTS):
                with gr.Column(visible=i < len(DEFAULT_PRESETS), min_width=300, elem_id=f"slot-{i}") as box:
                    header = gr.Markdown(f"### {DEFAULT_PRESETS[i]}" if i < len(DEFAULT_PRESETS) else "")
                    status = gr.HTML(elem_id=f"status-{i}")
                    player = gr.Audio(label="streamed as generated", streaming=True, autoplay=i == 0,
                                      elem_id=f"player-{i}", interactive=False)
                    live = gr.Markdown(elem_id=f"live-{i}")
                SLOTS.append((box, header, status, player, live))
        chart_main = gr.Plot(label="TTFB, RTF (warm median, bars = spread, hollow = cold) and TTFB phases",
                             elem_id="chart-main", format="png")
        chart_stalls = gr.Plot(label="Underruns and stall", elem_id="chart-stalls", format="png")
        summary = gr.Dataframe(label="Per preset: warm median, spread, cold apart", elem_id="summary",
                               interactive=False)
        builds_df = gr.Dataframe(label="Build cost: load, warm-up/compile and memory", elem_id="builds",
                                 interactive=False)
        with gr.Accordion("Every run of this comparison", open=False):
            runs_df = gr.Dataframe(interactive=False, elem_id="runs-table")
        with gr.Accordion("Environment: device, versions, what each option needs", open=False):
            gr.Markdown(environment_md())
            gr.Dataframe(pd.DataFrame(availability.option_requirements()), interactive=False,
                         label="Options and what they need (here = available on this machine)")

    outputs = [overall, input_error, chart_main, chart_stalls, summary, builds_df, runs_df,
               *[c for slot in SLOTS for c in slot]]
    compare_event = go.click(compare, [text, seed, max_audio_s, runs, random_weights, user_audio, *groups], outputs,
                             concurrency_limit=1, concurrency_id="gpu", show_progress="full",
                             show_progress_on=[overall], api_name="compare")
    stop_btn.click(stop, None, overall, cancels=[compare_event], api_name="stop", queue=False)
    random_weights.change(on_random_switch, [random_weights, *groups], [*groups, *unavailable_notes],
                          api_visibility="private")
    for g in groups:
        g.change(on_pick, groups, user_audio, api_visibility="private")

    with gr.Tab("Blind A/B", id="ab"):
        gr.Markdown("Two presets say the same text with the same seed. Which one plays as **A** is random; "
                    "the names are shown after you vote.")
        with gr.Row():   # the first click's pair: on a CPU, hibari against Pocket TTS
            ab_first = gr.Dropdown([s.name for s in STATUSES[False]], value=(DEFAULT_PRESETS + [None])[0],
                                   label="Preset 1", elem_id="ab-first")
            ab_second = gr.Dropdown([s.name for s in STATUSES[False]], value=(DEFAULT_PRESETS + [None, None])[1],
                                    label="Preset 2", elem_id="ab-second")
            ab_random = gr.Checkbox(DEFAULT_RANDOM, label="random weights (latency only: the audio is noise)")
        with gr.Row():
            ab_text = gr.Textbox(EXAMPLES[1], label="Text", elem_id="ab-text")
            ab_seed = gr.Number(0, label="Seed", precision=0)
        ab_go = gr.Button("Play a blind pair", variant="primary", elem_id="ab-play")
        ab_msg = gr.Markdown(elem_id="ab-msg")
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
        ab_go.click(ab_play, [ab_first, ab_second, ab_text, ab_seed, ab_random],
                    [player_a, player_b, ab_msg, trial, vote_a, vote_same, vote_b], concurrency_limit=1,
                    concurrency_id="gpu", api_name="ab_play", show_progress_on=[ab_msg])
        for button, choice in ((vote_a, "A"), (vote_b, "B"), (vote_same, "same")):
            button.click(lambda t, c=choice: ab_vote(c, t), [trial], [ab_msg, trial, ab_tally, vote_a, vote_same,
                                                                        vote_b], api_name=f"vote_{choice.lower()}")

    with gr.Tab("History", id="history") as history_tab:
        gr.Markdown("Every run this server has made (and the CLI's, if they share the file), newest first.")
        with gr.Row():
            h_presets = gr.CheckboxGroup(history_presets(history.read(HISTORY_PATH)), label="presets (none ticked = all)", elem_id="h-presets")
            h_weights = gr.CheckboxGroup(["pretrained", "random", "tiny"], label="weights (none = all)")
            h_kind = gr.Radio(["all", "cold", "warm", "cancelled"], value="all", label="runs")
            h_text = gr.Textbox(label="text contains")
        h_refresh = gr.Button("Refresh", elem_id="h-refresh")
        h_note = gr.Markdown()
        h_chart = gr.Plot(label="Filtered runs", elem_id="h-chart", format="png")
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


if __name__ == "__main__":
    port = int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860)
    demo.queue(default_concurrency_limit=4).launch(
        server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), server_port=port,
        # Refuse big uploads before they are decoded; lab.request.validate_user_audio then caps length and size.
        max_file_size=f"{MAX_USER_AUDIO_BYTES // 2**20}mb")
