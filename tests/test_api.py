"""The speech API for real: `python app.py` on a free loopback port (web.server.AppProcess), driven by clients
nobody here wrote: the official `openai` Python package and `curl`. Presets from tests/presets: hibari (a real
English voice, its audio checked with the quality guardrail's WER), tiny CSM one at a time and batched.

The server takes one comparison at a time (LAB_MAX_WAITING=1) so that the line's bound is reached by a second
request, and builds nothing at start (LAB_PREWARM=0).
"""
import io
import json
import os
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import openai
import pytest

from lab.measure import quality
from lab.measure.metrics import Timeline, figures
from harness import AppProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow   # serves the app and scores real speech
THREE_SENTENCES = "Thanks for calling the lab. The voice streams as it is made. Goodbye for now."
# A frame already being generated when the cancel lands still finishes, and so may the decode of its chunk.
CANCEL_GRACE_S = 0.5
# Whisper tiny.en on hibari's clear voice gets three plain sentences right but for a word or so.
WER_MAX = 0.2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    app = AppProcess(str(tmp), presets_dir=os.path.join(ROOT, "tests", "presets"),
                     env={"LAB_MAX_WAITING": "1", "LAB_PREWARM": "0"})
    yield {"url": app.url, "history": tmp / "history.jsonl", "tmp": tmp}
    app.stop()


@pytest.fixture(scope="module")
def client(server):
    # No retries: a 429 must reach the test as it reached the client.
    return openai.OpenAI(base_url=server["url"] + "v1", api_key="not-needed", max_retries=0, timeout=300)


def page_figure_keys() -> set[str]:
    """The figures every run record of the page carries (lab.metrics.figures of any timeline)."""
    timeline = Timeline()
    timeline.mark("request")
    timeline.chunk(0.1)
    return set(figures(timeline))


