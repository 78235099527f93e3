"""The batched CSM engine (max_streams > 1) on tiny weights, float32, on the CPU: many streams through one step, each
what it would be alone. The GPU run of the same checks, with the graphed step, is benchmarks/gpu/concurrency.py."""
import dataclasses
import threading
import time

import numpy as np
import pytest
import torch

from lab import engines, session
from lab.errors import Cancelled, LabError
from lab.manager import ModelManager
from lab.measure.metrics import Timeline, figures
from lab.request import Request
from lab.spec import VariantSpec

from conftest import TINY_CSM

TEXT = "Hello there, this is a streaming test."
OTHERS = ["Other text number one is a bit longer.", "Two.", "A third one, of middling length here."]


@pytest.fixture(scope="module")
def batched():
    engine = engines.build(TINY_CSM.replace(name="csm-tiny-batched", max_streams=4))
    yield engine
    engine.close()


def drain(ticket):
    chunks = list(ticket.chunks())
    return ticket.all_codes, np.concatenate([c.samples for c in chunks]) if chunks else np.zeros(0, np.float32)


def crowd(engine, requests, after_frames=0, cancel_at=None):
    """Open `requests` one after another, each once the previous has run `after_frames` frames (so they stand at
    other positions); return their (codes, audio) in order."""
    tickets = []
    for request in requests:
        if tickets:
            while tickets[-1].frames < after_frames and not tickets[-1].done:
                time.sleep(0.005)
        tickets.append(engine.open(request, Timeline(), cancel_at.get(len(tickets)) if cancel_at else None))
    return tickets


def test_a_greedy_stream_gives_the_same_codes_alone_beside_others_and_on_the_one_stream_engine(csm_tiny, batched):
    request = Request(TEXT, max_audio_s=1.6)
    list(csm_tiny.stream(request, Timeline()))
    one_stream = csm_tiny.last_codes.numpy()
    alone, _ = drain(batched.open(request, Timeline()))
    tickets = crowd(batched, [Request(t, max_audio_s=2.0, seed=i) for i, t in enumerate(OTHERS)] + [request], 3)
    beside, _ = drain(tickets[-1])
    for t in tickets[:-1]:
        drain(t)
    assert len(one_stream) == 20
    np.testing.assert_array_equal(alone, one_stream)
    np.testing.assert_array_equal(beside, one_stream)


def test_each_streams_audio_equals_its_own_whole_utterance_decode_and_streams_before_the_end(batched):
    tickets = crowd(batched, [Request(t, max_audio_s=1.2, seed=i) for i, t in enumerate([TEXT, *OTHERS])], 2)
    outs = [drain(t) for t in tickets]
    for (codes, audio), ticket in zip(outs, tickets):
        with torch.no_grad():
            whole = batched.model.codec_model.decode(torch.as_tensor(codes).T[None]).audio_values[0, 0].numpy()
        assert audio.shape == whole.shape
        # float32 rounding only: convolutions and attention over several rows sum in another order than over one
        # (about 1e-4 of the peak); a row reading another's state would be off by the signal itself.
        np.testing.assert_allclose(audio, whole, atol=1e-4 * np.abs(whole).max())
        chunks = ticket.timeline.chunks
        assert len(chunks) >= 3 and chunks[0][0] < ticket.timeline.frames[-1]
    # Not trivially: different texts made different codes, so a row that read another's state would show.
    assert not np.array_equal(outs[0][0], outs[1][0])


