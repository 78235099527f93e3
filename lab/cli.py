"""`python -m lab.bench`: the command line over lab.session's run loop; writes JSON, CSV, a chart and WAVs.

    python -m lab.bench --presets hibari pocket-tts-cpu --text "Hello there." --runs 5 --out results/
    python -m lab.bench --presets csm-batched-inductor-cuda-graphs --weights random --streams 1,16,256 --max-seconds 6.4
    python -m lab.bench --endpoint http://127.0.0.1:7860 --model hibari --concurrency 1,4 --rate 2,4

With --endpoint, a load bench of any speech server over OpenAI's /v1/audio/speech instead (lab.loadbench).

With --streams, a concurrency sweep instead (lab.concurrency): that many streams at once into a batching preset
(max_streams > 1), or one after another through any other, per-stream TTFB, steady RTF, underruns and goodput.
"""
from __future__ import annotations

import argparse
import os
import sys
import wave

import numpy as np

from lab import availability, concurrency, env, planning, presets, session
from lab.audio import pcm16
from lab.errors import LabError
from lab.manager import ModelManager
from lab.measure import quality, report
from lab.request import MAX_TEXT_CHARS, Request
from lab.spec import FAMILIES, VariantSpec

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs back home "
                "before the evening rain begins to fall.")
HISTORY_PATH = os.environ.get("LAB_HISTORY", os.path.join("runs", "history.jsonl"))
# The flag for each field that lab.planning names in its errors and notes: the same words as the page's, at the flag.
FLAGS = {"text": "--text", "seed": "--seed", "runs per preset": "--runs", "max_audio_s": "--max-seconds",
         "user_audio": "--user-audio", "presets": "--presets", "streams": "--streams"}


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    pcm = pcm16(audio)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def check_out_dir(path: str, flag: str = "--out") -> str:
    """A folder the CLI can write its results into (made if missing), or one line saying why not."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise LabError(flag, f"{path!r} is a file, not a folder; give a folder for the results")
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, ".lab-write-check")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise LabError(flag, f"{path!r} cannot be written ({e.strerror or type(e).__name__}); give a folder you "
                             f"can write to") from None
    return path


def load_files(files: list[str]) -> list[VariantSpec]:
    """--preset-file's presets, by path (--presets takes names from the presets folder, planned by lab.planning)."""
    specs = []
    for path in files:
        if not os.path.isfile(path):
            raise LabError("--preset-file", f"{path!r} is not a file; give the path of a preset's YAML file")
        specs.append(presets.load_file(path))
    return specs


def bench(specs: list[VariantSpec], request: Request, runs: int, out_dir: str, manager: ModelManager | None = None,
          history_path: str | None = HISTORY_PATH, progress_bar: bool = True, wav_dir: str | None = None,
          with_quality: bool = False) -> dict:
    """lab.session's loop with a progress bar, a WAV per run, and results.json/csv/chart.png in `out_dir`.
    `with_quality`: every run of real speech is scored by lab.measure.quality after the last run, before the files."""
    from tqdm import tqdm

    wav_dir = wav_dir or out_dir
    os.makedirs(wav_dir, exist_ok=True)
    results = {"env": env.environment(), "request": {"text": request.text, "seed": request.seed,
               "max_audio_s": request.max_audio_s, "user_audio_s": request.user_audio_s}, "runs": [], "builds": {},
               "errors": {}}
    bar = tqdm(total=len(specs) * (runs + 1), disable=not progress_bar, unit="run", file=sys.stderr)
    done: dict[str, int] = {}
    worker = quality.Worker() if with_quality else None
    if worker:
        results["env"].update(quality.versions())
    for event in session.run_presets(manager or ModelManager(), specs, request, runs, history_path=history_path,
                                     quality=worker):
        if isinstance(event, session.Stage):
            bar.set_description(f"{event.preset}: {event.stage} {event.seconds:.0f}s")
        elif isinstance(event, session.Built):
            results["builds"][event.preset] = event.report.to_dict()
        elif isinstance(event, session.RunStarted):
            bar.set_description(f"{event.preset}: run {event.run}/{runs}")
        elif isinstance(event, session.RunDone):
            write_wav(os.path.join(wav_dir, f"{event.preset}-run{event.record['run']}.wav"), event.audio,
                      event.record["sample_rate"])
            results["runs"].append(event.record)
            done[event.preset] = done.get(event.preset, 0) + 1
            bar.update(1)
        elif isinstance(event, session.Failed):   # one failing preset does not stop the others; it is reported
            results["errors"][event.preset] = event.message
            bar.update(runs + 1 - done.get(event.preset, 0))
        elif isinstance(event, session.NotSaved):   # the runs go on; the results below are still written
            results["warnings"] = [event.message]
            print(f"warning: {event.message}", file=sys.stderr)
    bar.close()
    if worker:
        worker.join()
        worker.close()   # its scorer process, with the models it loaded
    report.write_results(out_dir, results)
    return results


