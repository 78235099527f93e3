"""ModelManager: one build per spec under concurrency, failures kept to their spec, eviction frees memory."""
import gc
import threading
import weakref

import pytest

from lab import engines
from lab.engines.base import BuildReport, Engine
from lab.errors import LabError
from lab.manager import ModelManager
from lab.measure.metrics import Timeline
from lab.request import Request
from lab.spec import VariantSpec

TINY = VariantSpec(family="csm", weights="tiny")


def counting_builder():
    calls = []

    def build(spec, progress):
        calls.append(spec.key)
        return engines.build(spec, progress)

    return build, calls


def test_concurrent_requests_for_one_spec_share_a_single_build():
    builder, calls = counting_builder()
    manager = ModelManager(builder=builder)
    start = threading.Barrier(6)
    got = []

    def worker(spec):
        start.wait()
        got.append(manager.get(spec))

    # Six threads, three of them with a differently named but equal spec.
    threads = [threading.Thread(target=worker, args=(TINY.replace(name=f"copy{i % 2}"),)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len({id(e) for e in got}) == 1
    assert manager.get(TINY) is got[0] and len(calls) == 1


def test_a_failed_build_is_reported_for_its_spec_only():
    builder, calls = counting_builder()
    manager = ModelManager(builder=builder)
    good = manager.get(TINY)
    bad = VariantSpec(family="csm", model="/nonexistent/csm", weights="pretrained")
    with pytest.raises(LabError, match="is not a directory with a saved model"):
        manager.get(bad)
    with pytest.raises(LabError):       # not cached: asking again tries again
        manager.get(bad)
    assert calls.count(bad.key) == 2
    assert manager.get(TINY) is good
    assert len(list(good.stream(Request("Still works.", max_audio_s=0.5), Timeline()))) >= 1


@pytest.mark.slow
def test_lru_eviction_under_budget_really_frees_the_model(csm_tiny):
    # csm_tiny is the same tiny model (only its chunking differs): its size sets a budget with room for one
    budget = csm_tiny.report.memory_bytes + csm_tiny.report.memory_bytes // 2
    manager = ModelManager(memory_budget_bytes=budget)
    a = manager.get(TINY)
    model_ref = weakref.ref(a.model)
    del a
    b = manager.get(TINY.replace(attention="eager"))
    gc.collect()
    assert model_ref() is None, "the evicted variant's model is still alive"
    assert manager.built() == [b]
    assert manager.memory_bytes() <= budget
    builder_calls_before = manager.builds
    manager.get(TINY)                     # evicted, so it is built again, and now evicts the other one
    assert manager.builds == builder_calls_before + 1 and len(manager.built()) == 1


def test_a_variant_that_is_streaming_is_not_evicted_under_it(csm_tiny):
    manager = ModelManager(memory_budget_bytes=csm_tiny.report.memory_bytes + csm_tiny.report.memory_bytes // 2)
    busy = manager.get(TINY)
    stream = busy.stream(Request("A long enough request to hold the engine.", max_audio_s=2.0), Timeline())
    next(stream)                                   # mid-stream: the engine is in use
    manager.get(TINY.replace(attention="eager"))   # over budget, but the only candidate is busy
    rest = list(stream)                            # the stream finishes on an intact model
    assert rest and busy.model is not None
    assert len(manager.built()) == 2


def test_a_variant_over_the_budget_alone_is_freed_before_the_next_one_builds():
    events = []

    class Big(Engine):
        def __init__(self, name):
            super().__init__(TINY, 24000, BuildReport(memory_bytes=12))
            self.name = name

        def close(self):
            events.append(f"freed {self.name}")

    def build(spec, progress):
        events.append(f"build {spec.name}")
        return Big(spec.name)

    manager = ModelManager(memory_budget_bytes=10, builder=build)
    manager.get(TINY.replace(name="a"))
    manager.get(TINY.replace(name="b", attention="eager"))
    assert events == ["build a", "freed a", "build b"]
