"""The page as a listener hears it: heard TTFB and player stalls over both transports, and the page against the CLI.

    python benchmarks/browser/run.py                      # 5 compares per scenario and transport, then the CLI
    python benchmarks/browser/run.py --compares 1 --out /tmp/browser-trial     # a short trial

Starts `python app.py` on a free loopback port (history and votes in a temporary folder, no hub), drives it with
headless Chromium (Debian's, through Playwright), and clicks Compare as a person would:

  scenario "first-click": hibari + hibari-whole, the page's default text, cap and warm runs (the first click)
  scenario "pocket-random": pocket-tts-cpu alone with "random weights" ticked (latency only), a 6 s cap

once per transport ("pcm": Web Audio over the lab's WebSocket; "gradio": Gradio's streaming <audio>, HLS/AAC),
the four interleaved compare by compare so that a drift of the machine touches every group alike. Between
compares it waits until the last clip has finished playing. Then it stops the page and runs the CLI
(`python -m lab.bench`) over the same presets and text on the same machine.

Everything it reports comes from the runs' history records (the server's and the browser's figures); a heard run
whose browser report never came is counted as missing, never filled in. Writes results.json, waterfall.png and
stalls.png to --out (default benchmarks/browser/<commit>/) and prints the tables.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lab import history  # noqa: E402
from web.server import AppProcess  # noqa: E402
from lab.metrics import summarize  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
TRANSPORTS = ("pcm", "gradio")
TRANSPORT_LABEL = {"pcm": "PCM over a WebSocket", "gradio": "Gradio streaming audio"}   # the radio's label starts
WARM_RUNS = 2                  # the page's default "Warm runs per preset"
SERVER_START_TIMEOUT_S = 240
COMPARE_TIMEOUT_S = 600        # a first compare builds its presets
PLAYED_SLACK_S = 20            # past the last clip's length, waiting for it to finish playing
GOAL_HEARD_OVER_MODEL_MS = 100.0
GOAL_RTF_FOR_NO_STALLS = 0.8
RANDOM_NOTE = "random weights: latency only"


@dataclass(frozen=True)
class Scenario:
    key: str
    presets: tuple[str, ...]
    random_weights: bool
    max_audio_s: float | None      # None: the page's default cap


SCENARIOS = (Scenario("first-click", ("hibari", "hibari-whole"), False, None),
             Scenario("pocket-random", ("pocket-tts-cpu",), True, 6.0))
CLI_PRESETS = ("hibari", "hibari-whole", "pocket-tts-cpu")
CLI_RUNS = 5

# Per heard run: the figures kept raw in results.json and summarized per (transport, preset).
HEARD_KEYS = ("ttfb_ms", "first_audible_ms", "first_audible_s", "sent_ms", "received_ms", "heard_ttfb_ms", "heard_floor_ms",
              "transport_share_ms", "heard_over_ttfb_ms", "delivery_ms", "browser_underruns", "browser_gap_s",
              "rtf", "steady_rtf", "underruns", "stall_s", "audio_s", "clock_uncertainty_ms", "output_latency_ms",
              "jitter_buffer_ms")
SERVER_KEYS = ("ttfb_ms", "first_audible_ms", "first_audible_s", "rtf", "steady_rtf", "underruns", "stall_s",
               "audio_s")


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


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


def machine_facts() -> dict:
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "commit": git("rev-parse", "--short", "HEAD"),
            "tree_dirty": dirty, "python": platform.python_version(), "torch": version_of("torch"),
            "gradio": version_of("gradio"), "playwright": version_of("playwright"),
            "onnxruntime": version_of("onnxruntime"), "hibari_tts": version_of("hibari-tts"),
            "chromium": subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True).stdout.strip(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "loadavg_at_start": os.getloadavg()}


def title_line(env: dict) -> str:
    return (f"{env['cpu']}, {env['cores']} cores · commit {env['commit']}{'-dirty' if env['tree_dirty'] else ''}"
            f" · torch {env['torch']} · gradio {env['gradio']} · {env['date'][:16].replace('T', ' ')}")


# -- the page ----------------------------------------------------------------------------------------------------
def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.goto(url)
    page.wait_for_selector("#compare-btn")
    wait_connected(page)
    return page


def wait_connected(page) -> None:
    page.wait_for_function("() => window.labAudio && window.labAudio.connected", timeout=30_000)


def preset_boxes(page) -> dict:
    """Preset name -> its checkbox, read from the labels' text (exact names: "hibari" is not "hibari-whole")."""
    boxes = {}
    for label in page.locator("[id^=presets-] label").all():
        name = label.inner_text().strip()
        box = label.locator("input[type=checkbox]")
        if name and box.count() == 1:
            boxes[name] = box
    return boxes


