"""Every figure declared once, and the tables, lines, CSV, charts and result files made from that declaration.

A figure is computed in lab.measure.metrics (or the browser, for the heard figures) and declared here, once: its key in
a run record, its label with its unit, its digits, and how a preset's warm runs summarize it. The CLI's table and
CSV, the page's tables, the live line and the history view are all generated from these declarations, so a new
figure is added in two places: where it is computed, and one line below.
"""
from __future__ import annotations

import csv
import io
import json
import os
import textwrap
from dataclasses import dataclass

from lab.measure import quality
from lab.measure.metrics import PHASES, summarize

WEIGHTS_NOTE = {"random": "random weights: latency only, audio is noise",
                "tiny": "tiny test weights: not a real-size figure, audio is noise"}


@dataclass(frozen=True)
class Figure:
    key: str                 # in a run record (or a build report)
    name: str                # what a person reads
    unit: str = ""           # "ms", "s", "MiB", or "" for a ratio or a count
    digits: int | None = 1   # decimals (significant digits when `significant`); None: text, shown as it is
    significant: bool = False
    scale: float = 1.0       # shown value = record value × scale (bytes -> MiB)
    spread: bool = False     # the summary shows the warm runs' spread next to their median
    tails: bool = False      # the summary shows p90 and p99 of the warm runs
    cold: bool = False       # the summary shows the cold run's value apart
    live: bool = False       # on the line that updates while a run streams
    quality: bool = False    # the guardrail's (quality.py), filled in after the run: "n/a" for noise, never a number

    @property
    def label(self) -> str:
        return f"{self.name} {self.unit}".strip()

    def value(self, v):
        """The number as a table shows it (rounded, scaled), or None."""
        if v is None or self.digits is None:
            return v
        v = v * self.scale
        return float(f"{v:.{self.digits}g}") if self.significant else round(v, self.digits)

    def text(self, v) -> str:
        if v is None:
            return "-"
        if self.digits is None:
            return str(v)
        v = v * self.scale
        return f"{v:.{self.digits}g}" if self.significant else f"{v:.{self.digits}f}"


# One run's figures, in the order tables show them.
RUN_FIGURES = (
    Figure("ttfb_ms", "TTFB", "ms", 1, spread=True, tails=True, cold=True, live=True),
    Figure("first_audible_ms", "first audible", "ms", 1, spread=True),
    Figure("rtf", "RTF", "", 3, significant=True, spread=True, live=True),
    Figure("steady_rtf", "steady RTF", "", 3, significant=True),
    # The quality guardrail's (lab.measure.quality), real speech only, scored after the run off the timed path.
    Figure("wer", "WER", "%", 1, scale=100, spread=True, quality=True),
    Figure("cer", "CER", "%", 1, scale=100, quality=True),
    Figure("mos", "MOS est.", "", 2, spread=True, quality=True),
    Figure("first_speech_ms", "first speech", "ms", 1, spread=True, quality=True),
    Figure("leading_silence_s", "leading silence", "s", 2, quality=True),
    Figure("trailing_silence_s", "trailing silence", "s", 2, quality=True),
    Figure("audio_s", "audio", "s", 2, live=True),
    Figure("underruns", "underruns", "", 0, live=True),
    Figure("stall_s", "stall", "s", 3),
    Figure("peak_mem_bytes", "peak", "MiB", 0, scale=2 ** -20),
    Figure("threads", "CPU threads", "", 0),   # the kernels' threads (torch intra-op, or ONNX Runtime's)
    # Measured in the browser, for the run a listener hears (its first warm run, `RunStarted.heard`); the others have none.
    Figure("sent_ms", "sent", "ms", 1),
    Figure("received_ms", "received", "ms", 1),
    Figure("heard_ttfb_ms", "heard TTFB", "ms", 1, spread=True),
    # From the person's click (docs/METRICS.md, "From the click"): what a listener feels.
    Figure("click_to_request_ms", "click → request", "ms", 1, spread=True),
    Figure("click_to_received_ms", "click → received", "ms", 1),
    Figure("click_to_heard_ms", "click → heard", "ms", 1, spread=True, tails=True),
    Figure("browser_underruns", "browser stalls", "", 0),
    Figure("browser_gap_s", "browser gap", "s", 3),
)
# One build's figures (BuildReport.to_dict(): the one build-row schema of the CLI, the page and the GPU scripts).
BUILD_FIGURES = (
    Figure("load_s", "load", "s", 2),
    Figure("warmup_s", "warm-up / compile", "s", 2),
    Figure("memory_bytes", "memory", "MiB", 1, scale=2 ** -20),
    Figure("peak_mem_bytes", "build peak", "MiB", 0, scale=2 ** -20),
    Figure("params", "params", "M", 2, scale=1e-6),
    Figure("tokenizer", "tokenizer", digits=None),
)
FIGURES = {f.key: f for f in RUN_FIGURES}
# A served request's figures, measured at the client by the load bench (lab.loadbench; docs/METRICS.md, "A speech
# server under load"), each from the request's arrival; a level summarizes them (median, p95, p99) over its requests.
LOAD_FIGURES = (
    Figure("ttfb_ms", "TTFB (client: first audio byte)", "ms", 1, tails=True),
    Figure("audible_ttfa_ms", "audible TTFA", "ms", 1, tails=True),
    Figure("rtf", "RTF (client)", "", 3, significant=True),
    Figure("steady_rtf", "steady RTF (client)", "", 3, significant=True, tails=True),
    Figure("max_gap_ms", "worst playback gap", "ms", 1, tails=True),
    Figure("send_lag_ms", "send lag (client behind its schedule)", "ms", 2, tails=True),
)
# A level's own figures: continuity, goodput and the client's CPU.
LEVEL_FIGURES = (
    Figure("c50", "C50", "%", 1, scale=100),
    Figure("c100", "C100", "%", 1, scale=100),
    Figure("c200", "C200", "%", 1, scale=100),
    Figure("goodput_audio_s_per_s", "goodput", "audio s/s", 1),
    Figure("cpu_util_max", "client CPU (busiest process)", "%", 0, scale=100),
)


