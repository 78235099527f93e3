"""The MiniCPM-o 2.6 engine against a stand-in of its documented streaming API (no weights can be downloaded here).

The stand-in (tests/minicpm_standin.py) records every call and sleeps in proportion to its input; the specs come
from the committed presets, validated as on a GPU host (`gpu_host` fixture) while everything runs on this CPU.
"""
import threading

import numpy as np
import pytest
import transformers

from lab import engines, env, gpu, machine, presets
from lab.engines import minicpm_o
from lab.engines import torch_common as tc
from lab.errors import Cancelled, LabError
from lab.manager import ModelManager
from lab.measure.metrics import PHASES, Timeline, figures
from lab.request import ContextTurn, Request
from lab.spec import from_dict
from minicpm_standin import StandInMiniCPMO, StandInTokenizer

REVISION = "cac55956a6efb7456cf5bbcad4e3e4f14d2e7ea9"
MINICPM_PRESETS = ["minicpm-o-bnb-int8", "minicpm-o-bnb-nf4", "minicpm-o-fa2", "minicpm-o-fa2-compile",
                   "minicpm-o-sdpa-compile-batched", "minicpm-o-sdpa-compile-per-segment"]


@pytest.fixture
def gpu_host(monkeypatch):
    """Validation and build as on a GPU host with bitsandbytes and flash-attn; the stand-in itself runs here."""
    cpu_reset, cpu_peak = tc.reset_peak_memory, tc.peak_memory_bytes
    monkeypatch.setattr(env, "cuda_available", lambda: True)
    monkeypatch.setattr(env, "has_package", lambda name: True)
    monkeypatch.setattr(gpu, "this_card", lambda live_free=True: gpu.SPACES_CARDS["H100"])   # torch here has no CUDA
    monkeypatch.setattr(tc, "device_sync", lambda device: (lambda: None))
    monkeypatch.setattr(tc, "reset_peak_memory", lambda device, collect=False: cpu_reset("cpu", collect))
    monkeypatch.setattr(tc, "peak_memory_bytes", lambda device, baseline_bytes=0: cpu_peak("cpu"))
    monkeypatch.setattr(tc, "allocated_bytes", lambda device: 0)


def preset(name, **changes):
    spec = presets.load(name)
    return spec.replace(**changes) if changes else spec


def standin_engine(spec, **standin_args):
    """An engine over a fresh stand-in, built by the real build() with load replaced (the test seam)."""
    model = StandInMiniCPMO(**standin_args)
    original = minicpm_o.load
    minicpm_o.load = lambda s: (model, StandInTokenizer())
    try:
        return engines.build(spec), model
    finally:
        minicpm_o.load = original


def run(engine, request):
    timeline = Timeline()
    chunks = list(engine.stream(request, timeline))
    return chunks, timeline


def clip(seconds, rate=16000, freq=220.0):
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


CONTEXT = (ContextTurn("Earlier you said it might rain.", audio=clip(1.0), sample_rate=16000),
           ContextTurn("And then the sun came out."))


# -- presets and the remote-code policy -------------------------------------------------------------
@pytest.mark.skipif(env.cuda_available(), reason="asserts the refusal a machine without a GPU gives")
def test_minicpm_presets_are_valid_but_refused_here_because_there_is_no_gpu():
    specs, errors = presets.load_all()
    for name in MINICPM_PRESETS:
        refusal = machine.check(specs[name], weights_here=lambda s: True)
        assert name not in errors and refusal.code == machine.NO_GPU, (name, refusal)


def test_minicpm_presets_validate_on_a_gpu_host_with_the_pinned_revision(gpu_host):
    for name in MINICPM_PRESETS:
        spec = presets.load(name)
        assert spec.trust_remote_code and spec.revision == REVISION and spec.device == "cuda"


GOOD = {"family": "minicpm_o", "device": "cuda", "dtype": "bfloat16", "trust_remote_code": True,
        "revision": REVISION}