def set_random_weights(page, on: bool, wanted: tuple[str, ...]) -> None:
    box = page.locator("#random-weights input[type=checkbox]")
    if box.is_checked() != on:
        box.click()
    deadline_s = time.monotonic() + 30   # the switch re-lists the presets a moment later
    while not set(wanted) <= set(preset_boxes(page)):
        if time.monotonic() > deadline_s:
            raise RuntimeError(f"presets {wanted} not offered with random weights {on}: {list(preset_boxes(page))}")
        time.sleep(0.2)


def pick(page, names: tuple[str, ...]) -> None:
    """Tick exactly these presets, in this order (the slots follow the tick order)."""
    for box in preset_boxes(page).values():
        if box.is_checked():
            box.click()
    for name in names:
        preset_boxes(page)[name].click()


def configure(page, transport: str, scenario: Scenario, text: str, default_cap_s: float) -> None:
    page.locator(f"#transport label:has-text('{TRANSPORT_LABEL[transport]}')").click()
    set_random_weights(page, scenario.random_weights, scenario.presets)
    pick(page, scenario.presets)
    page.fill("#text textarea", text)
    page.fill("#max-audio-s input", f"{scenario.max_audio_s or default_cap_s:g}")
    page.fill("#runs input", str(WARM_RUNS))
    page.fill("#jitter-ms input", "60")
    page.locator("#jitter-ms input").blur()


def click_compare(page) -> str:
    """Compare, then the page's last word ("done: ..." or a failure)."""
    page.click("#compare-btn")
    page.wait_for_selector("#overall:has-text('running'), #overall:has-text('waiting')", timeout=60_000)
    page.wait_for_selector("#overall:has-text('done:'), #overall:has-text('stopped'), #overall:has-text('not run')",
                           timeout=COMPARE_TIMEOUT_S * 1000)
    return page.inner_text("#overall").strip()


def wait_clips_played(page, slots: int, timeout_s: float) -> bool:
    """Until every used slot's clip has finished playing (so compares never overlap); False on a timeout."""
    try:
        page.wait_for_function(f"() => [...Array({slots}).keys()].every(i => {{ const s = window.labAudio.state(i);"
                               f" return s.run_id === null || s.state === 'done'; }})", timeout=timeout_s * 1000)
        return True
    except Exception:   # playwright's TimeoutError: say so in the results, go on
        return False


def slot_states(page, slots: int) -> list[dict]:
    return page.evaluate(f"() => [...Array({slots}).keys()].map(i => {{ const s = window.labAudio.state(i); "
                         f"return {{run_id: s.run_id, state: s.state, transport: s.transport, "
                         f"position_s: s.position_s, underruns: s.underruns, complete: s.complete}}; }})")


def run_compares(browser, url: str, history_path: str, compares: int, log) -> tuple[list[dict], str, float]:
    """Every (scenario, transport) `compares` times, interleaved; returns one entry per compare, and the page's
    default text and cap."""
    page = open_page(browser, url)
    text = page.input_value("#text textarea")
    default_cap_s = float(page.input_value("#max-audio-s input"))
    done = []
    for round_no in range(compares):
        for scenario in SCENARIOS:
            for transport in TRANSPORTS:
                wait_connected(page)
                configure(page, transport, scenario, text, default_cap_s)
                start_s = time.time()
                overall = click_compare(page)
                cap_s = scenario.max_audio_s or default_cap_s
                played = wait_clips_played(page, len(scenario.presets), cap_s + PLAYED_SLACK_S)
                end_s = time.time()
                entry = {"round": round_no, "scenario": scenario.key, "transport": transport, "start_s": start_s,
                         "end_s": end_s, "wall_s": end_s - start_s, "overall": overall, "played_to_end": played,
                         "slots": slot_states(page, len(scenario.presets))}
                entry["records"] = [r for r in history.read(history_path) if start_s <= r.get("time", 0) <= end_s]
                done.append(entry)
                log(f"round {round_no + 1}/{compares} {scenario.key:13s} {transport:6s} {entry['wall_s']:5.1f} s  "
                    f"{overall[:60]}{'' if played else '  (clip did not finish playing in time)'}")
    page_errors = list(page.errors)
    page.close()
    if page_errors:
        log(f"page errors: {page_errors[:5]}")
    return done, text, default_cap_s