def label(preset: str, weights: str) -> str:
    return f"{preset}\n[{weights} weights]" if weights != "pretrained" else preset


def kind(record: dict) -> str:
    return "cancelled" if record.get("cancelled") else "cold" if record.get("cold") else "warm"


# -- a preset's warm runs, summarized --------------------------------------------------------------------------
def summary_rows(runs: list[dict]) -> list[dict]:
    """One row per preset, in first-seen order: each figure's summary over warm runs (`summarize`), the cold run's
    figures apart, and the phases of the median-TTFB run (the lower middle one for an even count), so the stacked
    phases add up to a measured TTFB."""
    rows = []
    badges = {p["preset"]: p["badge"] for p in quality.parity(runs)}
    for preset in dict.fromkeys(r["preset"] for r in runs):
        mine = [r for r in runs if r["preset"] == preset and not r.get("cancelled")]
        if not mine:
            continue
        warm = [r for r in mine if not r["cold"]]
        cold = next((r for r in mine if r["cold"]), None)
        ranked = sorted(warm or mine, key=lambda r: r["ttfb_ms"])
        rows.append({
            "preset": preset, "weights": mine[0]["weights"], "warm_runs": len(warm),
            "texts": sorted({r.get("text", "") for r in mine}),
            "warm": {f.key: summarize([r.get(f.key) for r in warm]) for f in RUN_FIGURES},
            "cold": {f.key: cold.get(f.key) for f in RUN_FIGURES} if cold else None,
            "phases_ms": ranked[(len(ranked) - 1) // 2]["phases_ms"],
            "peak_mem_bytes": max(r["peak_mem_bytes"] for r in mine),
            "quality": quality.verdict(mine, badges.get(preset, "")),   # None: not scored (the CLI without --quality)
        })
    return rows


def median(row: dict, key: str):
    return row["warm"][key]["median"]


def summary_table(rows: list[dict], compact: bool = False) -> list[dict]:
    """The per-preset table: warm median of each figure, the spread, tails and cold value where declared.
    `compact` (the CLI's text table) puts the spread in the median's cell: "29.0 (18.8–39.1)"."""
    out = []
    for row in rows:
        line = {"preset": row["preset"], "weights": row["weights"] + (" (audio is noise)" if row["weights"] in
                                                                      WEIGHTS_NOTE else ""),
                "warm runs": row["warm_runs"]}
        for f in RUN_FIGURES:
            s = row["warm"][f.key]
            spread = "-" if s["lo"] is None else f"{f.text(s['lo'])} – {f.text(s['hi'])}"
            if f.quality and quality.not_applicable(row):
                line[f.label if compact else f"{f.label} (warm median)"] = "n/a"
                continue
            if compact:
                line[f.label] = f.text(s["median"]) + (f" ({spread.replace(' – ', '–')})" if f.spread and
                                                       s["lo"] is not None else "")
            else:
                line[f"{f.label} (warm median)"] = f.value(s["median"])
                if f.spread:
                    line[f"{f.label} spread"] = spread
            if f.tails:
                line[f"{f.name} p90 {f.unit}".strip()] = f.value(s["p90"])
                line[f"{f.name} p99 {f.unit}".strip()] = f.value(s["p99"])
            if f.cold:
                line[f"cold {f.label}"] = f.value(row["cold"][f.key]) if row["cold"] else None
        if row.get("quality"):
            line["quality"] = row["quality"]
        out.append(line)
    return out


def run_table(records: list[dict], extra: tuple[str, ...] = ()) -> list[dict]:
    """One line per run record (cancelled ones say so and have no figures). `extra`: record keys shown first."""
    def cell(f, r):
        return "n/a" if f.quality and quality.not_applicable(r) else f.value(r.get(f.key))

    return [{**{k: r.get(k) for k in extra}, "preset": r["preset"], "weights": r.get("weights"), "run": r.get("run"),
             "cold/warm": kind(r), **{f.label: cell(f, r) for f in RUN_FIGURES},
             **({"quality": r["quality"]} if "quality" in r else {})} for r in records]


def build_table(builds: dict[str, dict]) -> list[dict]:
    return [{"preset": name, **{f.label: f.value(b.get(f.key)) for f in BUILD_FIGURES},
             "notes": "; ".join(b.get("notes") or [])} for name, b in builds.items()]


def live_line(run: int, runs: int, cold: bool, figures: dict) -> str:
    """The figures of a run so far, while it streams (the same lab.measure.metrics.figures as the final ones)."""
    shown = " · ".join(f"{f.name} **{f.text(figures[f.key])}**{(' ' + f.unit) if f.unit else ''}"
                       for f in RUN_FIGURES if f.live)
    return f"run {run + 1}/{runs + 1} ({'cold' if cold else 'warm'}) · {shown} so far"


def result_line(row: dict) -> str:
    """A preset's result under its player: warm medians of the live figures, and its cold TTFB. A preset whose
    warm runs all failed has only its cold run."""
    ttfb = FIGURES["ttfb_ms"]
    if row["warm_runs"]:
        line = " · ".join(f"warm median {f.name} **{f.text(median(row, f.key))}**{(' ' + f.unit) if f.unit else ''}"
                          for f in RUN_FIGURES if f.live and f.key != "audio_s")
    else:
        line = "cold run only"
    if row["cold"]:
        line += f" · cold {ttfb.name} {ttfb.text(row['cold']['ttfb_ms'])} {ttfb.unit}"
    return line


def table(rows: list[dict], builds: dict) -> str:
    """The CLI's table: the summary table's columns as text, then the build's load and warm-up seconds."""
    lines = []
    for row, line in zip(rows, summary_table(rows, compact=True)):
        b = builds.get(row["preset"], {})
        lines.append({**line, **{f.label: f.text(b.get(f.key)) for f in BUILD_FIGURES[:2]}})
    if not lines:
        return "no runs"
    head = list(dict.fromkeys(h for line in lines for h in line))   # presets of other families have other columns
    cells = [head] + [["-" if line.get(h) is None else str(line[h]) for h in head] for line in lines]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in cells]
    notes = sorted({WEIGHTS_NOTE[r["weights"]] for r in rows if r["weights"] in WEIGHTS_NOTE})
    return "\n".join(out + [f"note: {n}" for n in notes])


