"""The page for real: `python app.py` in a subprocess on a free loopback port, driven by gradio_client and by
headless Chromium (Debian's `chromium` through Playwright, which cannot download its own browser here).

The server reads its presets from tests/presets (tiny CSM and Pocket TTS configs, hibari's real voice, a
real-size random Pocket TTS slow enough to stop mid-stream, and a GPU preset this machine must refuse), and
writes its history and votes under the test's temporary folder.
"""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
# A frame already being generated when the cancel lands still finishes, and so may the decode of its chunk.
CANCEL_GRACE_S = 0.5
# /compare's outputs as the client sees them (layout columns carry no value): 7 page-wide ones, then per slot
# header, status, player, live figures.
OVERALL, INPUT_ERROR, CHART, STALLS, SUMMARY, BUILDS, RUNS = range(7)


def slot(i, what):
    return 7 + 4 * i + ("header", "status", "player", "live").index(what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    port = free_port()
    env = {**os.environ, "PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "HF_HUB_OFFLINE": "1",
           "LAB_PRESETS_DIR": os.path.join(ROOT, "tests", "presets"), "LAB_HISTORY": str(tmp / "history.jsonl"),
           "LAB_VOTES": str(tmp / "votes.jsonl"), "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    log = open(tmp / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"app.py did not serve {url}:\n{(tmp / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "history": tmp / "history.jsonl", "votes": tmp / "votes.jsonl", "log": tmp / "server.log",
           "tmp": tmp}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False, download_files=False)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def compare_args(text="Two short words.", seed=0, max_audio_s=2, runs=1, random_weights=False, csm=(), pocket=(),
                 hibari=()):
    return (text, seed, max_audio_s, runs, random_weights, None, list(csm), list(pocket), list(hibari))


def latest(outputs, index):
    """The last value an output received (a yield that leaves a component alone sends an update marker)."""
    values = [o[index] for o in outputs if not (isinstance(o[index], dict) and o[index].get("__type__") == "update")]
    return values[-1] if values else None


def history_records(server):
    path = server["history"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def playlist_seconds(url: str) -> tuple[float, list[str]]:
    text = httpx.get(url, timeout=10).text
    return sum(float(s) for s in re.findall(r"#EXTINF:([\d.]+)", text)), re.findall(r"^[^#\s].*$", text, re.M)


def page_for(browser, server, width=1400):
    page = browser.new_page(viewport={"width": width, "height": 1600})
    page.goto(server["url"])
    page.wait_for_selector("#compare-btn")
    return page


def pick(page, *names):
    """Tick exactly these presets."""
    for box in page.locator("input[type=checkbox]").all():
        label = box.evaluate("b => b.closest('label').innerText.trim()")
        name = label.split(" (unavailable")[0]
        if name in ("random weights (latency only: the audio is noise)",):
            continue
        if (name in names) != box.is_checked():
            box.click()


# -- (a) gradio_client: a full compare of two tiny presets ------------------------------------------------------
def test_client_compare_of_two_tiny_presets_returns_streamed_audio_and_figures(client, server):
    job = client.submit(*compare_args(max_audio_s=2, runs=2, csm=["csm-tiny"], pocket=["pocket-tts-tiny"]),
                        api_name="/compare")
    job.result(timeout=300)
    out = job.outputs()
    assert "done: 6 runs of 2 presets" in latest(out, OVERALL)
    summary = latest(out, SUMMARY)
    rows = {r[0]: dict(zip(summary["headers"], r)) for r in summary["data"]}
    assert set(rows) == {"csm-tiny", "pocket-tts-tiny"}
    for row in rows.values():
        assert row["TTFB ms (warm median)"] > 0 and 0 < row["RTF"] < 100 and row["warm runs"] == 2
        assert row["weights"] == "tiny (audio is noise)"
    assert latest(out, CHART)["plot"].startswith("data:image/png;base64,")
    assert latest(out, STALLS)["plot"].startswith("data:image/png;base64,")
    builds = {r[0]: dict(zip(latest(out, BUILDS)["headers"], r)) for r in latest(out, BUILDS)["data"]}
    assert builds["csm-tiny"]["load s"] > 0 and builds["csm-tiny"]["memory MiB"] > 0
    runs = latest(out, RUNS)
    assert [r[3] for r in runs["data"] if r[0] == "csm-tiny"] == ["cold", "warm", "warm"]
    # Each preset streamed its first run into its own player, as it was generated: the player got a growing
    # playlist, and at the end the playlist holds that run's audio.
    records = {r["preset"]: r for r in history_records(server) if r.get("run") == 0 and r.get("source") == "app"}
    for i, name in enumerate(["csm-tiny", "pocket-tts-tiny"]):
        players = [o[slot(i, "player")] for o in out if isinstance(o[slot(i, "player")], dict)
                   and o[slot(i, "player")].get("is_stream")]
        assert len(players) >= 2, f"{name}: audio came in one piece, not streamed"
        seconds, segments = playlist_seconds(players[-1]["url"])
        assert seconds == pytest.approx(records[name]["audio_s"], abs=0.2)
        segment = httpx.get(players[-1]["url"].rsplit("/", 1)[0] + "/" + segments[0], timeout=10)
        assert segment.status_code == 200 and len(segment.content) > 100
        assert "tiny test weights" in latest(out, slot(i, "header"))     # labelled on the page, next to the player


def test_client_reuses_a_built_variant_on_the_next_click(client):
    job = client.submit(*compare_args(runs=1, csm=["csm-tiny"]), api_name="/compare")
    job.result(timeout=120)
    out = job.outputs()
    statuses = [o[slot(0, "status")] for o in out if isinstance(o[slot(0, "status")], str)]
    assert not any("loading" in s for s in statuses), "csm-tiny was built again"
    runs = latest(out, RUNS)["data"]
    assert [r[3] for r in runs] == ["warm", "warm"]     # its cold run was on the previous click


# -- (c) bad input: the error text in the page, next to what it affects -----------------------------------------
@pytest.mark.parametrize("kwargs,expect", [
    (dict(text=""), "text: is empty; type a sentence"),
    (dict(text="Party 🎉 time"), "U+1F389"),
    (dict(text="word " * 300), "over the limit of 1000"),
    (dict(seed=-5), "seed: -5 is out of range"),
    (dict(max_audio_s=0), "max_audio_s: 0.0 is out of range"),
    (dict(runs=0), "runs per preset: 0 is out of range"),
    (dict(runs=50), "runs per preset: 50 is out of range"),
])
def test_client_bad_input_is_one_line_naming_the_field(client, kwargs, expect):
    out = client.predict(*compare_args(**{"hibari": ["hibari"], **kwargs}), api_name="/compare")
    assert expect in out[INPUT_ERROR] and "Traceback" not in out[INPUT_ERROR]
    assert "not run: fix" in out[slot(0, "status")]


def test_an_unavailable_preset_fails_next_to_itself_and_the_others_still_run(client):
    job = client.submit(*compare_args(csm=["csm-gpu"], hibari=["hibari"]), api_name="/compare")
    job.result(timeout=120)
    out = job.outputs()
    assert "no GPU" in latest(out, slot(0, "status")) and "use device: cpu" in latest(out, slot(0, "status"))
    assert "done" in latest(out, slot(1, "status"))
    assert [r[0] for r in latest(out, SUMMARY)["data"]] == ["hibari"]
    assert "1 failed" in latest(out, OVERALL)


# -- Blind A/B and History through the API ----------------------------------------------------------------------
def test_blind_ab_hides_the_names_until_the_vote_and_persists_it(client, server):
    a_audio, b_audio, msg, *_ = client.predict("hibari", "csm-tiny", "Hello there.", 3, False, api_name="/ab_play")
    assert a_audio and b_audio and "hibari" not in msg and "csm-tiny" not in msg
    revealed, tally = client.predict(api_name="/vote_a")     # (the trial state and buttons are not API values)
    a_name = re.search(r"A was \*\*([\w-]+)\*\*", revealed).group(1)
    assert a_name in ("hibari", "csm-tiny")
    votes = [json.loads(line) for line in server["votes"].read_text().splitlines()]
    assert votes[-1]["winner"] == a_name and votes[-1]["seed"] == 3 and votes[-1]["text"] == "Hello there."
    row = dict(zip(tally["headers"], tally["data"][0]))
    assert row["pair"] == "csm-tiny vs hibari" and row["votes"] == 1 and row["95% interval"].count("–") == 1
    # A second vote on the same pair is refused until a new pair is played.
    again, _ = client.predict(api_name="/vote_b")
    assert "play a pair first" in again


def test_history_filters_and_exports_csv_json_and_png(client, server):
    table, chart, _, note, csv_file, json_file, png_file = client.predict(["csm-tiny"], [], "warm", "",
                                                                          api_name="/history")
    assert table["data"] and {r[1] for r in table["data"]} == {"csm-tiny"}
    assert {r[5] for r in table["data"]} == {"warm"}
    csv_text = httpx.get(csv_file["url"], timeout=10).text
    assert csv_text.startswith("preset,run,cold,weights,ttfb_ms") and csv_text.count("\n") == 1 + len(table["data"])
    assert all(r["preset"] == "csm-tiny" for r in httpx.get(json_file["url"], timeout=10).json())
    assert httpx.get(png_file["url"], timeout=10).content[:4] == b"\x89PNG"
    assert chart["plot"].startswith("data:image/png")


# -- (d) Stop ends generation -----------------------------------------------------------------------------------
def wait_for_streaming(job, index, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(isinstance(o[index], str) and "TTFB" in o[index] for o in job.outputs()):
            return
        time.sleep(0.1)
    pytest.fail("the run never started streaming")


def assert_stopped_in_time(server, since_s: float, max_audio_s: float):
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cancelled = [r for r in history_records(server) if r.get("cancelled") and r["time"] > since_s]
        if cancelled:
            break
        time.sleep(0.2)
    else:
        pytest.fail("no cancelled run was recorded")
    rec = cancelled[-1]
    assert rec["frame_s"], "cancelled before any frame: the test did not stop a running stream"
    assert rec["cancel_s"] is not None
    late = [t for t in rec["frame_s"] if t > rec["cancel_s"] + CANCEL_GRACE_S]
    assert not late, f"{len(late)} frames generated more than {CANCEL_GRACE_S} s after the cancel"
    assert rec["audio_s"] < max_audio_s / 2
    return rec


def test_stop_cancels_a_compare_mid_stream_and_frees_the_model(client, server):
    started = time.time()
    job = client.submit(*compare_args(max_audio_s=60, runs=1, pocket=["pocket-tts-random"]), api_name="/compare")
    wait_for_streaming(job, slot(0, "live"))
    message = client.predict(api_name="/stop")
    assert "stopped" in message
    rec = assert_stopped_in_time(server, started, 60)
    assert rec["preset"] == "pocket-tts-random"
    # What it held is free: the next compare runs at once.
    out = client.predict(*compare_args(hibari=["hibari"]), api_name="/compare")
    assert "done: 2 runs of 1 presets" in out[OVERALL]


# -- (b), (c), (d) in headless Chromium --------------------------------------------------------------------------
def test_browser_compare_two_presets_charts_and_players_hold_audio(browser, server):
    page = page_for(browser, server)
    pick(page, "csm-tiny", "pocket-tts-tiny")
    page.fill("#max-audio-s input", "2")
    page.fill("#runs input", "1")
    page.click("#compare-btn")
    page.wait_for_selector("#overall:has-text('done:')", timeout=180_000)
    page.wait_for_selector("#chart-main img", timeout=30_000)
    # The players load their streamed playlists on their own schedule: wait until both know their length.
    js = "() => Array.from(document.querySelectorAll('#slot-0 audio, #slot-1 audio')).map(a => a.duration)"
    try:
        page.wait_for_function(f"() => ({js})().length === 2 && ({js})().every(d => d > 1.0)", timeout=30_000)
    except Exception:
        pytest.fail(f"the players do not hold the streamed audio: durations {page.evaluate(js)}")
    assert "tiny test weights" in page.inner_text("#slot-0")
    assert "TTFB" in page.inner_text("#live-0") and "TTFB" in page.inner_text("#live-1")
    page.screenshot(path=str(server["tmp"] / "compare.png"), full_page=True)
    assert (server["tmp"] / "compare.png").stat().st_size > 10_000
    page.close()


def test_browser_shows_bad_input_and_unavailable_preset_errors_in_the_page(browser, server):
    page = page_for(browser, server)
    pick(page, "csm-gpu", "hibari")
    page.fill("#text textarea", "")
    page.click("#compare-btn")
    page.wait_for_selector("#input-error:has-text('text: is empty')", timeout=60_000)
    page.fill("#text textarea", "Short words.")
    page.click("#compare-btn")
    page.wait_for_selector("#overall:has-text('done:')", timeout=120_000)
    assert "no GPU" in page.inner_text("#status-0")         # next to the preset it affects
    assert "done" in page.inner_text("#status-1")           # and the other one still ran
    assert "Traceback" not in page.inner_text("body")
    page.close()


def start_a_long_stream(browser, server):
    """A page streaming 60 s of random-weight Pocket TTS, past its first chunk: (page, when Compare was clicked)."""
    page = page_for(browser, server)
    pick(page, "pocket-tts-random")
    page.fill("#max-audio-s input", "60")
    page.fill("#runs input", "1")
    started = time.time()
    page.click("#compare-btn")
    page.wait_for_selector("#live-0:has-text('TTFB')", timeout=120_000)
    return page, started


def test_browser_closing_the_tab_mid_stream_stops_generation(browser, server):
    page, started = start_a_long_stream(browser, server)
    page.close()
    assert_stopped_in_time(server, started, 60)


def test_browser_stop_button_ends_generation(browser, server):
    page, started = start_a_long_stream(browser, server)
    page.click("#stop-btn")
    page.wait_for_selector("#overall:has-text('stopped')", timeout=30_000)
    assert_stopped_in_time(server, started, 60)
    page.close()


def test_browser_a_second_user_waits_and_sees_their_place_in_the_queue(browser, server):
    first, second = page_for(browser, server), page_for(browser, server)
    pick(first, "pocket-tts-random")
    first.fill("#max-audio-s input", "30")
    first.fill("#runs input", "1")
    first.click("#compare-btn")
    first.wait_for_selector("#live-0:has-text('TTFB')", timeout=120_000)
    pick(second, "hibari")
    second.click("#compare-btn")
    second.wait_for_selector("#overall:has-text('queue: 1/1')", timeout=30_000)
    first.click("#stop-btn")                       # the first user's stop lets the second one through
    second.wait_for_selector("#overall:has-text('done:')", timeout=120_000)
    assert "hibari" in second.inner_text("#slot-0")
    first.close()
    second.close()
