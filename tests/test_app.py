"""The page for real: `python app.py` in a subprocess on a free loopback port, driven by gradio_client and by
headless Chromium (Debian's `chromium` through Playwright, which cannot download its own browser here).

The server reads its presets from tests/presets (tiny CSM and Pocket TTS configs, hibari's real voice per sentence
and whole, a real-size random Pocket TTS slow enough to stop mid-stream, and a GPU preset this machine must refuse),
and writes its history and votes under the test's temporary folder. Outputs are found by elem_id, read from the
page's own config, never by position.
"""
import json
import os
import re
import time

import httpx
import pytest

from conftest import CHROMIUM, CHROMIUM_ARGS
from harness import AppProcess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A frame already being generated when the cancel lands still finishes, and so may the decode of its chunk.
CANCEL_GRACE_S = 0.5
TWO_SENTENCES = "Two short words. And one more."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    app = AppProcess(str(tmp), presets_dir=os.path.join(ROOT, "tests", "presets"))
    yield {"url": app.url, "history": tmp / "history.jsonl", "votes": tmp / "votes.jsonl", "tmp": tmp}
    app.stop()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False, download_files=False)


@pytest.fixture(scope="module")
def outputs(server):
    """elem_id -> position in each endpoint's outputs as the client sees them (layout blocks carry no value), from
    the page's config."""
    config = httpx.get(server["url"] + "config", timeout=10).json()
    components = {c["id"]: c for c in config["components"]}
    positions = {}
    for d in config["dependencies"]:
        if d.get("api_name"):
            valued = [i for i in d["outputs"] if not components[i].get("skip_api")]
            positions[d["api_name"]] = {(components[i].get("props") or {}).get("elem_id"): n
                                        for n, i in enumerate(valued)}
    return positions


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def compare_args(text=TWO_SENTENCES, seed=0, max_audio_s=2, runs=1, random_weights=False, transport="gradio",
                 csm=(), pocket=(), hibari=()):
    # (listener, tick order, text, seed, cap, runs, random weights, spoken turn, transport, then each family's ticks)
    return ("", "", text, seed, max_audio_s, runs, random_weights, None, transport, list(csm), list(pocket),
            list(hibari))


class Outputs:
    """One endpoint's streamed outputs, read by elem_id."""

    def __init__(self, job, positions):
        self.values, self.at = job.outputs(), positions

    def all(self, elem_id):
        i = self.at[elem_id]
        return [v[i] for v in self.values if not (isinstance(v[i], dict) and v[i].get("__type__") == "update"
                                                   and "value" not in v[i])]

    def last(self, elem_id):
        values = [v.get("value") if isinstance(v, dict) and v.get("__type__") == "update" else v
                  for v in self.all(elem_id)]
        return values[-1] if values else None


def table(value) -> dict:
    return {row[0]: dict(zip(value["headers"], row)) for row in value["data"]}