def test_a_burst_at_an_idle_engine_is_prefilled_at_once(batched, monkeypatch):
    """Arrivals that keep coming (here 10 ms apart, inside a quiet period of 100 ms) gather into one admission, also
    when they come just as the streams before them end: the scheduler's policy reaches the real engine."""
    monkeypatch.setattr(batched.scheduler, "policy", dataclasses.replace(batched.scheduler.policy, quiet_s=0.1))
    admissions = []
    admit = batched._admit
    monkeypatch.setattr(batched, "_admit", lambda tickets: admissions.append(len(tickets)) or admit(tickets))
    take = batched._take   # the host's share of a frame, slowed: the next burst begins while the last is handled
    monkeypatch.setattr(batched, "_take", lambda *frame: (take(*frame), time.sleep(0.015)))
    for burst in range(2):   # the second comes as the first ends, while its last frame is still in flight
        tickets = []
        for i, text in enumerate([TEXT, *OTHERS]):
            tickets.append(batched.open(Request(text, max_audio_s=0.4, seed=i), Timeline()))
            time.sleep(0.01)
        for t in tickets:
            drain(t)
    assert admissions == [4, 4]


def test_more_requests_than_slots_wait_their_turn_and_each_ends_complete(batched):
    requests = [Request(f"Request number {i} says this.", max_audio_s=0.8, seed=i) for i in range(6)]
    tickets = [batched.open(r, Timeline()) for r in requests]
    assert max(batched.place_in_line(t) for t in tickets) >= 1     # 6 requests, 4 slots: someone waits
    for t in tickets:
        codes, audio = drain(t)
        assert len(codes) == 10 and len(audio) == 10 * 1920
        assert figures(t.timeline)["audio_s"] == pytest.approx(0.8)
    assert not batched.busy()


def test_a_cancelled_stream_frees_its_slot_and_its_neighbours_are_undisturbed(batched):
    requests = [Request(t, max_audio_s=1.6, seed=i) for i, t in enumerate([TEXT, *OTHERS[:2]])]
    solo = [drain(batched.open(r, Timeline()))[0] for r in requests]
    stop = threading.Event()
    tickets = crowd(batched, requests, 1, cancel_at={1: stop})
    while tickets[1].frames < 4:
        time.sleep(0.005)
    stop.set()
    stopped_at = time.perf_counter()
    with pytest.raises(Cancelled):
        drain(tickets[1])
    for i in (0, 2):
        np.testing.assert_array_equal(drain(tickets[i])[0], solo[i])
    assert tickets[1].frames < 20 and all(t < stopped_at + 1.0 for t in tickets[1].timeline.frames)
    assert tickets[1].row not in [t.row for t in batched.scheduler.slots if t is not None]


def test_a_consumer_that_goes_away_frees_its_slot(batched):
    stream = batched.stream(Request(TEXT, max_audio_s=4.0), Timeline())
    next(stream)
    stream.close()      # a closed page: the generator is dropped mid-stream
    deadline = time.monotonic() + 5
    while batched.busy() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not batched.busy()


@pytest.mark.slow
def test_sampled_streams_repeat_with_their_seed_whatever_their_neighbours(batched):
    request = Request(TEXT, max_audio_s=1.0, temperature=1.0, seed=5)
    alone, _ = drain(batched.open(request, Timeline()))
    tickets = crowd(batched, [Request(OTHERS[0], max_audio_s=2.0, temperature=0.7, seed=1), request], 2)
    beside, _ = drain(tickets[1])
    drain(tickets[0])
    other_seed, _ = drain(batched.open(Request(TEXT, max_audio_s=1.0, temperature=1.0, seed=6), Timeline()))
    np.testing.assert_array_equal(alone, beside)
    assert not np.array_equal(alone, other_seed)


def test_a_request_that_does_not_fit_its_row_is_refused_with_the_room_there_is(batched):
    with pytest.raises(LabError, match=r"max_audio_s: .*use max_audio_s of at most"):
        batched.open(Request(TEXT, max_audio_s=90.0), Timeline())
    with pytest.raises(LabError, match="top_k"):
        batched.open(Request(TEXT, temperature=1.0, top_k=10), Timeline())


