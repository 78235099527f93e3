"""Nothing lost, nobody stuck: the app as a crowd, a client that walks away and a full disk would use it, on
loopback. `python app.py` runs in a subprocess on tests/presets (tiny CSM, real-size random Pocket TTS); a second
one starts with a history that is a directory and a votes file on a full disk (/dev/full). Odd inputs go through
the page's API and the CLI, each with the outcome a person would see.
"""
import html
import json
import os
import threading
import time
import uuid

import httpx
import pytest

from lab import cli, session
from lab.manager import ModelManager
from lab.measure import history
from lab.request import Request
from lab.spec import VariantSpec
from test_app import ROOT, Outputs, compare_args, history_records, table, wait_for_cancelled_record
from harness import AppProcess
from lab.serving.line import ModelLine

TEST_PRESETS = os.path.join(ROOT, "tests", "presets")
CLIENTS = 16
DISCONNECT_BOUND_S = 1.0   # what the issue asks: no frame generated later than this after a client went away
LONG, LONG_PRESET = "A long one. " * 8, "pocket-tts-random"   # real size: a 60 s cap takes about 20 s to make


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reliability")
    app = AppProcess(str(tmp), presets_dir=TEST_PRESETS)
    yield {"url": app.url, "history": tmp / "history.jsonl", "tmp": tmp, "app": app}
    app.stop()


def endpoints(url):
    """Per endpoint: elem_id -> position in its outputs (as test_app reads them), and under "_deps" its fn_index
    and input components, for a raw /queue/join."""
    config = httpx.get(url + "config", timeout=10).json()
    components = {c["id"]: c for c in config["components"]}
    positions, deps = {}, {}
    for d in config["dependencies"]:
        if d.get("api_name"):
            valued = [i for i in d["outputs"] if not components[i].get("skip_api")]
            positions[d["api_name"]] = {(components[i].get("props") or {}).get("elem_id"): n
                                        for n, i in enumerate(valued)}
            deps[d["api_name"]] = {"fn_index": d["id"], "inputs": [components[i] for i in d["inputs"]]}
    return {**positions, "_deps": deps}


@pytest.fixture(scope="module")
def outputs(server):
    return endpoints(server["url"])


def new_client(server):
    from gradio_client import Client

    return Client(server["url"], verbose=False, download_files=False, httpx_kwargs={"timeout": 120})


@pytest.fixture(scope="module")
def client(server):
    return new_client(server)


def compare(client, outputs, timeout=120, **kwargs):
    # PCM to no listener: nothing is encoded for a player (Gradio's streaming audio runs ffmpeg per update)
    job = client.submit(*compare_args(**{"transport": "pcm", **kwargs}), api_name="/compare")
    job.result(timeout=timeout)
    return Outputs(job, outputs["compare"])


# -- many clients at once ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_16_concurrent_clients_each_get_their_own_runs_without_error(server, outputs):
    # Each client asks for its own text, seed and cap on audio length; the cap shows in its own runs table, so a
    # crossed wire would show another client's audio length there.
    caps = {i: round(0.16 + 0.08 * (i % 8), 2) for i in range(CLIENTS)}
    results, errors = {}, {}
    clients = [new_client(server) for _ in range(CLIENTS)]   # each its own session, as 16 pages would be

    def one(i):
        try:
            # Through the line one after another: on CI's 2 cores all 16 took 250-290 s (each waiting page's own
            # updates cost the server time too); the bound is for a hang, not a speed check.
            results[i] = compare(clients[i], outputs, timeout=600, text=f"Client number {i} speaks.",
                                 seed=1000 + i, max_audio_s=caps[i], runs=1, csm=["csm-tiny"])
        except Exception as e:   # reported below, with its client
            errors[i] = repr(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=700)
    assert not errors, errors
    records = history_records(server)
    for i, out in results.items():
        assert "done: 2 runs of 1 presets" in out.last("overall"), (i, out.last("overall"))
        rows = out.last("runs-table")
        audio = [r[rows["headers"].index("audio s")] for r in rows["data"]]
        assert audio == [pytest.approx(caps[i], abs=0.09)] * 2, (i, audio)
        mine = [r for r in records if r.get("text") == f"Client number {i} speaks."]
        assert len(mine) == 2 and {r["seed"] for r in mine} == {1000 + i}, i


