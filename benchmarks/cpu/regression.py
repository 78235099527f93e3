"""Are the default CPU presets slower than on an earlier commit? This tree against `--base`, taking turns.

    python benchmarks/cpu/regression.py --base <commit> [--rounds 3] [--presets hibari pocket-tts-cpu ...]

The base commit is checked out as a detached git worktree in a temporary folder (removed at the end); both trees
run with this interpreter. Each round runs `python -m lab.bench` once per preset per tree (a fresh process: build,
one cold run, `--runs` warm runs), the two trees back to back, the one that goes first swapped every round, so the
shared machine's load falls on both alike. Per preset and tree: TTFB, RTF and steady RTF, each the median of the
rounds' medians over their warm runs, with the min-max of those round medians as the spread. A figure more than
10% above the base's (`--slower`) whose spread lies wholly above the base's is flagged as slower; the exit code is
1 when one is. Presets: hibari (its own voice), pocket-tts-cpu, the fastest Pocket preset
(pocket-tts-cpu-int8-decode-thread) and csm-cpu; `name:weights` picks the weights, else Pocket runs random
weights at real size and CSM the tiny test config (latency only: the audio is noise). A preset the base tree has
no file for runs on this tree alone. Writes results.json (every round's figures, both commits, the environment,
the load average at start and end) and regression.png into `--out`, by default
benchmarks/cpu/<this commit>/regression/. Absolute times follow the machine's load: read the ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from lab import env  # noqa: E402   (before torch: the lab sets OpenMP's wait policy)

DEFAULT_PRESETS = ["hibari", "pocket-tts-cpu", "pocket-tts-cpu-int8-decode-thread", "csm-cpu"]
FAMILY_WEIGHTS = {"pocket_tts": "random", "csm": "tiny"}   # hibari's voice ships with its package
TEXT = "The quick brown fox jumps over the lazy dog. It runs back home before the rain."
FIGURES = {"ttfb_ms": ("TTFB", "ms"), "rtf": ("RTF", ""), "steady_rtf": ("steady RTF", "")}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def git(*args: str, cwd: str = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def weights_for(tree: str, preset: str) -> str | None:
    """`name:weights` as given, else the family's latency weights; None where the tree has no such preset."""
    import yaml

    name, _, weights = preset.partition(":")
    path = os.path.join(tree, "presets", f"{name}.yaml")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return weights or FAMILY_WEIGHTS.get((yaml.safe_load(f) or {}).get("family"), "")


def bench(tree: str, preset: str, weights: str, args, out: str) -> dict:
    """One `python -m lab.bench` process in `tree`: its warm runs' figures, its cold TTFB and its build times."""
    name = preset.partition(":")[0]
    command = [sys.executable, "-m", "lab.bench", "--presets", name, "--runs", str(args.runs), "--max-seconds",
               str(args.max_seconds), "--text", args.text, "--history", "", "--out", out]
    if weights:
        command += ["--weights", weights]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True,
                          text=True)
    row = {"load_before": load_before, "load_after": os.getloadavg()[0], "wall_s": time.perf_counter() - t0}
    results_path = os.path.join(out, "results.json")
    if done.returncode != 0 or not os.path.exists(results_path):
        return {**row, "error": (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]}
    with open(results_path) as f:
        results = json.load(f)
    warm = [r for r in results["runs"] if not r.get("cold")]
    if results.get("errors") or not warm:
        return {**row, "error": list(results.get("errors", {}).values()) or ["no warm run"]}
    # steady RTF is None where a run's audio came in one chunk after the first (hibari's short texts)
    row.update({key: [r[key] for r in warm if r.get(key) is not None] for key in FIGURES})
    row["phases_ms"] = [r.get("phases_ms") for r in warm]
    row["threads"] = warm[0].get("threads")
    row["prefill_threads"] = [r.get("prefill_threads") for r in warm]   # Pocket TTS: every core or the spec's
    row["cold_ttfb_ms"] = next((r["ttfb_ms"] for r in results["runs"] if r.get("cold")), None)
    row["build"] = {k: results["builds"].get(name, {}).get(k) for k in ("load_s", "warmup_s")}
    row["commit"] = results["env"].get("commit")
    return row