# -- the CLI -----------------------------------------------------------------------------------------------------
def cli_calls(default_cap_s: float) -> list[tuple[tuple[str, ...], float]]:
    """(presets, cap) per CLI call: each preset with the cap its page compares used, so both sides make the same
    request (hibari's default text is 7 s of audio: a 6 s cap would cut its last sentence in the CLI only)."""
    return [(s.presets, s.max_audio_s or default_cap_s) for s in SCENARIOS]


def run_cli(text: str, default_cap_s: float, tmp: str, log) -> dict:
    calls = [run_cli_call(presets, cap_s, text, os.path.join(tmp, f"cli-{i}"), log)
             for i, (presets, cap_s) in enumerate(cli_calls(default_cap_s))]
    return {"commands": [c["command"] for c in calls], "exit": [c["exit"] for c in calls],
            "wall_s": sum(c["wall_s"] for c in calls), "runs": [r for c in calls for r in c["runs"]],
            "errors": {k: v for c in calls for k, v in c["errors"].items()},
            "builds": {k: v for c in calls for k, v in c["builds"].items()}}


def run_cli_call(presets: tuple[str, ...], cap_s: float, text: str, out: str, log) -> dict:
    cmd = [sys.executable, "-m", "lab.bench", "--presets", *presets, "--weights", "random", "--runs",
           str(CLI_RUNS), "--text", text, "--max-seconds", f"{cap_s:g}", "--out", out, "--history", ""]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    started_s = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall_s = time.time() - started_s
    log(f"CLI {' '.join(presets)} (cap {cap_s:g} s): {wall_s:.0f} s, exit {proc.returncode}")
    if proc.returncode != 0:
        log(proc.stderr[-2000:])
    path = os.path.join(out, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"runs": [], "errors": {"cli": proc.stderr[-500:]}}
    shown = ["python", "-m", "lab.bench", *cmd[3:]]
    return {"command": " ".join(f"'{a}'" if " " in a else a for a in shown), "exit": proc.returncode,
            "wall_s": wall_s, "runs": results["runs"], "errors": results.get("errors", {}),
            "builds": results.get("builds", {})}


# -- figures -----------------------------------------------------------------------------------------------------
def heard_floor_ms(r: dict) -> float | None:
    """The earliest any player could play the first audible sample: its chunk must be ready, and the stream's
    leading silence before it must be played first."""
    if r.get("first_audible_ms") is None or r.get("first_audible_s") is None:
        return None
    return max(r["first_audible_ms"], r["ttfb_ms"] + 1000 * r["first_audible_s"])


def minus(a, b):
    return None if a is None or b is None else a - b


def heard_row(r: dict, compare: dict) -> dict:
    floor = heard_floor_ms(r)
    row = {"scenario": compare["scenario"], "transport": compare["transport"], "round": compare["round"],
           "preset": r["preset"], "weights": r.get("weights"), "run": r.get("run"), "cold": r.get("cold"),
           "reported_transport": r.get("transport"), "browser_complete": r.get("browser_complete"),
           "heard_floor_ms": floor, "transport_share_ms": minus(r.get("heard_ttfb_ms"), floor),
           "heard_over_ttfb_ms": minus(r.get("heard_ttfb_ms"), r.get("ttfb_ms")),
           "delivery_ms": minus(r.get("received_ms"), r.get("ttfb_ms")),
           "report_missing": r.get("heard_ttfb_ms") is None}
    for key in HEARD_KEYS:
        row.setdefault(key, r.get(key))
    return row


def server_row(r: dict, compare: dict | None, source: str) -> dict:
    return {"source": source, "transport": compare["transport"] if compare else None,
            "scenario": compare["scenario"] if compare else None, "preset": r["preset"], "run": r.get("run"),
            "cold": r.get("cold"), "heard": r.get("heard", False), **{k: r.get(k) for k in SERVER_KEYS}}


