"""The low-latency PCM path end to end: web.pcm.PcmHub publishing from this (worker) thread, a FastAPI app with
web.pcm.attach served by uvicorn on a free loopback port, and web/player.js playing in headless Chromium (Debian's
`chromium` through Playwright).

The audio is synthetic transport test data: a 440 Hz tone after 0.3 s of silence, 24 kHz, in 80-320 ms chunks.
The checks are of order and presence (the report arrives, heard >= received >= the chunk's stamp, underruns only
when a chunk is late), with loose bounds: the machine is shared and its timing noisy.
"""
import io
import threading
import time

import numpy as np
import pytest
import uvicorn
import wave
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, Response

from conftest import CHROMIUM, CHROMIUM_ARGS, free_port
from web.pcm import PcmHub, attach, decode_chunk, encode_chunk, to_int16_bytes

RATE_HZ = 24000
LEAD_SILENCE_S = 0.3
TONE_S = 0.6
JITTER_MS = 80
REPORT_TIMEOUT_S = 15
PAGE = """<!doctype html><html><body>
<div id="pcm-slot-0"></div><div id="pcm-slot-1"></div>
<div id="player-1"><audio></audio></div>
<script src="/lab/player.js"></script></body></html>"""
# Stands in for Gradio's stream segments in the "gradio" transport test.
SEGMENT_PATH = "/fake/stream/"


def serve_in_thread(app) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline_s = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline_s, "uvicorn did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/"


def tone(lead_silence_s=LEAD_SILENCE_S, tone_s=TONE_S) -> np.ndarray:
    t = np.arange(int(tone_s * RATE_HZ)) / RATE_HZ
    return np.concatenate([np.zeros(int(lead_silence_s * RATE_HZ)), 0.3 * np.sin(2 * np.pi * 440 * t)]).astype(
        np.float32)


def wav_bytes(audio: np.ndarray) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE_HZ)
        w.writeframes(to_int16_bytes(audio))
    return out.getvalue()


def chunks_of(audio: np.ndarray, sizes_s=(0.08, 0.16, 0.32)):
    """Growing chunks, as the models stream them: 80 ms, 160 ms, then 320 ms each."""
    at = 0
    for i in range(10**6):
        n = int(sizes_s[min(i, len(sizes_s) - 1)] * RATE_HZ)
        if at >= len(audio):
            return
        yield audio[at:at + n]
        at += n


def audible_at(first_audible: int, at: int, chunk: np.ndarray) -> int:
    """Index inside a chunk starting at sample `at` of the run's first audible sample, or -1."""
    return first_audible - at if at <= first_audible < at + len(chunk) else -1


def publish(hub, listener, run_id, slot=0, audio=None, pace=0.5, late_after=None, late_sleep_s=0.0,
            before_end=None):
    """Stream one run as the run loop would: chunks every `pace` x their duration; after chunk index
    `late_after` sleep late_sleep_s (a stall longer than what the page has scheduled). Returns stamps."""
    audio = tone() if audio is None else audio
    t_request_s = time.perf_counter()
    hub.start_run(listener, run_id, slot, RATE_HZ, t_request_s, label=f"run {run_id}")
    first_audible = int(np.argmax(np.abs(audio) > 1e-3))
    at = 0
    t_first_ready_s = None
    count = 0
    for index, chunk in enumerate(chunks_of(audio)):
        t_ready_s = time.perf_counter()
        t_first_ready_s = t_first_ready_s or t_ready_s
        assert hub.send_chunk(listener, run_id, index, chunk, t_ready_s, audible_at(first_audible, at, chunk))
        at += len(chunk)
        count += 1
        time.sleep(pace * len(chunk) / RATE_HZ)
        if index == late_after:
            time.sleep(late_sleep_s)
    if before_end:
        before_end()
    hub.end_run(listener, run_id, chunks=count, samples=at)
    return {"t_request_s": t_request_s, "t_first_ready_s": t_first_ready_s, "duration_s": at / RATE_HZ}


@pytest.fixture(scope="module")
def lab_server():
    hub = PcmHub()
    app = FastAPI()
    attach(app, hub)

    @app.get("/")
    def page():
        return HTMLResponse(PAGE)

    @app.get(SEGMENT_PATH + "{name}.wav")
    def segment(name: str):
        return Response(wav_bytes(tone()), media_type="audio/wav")

    server, thread, url = serve_in_thread(app)
    yield hub, url
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(lab_server):
    from playwright.sync_api import sync_playwright

    hub, url = lab_server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        pg = browser.new_page()
        pg.goto(url)
        pg.wait_for_function("window.labAudio && labAudio.connected && labAudio.clock.samples.length >= 10",
                             timeout=15000)
        pg.evaluate(f"labAudio.setJitterMs({JITTER_MS})")
        listener = pg.evaluate("labAudio.listenerId")
        deadline_s = time.monotonic() + 5
        while not hub.connected(listener):
            assert time.monotonic() < deadline_s
            time.sleep(0.02)
        yield pg, listener
        browser.close()


