"""PocketTTS engine on tiny in-process weights (CPU): streaming, exactness against the model's own
generate() and whole-utterance decode, seeding, end of speech, cancel, compile."""
import os
import threading
import time

import numpy as np
import pytest
import torch

from lab.engines import pocket_tts
from lab.errors import Cancelled, LabError
from lab.measure.metrics import PHASES, Timeline
from lab.request import Request
from lab.spec import VariantSpec
from engine_checks import assert_cancel_stops_at_the_next_frame

TEXT = "The quick brown fox jumps over the lazy dog."   # more than four words: 2 frames after end of speech
FRAME_S = 1920 / 24000


def tiny_spec(**changes) -> VariantSpec:
    return VariantSpec(family="pocket_tts", weights="tiny", first_chunk_frames=1, chunk_growth=2.0,
                       max_chunk_frames=4, **changes)


@pytest.fixture(scope="module")
def engine():
    eng = pocket_tts.build(tiny_spec(), lambda stage, seconds: None)
    yield eng
    eng.close()


def run(engine, **request):
    timeline = Timeline()
    chunks = list(engine.stream(Request(text=TEXT, **request), timeline))
    return chunks, timeline


def audio_of(chunks) -> np.ndarray:
    return np.concatenate([c.samples for c in chunks])


def generate_latents(engine, temperature: float, seed: int, num_frames: int, eos_threshold: float):
    """The model's own generate() for the engine's prompt: its latents in the codec's space."""
    prompt_ids, frames_after_eos = engine.build_prompt(Request(text=TEXT))
    torch.manual_seed(seed)  # generate() draws its noise from the global generator
    with torch.no_grad():
        out = engine.model.generate(
            input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=num_frames,
            do_sample=temperature > 0, temperature=temperature or None, frames_after_eos=frames_after_eos,
            eos_threshold=eos_threshold, return_dict_in_generate=True)
    return out.audio_latents[:, : int(out.audio_latents_mask.sum())]


def test_first_chunk_arrives_while_frames_are_still_being_made(engine):
    chunks, timeline = run(engine, max_audio_s=1.0)

    assert len(chunks) >= 3
    assert timeline.chunks[0][0] < timeline.frames[-1]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.samples.dtype == np.float32 and c.sample_rate == 24000 for c in chunks)
    # 1.0 s asked for: whole 80 ms frames, no more
    assert sum(c.audio_s for c in chunks) == pytest.approx(12 * FRAME_S)
    stamps = [(name, t) for name, t in timeline.events]
    assert [name for name, _ in stamps] == ["request", *PHASES]
    assert [t for _, t in stamps] == sorted(t for _, t in stamps)


def test_streamed_chunks_equal_whole_utterance_decode(engine):
    # 2 s of frames runs the codec's transformer past its (tiny) attention window several times
    chunks, _ = run(engine, max_audio_s=2.0, temperature=0.7, seed=1)
    with torch.no_grad():
        whole = engine.codec.decode(engine.last_latents).audio_values[0, 0].numpy()
    fade = engine.fade_in_samples
    whole[:fade] *= np.linspace(0, 1, fade, dtype=np.float32)   # the processor's fade-in, as the stream applies it

    np.testing.assert_allclose(audio_of(chunks), whole, atol=1e-4)


def test_same_seed_same_audio_and_another_seed_differs(engine):
    first, _ = run(engine, max_audio_s=1.0, temperature=0.7, seed=5)
    again, _ = run(engine, max_audio_s=1.0, temperature=0.7, seed=5)
    other, _ = run(engine, max_audio_s=1.0, temperature=0.7, seed=6)

    np.testing.assert_array_equal(audio_of(first), audio_of(again))
    assert not np.allclose(audio_of(first), audio_of(other))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_latents_equal_the_models_own_generate(engine, temperature):
    _, timeline = run(engine, max_audio_s=1.0, temperature=temperature, seed=11)
    # tiny weights ignore end of speech (their head is random), so generate() must too
    expected = generate_latents(engine, temperature, seed=11, num_frames=len(timeline.frames),
                                eos_threshold=float("inf"))

    torch.testing.assert_close(engine.last_latents, expected, atol=1e-6, rtol=0)


