"""A speech server elsewhere as a preset: each run is one streamed `POST /v1/audio/speech` (OpenAI's speech API, as
this lab's own server, vLLM-Omni, SGLang-Omni and Kokoro-FastAPI serve it), so a deployed server sits beside local
variants in one comparison and one chart, measured by the same run loop and the same definitions.

    family: remote
    endpoint: http://HOST:PORT        # the server's base URL (".../v1" is accepted too)
    model: kokoro                     # the server's model id, as its GET /v1/models lists it
    voice: af_heart                   # where the server has voices

The audio is asked for as `pcm` (16-bit mono, the server's rate): the rate comes from an `X-Sample-Rate` header
where the server sends one (this lab's does), else OpenAI's 24 kHz, which the build notes then say. What the server
does before its first audio byte is one phase to the client: `session` ends when the request is on the wire,
`prefill` when the response's headers arrive (the server accepted it), and the rest at the first audio byte. Each
piece the socket delivers is a chunk. A cancelled run closes the connection, which a server that streams stops at
its next frame (this lab's does).

Only the standard library is used (http.client), so a CPU-only install needs nothing more.
"""
from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Iterator
from urllib.parse import urlsplit

import numpy as np

from lab.audio import AudioChunk
from lab.engines.base import BuildReport, Engine, StageClock
from lab.errors import Cancelled, LabError
from lab.measure.metrics import Timeline
from lab.request import Request
from lab.spec import VariantSpec

OPENAI_PCM_RATE = 24000     # OpenAI's pcm format: 24 kHz 16-bit mono, where a server names no rate
READ_BYTES = 1 << 16        # at most this much per read: a piece is what the socket has, up to this
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 120.0      # a server that sends nothing for this long is taken as gone


class RemoteEngine(Engine):
    def __init__(self, spec: VariantSpec, sample_rate: int, rate_named: bool):
        super().__init__(spec, sample_rate, BuildReport(tokenizer="the server's own"))
        self.url = urlsplit(base_url(spec.endpoint))
        self.rate_named = rate_named

    def use_threads(self) -> int:
        return 0   # nothing runs here but the socket

    def _stream(self, request: Request, timeline: Timeline, cancel: threading.Event | None
                ) -> Iterator[AudioChunk]:
        timeline.mark("request")
        conn, response = self._open(request, timeline)
        try:
            odd, index, budget = b"", 0, int(request.max_audio_s * self.sample_rate)
            while budget > 0:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                data = response.read1(READ_BYTES)
                if not data:
                    break
                data = odd + data
                whole = len(data) // 2 * 2
                odd = data[whole:]
                if not whole:
                    continue
                samples = np.frombuffer(data[:whole], "<i2")[:budget].astype(np.float32) / 32768.0
                budget -= len(samples)
                if index == 0:
                    for phase in ("generator", "first_frame", "first_decode"):
                        timeline.mark(phase)
                timeline.frame()
                timeline.chunk(len(samples) / self.sample_rate)
                yield AudioChunk(samples, self.sample_rate, index)
                index += 1
        finally:
            conn.close()   # also how a cancelled or capped run tells the server to stop

    def _open(self, request: Request, timeline: Timeline
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Sends the request; returns the connection and the response once its headers are in (status 200), else
        raises a LabError with the server's own message."""
        body = {"model": self.spec.model, "input": request.text, "response_format": "pcm", "stream": True}
        if self.spec.voice:
            body["voice"] = self.spec.voice
        conn = connection(self.url, READ_TIMEOUT_S)
        try:
            conn.request("POST", self.url.path.rstrip("/") + "/v1/audio/speech", json.dumps(body),
                         {"Content-Type": "application/json", "Accept": "audio/pcm"})
            timeline.mark("session")
            response = conn.getresponse()
        except OSError as e:
            conn.close()
            raise unreachable(self.spec.endpoint, e) from e
        timeline.mark("prefill")
        if response.status != 200:
            message = server_message(response.read())
            conn.close()
            raise LabError("endpoint", f"{self.spec.endpoint} answered {response.status} to model "
                                       f"{self.spec.model!r}: {message}")
        return conn, response


def base_url(endpoint: str) -> str:
    """The server's root: a URL given with its /v1 is taken as the server's."""
    endpoint = endpoint.rstrip("/")
    return endpoint[: -len("/v1")] if endpoint.endswith("/v1") else endpoint


def connection(url, timeout_s: float) -> http.client.HTTPConnection:
    kind = http.client.HTTPSConnection if url.scheme == "https" else http.client.HTTPConnection
    return kind(url.hostname, url.port, timeout=timeout_s)


def unreachable(endpoint: str, error: OSError) -> LabError:
    return LabError("endpoint", f"{endpoint} does not answer ({error}); start the server, or fix the preset's "
                                f"endpoint (its base URL, e.g. http://127.0.0.1:8000)")


def server_message(body: bytes) -> str:
    """An OpenAI-shaped error's message, else the body's first 200 characters."""
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body.decode("utf-8", "replace")[:200] or "(no body)"


def listed_models(spec: VariantSpec) -> list[str] | None:
    """The ids the server's GET /v1/models lists, or None where it has no such route."""
    url = urlsplit(base_url(spec.endpoint))
    conn = connection(url, CONNECT_TIMEOUT_S)
    try:
        conn.request("GET", url.path.rstrip("/") + "/v1/models")
        response = conn.getresponse()
        body = response.read()
    except OSError as e:
        raise unreachable(spec.endpoint, e) from e
    finally:
        conn.close()
    if response.status != 200:
        return None
    try:
        return [m["id"] for m in json.loads(body)["data"]]
    except (ValueError, KeyError, TypeError):
        return None


def build(spec: VariantSpec, progress) -> RemoteEngine:
    clock = StageClock(progress)
    t0 = time.perf_counter()
    models = listed_models(spec)
    if models is not None and spec.model not in models:
        shown = ", ".join(models[:12]) + (", ..." if len(models) > 12 else "")
        raise LabError("model", f"{spec.endpoint} does not list {spec.model!r} in GET /v1/models; use one of: "
                                f"{shown}")
    load_s = time.perf_counter() - t0
    engine = RemoteEngine(spec, OPENAI_PCM_RATE, rate_named=False)

    def warm_up():   # read to its end, so the server finishes it rather than seeing a client go
        conn, response = engine._open(Request("Warm up."), Timeline())
        try:
            rate = response.getheader("X-Sample-Rate")
            while response.read1(READ_BYTES):
                pass
        finally:
            conn.close()
        return rate

    rate, warmup_s = clock.run("warming up", warm_up)
    if rate and rate.isdigit():
        engine.sample_rate, engine.rate_named = int(rate), True
    notes = [f"a server at {spec.endpoint}: every figure includes the network between here and it"]
    if not engine.rate_named:
        notes.append(f"the server names no rate (X-Sample-Rate): read as OpenAI's pcm, {OPENAI_PCM_RATE} Hz")
    engine.report = BuildReport(load_s=load_s, warmup_s=warmup_s, tokenizer="the server's own", notes=notes)
    return engine