# -- without a browser ------------------------------------------------------------------------------------------
def test_chunk_wire_format_round_trips_and_clips():
    pcm = to_int16_bytes(np.array([0.0, 0.5, -2.0, 2.0], np.float32))
    header, samples = decode_chunk(encode_chunk({"run_id": "r", "index": 3}, pcm))
    assert header == {"run_id": "r", "index": 3}
    assert samples.tolist() == [0, 16383, -32767, 32767]


def test_messages_for_a_listener_not_connected_are_dropped_and_counted():
    hub = PcmHub()
    assert hub.start_run("nobody", 1, 0, RATE_HZ, time.perf_counter()) is False
    assert hub.send_chunk("nobody", 1, 0, np.zeros(240, np.float32), time.perf_counter(), -1) is False
    assert hub.end_run("nobody", 1, 1, 240) is False
    assert hub.dropped == 3 and not hub.connected("nobody")
    assert hub.wait_report(1, timeout_s=0.05) is None


# -- in Chromium ------------------------------------------------------------------------------------------------
def test_clock_offset_on_loopback_is_tight(page):
    pg, _ = page
    clock = pg.evaluate("({u: labAudio.clock.uncertaintyMs, o: labAudio.clock.offsetMs})")
    assert clock["o"] is not None
    assert 0 <= clock["u"] < 20


def test_a_dropped_socket_reconnects_with_the_same_listener(lab_server, page):
    hub, _ = lab_server
    pg, listener = page
    pg.evaluate("labAudio.dropSocket()")
    deadline_s = time.monotonic() + 5
    while hub.connected(listener):
        assert time.monotonic() < deadline_s
        time.sleep(0.02)
    while not hub.connected(listener):  # the page retries after a second
        assert time.monotonic() < deadline_s + 5
        time.sleep(0.05)
    assert pg.evaluate("labAudio.listenerId") == listener
    pg.wait_for_function("labAudio.connected", timeout=5000)


def test_on_time_run_reports_received_then_heard_after_the_leading_silence(lab_server, page):
    hub, _ = lab_server
    pg, listener = page
    stamps = publish(hub, listener, "on-time", slot=0)
    report = hub.wait_report("on-time", REPORT_TIMEOUT_S)
    assert report is not None, pg.evaluate("labAudio.log")
    assert report["transport"] == "pcm" and report["complete"] is True and report["audible"] is True
    assert report["ctx_state"] == "running"
    slack_ms = report["clock_uncertainty_ms"] + 1
    model_ms = (stamps["t_first_ready_s"] - stamps["t_request_s"]) * 1000
    assert report["received_ms"] >= model_ms - slack_ms
    assert report["heard_ms"] >= report["received_ms"]
    # The first audible sample sits 0.3 s into the run, behind the jitter buffer.
    assert report["heard_ms"] - report["received_ms"] >= LEAD_SILENCE_S * 1000 - 50
    assert report["received_last_ms"] >= report["received_ms"]
    assert report["underruns"] == 0 and report["gap_s"] == 0
    played = hub.wait_played("on-time", REPORT_TIMEOUT_S)
    assert played is not None
    assert played["t_received_s"] - stamps["t_first_ready_s"] >= stamps["duration_s"]
    state = pg.evaluate("labAudio.state(0)")
    assert state["state"] == "done" and state["run_id"] == "on-time"
    assert abs(state["position_s"] - stamps["duration_s"]) < 0.01
    figures = pg.text_content("#pcm-slot-0 .lab-pcm-figures")
    assert "received" in figures and "heard" in figures and "stalls 0" in figures


def test_a_late_chunk_is_a_browser_underrun_with_a_gap(lab_server, page):
    hub, _ = lab_server
    pg, listener = page
    # Chunk 1 ends 240 ms of audio in (+80 ms jitter); a 0.6 s stall leaves the schedule dry.
    publish(hub, listener, "late", slot=1, pace=0.2, late_after=1, late_sleep_s=0.6)
    report = hub.wait_report("late", REPORT_TIMEOUT_S)
    assert report is not None
    assert report["complete"] is True
    assert report["underruns"] >= 1 and report["gap_s"] > 0
    assert hub.wait_played("late", REPORT_TIMEOUT_S) is not None
    assert "stalls" in pg.text_content("#pcm-slot-1 .lab-pcm-figures")


