import os

import numpy as np

from lab.metrics import Timeline, figures
from lab.request import Request


def test_hibari_speaks_a_sentence_as_non_silent_24khz_audio(hibari_engine):
    text = "The lab measures how fast each voice starts talking."
    tl = Timeline()
    chunks = list(hibari_engine.stream(Request(text), tl))
    audio = np.concatenate([c.samples for c in chunks])
    assert chunks[0].sample_rate == 24000 and audio.dtype == np.float32
    # About 9 words: a natural reading takes roughly 2 to 5 seconds.
    assert 1.5 < len(audio) / 24000 < 6.0
    assert np.sqrt(np.mean(audio ** 2)) > 0.01


def test_hibari_streams_one_chunk_per_sentence_and_respects_the_cap(hibari_engine):
    text = "First sentence here. Second one follows. And a third."
    tl = Timeline()
    chunks = list(hibari_engine.stream(Request(text), tl))
    assert len(chunks) == 3
    # Streamed, not batched: the first sentence is on the host before the model has run the last one, and each
    # chunk arrives after the one before it.
    assert tl.chunks[0][0] < tl.frames[-1]
    stamps = [t for t, _ in tl.chunks]
    assert stamps[0] < stamps[1] < stamps[2]
    f = figures(tl)
    assert f["ttfb_ms"] < f["wall_s"] * 1e3
    capped = list(hibari_engine.stream(Request(text, max_audio_s=1.0), Timeline()))
    assert sum(len(c.samples) for c in capped) <= 24000


def test_hibari_same_seed_same_audio(hibari_engine):
    a = np.concatenate([c.samples for c in hibari_engine.stream(Request("Same again.", seed=3), Timeline())])
    b = np.concatenate([c.samples for c in hibari_engine.stream(Request("Same again.", seed=3), Timeline())])
    np.testing.assert_array_equal(a, b)


def test_hibari_whole_is_the_same_voice_held_back_until_the_last_sentence(hibari_engine):
    from lab import engines
    from lab.spec import VariantSpec

    whole = engines.build(VariantSpec(family="hibari", name="hibari-whole", streaming="whole"))
    text = "First sentence here. Second one follows. And a third."
    per_sentence, held = Timeline(), Timeline()
    streamed = np.concatenate([c.samples for c in hibari_engine.stream(Request(text, seed=1), per_sentence)])
    chunks = list(whole.stream(Request(text, seed=1), held))
    assert len(chunks) == 1 and len(held.frames) == 3
    np.testing.assert_array_equal(chunks[0].samples, streamed)          # the same audio, sample for sample
    assert held.chunks[0][0] > held.frames[-1]                          # its first byte waits for the last sentence


def test_hibari_threads_axis_sizes_onnx_runtimes_pool_and_speaks_the_same(hibari_engine):
    from lab import engines, session
    from lab.spec import from_dict

    one = engines.build(from_dict({"family": "hibari", "name": "hibari-1-thread", "threads": 1}))
    two = engines.build(from_dict({"family": "hibari", "name": "hibari-2-threads", "threads": 2}))
    text = "Two threads or one, the same voice."
    record, audio = session.run_once(one, one.spec, Request(text, seed=2))
    record_two, reference = session.run_once(two, two.spec, Request(text, seed=2))
    assert record["threads"] == 1 and one.tts.sess.get_session_options().intra_op_num_threads == 1
    assert record_two["threads"] == 2 and two.tts.sess.get_session_options().intra_op_num_threads == 2
    assert "ONNX Runtime on 1 CPU thread " in one.report.notes[0]
    assert hibari_engine.ort_threads == max(1, os.cpu_count() - 1)   # threads: auto leaves a core free
    # the same durations, and samples that differ by rounding only (the pools sum in another order)
    assert len(audio) == len(reference)
    error = np.linalg.norm(audio - reference) / np.linalg.norm(reference)
    print(f"1 thread against 2: relative error {error:.2e}")
    assert error < 0.05
