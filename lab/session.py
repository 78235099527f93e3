"""The one run loop: build each preset, run it a cold run plus N warm runs, stamp each record, append it to the
history, and say what happened as typed events. The CLI (lab.bench), the Compare tab and the A/B tab all consume
`run_presets`; none of them keeps a loop of its own.

    for event in run_presets(manager, specs, request, runs=5):
        ...   # Stage, Built, RunStarted, Chunk, RunDone, Failed, Stopped, PresetDone

A consumer that does slow work per event (a web page encoding audio, drawing charts) must not do it inside the
timed loop: `in_background` runs the loop in its own thread and hands the events over through a queue. A
consumer may add to a record while it handles RunDone (the browser's figures): the loop appends the record to the
history only when it resumes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from lab import env, zerogpu
from lab.audio import AudioChunk
from lab.engines.base import BuildReport
from lab.errors import Cancelled, LabError
from lab.measure import history
from lab.measure.metrics import Timeline, figures
from lab.request import Request
from lab.serving.background import Background
from lab.serving.line import Cancel
from lab.spec import VariantSpec


# -- events: `slot` is the preset's place in the list it was given ----------------------------------------------
@dataclass(frozen=True)
class Started:
    """The loop holds the model (the lock it was given) and starts."""


@dataclass(frozen=True)
class Stage:
    slot: int
    preset: str
    stage: str          # "loading", "compiling", ... (the engine's StageClock names)
    seconds: float


@dataclass(frozen=True)
class Built:
    slot: int
    preset: str
    report: BuildReport


@dataclass(frozen=True)
class RunStarted:
    slot: int
    preset: str
    run: int
    cold: bool
    # The run a listener hears: each preset's first warm run, so that what is heard starts as it would on a served
    # model (a cold run pays for compiles and first-touch allocations that a served model does not).
    heard: bool
    spec: VariantSpec


@dataclass(frozen=True)
class Chunk:
    slot: int
    preset: str
    run: int
    cold: bool
    chunk: AudioChunk
    timeline: Timeline      # a snapshot, safe to read in another thread
    audible_at: int         # index in this chunk of the run's first audible sample, or -1
    heard: bool

    def figures(self) -> dict:
        return figures(self.timeline)


@dataclass(frozen=True)
class RunDone:
    slot: int
    preset: str
    record: dict
    audio: np.ndarray
    heard: bool


@dataclass(frozen=True)
class Failed:
    slot: int
    preset: str
    message: str        # one line: the lab's own message names the field and the fix


@dataclass(frozen=True)
class Stopped:
    slot: int
    preset: str
    record: dict | None     # the cancelled run's record (its frame times against the cancel), if one was running


@dataclass(frozen=True)
class PresetDone:
    slot: int
    preset: str


@dataclass(frozen=True)
class NotSaved:
    """The history could not be written (said once per loop): the runs finished and are shown all the same."""
    message: str        # names the file (as a visitor may see it) and the fix


@dataclass(frozen=True)
class Finished:
    """The loop's last event, once it has let go of the line: nothing more runs for this comparison."""
    stopped: bool       # a cancel ended it


Event = Started | Stage | Built | RunStarted | Chunk | RunDone | Failed | Stopped | PresetDone | NotSaved | Finished


def error_text(e: BaseException) -> str:
    """One line for a person: a LabError already names the field and the fix; anything else is named by its type,
    and its traceback goes to the log."""
    if isinstance(e, LabError):
        return str(e)
    import traceback

    traceback.print_exception(e)
    return f"{type(e).__name__}: {e} (an unexpected failure; the log has the details)"


def for_family(request: Request, spec: VariantSpec) -> Request:
    """A family that takes no spoken turn gets the request without it (its status says so)."""
    if request.user_audio is None or spec.takes_user_audio:
        return request
    return dataclasses.replace(request, user_audio=None)