@pytest.mark.parametrize("changes,field,words", [
    ({"trust_remote_code": False}, "trust_remote_code", "say trust_remote_code: true"),
    ({"revision": ""}, "revision", "40-hex commit sha"),
    ({"revision": "main"}, "revision", "does not pin a commit"),
    ({"model": "someone/MiniCPM-o-2_6-fork"}, "trust_remote_code", "not on the allowlist"),
    ({"trust_remote_code": "yes"}, "trust_remote_code", "expected bool, got str"),
    ({"attention": "eager"}, "attention", "does not support eager attention"),
    ({"device": "cpu"}, "device", "GPU only"),
    ({"weights": "random"}, "weights", "use weights: pretrained"),
    ({"init_tts": "never"}, "init_tts", "is not one of build|request"),
    ({"first_chunk_frames": 4}, "first_chunk_frames", "does not apply"),
])
def test_minicpm_spec_refusals_name_the_field_and_the_fix(gpu_host, changes, field, words):
    with pytest.raises(LabError) as e:
        from_dict({**GOOD, **changes}, where="presets/x.yaml")
    assert e.value.message.startswith(f"{field}: ") and words in e.value.message, e.value.message


def test_remote_code_is_never_on_by_default_and_other_families_refuse_its_fields(gpu_host):
    assert from_dict(GOOD).trust_remote_code is True
    assert from_dict({"family": "csm"}).trust_remote_code is False
    for field, value in (("trust_remote_code", True), ("revision", REVISION), ("init_tts", "request")):
        for family in ("csm", "hibari"):
            with pytest.raises(LabError, match=f"{field}: {family} loads through transformers' own classes"):
                from_dict({"family": family, field: value})


# -- prefill: the notes' axis -------------------------------------------------------------------------
def prefills_of_a_two_turn_request(preset_name: str):
    """(the stand-in, the prefill calls it saw, the user audio) for one request with CONTEXT and a spoken turn."""
    engine, model = standin_engine(preset(preset_name))
    model.calls.clear()
    user_audio = clip(2.0, freq=330)
    run(engine, Request("What did I just say?", context=CONTEXT, user_audio=user_audio))
    return model, model.prefills(), user_audio


def test_batched_prefill_is_one_call_with_all_text_and_one_with_the_audio_concatenated(gpu_host):
    model, prefills, user_audio = prefills_of_a_two_turn_request("minicpm-o-sdpa-compile-batched")
    assert len(prefills) == 2
    assert prefills[0] == ["Earlier you said it might rain.", "And then the sun came out.", "What did I just say?"]
    assert len(prefills[1]) == 1
    np.testing.assert_array_equal(prefills[1][0], np.concatenate([CONTEXT[0].audio, user_audio]))
    # One session for every call, reset first, generated after the prefill.
    names = model.names()
    assert names[0] == "reset_session" and names[-1] == "streaming_generate"
    assert len({kw["session_id"] for name, kw in model.calls if "streaming" in name}) == 1


def test_per_segment_prefill_is_one_call_per_item_in_order(gpu_host):
    _, prefills, user_audio = prefills_of_a_two_turn_request("minicpm-o-sdpa-compile-per-segment")
    assert [type(p[0]).__name__ for p in prefills] == ["str", "ndarray", "str", "str", "ndarray"]
    assert all(len(p) == 1 for p in prefills)
    assert [p[0] for p in prefills if isinstance(p[0], str)] == [
        "Earlier you said it might rain.", "And then the sun came out.", "What did I just say?"]
    np.testing.assert_array_equal(prefills[1][0], CONTEXT[0].audio)
    np.testing.assert_array_equal(prefills[4][0], user_audio)


@pytest.mark.slow
def test_batched_prefill_spends_less_time_in_the_prefill_phase(gpu_host):
    # The stand-in pays a fixed cost per call, as a forward does: fewer calls, shorter prefill phase.
    request = Request("What did I just say?", context=CONTEXT * 3, user_audio=clip(1.0))
    batched, _ = standin_engine(preset("minicpm-o-sdpa-compile-batched"))
    per_segment, _ = standin_engine(preset("minicpm-o-sdpa-compile-per-segment"))
    prefill_ms = {name: figures(run(e, request)[1])["phases_ms"]["prefill"]
                  for name, e in (("batched", batched), ("per-segment", per_segment))}
    saved_calls = 10 - 2     # 6 texts + 4 audio pieces, against one text call and one audio call
    assert prefill_ms["per-segment"] - prefill_ms["batched"] > 0.5 * saved_calls * StandInMiniCPMO.PREFILL_CALL_S * 1e3


