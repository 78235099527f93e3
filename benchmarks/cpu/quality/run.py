"""The quality guardrail over every hibari variant (presets/hibari*.yaml) on the corpus (tests/data: 20 Harvard
sentences, 8 texts with numbers, dates, prices and abbreviations), and the guardrail's own cost on this machine.

    python benchmarks/cpu/quality/run.py [OUT] [--presets hibari hibari-trim] [--no-next-run]
                                              # OUT: default benchmarks/cpu/quality/<commit>; presets: every hibari*

Each text is one comparison (lab.session.run_presets: a cold run and one warm run of every variant, then the
guardrail scores each run, as the page does). Writes results.json (env with the guardrail's models, every run with
its figures and transcript, the voice's phonemes for each text, the cost), results.csv, quality.png and a
README.md of tables. Parity is against the first preset named (sorted by name without --presets: `hibari`).
--no-next-run leaves out the timing of the next comparison (the guardrail's cost to the page, which depends on the
guardrail and not on the presets compared).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lab import env, presets, session  # noqa: E402
from lab.manager import ModelManager  # noqa: E402
from lab.measure import quality, report  # noqa: E402
from lab.measure.metrics import summarize  # noqa: E402
from lab.request import Request  # noqa: E402


def corpus(name: str) -> list[str]:
    with open(os.path.join(ROOT, "tests", "data", name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def corpus_wer(runs: list[dict]) -> float:
    """Errors over words of the whole set (each text's WER weighted by its word count), as ASR benchmarks report."""
    words = [len(quality.normalize(r["text"]).split()) for r in runs]
    return sum(r["wer"] * n for r, n in zip(runs, words)) / sum(words)


def main(out: str, names: list[str] | None = None, next_comparison: bool = True) -> dict:
    names = names or sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "presets", "hibari*.yaml")))
    specs = [presets.load(n) for n in names]
    texts = {"harvard": corpus("harvard.txt"), "numbers": corpus("numbers.txt")}
    started_load = load_average()
    t = time.perf_counter()
    quality.models()
    models_load_s = time.perf_counter() - t
    manager, worker, runs = ModelManager(), quality.Worker(), []
    done, total = 0, sum(map(len, texts.values()))
    for category, lines in texts.items():
        for text in lines:
            done += 1
            print(f"{done}/{total} {category}: {text}", file=sys.stderr, flush=True)
            for e in session.run_presets(manager, specs, Request(text, max_audio_s=20.0), 1, quality=worker):
                if isinstance(e, session.RunDone):
                    e.record["category"] = category
                    runs.append(e.record)
                elif isinstance(e, session.Failed):
                    raise SystemExit(f"{e.preset}: {e.message}")
            worker.join()   # scored after each comparison, as on the page
    tts = manager.get(specs[0]).tts
    readings = {text: {"phonemes": " | ".join(tts.phonemize(text)),
                       "transcript": next(r["transcript"] for r in runs if r["text"] == text)}
                for text in texts["numbers"]}
    next_runs = next_run(manager, worker, specs[0], texts["harvard"][0]) if next_comparison else None
    cost = [r["quality_s"] for r in runs]
    per_audio = [r["quality_s"] / r["audio_s"] for r in runs]
    summary = {}
    for preset in names:
        for category in texts:
            # run 1 of each text: a warm run (run 0 is cold only for the first text, after the build)
            mine = [r for r in runs if r["preset"] == preset and r["category"] == category and r["run"] == 1]
            summary[f"{preset} / {category}"] = {
                "texts": len(mine), "corpus_wer": corpus_wer(mine),
                **{k: summarize([r[k] for r in mine]) for k in ("wer", "cer", "mos", "first_speech_ms",
                                                                  "leading_silence_s", "trailing_silence_s",
                                                                  "ttfb_ms", "first_audible_ms", "first_audible_s")},
                "problems": sorted({r["quality"] for r in mine if r["quality"] != "ok"}),
                "seconds_per_word": summarize([r["audio_s"] / len(quality.normalize(r["text"]).split())
                                               for r in mine])}
    results = {"env": {**env.environment(), **quality.versions(), "load_average_start": started_load,
                       "load_average_end": load_average()},
               "presets": names, "runs": runs, "summary": summary, "readings": readings,
               "parity": quality.parity(runs),
               "cost": {"models_load_s": models_load_s, "quality_s": summarize(cost),
                        "quality_s_per_audio_s": summarize(per_audio), "runs": len(runs),
                        **{part: summarize([r[part] for r in runs]) for part in ("asr_s", "mos_s", "vad_s")},
                        "next_run": next_runs}}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    with open(os.path.join(out, "results.csv"), "w") as f:
        f.write(report.to_csv(runs))
    chart(results, os.path.join(out, "quality.png"))
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(markdown(results))
    return results