@pytest.mark.parametrize("changes, fix", [
    ({"kernels": "triton", "device": "cuda", "dtype": "bfloat16", "compile": "cuda-graphs"}, "use kernels: torch"),
    ({"prefill": "per-segment"}, "use prefill: batched"),
    ({"max_streams": 0}, "use 1 to 4096"),
])
def test_max_streams_refuses_what_cannot_batch_and_names_the_fix(changes, fix):
    with pytest.raises(LabError, match=fix):
        TINY_CSM.replace(**{"max_streams": 8, **changes})


@pytest.mark.slow
def test_the_step_compiled_by_inductor_streams_the_eager_steps_codes_and_audio(batched):
    """compile: inductor on the batched step (the model's pieces over symbolic rows and KV length, and the codec's
    frame): each stream's codes, greedy or sampled with its seed, are the eager step's, alone and beside others at
    other positions, and its audio matches to float32 rounding."""
    requests = [Request(TEXT, max_audio_s=0.8), Request(OTHERS[0], max_audio_s=0.8, temperature=1.0, seed=3),
                Request(OTHERS[2], max_audio_s=0.8, seed=1)]
    eager = [drain(t) for t in crowd(batched, requests, 2)]
    engine = engines.build(TINY_CSM.replace(name="csm-tiny-batched-inductor", max_streams=4, compile="inductor"))
    try:
        alone = drain(engine.open(requests[0], Timeline()))
        compiled = [drain(t) for t in crowd(engine, requests, 2)]
    finally:
        engine.close()
    assert "inductor compiled" in " ".join(engine.report.notes)
    np.testing.assert_array_equal(alone[0], eager[0][0])
    for (codes, audio), (eager_codes, eager_audio) in zip(compiled, eager):
        assert len(codes) == 10
        np.testing.assert_array_equal(codes, eager_codes)
        np.testing.assert_allclose(audio, eager_audio, atol=1e-4 * np.abs(eager_audio).max())


def test_max_streams_is_for_csm_only():
    with pytest.raises(LabError, match="use max_streams: 1"):
        VariantSpec(family="pocket_tts", weights="tiny").replace(max_streams=4)


def test_a_comparison_of_batching_presets_does_not_wait_in_the_line(batched, csm_tiny):
    """The page's line (the run loop's `lock`) is held by someone else: a batching preset goes straight on, a
    one-at-a-time preset waits."""
    line = threading.Lock()
    line.acquire()
    try:
        for engine, should_wait in ((batched, False), (csm_tiny, True)):
            manager = ModelManager(builder=lambda spec, progress, e=engine: e)
            done = threading.Event()

            def run(e=engine, d=done):
                for _ in session.run_presets(manager, [e.spec], Request(TEXT, max_audio_s=0.4), 0, lock=line):
                    pass
                d.set()

            threading.Thread(target=run, daemon=True).start()
            assert done.wait(30 if not should_wait else 2) is not should_wait
    finally:
        line.release()



def test_the_cli_sweeps_streams_through_a_batching_preset_and_refuses_a_bad_list(batched, tmp_path, capsys):
    from lab import cli

    manager = ModelManager(builder=lambda spec, progress: batched)
    results = cli.sweep([batched.spec], Request(TEXT, max_audio_s=0.8), [1, 3], None, str(tmp_path), manager)
    assert [lvl["streams"] for lvl in results["levels"]] == [1, 3]
    assert all(lvl["audio_s"] == pytest.approx(0.8 * lvl["streams"]) for lvl in results["levels"])
    assert (tmp_path / "sweep.json").exists()
    assert cli.main(["--presets", "csm-cpu", "--weights", "random", "--streams", "1,x"]) == 2
    assert "--streams: '1,x' is not a comma list" in capsys.readouterr().err