def history_records(server):
    path = server["history"]
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- gradio_client: a full compare of two tiny presets ----------------------------------------------------------
@pytest.mark.slow
def test_client_compare_of_two_presets_returns_streamed_audio_and_figures(client, server, outputs):
    # A real-size Pocket TTS (random weights) streams for long enough to reach the player in several pieces; the
    # tiny CSM is done before the page's next update.
    job = client.submit(*compare_args(runs=2, csm=["csm-tiny"], pocket=["pocket-tts-random"]), api_name="/compare")
    job.result(timeout=300)
    out = Outputs(job, outputs["compare"])
    assert "done: 6 runs of 2 presets" in out.last("overall")
    rows = table(out.last("summary"))
    assert set(rows) == {"csm-tiny", "pocket-tts-random"}
    for row in rows.values():
        assert row["TTFB ms (warm median)"] > 0 and 0 < row["RTF (warm median)"] < 100 and row["warm runs"] == 2
        assert row["TTFB p90 ms"] >= row["TTFB ms (warm median)"] and "(audio is noise)" in row["weights"]
    assert out.last("chart-main")["plot"].startswith("data:image/png;base64,")
    builds = table(out.last("builds"))
    assert builds["csm-tiny"]["load s"] > 0 and builds["csm-tiny"]["memory MiB"] > 0
    runs = out.last("runs-table")
    assert [r[3] for r in runs["data"] if r[0] == "csm-tiny"] == ["cold", "warm", "warm"]
    # Each preset's heard run (its first warm one) streamed into its own player as it was generated.
    heard = {r["preset"]: r for r in history_records(server) if r.get("heard") and r.get("source") == "app"}
    for i, name in enumerate(["csm-tiny", "pocket-tts-random"]):
        streams = [p for p in out.all(f"player-{i}") if isinstance(p, dict) and p.get("is_stream")]
        assert streams, f"{name}: no audio reached its player"
        playlist = httpx.get(streams[-1]["url"], timeout=10).text
        seconds = sum(float(s) for s in re.findall(r"#EXTINF:([\d.]+)", playlist))
        assert seconds == pytest.approx(heard[name]["audio_s"], abs=0.2) and heard[name]["run"] == 1
        assert "audio is noise" in out.last(f"header-{i}")        # labelled on the page, next to the player
    assert len([p for p in out.all("player-1") if isinstance(p, dict) and p.get("is_stream")]) >= 2, \
        "pocket-tts-random's audio came in one piece, not streamed"


@pytest.mark.slow
def test_client_reuses_a_built_variant_and_its_first_run_is_warm(client, outputs):
    job = client.submit(*compare_args(csm=["csm-tiny"]), api_name="/compare")
    job.result(timeout=120)
    out = Outputs(job, outputs["compare"])
    assert not any("loading" in s for s in out.all("status-0") if isinstance(s, str)), "csm-tiny was built again"
    assert [r[3] for r in out.last("runs-table")["data"]] == ["warm", "warm"]


@pytest.mark.slow
def test_two_users_on_a_batching_preset_run_at_once_while_a_one_at_a_time_preset_takes_turns(server):
    """csm-tiny-batched (max_streams > 1) takes both users' streams into its shared step: their runs overlap in
    time. Two users of csm-tiny wait for each other in the page's line: their runs do not."""
    from gradio_client import Client

    def windows(preset, seeds):
        recs = [r for r in history_records(server) if r.get("preset") == preset and r["seed"] in seeds]
        return sorted((r["time"] - r["wall_s"], r["time"]) for r in recs)   # (request, end) of each run

    for preset, seeds, overlap in (("csm-tiny-batched", (71, 72), True), ("csm-tiny", (81, 82), False)):
        clients = [Client(server["url"], verbose=False, download_files=False) for _ in seeds]
        jobs = [c.submit(*compare_args(seed=seed, runs=1, max_audio_s=2, csm=[preset]), api_name="/compare")
                for c, seed in zip(clients, seeds)]
        for job in jobs:
            job.result(timeout=180)
        spans = windows(preset, seeds)
        assert len(spans) == 4, spans      # a cold (or first) and a warm run per user
        if overlap:
            assert any(a_start < b_end and b_start < a_end for a_start, a_end in spans for b_start, b_end in spans
                       if (a_start, a_end) != (b_start, b_end)), spans
        else:
            ordered = sorted(spans)
            assert all(ordered[i][1] <= ordered[i + 1][0] + 0.05 for i in range(len(ordered) - 1)), ordered


@pytest.mark.slow
def test_how_many_sweeps_a_batching_preset_and_refuses_a_bad_list(client):
    status, table_value, chart = client.predict("csm-tiny-batched", "1,3", 0.8, "Two short words.", False,
                                                api_name="/how_many")
    table_value = table_value.get("value", table_value)   # sent as an update: the table is shown with the first level
    assert status == "2 of 2 levels" and chart
    rows = table_value["data"]
    assert [row[table_value["headers"].index("streams")] for row in rows] == [1, 3]
    status, _, _ = client.predict("csm-tiny-batched", "1,x", 0.8, "Two short words.", False, api_name="/how_many")
    assert "streams: &#x27;1,x&#x27; is not a comma list" in status   # escaped, as everything echoed


@pytest.mark.parametrize("kwargs,field,expect", [
    (dict(text=""), "text-error", "text: is empty; type a sentence"),
    (dict(text="مرحبا بكم"), "text-error", "outside Latin script"),
    (dict(text="<speak>🎉</speak>"), "text-error", "nothing to speak"),
    (dict(seed=-5), "numbers-error", "seed: -5 is out of range"),
    (dict(max_audio_s=0), "numbers-error", "max_audio_s: 0.0 is out of range"),
    (dict(runs=50), "numbers-error", "runs per preset: 50 is out of range"),
    (dict(hibari=[]), "presets-error", "presets: none chosen"),
])
def test_client_bad_input_is_one_line_at_its_field_and_nothing_runs(client, outputs, kwargs, field, expect):
    job = client.submit(*compare_args(**{"hibari": ["hibari"], **kwargs}), api_name="/compare")
    job.result(timeout=60)
    out = Outputs(job, outputs["compare"])
    assert expect in out.last(field) and "Traceback" not in out.last(field) and "--" not in out.last(field)
    assert "not run" in out.last("overall")


@pytest.mark.slow
def test_blind_ab_hides_the_names_until_the_vote_and_records_the_mode(client, server):
    a_audio, b_audio, msg, *_ = client.predict("", "hibari", "csm-tiny", "Hello there.", 3, False, "prebuffered",
                                               api_name="/ab_play")
    assert a_audio and b_audio and "hibari" not in msg and "csm-tiny" not in msg
    revealed, tally = client.predict(api_name="/vote_a")     # (the trial state and buttons are not API values)
    a_name = re.search(r"A was \*\*([\w-]+)\*\*", revealed).group(1)
    votes = [json.loads(line) for line in server["votes"].read_text().splitlines()]
    assert votes[-1]["winner"] == a_name and votes[-1]["mode"] == "prebuffered" and votes[-1]["seed"] == 3
    assert table(tally)["csm-tiny vs hibari"]["votes"] == 1
    again, _ = client.predict(api_name="/vote_b")            # refused until a new pair is played
    assert "play a pair first" in again


@pytest.mark.slow
def test_history_filters_and_exports_csv_json_and_png(client):
    table_value, chart, _, note, csv_file, json_file, png_file = client.predict(["csm-tiny"], [], "warm", "",
                                                                                api_name="/history")
    assert table_value["data"] and {r[table_value["headers"].index("preset")] for r in table_value["data"]} == {
        "csm-tiny"}
    csv_text = httpx.get(csv_file["url"], timeout=10).text
    assert csv_text.startswith("preset,run,cold,weights,ttfb_ms") and csv_text.count("\n") == 1 + len(
        table_value["data"])
    assert all(r["preset"] == "csm-tiny" for r in httpx.get(json_file["url"], timeout=10).json())
    assert httpx.get(png_file["url"], timeout=10).content[:4] == b"\x89PNG"


def wait_for_cancelled_record(server, since_s: float) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        cancelled = [r for r in history_records(server) if r.get("cancelled") and r["time"] > since_s]
        if cancelled:
            return cancelled[-1]
        time.sleep(0.2)
    pytest.fail("no cancelled run was recorded")


def assert_stopped_in_time(rec: dict, max_audio_s: float) -> None:
    assert rec["frame_s"], "cancelled before any frame: the test did not stop a running stream"
    late = [t for t in rec["frame_s"] if t > rec["cancel_s"] + CANCEL_GRACE_S]
    assert not late, f"{len(late)} frames generated more than {CANCEL_GRACE_S} s after the cancel"
    assert rec["audio_s"] < max_audio_s / 2


# -- the page in Chromium, as a listener uses it -----------------------------------------------------------------
def open_page(browser, server):
    page = browser.new_page(viewport={"width": 1400, "height": 1600})
    page.goto(server["url"])
    page.wait_for_selector("#compare-btn")
    page.wait_for_function("() => window.labAudio && window.labAudio.connected", timeout=30_000)
    return page


def remembered_form(page):
    """Records the form each of Gradio's change events hands the page (labAudio.remember), so that a test can click
    once its filled fields have reached the page: a click before that sends its start with the older values, which
    Gradio's event then replaces (the page's rule, not a fault)."""
    page.evaluate("""() => { const remember = window.labAudio.remember; window.__form = {};
        window.labAudio.remember = (kind, names, values) => {
            window.__form[kind] = Object.fromEntries(names.map((n, i) => [n, values[i]]));
            return remember(kind, names, values); }; }""")


def wait_form(page, kind: str, **values):
    page.wait_for_function("([kind, want]) => { const f = (window.__form || {})[kind];"
                           " return !!f && Object.entries(want).every(([k, v]) => String(f[k]) === String(v)); }",
                           arg=[kind, values], timeout=30_000)


def pick(page, *names):
    """Tick exactly these presets, in this order."""
    for box in page.locator("[id^=presets-] input[type=checkbox]").all():
        if box.is_checked():
            box.click()
    for name in names:
        page.locator(f"[id^=presets-] label:has-text('{name}') input").first.click()


def assert_heard_after_received_after_model(server, since_s: float, names):
    heard = {r["preset"]: r for r in history_records(server) if r.get("heard") and r["time"] > since_s}
    assert set(heard) == set(names)
    for name, r in heard.items():
        for key in ("ttfb_ms", "first_audible_ms", "received_ms", "heard_ttfb_ms", "browser_underruns"):
            assert r.get(key) is not None, f"{name}: {key} missing"
        assert r["heard_ttfb_ms"] >= r["received_ms"] >= r["ttfb_ms"] - r["clock_uncertainty_ms"], name
        assert r["browser_complete"] and r["transport"] == "pcm"
        # Measured from the click: the click started the comparison over the page's socket, and the page reported
        # when the heard run's first audible sample played, on its own clock.
        assert r["started_by"] == "click" and r["comparison_id"], name
        assert r["click_to_request_ms"] is not None and r["click_to_request_ms"] >= -r["clock_uncertainty_ms"], name
        assert r["click_to_heard_ms"] >= r["click_to_received_ms"] > 0, name


def assert_the_click_sent_each_start(page, clicks: int):
    """Each click sent its start itself, before Gradio's click handling, with the form's values as Gradio then sent
    them: its event kept the click's comparison (a form mirror out of date would have it replaced)."""
    log = page.evaluate("labAudio.log")
    assert sum("kept the click's start" in line for line in log) == clicks, log
    assert not any("replaced" in line for line in log), log


@pytest.mark.slow
def test_browser_first_click_plays_two_real_voices_over_pcm_and_done_comes_after_the_audio(browser, server):
    page = open_page(browser, server)
    remembered_form(page)
    pick(page, "hibari", "hibari-whole")      # the CPU default first click
    page.fill("#text textarea", TWO_SENTENCES)
    page.fill("#runs input", "1")
    page.fill("#jitter-ms input", "60")       # the player's field is the listener's to change
    # the tick order reaches the form through an event of its own, after the boxes' own changes
    wait_form(page, "compare", order="hibari\nhibari-whole", text=TWO_SENTENCES, runs=1)
    for attempt in range(2):                  # a repeat compare must start every player at 0 again
        since = time.time()
        page.click("#compare-btn")
        page.wait_for_function("() => !document.querySelector('#overall').innerText.includes('done:')",
                               timeout=30_000)
        page.wait_for_selector("#overall:has-text('done:')", timeout=180_000)
        states = page.evaluate("() => [0, 1].map(i => window.labAudio.state(i))")
        reports = page.evaluate("() => Object.values(window.labAudio.reports)")
        mine = [r for r in reports if r.get("complete")]
        assert len(mine) >= 2 * (attempt + 1), (page.inner_text("#overall"), page.evaluate("labAudio.log"), states)
        assert_heard_after_received_after_model(server, since, ["hibari", "hibari-whole"])
        for s in states:   # every player got its whole run before "done"; none started mid-clip
            assert s["received_s"] > 1.0 and s["position_s"] <= s["received_s"] + 0.05, states
            # seconds, not samples: the run message carries no rate, the first chunk's header does
            assert s["received_s"] < 60, states
        assert page.evaluate("labAudio.replay(0)") is True   # the finished clip replays from its start
        assert page.evaluate("labAudio.state(0).state") == "replaying"
        page.wait_for_selector("#chart-heard img", timeout=30_000)    # the waterfall of the heard runs
        # The guardrail scores both real voices after the runs and the page fills it in; Compare stays clickable.
        page.wait_for_selector("#quality-1:has-text('WER')", timeout=240_000)   # a hang bound: the scorer runs at nice 19
    assert_the_click_sent_each_start(page, 2)     # after the fields were filled: the mirror followed them
    page.screenshot(path=str(server["tmp"] / "compare.png"), full_page=True)
    page.close()


@pytest.mark.slow
def test_browser_a_click_whose_form_mirror_is_stale_is_replaced_by_its_events_values(browser, server):
    page = open_page(browser, server)
    pick(page, "hibari")
    page.fill("#runs input", "1")
    page.click("#text textarea")   # the runs field's change event comes on its blur: let it land before the mirror
    time.sleep(1.0)                # is made stale below, or it would refresh it
    # As if a change event had not reached the page's mirror yet: the click starts with these values, and Gradio's
    # event, with the form's real ones, replaces that comparison.
    page.evaluate("() => labAudio.remember('compare', ['order', 'text', 'runs'], ['hibari', 'A stale sentence.', 1])")
    since = time.time()
    page.click("#compare-btn")
    page.wait_for_selector("#overall:has-text('done:')", timeout=180_000)
    log = page.evaluate("labAudio.log")
    assert any("replaced" in line for line in log), log
    heard = [r for r in history_records(server) if r.get("heard") and r["time"] > since and not r.get("cancelled")]
    assert [r["text"] for r in heard] == [page.input_value("#text textarea")], heard
    page.close()


@pytest.mark.slow
def test_browser_stop_says_stopped_and_generation_ends(browser, server):
    page = open_page(browser, server)
    pick(page, "pocket-tts-random")
    page.fill("#max-audio-s input", "60")
    page.fill("#runs input", "1")
    started = time.time()
    page.click("#compare-btn")
    page.wait_for_selector("#live-0:has-text('TTFB')", timeout=120_000)
    page.click("#stop-btn")
    page.wait_for_selector("#stop-note:has-text('generation was cancelled')", timeout=30_000)
    page.wait_for_selector("#status-0:has-text('stopped')", timeout=30_000)
    page.wait_for_selector("#overall:has-text('stopped after')", timeout=30_000)
    assert_stopped_in_time(wait_for_cancelled_record(server, started), 60)
    # The chained quality handler (nothing to score here) and Stop's own answer come after; neither may replace the
    # comparison's last word.
    time.sleep(2.0)
    assert "stopped after" in page.inner_text("#overall") and "done" not in page.inner_text("#overall")
    assert "generation was cancelled" in page.inner_text("#stop-note")
    page.click("#compare-btn")   # a new comparison clears the old Stop's note
    page.wait_for_function("() => !document.querySelector('#stop-note').innerText.includes('cancelled')",
                           timeout=30_000)
    page.wait_for_selector("#live-0:has-text('TTFB')", timeout=120_000)
    page.click("#stop-btn")
    page.wait_for_selector("#overall:has-text('stopped after')", timeout=60_000)
    page.close()