def spread(values: list) -> dict:
    """lab.metrics.summarize: median, and min–max (p10–p90 from 10 values on)."""
    s = summarize([v for v in values if v is not None])
    return {"median": s["median"], "lo": s["lo"], "hi": s["hi"], "n": s["n"],
            "spread": "p10–p90" if s["n"] >= 10 else "min–max"}


def groups(rows: list[dict], *keys: str) -> dict:
    out: dict = {}
    for r in rows:
        out.setdefault(tuple(r[k] for k in keys), []).append(r)
    return out


def heard_summary(heard: list[dict]) -> list[dict]:
    table = []
    for (transport, preset), rows in groups(heard, "transport", "preset").items():
        table.append({"transport": transport, "preset": preset, "weights": rows[0]["weights"],
                      "heard_runs": len(rows), "reports_missing": sum(r["report_missing"] for r in rows),
                      **{k: spread([r[k] for r in rows]) for k in HEARD_KEYS}})
    return sorted(table, key=lambda t: (TRANSPORTS.index(t["transport"]), t["preset"]))


def page_vs_cli(page_runs: list[dict], cli_runs: list[dict]) -> list[dict]:
    """Per preset: the PCM compares' warm runs (every warm run, heard or not) against the CLI's warm runs."""
    table = []
    for preset in CLI_PRESETS:
        page = [r for r in page_runs if r["preset"] == preset and not r["cold"]]
        cli = [r for r in cli_runs if r["preset"] == preset and not r.get("cold") and not r.get("cancelled")]
        row = {"preset": preset}
        for key in ("ttfb_ms", "rtf", "audio_s"):
            p, c = spread([r[key] for r in page]), spread([r.get(key) for r in cli])
            row[f"page_{key}"], row[f"cli_{key}"] = p, c
            row[f"{key}_diff"] = minus(p["median"], c["median"])
            row[f"{key}_within_spread"] = overlap(p, c)
        table.append(row)
    return table


def overlap(a: dict, b: dict) -> bool | None:
    """The two spreads overlap: the difference of medians is no larger than the run-to-run spread."""
    if a["lo"] is None or b["lo"] is None:
        return None
    return a["lo"] <= b["hi"] and b["lo"] <= a["hi"]


def goals(heard: list[dict]) -> list[dict]:
    """The page's goals, per transport and preset, evaluated as written."""
    out = []
    for (transport, preset), rows in groups(heard, "transport", "preset").items():
        share = spread([r["transport_share_ms"] for r in rows])["median"]
        over_ttfb = spread([r["heard_over_ttfb_ms"] for r in rows])["median"]
        fast = [r for r in rows if r["rtf"] is not None and r["rtf"] < GOAL_RTF_FOR_NO_STALLS]
        reported = [r for r in fast if r["browser_underruns"] is not None]
        stalls = sum(r["browser_underruns"] for r in reported)
        out.append({
            "transport": transport, "preset": preset, "heard_runs": len(rows),
            "reports_missing": sum(r["report_missing"] for r in rows),
            "heard_vs_floor": {"median_ms": share, "limit_ms": GOAL_HEARD_OVER_MODEL_MS,
                               "met": None if share is None else share <= GOAL_HEARD_OVER_MODEL_MS},
            "heard_vs_ttfb_literal": {"median_ms": over_ttfb, "limit_ms": GOAL_HEARD_OVER_MODEL_MS,
                                      "met": None if over_ttfb is None else over_ttfb <= GOAL_HEARD_OVER_MODEL_MS},
            "no_stalls_below_rtf": {"rtf_limit": GOAL_RTF_FOR_NO_STALLS, "runs_below": len(fast),
                                    "runs_reported": len(reported), "stalls": stalls,
                                    "met": None if not reported else stalls == 0},
        })
    return sorted(out, key=lambda g: (TRANSPORTS.index(g["transport"]), g["preset"]))


# -- charts ------------------------------------------------------------------------------------------------------
WATERFALL = (("ttfb_ms", "model TTFB", "#4c72b0"), ("first_audible_ms", "first audible (model)", "#55a868"),
             ("sent_ms", "sent (server, PCM)", "#8172b3"), ("received_ms", "received (browser)", "#dd8452"),
             ("heard_ttfb_ms", "heard (browser)", "#c44e52"))


