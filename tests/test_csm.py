"""The CSM engine on tiny weights: streaming, codec continuity, determinism, equality with generate()."""
import threading

import numpy as np
import pytest
import torch

from lab import engines
from lab.errors import Cancelled, LabError
from lab.measure.metrics import Timeline, figures
from lab.request import ContextTurn, Request
from lab.spec import VariantSpec

TEXT = "Hello there, this is a streaming test."


def run(engine, request, cancel=None):
    tl = Timeline()
    chunks = list(engine.stream(request, tl, cancel))
    return chunks, tl


def test_streams_several_chunks_and_the_first_arrives_before_generation_ends(csm_tiny):
    chunks, tl = run(csm_tiny, Request(TEXT, max_audio_s=2.0))
    assert len(chunks) >= 3
    assert [c.index for c in chunks] == list(range(len(chunks)))
    first_chunk_t = tl.chunks[0][0]
    assert first_chunk_t < tl.frames[-1], "first audio must be on the host before the last frame is generated"
    assert len(chunks[0].samples) == 1920            # first chunk after one 80 ms frame at 24 kHz
    f = figures(tl)
    assert f["audio_s"] == pytest.approx(2.0) and f["ttfb_ms"] < f["wall_s"] * 1e3


def test_streamed_audio_equals_whole_utterance_decode(csm_tiny):
    chunks, _ = run(csm_tiny, Request(TEXT, max_audio_s=2.0))
    streamed = np.concatenate([c.samples for c in chunks])
    with torch.no_grad():
        whole = csm_tiny.model.codec_model.decode(csm_tiny.last_codes.T[None]).audio_values[0, 0].numpy()
    assert streamed.shape == whole.shape
    # float32 rounding only: the tiny codec's samples reach about 10, and a chunk's sums and the whole utterance's
    # run in another order (on 1 thread, the 2-core default, one sample in 48000 differed by 1.1e-5)
    np.testing.assert_allclose(streamed, whole, atol=1e-5, rtol=1e-5)
    # Not trivially: the audio depends on the codes, so a decoder that lost its state would show.
    with torch.no_grad():
        other = csm_tiny.model.codec_model.decode(csm_tiny.last_codes.flip(0).T[None]).audio_values[0, 0].numpy()
    assert np.abs(other - whole).max() > 1e-2


def test_greedy_runs_are_deterministic(csm_tiny):
    a, _ = run(csm_tiny, Request(TEXT, max_audio_s=1.0))
    codes_a = csm_tiny.last_codes.clone()
    b, _ = run(csm_tiny, Request(TEXT, max_audio_s=1.0))
    assert torch.equal(codes_a, csm_tiny.last_codes)
    np.testing.assert_array_equal(np.concatenate([c.samples for c in a]), np.concatenate([c.samples for c in b]))


def test_seeded_sampling_repeats_with_the_seed_and_changes_without(csm_tiny):
    codes = {}
    for seed in (1, 1, 2):
        run(csm_tiny, Request(TEXT, max_audio_s=1.0, temperature=1.0, seed=seed))
        codes.setdefault(seed, []).append(csm_tiny.last_codes.clone())
    assert torch.equal(codes[1][0], codes[1][1])
    assert not torch.equal(codes[1][0], codes[2][0])


def test_frame_loop_gives_the_same_codes_as_transformers_generate(csm_tiny):
    run(csm_tiny, Request(TEXT, max_audio_s=1.6))
    ids = torch.tensor([csm_tiny.tokenizer(f"[0]{TEXT}")])
    with torch.no_grad():
        ref = csm_tiny.model.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False,
                                      max_new_tokens=len(csm_tiny.last_codes))
    assert torch.equal(ref[0], csm_tiny.last_codes)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_the_step_over_static_kv_buffers_gives_generates_codes(csm_tiny, attention):
    """The path compile and CUDA graphs wrap: the same frame step, over preallocated KV buffers with a mask and
    device-held positions. Run eagerly here on the CPU; the GPU benchmark checks its graph replay against it."""
    from lab.engines import csm

    # Its own model, loaded with this attention (the same seeded weights as csm_tiny's): generate() below runs
    # with it too, and the session's model is left as it is.
    spec = csm_tiny.spec.replace(attention=attention)
    model, _ = csm.load(spec)
    assert all(sub.config._attn_implementation == attention
               for sub in (model, model.backbone_model, model.depth_decoder, model.depth_decoder.model))
    static = csm.CsmEngine(spec, model, None, static_kv=True)
    per_segment = csm.CsmEngine(spec.replace(prefill="per-segment"), model, None, static_kv=True)
    context = (ContextTurn("An earlier turn.", speaker=1),)
    for request in (Request(TEXT, max_audio_s=1.6), Request(TEXT, max_audio_s=1.6, context=context)):
        run(static, request)
        run(per_segment, request)
        assert torch.equal(static.last_codes, per_segment.last_codes)
        if not request.context:
            ids = torch.tensor([static.tokenizer(f"[0]{TEXT}")])
            with torch.no_grad():
                ref = model.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False,
                                     max_new_tokens=len(static.last_codes))
            assert torch.equal(ref[0], static.last_codes)


