"""`python -m lab.bench`: run presets from the command line and write JSON, CSV, a chart and WAVs.

    python -m lab.bench --presets hibari pocket-tts-cpu --text "Hello there." --runs 5 --out results/
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import wave

import numpy as np

from lab import env, history, presets, report
from lab.errors import LabError
from lab.manager import ModelManager
from lab.metrics import Timeline, figures
from lab.request import MAX_TEXT_CHARS, Request, validate_request, validate_user_audio
from lab.spec import FAMILIES, VariantSpec

DEFAULT_TEXT = ("The quick brown fox jumps over the lazy dog, and then it runs back home "
                "before the evening rain begins to fall.")
HISTORY_PATH = os.environ.get("LAB_HISTORY", os.path.join("runs", "history.jsonl"))


def write_wav(path: str, audio: np.ndarray, sample_rate: int) -> None:
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def read_wav(path: str) -> tuple[np.ndarray, int]:
    """A PCM WAV file as (samples, channels) integers and its rate; validate_user_audio scales and checks them."""
    try:
        with wave.open(path, "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (OSError, EOFError, wave.Error) as e:
        raise LabError("--user-audio", f"{path!r} is not a readable PCM WAV file ({e}); convert it with "
                                       f"`ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`") from e
    if width not in (2, 4):
        raise LabError("--user-audio", f"{path!r} has {8 * width}-bit samples; use 16- or 32-bit PCM "
                                       f"(`ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`)")
    return np.frombuffer(raw, f"<i{width}").reshape(-1, channels), rate


def run_once(engine, spec: VariantSpec, request: Request, cold: bool, run: int,
             cancel: threading.Event | None = None, on_chunk=None,
             timeline: Timeline | None = None) -> tuple[dict, np.ndarray]:
    """One request through one engine: its record (figures, timeline, settings) and its audio. Pass a
    `timeline` to keep the stamps of a run that raises (a cancelled one: which frames came after the cancel)."""
    timeline = timeline if timeline is not None else Timeline()
    engine.reset_peak_memory()
    parts = []
    for chunk in engine.stream(request, timeline, cancel):
        parts.append(chunk.samples)
        if on_chunk:
            on_chunk(chunk, timeline)
    if not parts:
        raise LabError("text", f"{request.text!r} produced no audio on {spec.name}: type words to speak")
    audio = np.concatenate(parts)
    record = {
        "preset": spec.name, "run": run, "cold": cold, "weights": spec.weights, "family": spec.family,
        "spec": json.loads(spec.key), **figures(timeline), "peak_mem_bytes": engine.peak_memory_bytes(),
        "text": request.text, "seed": request.seed, "max_audio_s": request.max_audio_s,
        # a spoken user turn changes what prefill does: runs with and without one must be told apart
        "user_audio_s": request.user_audio_s or 0.0,
        "tokenizer": engine.report.tokenizer, "sample_rate": engine.sample_rate,
        "timeline": timeline.to_dict(), "time": time.time(),
    }
    if getattr(engine, "last_text", None) is not None:   # models that answer (minicpm_o): what it said
        record["reply_text"] = engine.last_text
    return record, audio


def bench(specs: list[VariantSpec], request: Request, runs: int, out_dir: str, manager: ModelManager | None = None,
          history_path: str | None = HISTORY_PATH, progress_bar: bool = True, wav_dir: str | None = None) -> dict:
    from tqdm import tqdm

    manager = manager or ModelManager()
    wav_dir = wav_dir or out_dir
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(wav_dir, exist_ok=True)
    results = {"env": env.environment(), "request": {"text": request.text, "seed": request.seed,
               "max_audio_s": request.max_audio_s, "user_audio_s": request.user_audio_s}, "runs": [], "builds": {},
               "errors": {}}
    bar = tqdm(total=len(specs) * (runs + 1), disable=not progress_bar, unit="run", file=sys.stderr)
    for spec in specs:
        def progress(stage, seconds, name=spec.name):
            bar.set_description(f"{name}: {stage} {seconds:.0f}s")

        try:
            engine = manager.get(spec, progress)
            results["builds"][spec.name] = engine.report.to_dict()
            for run in range(runs + 1):      # a new engine's run 0 is its cold run, reported apart
                bar.set_description(f"{spec.name}: run {run}/{runs}")
                record, audio = run_once(engine, spec, request, cold=not engine.served, run=run)
                record["env_commit"] = results["env"]["commit"]
                write_wav(os.path.join(wav_dir, f"{spec.name}-run{run}.wav"), audio, engine.sample_rate)
                results["runs"].append(record)
                if history_path:
                    history.append(history_path, record)
                bar.update(1)
        except Exception as e:  # one failing preset must not stop the others; its error is reported
            results["errors"][spec.name] = str(e) if isinstance(e, LabError) else f"{type(e).__name__}: {e}"
            bar.update(runs + 1 - sum(r["preset"] == spec.name for r in results["runs"]))
    bar.close()

    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "results.csv"), "w") as f:
        f.write(report.to_csv(results["runs"]))
    if results["runs"]:
        e = results["env"]
        report.chart(results["runs"], f"{e['device']} · torch {e['torch']} · transformers {e['transformers']} · "
                                      f"commit {e['commit']}", os.path.join(out_dir, "chart.png"))
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lab.bench", description=__doc__.split("\n")[0])
    p.add_argument("--presets", nargs="+", required=True, help=f"preset names from presets/: {', '.join(presets.available())}")
    p.add_argument("--text", default=DEFAULT_TEXT)
    p.add_argument("--runs", type=int, default=5, help="warm runs per preset (one cold run comes first)")
    p.add_argument("--out", default="results")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=10.0, help="cap on audio length per run")
    p.add_argument("--weights", choices=["pretrained", "random", "tiny"], help="override every preset's weights")
    p.add_argument("--max-chars", type=int, default=MAX_TEXT_CHARS)
    p.add_argument("--wavs", help="folder for the WAVs (default: --out)")
    p.add_argument("--history", default=HISTORY_PATH, help="JSONL file every run is appended to ('' for none)")
    p.add_argument("--user-audio", metavar="FILE.wav", help="a spoken user turn (PCM WAV) sent with --text, for "
                   f"families that take one ({', '.join(f for f, v in FAMILIES.items() if v['user_audio'])})")
    args = p.parse_args(argv)
    try:
        if args.runs < 1:
            raise LabError("--runs", "must be at least 1")
        user_audio, user_audio_rate = None, 16000
        if args.user_audio:
            samples, user_audio_rate = read_wav(args.user_audio)
            user_audio = validate_user_audio(samples, user_audio_rate)
        request = validate_request(Request(args.text, seed=args.seed, max_audio_s=args.max_seconds,
                                           user_audio=user_audio, user_audio_sample_rate=user_audio_rate),
                                   args.max_chars)
        specs = [presets.load(name, weights=args.weights) for name in args.presets]
        deaf = [s.name for s in specs if not FAMILIES[s.family]["user_audio"]]
        if user_audio is not None and deaf:
            raise LabError("--user-audio", f"{', '.join(deaf)} take no spoken user turn; drop --user-audio, or "
                                           f"those presets")
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = bench(specs, request, args.runs, args.out, history_path=args.history or None, wav_dir=args.wavs)
    print(report.table(report.summary_rows(results["runs"]), results["builds"]))
    for name, err in results["errors"].items():
        print(f"error: {err}", file=sys.stderr)
    print(f"wrote {args.out}/results.json, results.csv, chart.png and {len(results['runs'])} WAVs in "
          f"{args.wavs or args.out}")
    return 1 if results["errors"] and not results["runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
