"""The speech API's rules and the load bench's figures, without a server: request bodies checked field by field
against the test presets' catalog, the WAV and SSE framing read back by other code (Python's `wave`, JSON), and the
bench's player, continuity and SLO search on made-up arrivals."""
import io
import json
import os
import wave

import numpy as np
import pytest

from lab import loadbench
from lab.availability import Catalog
from lab.serving import speech_api
from lab.serving.line import Cancel, ModelLine
from lab.serving.speech_api import ApiError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def catalog():
    return Catalog(os.path.join(ROOT, "tests", "presets"))


def refused(body, catalog) -> ApiError:
    with pytest.raises(ApiError) as e:
        speech_api.parse(body, catalog)
    return e.value


@pytest.mark.parametrize("body, param, status", [
    ({"input": "Hi."}, "model", 400),
    ({"model": "nope", "input": "Hi."}, "model", 404),
    ({"model": "csm-gpu", "input": "Hi."}, "model", 404),
    ({"model": "hibari"}, "input", 400),
    ({"model": "hibari", "input": "Hi.", "response_format": "flac"}, "response_format", 400),
    ({"model": "hibari", "input": "Hi.", "stream_format": "ws"}, "stream_format", 400),
    ({"model": "hibari", "input": "Hi.", "stream_format": "sse", "stream": False}, "stream", 400),
    ({"model": "hibari", "input": "Hi.", "voice": "1"}, "voice", 400),
    ({"model": "csm-tiny", "input": "Hi.", "voice": "heart"}, "voice", 400),
    ({"model": "hibari", "input": "Hi.", "instructions": "whisper it"}, "instructions", 400),
    ({"model": "hibari", "input": "Hi.", "respones_format": "wav"}, "respones_format", 400),
])
def test_a_bad_body_is_refused_naming_its_field_and_how_to_fix_it(catalog, body, param, status):
    e = refused(body, catalog)
    assert (e.status, e.param) == (status, param) and e.message.startswith(f"{param}: ")
    assert set(e.body()["error"]) == {"message", "type", "param", "code"}


def test_a_preset_this_machine_cannot_run_says_why(catalog):
    assert "GPU" in refused({"model": "csm-gpu", "input": "Hi."}, catalog).message


def test_voices_map_to_the_family_s_own_and_random_weights_are_a_model_id(catalog):
    speech = speech_api.parse({"model": "csm-tiny", "input": "Hi.", "voice": {"id": "1"}}, catalog)
    assert (speech.voice, speech.speaker, speech.random_weights) == ("1", 1, False)
    assert speech_api.parse({"model": "hibari", "input": "Hi."}, catalog).voice == "heart"
    ids = {m["id"] for m in speech_api.models(catalog)["data"]}
    assert "pocket-tts-tiny:random" in ids and "hibari:random" not in ids and "csm-gpu" not in ids
    assert speech_api.parse({"model": "pocket-tts-tiny:random", "input": "Hi."}, catalog).random_weights


def test_the_line_s_bound_becomes_429_with_retry_after():
    line = ModelLine(max_waiting=1)
    holder = line.turn(12.0, Cancel())
    with holder:
        with pytest.raises(Exception) as full:
            line.turn(None, Cancel())
    e = speech_api.from_lab(full.value)
    assert (e.status, e.headers()) == (429, {"Retry-After": str(e.retry_after_s)}) and 1 <= e.retry_after_s <= 12