def test_static_codec_state_streams_the_same_audio_as_a_whole_decode(csm_tiny):
    """The codec decode the CUDA graphs capture: conv state, transposed-conv overlap and the decoder
    transformer's keys in buffers allocated once. 2 s is 50 transformer positions, past the tiny codec's
    32-position attention window, so the window mask is exercised too."""
    from lab.audio import chunk_frames
    from lab.engines.codec import StreamingMimiDecoder

    run(csm_tiny, Request(TEXT, max_audio_s=2.0))
    codes = csm_tiny.last_codes.T[None]                           # (1, codebooks, frames)
    decoder = StreamingMimiDecoder(csm_tiny.model.codec_model, static_positions=64)
    for _ in range(2):   # a reset must clear the state completely: the second pass gives the same audio
        decoder.reset()
        pieces, start, sizes = [], 0, chunk_frames(1, 2.0, 4)
        while start < codes.shape[-1]:
            n = next(sizes)
            pieces.append(decoder.decode(codes[..., start:start + n]))
            start += n
        streamed = torch.cat(pieces).numpy()
        with torch.no_grad():
            whole = csm_tiny.model.codec_model.decode(codes).audio_values[0, 0].numpy()
        np.testing.assert_allclose(streamed, whole, atol=1e-5, rtol=1e-5)   # float32 rounding, as above


@pytest.mark.parametrize("cin,cout,kernel,stride,bias,groups", [(32, 32, 4, 2, False, 32), (8, 8, 6, 3, True, 8),
                                                                 (16, 8, 16, 8, True, 1), (8, 4, 10, 5, False, 1),
                                                                 (4, 4, 8, 4, False, 2), (4, 4, 7, 4, True, 1)])
def test_transposed_conv_as_overlap_add_is_the_convs_own_result(cin, cout, kernel, stride, bias, groups):
    """Mimi's decoder's transposed convs (depthwise for the latents' upsampling, dense in SEANet; kernel a whole
    number of strides) as taps and their overlap-add, the route CUDA takes. Grouped (but not depthwise) and a kernel
    of 7 are not that shape and run as the conv itself."""
    from lab.engines.codec import overlap_add_conv_transpose, overlaps_whole_strides

    conv = torch.nn.ConvTranspose1d(cin, cout, kernel, stride, groups=groups, bias=bias)
    assert overlaps_whole_strides(conv) == ((groups in (1, cin)) and kernel % stride == 0)
    if not overlaps_whole_strides(conv):
        return
    for steps in (1, 3):
        x = torch.randn(5, cin, steps, generator=torch.Generator().manual_seed(steps))
        with torch.no_grad():
            want = conv(x)
            got = overlap_add_conv_transpose(conv, x)
        assert got.shape == want.shape == (5, cout, (steps - 1) * stride + kernel)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_per_segment_prefill_matches_batched(csm_tiny):
    t = np.arange(24000) / 24000
    context = (ContextTurn("An earlier turn.", audio=(0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)),
               ContextTurn("A reply without audio.", speaker=1))
    req = Request(TEXT, max_audio_s=1.0, context=context)
    _, tl_batched = run(csm_tiny, req)
    batched = csm_tiny.last_codes.clone()
    per_segment = engines.build(csm_tiny.spec.replace(prefill="per-segment"))
    _, tl_seg = run(per_segment, req)
    assert torch.equal(batched, per_segment.last_codes)
    assert figures(tl_batched)["phases_ms"]["prefill"] > 0 and figures(tl_seg)["phases_ms"]["prefill"] > 0


def test_cancel_stops_generation_promptly(csm_tiny):
    cancel = threading.Event()
    tl = Timeline()
    got = []
    with pytest.raises(Cancelled):
        for chunk in csm_tiny.stream(Request(TEXT, max_audio_s=10.0), tl, cancel):
            got.append(chunk)
            cancel.set()
    assert len(got) == 1
    cancelled_at = tl.chunks[0][0]
    assert len([f for f in tl.frames if f > cancelled_at]) <= 1   # at most the frame already under way


def test_pretrained_weights_unreachable_say_so_and_suggest_random():
    spec = VariantSpec(family="csm", model="sesame/csm-1b-not-cached", weights="pretrained")
    with pytest.raises(LabError) as e:
        engines.build(spec)
    assert e.value.where == "weights" and "weights: random" in e.value.message