def test_a_new_run_on_a_playing_slot_starts_from_zero(lab_server, page):
    hub, _ = lab_server
    pg, listener = page
    long_audio = tone(lead_silence_s=0.0, tone_s=2.0)
    # Publish the whole first run quickly, check from here that it is mid-clip, then start the second run.
    publish(hub, listener, "first", slot=0, audio=long_audio, pace=0.05)
    pg.wait_for_function("labAudio.state(0).run_id === 'first' && labAudio.state(0).position_s > 0.3",
                         timeout=10000)
    t_request_s = time.perf_counter()
    hub.start_run(listener, "second", 0, RATE_HZ, t_request_s)
    pg.wait_for_function("labAudio.state(0).run_id === 'second'", timeout=5000)
    state = pg.evaluate("labAudio.state(0)")
    assert state["position_s"] == 0 and state["received_s"] == 0
    assert state["state"] == "started · waiting for first audio"
    assert "waiting for first audio" in pg.text_content("#pcm-slot-0 .lab-pcm-state")
    audio = tone()
    first_audible = int(LEAD_SILENCE_S * RATE_HZ)
    at = 0
    for index, chunk in enumerate(chunks_of(audio)):
        hub.send_chunk(listener, "second", index, chunk, time.perf_counter(), audible_at(first_audible, at, chunk))
        at += len(chunk)
    hub.end_run(listener, "second", chunks=index + 1, samples=at)
    report = hub.wait_report("second", REPORT_TIMEOUT_S)
    assert report is not None and report["complete"] and report["underruns"] == 0
    assert hub.wait_played("second", REPORT_TIMEOUT_S) is not None
    assert hub.wait_played("first", 0.1) is None  # cut short by the second run: never "played"
    state = pg.evaluate("labAudio.state(0)")
    assert abs(state["received_s"] - len(audio) / RATE_HZ) < 1e-6
    # Replay of the finished clip starts from sample 0 of its whole audio.
    assert pg.evaluate("labAudio.replay(0)") is True
    assert pg.evaluate("labAudio.state(0).state") == "replaying"
    pg.evaluate("labAudio.reset()")
    assert pg.evaluate("labAudio.state(0).state") == "waiting"


def test_gradio_transport_is_measured_on_the_audio_element(lab_server, page):
    """A run with transport "gradio": the page measures #player-1's <audio> (here a WAV file standing in for
    Gradio's HLS stream) and sends the same report shape; a new run puts the element back at 0."""
    hub, _ = lab_server
    pg, listener = page
    pg.evaluate("""() => { const a = document.querySelector('#player-1 audio');
        a.src = '/fake/stream/old.wav'; a.load(); return a.play(); }""")
    pg.wait_for_function("document.querySelector('#player-1 audio').currentTime > 0.2", timeout=10000)
    t_request_s = time.perf_counter()
    hub.start_run(listener, "hls", 1, RATE_HZ, t_request_s, transport="gradio", stream_path=SEGMENT_PATH)
    pg.wait_for_function("labAudio.state(1).run_id === 'hls'", timeout=5000)
    assert pg.evaluate("document.querySelector('#player-1 audio').currentTime") == 0
    # What hls.js would do: fetch this run's segment and play it.
    pg.evaluate("""() => { const a = document.querySelector('#player-1 audio');
        a.src = '/fake/stream/run-hls.wav'; a.load(); return a.play(); }""")
    hub.end_run(listener, "hls", chunks=1, samples=len(tone()), first_audible_s=LEAD_SILENCE_S)
    report = hub.wait_report("hls", REPORT_TIMEOUT_S)
    assert report is not None, pg.evaluate("labAudio.log")
    assert report["transport"] == "gradio" and report["complete"]
    assert report["start_position_s"] < 0.05
    assert report["received_ms"] is not None and report["heard_ms"] >= report["received_ms"]
    assert report["heard_ms"] - report["received_ms"] >= LEAD_SILENCE_S * 1000 - 50
    assert hub.wait_played("hls", REPORT_TIMEOUT_S) is not None


# -- mounted next to a Gradio app, as `python app.py` serves ----------------------------------------------------
@pytest.mark.slow
def test_build_app_keeps_the_gradio_queue_and_loads_the_player(page):
    import gradio as gr
    from gradio_client import Client

    from web.server import build_app

    browser = page[0].context.browser
    with gr.Blocks() as demo:
        gr.HTML('<div id="pcm-slot-0"></div>')
        text = gr.Textbox(elem_id="in")
        out = gr.Textbox()
        gr.Button("go").click(lambda s: s.upper(), text, out, concurrency_id="gpu", concurrency_limit=1,
                              api_name="shout")
    demo.queue(default_concurrency_limit=2)
    hub = PcmHub()
    app = build_app(demo, hub, host="127.0.0.1", port=0, max_file_size="1mb")
    assert demo.max_file_size == 2**20
    server, thread, url = serve_in_thread(app)
    try:
        assert Client(url, verbose=False).predict("hi", api_name="/shout") == "HI"
        pg = browser.new_page()
        pg.goto(url)
        pg.wait_for_function("window.labAudio && labAudio.connected", timeout=20000)
        pg.wait_for_selector("#pcm-slot-0 .lab-pcm-state")
        listener = pg.evaluate("labAudio.listenerId")
        publish(hub, listener, "mounted", slot=0, pace=0.1)
        report = hub.wait_report("mounted", REPORT_TIMEOUT_S)
        assert report is not None and report["complete"] and report["heard_ms"] >= report["received_ms"]
        pg.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# -- what Gradio post-processes per update (web.gradio_adapter.skip_without_rebuilding) -----------------------------------