@pytest.mark.slow
def test_browser_closing_the_tab_mid_stream_stops_generation(browser, server):
    page = open_page(browser, server)
    pick(page, "pocket-tts-random")
    page.fill("#max-audio-s input", "60")
    started = time.time()
    page.click("#compare-btn")
    page.wait_for_selector("#live-0:has-text('TTFB')", timeout=120_000)
    page.close()
    assert_stopped_in_time(wait_for_cancelled_record(server, started), 60)


@pytest.mark.slow
def test_browser_blind_pair_as_it_streams_starts_on_the_click_and_is_measured_from_it(browser, server):
    page = open_page(browser, server)
    page.get_by_role("tab", name="Blind A/B").click()
    page.wait_for_selector("#ab-play")
    since = time.time()
    page.click("#ab-play")
    page.wait_for_selector("#ab-msg:has-text('Listen to both')", timeout=120_000)
    heard = [r for r in history_records(server) if r.get("heard") and r.get("source") == "ab" and r["time"] > since]
    assert len(heard) == 2, heard
    for r in heard:   # each side started by the click over the socket, and heard as it streamed (slots 6 and 7)
        assert r["started_by"] == "click" and r["click_to_request_ms"] is not None
        assert r["click_to_heard_ms"] >= r["click_to_received_ms"] > 0 and r["transport"] == "pcm"
    sides = page.evaluate("() => [6, 7].map(i => window.labAudio.state(i))")
    assert [s["label"] for s in sides] == ["A", "B"] and all(s["received_s"] > 0.5 for s in sides), sides
    assert "hibari" not in page.inner_text("#pcm-slot-6") + page.inner_text("#pcm-slot-7")   # still blind
    assert_the_click_sent_each_start(page, 1)
    page.close()


@pytest.mark.slow
def test_browser_shows_each_error_at_its_field(browser, server):
    page = open_page(browser, server)
    pick(page, "hibari")
    page.fill("#text textarea", "")
    page.click("#compare-btn")
    page.wait_for_selector("#text-error:has-text('text: is empty')", timeout=60_000)
    page.fill("#text textarea", "Short words.")
    page.fill("#seed input", "-3")
    page.click("#compare-btn")
    page.wait_for_selector("#numbers-error:has-text('seed: -3 is out of range')", timeout=60_000)
    assert page.inner_text("#text-error").strip() == "" and "Traceback" not in page.inner_text("body")
    page.close()


@pytest.mark.slow
def test_browser_a_second_user_waits_and_sees_their_place_in_the_queue(browser, server):
    first, second = open_page(browser, server), open_page(browser, server)
    pick(first, "pocket-tts-random")
    first.fill("#max-audio-s input", "30")
    first.fill("#runs input", "1")
    first.click("#compare-btn")
    first.wait_for_selector("#live-0:has-text('TTFB')", timeout=120_000)
    pick(second, "hibari")
    second.fill("#text textarea", "Short words.")
    second.click("#compare-btn")
    # Its place, and how long the one ahead should take: an estimate when earlier tests on this server measured
    # pocket-tts-random, else the plain reason (the estimate itself is tests/test_session.py's).
    second.wait_for_selector("#overall:has-text('1 comparison ahead (')", timeout=30_000)
    waiting = second.inner_text("#overall")
    assert re.search(r"\(about \d+ s left, from this server's measured runs|\(no measured runs of their presets",
                     waiting), waiting
    first.click("#stop-btn")                       # the first user's stop lets the second one through
    second.wait_for_selector("#overall:has-text('done:')", timeout=120_000)
    assert "hibari" in second.inner_text("#slot-0")
    first.close()
    second.close()


@pytest.mark.slow
def test_presets_this_machine_cannot_run_are_folded_by_reason_not_offered(browser, server):
    page = open_page(browser, server)
    assert "csm-gpu" not in page.inner_text("#presets-csm")
    assert "1 of the presets need a GPU" in page.inner_text("#unavailable")
    page.close()