# -- one run ---------------------------------------------------------------------------------------------------
def stream_run(engine, spec: VariantSpec, request: Request, cold: bool, run: int, cancel: Cancel | None = None,
               timeline: Timeline | None = None):
    """One request through one engine, as a generator: yields (chunk, index in it of the run's first audible
    sample or -1) as each chunk is ready, and returns (record, audio): the record holds the figures, the timeline
    and the settings. Pass a `timeline` to keep the stamps of a run that raises (a cancelled one)."""
    timeline = timeline if timeline is not None else Timeline()
    engine.reset_peak_memory()
    parts = []
    for chunk in engine.stream(request, timeline, cancel.event if cancel else None):
        parts.append(chunk.samples)
        yield chunk, timeline.listen(chunk.samples, chunk.sample_rate)
    if not parts:
        raise LabError("text", f"{request.text!r} produced no audio on {spec.name}: type words to speak")
    record = {
        "preset": spec.name, "run": run, "cold": cold, "weights": spec.weights, "family": spec.family,
        "spec": spec.identity(), **figures(timeline), "peak_mem_bytes": engine.peak_memory_bytes(),
        "text": request.text, "seed": request.seed, "max_audio_s": request.max_audio_s,
        # a spoken user turn changes what prefill does: runs with and without one must be told apart
        "user_audio_s": request.user_audio_s or 0.0,
        "tokenizer": engine.report.tokenizer, "sample_rate": engine.sample_rate, "threads": engine.threads,
        "timeline": timeline.to_dict(), "time": time.time(),
    }
    if getattr(engine, "last_text", None) is not None:   # models that answer (minicpm_o): what it said
        record["reply_text"] = engine.last_text
    for burst in ("prefill_threads", "decode_threads"):   # what they ran on, which may differ from threads (pocket_tts)
        if getattr(engine, burst, None):
            record[burst] = getattr(engine, burst)
    return record, np.concatenate(parts)


def run_once(engine, spec: VariantSpec, request: Request, cold: bool = False, run: int = 0,
             cancel: Cancel | None = None, timeline: Timeline | None = None) -> tuple[dict, np.ndarray]:
    """`stream_run` to its end: (record, audio). For scripts that time one engine directly."""
    steps = stream_run(engine, spec, request, cold, run, cancel, timeline)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def cancelled_record(spec: VariantSpec, request: Request, timeline: Timeline, cancel_at: float | None,
                     run: int, cold: bool) -> dict:
    """A run stopped by the user or a closed page: which frames were generated, and when, against the moment the
    cancel was asked for (seconds from the request stamp), so a test or a reader can check that generation
    stopped."""
    t0 = timeline.stamp("request")
    if t0 is None:
        t0 = timeline.frames[0] if timeline.frames else (cancel_at or time.perf_counter())
    return {
        "preset": spec.name, "run": run, "cold": cold, "cancelled": True, "weights": spec.weights,
        "family": spec.family, "text": request.text, "seed": request.seed, "max_audio_s": request.max_audio_s,
        "frame_s": [t - t0 for t in timeline.frames],
        "chunk_s": [t - t0 for t, _ in timeline.chunks],
        "cancel_s": None if cancel_at is None else cancel_at - t0,
        # the wall clock of the last frame, to set against when a client went away (a disconnect is a cancel)
        "last_frame_time": time.time() - (time.perf_counter() - timeline.frames[-1]) if timeline.frames else None,
        "audio_s": sum(a for _, a in timeline.chunks), "time": time.time(),
    }


# -- the loop --------------------------------------------------------------------------------------------------
def _build(manager, slot: int, spec: VariantSpec):
    """Builds (or fetches) the variant while yielding its build stages as they happen; returns the engine."""
    stages: queue.Queue = queue.Queue()
    result: dict = {}

    def work():
        try:
            result["engine"] = manager.get(spec, lambda stage, s: stages.put(Stage(slot, spec.name, stage, s)))
        except BaseException as e:   # raised again in the loop's own thread, below
            result["error"] = e
        finally:
            stages.put(None)

    threading.Thread(target=work, daemon=True, name=f"build {spec.name}").start()
    while (stage := stages.get()) is not None:
        yield stage
    if "error" in result:
        raise result["error"]
    return result["engine"]


