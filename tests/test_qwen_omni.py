"""The qwen2.5-omni engine on the CPU with the tiny config, against transformers' own generate(return_audio=True).

One engine is built per module (tiny weights, built in seconds); each test resets what it changes.
"""

import numpy as np
import pytest
import torch

from lab import engines
from lab.engines import qwen_omni as qo
from lab.errors import LabError
from lab.measure.metrics import PHASES, Timeline, figures
from lab.request import ContextTurn, Request
from lab.spec import VariantSpec, from_dict
from engine_checks import assert_cancel_stops_at_the_next_frame

WHOLE = dict(first_chunk_frames=64, chunk_growth=1.0, max_chunk_frames=64)   # one chunk covers the answer
TINY = VariantSpec(family="qwen2.5-omni", name="qwen-omni-tiny", weights="tiny", threads="1", first_chunk_frames=4,
                   chunk_growth=2.0, max_chunk_frames=16, dit_steps=4)


@pytest.fixture(scope="module")
def engine():
    return engines.build(TINY)


@pytest.fixture
def whole(engine):
    """The module's engine with one token2wav chunk per answer and 10 DiT steps (transformers' default)."""
    spec, engine.spec = engine.spec, TINY.replace(**WHOLE, dit_steps=10)
    yield engine
    engine.spec = spec


def run(engine, request, cancel=None):
    timeline = Timeline()
    chunks = list(engine.stream(request, timeline, cancel))
    return chunks, timeline


def reference(engine, request, thinker_tokens, codes):
    """transformers' own generate(return_audio=True) over the prompt the engine built, greedy, seeded the same:
    (the thinker's tokens, the talker's codes, the waveform)."""
    model = engine.model
    user_audio = None if request.user_audio is None else request.user_audio
    ids, _, features, mask = engine.build_prompt(request, user_audio)
    kwargs = {}
    if features is not None:
        kwargs = dict(input_features=features, feature_attention_mask=mask)
    captured = {}
    talker_generate = model.talker.generate

    def spy(*args, **kw):
        captured["codes"] = talker_generate(*args, **kw)
        return captured["codes"]

    def with_mask(module, args, kw):
        # transformers 5.24's generate() does not hand the talker its attention mask, and without it the talker's
        # forward skips what it does on a mask at its prefill: adding the codec's pad and start embeddings to the
        # last two positions (the released model's prompt layout, which the engine keeps). Restored here, so the
        # reference is the talker's own forward as written.
        if kw.get("attention_mask") is None:
            seen = kw["cache"].get_seq_length() if kw.get("cache") is not None else 0
            new = (kw["inputs_embeds"] if kw.get("inputs_embeds") is not None else kw["input_ids"]).shape[1]
            kw["attention_mask"] = torch.ones(1, seen + new, dtype=torch.long)
        return args, kw

    model.talker.generate = spy
    hook = model.talker.register_forward_pre_hook(with_mask, with_kwargs=True)
    try:
        torch.manual_seed(request.seed)
        sequences, wav = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), speaker=qo.SPEAKER,
                                        thinker_max_new_tokens=thinker_tokens, thinker_do_sample=False,
                                        talker_do_sample=False, talker_max_new_tokens=codes,
                                        token2wav_num_steps=engine.spec.dit_steps, **kwargs)
    finally:
        model.talker.generate = talker_generate
        hook.remove()
    prompt = ids.shape[1]
    return sequences[0, prompt:].tolist(), captured["codes"][0, prompt + 2:].tolist(), wav.numpy()


def test_streamed_codes_and_waveform_equal_transformers_generate(whole):
    whole.thinker_max_tokens = 5
    request = Request("Hello there.", max_audio_s=2.0, seed=3)
    try:
        chunks, _ = run(whole, request)
    finally:
        whole.thinker_max_tokens = qo.THINKER_MAX_NEW_TOKENS
    tokens, codes, wav = reference(whole, request, 5, len(whole.last_codes))
    assert whole.last_codes.tolist() == codes
    assert whole.last_tokens == tokens
    audio = np.concatenate([c.samples for c in chunks])
    np.testing.assert_allclose(audio, wav, atol=1e-5)