def summarize(rounds: list[dict]) -> dict | None:
    """Per figure: the median of the rounds' medians and their min-max."""
    rounds = [r for r in rounds if "error" not in r]
    if not rounds:
        return None
    out = {}
    for key in FIGURES:
        medians = [statistics.median(r[key]) for r in rounds if r[key]]
        if not medians:
            continue
        out[key] = {"median": statistics.median(medians), "min": min(medians), "max": max(medians),
                    "round_medians": medians}
    return out


def compare(current: dict | None, base: dict | None, slower: float) -> dict:
    """Per figure: current / base, and whether it is slower beyond the spread."""
    if not current or not base:
        return {}
    out = {}
    for key in FIGURES:
        if key not in current or key not in base:
            continue
        c, b = current[key], base[key]
        ratio = c["median"] / b["median"]
        out[key] = {"ratio": ratio, "slower": ratio > 1 + slower and c["min"] > b["max"]}
    return out


def fmt(figure: str, s: dict) -> str:
    digits = ".0f" if figure == "ttfb_ms" else ".3f"
    unit = " ms" if figure == "ttfb_ms" else ""
    spread = f" ({s['min']:{digits}}-{s['max']:{digits}})" if "min" in s else ""
    return f"{s['median']:{digits}}{unit}{spread}"


