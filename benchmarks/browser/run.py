"""From the click: how long a person who clicks waits for the voice, on this tree and on a previous one.

    python benchmarks/browser/run.py                                   # the full run, against 9ddaf5d
    python benchmarks/browser/run.py --quick --out /tmp/browser-trial  # a trial: one compare of each kind
    python benchmarks/browser/run.py --trees base --scenarios first-click --transports pcm --quick --out /tmp/t

Starts `python app.py` for two trees, each on a free loopback port with its history, votes and Gradio files in a
temporary folder and no hub: the current tree (the working tree this script runs from) and a previous tree
(`--base`, a commit, checked out with `git worktree add --detach` into the temporary folder and removed at the
end). Then it drives headless Chromium (Debian's, through Playwright) as a person would, a fresh page per compare
so that every click is a page's first click, in three scenarios, each over both transports (the page's radio
#transport: "pcm", Web Audio over the lab's WebSocket; "gradio", Gradio's streaming <audio>, HLS/AAC):

  first-click  the presets ticked when the page loads, its default text, cap and runs; Compare (#compare-btn);
               --compares per tree and transport (10)
  ab           the Blind A/B tab, "as it streams", Play a blind pair (#ab-play); --ab-plays per tree and transport (3)
  pages        (current tree only) --pages pages (8), one browser, a context each, the default presets, a short
               text and one run per preset; all press Compare at once and wait in the server's line;
               --pages-rounds per transport (2)

interleaved compare by compare, tree by tree, so that a drift of the machine touches every group alike. One
warm-up compare per tree first (the presets' build, the quality models' load), not counted.

The sound is measured by tap.js, injected before any page script: the click's own event stamp, and the first
audible sample each clip rendered (an AudioWorklet on whatever goes to the speakers; a captured copy of each
<audio> element), on the page's performance clock (README.md says how). The model side, and the page's own
report, come from the runs' history records. Per heard run: click -> sound (tap) against the model's TTFB plus the
stream's leading silence, click -> request and click -> heard (the page's own figures, where the tree reports
them) and the tap against the page. The goals are printed as met / not met per tree, scenario and transport.

Writes results.json, waterfall.png and click_to_sound.png to --out (default benchmarks/browser/<commit>/); trials
belong in /tmp. Run it on an otherwise idle machine: the model, both servers and Chromium share its cores.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
TAP_JS = os.path.join(HERE, "tap.js")
sys.path.insert(0, ROOT)
from tests.harness import AppProcess  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
DEFAULT_BASE = "9ddaf5d"
TRANSPORTS = ("pcm", "gradio")
TRANSPORT_LABEL = {"pcm": "PCM over a WebSocket", "gradio": "Gradio streaming audio"}   # the radio's labels start so
SCENARIOS = ("first-click", "ab", "pages")
PAGES_TEXT = "Hello there. How are you today?"
BUTTON = {"first-click": "compare-btn", "pages": "compare-btn", "ab": "ab-play"}

SERVER_START_TIMEOUT_S = 240
PAGE_LOAD_TIMEOUT_S = 90
COMPARE_TIMEOUT_S = 600          # a warm-up compare builds its presets
PLAY_TIMEOUT_S = 90              # after "done", until the last clip has played
QUIET_HOLD_S = 1.0               # no sound to come for this long: the compare is over
SETTLE_BEFORE_CLICK_S = 1.0      # after the page is ready and set, before the click (a person reads the page first)
QUALITY_WAIT_S = 240             # the server scores the real voices' runs after a compare: wait, so that the next
                                 # compare (on either server) does not share the CPU with it

GOAL_MEDIAN_MS = 100.0   # click -> sound, over TTFB + leading silence: median
GOAL_P95_MS = 200.0      # ... and p95
GOAL_REQUEST_MS = 50.0   # click -> request (the page's own figure): median
GOAL_AGREE_MS = 30.0     # |page's click -> heard - tap's click -> sound|: median and max
# New in issue 24's tree (absent before: None). Its records name the comparison "comparison_id"; kept as compare_id.
PAGE_KEYS = ("click_to_request_ms", "click_to_received_ms", "click_to_heard_ms", "started_by")
RECORD_KEYS = ("ttfb_ms", "first_audible_s", "first_audible_ms", "received_ms", "heard_ttfb_ms", "audio_s", "rtf",
               "browser_underruns", "browser_gap_s", "output_latency_ms", "clock_uncertainty_ms", "run", "cold",
               "source", "weights")


# -- the machine -------------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version_of(dist: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git(*args: str, cwd: str = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True).stdout.strip()


def machine_facts() -> dict:
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": version_of("torch"), "gradio": version_of("gradio"), "playwright": version_of("playwright"),
            "chromium": subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_at_start": os.getloadavg()}


def title_line(env: dict) -> str:
    trees = " vs ".join(f"{t['role']} {t['commit']}{'-dirty' if t['dirty'] else ''}" for t in env["trees"])
    return (f"{env['cpu']}, {env['cores']} cores · {trees} · torch {env['torch']} · gradio {env['gradio']} · "
            f"{env['chromium'].split(' built')[0]} · {env['date'][:16].replace('T', ' ')}")


# -- the trees and their servers ---------------------------------------------------------------------------------
@dataclass
class Tree:
    role: str       # "current" or "base"
    commit: str     # short hash
    folder: str     # where its app.py is
    dirty: bool
    worktree: bool  # checked out by this script (removed at the end)


def current_tree() -> Tree:
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return Tree("current", git("rev-parse", "--short", "HEAD"), ROOT, dirty, False)


def base_tree(commit: str, tmp: str) -> Tree:
    short = git("rev-parse", "--short", commit)
    if not short:
        raise SystemExit(f"--base {commit}: not a commit of this repository")
    folder = os.path.join(tmp, f"tree-{short}")
    subprocess.run(["git", "worktree", "add", "--detach", folder, commit], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    return Tree("base", short, folder, False, True)


def remove_tree(tree: Tree) -> None:
    if tree.worktree:
        subprocess.run(["git", "worktree", "remove", "--force", tree.folder], cwd=ROOT, capture_output=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, capture_output=True)


class Server(AppProcess):
    """`python app.py` of one tree, with this script's Python, on a free loopback port (tests/harness.py), started
    without waiting so both trees' servers start side by side."""

    def __init__(self, tree: Tree, folder: str):
        super().__init__(folder, cwd=tree.folder, wait=False)
        self.tree = tree

    def records(self) -> list[dict]:
        """Every line of its history, in order (a line being written is skipped until it is whole)."""
        if not os.path.exists(self.history):
            return []
        out = []
        with open(self.history) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out