def next_run(manager, worker, spec, text: str, trials: int = 5) -> dict:
    """Does the guardrail slow the next comparison? A comparison (3 runs) starts half a second after another one's
    runs ended, either once the worker has scored them all (idle) or while it is scoring them (pending: a person
    clicking again). Worker.hold pauses the scorer: its start should not wait for the score in progress, and its
    runs' TTFB and RTF should not move."""
    out = {"idle": [], "pending": []}
    for trial in range(2 * trials):
        case = ("idle", "pending")[trial % 2]
        for _ in session.run_presets(manager, [spec], Request(text), 2, quality=worker):
            pass
        if case == "idle":
            worker.join()
        time.sleep(0.5)
        asked = time.perf_counter()
        for e in session.run_presets(manager, [spec], Request(text), 2, quality=worker):
            if isinstance(e, session.Started):
                start_wait_s = time.perf_counter() - asked
            elif isinstance(e, session.RunDone):
                out[case].append({"start_wait_s": start_wait_s, "ttfb_ms": e.record["ttfb_ms"],
                                  "rtf": e.record["rtf"]})
        worker.join()
    return {case: {k: summarize([r[k] for r in rows]) for k in ("start_wait_s", "ttfb_ms", "rtf")}
            for case, rows in out.items()}


def chart(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(results["summary"])
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (field, label, scale) in zip(axes, (("wer", "WER % (per text: median, bars = min–max)", 100),
                                                ("mos", "DNSMOS overall (MOS estimate)", 1),
                                                ("first_speech_ms", "first speech ms (VAD onset's chunk ready)", 1),
                                                ("leading_silence_s", "leading silence s (VAD onset in the stream)",
                                                 1))):
        s = [results["summary"][k][field] for k in keys]
        med = [x["median"] * scale for x in s]
        ax.bar(range(len(keys)), med, yerr=[[m - x["lo"] * scale for m, x in zip(med, s)],
                                            [x["hi"] * scale - m for m, x in zip(med, s)]], capsize=4,
               color="#4c72b0")
        ax.set_xticks(range(len(keys)), keys, rotation=25, ha="right", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
    e = results["env"]
    fig.suptitle(f"quality guardrail on {', '.join(results['presets'])} · {e['device']} · {e['quality_asr']} · "
                 f"commit {e['commit']}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def heard_floor_ms(run: dict) -> float | None:
    """The earliest any player could play the run's first audible sample (docs/METRICS.md, heard floor): the silence
    before it is played first."""
    if run.get("first_audible_ms") is None:
        return None
    return max(run["first_audible_ms"], run["ttfb_ms"] + run["first_audible_s"] * 1e3)


def against_reference(results: dict) -> list[str]:
    """What a listener waits for, each preset against the first, and the texts whose transcript differs from the
    reference's (warm runs): a variant that cut speech would lose its first words here."""
    runs = {(r["preset"], r["text"]): r for r in results["runs"] if r["run"] == 1}
    reference, *others = results["presets"]
    lines = ["", "## What a listener waits for, against " + reference, "",
             "Warm runs, median (min–max) over the texts. Heard floor: max(first audible ms, TTFB + first audible s), "
             "the earliest any player could play the first audible sample.", "",
             "| variant | TTFB ms | first audible s | heard floor ms | VAD onset s (leading) |",
             "|---|---|---|---|---|"]
    for preset in results["presets"]:
        mine = [r for (p, _), r in runs.items() if p == preset]
        cells = []
        for value, fmt in ((lambda r: r["ttfb_ms"], ".0f"), (lambda r: r["first_audible_s"], ".2f"),
                           (heard_floor_ms, ".0f"), (lambda r: r["first_speech_s"], ".3f")):
            s = summarize([value(r) for r in mine])
            cells.append(f"{s['median']:{fmt}} ({s['lo']:{fmt}}–{s['hi']:{fmt}})")
        lines.append(f"| {preset} | {' | '.join(cells)} |")
    def first_word_heard(preset, texts):
        return sum(quality.normalize(runs[(preset, t)]["transcript"]).split()[:1] == quality.normalize(t).split()[:1]
                   for t in texts)

    for preset in others:
        texts = [t for (p, t) in runs if p == preset and (reference, t) in runs]
        lines += ["", f"The text's first word is the first word heard in {first_word_heard(preset, texts)} of "
                  f"{len(texts)} texts for {preset}, {first_word_heard(reference, texts)} for {reference}. "
                  f"Transcripts of {preset} that differ from {reference}'s (normalized):", ""]
        differ = [t for t in texts if quality.normalize(runs[(preset, t)]["transcript"])
                  != quality.normalize(runs[(reference, t)]["transcript"])]
        lines += [f"- {t}: {reference} heard \"{runs[(reference, t)]['transcript']}\" (WER "
                  f"{runs[(reference, t)]['wer'] * 100:.0f} %), {preset} \"{runs[(preset, t)]['transcript']}\" (WER "
                  f"{runs[(preset, t)]['wer'] * 100:.0f} %)" for t in differ] or ["- none"]
    return lines


def markdown(results: dict) -> str:
    e, c = results["env"], results["cost"]
    lines = [f"# Quality guardrail on {', '.join(results['presets'])}, commit `{e['commit']}`", "",
             f"{e['device']}, {e.get('cpu_count')} cores, torch {e['torch']}, onnxruntime {e.get('onnxruntime')}, "
             f"hibari-tts {e.get('hibari_tts')}. Load average {e['load_average_start']} at the start, "
             f"{e['load_average_end']} at the end (the machine was shared with other work).", "",
             f"- ASR: {e['quality_asr']}", f"- MOS: {e['quality_mos']}", f"- VAD: {e['quality_vad']}",
             f"- normalizer: {e['quality_normalizer']}", "",
             "Warm runs, one per text (hibari is deterministic for a seed: the cold run's audio is the same). First "
             "speech ms: request to the chunk holding the VAD onset; leading s: where that onset sits in the stream. "
             "First audible s: where the first sample at -50 dBFS sits in the stream.", "",
             "| variant / texts | n | corpus WER | CER median | MOS est. median (min–max) | first speech ms median "
             "(min–max) | leading s | trailing s | s per word | TTFB ms median | first audible s median | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, s in results["summary"].items():
        lines.append(f"| {key} | {s['texts']} | {s['corpus_wer'] * 100:.1f} % | {s['cer']['median'] * 100:.1f} % | "
                     f"{s['mos']['median']:.2f} ({s['mos']['lo']:.2f}–{s['mos']['hi']:.2f}) | "
                     f"{s['first_speech_ms']['median']:.0f} ({s['first_speech_ms']['lo']:.0f}–"
                     f"{s['first_speech_ms']['hi']:.0f}) | {s['leading_silence_s']['median']:.2f} | "
                     f"{s['trailing_silence_s']['median']:.2f} | {s['seconds_per_word']['median']:.2f} | "
                     f"{s['ttfb_ms']['median']:.0f} | {s['first_audible_s']['median']:.2f} | "
                     f"{'; '.join(s['problems']) or 'none'} |")
    lines += ["", "Parity against the family's reference (the first preset): ", ""]
    for p in results["parity"]:
        lines.append(f"- {p['preset']} against {p['reference']}, {p['pairs']} paired runs: ΔWER median "
                     f"{p['d_wer']['median'] * 100:+.1f} points ({p['d_wer']['lo'] * 100:+.1f} to "
                     f"{p['d_wer']['hi'] * 100:+.1f}), ΔMOS {p['d_mos']['median']:+.2f} ({p['d_mos']['lo']:+.2f} to "
                     f"{p['d_mos']['hi']:+.2f}); badge: {p['badge'] or 'none'}")
    if len(results["presets"]) > 1:
        lines += against_reference(results)
    lines += ["", f"Guardrail cost per run (ASR + DNSMOS + VAD, {c['runs']} runs): median "
              f"{c['quality_s']['median']:.2f} s ({c['quality_s']['lo']:.2f}–{c['quality_s']['hi']:.2f}), "
              f"{c['quality_s_per_audio_s']['median']:.2f} s per second of audio; loading the three models "
              f"{c['models_load_s']:.1f} s once. Parts (median): ASR {c['asr_s']['median']:.2f} s, DNSMOS "
              f"{c['mos_s']['median']:.2f} s, VAD {c['vad_s']['median']:.2f} s.", ""]
    if c["next_run"] is None:
        lines += ["The next comparison's timing (scores pending against idle) was left out of this run "
                  "(--no-next-run).", ""]
    else:
        lines += ["The next comparison, started 0.5 s after the previous one's runs, while the worker was scoring "
                  "them (pending) or after it had scored them all (idle), hibari, 3 runs each, 5 comparisons per "
                  "case:", "",
                  "| case | waited to start s, median (min–max) | TTFB ms, median (min–max) | RTF, median (min–max) |",
                  "|---|---|---|---|"]
        for case, s in c["next_run"].items():
            lines.append(f"| {case} | {s['start_wait_s']['median']:.2f} ({s['start_wait_s']['lo']:.2f}–"
                         f"{s['start_wait_s']['hi']:.2f}) | {s['ttfb_ms']['median']:.1f} ({s['ttfb_ms']['lo']:.1f}–"
                         f"{s['ttfb_ms']['hi']:.1f}) | {s['rtf']['median']:.4f} ({s['rtf']['lo']:.4f}–"
                         f"{s['rtf']['hi']:.4f}) |")
    lines += ["", "## How the voice reads numbers, dates, prices, abbreviations",
              "", "| text | hibari's phonemes (misaki G2P) | what Whisper tiny.en heard | WER |", "|---|---|---|---|"]
    for text, r in results["readings"].items():
        wer = next(x["wer"] for x in results["runs"] if x["text"] == text and not x["cold"])
        lines.append(f"| {text} | `{r['phonemes']}` | {r['transcript']} | {wer * 100:.0f} % |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.path.join(ROOT, "benchmarks", "cpu", "quality", env.git_commit()))
    parser.add_argument("--presets", nargs="+", help="presets/ names; the first is the reference (default: every "
                                                     "hibari*.yaml, sorted)")
    parser.add_argument("--no-next-run", action="store_true", help="leave out the next comparison's timing")
    args = parser.parse_args()
    out = args.out
    r = main(out, args.presets, not args.no_next_run)
    print(markdown(r))
    print(f"wrote {out}")
