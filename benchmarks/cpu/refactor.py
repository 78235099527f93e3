"""Does a refactor change what the CLI makes? This tree against `--base-tree` (another checkout), taking turns.

    python benchmarks/cpu/refactor.py --base-tree /tmp/old-checkout [--rounds 2] --out DIR

Each round runs the same `python -m lab.bench` command in both trees (a fresh process each; the tree that goes
first swaps every round): tiny CSM, tiny Pocket TTS, hibari and tiny batched CSM (tests/presets/csm-tiny-batched.yaml,
through the batched engine's scheduler), one cold and `--runs` warm runs each. Per process it
keeps what a user gets: the exit code, the printed table's columns and rows, the result files, each run's audio
length and a hash of its WAV, the record fields and the build report fields. Timings are kept but not compared
(the machine is shared). The verdict compares every round of both trees: the same outputs, or the differences named.
Writes DIR/results.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import wave

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PRESETS = ["csm-cpu", "pocket-tts-cpu", "hibari"]
PRESET_FILES = ["tests/presets/csm-tiny-batched.yaml"]
ROW_LABELS = PRESETS + [os.path.basename(path)[:-len(".yaml")] for path in PRESET_FILES]
TEXT = "The quick brown fox jumps over the lazy dog."
LOCK = "/tmp/BENCH_LOCK"   # another session times a browser benchmark while it exists


def git(*args: str, cwd: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def table_of(stdout: str) -> dict:
    """The printed table's header columns and each preset's row label, as the CLI printed them."""
    lines = stdout.splitlines()
    header = next((line.split() for line in lines if line.split()[:1] == ["preset"]), [])
    rows = [line.split()[0] for line in lines if line.split()[:1] in ([p] for p in ROW_LABELS)]
    return {"columns": header, "rows": rows}


def wav_facts(path: str) -> dict:
    with wave.open(path) as w:
        frames = w.readframes(w.getnframes())
        return {"sample_rate": w.getframerate(), "samples": w.getnframes(),
                "sha256": hashlib.sha256(frames).hexdigest()[:16]}


def run_cli(tree: str, runs: int, max_seconds: float) -> dict:
    while os.path.exists(LOCK):
        time.sleep(20)
    out = tempfile.mkdtemp(prefix="h25-layers-refactor-")
    command = [sys.executable, "-m", "lab.bench", "--presets", *PRESETS, "--preset-file", *PRESET_FILES,
               "--weights", "tiny", "--runs", str(runs),
               "--max-seconds", str(max_seconds), "--text", TEXT, "--out", out, "--history", ""]
    t0 = time.perf_counter()
    proc = subprocess.run(command, cwd=tree, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall_s = time.perf_counter() - t0
    results_path = os.path.join(out, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    runs_out = [{"preset": r["preset"], "run": r["run"], "cold": r["cold"], "audio_s": r["audio_s"],
                 "chunks": r.get("chunks"), "fields": sorted(r), "ttfb_ms": r.get("ttfb_ms"),
                 **wav_facts(os.path.join(out, f"{r['preset']}-run{r['run']}.wav"))} for r in results.get("runs", [])]
    return {"tree": tree, "commit": git("rev-parse", "--short", "HEAD", cwd=tree), "command": command[1:],
            "exit_code": proc.returncode, "wall_s": round(wall_s, 1), "table": table_of(proc.stdout),
            "stderr_tail": proc.stderr.strip().splitlines()[-3:], "files": sorted(os.listdir(out)),
            "builds": {p: sorted(b) for p, b in results.get("builds", {}).items()},
            "errors": results.get("errors", {}), "runs": runs_out}


def comparable(result: dict) -> dict:
    """What must not change: everything but timings, the tree, the commit and the stderr tail (tqdm's bar)."""
    return {"exit_code": result["exit_code"], "table": result["table"], "files": result["files"],
            "builds": result["builds"], "errors": result["errors"],
            "runs": [{k: v for k, v in r.items() if k != "ttfb_ms"} for r in result["runs"]]}


def differences(a: dict, b: dict, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base-tree", required=True, help="a checkout of the commit before the refactor")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=3.0)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    trees = {"base": os.path.abspath(args.base_tree), "new": ROOT}
    rounds = []
    for index in range(args.rounds):
        order = ["base", "new"] if index % 2 == 0 else ["new", "base"]
        rounds.append({name: run_cli(trees[name], args.runs, args.max_seconds) for name in order})
        print(f"round {index + 1}: " + ", ".join(f"{n} exit {r['exit_code']} in {r['wall_s']} s"
                                                  for n, r in rounds[-1].items()), file=sys.stderr, flush=True)
    reference = comparable(rounds[0]["base"])
    verdict = {f"round {i + 1} {name}": differences(reference, comparable(result))
               for i, r in enumerate(rounds) for name, result in r.items()}
    same = not any(verdict.values())
    summary = {"same_outputs": same, "differences_from_round_1_base": verdict,
               "audio": [{k: r[k] for k in ("preset", "run", "audio_s", "samples", "sha256")}
                         for r in rounds[0]["base"]["runs"]],
               "columns": rounds[0]["base"]["table"]["columns"]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"summary": summary, "rounds": rounds}, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
