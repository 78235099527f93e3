"""lab.session, the one run loop the CLI and both tabs consume: its events in order, cold and heard runs, the
history it writes, one failing preset among others, a cancel, and a consumer adding to a record before it is
written. Real tiny Pocket TTS engines (a few hundred thousand parameters) through the ModelManager."""
import threading

import pytest

from lab import session
from lab.manager import ModelManager
from lab.measure import history
from lab.request import Request
from lab.spec import VariantSpec

TINY_POCKET = VariantSpec(family="pocket_tts", name="pocket-tiny", weights="tiny")
ON_GPU = VariantSpec(family="csm", name="csm-gpu", weights="tiny", device="cuda")   # refused here: no GPU
REQUEST = Request("Two short words.", max_audio_s=0.5)


def names(events):
    return [type(e).__name__ for e in events]


def test_events_come_in_order_with_a_cold_run_then_the_heard_warm_one(tmp_path):
    path = str(tmp_path / "history.jsonl")
    events = list(session.run_presets(ModelManager(), [TINY_POCKET], REQUEST, runs=2, history_path=path,
                                      source="test"))
    kinds = names(events)
    assert kinds[0] == "Started" and kinds[-2:] == ["PresetDone", "Finished"]
    assert kinds.index("Built") < kinds.index("RunStarted") and not events[-1].stopped
    assert "Stage" in kinds[:kinds.index("Built")]
    started = [e for e in events if isinstance(e, session.RunStarted)]
    assert [(e.run, e.cold, e.heard) for e in started] == [(0, True, False), (1, False, True), (2, False, False)]
    chunks = [e for e in events if isinstance(e, session.Chunk)]
    assert chunks and all(c.figures()["ttfb_ms"] > 0 for c in chunks)
    records = history.read(path)
    assert [(r["run"], r["cold"], r["heard"], r["source"]) for r in records] == [
        (0, True, False, "test"), (1, False, True, "test"), (2, False, False, "test")]
    assert all(r["env_commit"] and r["first_audible_ms"] is not None for r in records)


@pytest.mark.slow
def test_one_preset_refused_does_not_stop_the_next(tmp_path):
    events = list(session.run_presets(ModelManager(), [ON_GPU, TINY_POCKET], REQUEST, runs=1))
    failed = [e for e in events if isinstance(e, session.Failed)]
    assert len(failed) == 1 and failed[0].slot == 0 and "no GPU is visible" in failed[0].message
    assert [e.slot for e in events if isinstance(e, session.RunDone)] == [1, 1]


@pytest.mark.slow
def test_a_cancel_mid_run_stops_the_loop_and_records_the_cancelled_run(tmp_path):
    path = str(tmp_path / "history.jsonl")
    cancel = session.Cancel()
    long = Request("Two short words.", max_audio_s=30)
    seen = []
    for e in session.run_presets(ModelManager(), [TINY_POCKET, TINY_POCKET.replace(name="second")], long, 1,
                                 cancel, path):
        seen.append(e)
        if isinstance(e, session.Chunk) and e.run == 0 and e.chunk.index == 2:
            cancel.set()
    stopped = [e for e in seen if isinstance(e, session.Stopped)]
    assert len(stopped) == 1 and stopped[0].record["cancelled"] and stopped[0].record["cancel_s"] is not None
    assert not any(isinstance(e, session.RunStarted) and e.slot == 1 for e in seen)   # the next preset never ran
    assert history.read(path)[-1]["cancelled"]


@pytest.mark.slow
def test_in_background_hands_over_events_and_a_hook_can_add_to_the_record_before_it_is_written(tmp_path):
    path = str(tmp_path / "history.jsonl")
    hook_thread = []

    def hook(e):
        hook_thread.append(threading.current_thread().name)
        if isinstance(e, session.RunDone) and e.heard:
            e.record["heard_ttfb_ms"] = 123.0          # what a browser's report adds

    events = session.run_presets(ModelManager(), [TINY_POCKET], REQUEST, 1, history_path=path)
    got = [e for e in session.in_background(events, on_event=hook, tick_s=0.05) if e is not None]
    assert names(got)[-2:] == ["PresetDone", "Finished"] and set(hook_thread) == {"run loop"}
    heard = [r for r in history.read(path) if r["heard"]]
    assert len(heard) == 1 and heard[0]["heard_ttfb_ms"] == pytest.approx(123.0)


def test_closing_the_background_generator_cancels_the_loop():
    cancel = session.Cancel()
    long = Request("Two short words.", max_audio_s=60)
    events = session.run_presets(ModelManager(), [TINY_POCKET], long, 1, cancel)
    consumer = session.in_background(events, cancel=cancel, tick_s=0.05)
    for e in consumer:
        if isinstance(e, session.Chunk):
            break
    consumer.close()                                    # what a closed page does to the handler
    assert cancel.is_set()
    assert not any(t.name == "run loop" and t.is_alive() for t in threading.enumerate())   # it stopped, too


def test_a_journal_estimates_as_its_records_do_and_keeps_up_with_new_runs(tmp_path):
    journal = history.Journal(str(tmp_path / "history.jsonl"))
    journal.append({"preset": "a", "cold": False, "rtf": 0.5, "audio_s": 2.0})
    assert journal.estimate_s(["a"], runs=2) == pytest.approx(history.estimate_s(journal.read(), ["a"], 2)) == 3.0
    journal.append({"preset": "a", "cold": False, "rtf": 1.5, "audio_s": 2.0})    # after it read the file once
    journal.append({"preset": "b", "cold": True, "rtf": 1.0, "audio_s": 2.0})
    assert journal.estimate_s(["a"], runs=0) == pytest.approx(history.estimate_s(journal.read(), ["a"], 0)) == 2.0
    assert journal.estimate_s(["a", "b"], runs=1) is None       # b has only a cold run


def test_the_model_line_is_first_come_first_served_and_estimates_from_measured_runs():
    from lab.measure.history import estimate_s
    from lab.serving.line import ModelLine

    records = [{"preset": "a", "cold": False, "rtf": 0.5, "audio_s": 2.0}, {"preset": "a", "cold": True, "rtf": 9,
                                                                           "audio_s": 2.0}]
    assert estimate_s(records, ["a"], runs=2) == pytest.approx(3.0)       # 1 s a run, 3 runs; the cold one left out
    assert estimate_s(records, ["a", "never-ran"], runs=2) is None
    line = ModelLine()
    first, second = line.turn(3.0, session.Cancel()), line.turn(None, session.Cancel())
    order = []
    with first:
        waiter = threading.Thread(target=lambda: (second.__enter__(), order.append("second"), second.__exit__()))
        waiter.start()
        while second not in line._line:
            pass
        ahead, left_s = second.waiting()
        assert ahead == 1 and 0 < left_s <= 3.0
        order.append("first")
    waiter.join(timeout=5)
    assert order == ["first", "second"]