def _many_outputs_app():
    import gradio as gr
    import pandas as pd

    with gr.Blocks() as demo:
        outs = [gr.HTML("<p>status</p>"), gr.Markdown("live"), gr.Audio(streaming=True, visible=False),
                gr.Dataframe(pd.DataFrame({"a": [1]}), visible=False), gr.Plot(visible=False), gr.State(7)]
        with gr.Column() as box:
            outs += [gr.HTML("<div id='slot'></div>"), gr.Markdown("header")]
        outs.append(box)
        gr.Button().click(lambda: None, None, outs)
    fn = next(iter(demo.fns.values()))
    return demo, fn, outs


def test_a_skipped_output_is_sent_and_kept_as_gradio_would_without_being_rebuilt(monkeypatch):
    import asyncio
    import concurrent.futures
    import copy

    import gradio as gr
    import pandas as pd
    from gradio.state_holder import SessionState

    from web.gradio_adapter import BARE_SKIP, skip_without_rebuilding

    def run(coroutine):   # on a thread of its own: the page fixture's Playwright holds this thread's event loop
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, coroutine).result()

    demo, fn, outs = _many_outputs_app()
    html_, md, audio, table, plot, state_, slot, header, box = outs
    updates = [  # as app.ui sends them: a dict of what changed, the rest left out
        {html_: "<p>running</p>", md: "TTFB 12 ms", box: gr.update(visible=True), audio: gr.update(visible=True)},
        {html_: "<p>run 1 done</p>"},
        {html_: gr.skip()},   # the heartbeat: nothing changes
        {table: gr.update(value=pd.DataFrame({"a": [2, 3]}), visible=True), state_: 9, header: "## done"},
        [gr.skip()] * 3 + [gr.update(visible=False)] + [gr.skip()] * 5,   # a list works the same way
    ]
    gradio_state, our_state, initial = SessionState(demo), SessionState(demo), SessionState(demo).config_values
    gradio_pp = demo.postprocess_data
    skip_without_rebuilding(demo)
    rebuilt, shown = [], {}   # shown: the value last sent for each output
    monkeypatch.setattr(SessionState, "_update_config", lambda self, key, f=SessionState._update_config:
                        (rebuilt.append(key), f(self, key))[1])
    def values(u):   # a copy for each side: Gradio pops keys from the update dicts it is handed
        return {k: copy.deepcopy(v) for k, v in u.items()} if isinstance(u, dict) else copy.deepcopy(u)

    for update in updates:
        theirs = run(gradio_pp(fn, values(update), gradio_state))
        del rebuilt[:]
        ours = run(demo.postprocess_data(fn, values(update), our_state))
        changed = set(range(len(outs))) if not isinstance(update, dict) else {outs.index(k) for k in update}
        changed = {i for i in changed if (update[outs[i]] if isinstance(update, dict) else update[i]) != BARE_SKIP}
        for i, block in enumerate(outs):
            if i in changed:
                assert ours[i] == theirs[i], (i, ours[i], theirs[i])
                if not isinstance(ours[i], dict):
                    shown[block._id] = ours[i]
                elif "value" in ours[i]:
                    shown[block._id] = ours[i]["value"]
            else:   # Gradio adds an empty "props" to an HTML's skip; the page reads either as "no change"
                assert ours[i] == (None if block.stateful else BARE_SKIP)
                assert theirs[i] in (None, BARE_SKIP, {**BARE_SKIP, "props": BARE_SKIP}), theirs[i]
        # Only the outputs an update changes through properties are rebuilt, not the other nine.
        assert set(rebuilt) <= {outs[i]._id for i in changed}
    # What the session keeps for each output: Gradio's own, except the value it drops from a skipped output's
    # config when it rebuilds it; here that value stays: what was last sent, which the page still shows.
    def strip(c):
        return {**c, "props": {k: v for k, v in c.get("props", {}).items() if k != "value"}}

    for block in outs:
        theirs, ours = gradio_state.config_values[block._id], our_state.config_values[block._id]
        assert strip(ours) == strip(theirs), block
        if "value" in ours.get("props", {}) and "value" not in theirs.get("props", {}):
            assert ours["props"]["value"] == shown.get(block._id, initial[block._id]["props"]["value"])
    assert our_state[state_._id] == gradio_state[state_._id] == 9