def test_a_whole_wav_reads_back_as_the_samples_sent():
    pcm = (np.sin(np.arange(2400) / 5) * 8000).astype("<i2").tobytes()
    with wave.open(io.BytesIO(speech_api.wav_header(24000, len(pcm)) + pcm)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.readframes(w.getnframes()) == pcm


def test_sse_events_are_openai_s_delta_and_done():
    delta = json.loads(speech_api.audio_delta(b"\x01\x02")[len(b"data: "):])
    assert delta["type"] == "speech.audio.delta" and delta["audio"] == "AQI="
    assert json.loads(speech_api.audio_done({"audio_s": 1.5})[6:])["type"] == "speech.audio.done"


# -- the load bench's figures ---------------------------------------------------------------------------------------
def tone(seconds: float, rate: int = 1000, loud: bool = True) -> bytes:
    n = int(seconds * rate)
    return ((np.sin(np.arange(n)) * (8000 if loud else 0)).astype("<i2")).tobytes()


def test_a_streamed_wav_split_anywhere_gives_ttfb_past_the_header_and_audible_past_the_silence():
    """A WAV streamed in pieces cut mid-header and mid-sample: TTFB is the first audio byte, audible TTFA the piece
    that holds the first loud window, and a gap longer than the audio played so far is a stall."""
    body = speech_api.wav_header(1000) + tone(0.2, loud=False) + tone(0.5) + tone(0.3)
    cuts = [30, 245, 1444, len(body)]       # mid header; 100 samples and an odd byte; 600 samples; 300 samples
    stamps = [0.01, 0.10, 0.25, 1.15]       # seconds after the arrival at 0
    received = loadbench.Received("x", due_s=0.0)
    received.expect_wav()
    start = 0
    for cut, stamp in zip(cuts, stamps):
        received.feed(body[start:cut], stamp)
        start = cut
    f = received.figures()
    assert received.sample_rate == 1000 and f["ttfb_ms"] == pytest.approx(100)
    assert f["audio_s"] == pytest.approx(1.0) and f["first_audible_s"] == pytest.approx(0.2)
    assert f["audible_ttfa_ms"] == pytest.approx(250)   # the piece holding sample 200 came at 0.25 s
    # played from 0.10: 0.1 s in hand, the next piece 50 ms late; then 0.6 s to 0.85, the last piece 300 ms late
    assert f["underruns"] == 2 and f["max_gap_ms"] == pytest.approx(300) and f["stall_s"] == pytest.approx(0.35)


def test_continuity_counts_a_failed_request_as_a_broken_stream():
    ok = {"ttfb_ms": 10, "audible_ttfa_ms": 10, "rtf": 0.5, "steady_rtf": 0.5, "underruns": 0, "stall_s": 0,
          "audio_s": 1.0, "send_lag_ms": 0.1}
    level = loadbench.summary([{**ok, "max_gap_ms": 0}, {**ok, "max_gap_ms": 120},
                               {"error": "HTTP 429: busy", "status": 429, "send_lag_ms": 0.2}], [0.5], [1.0])
    assert level["continuity"] == {"c50": pytest.approx(1 / 3), "c100": pytest.approx(1 / 3),
                                   "c200": pytest.approx(2 / 3)}
    assert level["errors"] == {"429": 1} and not loadbench.meets(level, 1000)


@pytest.mark.parametrize("integer, limit", [(True, 37), (False, 61.5)])
def test_the_slo_search_finds_the_highest_passing_load(integer, limit):
    answer, tried = loadbench.slo_search(lambda v: v <= limit, 1, 200, integer)
    if integer:
        assert answer == limit
    else:
        assert limit * 0.95 <= answer <= limit
    assert len(tried) <= 12 and all(passed == (v <= limit) for v, passed in tried)
    assert loadbench.slo_search(lambda v: False, 1, 200, integer)[0] is None


@pytest.mark.parametrize("body, param", [
    ({"model": "hibari", "input": "Hi.", "response_format": "wav"}, "response_format"),
    ({"model": "hibari", "input": "Hi.", "stream": False}, "stream"),
    ({"model": "hibari", "input": "Hi.", "stream_format": "sse"}, "stream_format"),
    ({"model": "nope", "input": "Hi."}, "model"),
])
def test_the_websocket_takes_the_post_s_fields_and_answers_only_in_pcm(catalog, body, param):
    with pytest.raises(ApiError) as e:
        speech_api.parse_socket(body, catalog)
    assert e.value.param == param and e.value.message.startswith(f"{param}: ")
    assert speech_api.parse_socket({"model": "hibari", "input": "Hi."}, catalog).response_format == "pcm"
