"""ModelManager: builds each VariantSpec once, lazily, thread-safe; evicts least-recently-used variants
when the memory budget would be exceeded.

Concurrent requests for one spec wait on a single build. A failed build raises for that spec only; it is
not cached, so fixing the cause (installing a package, caching weights) and asking again works.
"""
from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from typing import Callable

from lab import cards, engines, gpu, machine
from lab.engines.base import Engine, Progress
from lab.spec import VariantSpec


class _Slot:
    def __init__(self):
        self.done = threading.Event()
        self.engine: Engine | None = None
        self.error: BaseException | None = None


class ModelManager:
    def __init__(self, memory_budget_bytes: int | None = None,
                 builder: Callable[[VariantSpec, Progress], Engine] = engines.build,
                 card: Callable[[], "gpu.Card | None"] | None = None):
        self.memory_budget_bytes = memory_budget_bytes
        self._build = builder
        # The card presets are adapted to, read at each build (its free memory changes); looked up by name at each
        # build so that a test's stand-in card counts.
        self._card = card or (lambda: gpu.this_card())
        self._lock = threading.Lock()
        self._slots: OrderedDict[str, _Slot] = OrderedDict()   # oldest use first
        self.builds = 0                                        # builds started, for tests and the UI

    def get(self, spec: VariantSpec, progress: Progress | None = None) -> Engine:
        # A GPU or a package this machine lacks is refused here, with the fix, not as an ImportError mid-build.
        # Pretrained weights are left to the loader, which says the same when they are neither cached nor reachable.
        machine.require(spec, weights_here=lambda s: True)
        # The card's changes (fp16 without bf16, features it lacks, fewer stream slots) or its refusal, before any
        # load; the variant stays keyed by the spec asked for.
        adapted = cards.require(spec, self._card()) if spec.device == "cuda" else cards.Adapted(spec)
        with self._lock:
            slot = self._slots.get(spec.key)
            owner = slot is None
            if owner:
                slot = self._slots[spec.key] = _Slot()
                self.builds += 1
            self._slots.move_to_end(spec.key)
        if not owner:
            slot.done.wait()
            if slot.error is not None:
                raise slot.error
            return slot.engine
        # Before building too: a variant already over the budget on its own (an 8B model under a 16 GB budget)
        # would otherwise stay resident while the next one loads beside it.
        self._evict_over_budget(keep=spec.key)
        try:
            engine = self._build(adapted.spec, progress or (lambda stage, s: None))
            engine.report.notes[:0] = [*adapted.changes, *adapted.notes]
        except BaseException as e:
            slot.error = e
            with self._lock:
                if self._slots.get(spec.key) is slot:
                    del self._slots[spec.key]   # not cached: the next request tries again
            slot.done.set()
            raise
        slot.engine = engine
        slot.done.set()
        self._evict_over_budget(keep=spec.key)
        return engine

    def built(self) -> list[Engine]:
        with self._lock:
            return [s.engine for s in self._slots.values() if s.engine is not None]

    def memory_bytes(self) -> int:
        return sum(e.report.memory_bytes for e in self.built())

    def evict(self, spec: VariantSpec) -> bool:
        """Drop a built, idle variant. A variant still building or streaming is left alone."""
        with self._lock:
            slot = self._slots.get(spec.key)
            if slot is None or slot.engine is None or slot.engine.busy():
                return False
            del self._slots[spec.key]
        self._free(slot.engine)
        return True

    def _evict_over_budget(self, keep: str) -> None:
        if self.memory_budget_bytes is None:
            return
        while True:
            with self._lock:
                total = sum(s.engine.report.memory_bytes for s in self._slots.values() if s.engine is not None)
                # Oldest first; never one that is building (no engine yet) or streaming right now.
                victims = [k for k, s in self._slots.items()
                           if k != keep and s.engine is not None and not s.engine.busy()]
                if total <= self.memory_budget_bytes or not victims:
                    return
                slot = self._slots.pop(victims[0])
            self._free(slot.engine)

    @staticmethod
    def _free(engine: Engine) -> None:
        engine.close()
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass
