"""Engines: one module per model family, each wrapping the real model class.

`build(spec)` is the only way in: it imports the family's module lazily, so a CPU-only install never
imports what it does not use.
"""
from __future__ import annotations

import importlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator


from lab.metrics import Timeline
from lab.request import Request
from lab.spec import FAMILIES, VariantSpec
from lab.streaming import AudioChunk  # noqa: F401  (the engines' chunk type, re-exported for them)

# progress(stage, seconds_so_far): stage is "loading" or "warming up" / "compiling"
Progress = Callable[[str, float], None]


@dataclass
class BuildReport:
    load_s: float = 0.0
    warmup_s: float = 0.0       # compile or warm-up; the first request after it is still reported as cold
    params: int = 0
    memory_bytes: int = 0       # weights and buffers held by the variant; what eviction frees
    peak_mem_bytes: int = 0     # peak accelerator memory during build (CUDA), else resident host memory
    tokenizer: str = ""         # which tokenizer the variant uses; "byte-level stand-in" for random/tiny
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Engine:
    """A built variant. Subclasses call `Engine.__init__` first, then set what their step needs, and implement
    _stream()."""

    # What close() keeps: the variant's identity and its bookkeeping. Everything else an engine set on itself
    # (model, codec, caches, graphs, compiled steps) is dropped, so no engine lists its attributes by hand.
    KEEP_ON_CLOSE = frozenset({"spec", "sample_rate", "report", "_lock", "served", "_memory_baseline_bytes",
                               "threads"})

    def __init__(self, spec: VariantSpec, sample_rate: int, report: BuildReport | None = None):
        self.spec = spec
        self.sample_rate = sample_rate
        self.report = report if report is not None else BuildReport()
        # One request at a time per engine: caches and codec streaming state belong to the request in flight.
        self._lock = threading.Lock()
        # Whether a request has run to its end on this engine: its first one is the cold one (any compile or
        # capture left over from the build lands there). Kept on the engine, so a variant evicted and built again
        # is cold again; `build` clears it after the build's own warm-up.
        self.served = False
        self._memory_baseline_bytes = 0   # what other variants held when this one's peak-memory window opened
        self.threads = 0                  # the CPU threads its latest request ran on (Engine.use_threads)

    def stream(self, request: Request, timeline: Timeline,
               cancel: threading.Event | None = None) -> Iterator[AudioChunk]:
        """Yields AudioChunks as soon as each is decoded, stamping `timeline`. A second caller waits for the
        request in flight."""
        with self._lock:
            self.threads = self.use_threads()
            yield from self._stream(request, timeline, cancel)
            self.served = True

    def _stream(self, request: Request, timeline: Timeline, cancel: threading.Event | None) -> Iterator[AudioChunk]:
        raise NotImplementedError

    def use_threads(self) -> int:
        """Sets the threads this variant's kernels run on for the request about to start, and returns the count.
        torch's count outlives a request and variants of different counts take turns, so every request sets it."""
        from lab.engines import torch_common as tc

        return tc.use_threads(self.spec)

    def busy(self) -> bool:
        return self._lock.locked()

    def close(self) -> None:
        """Drop everything but the spec, sample rate, build report and bookkeeping, so the model, caches and graphs
        can be freed (the manager collects garbage and empties the CUDA cache after close)."""
        for name in [name for name in vars(self) if name not in self.KEEP_ON_CLOSE]:
            delattr(self, name)

    def reset_peak_memory(self) -> None:
        from lab.engines import torch_common as tc

        self._memory_baseline_bytes = tc.reset_peak_memory(self.spec.device)

    def peak_memory_bytes(self) -> int:
        """This variant's peak in the last run. GPU: what it holds resident (weights, static caches) plus the
        run's transient peak; other variants the manager keeps do not count. CPU: the process's peak resident
        memory during the run, every resident variant included."""
        from lab.engines import torch_common as tc

        if self.spec.device != "cuda":
            return tc.peak_memory_bytes("cpu")
        return self.report.memory_bytes + tc.peak_memory_bytes("cuda", self._memory_baseline_bytes)


FAMILY_MODULES = {"csm": "lab.engines.csm", "pocket_tts": "lab.engines.pocket_tts", "hibari": "lab.engines.hibari",
                  "minicpm_o": "lab.engines.minicpm_o", "qwen2.5-omni": "lab.engines.qwen_omni"}


def build(spec: VariantSpec, progress: Progress | None = None) -> Engine:
    module = importlib.import_module(FAMILY_MODULES[spec.family])
    if FAMILIES[spec.family]["torch"]:   # before the build's warm-up, which is where inductor compiles
        from lab.engines import torch_common as tc

        tc.use_threads(spec)
    engine = module.build(spec, progress or (lambda stage, s: None))
    engine.served = False   # the build's own warm-up requests do not make the first caller's request warm
    return engine


class StageClock:
    """Times build stages and reports them to a progress callback while they run. `sync` waits for the
    device, so work a stage queued on the GPU is counted in that stage."""

    def __init__(self, progress: Progress, sync: Callable[[], None] = lambda: None):
        self.progress = progress
        self.sync = sync

    def run(self, stage: str, fn: Callable[[], object]) -> tuple[object, float]:
        t0 = time.perf_counter()
        done = threading.Event()

        def tick():
            while not done.wait(0.5):
                self.progress(stage, time.perf_counter() - t0)

        self.progress(stage, 0.0)
        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        try:
            out = fn()
            self.sync()
        finally:
            done.set()
        seconds = time.perf_counter() - t0
        self.progress(stage, seconds)
        return out, seconds