def sweep(specs: list[VariantSpec], request: Request, levels: list[int], rate_hz: float | None, out_dir: str,
          manager: ModelManager | None = None) -> dict:
    """lab.concurrency.sweep for each preset, a line per level, and out_dir/sweep.json."""
    import json

    manager, results = manager or ModelManager(), {"env": env.environment(), "text": request.text,
                                                   "arrival_rate_hz": rate_hz, "levels": []}
    for spec in specs:
        for level in concurrency.sweep(manager.get(spec), spec, request, levels, rate_hz):
            results["levels"].append(level)
            print(report.sweep_line(level))
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", default=[],
                   help=f"preset names from presets/: {', '.join(presets.available())}")
    p.add_argument("--preset-file", nargs="+", default=[], metavar="PATH", help="preset YAML files, by path")
    p.add_argument("--text", default=DEFAULT_TEXT)
    # Numbers are read as typed and checked by lab.request, the page's own rules and messages.
    p.add_argument("--runs", default="5", help="warm runs per preset, 1 to 20 (one cold run comes first)")
    p.add_argument("--out", default="results")
    p.add_argument("--seed", default="0", help="0 to 4294967295")
    p.add_argument("--max-seconds", default="10", help="cap on audio length per run, (0, 120] s")
    p.add_argument("--weights", choices=["pretrained", "random", "tiny"], help="override every preset's weights")
    p.add_argument("--max-chars", type=int, default=MAX_TEXT_CHARS, help="refuse longer texts (default: %(default)s)")
    p.add_argument("--wavs", help="folder for the WAVs (default: --out)")
    p.add_argument("--history", default=HISTORY_PATH, help="JSONL file every run is appended to ('' for none)")
    p.add_argument("--quality", action="store_true", help="score each run of real speech after the runs: WER, CER, "
                   "MOS estimate, first speech, runaway (lab.measure.quality); n/a for random and tiny weights")
    p.add_argument("--user-audio", metavar="FILE", help="a spoken user turn (WAV/FLAC/MP3/OGG) sent with --text, for "
                   f"families that take one ({', '.join(f for f, v in FAMILIES.items() if v['user_audio'])})")
    p.add_argument("--streams", help="a concurrency sweep: comma list of stream counts (e.g. 1,16,256), each stream "
                   "saying --text for --max-seconds, instead of --runs")
    p.add_argument("--arrival-rate", type=float, help="with --streams: Poisson arrivals per second (default: all "
                   "streams arrive together)")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> planning.Plan:
    """The command line's comparison or sweep, planned as the page plans its forms (lab.planning)."""
    return planning.plan(availability.Catalog(presets.directory()), args.presets, args.text, args.seed,
                         args.max_seconds, args.runs, weights=args.weights, user_audio=args.user_audio,
                         extra_specs=load_files(args.preset_file), streams=args.streams, max_chars=args.max_chars)


def main(argv: list[str] | None = None) -> int:
    args_given = sys.argv[1:] if argv is None else argv
    if any(a == "--endpoint" or a.startswith("--endpoint=") for a in args_given):
        from lab import loadbench   # a client of any server: none of the run loop below

        return loadbench.main(args_given)
    args = parse_args(argv)
    try:
        chosen = plan(args)
        check_out_dir(args.out)
        if args.wavs:
            check_out_dir(args.wavs, "--wavs")
    except LabError as e:
        print(f"error: {FLAGS.get(e.where, e.where)}: {e.message}", file=sys.stderr)
        return 2
    for field, note in chosen.notes:
        print(f"note: {FLAGS.get(field, field)}: {note}", file=sys.stderr)
    specs, request, runs, levels = list(chosen.specs), chosen.request, chosen.runs, list(chosen.levels)
    if levels:
        sweep(specs, request, levels, args.arrival_rate, args.out)
        print(f"wrote {args.out}/sweep.json")
        return 0
    results = bench(specs, request, runs, args.out, history_path=args.history or None, wav_dir=args.wavs,
                    with_quality=args.quality)
    print(report.table(report.summary_rows(results["runs"]), results["builds"]))
    for name, err in results["errors"].items():
        print(f"error: {err}", file=sys.stderr)
    print(f"wrote {args.out}/results.json, results.csv, chart.png and {len(results['runs'])} WAVs in "
          f"{args.wavs or args.out}")
    return 1 if results["errors"] and not results["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