@zerogpu.gpu   # on a ZeroGPU Space the whole loop runs inside one GPU call; elsewhere this changes nothing
def run_presets(manager, specs: list[VariantSpec], request: Request, runs: int, cancel: Cancel | None = None,
                history_path: "str | history.Journal | None" = None, source: str = "cli", lock=None,
                quality=None) -> Iterator[Event]:
    """Each preset in turn: build it (once; the manager keeps it), then `runs + 1` runs. The first run on a
    freshly built engine is its cold one (engine.served). One failing preset does not stop the others; a cancel
    stops everything. Every finished or cancelled run is appended to `history_path`, stamped with `source` and the
    commit; a history that cannot be written is said once (NotSaved) and the runs go on. `lock` (the page's line)
    is held for the whole loop unless every spec batches. With a `quality` worker (lab.measure.quality.Worker), each
    finished run of real speech is handed to it after RunDone; the loop holds the worker throughout, so no score
    runs beside a timed run."""
    cancel = cancel or Cancel()
    keeper = _Keeper(history_path)
    # The line (`lock`) is for variants that serve one request at a time. A comparison of batching variants only
    # goes straight on: the engine takes every caller's stream into its shared step.
    needs_line = lock is not None and not all(spec.batches for spec in specs)
    with lock if needs_line else contextlib.nullcontext(), quality.hold() if quality else contextlib.nullcontext():
        yield Started()
        for slot, spec in enumerate(specs):
            if cancel.is_set():
                break
            stopped = yield from _run_preset(manager, slot, spec, for_family(request, spec), runs, cancel,
                                             keeper, source, quality)
            yield PresetDone(slot, spec.name)
            if stopped:
                break
    yield Finished(cancel.is_set())


class _Keeper:
    """Appends records to the history; a write that fails is said once (NotSaved) and never stops the loop:
    results first, bookkeeping second."""

    def __init__(self, history_path):
        self.history_path, self.said = history_path, False

    def keep(self, record: dict) -> Iterator[Event]:
        if not self.history_path:
            return
        try:
            history.append(self.history_path, record)
        except history.NotWritten as e:
            if not self.said:
                self.said = True
                yield NotSaved(f"history not written: {e}")


def _run_preset(manager, slot, spec, request, runs, cancel, keeper, source, quality) -> Iterator[Event]:
    """One preset's build and runs; returns True when it was cancelled."""
    stamp = {"source": source, "env_commit": env.git_commit()}
    try:
        engine = yield from _build(manager, slot, spec)
        yield Built(slot, spec.name, engine.report)
        heard_run = None
        for run in range(runs + 1):
            if cancel.is_set():
                raise Cancelled()
            cold, timeline = not engine.served, Timeline()
            if heard_run is None and not cold:
                heard_run = run
            heard = run == heard_run
            yield RunStarted(slot, spec.name, run, cold, heard, spec)
            try:
                steps = stream_run(engine, spec, request, cold, run, cancel, timeline)
                record, audio = yield from _chunk_events(slot, spec.name, run, cold, heard, timeline, steps)
            except Cancelled:
                record = cancelled_record(spec, request, timeline, cancel.at, run, cold)
                yield from keeper.keep({**record, **stamp})
                yield Stopped(slot, spec.name, record)
                return True
            record.update(stamp, heard=heard)
            scored = quality is not None and quality.prepare(record)   # "pending", or n/a for noise
            yield RunDone(slot, spec.name, record, audio, heard)
            # after the consumer had RunDone: it may have added the browser's figures
            yield from keeper.keep(record)
            if scored:
                quality.submit(record, audio, keeper.history_path)
    except Cancelled:
        yield Stopped(slot, spec.name, None)
        return True
    except Exception as e:  # one failing preset must not stop the others
        yield Failed(slot, spec.name, error_text(e))
    return False


def _chunk_events(slot, preset, run, cold, heard, timeline, steps):
    """stream_run's chunks as Chunk events, each with a snapshot of the timeline; returns its (record, audio)."""
    while True:
        try:
            chunk, audible_at = next(steps)
        except StopIteration as done:
            return done.value
        yield Chunk(slot, preset, run, cold, chunk, timeline.copy(), audible_at, heard)


def in_background(events: Iterator[Event], on_event: Callable[[Event], None] | None = None, tick_s: float = 0.1,
                  cancel: Cancel | None = None) -> Iterator[Event | None]:
    """Runs the loop in its own thread (lab.serving.background), so that whatever the caller does with an event
    never pauses generation, and yields its events; None when a `tick_s` went by with nothing new. `on_event` runs
    in the loop's thread before the event is handed over. Closing this generator (a closed page) sets `cancel`,
    and returns once the loop has stopped, at its next frame."""
    return Background(events, on_event, cancel).follow(tick_s)