# -- the page (Playwright's async API: the pages scenario presses every page's mouse at once) ---------------------
async def open_page(browser, url: str):
    """A fresh context and page with the tap, loaded and connected: what a person sees before the first click."""
    context = await browser.new_context(viewport={"width": 1400, "height": 1600})
    page = await context.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    await page.add_init_script(path=TAP_JS)
    await page.goto(url, timeout=PAGE_LOAD_TIMEOUT_S * 1000)
    await page.wait_for_selector("#compare-btn", timeout=PAGE_LOAD_TIMEOUT_S * 1000)
    try:   # the page's PCM socket (web/player.js); a tree without it goes on after the wait
        await page.wait_for_function("() => window.labAudio && window.labAudio.connected", timeout=30_000)
    except Exception:
        page.errors.append("window.labAudio never said connected")
    return page


async def close_page(page) -> None:
    try:
        await page.context.close()
    except Exception:
        pass


async def page_defaults(page) -> dict:
    """The presets ticked on the page (its default first click, read right after loading), text, cap and runs."""
    presets = await page.evaluate("""() => [...document.querySelectorAll('[id^=presets-] label')]
        .filter(l => { const b = l.querySelector('input[type=checkbox]'); return b && b.checked; })
        .map(l => l.innerText.trim())""")
    return {"presets": presets, "text": await page.input_value("#text textarea"),
            "cap_s": float(await page.input_value("#max-audio-s input")),
            "runs": int(float(await page.input_value("#runs input")))}


async def pick_radio(page, elem_id: str, value: str, label: str) -> None:
    box = page.locator(f"#{elem_id} input[value='{value}']")
    if await box.count():
        if not await box.is_checked():
            await box.check()
    else:
        await page.locator(f"#{elem_id} label:has-text('{label}')").click()


async def set_transport(page, transport: str) -> None:
    await pick_radio(page, "transport", transport, TRANSPORT_LABEL[transport])


async def set_ab_streamed(page) -> None:
    await page.get_by_role("tab", name="Blind A/B").click()
    await page.wait_for_selector("#ab-play", state="visible", timeout=30_000)
    await pick_radio(page, "ab-mode", "streamed", "as it streams")


DONE = {"compare-btn": "#overall:has-text('done:'), #overall:has-text('stopped'), #overall:has-text('not run')",
        "ab-play": "#ab-msg:has-text('Listen to both'), #ab-msg:has-text('⚠')"}


async def wait_done(page, button: str, timeout_s: float) -> str:
    """Until the page's last word (Compare: "done: ...", "stopped", "not run"; A/B: its message); that word."""
    await page.wait_for_selector(DONE[button], timeout=timeout_s * 1000)
    where = "#overall" if button == "compare-btn" else "#ab-msg"
    return (await page.evaluate(f"() => (document.querySelector('{where}') || {{}}).innerText || ''")).strip()