def test_stops_at_end_of_speech_like_generate(engine, monkeypatch):
    # An end-of-speech head that fires on every frame: generation must stop where generate() stops,
    # after min_frames_before_eos frames plus the frames after end of speech, well before max_audio_s.
    monkeypatch.setattr(engine, "eos_threshold", -1e9)
    chunks, timeline = run(engine, max_audio_s=5.0)
    expected = generate_latents(engine, 0.0, seed=0, num_frames=100, eos_threshold=-1e9)

    assert len(timeline.frames) == expected.shape[1] == engine.min_frames_before_eos + 1 + 2
    assert sum(c.audio_s for c in chunks) == pytest.approx(expected.shape[1] * FRAME_S)
    torch.testing.assert_close(engine.last_latents, expected, atol=1e-6, rtol=0)


def test_cancel_stops_generation_between_frames(engine):
    assert_cancel_stops_at_the_next_frame(engine, Request(text=TEXT, max_audio_s=5.0))


def test_build_reports_size_and_the_stand_in_tokenizer(engine):
    report = engine.report
    assert report.params > 0
    assert report.memory_bytes >= 4 * report.params   # float32 weights, plus buffers
    assert "stand-in" in report.tokenizer


@pytest.mark.parametrize("model,where", [("eustlb/pocket-tts-not-cached", "weights"), ("./no-such-model", "model")])
def test_missing_pretrained_weights_are_refused_with_the_fix(model, where):
    spec = VariantSpec(family="pocket_tts", weights="pretrained", model=model)
    with pytest.raises(LabError) as err:
        pocket_tts.build(spec, lambda stage, seconds: None)
    assert err.value.where == where
    assert "weights: random" in err.value.message


@pytest.mark.slow
def test_inductor_compiled_step_streams_the_same_latents(engine):
    started = time.perf_counter()
    compiled = pocket_tts.build(tiny_spec(compile="inductor"), lambda stage, seconds: None)
    try:
        chunks, timeline = run(compiled, max_audio_s=1.0, temperature=0.7, seed=2)
        _, _ = run(engine, max_audio_s=1.0, temperature=0.7, seed=2)
        assert len(chunks) >= 3
        assert timeline.chunks[0][0] < timeline.frames[-1]
        torch.testing.assert_close(compiled.last_latents, engine.last_latents, atol=1e-4, rtol=1e-4)
    finally:
        compiled.close()
    print(f"inductor build + stream: {time.perf_counter() - started:.1f} s")


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


@pytest.mark.parametrize("scheme", ["int8-dynamic", "int8-torchao"])
def test_cpu_int8_streams_near_float32_in_less_memory(engine, scheme):
    if scheme == "int8-torchao":
        pytest.importorskip("torchao", reason="int8-torchao needs torchao (requirements-dev.txt installs it)")
    quantized = pocket_tts.build(tiny_spec(quantization=scheme), lambda stage, seconds: None)
    try:
        chunks, timeline = run(quantized, max_audio_s=1.0)
        _, _ = run(engine, max_audio_s=1.0)
        assert len(chunks) >= 3 and timeline.chunks[0][0] < timeline.frames[-1]
        # The backbone's linears hold int8 weights: a quarter of their float32 bytes
        layers = pocket_tts.tc.memory_bytes(quantized.model.model.layers)
        assert layers < 0.4 * pocket_tts.tc.memory_bytes(engine.model.model.layers)
        assert quantized.report.memory_bytes < engine.report.memory_bytes
        error = relative_error(quantized.last_latents, engine.last_latents)
        assert 0 < error < 0.1, error   # rounded, so not equal; near, so the same utterance
    finally:
        quantized.close()