# -- user audio ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_user_audio_at_another_rate_is_resampled_to_16khz_before_prefill(gpu_host):
    engine, model = standin_engine(preset("minicpm-o-sdpa-compile-batched"))
    stereo_pcm = (np.stack([clip(1.5, rate=48000)] * 2, axis=1) * 32767).astype(np.int16)
    run(engine, Request("Answer the question.", user_audio=stereo_pcm, user_audio_sample_rate=48000))
    audio = model.prefills()[-1][0]
    assert audio.dtype == np.float32 and len(audio) == 24000          # 1.5 s at 16 kHz
    # Still the 220 Hz tone: resampled, not truncated or sped up.
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / len(audio) - 220) < 2


@pytest.mark.parametrize("bad,rate,words", [
    (np.array([0.1, np.nan, 0.2], np.float32), 16000, "NaN"),
    (np.zeros(0, np.float32), 16000, "empty"),
    (np.zeros(31 * 16000, np.float32), 16000, "limit"),
    (np.zeros(1600, np.float32), 11, "sample rate"),
])
@pytest.mark.slow
def test_a_bad_audio_upload_is_refused_with_its_field_before_the_model_runs(gpu_host, bad, rate, words):
    engine, model = standin_engine(preset("minicpm-o-sdpa-compile-batched"))
    model.calls.clear()
    timeline = Timeline()
    with pytest.raises(LabError, match=words) as e:
        list(engine.stream(Request("Hello.", user_audio=bad, user_audio_sample_rate=rate), timeline))
    assert e.value.where == "user_audio"
    assert model.calls == [] and timeline.events == []


# -- phases, init_tts, streaming, cancel -----------------------------------------------------------
def test_phases_sum_to_ttfb_and_each_holds_its_api_call(gpu_host):
    engine, model = standin_engine(preset("minicpm-o-sdpa-compile-batched"))
    request = Request("Tell me a short story about a lighthouse keeper.")
    _, timeline = run(engine, request)
    f = figures(timeline)
    phases = f["phases_ms"]
    assert list(phases) == list(PHASES)
    assert sum(phases.values()) == pytest.approx(f["ttfb_ms"])
    prefill_s = StandInMiniCPMO.PREFILL_CALL_S + len(request.text) * StandInMiniCPMO.PREFILL_S_PER_CHAR
    assert phases["prefill"] >= prefill_s * 1e3
    assert phases["generator"] >= StandInMiniCPMO.GENERATE_CALL_S * 1e3
    assert phases["first_frame"] >= StandInMiniCPMO.FIRST_RESPONSE_S * 1e3
    # As in the notes, the first response (the model's forward) is most of TTFB.
    assert phases["first_frame"] == max(phases.values())


@pytest.mark.slow
def test_init_tts_time_lands_in_the_build_or_in_the_first_requests_session_phase(gpu_host):
    init_ms = StandInMiniCPMO.INIT_TTS_S * 1e3
    at_build, model = standin_engine(preset("minicpm-o-sdpa-compile-batched"))
    assert model.init_tts_calls == 1 and at_build.report.load_s * 1e3 >= init_ms
    assert figures(run(at_build, Request("Hi."))[1])["phases_ms"]["session"] < init_ms / 2

    per_request, model = standin_engine(preset("minicpm-o-sdpa-compile-batched", init_tts="request"))
    assert model.init_tts_calls == 0 and per_request.report.load_s * 1e3 < init_ms
    first = figures(run(per_request, Request("Hi."))[1])["phases_ms"]
    second = figures(run(per_request, Request("Hi."))[1])["phases_ms"]
    assert first["session"] >= init_ms and second["session"] < init_ms / 2
    assert model.init_tts_calls == 1       # once per loaded model, however many requests