def test_a_spoken_turn_is_resampled_encoded_and_answered_as_generate_does(whole):
    t = np.arange(int(0.8 * 22050)) / 22050
    speech = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    request = Request("What did I say?", max_audio_s=0.6, seed=1, user_audio=speech, user_audio_sample_rate=22050)
    encoder_calls = []
    hook = whole.thinker.model.audio_tower.register_forward_hook(lambda m, i, o: encoder_calls.append(i[0].shape))
    whole.thinker_max_tokens = 3
    try:
        run(whole, request)
    finally:
        hook.remove()
        whole.thinker_max_tokens = qo.THINKER_MAX_NEW_TOKENS
    ids, _, features, mask = whole.build_prompt(request, speech)
    assert int(mask.sum()) == int(0.8 * 16000) // 160   # resampled to 16 kHz: Whisper's 10 ms hop
    assert int((ids == whole.audio_token_id).sum()) == whole.audio_tokens(int(mask.sum()))
    assert encoder_calls, "the audio encoder never ran"
    _, codes, _ = reference(whole, request, 3, len(whole.last_codes))
    assert whole.last_codes.tolist() == codes


def test_chunks_arrive_before_the_end_and_the_phases_sum_to_ttfb(engine):
    chunks, timeline = run(engine, Request("Tell me a story.", max_audio_s=1.0, seed=2))
    per_code = engine.mel_per_code * engine.samples_per_mel
    assert [len(c.samples) // per_code for c in chunks[:3]] == [4, 8, 16]
    assert len(chunks) > 2 and timeline.chunks[0][0] < timeline.chunks[-1][0]
    assert sum(len(c.samples) for c in chunks) == len(engine.last_codes) * per_code
    stats = figures(timeline)
    assert set(stats["phases_ms"]) == set(PHASES)
    assert sum(stats["phases_ms"].values()) == pytest.approx(stats["ttfb_ms"], abs=1e-6)
    assert all(timeline.stamp(name) is not None for name in PHASES)


def test_per_segment_prefill_gives_the_batched_answer(engine):
    turns = (ContextTurn("Earlier we spoke.", audio=np.zeros(8000, np.float32), sample_rate=16000),)
    request = Request("Go on.", max_audio_s=0.4, seed=5, context=turns)
    run(engine, request)
    batched = engine.last_codes.tolist()
    spec, engine.spec = engine.spec, engine.spec.replace(prefill="per-segment")
    try:
        run(engine, request)
    finally:
        engine.spec = spec
    assert engine.last_codes.tolist() == batched


def test_stop_ends_generation_at_the_next_step(engine):
    assert_cancel_stops_at_the_next_frame(engine, Request("Keep talking.", max_audio_s=3.0))
    assert not engine.busy()


def test_a_closed_consumer_ends_generation_and_frees_the_engine(engine):
    timeline = Timeline()
    stream = engine.stream(Request("Keep talking.", max_audio_s=3.0), timeline)
    next(stream)
    steps_then = len(timeline.frames)
    stream.close()      # the page went away: the generator is closed where it stands
    assert len(timeline.frames) == steps_then
    assert not engine.busy()
    chunks, _ = run(engine, Request("Again.", max_audio_s=0.2))
    assert chunks


def test_fewer_dit_steps_run_fewer_dit_evaluations(engine):
    calls = []
    hook = engine.dit.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        for steps in (2, 4):
            spec, engine.spec = engine.spec, engine.spec.replace(dit_steps=steps, **WHOLE)
            try:
                calls.clear()
                run(engine, Request("Short.", max_audio_s=0.2))
            finally:
                engine.spec = spec
            assert len(calls) == 4 * (steps - 1)   # RK4: four evaluations per interval
    finally:
        hook.remove()


def test_the_presets_axes_are_checked_with_the_field_named():
    base = {"family": "qwen2.5-omni", "weights": "tiny"}
    with pytest.raises(LabError, match="dit_steps"):
        from_dict({**base, "dit_steps": 1})
    with pytest.raises(LabError, match="dit_steps"):
        from_dict({"family": "csm", "dit_steps": 4})
    with pytest.raises(LabError, match="quantization"):
        from_dict({**base, "quantization": "bnb-nf4"})          # bitsandbytes needs CUDA
    with pytest.raises(LabError, match="attention"):
        from_dict({**base, "device": "cuda", "dtype": "bfloat16", "compile": "cuda-graphs",
                   "attention": "flash_attention_2"})            # graphed steps attend through a mask
    assert from_dict({**base, "device": "cuda", "dtype": "bfloat16", "compile": "cuda-graphs"}).compile == \
        "cuda-graphs"