def test_threads_axis_sets_torch_threads_for_each_request(engine):
    from lab import session

    one = pocket_tts.build(tiny_spec(threads="1"), lambda stage, seconds: None)
    try:
        record, _ = session.run_once(one, one.spec, Request(text=TEXT, max_audio_s=0.5))
        assert record["threads"] == torch.get_num_threads() == 1
        # the next variant's request sets its own count back: the setting is per process
        record, _ = session.run_once(engine, engine.spec, Request(text=TEXT, max_audio_s=0.5))
        assert record["threads"] == torch.get_num_threads() == pocket_tts.tc.AUTO_THREADS
    finally:
        one.close()


def test_prefill_and_decode_take_every_core_only_while_they_are_free(monkeypatch):
    from lab import session

    one = pocket_tts.build(tiny_spec(threads="1"), lambda stage, seconds: None)
    try:
        for load, burst_threads in ((0.0, pocket_tts.tc.ALL_THREADS), (pocket_tts.tc.ALL_THREADS, 1)):
            monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
            record, _ = session.run_once(one, one.spec, Request(text=TEXT, max_audio_s=0.5))
            assert record["prefill_threads"] == record["decode_threads"] == burst_threads
            assert record["threads"] == torch.get_num_threads() == 1   # the frames, and what the request leaves
    finally:
        one.close()


@pytest.fixture(scope="module")
def threaded():
    eng = pocket_tts.build(tiny_spec(decode="thread"), lambda stage, seconds: None)
    yield eng
    eng.close()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_decode_on_its_own_thread_gives_the_inline_audio(engine, threaded, temperature):
    inline, _ = run(engine, max_audio_s=2.0, temperature=temperature, seed=3)
    chunks, timeline = run(threaded, max_audio_s=2.0, temperature=temperature, seed=3)

    torch.testing.assert_close(threaded.last_latents, engine.last_latents, atol=0, rtol=0)
    assert [len(c.samples) for c in chunks] == [len(c.samples) for c in inline]
    np.testing.assert_array_equal(audio_of(chunks), audio_of(inline))
    assert timeline.chunks[0][0] < timeline.frames[-1]
    assert [name for name, _ in timeline.events] == ["request", *PHASES]


def test_decode_thread_makes_the_next_frames_while_a_chunk_decodes(threaded):
    # The frame loop runs ahead of the decode: by the time the caller holds chunk 2, frames past it exist.
    stream = threaded.stream(Request(text=TEXT, max_audio_s=2.0), timeline := Timeline())
    for _ in range(2):
        next(stream)
    time.sleep(0.2)   # the caller is slow: the loop keeps making frames meanwhile
    frames_seen = len(timeline.frames)
    rest = list(stream)

    assert frames_seen > 1 + 2   # chunk sizes 1, 2: more frames than the two chunks handed out
    assert sum(c.audio_s for c in rest) > 0


def test_decode_thread_cancel_and_an_early_close_free_the_engine(threaded):
    cancel, timeline = threading.Event(), Timeline()
    stream = threaded.stream(Request(text=TEXT, max_audio_s=5.0), timeline, cancel)
    next(stream)
    cancel.set()
    with pytest.raises(Cancelled):
        list(stream)
    frames = len(timeline.frames)
    time.sleep(0.1)
    assert len(timeline.frames) == frames   # the frame loop's thread has ended

    stream = threaded.stream(Request(text=TEXT, max_audio_s=5.0), Timeline())
    next(stream)
    stream.close()   # a page that went away: the thread stops at its next chunk, and the lock is free
    assert not threaded.busy()
    chunks, _ = run(threaded, max_audio_s=0.5)
    assert sum(c.audio_s for c in chunks) == pytest.approx(round(0.5 / FRAME_S) * FRAME_S)


def test_decode_thread_hands_a_frame_loop_failure_to_the_caller(threaded, monkeypatch):
    calls = []

    def failing_step(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("step failed")
        return pocket_tts.frame_step(*args)

    monkeypatch.setattr(threaded, "step", failing_step)
    stream = threaded.stream(Request(text=TEXT, max_audio_s=2.0), Timeline())
    with pytest.raises(RuntimeError, match="step failed"):
        list(stream)
    assert not threaded.busy()