def to_csv(runs: list[dict]) -> str:
    cols = ["preset", "run", "cold", "weights", *[f.key for f in RUN_FIGURES], *[f"phase_{p}_ms" for p in PHASES],
            "chunks", "quality", "runaway", "transcript"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in runs:
        if not r.get("cancelled"):
            w.writerow({**r, **{f"phase_{p}_ms": r.get("phases_ms", {}).get(p) for p in PHASES}})
    return buf.getvalue()


def environment_title(env: dict) -> str:
    cpu = "" if env.get("cuda") else f" · {env.get('cpu_model')}, {env.get('cpu_count')} cores"
    return (f"{env['device']}{cpu} · torch {env['torch']} · transformers {env.get('transformers')} · "
            f"commit {env['commit']}")


def write_results(out_dir: str, results: dict) -> None:
    """results.json, results.csv and chart.png: what the CLI, a merge and the GPU scripts all write."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w") as f:
        f.write(to_csv(results["runs"]))
    if any(not r.get("cancelled") for r in results["runs"]):
        chart(results["runs"], environment_title(results["env"]), os.path.join(out_dir, "chart.png"))


# -- many streams at once (lab.concurrency) ---------------------------------------------------------------------
def sweep_line(level: dict) -> str:
    return (f"{level['preset']} ({'batched' if level['batches'] else 'one at a time'}), {level['streams']} streams: "
            f"TTFB p50 {level['ttfb_ms']['median']:.0f} p99 {level['ttfb_ms']['p99']:.0f} ms, steady RTF p99 "
            f"{level['steady_rtf']['p99']:.3f}, underruns {level['underruns']}, goodput "
            f"{level['goodput_audio_s_per_s']:.1f} audio s/s" + (f" ({WEIGHTS_NOTE[level['weights']]})"
                                                                 if level["weights"] in WEIGHTS_NOTE else ""))


def sweep_table(levels: list[dict]) -> list[dict]:
    return [{"preset": label(lvl["preset"], lvl["weights"]), "streams": lvl["streams"],
             "TTFB p50 ms": round(lvl["ttfb_ms"]["median"]), "TTFB p99 ms": round(lvl["ttfb_ms"]["p99"]),
             "steady RTF p50": round(lvl["steady_rtf"]["median"], 3), "steady RTF p99": round(lvl["steady_rtf"]["p99"], 3),
             "streams with underruns": lvl["streams_with_underruns"],
             "goodput audio s/s": round(lvl["goodput_audio_s_per_s"], 1)} for lvl in levels]


def sweep_chart(levels: list[dict], title: str = "", path: str | None = None):
    """Goodput against streams (the real-time line for reference), and the per-stream steady RTF p99 and TTFB p99."""
    plt = _pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    n = [lvl["streams"] for lvl in levels]
    ax.plot(n, [lvl["goodput_audio_s_per_s"] for lvl in levels], "o-", label="goodput")
    ax.plot(n, n, ":", color="grey", label="every stream in real time")
    ax.set(xscale="log", yscale="log", xlabel="streams at once", ylabel="audio s per wall s")
    ax.legend(fontsize=8)
    bx.plot(n, [lvl["steady_rtf"]["p99"] for lvl in levels], "o-", label="steady RTF p99")
    bx.axhline(1.0, color="grey", ls="--", lw=1)
    bx.set(xscale="log", xlabel="streams at once", ylabel="steady RTF per stream (p99)")
    tx = bx.twinx()
    tx.plot(n, [lvl["ttfb_ms"]["p99"] for lvl in levels], "s-", color="#c44e52", label="TTFB p99 ms")
    tx.set_ylabel("TTFB p99 from arrival, ms")
    bx.legend(loc="upper left", fontsize=8)
    tx.legend(loc="lower right", fontsize=8)
    notes = sorted({WEIGHTS_NOTE[lvl["weights"]] for lvl in levels if lvl["weights"] in WEIGHTS_NOTE})
    fig.suptitle(_wrapped(fig, [t for t in (title, "; ".join(notes)) if t]), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def load_table(levels: list[dict]) -> list[dict]:
    """One row per load level: the load, each LOAD_FIGURES figure's median and p95, and LEVEL_FIGURES."""
    rows = []
    for lvl in levels:
        row = {"load": f"{lvl['concurrency']} at once" if lvl["mode"] == "closed" else f"{lvl['rate_hz']:g}/s",
               "ok": f"{lvl['ok']}/{lvl['requests']}"}
        for f in LOAD_FIGURES:
            row[f"{f.name} p50 {f.unit}".strip()] = f.value(lvl[f.key]["median"])
            row[f"{f.name} p95 {f.unit}".strip()] = f.value(lvl[f.key]["p95"])
        values = {**lvl["continuity"], "goodput_audio_s_per_s": lvl["goodput_audio_s_per_s"],
                  "cpu_util_max": lvl["client"]["cpu_util_max"]}
        row.update({f.label: f.value(values[f.key]) for f in LEVEL_FIGURES})
        rows.append(row)
    return rows


def load_chart(levels: list[dict], title: str = "", path: str | None = None, slo_ms: float | None = None):
    """Latency against load (TTFB and audible TTFA, p50 and p95, the SLO as a line), and continuity C100 with
    goodput and the busiest client process's CPU, so a client-bound level shows."""
    plt = _pyplot()
    levels = sorted(levels, key=lambda lvl: lvl["concurrency"] or lvl["rate_hz"] or 0)
    closed = levels[0]["mode"] == "closed"
    x = [lvl["concurrency"] if closed else lvl["rate_hz"] for lvl in levels]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for key, name, style in (("ttfb_ms", "TTFB", "o"), ("audible_ttfa_ms", "audible TTFA", "s")):
        for q, dash in (("median", "-"), ("p95", "--")):
            ax.plot(x, [lvl[key][q] for lvl in levels], style + dash, label=f"{name} {'p50' if q == 'median' else q}")
    if slo_ms is not None:
        ax.axhline(slo_ms, color="grey", ls=":", lw=1, label=f"SLO {slo_ms:g} ms")
        for xi, lvl in zip(x, levels):
            ax.annotate("✓" if lvl.get("passed") else "✗", (xi, lvl["audible_ttfa_ms"]["p95"] or 0), fontsize=9)
    xlabel = "concurrent requests (closed loop)" if closed else "arrivals per s (open loop, Poisson)"
    ax.set(xlabel=xlabel, ylabel="ms from arrival", xscale="log" if max(x) / max(min(x), 1e-9) > 8 else "linear")
    ax.legend(fontsize=8)
    bx.plot(x, [100 * (lvl["continuity"]["c100"] or 0) for lvl in levels], "o-", label="C100 %")
    bx.plot(x, [100 * lvl["client"]["cpu_util_max"] for lvl in levels], "^:", color="grey",
            label="client CPU % (busiest process)")
    bx.set(xlabel=xlabel, ylabel="%", ylim=(0, 105), xscale=ax.get_xscale())
    tx = bx.twinx()
    tx.plot(x, [lvl["goodput_audio_s_per_s"] or 0 for lvl in levels], "s-", color="#c44e52", label="goodput")
    tx.set_ylabel("audio s per wall s")
    bx.legend(loc="lower left", fontsize=8)
    tx.legend(loc="lower right", fontsize=8)
    fig.suptitle(_wrapped(fig, [title]), fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


# -- charts ----------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _bars(ax, rows, key, colour):
    """Warm median bars with the spread as error bars, the cold run as a hollow marker."""
    f = FIGURES[key]
    x = list(range(len(rows)))
    med = [(median(r, key) or 0) * f.scale for r in rows]
    # `is None`, not `or`: a spread that reaches 0 (no underruns) is a real bar end, not a missing one.
    lo = [m if r["warm"][key]["lo"] is None else r["warm"][key]["lo"] * f.scale for m, r in zip(med, rows)]
    hi = [m if r["warm"][key]["hi"] is None else r["warm"][key]["hi"] * f.scale for m, r in zip(med, rows)]
    ax.bar(x, med, yerr=[[m - v for m, v in zip(med, lo)], [v - m for m, v in zip(med, hi)]], capsize=4,
           color=colour, label="warm median (spread)")
    cold = [(i, r["cold"][key] * f.scale) for i, r in zip(x, rows) if r["cold"] and r["cold"][key] is not None]
    if cold:
        ax.scatter([c[0] for c in cold], [c[1] for c in cold], facecolors="none", edgecolors="#c44e52",
                   label="cold (first run after build)", zorder=3)
    ax.set_ylabel(f.label, fontsize=8)
    if max(hi + med, default=0) <= 0:   # all zeros (no underruns): autoscale would centre them on a negative axis
        ax.set_ylim(0, 1)
    ax.set_xticks(x, [label(r["preset"], r["weights"]) for r in rows], rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7)


def _wrapped(fig, lines: list[str], points: float = 9) -> str:
    """Title lines folded to the figure's width: a long environment line ran off both edges of a narrow chart.
    A character of the default sans font averages about 0.55 of its size in width."""
    chars = max(20, int(fig.get_figwidth() * 72 / (0.55 * points)))
    return "\n".join(textwrap.fill(line, chars) for line in lines)


def _title(fig, rows, title):
    notes = sorted({WEIGHTS_NOTE[r["weights"]] for r in rows if r["weights"] in WEIGHTS_NOTE})
    texts = {t for r in rows for t in r["texts"]}
    if len(texts) > 1:
        notes.append(f"{len(texts)} different texts: figures of different texts are not comparable")
    fig.suptitle(_wrapped(fig, [title] * bool(title) + ["; ".join(notes)] * bool(notes)), fontsize=9)
    fig.tight_layout()


def close(fig) -> None:
    _pyplot().close(fig)


def _save(fig, path):
    if path:
        fig.savefig(path, dpi=110)
        _pyplot().close(fig)
    return fig


def chart(runs: list[dict], title: str, path: str | None = None):
    """TTFB and RTF per preset (warm median, bars for spread, cold as a hollow marker), and TTFB's phases."""
    plt = _pyplot()
    rows = summary_rows(runs)
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 3.3 * len(rows)), 4.8))
    _bars(axes[0], rows, "ttfb_ms", "#4c72b0")
    _bars(axes[1], rows, "rtf", "#4c72b0")
    axes[1].axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes[1].set_ylabel("RTF (below 1 is faster than real time)", fontsize=8)
    x, bottom = list(range(len(rows))), [0.0] * len(rows)
    for phase in PHASES:
        vals = [r["phases_ms"].get(phase) or 0 for r in rows]
        axes[2].bar(x, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[2].set_ylabel("TTFB phases ms (the median-TTFB warm run)", fontsize=8)
    axes[2].set_xticks(x, [label(r["preset"], r["weights"]) for r in rows], rotation=30, ha="right", fontsize=8)
    axes[2].legend(fontsize=7)
    _title(fig, rows, title)
    return _save(fig, path)


def stall_chart(runs: list[dict], title: str = "", path: str | None = None):
    """Underruns and stall seconds per preset: what a listener hears as gaps."""
    rows = summary_rows(runs)
    fig, axes = _pyplot().subplots(1, 2, figsize=(max(8, 3.2 * len(rows)), 3.6))
    _bars(axes[0], rows, "underruns", "#dd8452")
    _bars(axes[1], rows, "stall_s", "#dd8452")
    _title(fig, rows, title)
    return _save(fig, path)


# The heard run of each preset, stage by stage: what the page's waterfall shows. From the click where the run has
# one (the model's stamps shifted by click -> request; received and heard on the page's own clock), else from the
# run's request.
HEARD_STAGES = (("click → request", "click_to_request_ms", None), ("model TTFB", "ttfb_ms", "click_to_request_ms"),
                ("first audible ready", "first_audible_ms", "click_to_request_ms"),
                ("sent", "sent_ms", "click_to_request_ms"), ("received", "received_ms", "click_to_received_ms"),
                ("heard", "heard_ttfb_ms", "click_to_heard_ms"))


def _stages(record: dict) -> list[float | None]:
    """One heard run's stage times in ms, from its click when it has one, else from its request."""
    click = record.get("click_to_request_ms")
    out = []
    for _, from_request, from_click in HEARD_STAGES:
        if click is None:
            out.append(record.get(from_request) if from_click is not None else None)
        elif from_click is None or from_click == "click_to_request_ms":
            value = record.get(from_request)
            out.append(None if value is None else value + (click if from_click else 0.0))
        else:
            out.append(record.get(from_click))
    return out


def heard_chart(runs: list[dict], title: str = "", path: str | None = None):
    """For each preset, its heard runs stage by stage (median, spread as whiskers): from the click, the request,
    the model's first chunk, the first audible sample ready, sent on the socket, received in the browser, heard.
    None when no heard run has a browser report."""
    heard = [r for r in runs if r.get("heard_ttfb_ms") is not None]
    if not heard:
        return None
    presets = list(dict.fromkeys(r["preset"] for r in heard))
    from_click = all(r.get("click_to_request_ms") is not None for r in heard)
    # One panel a preset, each on its own scale: a later preset's click times hold the earlier ones' playback.
    fig, axes = _pyplot().subplots(len(presets), 1, figsize=(10, 0.6 + 1.6 * len(presets)), squeeze=False)
    colours = ("#937860", "#4c72b0", "#55a868", "#8172b3", "#dd8452", "#c44e52")
    for ax, preset in zip(axes[:, 0], presets):
        per_run = [_stages(r) for r in heard if r["preset"] == preset]
        for j, ((name, _, _), colour) in enumerate(zip(HEARD_STAGES, colours)):
            s = summarize([stages[j] for stages in per_run])
            if s["median"] is not None:
                ax.barh(j, s["median"], color=colour, xerr=[[s["median"] - s["lo"]], [s["hi"] - s["median"]]],
                        capsize=2)
                ax.text(s["hi"], j, f" {s['median']:.0f}", va="center", fontsize=7)
        ax.set_yticks(range(len(HEARD_STAGES)), [f"{preset}: {HEARD_STAGES[0][0]}"] +
                      [name for name, _, _ in HEARD_STAGES[1:]], fontsize=7)
        ax.invert_yaxis()
    axes[-1, 0].set_xlabel(f"ms from the {'click' if from_click else 'request'} (heard runs: median, whiskers = "
                           f"spread; a later preset's clicks hold the earlier ones' playback)", fontsize=8)
    _title(fig, summary_rows(heard), title)
    return _save(fig, path)


def export_history(records: list[dict], folder: str, title: str) -> dict:
    """CSV, JSON and a chart PNG of `records`, overwritten in `folder` (a long-running Space must not fill its
    disk): their paths, and the chart's figure (None when no run has figures)."""
    paths = {ext: os.path.join(folder, f"history.{ext}") for ext in ("csv", "json", "png")}
    complete = [r for r in records if not r.get("cancelled") and "ttfb_ms" in r]
    with open(paths["csv"], "w") as f:
        f.write(to_csv(complete))
    with open(paths["json"], "w") as f:
        json.dump(records, f, indent=1)
    figure = None
    if complete:
        figure = chart(complete, title, paths["png"])
    else:
        paths["png"] = None
    return {**paths, "figure": figure}


def merge(result_dirs: list[str], out_dir: str) -> dict:
    """One results.json/csv/chart from bench runs made as separate calls on one machine (the GPU machine
    limits each command to 10 minutes). Refuses to mix machines or commits: that would not be one run."""
    parts = [json.load(open(os.path.join(d, "results.json"))) for d in result_dirs]
    env = parts[0]["env"]
    for d, p in zip(result_dirs, parts):
        if (p["env"]["device"], p["env"]["commit"]) != (env["device"], env["commit"]):
            raise ValueError(f"{d}: ran on {p['env']['device']} at {p['env']['commit']}, not "
                             f"{env['device']} at {env['commit']}; merge only parts of one run")
    merged = {"env": env, "request": parts[0]["request"], "parts": result_dirs,
              "runs": [r for p in parts for r in p["runs"]],
              "builds": {k: v for p in parts for k, v in p["builds"].items()},
              "errors": {k: v for p in parts for k, v in p["errors"].items()}}
    write_results(out_dir, merged)
    return merged


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m lab.measure.report", description="merge bench results made in parts")
    p.add_argument("--merge", nargs="+", required=True, metavar="DIR", help="folders holding results.json")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    m = merge(args.merge, args.out)
    print(table(summary_rows(m["runs"]), m["builds"]))