def test_chunks_stream_while_the_model_is_still_generating_and_the_text_comes_along(gpu_host):
    engine, model = standin_engine(preset("minicpm-o-sdpa-compile-batched"), audio_as="numpy")
    model.audio_sent.clear()
    model.items_produced = 0
    timeline = Timeline()
    stream = engine.stream(Request("Say something.", seed=7), timeline)
    first = next(stream)
    assert model.items_produced == 1 < len(model.reply)       # the first chunk is out before the rest exist
    chunks = [first, *stream]
    assert len(chunks) == len(model.reply) and [c.index for c in chunks] == list(range(len(chunks)))
    assert all(c.sample_rate == 24000 and c.samples.dtype == np.float32 for c in chunks)
    np.testing.assert_allclose(np.concatenate([c.samples for c in chunks]), np.concatenate(model.audio_sent))
    stamps = [t for t, _ in timeline.chunks]
    assert all(b - a >= StandInMiniCPMO.NEXT_RESPONSE_S for a, b in zip(stamps, stamps[1:]))
    assert engine.last_text == "Hello there, this is a stand-in."           # <|tts_eos|> stripped
    assert "".join(c.text for c in chunks) == engine.last_text
    f = figures(timeline)
    assert f["ttfb_ms"] < f["wall_s"] * 1e3 / 2


@pytest.mark.slow
def test_same_seed_same_audio_and_greedy_unless_a_temperature_is_asked(gpu_host):
    engine, model = standin_engine(preset("minicpm-o-sdpa-compile-batched"))
    a = np.concatenate([c.samples for c in run(engine, Request("Hi.", seed=3))[0]])
    b = np.concatenate([c.samples for c in run(engine, Request("Hi.", seed=3))[0]])
    c = np.concatenate([c.samples for c in run(engine, Request("Hi.", seed=4))[0]])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    run(engine, Request("Hi.", temperature=0.7, top_k=20))
    generate_kwargs = [kw for name, kw in model.calls if name == "streaming_generate"]
    assert generate_kwargs[0]["do_sample"] is False and generate_kwargs[-1]["temperature"] == 0.7
    assert all(kw["generate_audio"] is True for kw in generate_kwargs)


def test_max_audio_s_caps_the_audio_and_stops_the_model(gpu_host):
    engine, model = standin_engine(preset("minicpm-o-sdpa-compile-batched"))
    model.items_produced = 0
    chunks, _ = run(engine, Request("Say something long.", max_audio_s=0.3))
    assert sum(len(c.samples) for c in chunks) == int(0.3 * 24000)
    assert model.items_produced == 2 and model.generator_closed


@pytest.mark.slow
def test_cancel_stops_generation_and_the_engine_serves_the_next_request(gpu_host):
    engine, model = standin_engine(preset("minicpm-o-sdpa-compile-batched"))
    model.items_produced = 0
    cancel = threading.Event()
    stream = engine.stream(Request("Say something."), Timeline(), cancel)
    next(stream)
    cancel.set()
    with pytest.raises(Cancelled):
        next(stream)
    assert model.items_produced == 1 and model.generator_closed
    assert len(run(engine, Request("Again."))[0]) == len(model.reply)


@pytest.mark.slow
def test_compile_wraps_the_llm_forward_and_nothing_else(gpu_host):
    import torch

    _, model = standin_engine(preset("minicpm-o-sdpa-compile-batched"))
    assert model.llm.forward._torchdynamo_orig_callable.__qualname__ == "Linear.forward"
    assert not hasattr(model.tts.forward, "_torchdynamo_orig_callable")
    x = torch.randn(3, 16)
    with torch.no_grad():   # the model's llm(...) now runs the compiled forward, with the same result
        torch.testing.assert_close(model.llm(x), torch.nn.functional.linear(x, model.llm.weight, model.llm.bias))
    _, plain = standin_engine(preset("minicpm-o-bnb-nf4"))
    assert not hasattr(plain.llm.forward, "_torchdynamo_orig_callable")


# -- the real loading code, with from_pretrained faked ------------------------------------------------
@pytest.fixture
def fake_hub(monkeypatch):
    """transformers' from_pretrained replaced: a new stand-in per model load, and every call's arguments kept."""
    loads = []

    def model_from_pretrained(model_id, **kwargs):
        loads.append(("model", model_id, kwargs))
        return StandInMiniCPMO()

    def tokenizer_from_pretrained(model_id, **kwargs):
        loads.append(("tokenizer", model_id, kwargs))
        return StandInTokenizer()

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tokenizer_from_pretrained)
    return loads