# -- a client that goes away -------------------------------------------------------------------------------------
def queue_data(deps, name, values, session_hash):
    """The body of /queue/join for `name`: every input's value (State inputs are the server's: None)."""
    data, given = [], iter(values)
    for component in deps[name]["inputs"]:
        data.append(None if component.get("type") == "state" else next(given))
    return {"data": data, "fn_index": deps[name]["fn_index"], "session_hash": session_hash, "event_data": None,
            "trigger_id": None}


def assert_stopped_within_bound(record, gone_at):
    assert record["frame_s"], "cancelled before any frame: nothing was running"
    ran_on_s = record["last_frame_time"] - gone_at
    assert ran_on_s <= DISCONNECT_BOUND_S, f"a frame was generated {ran_on_s:.2f} s after the client went away"
    assert record["audio_s"] < 30


@pytest.fixture(scope="module")
def served(client, outputs):
    """LONG_PRESET built and served once, so that each test's first run is a warm one, streamed at once."""
    assert "done:" in compare(client, outputs, timeout=300, max_audio_s=0.3, runs=1, pocket=[LONG_PRESET]).last(
        "overall")


def assert_next_client_served(client, outputs):
    started = time.monotonic()
    out = compare(client, outputs, timeout=60, csm=["csm-tiny"])
    assert "done:" in out.last("overall") and time.monotonic() - started < 60


@pytest.mark.slow
def test_a_dropped_connection_mid_stream_stops_generation_and_the_next_client_is_served(server, outputs, client,
                                                                                        served):
    session_hash = uuid.uuid4().hex[:11]
    values = compare_args(text=LONG, max_audio_s=60, runs=1, pocket=[LONG_PRESET])
    base = server["url"] + "gradio_api/"
    since = time.time()
    httpx.post(base + "queue/join", json=queue_data(outputs["_deps"], "compare", values, session_hash), timeout=10)
    with httpx.stream("GET", base + "queue/data", params={"session_hash": session_hash}, timeout=120) as stream:
        for line in stream.iter_lines():   # until the heard run streams: its live figures say "so far"
            if line.startswith("data:") and "so far" in line:
                break
        gone_at = time.time()
    assert_stopped_within_bound(wait_for_cancelled_record(server, since), gone_at)
    assert_next_client_served(client, outputs)


@pytest.mark.slow
def test_a_cancelled_client_job_stops_generation(server, outputs, client, served):
    since = time.time()
    job = client.submit(*compare_args(text=LONG, max_audio_s=60, runs=1, pocket=[LONG_PRESET]),
                        api_name="/compare")
    deadline = time.monotonic() + 120
    while not any("so far" in str(o) for o in job.outputs()):
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.05)
    job.cancel()
    gone_at = time.time()
    assert_stopped_within_bound(wait_for_cancelled_record(server, since), gone_at)
    assert_next_client_served(client, outputs)


@pytest.mark.slow
def test_a_page_whose_pcm_socket_drops_mid_stream_stops_generation(server, outputs, client, served):
    from websockets.sync.client import connect

    listener = uuid.uuid4().hex
    since = time.time()
    with connect(server["url"].replace("http", "ws") + f"lab/pcm?listener={listener}") as ws:
        args = compare_args(text=LONG, max_audio_s=60, runs=1, transport="pcm", pocket=[LONG_PRESET])
        job = client.submit(listener, *args[1:], api_name="/compare")
        while not isinstance(ws.recv(timeout=120), bytes):   # until the heard run's first PCM chunk
            pass
    gone_at = time.time()

    assert_stopped_within_bound(wait_for_cancelled_record(server, since), gone_at)
    job.result(timeout=60)
    assert "stopped" in Outputs(job, outputs["compare"]).last("overall")
    assert_next_client_served(client, outputs)


# -- bookkeeping that fails ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def broken_server(tmp_path_factory):
    """History path a directory (found at start-up), votes on a full disk (found at the first write)."""
    tmp = tmp_path_factory.mktemp("broken")
    (tmp / "history.jsonl").mkdir()
    os.symlink("/dev/full", tmp / "votes.jsonl")
    app = AppProcess(str(tmp), presets_dir=TEST_PRESETS)
    yield {"url": app.url, "tmp": tmp, "app": app}
    app.stop()


