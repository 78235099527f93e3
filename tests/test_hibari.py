import os

import numpy as np
import pytest

from lab.measure.metrics import Timeline, figures
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


@pytest.mark.slow
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


def test_hibari_trim_starts_at_the_voice_and_is_the_untrimmed_stream_from_the_cut_on(hibari_engine,
                                                                                      hibari_trim_engine):
    from lab import session
    from lab.engines.hibari import LEAD_MARGIN_S
    from lab.measure.metrics import audible_index

    text = "First sentence here. Second one follows."
    record, padded = session.run_once(hibari_engine, hibari_engine.spec, Request(text, seed=4))
    trimmed_record, trimmed = session.run_once(hibari_trim_engine, hibari_trim_engine.spec, Request(text, seed=4))
    first = list(hibari_engine.stream(Request(text, seed=4), Timeline()))[0].samples
    cut = len(padded) - len(trimmed)
    assert cut == audible_index(first, 24000) - round(LEAD_MARGIN_S * 24000)
    assert cut > 0.2 * 24000                                   # most of the voice's ~0.3 s padded start is gone
    np.testing.assert_array_equal(trimmed, padded[cut:])       # the same samples from the cut on, to the last one
    assert trimmed_record["chunks"] == record["chunks"] == 2   # only the first chunk is shorter
    # A listener hears the voice LEAD_MARGIN_S into the stream instead of about 0.3 s in.
    assert trimmed_record["first_audible_s"] == pytest.approx(LEAD_MARGIN_S)
    assert record["first_audible_s"] - trimmed_record["first_audible_s"] == pytest.approx(cut / 24000)


def test_hibari_trim_keeps_a_first_chunk_with_nothing_audible_whole(hibari_engine, hibari_trim_engine):
    from lab.engines.hibari import lead_cut

    # Capped inside the padded start: the only chunk is silence, and it is not cut to nothing.
    padded = list(hibari_engine.stream(Request("Quiet start.", max_audio_s=0.2), Timeline()))
    trimmed = list(hibari_trim_engine.stream(Request("Quiet start.", max_audio_s=0.2), Timeline()))
    assert len(trimmed) == 1 and len(trimmed[0].samples) == len(padded[0].samples) == int(0.2 * 24000)
    # A voice that is audible within the margin of the first sample: nothing is cut before sample 0.
    loud_at_once = np.concatenate([np.zeros(240, np.float32), np.full(2400, 0.1, np.float32)])
    assert lead_cut(loud_at_once, 24000) == 0