def preset_label(preset: str, weights: str | None) -> str:
    return f"{preset} ({RANDOM_NOTE})" if weights == "random" and preset.startswith("pocket") else preset


def chart_title(env: dict, what: str) -> str:
    return f"{what}\n{title_line(env)}"


def waterfall_chart(summary: list[dict], env: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(s["preset"] for s in summary))
    fig, axes = plt.subplots(len(presets), len(TRANSPORTS), figsize=(13, 2.3 * len(presets) + 1.2), squeeze=False,
                             sharex="row")
    for i, preset in enumerate(presets):
        for j, transport in enumerate(TRANSPORTS):
            ax = axes[i][j]
            row = next((s for s in summary if s["preset"] == preset and s["transport"] == transport), None)
            ax.set_title(f"{preset_label(preset, row and row['weights'])} · {transport}", fontsize=9)
            if row is None:
                ax.text(0.5, 0.5, "no runs", ha="center", transform=ax.transAxes)
                continue
            waterfall_bars(ax, row)
    for ax in axes[-1]:
        ax.set_xlabel("ms from the server's request stamp (median; whiskers: spread)", fontsize=8)
    fig.suptitle(chart_title(env, "Heard run, stage by stage: model → browser → speaker"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def waterfall_bars(ax, row: dict) -> None:
    for y, (key, name, colour) in enumerate(WATERFALL):
        s = row[key]
        if s["median"] is None:
            why = "not on Gradio's path (HLS)" if key == "sent_ms" and row["transport"] == "gradio" else \
                f"missing ({row['reports_missing']} of {row['heard_runs']} reports)"
            ax.text(0, y, f"  {name}: {why}", va="center", fontsize=7, color="#c44e52")
            continue
        ax.barh(y, s["median"], color=colour, xerr=[[s["median"] - s["lo"]], [s["hi"] - s["median"]]], capsize=3)
        ax.text(s["hi"], y, f"  {s['median']:.0f}", va="center", fontsize=7)
    floor = row["heard_floor_ms"]["median"]
    if floor is not None:
        ax.axvline(floor, color="grey", linestyle="--", linewidth=1, label="heard floor (median)")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_yticks(range(len(WATERFALL)), [w[1] for w in WATERFALL], fontsize=8)
    ax.invert_yaxis()


def stalls_chart(summary: list[dict], env: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = list(dict.fromkeys(s["preset"] for s in summary))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(TRANSPORTS)
    for ax, key, name in ((axes[0], "browser_underruns", "player stalls (browser underruns) per heard run"),
                          (axes[1], "browser_gap_s", "player stall time s per heard run")):
        for j, transport in enumerate(TRANSPORTS):
            xs, med, err = [], [], [[], []]
            for i, preset in enumerate(presets):
                row = next((s for s in summary if s["preset"] == preset and s["transport"] == transport), None)
                s = row[key] if row else {"median": None}
                if s["median"] is None:
                    continue
                xs.append(i + (j - (len(TRANSPORTS) - 1) / 2) * width)
                med.append(s["median"])
                err[0].append(s["median"] - s["lo"])
                err[1].append(s["hi"] - s["median"])
            ax.bar(xs, med, width, yerr=err, capsize=3, label=transport)
        weights = {s["preset"]: s["weights"] for s in summary}
        ax.set_xticks(range(len(presets)), [preset_label(p, weights[p]).replace(" (", "\n(") for p in presets],
                      fontsize=8)
        ax.set_ylabel(name + " (median; whiskers: spread)", fontsize=8)
        ax.legend(fontsize=8)
    fig.suptitle(chart_title(env, "Player stalls per transport"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- text --------------------------------------------------------------------------------------------------------
def cell(s: dict, digits: int = 0) -> str:
    if s["median"] is None:
        return "missing"
    return f"{s['median']:.{digits}f} ({s['lo']:.{digits}f}–{s['hi']:.{digits}f})"


def text_table(header: list[str], lines: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *lines])


def print_tables(results: dict) -> None:
    print(f"\n{title_line(results['env'])}\nmedian (spread) over heard runs, ms unless named\n")
    head = ["transport", "preset", "n", "miss", "model TTFB", "first aud.", "heard floor", "received", "heard",
            "transport share", "heard-TTFB", "delivery", "stalls", "gap s", "RTF"]
    lines = [[s["transport"], s["preset"], s["heard_runs"], s["reports_missing"], cell(s["ttfb_ms"]),
              cell(s["first_audible_ms"]), cell(s["heard_floor_ms"]), cell(s["received_ms"]),
              cell(s["heard_ttfb_ms"]), cell(s["transport_share_ms"]), cell(s["heard_over_ttfb_ms"]),
              cell(s["delivery_ms"]), cell(s["browser_underruns"]), cell(s["browser_gap_s"], 2), cell(s["rtf"], 3)]
             for s in results["summary"]]
    print(text_table(head, lines))
    if results["page_vs_cli"]:
        print_page_vs_cli(results["page_vs_cli"])
    print_goals(results["goals"])
    missing = sum(s["reports_missing"] for s in results["summary"])
    if missing:
        print(f"\n{missing} heard run(s) have no browser report (heard_ttfb_ms missing): left out, not filled in")
    per = groups(results["compares"], "scenario", "transport")
    print("\nwall time per compare (s, median): " + "; ".join(
        f"{k[0]}/{k[1]} {statistics.median(c['wall_s'] for c in v):.1f}" for k, v in per.items()))


def print_page_vs_cli(table: list[dict]) -> None:
    print("\npage (PCM compares, all warm runs) against the CLI (warm runs); within = the spreads overlap\n")
    head = ["preset", "page TTFB ms", "CLI TTFB ms", "within", "page RTF", "CLI RTF", "within", "page audio s",
            "CLI audio s"]
    lines = [[r["preset"], cell(r["page_ttfb_ms"]), cell(r["cli_ttfb_ms"]), r["ttfb_ms_within_spread"],
              cell(r["page_rtf"], 3), cell(r["cli_rtf"], 3), r["rtf_within_spread"], cell(r["page_audio_s"], 2),
              cell(r["cli_audio_s"], 2)] for r in table]
    print(text_table(head, lines))


def print_goals(goal_rows: list[dict]) -> None:
    print(f"\ngoals: heard ≤ +{GOAL_HEARD_OVER_MODEL_MS:.0f} ms (median; against the heard floor, and literally "
          f"against model TTFB); no player stalls while RTF < {GOAL_RTF_FOR_NO_STALLS}\n")
    head = ["transport", "preset", "heard-floor ms", "met", "heard-TTFB ms", "met", "stalls (runs RTF<0.8)", "met"]
    fmt = lambda v: "-" if v is None else f"{v:.0f}"   # noqa: E731
    lines = [[g["transport"], g["preset"], fmt(g["heard_vs_floor"]["median_ms"]), g["heard_vs_floor"]["met"],
              fmt(g["heard_vs_ttfb_literal"]["median_ms"]), g["heard_vs_ttfb_literal"]["met"],
              f"{g['no_stalls_below_rtf']['stalls']} ({g['no_stalls_below_rtf']['runs_reported']})",
              g["no_stalls_below_rtf"]["met"]] for g in goal_rows]
    print(text_table(head, lines))


# -- main --------------------------------------------------------------------------------------------------------
METHOD = f"""\
`python app.py` (FastAPI + Gradio, PCM WebSocket at /lab/pcm) on a loopback port, history in a temporary JSONL,
HF_HUB_OFFLINE=1; headless Debian Chromium through Playwright (autoplay allowed, no GPU). Each compare is a real
click on the page: scenario first-click = hibari + hibari-whole, the page's default text and cap; scenario
pocket-random = pocket-tts-cpu with "random weights" ticked (real size, random weights: latency only, the audio is
noise), cap {SCENARIOS[1].max_audio_s:g} s. {WARM_RUNS} warm runs per preset after a cold run (the cold run only on
a preset's first build; later compares reuse the built variant, so all their runs are warm). The first warm run of
each preset is the heard one. The four (scenario, transport) pairs are interleaved compare by compare; before the
next compare the script waits until the last clip finished playing. Figures come from the run records the
server wrote: model side ttfb_ms, first_audible_ms, first_audible_s, rtf, steady_rtf, underruns; browser side
received_ms, heard_ttfb_ms, browser_underruns, browser_gap_s (PCM: Web Audio schedule, 60 ms jitter buffer;
gradio: Gradio's <audio>, heard at its first 'playing' event, received at the first HLS segment's Resource Timing
entry). heard floor = max(first_audible_ms, ttfb_ms + 1000 * first_audible_s): the earliest any player could play
the first audible sample. transport share = heard_ttfb_ms - heard floor; delivery = received_ms - ttfb_ms. A heard
run without a browser report is counted as missing, never filled in. Spreads: min-max (p10-p90 from 10 values).
After the page, the server and browser are stopped and the CLI runs on the same machine:
python -m lab.bench --weights random --runs {CLI_RUNS} --text <the page's default text>, once per scenario with that
scenario's presets and cap (hibari + hibari-whole with the page's default cap, pocket-tts-cpu with
{SCENARIOS[1].max_audio_s:g} s), so that page and CLI make the same request: the default text is about 7 s of
hibari audio, and a 6 s cap would cut it in the CLI only. hibari keeps its own voice under --weights random. Page against CLI: the
PCM compares' warm runs (heard or not) against the CLI's warm runs; "within spread" = the two spreads overlap.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--compares", type=int, default=5, help="compares per (scenario, transport) (default 5)")
    p.add_argument("--out", help="results folder (default benchmarks/browser/<commit>/)")
    p.add_argument("--skip-cli", action="store_true", help="no CLI run (a trial of the page alone)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the server's history and log folder")
    args = p.parse_args(argv)
    env = machine_facts()
    out = args.out or os.path.join(ROOT, "benchmarks", "browser", env["commit"])
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="lab-browser-bench-")
    started_s = time.time()

    def log(line: str) -> None:
        print(f"[{time.time() - started_s:6.0f} s] {line}", flush=True)

    log(f"{title_line(env)}; load average {env['loadavg_at_start']}; temporary files in {tmp}")
    compares, text, default_cap_s = page_phase(args.compares, tmp, log)
    cli = None if args.skip_cli else run_cli(text, default_cap_s, tmp, log)
    env["loadavg_at_end"] = os.getloadavg()
    results = assemble(env, compares, cli, text, time.time() - started_s)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    waterfall_chart(results["summary"], env, os.path.join(out, "waterfall.png"))
    stalls_chart(results["summary"], env, os.path.join(out, "stalls.png"))
    print_tables(results)
    log(f"wrote {out}/results.json, waterfall.png, stalls.png")
    if not args.keep_tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def page_phase(compares: int, tmp: str, log) -> tuple[list[dict], str, float]:
    from playwright.sync_api import sync_playwright

    app = AppProcess(tmp)     # the real presets/
    log(f"app.py serves {app.url}")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                return run_compares(browser, app.url, app.history, compares, log)
            finally:
                browser.close()
    except Exception:
        log(f"failed; the server's log ends:\n{open(app.log_path).read()[-3000:]}")
        raise
    finally:
        app.stop()


def assemble(env: dict, compares: list[dict], cli: dict | None, text: str, wall_s: float) -> dict:
    heard, server_runs = [], []
    for c in compares:
        for r in c["records"]:
            if r.get("cancelled") or r.get("source") != "app":
                continue
            server_runs.append(server_row(r, c, "page"))
            if r.get("heard"):
                heard.append(heard_row(r, c))
    cli_runs = [server_row(r, None, "cli") for r in (cli or {}).get("runs", []) if not r.get("cancelled")]
    pcm_runs = [r for r in server_runs if r["transport"] == "pcm"]
    summary = heard_summary(heard)
    return {
        "env": env, "method": METHOD, "text": text, "wall_s": wall_s,
        "compares": [{k: v for k, v in c.items() if k != "records"} for c in compares],
        "heard_runs": heard, "server_runs": server_runs + cli_runs, "summary": summary,
        "page_vs_cli": page_vs_cli(pcm_runs, cli_runs) if cli else None,
        "cli": {k: v for k, v in cli.items() if k != "runs"} if cli else None,
        "goals": goals(heard),
        "missing_reports": [{k: h[k] for k in ("transport", "preset", "round")} for h in heard if h["report_missing"]],
    }


if __name__ == "__main__":
    sys.exit(main())