@pytest.mark.slow
def test_a_directory_as_lab_history_starts_the_app_with_one_line_and_a_banner(broken_server):
    log = open(broken_server["app"].log_path).read()
    warnings = [line for line in log.splitlines() if "history.jsonl" in line]
    assert len(warnings) == 1 and "is a directory" in warnings[0] and "LAB_HISTORY" in warnings[0], log
    page = httpx.get(broken_server["url"] + "config", timeout=10).text
    assert "cannot be written (is a directory)" in page
    # No server path reaches a visitor: the app folder's own, nor where the history lives (outside it).
    assert str(broken_server["tmp"]) not in page and ROOT not in page


@pytest.mark.slow
def test_an_unwritable_history_still_returns_the_runs_and_says_so(broken_server):
    client = new_client(broken_server)
    out = compare(client, endpoints(broken_server["url"]), csm=["csm-tiny"], runs=2)
    overall = out.last("overall")
    assert "done: 3 runs of 1 presets" in overall and "history not written" in overall and "LAB_HISTORY" in overall
    assert table(out.last("summary"))["csm-tiny"]["warm runs"] == 2
    # Kept in memory: the History tab shows them, and says where it could not write.
    table_value, _, _, note, *_ = client.predict(["csm-tiny"], [], "all", "", api_name="/history")
    assert len(table_value["data"]) == 3 and "history.jsonl" in note and str(broken_server["tmp"]) not in note


@pytest.mark.slow
def test_a_vote_on_a_full_disk_is_still_counted_and_revealed(broken_server):
    client = new_client(broken_server)
    client.predict("", "hibari", "csm-tiny", "Hello there.", 3, False, "prebuffered", api_name="/ab_play")
    revealed, tally = client.predict(api_name="/vote_same")
    assert "A was **" in revealed and "vote not written" in revealed and "No space left on device" in revealed
    assert table(tally)["csm-tiny vs hibari"]["votes"] == 1


@pytest.mark.slow
def test_the_run_loop_and_the_cli_keep_results_when_the_history_cannot_be_written(tmp_path, capsys):
    spec = VariantSpec(family="pocket_tts", name="pocket-tiny", weights="tiny")
    events = list(session.run_presets(ModelManager(), [spec], Request("Two words.", max_audio_s=0.3), runs=2,
                                      history_path="/dev/full"))
    assert len([e for e in events if isinstance(e, session.RunDone)]) == 3
    said = [e.message for e in events if isinstance(e, session.NotSaved)]
    assert len(said) == 1 and "No space left on device" in said[0]
    code = cli.main(["--presets", "hibari", "--runs", "1", "--max-seconds", "1", "--text", "Two words.",
                       "--out", str(tmp_path / "out"), "--history", "/dev/full"])
    assert code == 0 and "warning: history not written" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "out" / "results.json").read_text())["runs"]) == 2


def test_a_journal_keeps_what_it_cannot_write_in_memory(tmp_path):
    (tmp_path / "dir").mkdir()
    journal = history.Journal(str(tmp_path / "dir"))
    assert "is a directory" in str(journal.problem)
    with pytest.raises(history.NotWritten):
        journal.append({"preset": "x", "run": 0})
    assert history.read(journal) == [{"preset": "x", "run": 0}]


# -- the line in front of the model is bounded ---------------------------------------------------------------------
def test_past_the_line_limit_a_newcomer_is_told_when_to_come_back():
    line = ModelLine(max_waiting=2)
    first, second = line.turn(12.0, session.Cancel()), line.turn(5.0, session.Cancel())
    first.__enter__()
    waiting = threading.Thread(target=lambda: second.__enter__())
    waiting.start()
    while second not in line._line:
        time.sleep(0.01)
    with pytest.raises(Exception) as refused:
        line.turn(5.0, session.Cancel())
    assert refused.value.where == "queue" and "busy: 2 comparisons" in str(refused.value)
    assert "try again in 12 s" in str(refused.value) or "try again in 11 s" in str(refused.value)
    first.__exit__(None, None, None)
    waiting.join(timeout=5)
    second.__exit__(None, None, None)
    assert line.turn(5.0, session.Cancel()) is not None


