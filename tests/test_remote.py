"""A speech server elsewhere as a preset (family: remote, lab/engines/remote.py): its spec's rules, and runs against
this lab's own server (`python app.py` on a free loopback port), measured by the same run loop as a local variant."""
import json
import os
import socket
import threading
import time

import numpy as np
import pytest

from harness import AppProcess
from lab import engines, session
from lab.errors import Cancelled, LabError
from lab.measure.metrics import PHASES, Timeline
from lab.request import Request
from lab.spec import from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "The birch canoe slid on the smooth planks. Glue the sheet to the dark blue background."


def refused(data) -> str:
    with pytest.raises(LabError) as e:
        from_dict(data, where="preset 'x'")
    return e.value.message


def test_a_remote_preset_needs_a_server_url_and_the_server_s_model_id():
    assert refused({"family": "remote", "model": "kokoro"}).startswith("endpoint: ''")
    assert "http://127.0.0.1:8000" in refused({"family": "remote", "endpoint": "127.0.0.1:8000", "model": "kokoro"})
    assert refused({"family": "remote", "endpoint": "http://h:1"}).startswith("model: ")
    assert "runs on its server" in refused({"family": "remote", "endpoint": "http://h:1", "model": "m",
                                            "attention": "eager"})
    assert refused({"family": "hibari", "endpoint": "http://h:1"}).startswith("endpoint: is for family: remote")
    spec = from_dict({"family": "remote", "endpoint": "http://h:1/v1", "model": "m", "voice": "af"})
    assert (spec.endpoint, spec.voice, spec.model_id) == ("http://h:1/v1", "af", "m")


def test_a_server_that_does_not_answer_is_named_with_the_fix():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]      # closed once the block ends: nothing listens there
    spec = from_dict({"family": "remote", "endpoint": f"http://127.0.0.1:{port}", "model": "hibari"})
    with pytest.raises(LabError) as e:
        engines.build(spec)
    assert e.value.where == "endpoint"
    assert "does not answer" in e.value.message and "start the server" in e.value.message


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    app = AppProcess(str(tmp_path_factory.mktemp("remote-server")), presets_dir=os.path.join(ROOT, "tests", "presets"))
    yield app
    app.stop()


def remote(server, model="hibari"):
    return from_dict({"family": "remote", "name": f"remote-{model}", "endpoint": server.url, "model": model})


@pytest.mark.slow
def test_a_remote_run_is_the_server_s_audio_measured_by_the_same_run_loop(server):
    engine = engines.build(remote(server))
    assert engine.sample_rate == 24000 and engine.rate_named     # the lab's server names its rate
    record, audio = session.run_once(engine, engine.spec, Request(TEXT, max_audio_s=20.0))
    # The same voice run here, as 16-bit PCM: what the server's engine made is what arrived, sample for sample.
    local = engines.build(from_dict({"family": "hibari", "name": "hibari"}))
    _, want = session.run_once(local, local.spec, Request(TEXT, max_audio_s=20.0))
    want16 = np.clip(np.round(want * 32767), -32768, 32767) / 32768.0
    assert len(audio) == len(want) and np.abs(audio - want16).max() <= 1.5 / 32768
    assert record["family"] == "remote" and record["first_audible_s"] > 0.2   # hibari's padded start came too
    stamps = dict(record["timeline"]["events"])
    assert all(phase in stamps for phase in PHASES) and 0 < record["ttfb_ms"] < 10_000
    assert len(record["timeline"]["chunks"]) >= 2                 # it streamed: one chunk per sentence at least


@pytest.mark.slow
def test_a_model_the_server_does_not_list_is_refused_with_the_ids_it_has(server):
    with pytest.raises(LabError) as e:
        engines.build(remote(server, "kokoro"))
    assert e.value.where == "model" and "hibari" in e.value.message and "GET /v1/models" in e.value.message


@pytest.mark.slow
def test_a_cancelled_remote_run_stops_the_server_s_stream(server):
    engine = engines.build(remote(server, "csm-tiny"))
    cancel = threading.Event()
    chunks = engine.stream(Request("A long one, then gone.", max_audio_s=60.0), Timeline(), cancel)
    next(chunks)
    cancel.set()
    with pytest.raises(Cancelled):
        for _ in chunks:
            pass
    deadline = time.monotonic() + 60
    while not (ended := [r for r in history(server) if r.get("text") == "A long one, then gone."]):
        assert time.monotonic() < deadline, "the server recorded no run of that text"
        time.sleep(0.2)
    assert ended[-1]["source"] == "api" and ended[-1]["cancelled"] and ended[-1]["audio_s"] < 25
    assert not any(r.get("cancelled") for r in history(server) if r.get("text") == "Warm up.")   # builds read to the end


def history(server) -> list[dict]:
    if not os.path.exists(server.history):
        return []
    with open(server.history) as f:
        return [json.loads(line) for line in f if line.strip()]
