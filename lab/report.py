"""Tables and charts from run records, shared by the CLI and the app."""
from __future__ import annotations

import csv
import io

from lab.metrics import PHASES, summarize

WEIGHTS_NOTE = {"random": "random weights: latency only, audio is noise",
                "tiny": "tiny test weights: not a real-size figure, audio is noise"}


def label(preset: str, weights: str) -> str:
    return f"{preset}\n[{weights} weights]" if weights != "pretrained" else preset


def summary_rows(runs: list[dict]) -> list[dict]:
    """One row per preset: warm medians with spread, and the cold run apart."""
    rows = []
    for preset in dict.fromkeys(r["preset"] for r in runs):
        mine = [r for r in runs if r["preset"] == preset]
        warm = [r for r in mine if not r["cold"]]
        cold = [r for r in mine if r["cold"]]
        if not mine:
            continue
        row = {"preset": preset, "weights": mine[0]["weights"], "warm_runs": len(warm)}
        for fig in ("ttfb_ms", "rtf", "steady_rtf", "stall_s", "underruns"):
            s = summarize([r[fig] for r in warm])
            row[fig] = s["median"]
            row[f"{fig}_lo"], row[f"{fig}_hi"] = s["lo"], s["hi"]
        # The phases of the run whose TTFB is the median (the lower middle one for an even count), so the
        # stack adds up to a measured TTFB.
        ranked = sorted(warm or mine, key=lambda r: r["ttfb_ms"])
        row["phases_ms"] = ranked[(len(ranked) - 1) // 2]["phases_ms"]
        row["cold_ttfb_ms"] = cold[0]["ttfb_ms"] if cold else None
        row["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in mine)
        rows.append(row)
    return rows


def _fmt(v, digits=3):
    if v is None:
        return "-"
    return f"{v:#.{digits}g}".rstrip(".") if isinstance(v, float) else str(v)


def table(rows: list[dict], builds: dict) -> str:
    head = ["preset", "weights", "TTFB ms (warm)", "RTF", "steady RTF", "underruns", "stall s", "cold TTFB ms",
            "load s", "warm-up s", "peak MiB"]
    lines = [head]
    for r in rows:
        b = builds.get(r["preset"], {})
        lines.append([
            r["preset"], r["weights"],
            f"{r['ttfb_ms']:.1f} ({r['ttfb_ms_lo']:.1f}-{r['ttfb_ms_hi']:.1f})" if r["ttfb_ms"] is not None else "-",
            f"{_fmt(r['rtf'])} ({_fmt(r['rtf_lo'])}-{_fmt(r['rtf_hi'])})" if r["rtf"] is not None else "-",
            _fmt(r["steady_rtf"]), _fmt(None if r["underruns"] is None else round(r["underruns"])), _fmt(r["stall_s"]),
            _fmt(r["cold_ttfb_ms"], 4), _fmt(b.get("load_s")), _fmt(b.get("warmup_s")),
            f"{r['peak_mem_bytes'] / 2**20:.0f}"])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) for c, w in zip(line, widths)) for line in lines]
    notes = {WEIGHTS_NOTE[r["weights"]] for r in rows if r["weights"] in WEIGHTS_NOTE}
    return "\n".join(out + [f"note: {n}" for n in sorted(notes)])