# -- odd inputs: the page's API and the CLI, each with what a person is told -----------------------------------------
# (id, what was typed, its field, what the person is told). The page shows it at the field and runs nothing; the CLI
# prints one line naming its flag and exits 2.
FIELDS = {"text": ("text-error", "text", "--text"), "seed": ("numbers-error", "seed", "--seed"),
          "runs": ("numbers-error", "runs per preset", "--runs"),
          "max_audio_s": ("numbers-error", "max_audio_s", "--max-seconds")}
REFUSED = [
    ("empty text", "text", "", "is empty; type a sentence"),
    ("blank text", "text", "   \n ", "is empty"),
    ("control characters only", "text", "\x01\x02\x07", "has nothing to speak (only U+0001, U+0002, U+0007)"),
    ("emoji only", "text", "🎉🎉🎉", "has nothing to speak (only 🎉 (U+1F389))"),
    ("markup only", "text", "<speak></speak>", "has nothing to speak"),
    ("punctuation only", "text", "?!... --", "has nothing to speak (no letters or digits)"),
    ("Arabic", "text", "مرحبا بكم", "has characters outside Latin script"),
    ("Japanese", "text", "こんにちは", "has characters outside Latin script"),
    ("Latin and Cyrillic", "text", "Hello Привет", "has characters outside Latin script"),
    ("1001 characters", "text", "x" * 1001, "has 1001 characters, over the limit of 1000"),
    ("1001 emoji", "text", "🎉" * 1001, "has 1001 characters, over the limit"),
    ("negative seed", "seed", -1, "-1 is out of range; use 0 to 4294967295"),
    ("seed 2**32", "seed", 2**32, "4294967296 is out of range"),
    ("seed 2**64", "seed", 2**64, "18446744073709551616 is out of range"),
    ("fractional seed", "seed", 1.5, "1.5 is not a whole number"),
    ("seed with letters", "seed", "12abc", "'12abc' is not a number"),
    ("empty seed", "seed", "", "is empty; type a whole number"),
    ("seed nan", "seed", "nan", "'nan' is not a finite number"),
    ("seed inf", "seed", "inf", "'inf' is not a finite number"),
    ("zero runs", "runs", 0, "0 is out of range; use 1 to 20"),
    ("21 runs", "runs", 21, "21 is out of range"),
    ("1.5 runs", "runs", 1.5, "1.5 is not a whole number"),
    ("runs in words", "runs", "two", "'two' is not a number"),
    ("negative runs", "runs", -3, "-3 is out of range"),
    ("empty runs", "runs", "", "is empty"),
    ("zero cap", "max_audio_s", 0, "0.0 is out of range; use a value in (0, 120] seconds"),
    ("cap over 120 s", "max_audio_s", 121, "121.0 is out of range"),
    ("negative cap", "max_audio_s", -1, "-1.0 is out of range"),
    ("cap in words", "max_audio_s", "abc", "'abc' is not a number of seconds"),
    ("cap nan", "max_audio_s", "nan", "nan is out of range"),
    ("empty cap", "max_audio_s", "", "is empty"),
]