async def wait_heard_records(server: Server, since: int, source: str, count: int, timeout_s: float) -> None:
    """Until the server wrote `count` heard runs since line `since` (each is written after the page's report)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        heard = [r for r in server.records()[since:] if is_run(r) and r.get("heard") and r.get("source") == source]
        if len(heard) >= count:
            return
        await asyncio.sleep(0.25)


async def wait_quiet(pages: list, timeout_s: float) -> bool:
    """Until no page has sound to come (tap.js's busy()) for QUIET_HOLD_S; False on a timeout."""
    deadline = time.monotonic() + timeout_s
    quiet_since = None
    while time.monotonic() < deadline:
        busy = any(await asyncio.gather(*(p.evaluate("() => window.labTap.busy()") for p in pages)))
        if busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= QUIET_HOLD_S:
            return True
        await asyncio.sleep(0.2)
    return False


async def wait_scored(server: Server, since: int, timeout_s: float = QUALITY_WAIT_S) -> float:
    """Until every run since line `since` that the server will score has its quality line; the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        records = server.records()[since:]
        pending = {(r["preset"], r["time"]) for r in records if is_run(r) and r.get("quality") == "pending"}
        scored = {(r["quality_of"]["preset"], r["quality_of"]["time"]) for r in records if "quality_of" in r}
        if pending <= scored:
            break
        await asyncio.sleep(0.5)
    return time.monotonic() - started


WAIT_FOR_SCORES = True   # --click-while-scoring: click as a person would, while the last runs are being scored


def waits_for_scores(server: Server) -> bool:
    """Whether the next compare waits for this server's scores. A tree whose scorer pauses itself while any run loop
    holds it (lab.measure.quality.Worker in its own process) needs no wait with --click-while-scoring; an earlier tree's
    scorer, a thread of its server, would take the cores from the other tree's next compare, so it is waited for."""
    return WAIT_FOR_SCORES or server.tree.role == "base"


def is_run(r: dict) -> bool:
    return "quality_of" not in r and "preset" in r and not r.get("cancelled")


# -- the tap: click -> sound -------------------------------------------------------------------------------------
def tap_click(snap: dict, button: str) -> dict | None:
    """The click on `button` (its `click` event; its `pointerdown` where no click came). The person's click, not
    the copy the page hands Gradio once the voice is scheduled (web/player.js: not trusted, and later)."""
    for kind in ("click", "pointerdown"):
        found = [c for c in snap["clicks"] if c["button"] == button and c["type"] == kind]
        if found:
            return ([c for c in found if c.get("trusted")] or found)[0]
    return None


def clip_bounds(snap: dict, onset: dict, after_ms: float, audio_s: float | None) -> dict:
    """Where the clip holding `onset` started and ended, on the performance clock (ms) and, for Web Audio, in its
    context's own time (s). Web Audio: the buffers on the route (the node they feed: the player's per-run gain) of
    the buffer playing at the onset. A media element: its first `playing` after `after_ms`, and the first of its
    `waiting`, `pause` or `ended` events at the clip's last sample (position >= audio_s - 50 ms; Gradio's HLS
    element may say `ended` only when its stream closes, long after the sound)."""
    out = {"start_ms": None, "start_ctx_s": None, "end_ms": None, "end_ctx_s": None, "start_position_s": None}
    if onset["path"] == "webaudio":
        same = [s for s in snap["sources"] if s["context"] == onset["context"]]
        at = [s for s in same if s["ctx_start_s"] - 0.005 <= onset["ctx_time_s"] <= s["ctx_end_s"] + 0.005]
        if at:
            route = at[0]["route"]
            clip = [s for s in same if s["route"] == route] if route is not None else at
            first, last = min(clip, key=lambda s: s["ctx_start_s"]), max(clip, key=lambda s: s["ctx_end_s"])
            out.update(start_ms=first["t_start_ms"], start_ctx_s=first["ctx_start_s"], end_ms=last["t_end_ms"],
                       end_ctx_s=last["ctx_end_s"])
        return out
    events = [m for m in snap["media"] if m["element"] == onset["source"]]
    playing = [m for m in events if m["type"] == "playing" and after_ms <= m["t_ms"] <= onset["t_ms"]]
    ends = [m for m in events if m["type"] in ("waiting", "pause", "ended") and m["t_ms"] > onset["t_ms"]
            and (m["type"] == "ended" or (audio_s is not None and m["position_s"] >= audio_s - 0.05))]
    if playing:
        out.update(start_ms=playing[0]["t_ms"], start_position_s=playing[0]["position_s"])
    if ends:
        out["end_ms"] = min(m["t_ms"] for m in ends)
    return out


def first_onset_after(snap: dict, t_ms: float, ctx_end: tuple[int, float] | None = None) -> dict | None:
    """The first onset after t_ms (performance clock); after a Web Audio clip, the first one after its end in that
    context's own time (robust to the audio thread falling behind meanwhile)."""
    if ctx_end is not None:
        context, end_s = ctx_end
        later = [o for o in snap["onsets"] if (o["context"] == context and o["path"] == "webaudio"
                                              and o["ctx_time_s"] >= end_s - 0.001)
                 or (not (o["context"] == context and o["path"] == "webaudio") and o["t_ms"] >= t_ms)]
    else:
        later = [o for o in snap["onsets"] if o["t_ms"] >= t_ms]
    return min(later, key=lambda o: o["t_ms"]) if later else None


def tap_clips(snap: dict, button: str, lengths: list[float | None]) -> list[dict]:
    """Click -> sound of the compare's clips (`lengths`: their audio seconds, from the records), one after the
    other. The first clip: the first onset after the click. The next one, over Web Audio: the first onset after the
    previous clip's last buffer ended (in that context's time); from a media element: the first onset of another
    element (Gradio's HLS element can stall before its clip's last segment and play it only when its stream
    closes, after the next clip began). after_previous_ms: from where the previous clip stopped sounding (its last
    buffer; the element's last `waiting`, `pause` or `ended` before, `previous_stop` saying whether at its end)."""
    click = tap_click(snap, button)
    if click is None:
        return [{"click_to_sound_ms": None, "why": "no click seen"} for _ in lengths]
    out, prev, prev_bounds, sources = [], None, None, set()
    for audio_s in lengths:
        if prev is None:
            onset = first_onset_after(snap, click["t_ms"])
        elif prev["path"] == "webaudio":
            if prev_bounds["end_ms"] is None:
                break   # where it ended is not known: the next clip cannot be told from its later sentences
            ctx_end = (prev["context"], prev_bounds["end_ctx_s"]) if prev_bounds["end_ctx_s"] is not None else None
            onset = first_onset_after(snap, prev_bounds["end_ms"], ctx_end)
        else:
            later = [o for o in snap["onsets"] if o["t_ms"] > prev["t_ms"] and o["source"] not in sources]
            onset = min(later, key=lambda o: o["t_ms"]) if later else None
        if onset is None:
            out.append({"click_to_sound_ms": None, "why": "no sound after " + ("the click" if prev is None else
                                                                              "the previous clip")})
            break
        bounds = clip_bounds(snap, onset, click["t_ms"] if prev is None else prev["t_ms"], audio_s)
        stop_ms, stop = None, None
        if prev is not None and prev["path"] == "webaudio":
            stop_ms, stop = prev_bounds["end_ms"], "end"
        elif prev is not None:
            stops = [m for m in snap["media"] if m["element"] == prev["source"]
                     and m["type"] in ("waiting", "pause", "ended") and prev["t_ms"] < m["t_ms"] <= onset["t_ms"]]
            if stops:
                last = max(stops, key=lambda m: m["t_ms"])
                stop_ms = last["t_ms"]
                stop = "end" if last["type"] == "ended" or (prev_audio_s is not None and last["position_s"]
                                                              >= prev_audio_s - 0.05) else "stall"
        rel = lambda t: None if t is None else t - click["t_ms"]   # noqa: E731
        out.append({"click_to_sound_ms": onset["t_ms"] - click["t_ms"], "click_type": click["type"],
                    "click_trusted": click["trusted"], "click_epoch_ms": click["epoch_ms"],
                    "click_handled_after_ms": click["seen_ms"] - click["t_ms"],
                    "after_previous_ms": minus(onset["t_ms"], stop_ms), "previous_stop": stop,
                    "onset_path": onset["path"], "onset_source": onset["source"],
                    "onset_level_dbfs": onset["level_dbfs"], "onset_epoch_ms": onset["epoch_ms"],
                    "onset_ctx_s": onset["ctx_time_s"] if onset["path"] == "webaudio" else None,
                    "clip_start_ms": rel(bounds["start_ms"]), "clip_start_ctx_s": bounds["start_ctx_s"],
                    "clip_start_position_s": bounds["start_position_s"], "clip_end_ms": rel(bounds["end_ms"])})
        prev, prev_bounds, prev_audio_s = onset, bounds, audio_s
        sources.add(onset["source"])
    while len(out) < len(lengths):
        out.append({"click_to_sound_ms": None, "why": "the previous clip's end is not known"})
    return out


def compact(snap: dict) -> dict:
    """The tap's record of a compare as kept in results.json: everything but the scheduled buffers, which are
    summed per route (the span of each player's run: enough for clip_bounds to work on it again)."""
    routes: dict = {}
    for src in snap["sources"]:
        key = (src["context"], src["route"])
        r = routes.setdefault(key, {**src, "buffers": 0})
        r["buffers"] += 1
        if src["ctx_start_s"] < r["ctx_start_s"]:
            r.update(ctx_start_s=src["ctx_start_s"], t_start_ms=src["t_start_ms"], epoch_start_ms=src["epoch_start_ms"])
        if src["ctx_end_s"] > r["ctx_end_s"]:
            r.update(ctx_end_s=src["ctx_end_s"], t_end_ms=src["t_end_ms"], epoch_end_ms=src["epoch_end_ms"])
    return {**{k: v for k, v in snap.items() if k != "sources"}, "sources": list(routes.values())}


# -- one compare -------------------------------------------------------------------------------------------------
def heard_of(records: list[dict], source: str) -> list[dict]:
    """The heard runs, in the order they were requested."""
    heard = [r for r in records if is_run(r) and r.get("heard") and r.get("source") == source]
    return sorted(heard, key=lambda r: r["time"] - (r.get("wall_s") or 0))


def compare_id(rec: dict):
    return rec.get("compare_id") or rec.get("comparison_id")


def minus(a, b):
    return None if a is None or b is None else a - b


def heard_row(tree: Tree, scenario: str, transport: str, compare: int, page: int | None, clip: int, rec: dict,
              tap: dict) -> dict:
    lead_ms = None if rec.get("first_audible_s") is None else 1000 * rec["first_audible_s"]
    row = {"tree": tree.commit, "tree_role": tree.role, "scenario": scenario, "transport": transport,
           "reported_transport": rec.get("transport"), "preset": rec.get("preset"), "compare": compare,
           "page": page, "clip": clip, "lead_ms": lead_ms, **{k: rec.get(k) for k in RECORD_KEYS},
           **{k: rec.get(k) for k in PAGE_KEYS}, "compare_id": compare_id(rec), **tap}
    sound = row.get("click_to_sound_ms")
    row["over_model_ms"] = minus(minus(sound, rec.get("ttfb_ms")), lead_ms)
    row["tap_minus_page_ms"] = minus(sound, rec.get("click_to_heard_ms"))
    # Before the request, as the tap sees it: click -> sound less the page's own heard-from-request (the previous
    # tree's page reports no click -> request; this is the estimate of it, the two measurements' disagreement in).
    row["page_path_ms"] = minus(sound, rec.get("heard_ttfb_ms"))
    # The tap against the clip's own start: Web Audio, the first buffer's scheduled start + the leading silence,
    # in context time (where the model's detector put the first audible sample: the tap's detection alone) and on
    # the performance clock as mapped when it was scheduled (web/player.js's way; the difference is the audio
    # thread falling behind meanwhile). A media element: its first `playing` + the silence still ahead of it.
    lead_s = rec.get("first_audible_s")
    row["onset_vs_schedule_ctx_ms"] = None
    if lead_s is not None and row.get("onset_ctx_s") is not None and row.get("clip_start_ctx_s") is not None:
        row["onset_vs_schedule_ctx_ms"] = 1000 * (row["onset_ctx_s"] - row["clip_start_ctx_s"] - lead_s)
    ahead_s = None if lead_s is None else max(0.0, lead_s - (row.get("clip_start_position_s") or 0.0))
    row["onset_vs_start_ms"] = minus(minus(sound, row.get("clip_start_ms")), None if ahead_s is None else 1000 * ahead_s)
    return row


async def run_compare(browser, server: Server, scenario: str, transport: str, compare: int, log) -> dict:
    """One click on a fresh page of `server`'s tree; its heard runs as rows."""
    tree = server.tree
    button = BUTTON[scenario]
    page = await open_page(browser, server.url)
    entry = {"tree": tree.commit, "tree_role": tree.role, "scenario": scenario, "transport": transport,
             "compare": compare, "rows": []}
    try:
        defaults = await page_defaults(page)
        entry["defaults"] = defaults
        await set_transport(page, transport)
        if scenario == "ab":
            await set_ab_streamed(page)
            expected, source = 2, "ab"
        else:
            expected, source = len(defaults["presets"]), "app"
        await asyncio.sleep(SETTLE_BEFORE_CLICK_S)
        since = len(server.records())
        await page.evaluate("() => window.labTap.reset()")
        started = time.time()
        await page.click(f"#{button}")
        entry["overall"] = await wait_done(page, button, COMPARE_TIMEOUT_S)
        await wait_heard_records(server, since, source, expected, PLAY_TIMEOUT_S)
        entry["played_to_end"] = await wait_quiet([page], PLAY_TIMEOUT_S)
        entry["wall_s"] = time.time() - started
        snap = await page.evaluate("() => window.labTap.snapshot()")
        entry["page_errors"] = page.errors[:5]
        entry["tap_errors"] = snap["errors"][:5]
        entry["tap"] = compact(snap)
    finally:
        await close_page(page)
    entry["scored_wait_s"] = await wait_scored(server, since, QUALITY_WAIT_S if waits_for_scores(server) else 0)
    heard = heard_of(server.records()[since:], source)
    clips = tap_clips(snap, button, [r.get("audio_s") for r in heard])
    entry["rows"] = [heard_row(tree, scenario, transport, compare, None, i, rec, clip)
                     for i, (rec, clip) in enumerate(zip(heard, clips))]
    entry["heard_runs"] = len(heard)
    return entry


async def press_together(pages: list) -> None:
    """Every page's mouse presses and releases its Compare button at once (trusted input events, sent to all
    pages before any answers): a crowd clicking in the same moment."""
    boxes = [await p.locator("#compare-btn").bounding_box() for p in pages]
    at = [(b["x"] + b["width"] / 2, b["y"] + b["height"] / 2) for b in boxes]
    await asyncio.gather(*(p.mouse.move(x, y) for p, (x, y) in zip(pages, at)))
    await asyncio.gather(*(p.mouse.down() for p in pages))
    await asyncio.gather(*(p.mouse.up() for p in pages))


async def run_pages(browser, server: Server, transport: str, compare: int, pages_n: int, log) -> dict:
    """`pages_n` pages (a context each) click Compare at once; they wait in the server's line one after another."""
    tree = server.tree
    entry = {"tree": tree.commit, "tree_role": tree.role, "scenario": "pages", "transport": transport,
             "compare": compare, "pages": pages_n, "rows": []}
    pages = []
    opened = time.monotonic()
    try:
        for _ in range(pages_n):
            page = await open_page(browser, server.url)
            pages.append(page)
            defaults = await page_defaults(page)
            await set_transport(page, transport)
            await page.fill("#text textarea", PAGES_TEXT)
            await page.fill("#runs input", "1")
            await page.locator("#runs input").blur()
        entry["defaults"] = {**defaults, "text": PAGES_TEXT, "runs": 1}
        await asyncio.sleep(SETTLE_BEFORE_CLICK_S)
        since = len(server.records())
        await asyncio.gather(*(p.evaluate("() => window.labTap.reset()") for p in pages))
        log(f"  {pages_n} pages open and set in {time.monotonic() - opened:.0f} s; clicking")
        started = time.time()
        await press_together(pages)
        entry["overall"] = []
        for i, p in enumerate(pages):
            entry["overall"].append(await wait_done(p, "compare-btn", COMPARE_TIMEOUT_S))
            log(f"  page {i + 1}/{pages_n} done after {time.time() - started:.0f} s: {entry['overall'][-1][:60]}")
        await wait_heard_records(server, since, "app", pages_n * len(defaults["presets"]), PLAY_TIMEOUT_S)
        entry["played_to_end"] = await wait_quiet(pages, PLAY_TIMEOUT_S)
        entry["wall_s"] = time.time() - started
        snaps = await asyncio.gather(*(p.evaluate("() => window.labTap.snapshot()") for p in pages))
        entry["page_errors"] = [e for p in pages for e in p.errors][:5]
        entry["tap_errors"] = [e for snap in snaps for e in snap["errors"]][:5]
        entry["tap"] = [compact(snap) for snap in snaps]
    finally:
        for p in pages:
            await close_page(p)
    entry["scored_wait_s"] = await wait_scored(server, since, QUALITY_WAIT_S if waits_for_scores(server) else 0)
    clicks = [tap_click(snap, "compare-btn") for snap in snaps]
    stamps = [c["epoch_ms"] for c in clicks if c]
    entry["click_spread_ms"] = max(stamps) - min(stamps) if stamps else None
    downs = [c["epoch_ms"] for snap in snaps for c in snap["clicks"][:1] if c["type"] == "pointerdown"]
    entry["pointerdown_spread_ms"] = max(downs) - min(downs) if downs else None
    heard = heard_of(server.records()[since:], "app")
    per_compare = len(defaults["presets"])
    # The line serves the pages one after another: their heard runs in order, `per_compare` at a time, a new
    # comparison also where the records' compare_id changes (a tree that records one); the pages in the order their
    # first sound came.
    served: list[list[dict]] = []
    for r in heard:
        last = served[-1] if served else None
        ids = {compare_id(x) for x in last or []} - {None}
        if last is None or len(last) >= per_compare or (compare_id(r) is not None and ids and compare_id(r) not in ids):
            served.append([r])
        else:
            last.append(r)
    firsts = [tap_clips(snap, "compare-btn", [None]) for snap in snaps]
    order = sorted(range(len(pages)), key=lambda i: firsts[i][0].get("onset_epoch_ms") or float("inf"))
    for place, (page_i, recs) in enumerate(zip(order, served)):
        clips = tap_clips(snaps[page_i], "compare-btn", [r.get("audio_s") for r in recs])
        for k, (rec, clip) in enumerate(zip(recs, clips)):
            row = heard_row(tree, "pages", transport, compare, page_i, k, rec, clip)
            row["place_in_line"] = place
            entry["rows"].append(row)
    entry["heard_runs"] = len(heard)
    return entry


def describe(entry: dict) -> str:
    if entry.get("error"):
        return f"FAILED: {entry['error'][:200]}"
    firsts = [r for r in entry["rows"] if r["clip"] == 0]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"   # noqa: E731
    if entry["scenario"] == "pages":
        sounds = sorted(r["click_to_sound_ms"] for r in firsts if r["click_to_sound_ms"] is not None)
        return (f"{len(firsts)} pages heard, clicks within {fmt(entry.get('click_spread_ms'))} ms (presses "
                f"{fmt(entry.get('pointerdown_spread_ms'))} ms); click->sound "
                f"{fmt(sounds[0] if sounds else None)}..{fmt(sounds[-1] if sounds else None)} ms; "
                f"{entry['wall_s']:.0f} s")
    if not firsts:
        return f"no heard run ({entry.get('overall', '')[:60]})"
    r = firsts[0]
    return (f"{r['preset']}: click->sound {fmt(r['click_to_sound_ms'])} ms (TTFB {fmt(r['ttfb_ms'])} + lead "
            f"{fmt(r['lead_ms'])}), page heard {fmt(r['heard_ttfb_ms'])} ms from its request, click->request "
            f"{fmt(r['click_to_request_ms'])}, click->heard {fmt(r['click_to_heard_ms'])}; {entry['wall_s']:.0f} s"
            f"{'' if entry.get('played_to_end') else ' (sound still playing at the timeout)'}; quality wait "
            f"{entry['scored_wait_s']:.0f} s")


# -- figures and goals -------------------------------------------------------------------------------------------
def quantile(values: list[float], q: float) -> float | None:
    """Linear interpolation between order statistics (lab.measure.metrics' way: index q * (n - 1))."""
    v = sorted(x for x in values if x is not None)
    if not v:
        return None
    i = q * (len(v) - 1)
    lo = int(i)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (i - lo)


def spread(values: list) -> dict:
    """Median, and the spread: min-max, or p10-p90 from 10 values on (lab.measure.metrics.summarize's rule)."""
    v = [x for x in values if x is not None]
    wide = len(v) >= 10
    return {"median": quantile(v, 0.5), "lo": quantile(v, 0.1 if wide else 0.0),
            "hi": quantile(v, 0.9 if wide else 1.0), "n": len(v), "spread": "p10-p90" if wide else "min-max"}


def group_key(r: dict) -> tuple:
    return (r["tree_role"], r["tree"], r["scenario"], r["transport"])


def groups(rows: list[dict]) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(group_key(r), []).append(r)
    return dict(sorted(out.items(), key=lambda kv: (kv[0][0] != "current", SCENARIOS.index(kv[0][2]),
                                                     TRANSPORTS.index(kv[0][3]))))


def model_floor(r: dict) -> float | None:
    """TTFB + the stream's leading silence: the earliest the first audible sample can sound, counted from the
    request (the player has to play the silence before it first)."""
    return None if r["ttfb_ms"] is None else r["ttfb_ms"] + (r["lead_ms"] or 0)


def verdict(value: float | None, limit: float) -> bool | None:
    return None if value is None else value <= limit


def goals(rows: list[dict]) -> list[dict]:
    """Per tree, scenario and transport, over each compare's first heard run (each page's, in pages)."""
    out = []
    for (role, commit, scenario, transport), rs in groups([r for r in rows if r["clip"] == 0]).items():
        over = [r["over_model_ms"] for r in rs if r["over_model_ms"] is not None]
        request = [r["click_to_request_ms"] for r in rs if r.get("click_to_request_ms") is not None]
        agree = [abs(r["tap_minus_page_ms"]) for r in rs if r["tap_minus_page_ms"] is not None]
        out.append({
            "tree_role": role, "tree": commit, "scenario": scenario, "transport": transport, "runs": len(rs),
            "tap_missing": sum(r["click_to_sound_ms"] is None for r in rs),
            "reported_transports": sorted({r["reported_transport"] for r in rs if r["reported_transport"]}),
            "click_to_sound_ms": spread([r["click_to_sound_ms"] for r in rs]),
            "model_floor_ms": spread([model_floor(r) for r in rs]),
            "heard_from_request_ms": spread([r["heard_ttfb_ms"] for r in rs]),
            "page_path_ms": spread([r["page_path_ms"] for r in rs]),
            "sound_over_model": {"median_ms": quantile(over, 0.5), "p95_ms": quantile(over, 0.95), "n": len(over),
                                 "median_limit_ms": GOAL_MEDIAN_MS, "p95_limit_ms": GOAL_P95_MS,
                                 "met_median": verdict(quantile(over, 0.5), GOAL_MEDIAN_MS),
                                 "met_p95": verdict(quantile(over, 0.95), GOAL_P95_MS)},
            "click_to_request": {"median_ms": quantile(request, 0.5), "n": len(request), "limit_ms": GOAL_REQUEST_MS,
                                 "met": verdict(quantile(request, 0.5), GOAL_REQUEST_MS)},
            "agreement": {"median_ms": quantile(agree, 0.5), "max_ms": max(agree) if agree else None,
                          "n": len(agree), "limit_ms": GOAL_AGREE_MS,
                          "met": None if not agree else max(agree) <= GOAL_AGREE_MS
                          and quantile(agree, 0.5) <= GOAL_AGREE_MS},
        })
    return out


def later_clips(rows: list[dict]) -> list[dict]:
    """The second clip of each compare, from the end of the first one: reported apart, not in the goals."""
    out = []
    for (role, commit, scenario, transport), rs in groups([r for r in rows if r["clip"] > 0]).items():
        out.append({"tree_role": role, "tree": commit, "scenario": scenario, "transport": transport, "runs": len(rs),
                    "previous_stalled": sum(r.get("previous_stop") == "stall" for r in rs),
                    "after_previous_ms": spread([r.get("after_previous_ms") for r in rs]),
                    "ttfb_ms": spread([r["ttfb_ms"] for r in rs]), "lead_ms": spread([r["lead_ms"] for r in rs]),
                    "over_model_from_previous_ms": spread([minus(minus(r.get("after_previous_ms"), r["ttfb_ms"]),
                                                                 r["lead_ms"]) for r in rs])})
    return out


# -- charts ------------------------------------------------------------------------------------------------------
def group_label(key: tuple) -> str:
    role, commit, scenario, transport = key
    return f"{role} {commit} · {scenario} · {transport}"


def stages(r: dict) -> dict:
    """A heard run's stages in ms from the click. Where the tree reports no click -> request, the request is put at
    the tap's click -> sound less the page's heard-from-request (an estimate: marked)."""
    request = r.get("click_to_request_ms")
    estimated = request is None
    if estimated:
        request = r["page_path_ms"]
    if request is None:
        return {}
    out = {"request": request, "ttfb": None if r["ttfb_ms"] is None else request + r["ttfb_ms"],
           "first audible (model)": None if r["first_audible_ms"] is None else request + r["first_audible_ms"],
           "floor: TTFB + lead": None if r["ttfb_ms"] is None else request + r["ttfb_ms"] + (r["lead_ms"] or 0),
           "received (page)": r.get("click_to_received_ms") if not estimated else
           None if r["received_ms"] is None else request + r["received_ms"],
           "heard (page)": r.get("click_to_heard_ms"), "sound (tap)": r["click_to_sound_ms"],
           "_estimated": estimated}
    return out


STAGES = (("request", "#8172b3"), ("ttfb", "#4c72b0"), ("first audible (model)", "#55a868"),
          ("floor: TTFB + lead", "#999999"), ("received (page)", "#937860"), ("heard (page)", "#dd8452"),
          ("sound (tap)", "#c44e52"))


def waterfall_chart(rows: list[dict], env: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups([r for r in rows if r["clip"] == 0])
    if not grouped:
        return
    fig, axes = plt.subplots(len(grouped), 1, figsize=(12, 1.9 * len(grouped) + 1.2), squeeze=False)
    for ax, (key, rs) in zip(axes[:, 0], grouped.items()):
        per_run = [stages(r) for r in rs]
        estimated = any(s.get("_estimated") for s in per_run)
        for y, (name, colour) in enumerate(STAGES):
            s = spread([p.get(name) for p in per_run])
            if s["median"] is None:
                why = "not reported by this tree" if name == "heard (page)" else "missing"
                ax.text(0, y, f"  {name}: {why}", va="center", fontsize=7, color="#888888")
                continue
            hatch = "//" if estimated and name not in ("sound (tap)", "heard (page)") else None
            ax.barh(y, s["median"], color=colour, hatch=hatch, edgecolor="white",
                    xerr=[[s["median"] - s["lo"]], [s["hi"] - s["median"]]], capsize=3)
            ax.text(s["hi"], y, f"  {s['median']:.0f}", va="center", fontsize=7)
        ax.set_yticks(range(len(STAGES)), [n for n, _ in STAGES], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(group_label(key) + f" · {len(rs)} runs" +
                     (" · hatched: request placed at tap sound - page heard (no click stamp from this tree)"
                      if estimated else ""), fontsize=8)
    axes[-1, 0].set_xlabel("ms from the click (median; whiskers: min-max, p10-p90 from 10 runs)", fontsize=8)
    fig.suptitle(f"From the click, stage by stage: each compare's first heard run\n{title_line(env)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def click_to_sound_chart(rows: list[dict], env: dict, path: str) -> None:
    """Click -> sound per group, and its difference from the model floor with the goals. The pages groups (which
    hold the wait in the line, tens of seconds) get a row of panels of their own, so as not to squash the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups([r for r in rows if r["clip"] == 0])
    if not grouped:
        return
    bands = [[k for k in grouped if k[2] != "pages"], [k for k in grouped if k[2] == "pages"]]
    bands = [b for b in bands if b]
    horizontal = {"orientation": "horizontal"} if tuple(int(x) for x in matplotlib.__version__.split(".")[:2]) >= (
        3, 10) else {"vert": False}
    fig, axes = plt.subplots(len(bands), 2, figsize=(14, 0.55 * len(grouped) + 1.6 * len(bands) + 1.2),
                             squeeze=False, gridspec_kw={"height_ratios": [len(b) + 1 for b in bands]})
    for (left, right), keys in zip(axes, bands):
        extent = {left: [0.0, GOAL_MEDIAN_MS], right: [0.0, GOAL_P95_MS]}   # each panel's data, for its limits
        for y, key in enumerate(keys):
            rs = grouped[key]
            sound = [r["click_to_sound_ms"] for r in rs if r["click_to_sound_ms"] is not None]
            over = [r["over_model_ms"] for r in rs if r["over_model_ms"] is not None]
            floor = [model_floor(r) for r in rs if r["ttfb_ms"] is not None]
            colour = "#c44e52" if key[0] == "current" else "#4c72b0"
            for ax, values in ((left, sound), (right, over)):
                if values:
                    extent[ax] += values
                    ax.boxplot([values], positions=[y], widths=0.5, showfliers=False, **horizontal)
                    jitter = [y + 0.18 * ((i * 7919) % 11 / 10 - 0.5) for i in range(len(values))]
                    ax.scatter(values, jitter, s=10, color=colour, alpha=0.7, zorder=3)
            if floor:
                goal = quantile(floor, 0.5) + GOAL_MEDIAN_MS
                left.plot([goal, goal], [y - 0.35, y + 0.35], color="#2ca02c", linewidth=2, zorder=4)
                extent[left].append(goal)
        for ax in (left, right):
            lo, hi = min(extent[ax]), max(extent[ax])
            ax.set_xlim(lo - 0.04 * (hi - lo), hi + 0.06 * (hi - lo))
            ax.set_yticks(range(len(keys)), [group_label(k) for k in keys] if ax is left else [""] * len(keys),
                          fontsize=7)
            ax.set_ylim(len(keys) - 0.5, -0.5)
            ax.grid(axis="x", alpha=0.3)
        right.axvline(GOAL_MEDIAN_MS, color="#2ca02c", linewidth=1.5, label=f"median goal {GOAL_MEDIAN_MS:.0f} ms")
        right.axvline(GOAL_P95_MS, color="#ff7f0e", linewidth=1.5, linestyle="--",
                      label=f"p95 goal {GOAL_P95_MS:.0f} ms")
        right.legend(fontsize=7, loc="lower right")
    axes[-1, 0].set_xlabel("click -> first audible sample rendered, ms (tap)\ngreen: median TTFB + lead + "
                           f"{GOAL_MEDIAN_MS:.0f} ms (the goal for the median)", fontsize=8)
    axes[-1, 1].set_xlabel("click -> sound - (TTFB + leading silence) per run, ms", fontsize=8)
    fig.suptitle(f"Click -> sound, each compare's first heard run (boxes: quartiles; dots: runs; pages: each page's, "
                 f"its wait in the line included)\n{title_line(env)}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- text --------------------------------------------------------------------------------------------------------
def cell(s: dict) -> str:
    return "-" if s["median"] is None else f"{s['median']:.0f} ({s['lo']:.0f}-{s['hi']:.0f})"


def num(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def mark(met) -> str:
    return "n/a" if met is None else "met" if met else "NOT met"


def text_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *lines])


def print_tables(results: dict) -> None:
    print(f"\n{title_line(results['env'])}")
    print("each compare's first heard run; ms, median (spread); over = click->sound - TTFB - lead, per run\n")
    head = ["tree", "scenario", "transport", "n", "click->sound (tap)", "TTFB+lead", "page heard from req.",
            "page path (tap-heard)", f"over median<={GOAL_MEDIAN_MS:.0f}", f"over p95<={GOAL_P95_MS:.0f}",
            f"click->req<={GOAL_REQUEST_MS:.0f}", f"|tap-page|<={GOAL_AGREE_MS:.0f} med/max"]
    lines = []
    for g in results["goals"]:
        o, q, a = g["sound_over_model"], g["click_to_request"], g["agreement"]
        ran = g["reported_transports"]
        lines.append([f"{g['tree_role']} {g['tree']}", g["scenario"], g["transport"] + (
            "" if ran in ([g["transport"]], []) else f" (ran {'/'.join(ran)})"),
            f"{g['runs']}" + (f" ({g['tap_missing']} no tap)" if g["tap_missing"] else ""),
            cell(g["click_to_sound_ms"]), cell(g["model_floor_ms"]), cell(g["heard_from_request_ms"]),
            cell(g["page_path_ms"]), f"{num(o['median_ms'])} {mark(o['met_median'])}",
            f"{num(o['p95_ms'])} {mark(o['met_p95'])}", f"{num(q['median_ms'])} {mark(q['met'])}",
            f"{num(a['median_ms'])}/{num(a['max_ms'])} {mark(a['met'])}"])
    print(text_table(head, lines))
    if results["later_clips"]:
        print("\nsecond clip of each compare (not in the goals): from where the first clip stopped sounding, ms "
              "(prev stalled: it stopped before its end, a media element waiting for data)\n")
        head = ["tree", "scenario", "transport", "n", "prev stalled", "prev end->sound", "TTFB", "lead", "over model"]
        print(text_table(head, [[f"{g['tree_role']} {g['tree']}", g["scenario"], g["transport"], g["runs"],
                                 g["previous_stalled"],
                                 cell(g["after_previous_ms"]), cell(g["ttfb_ms"]), cell(g["lead_ms"]),
                                 cell(g["over_model_from_previous_ms"])] for g in results["later_clips"]]))
    failed = [c for c in results["compares"] if c.get("error")]
    if failed:
        print(f"\n{len(failed)} compare(s) failed: " + "; ".join(
            f"{c['tree_role']} {c['scenario']} {c['transport']} #{c['compare']}: {c['error'][:80]}" for c in failed))


# -- main --------------------------------------------------------------------------------------------------------
METHOD = f"""\
Two trees (--base, checked out with git worktree; the working tree), each `python app.py` on a loopback port with
its own history (HF_HUB_OFFLINE=1). Headless Debian Chromium through Playwright (autoplay allowed, no GPU); a fresh
browser context and page per compare, so every click is a page's first. tap.js is injected before the page's
scripts: the click is the `click` event's timeStamp on #compare-btn or #ab-play (performance clock); the sound is
the first audible sample rendered after it (an AudioWorklet fed by every connection to an AudioDestinationNode,
and by a captureStream() copy of each <audio> element that plays; RMS over a 10 ms window sliding by 1 ms at or
above -50 dBFS after >= 300 ms below; context time mapped to the performance clock by getOutputTimestamp, so the
output latency is counted). Scenarios: first-click (the page's pre-ticked presets, default text, cap and runs),
ab (Blind A/B, as it streams), pages (current tree: N pages click within a few ms, short text, one run each, served
one after another by the line). Each scenario over both values of the transport radio, compares interleaved tree
by tree. One warm-up compare per tree first (builds), not counted. After each compare the script waits until no
sound is to come and until the server scored its runs' quality (so that no scoring shares the CPU with the next
compare). Model figures (ttfb_ms, first_audible_s/ms, heard_ttfb_ms: the page's heard from the run's request) and
the page's own click_to_request_ms / click_to_heard_ms (where the tree records them) come from the history records;
heard runs are matched to the tap's clips in the order they were requested (by compare_id where recorded). Goals,
over each compare's first heard run: click->sound - TTFB - 1000*first_audible_s median <= {GOAL_MEDIAN_MS:.0f} ms and
p95 <= {GOAL_P95_MS:.0f} ms; click->request median <= {GOAL_REQUEST_MS:.0f} ms; |click_to_heard_ms - click->sound| median
and max <= {GOAL_AGREE_MS:.0f} ms. The second clip of a compare starts after the first finished playing: its zero is the
end of the first clip as rendered (after_previous_ms), reported apart, not in the goals.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", default=DEFAULT_BASE, help=f"the previous tree's commit (default {DEFAULT_BASE})")
    p.add_argument("--trees", default="current,base", help="which trees: current,base (default), current or base")
    p.add_argument("--compares", type=int, default=10, help="first-click compares per tree and transport (10)")
    p.add_argument("--ab-plays", type=int, default=3, help="blind pairs per tree and transport (3)")
    p.add_argument("--pages", type=int, default=8, help="pages clicking at once in the pages scenario (8; 0: none)")
    p.add_argument("--pages-rounds", type=int, default=2, help="rounds of the pages scenario per transport (2)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma list of " + ", ".join(SCENARIOS))
    p.add_argument("--transports", default=",".join(TRANSPORTS), help="comma list of " + ", ".join(TRANSPORTS))
    p.add_argument("--quick", action="store_true", help="one of each (a trial)")
    p.add_argument("--out", help="results folder (default benchmarks/browser/<current commit>/)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the servers' histories and logs")
    p.add_argument("--click-while-scoring", action="store_true", help="the next compare does not wait for the "
                   "current tree's quality scores of the last one: a person clicks again once the voice has ended, "
                   "whatever the server still does (the base tree's scores are still waited for: its scorer is a "
                   "thread of its server and would take the cores from the next compare)")
    args = p.parse_args(argv)
    global WAIT_FOR_SCORES
    WAIT_FOR_SCORES = not args.click_while_scoring
    if args.quick:
        args.compares, args.ab_plays, args.pages_rounds = 1, 1, 1
    roles = [t.strip() for t in args.trees.split(",") if t.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if not set(roles) <= {"current", "base"} or not set(scenarios) <= set(SCENARIOS) or not set(transports) <= set(
            TRANSPORTS):
        p.error("--trees, --scenarios or --transports names something unknown")

    tmp = tempfile.mkdtemp(prefix="lab-click-bench-")
    started_s = time.time()

    def log(line: str) -> None:
        print(f"[{time.time() - started_s:6.0f} s] {line}", flush=True)

    env = machine_facts()
    trees = []
    if "current" in roles:
        trees.append(current_tree())
    if "base" in roles:
        trees.append(base_tree(args.base, tmp))
    env["trees"] = [{"role": t.role, "commit": t.commit, "dirty": t.dirty} for t in trees]
    out = args.out or os.path.join(ROOT, "benchmarks", "browser", current_tree().commit)
    os.makedirs(out, exist_ok=True)
    log(f"{title_line(env)}; load average {env['loadavg_at_start']}; temporary files in {tmp}")
    results = {"env": env, "method": METHOD, "args": vars(args), "compares": [], "warmup": [], "rows": []}
    servers = []
    try:
        servers = [Server(t, os.path.join(tmp, f"server-{t.role}")) for t in trees]
        for s in servers:
            s.wait_serving(SERVER_START_TIMEOUT_S)
            log(f"{s.tree.role} tree {s.tree.commit} serves {s.url}")
        asyncio.run(run_all(servers, args, scenarios, transports, results, out, env, log))
    except KeyboardInterrupt:
        log("interrupted: writing what was measured")
    finally:
        for s in servers:
            s.stop()
        for t in trees:
            remove_tree(t)
        env["loadavg_at_end"] = os.getloadavg()
        env["wall_s"] = time.time() - started_s
        save(results, out, env)
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    print_tables(results)
    log(f"wrote {out}/results.json, waterfall.png, click_to_sound.png")
    return 0


def plan(args, scenarios: list[str], transports: list[str], servers: list[Server]) -> list[tuple]:
    """(scenario, transport, server, index) in the order they run: round by round, scenario by scenario,
    transport by transport, tree by tree."""
    counts = {"first-click": args.compares, "ab": args.ab_plays, "pages": args.pages_rounds if args.pages else 0}
    steps = []
    for i in range(max(counts[s] for s in scenarios)):
        for scenario in scenarios:
            if i >= counts[scenario]:
                continue
            for transport in transports:
                for server in servers:
                    if scenario == "pages" and server.tree.role != "current":
                        continue
                    steps.append((scenario, transport, server, i))
    return steps


async def run_all(servers: list[Server], args, scenarios, transports, results: dict, out: str, env: dict,
                  log) -> None:
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for server in servers:   # the builds and the quality models' first load, not counted
                log(f"warm-up compare on the {server.tree.role} tree {server.tree.commit} ...")
                entry = await attempt(run_compare(browser, server, "first-click", "pcm", -1, log), server)
                results["warmup"].append(entry)
                log(f"warm-up: {describe(entry)}")
            steps = plan(args, scenarios, transports, servers)
            for n, (scenario, transport, server, i) in enumerate(steps, 1):
                if scenario == "pages":
                    entry = await attempt(run_pages(browser, server, transport, i, args.pages, log), server)
                else:
                    entry = await attempt(run_compare(browser, server, scenario, transport, i, log), server)
                for k, v in {"tree": server.tree.commit, "tree_role": server.tree.role, "scenario": scenario,
                             "transport": transport, "compare": i}.items():
                    entry.setdefault(k, v)
                results["compares"].append({k: v for k, v in entry.items() if k != "rows"})
                results["rows"].extend(entry.get("rows", []))
                log(f"{n}/{len(steps)} {server.tree.role} {server.tree.commit} {scenario} {transport} #{i + 1}: "
                    f"{describe(entry)}")
                if n % 5 == 0:
                    save(results, out, env, charts=False)
        finally:
            await browser.close()


async def attempt(job, server: Server) -> dict:
    """A compare that fails is said and kept in the results (error), and the run goes on."""
    try:
        return await job
    except Exception as e:   # playwright's TimeoutError among them
        return {"error": f"{type(e).__name__}: {e}".split("\n")[0], "server_log_tail": server.log_tail(1500),
                "rows": []}


def save(results: dict, out: str, env: dict, charts: bool = True) -> None:
    results["goals"] = goals(results["rows"])
    results["later_clips"] = later_clips(results["rows"])
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    if charts and results["rows"]:
        waterfall_chart(results["rows"], env, os.path.join(out, "waterfall.png"))
        click_to_sound_chart(results["rows"], env, os.path.join(out, "click_to_sound.png"))


if __name__ == "__main__":
    sys.exit(main())