def chart(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    presets = results["presets"]
    fig, axes = plt.subplots(1, len(FIGURES), figsize=(5.2 * len(FIGURES), 4.6))
    for ax, (key, (label, unit)) in zip(axes, FIGURES.items()):
        for offset, tree, color in ((-0.2, "base", "#9aa5b1"), (0.2, "current", "#2f6db5")):
            xs, heights, lows, highs = [], [], [], []
            for i, preset in enumerate(presets):
                s = (results["summary"][preset].get(tree) or {}).get(key)
                if s:
                    xs.append(i + offset)
                    heights.append(s["median"])
                    lows.append(s["median"] - s["min"])
                    highs.append(s["max"] - s["median"])
            ax.bar(xs, heights, 0.38, yerr=[lows, highs], capsize=3, color=color,
                   label=f"{tree} {results[tree + '_commit']}")
        for i, preset in enumerate(presets):
            if not results["summary"][preset].get("base"):
                ax.annotate(f"not at\n{results['base_commit']}", (i - 0.2, 0), textcoords="offset points",
                            xytext=(0, 3), ha="center", fontsize=7, color="#555555")
            c = results["summary"][preset]["compare"].get(key)
            s = (results["summary"][preset].get("current") or {}).get(key)
            if c and s:
                ax.annotate(f"{c['ratio']:.2f}x", (i + 0.2, s["max"]), textcoords="offset points", xytext=(0, 3),
                            ha="center", fontsize=8, color="#c0392b" if c["slower"] else "black",
                            fontweight="bold" if c["slower"] else "normal")
        ax.set_xticks(range(len(presets)))
        ax.set_xticklabels(presets, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"{label}{f' ({unit})' if unit else ''}, lower is better", fontsize=10)
        ax.set_ylim(0, ax.get_ylim()[1] * 1.1)
        ax.legend(fontsize=8)
    e = results["env"]
    fig.suptitle(f"{results['current_commit']} against {results['base_commit']}: median of {results['rounds']} rounds' "
                 f"medians, whiskers min-max, current/base ratio (red: >{results['slower'] * 100:.0f}% slower beyond "
                 f"the spread)\n{e.get('cpu_model')}, {e.get('cpu_count')} cores, torch {e.get('torch')}, load "
                 f"{results['load_average_start'][0]:.1f} at start, {results['load_average_end'][0]:.1f} at end",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="the earlier commit to compare with")
    p.add_argument("--rounds", type=int, default=3, help="rounds; each runs every preset once on each tree")
    p.add_argument("--presets", nargs="+", default=DEFAULT_PRESETS, metavar="NAME[:WEIGHTS]")
    p.add_argument("--runs", type=int, default=5, help="warm runs per lab.bench process")
    p.add_argument("--max-seconds", type=float, default=6)
    p.add_argument("--text", default=TEXT)
    p.add_argument("--slower", type=float, default=0.10, help="the ratio above 1 that counts as slower")
    p.add_argument("--out", help="default: benchmarks/cpu/<this commit>/regression/")
    args = p.parse_args()

    current_commit = env.git_commit()
    base_commit = git("rev-parse", "--short", args.base)
    out_dir = args.out or os.path.join(ROOT, "benchmarks", "cpu", current_commit, "regression")
    os.makedirs(out_dir, exist_ok=True)
    results = {"current_commit": current_commit, "base_commit": base_commit, "base": args.base,
               "rounds": args.rounds, "runs": args.runs, "max_seconds": args.max_seconds, "text": args.text,
               "slower": args.slower, "presets": [p.partition(":")[0] for p in args.presets],
               "env": env.environment(), "load_average_start": os.getloadavg(), "data": {}}
    log(f"{current_commit} against {base_commit}, {args.rounds} rounds of {len(args.presets)} presets; "
        f"load {results['load_average_start'][0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="lab-regression-") as tmp:
        base_tree = os.path.join(tmp, "base")
        git("worktree", "add", "--detach", base_tree, args.base)
        trees = {"current": ROOT, "base": base_tree}
        try:
            weights = {(tree, preset): weights_for(path, preset) for tree, path in trees.items()
                       for preset in args.presets}
            for preset in args.presets:
                if weights["base", preset] is None:
                    log(f"{preset}: no such preset at {base_commit}; it runs on this tree alone")
            for round_index in range(args.rounds):
                order = ["base", "current"] if round_index % 2 == 0 else ["current", "base"]
                for preset in args.presets:
                    name = preset.partition(":")[0]
                    for tree in order:
                        if weights[tree, preset] is None:
                            continue
                        out = os.path.join(tmp, "out", tree, name, str(round_index))
                        row = bench(trees[tree], preset, weights[tree, preset], args, out)
                        results["data"].setdefault(name, {}).setdefault(tree, []).append(row)
                        head = f"round {round_index + 1}/{args.rounds} {name} on {tree}"
                        if "error" in row:
                            log(f"{head}: failed: {' '.join(row['error'])}")
                        else:
                            figures = ", ".join(f"{label} {fmt(key, {'median': statistics.median(row[key])})}"
                                                for key, (label, _) in FIGURES.items() if row[key])
                            log(f"{head}: {figures} ({row['wall_s']:.0f} s, load {row['load_after']:.1f})")
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", base_tree], cwd=ROOT, capture_output=True)
    results["load_average_end"] = os.getloadavg()

    results["summary"], flagged = {}, []
    print(f"\n{current_commit} against {base_commit}: median (min-max of {args.rounds} round medians), ratio "
          f"current/base")
    for name in results["presets"]:
        data = results["data"].get(name, {})
        s = {tree: summarize(data.get(tree, [])) for tree in ("base", "current")}
        s["compare"] = compare(s["current"], s["base"], args.slower)
        results["summary"][name] = s
        print(f"{name}")
        for key, (label, unit) in FIGURES.items():
            cells = [f"{tree} {fmt(key, s[tree][key])}" if key in (s[tree] or {}) else f"{tree} -"
                     for tree in ("base", "current")]
            c = s["compare"].get(key)
            mark = ""
            if c:
                mark = f"  {c['ratio']:.2f}x" + ("  SLOWER beyond the spread" if c["slower"] else "")
                if c["slower"]:
                    flagged.append(f"{name} {label}")
            print(f"  {label:<11} {'   '.join(cells)}{mark}")
    results["flagged"] = flagged
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    chart(results, os.path.join(out_dir, "regression.png"))
    print(f"{'slower: ' + ', '.join(flagged) if flagged else 'nothing slower beyond the spread'}; wrote "
          f"{os.path.relpath(out_dir)}/results.json and regression.png")
    return 1 if flagged else 0


if __name__ == "__main__":
    sys.exit(main())