@pytest.mark.parametrize("key,value,told", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
@pytest.mark.slow
def test_odd_input_through_the_api_is_refused_at_its_field(client, outputs, key, value, told):
    form = {"text": "Two short words.", "seed": 0, "max_audio_s": 2, "runs": 1, key: value}
    out = compare(client, outputs, csm=["csm-tiny"], **form)
    element, field, _ = FIELDS[key]
    assert f"{field}: {told}" in html.unescape(out.last(element)) and "not run" in out.last("overall")


@pytest.mark.parametrize("key,value,told", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_odd_input_through_the_cli_is_one_line_naming_its_flag(tmp_path, capsys, key, value, told):
    flag = FIELDS[key][2]
    code = cli.main(["--presets", "hibari", "--history", "", "--out", str(tmp_path), flag, str(value)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"error: {flag}: {told}" in err, err


def not_audio(tmp_path, suffix=".wav"):
    path = tmp_path / f"notes{suffix}"
    path.write_text("These are my notes, not a recording.\n")
    return str(path)


def yaml_with_a_python_tag(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("family: !!python/object/apply:os.system ['true']\n")
    return str(path)


# What only the CLI takes: presets by name or by file, where results go, a spoken turn from a file.
CLI_ONLY = [
    ("a path given as a preset name", lambda t: ["--presets", "../presets/hibari"],
     "preset '../presets/hibari': no such preset; that is a path"),
    ("an absolute path as a preset name", lambda t: ["--presets", "/etc/passwd"], "goes with --preset-file"),
    ("a preset that does not exist", lambda t: ["--presets", "hibary"], "no such preset; did you mean hibari?"),
    ("no presets at all", lambda t: [], "--presets: none chosen"),
    ("a preset file that is not there", lambda t: ["--preset-file", str(t / "gone.yaml")], "--preset-file: "),
    ("a preset file with a python tag", lambda t: ["--preset-file", yaml_with_a_python_tag(t)], "evil.yaml"),
    ("--out is a file", lambda t: ["--presets", "hibari", "--out", not_audio(t, ".txt")], "is a file, not a folder"),
    ("--out under a file", lambda t: ["--presets", "hibari", "--out", not_audio(t, ".txt") + "/sub"],
     "--out: "),
    ("--out where nothing can be written", lambda t: ["--presets", "hibari", "--out", "/proc/lab-results"],
     "cannot be written"),
    ("a text file as the spoken turn", lambda t: ["--presets", "hibari", "--user-audio", not_audio(t)],
     "--user-audio: not audio: notes.wav (expected WAV/FLAC/MP3/OGG)"),
]


@pytest.mark.parametrize("argv,told", [c[1:] for c in CLI_ONLY], ids=[c[0] for c in CLI_ONLY])
def test_odd_cli_arguments_are_one_line_each(tmp_path, capsys, argv, told):
    args = argv(tmp_path)
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    code = cli.main(args + ["--history", ""])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and told in err and "Traceback" not in err, err


@pytest.mark.slow
def test_odd_page_inputs_are_refused_by_name(client, outputs, tmp_path):
    from gradio_client import handle_file

    # An upload that is not audio (a text file renamed .wav), whoever it was meant for.
    args = list(compare_args(csm=["csm-tiny"]))
    args[7] = handle_file(not_audio(tmp_path))
    job = client.submit(*args, api_name="/compare")
    job.result(timeout=60)
    assert "not audio: notes.wav (expected WAV/FLAC/MP3/OGG)" in Outputs(job, outputs["compare"]).last("audio-error")
    assert "presets: none chosen" in compare(client, outputs).last("presets-error")
    assert "seed: is empty" in compare(client, outputs, csm=["csm-tiny"], seed=None).last("numbers-error")
    for first, second, seed, text, told in [("csm-tiny", "csm-tiny", 0, "Hi.", "pick two different presets"),
                                            ("csm-tiny", "hibari", "12abc", "Hi.", "seed: '12abc' is not a number"),
                                            ("csm-tiny", "hibari", 0, "🎉", "text: has nothing to speak")]:
        msg = html.unescape(client.predict("", first, second, text, seed, False, "prebuffered", api_name="/ab_play")[2])
        assert told in msg, msg


# Pasted text is made speakable, and the person is told what changed (escaped where the page echoes it).
NORMALIZED = [
    ("an emoji at the end of a chat reply", "Your order has shipped 🎉", "dropped (no spoken form): 🎉 (U+1F389)"),
    ("symbols with words", "It costs ≈ €5, about 50% off", "≈ → about"),
    ("SSML", "<speak>Please wait.</speak>", "markup removed: &lt;/speak&gt; &lt;speak&gt;"),
    ("an SSML pause", "Wait<break time='1s'/>now.", "each &lt;break&gt; became a pause"),
    ("a script tag", "<script>alert(1)</script>Hello there.", "markup removed: &lt;/script&gt; &lt;script&gt;"),
]


@pytest.mark.parametrize("text,told", [c[1:] for c in NORMALIZED], ids=[c[0] for c in NORMALIZED])
@pytest.mark.slow
def test_pasted_text_is_spoken_with_a_note_of_what_changed(client, outputs, server, text, told):
    out = compare(client, outputs, text=text, csm=["csm-tiny"])
    assert "done: 2 runs" in out.last("overall")
    note = out.last("text-error")
    assert told in note and "<script>" not in note and "<speak>" not in note
    spoken = [r["text"] for r in history_records(server) if r.get("preset") == "csm-tiny"][-1]
    assert "<" not in spoken and "🎉" not in spoken and "≈" not in spoken


@pytest.mark.slow
def test_pasted_text_through_the_cli_is_spoken_with_a_note(tmp_path, capsys):
    code = cli.main(["--presets", "hibari", "--runs", "1", "--max-seconds", "1", "--history", "", "--out",
                       str(tmp_path), "--text", "<speak>Please wait.</speak> 🎉"])
    err = capsys.readouterr().err
    assert code == 0 and "note: --text: markup removed" in err and "note: --text: dropped" in err
    assert json.loads((tmp_path / "results.json").read_text())["request"]["text"] == "Please wait."


# -- the pretrained loading path, end to end, offline --------------------------------------------------------------
def run_preset_file(tmp_path, family, folder, text, max_audio_s):
    """A `weights: pretrained`, `model: <folder>` preset, read as --preset-file reads it, through the run loop."""
    import pretrained_folder
    from lab import presets

    getattr(pretrained_folder, f"save_{'csm' if family == 'csm' else 'pocket'}")(str(folder))
    path = tmp_path / f"{family}-folder.yaml"
    path.write_text(f"family: {family}\nweights: pretrained\nmodel: {folder}\n")
    spec = presets.load_file(str(path))
    manager = ModelManager()
    events = list(session.run_presets(manager, [spec], Request(text, max_audio_s=max_audio_s), runs=1))
    assert not [e.message for e in events if isinstance(e, session.Failed)]
    done = [e for e in events if isinstance(e, session.RunDone)]
    assert len(done) == 2 and all(e.record["weights"] == "pretrained" for e in done)
    assert len([e for e in events if isinstance(e, session.Chunk) and e.run == 1]) >= 2, "not streamed"
    return manager.built()[0], done


@pytest.mark.slow
def test_a_csm_folder_loads_through_from_pretrained_and_its_processor_and_matches_generate(tmp_path):
    import torch

    engine, done = run_preset_file(tmp_path, "csm", tmp_path / "csm-1b", "Hello there.", 1.6)
    assert type(engine.processor).__name__ == "CsmProcessor" and done[-1].record["tokenizer"] == "CsmProcessor"
    # generate() through the processor, as the model card does: the chat template with the speaker id.
    conversation = [{"role": "0", "content": [{"type": "text", "text": "Hello there."}]}]
    inputs = engine.processor.apply_chat_template(conversation, tokenize=True, return_dict=True)
    assert inputs["input_ids"][0][0] == engine.model.config.bos_token_id
    with torch.no_grad():
        ref = engine.model.generate(**inputs, do_sample=False, depth_decoder_do_sample=False,
                                    max_new_tokens=len(engine.last_codes))
    assert torch.equal(ref[0], engine.last_codes)


def test_a_pocket_tts_folder_loads_through_from_pretrained_and_its_processor_and_matches_generate(tmp_path):
    import torch

    engine, done = run_preset_file(tmp_path, "pocket_tts", tmp_path / "pocket-tts", "Hello there, friend.", 10)
    assert type(engine.processor).__name__ == "PocketTTSProcessor" and "stand-in" not in done[-1].record["tokenizer"]
    conversation = [{"role": "user", "content": [{"type": "text", "text": "Hello there, friend."}]}]
    inputs = engine.processor(text=engine.processor.apply_chat_template(conversation, tokenize=False),
                              return_tensors="pt")
    torch.manual_seed(0)
    with torch.no_grad():   # greedy; the end of speech and the frame budget are generate()'s own
        out = engine.model.generate(**inputs, do_sample=False, return_dict_in_generate=True)
    expected = out.audio_latents[:, : int(out.audio_latents_mask.sum())]
    torch.testing.assert_close(engine.last_latents, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("model,told", [
    ("nobody/no-such-model", "'nobody/no-such-model': the weights could not be loaded: not in the Hugging Face cache "
                             "and the hub is unreachable"),
    ("sesame/csm-1b", "'sesame/csm-1b': the weights could not be loaded"),      # gated on the hub
    ("/nonexistent/csm-folder", "is not a directory with a saved model"),
])
@pytest.mark.slow
def test_a_missing_or_gated_hub_id_gives_the_labs_own_message(model, told):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"   # conftest: the hub is unreachable, as on a machine without it
    spec = VariantSpec(family="csm", name="csm-hub", weights="pretrained", model=model)
    failed = [e for e in session.run_presets(ModelManager(), [spec], Request("Hi."), runs=1)
              if isinstance(e, session.Failed)]
    assert len(failed) == 1 and told in failed[0].message and "unexpected failure" not in failed[0].message