@pytest.mark.slow
def test_bnb_variants_load_twice_with_init_tts_once_per_model(gpu_host, fake_hub):
    manager = ModelManager()
    int8, nf4 = preset("minicpm-o-bnb-int8"), preset("minicpm-o-bnb-nf4", init_tts="request")
    first = {spec.quantization: manager.get(spec) for spec in (int8, nf4)}    # both resident at once
    for engine in first.values():
        for _ in range(2):
            run(engine, Request("Hi."))
    models = [first["bnb-int8"].model, first["bnb-nf4"].model]
    assert manager.evict(int8) and manager.evict(nf4)
    second = {spec.quantization: manager.get(spec) for spec in (int8, nf4)}  # and loaded again
    for engine in second.values():
        run(engine, Request("Hi."))
    models += [second["bnb-int8"].model, second["bnb-nf4"].model]
    assert len({id(m) for m in models}) == 4
    assert [m.init_tts_calls for m in models] == [1, 1, 1, 1]

    model_loads = [kw for kind, _, kw in fake_hub if kind == "model"]
    assert len(model_loads) == 4
    for kwargs in model_loads:
        assert kwargs["trust_remote_code"] is True and kwargs["revision"] == REVISION
        assert kwargs["attn_implementation"] == "sdpa" and str(kwargs["torch_dtype"]) == "torch.bfloat16"
        assert kwargs["device_map"] == "cuda" and kwargs["local_files_only"] is True
        assert kwargs["init_tts"] is True and kwargs["init_vision"] is False
        skip = kwargs["quantization_config"].llm_int8_skip_modules
        assert {"tts", "apm", "audio_projection_layer"} <= set(skip)
    assert [kw["quantization_config"].load_in_8bit for kw in model_loads] == [True, False, True, False]
    assert all(kw["trust_remote_code"] is True and kw["revision"] == REVISION
               for kind, _, kw in fake_hub if kind == "tokenizer")


def test_weights_missing_everywhere_is_one_clear_error(gpu_host, monkeypatch):
    def not_cached(model_id, **kwargs):
        raise OSError("not in cache and hub offline")

    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", not_cached)
    with pytest.raises(LabError) as e:
        minicpm_o.load(preset("minicpm-o-bnb-nf4"))
    assert e.value.where == "weights" and f"--revision {REVISION}" in e.value.message


# -- the bench CLI ------------------------------------------------------------------------------------
def write_pcm_wav(path, pcm: np.ndarray, rate: int):
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
        w.setsampwidth(pcm.dtype.itemsize)
        w.setframerate(rate)
        w.writeframes(pcm.astype(f"<i{pcm.dtype.itemsize}").tobytes())


@pytest.mark.slow
def test_bench_sends_a_wav_user_turn_and_keeps_what_the_model_said(gpu_host, tmp_path):
    from lab import cli
    from lab.request import read_audio_file

    path = tmp_path / "question.wav"
    write_pcm_wav(path, (np.stack([clip(1.0, rate=48000)] * 2, axis=1) * 32767).astype(np.int16), 48000)
    samples, rate = read_audio_file(str(path))   # what --user-audio reads
    assert samples.shape == (48000, 2) and rate == 48000

    built = []

    def build_with_standin(spec, progress):
        engine, model = standin_engine(spec)
        built.append(model)
        return engine

    request = Request("Answer me.", user_audio=samples, user_audio_sample_rate=rate)
    results = cli.bench([preset("minicpm-o-sdpa-compile-batched")], request, runs=1, out_dir=str(tmp_path / "out"),
                          manager=ModelManager(builder=build_with_standin), history_path=None, progress_bar=False)
    assert results["errors"] == {} and results["request"]["user_audio_s"] == pytest.approx(1.0)
    assert [r["reply_text"] for r in results["runs"]] == ["Hello there, this is a stand-in."] * 2
    assert len(built[0].prefills()[-1][0]) == 16000     # the WAV's second, at the model's 16 kHz


@pytest.mark.parametrize("make,args,expect", [
    ("text", ["--presets", "hibari"], "--user-audio: not audio: turn.wav (expected WAV/FLAC/MP3/OGG)"),
    ("long", ["--presets", "hibari"], "--user-audio: is 31.0 s long"),
])
def test_bench_refuses_a_bad_user_audio_argument_in_one_line(tmp_path, capsys, make, args, expect):
    from lab import cli

    path = tmp_path / "turn.wav"
    if make == "text":
        path.write_text("not audio")
    else:
        write_pcm_wav(path, np.zeros(int((31 if make == "long" else 1) * 16000), np.int16), 16000)
    assert cli.main([*args, "--user-audio", str(path)]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