@pytest.mark.slow
def test_inductor_compiles_the_same_step_and_matches_eager(csm_tiny):
    from torch._dynamo.utils import counters

    compiled = engines.build(csm_tiny.spec.replace(compile="inductor"))
    assert compiled.report.warmup_s > 0
    graphs_after_build = counters["stats"]["unique_graphs"]
    run(csm_tiny, Request(TEXT, max_audio_s=1.0))
    run(compiled, Request(TEXT, max_audio_s=1.0))     # a prompt length the warm-up never saw
    assert torch.equal(csm_tiny.last_codes, compiled.last_codes)
    # The build compiled everything: the first real request (the "cold" run) must not compile again.
    assert counters["stats"]["unique_graphs"] == graphs_after_build


def test_a_request_longer_than_the_static_kv_cache_is_refused_with_the_fix(csm_tiny):
    """What every compiled, graphed or Triton variant runs on: static KV buffers of fixed length. A request that
    would overrun them is refused before any frame, with the longest that fits, not an index error."""
    from lab.engines import csm

    static = csm.CsmEngine(csm_tiny.spec, csm_tiny.model, None, static_kv=True)
    tl = Timeline()
    with pytest.raises(LabError) as e:
        list(static.stream(Request(TEXT, max_audio_s=120.0), tl))
    assert e.value.where == "max_audio_s" and "at most" in e.value.message
    assert tl.frames == []


def test_codes_stay_inside_the_codebook_even_when_special_ids_score_highest():
    # Real CSM heads score 2051 ids for a 2048-entry codebook; random weights can rank a special id first,
    # which must never reach the codec (it crashed the first GPU run before this guard).
    from transformers import CsmConfig, CsmForConditionalGeneration

    from lab.engines import csm

    config = csm.tiny_config()
    config_dict = config.to_dict()
    config_dict.update(vocab_size=67)
    config_dict["depth_decoder_config"]["vocab_size"] = 67
    wide = CsmConfig(**config_dict)
    model = CsmForConditionalGeneration._from_config(wide)
    with torch.no_grad():
        model.lm_head.weight[64:] = 10.0
        model.depth_decoder.codebooks_head.weight[:, :, 64:] = 10.0
    engine = csm.CsmEngine(VariantSpec(family="csm", weights="tiny"), model, None)
    chunks = list(engine.stream(Request(TEXT, max_audio_s=0.5), Timeline()))
    assert chunks and int(engine.last_codes.max()) < 64


@pytest.mark.slow
def test_pinned_flash_kernel_gives_the_same_codes(csm_tiny):
    flash = engines.build(csm_tiny.spec.replace(attention="sdpa-flash"))
    run(csm_tiny, Request(TEXT, max_audio_s=1.0))
    run(flash, Request(TEXT, max_audio_s=1.0))
    assert torch.equal(csm_tiny.last_codes, flash.last_codes)


def test_concurrent_requests_on_one_engine_do_not_mix_their_state(csm_tiny):
    texts = ["The first caller speaks this line.", "A second caller, at the same time, says another."]
    alone = {}
    for text in texts:
        alone[text] = np.concatenate([c.samples for c in csm_tiny.stream(Request(text, max_audio_s=1.0), Timeline())])
    together = {}

    def speak(text):
        together[text] = np.concatenate([c.samples for c in csm_tiny.stream(Request(text, max_audio_s=1.0), Timeline())])

    threads = [threading.Thread(target=speak, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for text in texts:
        np.testing.assert_array_equal(together[text], alone[text])


def test_end_of_speech_stops_generation_at_the_next_chunk_boundary():
    from transformers import CsmForConditionalGeneration

    from lab.session import run_once
    from lab.engines import csm

    model = CsmForConditionalGeneration._from_config(csm.tiny_config())

    def favour_code_0(module, args, logits):   # code 0, the end-of-speech code, wins every codebook
        logits[..., 0] += 1e4
        return logits

    model.lm_head.register_forward_hook(favour_code_0)
    model.depth_decoder.codebooks_head.register_forward_hook(favour_code_0)
    engine = csm.CsmEngine(VariantSpec(family="csm", name="eos", weights="tiny"), model, None)
    tl = Timeline()
    assert list(engine.stream(Request(TEXT, max_audio_s=5.0), tl)) == []
    assert len(tl.frames) == engine.spec.first_chunk_frames     # not the 62 frames that 5 s would allow
    with pytest.raises(LabError) as e:
        run_once(engine, engine.spec, Request(TEXT, max_audio_s=5.0), cold=False, run=0)
    assert e.value.where == "text" and "produced no audio" in e.value.message


def test_context_audio_at_another_sample_rate_is_refused(csm_tiny):
    turn = ContextTurn("Earlier.", audio=np.zeros(16000, np.float32), sample_rate=16000)
    with pytest.raises(LabError) as e:
        list(csm_tiny.stream(Request(TEXT, context=(turn,)), Timeline()))
    assert e.value.where == "context[0].sample_rate" and "24000 Hz" in e.value.message
