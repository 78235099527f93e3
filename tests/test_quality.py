"""lab.measure.quality, the offline guardrail: real hibari speech scored by Whisper tiny.en, DNSMOS and Silero VAD (all
loaded from their wheels, once for the session), a deliberately broken variant (real hibari audio damaged) caught,
noise never given a number, a runaway caught, and the guardrail kept off the timed path."""
import json
import os
import time

import numpy as np
import pytest

from lab import cli, session
from lab.manager import ModelManager
from lab.measure import history, quality, report
from lab.measure.metrics import Timeline
from lab.request import Request
from lab.spec import VariantSpec

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
# Measured: Whisper tiny.en hears hibari's first five Harvard sentences with 3 errors in 41 words (7.3%: "canoe slid"
# heard as "can use slit"). The bound leaves room for one more error, no more.
WER_BOUND = 0.10


def corpus(name: str) -> list[str]:
    with open(os.path.join(DATA, name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def models():
    return quality.models()


@pytest.fixture(scope="module")
def spoken(hibari_engine):
    """hibari's audio for the first five Harvard sentences (seed 0), with its chunk stamps."""
    out = []
    for text in corpus("harvard.txt")[:5]:
        timeline = Timeline()
        audio = np.concatenate([c.samples for c in hibari_engine.stream(Request(text), timeline)])
        out.append((text, audio, timeline.to_dict()["chunks"]))
    return out


@pytest.fixture(scope="module")
def scores(models, spoken):
    return [quality.assess(audio, 24000, text, 10.0, chunks) for text, audio, chunks in spoken]


def record(preset, text, figures, run=1, family="hibari"):
    return {"preset": preset, "family": family, "run": run, "cold": False, "text": text, "seed": 0,
            "weights": "pretrained", **figures}


def test_normalized_wer_counts_a_number_once_whichever_way_it_is_written():
    assert quality.error_rates("The girl at the booth sold fifty bonds.",
                               "the girl at the Booth sold 50 bonds") == (0, 0)
    wer, cer = quality.error_rates("The birch canoe slid on the smooth planks.",
                                   "The birch can use slit on the smooth planks.")
    assert wer == pytest.approx(3 / 8) and 0 < cer < wer


@pytest.mark.slow
def test_hibari_reads_five_corpus_sentences_with_wer_below_the_measured_bound(spoken, scores):
    words = [len(quality.normalize(text).split()) for text, _, _ in spoken]
    corpus_wer = sum(s["wer"] * n for s, n in zip(scores, words)) / sum(words)
    assert corpus_wer < WER_BOUND, [s["transcript"] for s in scores]
    for (text, audio, _), s in zip(spoken, scores):
        assert s["quality"] == "ok" and not s["runaway"], (text, s)
        assert 2.5 < s["mos"] < 5.0                       # DNSMOS reads hibari at 3.0-3.5
        # hibari opens each sentence with about 0.3 s of silence: the VAD puts the onset there, in the first chunk
        assert 0.2 < s["first_speech_s"] == s["leading_silence_s"] < 0.6
        assert 0 < s["first_speech_ms"] < 1000 and s["trailing_silence_s"] < quality.TRAILING_SILENCE_MAX_S


@pytest.mark.slow
def test_a_broken_variant_fails_the_guardrail_and_gets_the_badge(models, spoken, scores):
    text, audio, chunks = spoken[4]
    silenced = audio.copy()
    silenced[len(audio) // 2:] = 0.0                      # real hibari audio, its second half replaced by silence
    broken = quality.assess(silenced, 24000, text, 10.0, chunks)
    assert "silence at the end" in broken["quality"]
    assert broken["wer"] - scores[4]["wer"] > quality.WER_MARGIN
    # Against its family's reference (the first preset of the family in the comparison) it is flagged.
    rows = quality.parity([record("hibari", text, scores[4]), record("hibari-broken", text, broken)])
    assert rows[0]["reference"] == "hibari" and rows[0]["badge"].startswith("⚠ worse than hibari: WER +")
    # The right audio scored against another sentence's text: not the text.
    wrong = quality.assess(spoken[0][1], 24000, spoken[1][0], 10.0, spoken[0][2])
    assert wrong["wer"] > quality.WER_MAX and "not the text" in wrong["quality"]
    # Two presets of the same family giving the same audio: no badge, and a spread of zero.
    same = quality.parity([record("hibari", text, scores[4]), record("hibari-whole", text, scores[4])])
    assert same[0]["badge"] == "" and same[0]["d_wer"]["lo"] == same[0]["d_wer"]["hi"] == 0


@pytest.mark.slow
def test_runaway_is_caught_on_a_hand_built_long_run(models, spoken):
    text, audio, chunks = spoken[0]
    looped = np.tile(audio, 6)                            # one sentence's text, six times its speech: ~16 s
    long = quality.assess(looped, 24000, text, 30.0, chunks)
    assert long["runaway"] and "where the text takes about" in long["quality"]
    # Cut at a 5 s cap in the middle of the second reading: the cap was hit still speaking.
    cut = np.tile(audio, 2)[: int(5.0 * 24000)]
    capped = quality.assess(cut, 24000, text, 5.0, chunks)
    assert capped["runaway"] and "hit the 5 s cap still speaking" in capped["quality"]


@pytest.mark.slow
def test_trimming_hibaris_leading_silence_cuts_nothing_the_guardrail_hears(hibari_trim_engine, spoken, scores):
    """leading_silence: trim against the untrimmed voice, the same five sentences: the same WER, the first word
    still heard, and the VAD's onset where the untrimmed one is, less the cut, with silence still before it."""
    pairs = []
    for (text, padded, _), untrimmed in zip(spoken, scores):
        timeline = Timeline()
        audio = np.concatenate([c.samples for c in hibari_trim_engine.stream(Request(text), timeline)])
        trimmed = quality.assess(audio, 24000, text, 10.0, timeline.to_dict()["chunks"])
        cut_s = (len(padded) - len(audio)) / 24000
        assert trimmed["quality"] == "ok" and trimmed["wer"] == untrimmed["wer"], (text, trimmed["transcript"])
        assert quality.normalize(trimmed["transcript"]).split()[0] == quality.normalize(text).split()[0]
        assert 0 < trimmed["first_speech_s"] < untrimmed["first_speech_s"]
        # Silero VAD decides per 32 ms frame at 16 kHz, so the same onset can move by up to a frame.
        assert trimmed["first_speech_s"] == pytest.approx(untrimmed["first_speech_s"] - cut_s, abs=0.032)
        pairs += [record("hibari", text, untrimmed), record("hibari-trim", text, trimmed)]
    (row,) = quality.parity(pairs)
    assert row["badge"] == "" and row["d_wer"]["median"] == 0

@pytest.mark.slow
def test_random_and_tiny_weights_show_n_a_and_real_speech_is_scored_off_the_timed_path(tmp_path, models):
    path = str(tmp_path / "history.jsonl")
    specs = [VariantSpec(family="pocket_tts", name="pocket-random", weights="random"),
             VariantSpec(family="pocket_tts", name="pocket-tiny", weights="tiny"),
             VariantSpec(family="hibari", name="hibari")]
    worker = quality.Worker()
    records = []
    # Noise briefly (random weights never stop before the cap), then hibari saying it whole.
    for chosen, cap_s in ((specs[:2], 0.3), (specs[2:], 5.0)):
        records += [e.record for e in session.run_presets(ModelManager(), chosen, Request("Two short words.",
                    max_audio_s=cap_s), 1, history_path=path, quality=worker) if isinstance(e, session.RunDone)]
    assert worker.join(timeout_s=120)
    worker.close()
    by = {name: [r for r in records if r["preset"] == name] for name in ("pocket-random", "pocket-tiny", "hibari")}
    assert {r["quality"] for r in by["pocket-random"]} == {"n/a (random weights)"}
    assert {r["quality"] for r in by["pocket-tiny"]} == {"n/a (tiny weights)"}
    assert not any("wer" in r or "mos" in r for r in by["pocket-random"] + by["pocket-tiny"])
    assert all(r["quality"] == "ok" and r["wer"] is not None for r in by["hibari"])
    # The tables say n/a where a number would be, and score hibari.
    table = {row["preset"]: row for row in report.summary_table(report.summary_rows(records))}
    assert table["pocket-random"]["WER % (warm median)"] == "n/a"
    assert table["pocket-random"]["quality"] == "n/a (random weights)"
    assert isinstance(table["hibari"]["WER % (warm median)"], float) and table["hibari"]["quality"] == "ok"
    assert {row["MOS est."] for row in report.run_table(by["pocket-random"])} == {"n/a"}
    # The history holds each run once, with its quality folded back in from the worker's own line.
    runs = quality.merged(history.read(path))
    assert len(runs) == 6 and all("wer" in r for r in runs if r["preset"] == "hibari")


def job(worker, text, chunks):
    """A record of one hibari run as the run loop hands it over, marked pending."""
    rec = {"preset": "hibari", "text": text, "sample_rate": 24000, "max_audio_s": 10.0, "weights": "pretrained",
           "timeline": {"chunks": chunks}, "time": time.time()}
    assert worker.prepare(rec)
    return rec


def cpu_ticks(pid: int) -> int:
    """CPU time of a process, all its threads, user and system, in clock ticks (/proc/PID/stat utime + stime)."""
    fields = stat(pid)
    return int(fields[11]) + int(fields[12])


def stat(pid: int) -> list[str]:
    """/proc/PID/stat after the command name: [0] is the state ("T" stopped), [11] and [12] utime and stime."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def submit_and_wait_until_scoring(worker, rec, audio):
    """Submits a job to a worker whose scorer has its models loaded, and returns once the scorer has spent 50 ms of
    CPU on it (an idle scorer sleeps on its pipe and spends none)."""
    pid = worker.pid
    before = cpu_ticks(pid)
    worker.submit(rec, audio)
    deadline = time.monotonic() + 60
    while cpu_ticks(pid) < before + 5:
        assert time.monotonic() < deadline, "the scorer never started on the job"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def warm_worker(spoken):
    """A Worker whose scorer process has loaded its models (one run scored)."""
    worker = quality.Worker()
    text, audio, chunks = spoken[4]
    rec = job(worker, text, chunks)
    worker.submit(rec, audio)
    assert worker.join(timeout_s=120) and rec["quality"] == "ok", rec["quality"]
    yield worker
    worker.close()


@pytest.mark.slow
def test_the_worker_waits_while_a_run_loop_holds_it(models, spoken):
    text, audio, chunks = spoken[1]
    worker = quality.Worker()
    rec = job(worker, text, chunks)
    with worker.hold():
        worker.submit(rec, audio)
        assert not worker.join(timeout_s=1.0) and rec["quality"] == quality.PENDING
    assert worker.join(timeout_s=60) and rec["quality"] == "ok"
    worker.close()


@pytest.mark.slow
def test_hold_returns_at_once_while_a_score_is_in_progress_and_the_score_ends_after_release(warm_worker, spoken,
                                                                                             scores):
    """The issue's bound: a run's start is never delayed more than 20 ms by the scorer, whatever it is doing."""
    waits_s = []
    for i in range(3):
        text, audio, chunks = spoken[i]
        rec = job(warm_worker, text, chunks)
        submitted = time.monotonic()
        submit_and_wait_until_scoring(warm_worker, rec, audio)
        asked = time.perf_counter()
        with warm_worker.hold():
            waits_s.append(time.perf_counter() - asked)
            held = time.monotonic()
            assert rec["quality"] == quality.PENDING          # the score was in progress, and is paused
            time.sleep(0.3)
            assert rec["quality"] == quality.PENDING
            held_s = time.monotonic() - held
        assert warm_worker.join(timeout_s=120)
        took_s = time.monotonic() - submitted
        # The scorer's process gives what this one does (greedy ASR: the same audio, the same transcript).
        assert rec["quality"] == "ok" and rec["transcript"] == scores[i]["transcript"], rec
        assert rec["wer"] == scores[i]["wer"] < quality.WER_MAX and rec["mos"] == pytest.approx(scores[i]["mos"],
                                                                                               abs=0.01)
        # Its cost leaves out the time it was paused (all of it inside the score).
        assert 0 < rec["asr_s"] < rec["quality_s"] <= took_s - held_s, (rec["quality_s"], took_s, held_s)
    assert max(waits_s) < 0.020, waits_s


@pytest.mark.slow
def test_the_scorer_takes_no_cpu_while_held_and_goes_on_when_released(warm_worker, spoken):
    text, audio, chunks = spoken[3]
    mid, queued = job(warm_worker, text, chunks), job(warm_worker, text, chunks)
    pid = warm_worker.pid
    submit_and_wait_until_scoring(warm_worker, mid, audio)
    with warm_worker.hold():
        warm_worker.submit(queued, audio)                   # a job submitted while held waits for the release
        time.sleep(0.05)   # the kernel adds a thread's time on a core at its next tick
        before = cpu_ticks(pid)
        time.sleep(0.5)
        assert cpu_ticks(pid) == before
        assert mid["quality"] == queued["quality"] == quality.PENDING
    assert warm_worker.join(timeout_s=120)
    assert mid["quality"] == queued["quality"] == "ok" and mid["transcript"] == queued["transcript"]
    assert cpu_ticks(pid) > before and stat(pid)[0] != "T" and warm_worker.pid == pid


@pytest.mark.slow
def test_a_scorer_killed_mid_job_costs_that_job_only_and_the_next_gets_a_fresh_one(spoken):
    import signal

    worker = quality.Worker()
    text, audio, chunks = spoken[2]
    first = job(worker, text, chunks)
    worker.submit(first, audio)
    assert worker.join(timeout_s=120) and first["quality"] == "ok"
    killed = job(worker, text, chunks)
    old = worker.pid
    submit_and_wait_until_scoring(worker, killed, audio)
    os.kill(old, signal.SIGKILL)                             # as the OOM killer would
    assert worker.join(timeout_s=60)
    assert killed["quality"] == "not scored: the scorer process was killed by SIGKILL" and "wer" not in killed
    after = job(worker, text, chunks)
    worker.submit(after, audio)
    assert worker.join(timeout_s=120) and after["quality"] == "ok" and after["wer"] == first["wer"]
    fresh = worker.pid
    assert fresh not in (None, old)
    worker.close()
    assert worker.pid is None and not os.path.exists(f"/proc/{fresh}")


@pytest.mark.slow
def test_the_scorer_ends_with_its_server_even_while_paused(tmp_path):
    """A server killed while a run held the worker: its paused scorer would never read the end of its pipe."""
    import subprocess
    import sys

    script = tmp_path / "server.py"
    script.write_text(
        "import os, time\n"
        "import numpy as np\n"
        "from lab.measure import quality\n"
        "worker = quality.Worker()\n"
        "rec = {'preset': 'x', 'time': 0, 'text': 'Hello.', 'sample_rate': 24000, 'weights': 'pretrained'}\n"
        "worker.prepare(rec)\n"
        "worker.submit(rec, np.zeros(24000, np.float32))\n"
        "assert worker.join(timeout_s=120)\n"
        "worker.submit(rec, np.zeros(24000, np.float32))\n"
        "with worker.hold():\n"
        "    print(worker.pid, flush=True)\n"
        "    os._exit(0)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                         env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(DATA))})
    pid = int(out.stdout)
    deadline = time.monotonic() + 10
    while (state := scorer_state(pid)) not in (None, "Z"):   # gone, or dead and not yet reaped
        assert time.monotonic() < deadline, f"the scorer outlived its server, in state {state}"
        time.sleep(0.05)


def scorer_state(pid: int) -> str | None:
    try:
        return stat(pid)[0]
    except FileNotFoundError:
        return None


@pytest.mark.slow
def test_cli_quality_adds_the_figures_and_the_models_to_results(tmp_path, models):
    out = tmp_path / "out"
    assert cli.main(["--presets", "hibari", "--runs", "1", "--quality", "--text", corpus("harvard.txt")[1],
                       "--out", str(out), "--history", ""]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "Whisper tiny.en" in results["env"]["quality_asr"] and "DNSMOS" in results["env"]["quality_mos"]
    assert all(r["wer"] == 0 and r["quality"] == "ok" and r["first_speech_ms"] > 0 for r in results["runs"])
    header, *rows = (out / "results.csv").read_text().splitlines()
    assert {"wer", "cer", "mos", "first_speech_ms", "quality"} <= set(header.split(",")) and len(rows) == 2


@pytest.mark.slow
def test_the_compare_view_fills_in_quality_after_the_runs_with_parity_against_the_family_reference(models):
    from web.view import CompareView

    specs = [VariantSpec(family="hibari", name="hibari"), VariantSpec(family="hibari", name="hibari-whole",
                                                                     streaming="whole")]
    worker = quality.Worker()
    view = CompareView(specs, 1, False, "pcm", "test")
    events = session.run_presets(ModelManager(), specs, Request(corpus("harvard.txt")[5]), 1, quality=worker)
    during = [u for u in view.updates(events)]
    done = view.finish(False)
    assert "quality: scoring 4 runs" in done["overall"]
    assert any("scoring" in u.get(("quality", 0), "") for u in during)      # said at its PresetDone, not a number
    filled = [u for u in view.quality_updates(poll_s=0.05) if u]
    worker.close()
    last = filled[-1]
    assert "quality scored" in last["overall"] and "WER **0.0 %**" in last[("quality", 0)]
    # hibari-whole is the same voice held back: the same audio, so no badge against hibari, its family's reference
    (row,) = last["parity"]
    assert (row["preset"], row["reference"], row["ΔWER points"], row["badge"]) == (
        "hibari-whole", "hibari", "+0.0 (+0.0 – +0.0)", "ok")
    assert {line["quality"] for line in last["summary"]} == {"ok"}


@pytest.mark.slow
def test_a_newer_comparison_waits_until_the_older_ones_quality_handler_has_let_go(models):
    """The older comparison's quality handler runs over a Gradio event of its own. Its last update must not land
    after the newer comparison's first (which clears the tables): CI once saw the old "done:" reappear there."""
    import threading

    from web.view import CompareView

    specs = [VariantSpec(family="hibari", name="hibari")]
    worker = quality.Worker()
    view = CompareView(specs, 1, False, "pcm", "test")
    with worker.hold():   # nothing is scored while held: the handler keeps waiting, as with a slow scorer
        list(view.updates(session.run_presets(ModelManager(), specs, Request(corpus("harvard.txt")[5]), 1,
                                              quality=worker)))
        assert "scoring 2 runs" in view.finish(False)["overall"]
        updates, exhausted = [], threading.Event()

        def gradio_like():   # asks for the next update only after handling the last one, as Gradio's queue does
            for u in view.quality_updates(poll_s=0.05):
                updates.append(u)
            exhausted.set()

        handler = threading.Thread(target=gradio_like)
        handler.start()
        time.sleep(0.3)
        assert not exhausted.is_set() and updates == [{}] * len(updates)
        started = time.perf_counter()
        view.supersede()
        waited_s = time.perf_counter() - started
        after = len(updates)
        assert exhausted.wait(1.0), "the superseded handler did not end"
        assert len(updates) == after and waited_s < 0.5, (len(updates), after, waited_s)
        # A second handler on the same (or a superseded) comparison gets nothing.
        assert list(view.quality_updates(poll_s=0.05)) == []
        handler.join()
    assert worker.join(timeout_s=60)   # released, it scores the two runs: let it finish before the next test
    worker.close()