def to_csv(runs: list[dict]) -> str:
    cols = ["preset", "run", "cold", "weights", "ttfb_ms", *[f"phase_{p}_ms" for p in PHASES], "rtf", "steady_rtf",
            "audio_s", "chunks", "underruns", "stall_s", "peak_mem_bytes"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in runs:
        w.writerow({**r, **{f"phase_{p}_ms": r.get("phases_ms", {}).get(p) for p in PHASES}})
    return buf.getvalue()


def chart(runs: list[dict], title: str, path: str | None = None):
    """TTFB and RTF per preset (warm median, bars for spread, cold as a hollow marker), and TTFB's phases."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary_rows(runs)
    names = [label(r["preset"], r["weights"]) for r in rows]
    x = range(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 2.2 * len(rows) * 1.5), 4.8))
    for ax, fig_name, unit in ((axes[0], "ttfb_ms", "TTFB (ms)"), (axes[1], "rtf", "RTF (below 1 is faster than real time)")):
        med = [r[fig_name] or 0 for r in rows]
        # `is None`, not `or`: a spread that reaches 0 (no underruns) is a real bar end, not a missing one.
        err = [[m - (m if r[f"{fig_name}_lo"] is None else r[f"{fig_name}_lo"]) for m, r in zip(med, rows)],
               [(m if r[f"{fig_name}_hi"] is None else r[f"{fig_name}_hi"]) - m for m, r in zip(med, rows)]]
        ax.bar(x, med, yerr=err, capsize=4, color="#4c72b0", label="warm median (spread)")
        if fig_name == "ttfb_ms":
            cold = [(i, r["cold_ttfb_ms"]) for i, r in zip(x, rows) if r["cold_ttfb_ms"] is not None]
            if cold:
                ax.scatter([c[0] for c in cold], [c[1] for c in cold], facecolors="none", edgecolors="#c44e52",
                           label="cold (first run after build)", zorder=3)
        if fig_name == "rtf":
            ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel(unit)
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    bottom = [0.0] * len(rows)
    for phase in ("session", "prefill", "generator", "first_frame", "first_decode"):
        vals = [r["phases_ms"][phase] or 0 for r in rows]
        axes[2].bar(x, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    axes[2].set_ylabel("TTFB phases (ms, the median-TTFB warm run)")
    axes[2].set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    axes[2].legend(fontsize=7)
    notes = sorted({WEIGHTS_NOTE[r["weights"]] for r in rows if r["weights"] in WEIGHTS_NOTE})
    fig.suptitle(title + ("\n" + "; ".join(notes) if notes else ""), fontsize=9)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


def merge(result_dirs: list[str], out_dir: str) -> dict:
    """One results.json/csv/chart from bench runs made as separate calls on one machine (the GPU machine
    limits each command to 10 minutes). Refuses to mix machines or commits: that would not be one run."""
    import json
    import os

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
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(merged, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w") as f:
        f.write(to_csv(merged["runs"]))
    chart(merged["runs"], f"{env['device']} · torch {env['torch']} · transformers {env['transformers']} · "
                          f"commit {env['commit']}", os.path.join(out_dir, "chart.png"))
    return merged


def stall_chart(runs: list[dict], title: str = "", path: str | None = None):
    """Underruns and stall seconds per preset: what a listener hears as gaps. Warm median with its spread as
    bars, the cold run as a hollow marker, as in `chart`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary_rows(runs)
    names = [label(r["preset"], r["weights"]) for r in rows]
    x = list(range(len(rows)))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(rows) * 2), 3.6))
    for ax, fig_name, unit in ((axes[0], "underruns", "underruns (late chunks, warm median)"),
                               (axes[1], "stall_s", "stall (s the player waits, warm median)")):
        med = [r[fig_name] or 0 for r in rows]
        # `is None`, not `or`: a spread that reaches 0 (no underruns) is a real bar end, not a missing one.
        err = [[m - (m if r[f"{fig_name}_lo"] is None else r[f"{fig_name}_lo"]) for m, r in zip(med, rows)],
               [(m if r[f"{fig_name}_hi"] is None else r[f"{fig_name}_hi"]) - m for m, r in zip(med, rows)]]
        ax.bar(x, med, yerr=err, capsize=4, color="#dd8452", label="warm median (spread)")
        cold = [(i, c[fig_name]) for i, r in zip(x, rows) for c in runs if c["preset"] == r["preset"] and c["cold"]]
        if cold:
            ax.scatter([c[0] for c in cold], [c[1] for c in cold], facecolors="none", edgecolors="#c44e52",
                       label="cold (first run after build)", zorder=3)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=7)
    notes = sorted({WEIGHTS_NOTE[r["weights"]] for r in rows if r["weights"] in WEIGHTS_NOTE})
    fig.suptitle((title + "\n" if title else "") + "; ".join(notes), fontsize=9)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return fig


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m lab.report", description="merge bench results made in parts")
    p.add_argument("--merge", nargs="+", required=True, metavar="DIR", help="folders holding results.json")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    m = merge(args.merge, args.out)
    print(table(summary_rows(m["runs"]), m["builds"]))