def records(server) -> list[dict]:
    path = server["history"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def record_of(server, request_id: str) -> dict:
    found = [r for r in records(server) if r.get("request_id") == request_id]
    assert len(found) == 1, f"no history record for {request_id}"
    return found[0]


def wait_for(check, timeout_s=60.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def curl(server, body: dict, tmp, name: str, extra=()) -> tuple[int, dict, bytes]:
    """POST with curl: (status, headers in lower case, body bytes)."""
    head, out = tmp / f"{name}.head", tmp / f"{name}.body"
    done = subprocess.run(["curl", "-sS", "-N", "-D", str(head), "-o", str(out), "-w", "%{http_code}",
                           "-H", "Content-Type: application/json", "-d", json.dumps(body), *extra,
                           server["url"] + "v1/audio/speech"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    headers = {}
    for line in head.read_text().splitlines()[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(done.stdout), headers, out.read_bytes()


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768, w.getframerate()


# -- openai's client ----------------------------------------------------------------------------------------------
def test_openai_streams_hibari_as_it_speaks_and_the_guardrail_hears_the_text(client, server):
    arrivals, parts = [], []
    with client.audio.speech.with_streaming_response.create(model="hibari", voice="heart", input=THREE_SENTENCES,
                                                            response_format="wav") as response:
        assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
        for part in response.iter_bytes():
            arrivals.append(time.perf_counter())
            parts.append(part)
        request_id, rate = response.headers["x-request-id"], int(response.headers["x-sample-rate"])
    audio, wav_rate = read_wav(b"".join(parts))
    assert wav_rate == rate
    # One chunk per sentence, each sent when it is synthesized: the first came well before the last.
    assert arrivals[-1] - arrivals[0] > 0.05, "the audio came all at once, not as it was generated"
    scored = quality.assess(audio, rate, THREE_SENTENCES)
    assert scored["wer"] <= WER_MAX, scored["transcript"]
    record = record_of(server, request_id)
    assert record["source"] == "api" and record["preset"] == "hibari" and not record.get("cancelled")
    assert record["api"]["response_format"] == "wav" and record["api"]["stream"] is True
    # The same figures as a page run, scored by the guardrail like one, and the same audio that was sent.
    assert page_figure_keys() <= set(record) and not record["quality"].startswith("n/a")
    assert abs(record["audio_s"] - len(audio) / rate) < 1e-3


def test_openai_whole_file_of_tiny_csm_is_the_run_s_audio(client, server):
    response = client.audio.speech.create(model="csm-tiny", voice="1", input="Hello there.", response_format="pcm",
                                          extra_body={"stream": False, "max_audio_s": 1.5, "seed": 4})
    pcm = response.content
    assert response.response.headers["content-length"] == str(len(pcm))
    record = record_of(server, response.response.headers["x-request-id"])
    assert record["source"] == "api" and record["preset"] == "csm-tiny" and record["api"]["voice"] == "1"
    assert len(pcm) == round(record["audio_s"] * record["sample_rate"]) * 2 and 1.0 < record["audio_s"] <= 1.5


@pytest.mark.parametrize("body, status, param", [
    ({"model": "no-such-preset", "input": "Hi."}, 404, "model"),
    ({"model": "csm-gpu", "input": "Hi."}, 404, "model"),                 # a preset this CPU machine cannot run
    ({"model": "hibari", "input": "   "}, 400, "input"),
    ({"model": "hibari", "input": "word " * 300}, 400, "input"),          # over the 1000-character limit
    ({"model": "hibari", "input": "Hi.", "response_format": "mp3"}, 400, "response_format"),
    ({"model": "hibari", "input": "Hi.", "voice": "alloy"}, 400, "voice"),
    ({"model": "hibari", "input": "Hi.", "speed": 2.0}, 400, "speed"),
])
def test_each_refusal_is_openai_shaped_and_names_its_field_to_both_clients(client, server, body, status, param):
    kwargs = {k: v for k, v in body.items() if k in ("model", "input", "response_format", "speed")}
    with pytest.raises(openai.APIStatusError) as refused:
        client.audio.speech.create(voice=body.get("voice", "heart"), **kwargs)
    error = refused.value.body
    assert refused.value.status_code == status and error["param"] == param
    assert error["message"].startswith(f"{param}: ") and error["type"] == "invalid_request_error"
    code, headers, answer = curl(server, body, server["tmp"], "refused")
    assert code == status and headers["content-type"] == "application/json"
    assert json.loads(answer)["error"]["param"] == param


# -- curl ---------------------------------------------------------------------------------------------------------
def test_curl_streams_tiny_csm_as_chunked_pcm_at_the_rate_in_its_header(server):
    code, headers, body = curl(server, {"model": "csm-tiny", "input": "Streaming now.", "max_audio_s": 2},
                               server["tmp"], "stream")
    assert code == 200 and headers["transfer-encoding"] == "chunked" and headers["content-type"] == "audio/pcm"
    record = record_of(server, headers["x-request-id"])
    assert int(headers["x-sample-rate"]) == record["sample_rate"]
    assert len(body) == round(record["audio_s"] * record["sample_rate"]) * 2 and record["chunks"] > 1


def test_curl_whole_wav_carries_its_length_and_reads_as_a_wav_file(server):
    code, headers, body = curl(server, {"model": "hibari", "input": "One whole file.", "response_format": "wav",
                                        "stream": False}, server["tmp"], "whole")
    assert code == 200 and int(headers["content-length"]) == len(body)
    audio, rate = read_wav(body)
    assert rate == int(headers["x-sample-rate"]) and len(audio) * 2 + 44 == len(body)
    assert quality.assess(audio, rate, "One whole file.")["wer"] <= WER_MAX


def test_curl_server_sent_events_carry_the_audio_and_a_done_event(server):
    code, headers, body = curl(server, {"model": "hibari", "input": "Events now.", "stream_format": "sse"},
                               server["tmp"], "sse")
    events = [json.loads(line[len("data: "):]) for line in body.decode().split("\n\n") if line.startswith("data: ")]
    assert code == 200 and headers["content-type"].startswith("text/event-stream")
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert events[-1]["type"] == "speech.audio.done" and events[-1]["audio_s"] > 0


def test_models_lists_what_this_machine_runs_with_voices(server):
    code = subprocess.run(["curl", "-sS", server["url"] + "v1/models"], capture_output=True, text=True, timeout=30)
    models = {m["id"]: m for m in json.loads(code.stdout)["data"]}
    assert {"hibari", "csm-tiny", "csm-tiny-batched"} <= set(models) and "csm-gpu" not in models
    assert models["hibari"]["voices"] == ["heart"] and models["csm-tiny-batched"]["batches"] is True


# -- the line, disconnects, batching ---------------------------------------------------------------------------------
def long_stream(server, tmp, name):
    """curl streaming a minute of tiny CSM in the background, once its first audio is in."""
    out = tmp / f"{name}.body"
    proc = subprocess.Popen(["curl", "-sS", "-N", "-o", str(out), "-H", "Content-Type: application/json", "-d",
                             json.dumps({"model": "csm-tiny", "input": f"A long one, {name}.", "max_audio_s": 60}),
                             server["url"] + "v1/audio/speech"])
    wait_for(lambda: out.exists() and out.stat().st_size > 0, 120)
    return proc


def cancelled_api_record(server, text):
    return wait_for(lambda: next((r for r in records(server) if r.get("cancelled") and r.get("text") == text
                                  and r.get("source") == "api"), None))


def test_past_the_line_s_bound_a_request_gets_429_with_retry_after(client, server):
    holder = long_stream(server, server["tmp"], "holder")
    try:
        with pytest.raises(openai.RateLimitError) as busy:
            client.audio.speech.create(model="hibari", voice="heart", input="Am I in?")
        assert int(busy.value.response.headers["retry-after"]) >= 1
        assert busy.value.body["code"] == "queue_full"
    finally:
        holder.terminate()
        holder.wait()
    cancelled_api_record(server, "A long one, holder.")   # the line is free again once that run has stopped


def test_a_client_that_disconnects_stops_its_generation_at_the_next_frame(client, server):
    text = "A long one, then gone."
    with client.audio.speech.with_streaming_response.create(model="csm-tiny", voice="0", input=text,
                                                            extra_body={"max_audio_s": 60}) as response:
        next(response.iter_bytes())
        gone_at = time.time()
    record = cancelled_api_record(server, text)
    assert record["cancel_s"] is not None and record["audio_s"] < 50
    after = [t for t in record["frame_s"] if t > record["cancel_s"] + CANCEL_GRACE_S]
    assert not after, f"{len(after)} frames after the cancel"
    assert record["last_frame_time"] - gone_at < 2.0


def test_a_batching_preset_takes_two_api_streams_at_once_past_the_line_s_bound(client, server):
    client.audio.speech.create(model="csm-tiny-batched", voice="0", input="Build it.",
                               extra_body={"max_audio_s": 0.5})   # built first: the two below then run together
    spans, failures = {}, []

    def one(name):
        try:
            with client.audio.speech.with_streaming_response.create(model="csm-tiny-batched", voice="0",
                                                                    input=f"Together, {name}.",
                                                                    extra_body={"max_audio_s": 4}) as r:
                stamps = [time.perf_counter() for _ in r.iter_bytes()]
            spans[name] = (stamps[0], stamps[-1])
        except openai.APIError as e:
            failures.append(e)

    threads = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures
    (a0, a1), (b0, b1) = spans["a"], spans["b"]
    assert a0 < b1 and b0 < a1, "the two streams did not overlap"


# -- the load bench, pointed at this server -------------------------------------------------------------------------
def load_bench(server, name, *args) -> dict:
    out = server["tmp"] / name
    done = subprocess.run([sys.executable, "-m", "lab.bench", "--endpoint", server["url"],
                           "--out", str(out), "--warmup", "0", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads((out / "load.json").read_text())


def test_the_load_bench_reads_hibari_s_wav_over_http_and_scores_it_with_the_guardrail(server):
    results = load_bench(server, "bench-hibari", "--model", "hibari", "--format", "wav", "--concurrency", "1",
                         "--requests", "2", "--wer", "2")
    level = results["levels"][0]
    assert level["ok"] == 2 and level["continuity"]["c200"] == 1.0
    assert 0 < level["ttfb_ms"]["median"] <= level["audible_ttfa_ms"]["median"]
    assert level["wer"]["scored"] == 2 and level["wer"]["corpus_wer"] <= WER_MAX, level["wer"]["transcripts"]
    assert (server["tmp"] / "bench-hibari" / "load-concurrency.png").stat().st_size > 0


def test_the_load_bench_spreads_load_over_client_processes_and_records_their_cpu(server):
    results = load_bench(server, "bench-batched", "--model", "csm-tiny-batched", "--concurrency", "2", "--rate", "4",
                         "--requests", "4", "--processes", "2", "--max-audio-s", "1")
    closed, poisson = results["levels"]
    for level in (closed, poisson):
        assert level["ok"] == level["requests"] >= 4 and level["client"]["processes"] == 2
        assert all(0 <= u < 1.5 for u in level["client"]["cpu_util"])
    assert poisson["mode"] == "open" and poisson["rate_hz"] == 4 and poisson["send_lag_ms"]["median"] < 100


def socket_url(server) -> str:
    return server["url"].replace("http://", "ws://") + "v1/audio/speech"


def socket_speech(ws, body: dict) -> tuple[dict, bytes, dict]:
    """One request on the API's WebSocket: (speech.started, the PCM frames joined, the closing event)."""
    ws.send(json.dumps(body))
    started, pcm = json.loads(ws.recv(timeout=300)), b""
    if started["type"] == "error":
        return started, b"", started
    while isinstance(message := ws.recv(timeout=300), bytes):
        pcm += message
    return started, pcm, json.loads(message)


def test_the_websocket_streams_the_post_s_audio_and_stays_open_for_the_next_request(server, client):
    from websockets.sync.client import connect

    body = {"model": "hibari", "input": "Thanks for calling the lab.", "voice": "heart"}
    with connect(socket_url(server)) as ws:
        refused, _, _ = socket_speech(ws, {**body, "response_format": "wav"})
        assert refused["type"] == "error" and refused["error"]["param"] == "response_format"
        started, pcm, done = socket_speech(ws, body)            # the same socket, after an error
        assert (started["type"], started["sample_rate"], done["type"]) == ("speech.started", 24000, "speech.audio.done")
        assert done["request_id"] == started["request_id"] and done["audio_s"] == pytest.approx(len(pcm) / 2 / 24000)
        again, pcm_again, _ = socket_speech(ws, body)
    # speech.audio.done comes once the model is free: the POST does not find the line full (LAB_MAX_WAITING=1)
    posted = client.audio.speech.create(model="hibari", voice="heart", input=body["input"], response_format="pcm")
    assert pcm == pcm_again == posted.content                 # seeded: the socket's audio is the POST's, byte for byte
    assert record_of(server, started["request_id"])["source"] == "api"


def test_a_websocket_client_that_goes_stops_its_generation(server):
    from websockets.sync.client import connect

    text = "A long one on the socket, then gone."
    with connect(socket_url(server)) as ws:
        ws.send(json.dumps({"model": "csm-tiny", "input": text, "max_audio_s": 60}))
        assert json.loads(ws.recv(timeout=300))["type"] == "speech.started"
        assert isinstance(ws.recv(timeout=300), bytes)
    record = cancelled_api_record(server, text)
    assert record["audio_s"] < 50


def test_speech_cancel_stops_the_socket_s_run_and_the_socket_serves_the_next(server):
    from websockets.sync.client import connect

    text = "A long one on the socket, cancelled."
    with connect(socket_url(server)) as ws:
        ws.send(json.dumps({"model": "csm-tiny", "input": text, "max_audio_s": 60}))
        assert json.loads(ws.recv(timeout=300))["type"] == "speech.started"
        ws.send(json.dumps({"type": "speech.cancel"}))
        while isinstance(message := ws.recv(timeout=300), bytes):
            pass
        assert json.loads(message)["error"]["code"] == "cancelled"
        _, pcm, done = socket_speech(ws, {"model": "csm-tiny", "input": "Short.", "max_audio_s": 1})
        assert done["type"] == "speech.audio.done" and len(pcm) > 0
    assert cancelled_api_record(server, text)["audio_s"] < 50
