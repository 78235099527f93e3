"""`python -m lab.bench` end to end: every file it promises, and errors that name the input."""
import json
import os
import subprocess
import sys
import wave

import pytest

from lab import cli, env, machine, presets
from lab.errors import LabError
from lab.measure import history

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FIELDS = {"preset", "run", "cold", "ttfb_ms", "phases_ms", "rtf", "steady_rtf", "audio_s", "underruns",
              "stall_s", "peak_mem_bytes", "weights"}


@pytest.mark.slow
def test_a_mixed_family_comparison_prints_every_presets_row(tmp_path):
    """The first thing a newcomer tries: tiny CSM, tiny Pocket TTS and hibari in one comparison. The families'
    rows have different columns (hibari, real speech, has no "n/a" quality), and the table printed them all."""
    proc = subprocess.run(
        [sys.executable, "-m", "lab.bench", "--presets", "csm-cpu", "pocket-tts-cpu", "hibari", "--weights", "tiny",
         "--runs", "1", "--text", "Two short words.", "--max-seconds", "0.5", "--out", str(tmp_path / "out"),
         "--history", ""], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = [line.split()[0] for line in proc.stdout.splitlines() if line.split()[:1] in (["csm-cpu"],
                                                                                       ["pocket-tts-cpu"], ["hibari"])]
    assert rows == ["csm-cpu", "pocket-tts-cpu", "hibari"], proc.stdout
    assert "n/a (tiny weights)" in proc.stdout


@pytest.mark.slow
def test_cli_writes_json_csv_chart_and_a_wav_per_preset_and_run(tmp_path):
    out, hist = tmp_path / "out", tmp_path / "history.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "lab.bench", "--presets", "hibari", "csm-cpu", "--weights", "tiny", "--runs", "2",
         "--text", "Two short words.", "--max-seconds", "1", "--out", str(out), "--history", str(hist)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "csm-cpu" in proc.stdout and "tiny test weights" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert {"device", "torch", "transformers", "commit"} <= set(results["env"])
    assert len(results["runs"]) == 2 * 3
    for r in results["runs"]:
        assert RUN_FIELDS <= set(r)
    assert [r["cold"] for r in results["runs"] if r["preset"] == "csm-cpu"] == [True, False, False]
    assert {r["weights"] for r in results["runs"]} == {"pretrained", "tiny"}   # hibari keeps its real voice
    assert (out / "results.csv").read_text().count("\n") == 1 + 6
    assert (out / "chart.png").read_bytes()[:4] == b"\x89PNG"
    for preset in ("hibari", "csm-cpu"):
        for run in range(3):
            with wave.open(str(out / f"{preset}-run{run}.wav")) as w:
                assert w.getframerate() == 24000 and w.getnframes() > 0
    assert len(history.read(str(hist))) == 6


@pytest.mark.parametrize("args,expect", [
    (["--presets", "hibari", "--text", "  "], "text: is empty"),
    (["--presets", "hibari", "--text", "مرحبا"], "outside Latin script"),
    (["--presets", "hibary"], "no such preset; did you mean hibari?"),
    (["--presets", "hibari", "--runs", "0"], "--runs: 0 is out of range"),
    (["--presets", "hibari", "--text", "<b>🎉</b>"], "nothing to speak"),
])
def test_cli_bad_input_is_one_clear_error(args, expect, capsys):
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err


def test_every_committed_preset_is_valid_and_runs_here_or_says_why():
    specs, errors = presets.load_all()
    assert not errors and {"hibari", "hibari-whole", "csm-cpu"} <= set(specs)
    for name, spec in specs.items():
        refusal = machine.check(spec.with_weights("random"), weights_here=lambda s: True)
        assert refusal is None or refusal.code in (machine.NO_GPU, machine.NO_PACKAGE), (name, refusal)


@pytest.mark.skipif(env.cuda_available(), reason="this machine has a GPU: csm-sdpa runs here")
def test_cli_refuses_what_this_machine_cannot_run_before_building(capsys):
    assert cli.main(["--presets", "csm-sdpa", "--weights", "random"]) == 2
    assert "no GPU is visible" in capsys.readouterr().err


def test_bad_preset_files_name_the_file_and_field(tmp_path):
    (tmp_path / "typo.yaml").write_text("family: csm\ncompile: cuda-graph\n")
    (tmp_path / "broken.yaml").write_text("family: csm\nattention: [sdpa\n")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "wrongtype.yaml").write_text("family: csm\nmax_chunk_frames: many\n")
    cases = {"typo": "compile: 'cuda-graph' is not one of", "broken": "is not valid YAML at line",
             "empty": "is empty", "wrongtype": "max_chunk_frames: expected int, got str"}
    for name, expect in cases.items():
        with pytest.raises(LabError) as e:
            presets.load(name, str(tmp_path))
        assert f"{name}.yaml" in e.value.where and expect in e.value.message