@pytest.mark.slow
def test_triton_attention_streams_the_sdpa_codes_and_serves_every_stacks_decode_steps(batched, monkeypatch):
    """attention: triton (fused.rows_attention, under Triton's interpreter here): each stream's greedy codes are
    SDPA's, and the backbone, the depth decoder and the codec's transformer all run their decode steps through it."""
    fused = pytest.importorskip("lab.engines.fused", reason="Triton is not installed")
    requests = [Request(t, max_audio_s=0.8, seed=i) for i, t in enumerate([TEXT, *OTHERS[:2]])]
    sdpa = [drain(t)[0] for t in crowd(batched, requests, 2)]
    engine = engines.build(TINY_CSM.replace(name="csm-tiny-batched-triton", max_streams=4, attention="triton"))
    served = []
    kernel = fused.rows_attention
    monkeypatch.setattr(fused, "rows_attention", lambda q, k, v, allowed, scale: served.append(q.shape) or kernel(
        q, k, v, allowed, scale))
    try:
        triton = [drain(t)[0] for t in crowd(engine, requests, 2)]
        stacks = (engine.model.backbone_model, engine.model.depth_decoder.model,
                  engine.model.codec_model.decoder.decoder_transformer)
        assert all(s.config._attn_implementation == fused.ROWS_ATTENTION for s in stacks)
    finally:
        engine.close()
    for got, want in zip(triton, sdpa):
        np.testing.assert_array_equal(got, want)
    assert {shape[1] for shape in served} == {4, 2}   # the backbone's 4 query heads, the depth decoder's and codec's 2
    assert {shape[2] for shape in served} == {1, 2}  # one token a step; two for the depth's first and the codec


# The kernel skips blocks of 64 slots that no token of a row may attend: 200 slots with a 30-slot window put the
# allowed slots of most rows past one or two skipped blocks, and leave blocks after them skipped too.
@pytest.mark.parametrize("rows,heads,kv_heads,tokens,slots,head_dim,window", [
    (3, 8, 2, 1, 40, 32, None), (2, 4, 4, 2, 70, 16, None), (5, 32, 8, 1, 100, 64, None), (6, 4, 2, 2, 200, 16, 30)])
def test_rows_attention_matches_a_float64_reference_with_per_row_masks(rows, heads, kv_heads, tokens, slots, head_dim,
                                                                       window):
    fused = pytest.importorskip("lab.engines.fused", reason="Triton is not installed")
    g = torch.Generator().manual_seed(rows * slots)
    q = torch.randn(rows, heads, tokens, head_dim, generator=g)
    k, v = (torch.randn(rows, kv_heads, slots, head_dim, generator=g) for _ in range(2))
    pos = torch.randint(0, slots - tokens, (rows,), generator=g)
    query = pos[:, None, None] + torch.arange(tokens)[None, :, None]
    allowed = (torch.arange(slots)[None, None] <= query)
    if window is not None:
        allowed &= torch.arange(slots)[None, None] > query - window
    allowed = allowed[:, None]
    allowed[0] = False   # a free slot's row may attend nowhere: zeros, not NaN
    group = heads // kv_heads
    scores = (q.double() @ k.double().repeat_interleave(group, 1).transpose(-1, -2)) * head_dim ** -0.5
    weights = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1).nan_to_num()
    want = (weights @ v.double().repeat_interleave(group, 1)).transpose(1, 2)

    out = fused.rows_attention(q, k, v, allowed, head_dim ** -0.5)

    assert out.shape == (rows, tokens, heads, head_dim) and torch.isfinite(out).all()
    assert ((out.double() - want).norm() / want.norm()).item() < 1e-5
    assert (out[0] == 0).all()
    shared = fused.rows_attention(q, k, v, allowed[1:2], head_dim ** -0.5)   # one mask for every row
    want_shared = fused.rows_attention(q, k, v, allowed[1:2].expand(rows, -1, -1, -1).contiguous(), head_dim ** -0.5)
    torch.testing.assert_close(shared, want_shared, atol=0, rtol=0)


def test_triton_attention_is_the_batched_engines_and_names_the_fix():
    with pytest.raises(LabError, match="set max_streams above 1"):
        TINY_CSM.replace(attention="triton")
    assert TINY_CSM.replace(max_streams=4, attention="triton").attention == "triton"
