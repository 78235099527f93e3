"""What every engine is, with no torch: the Engine a build returns, its BuildReport, and the StageClock that times a
build's stages. The torch engines' shared half is lab.engines.torch_common (TorchEngine); the registry that picks a
family's module is the package, lab.engines.
"""
from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from lab.audio import AudioChunk
from lab.measure.metrics import Timeline
from lab.request import Request
from lab.spec import VariantSpec

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
        A runtime's count outlives a request and variants of different counts take turns, so every request sets it."""
        raise NotImplementedError(f"{type(self).__name__} must say how it sets its threads (use_threads), or derive "
                                  f"from lab.engines.torch_common.TorchEngine")

    def busy(self) -> bool:
        return self._lock.locked()

    def close(self) -> None:
        """Drop everything but the spec, sample rate, build report and bookkeeping, so the model, caches and graphs
        can be freed (the manager collects garbage and empties the CUDA cache after close)."""
        for name in [name for name in vars(self) if name not in self.KEEP_ON_CLOSE]:
            delattr(self, name)

    def reset_peak_memory(self) -> None:
        self._memory_baseline_bytes = reset_process_peak()

    def peak_memory_bytes(self) -> int:
        """This variant's peak in the last run: the process's peak resident memory during the run, every resident
        variant included (TorchEngine counts a GPU's own way)."""
        return process_peak_bytes()


def reset_process_peak() -> int:
    """Resets the process's resident high-water mark to its current size (Linux), so the next peak is the run's;
    returns the baseline to subtract, which on the host is none."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # Linux: reset VmHWM to the current resident size
    except OSError:
        pass
    return 0


def process_peak_bytes() -> int:
    """The process's peak resident memory since reset_process_peak (VmHWM), every variant resident in it counted."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
