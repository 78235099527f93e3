"""The standard speech API, without HTTP: OpenAI's `POST /v1/audio/speech` body checked field by field, planned by
the page's own planning and run by the page's own run loop, and its audio framed as 16-bit PCM, WAV or
server-sent events. web/api.py puts it on the server's routes; this module imports neither torch nor a web
framework, so its rules are tested with plain dicts.

    speech = parse(body, catalog)                        # ApiError naming the field, or what to run
    stream = Stream(deliver, speech)                     # the run loop's hook: audio to the client as it comes
    service.start(comparison, speech, stream)            # plan, the model's line, the run loop (one code path)

A request is one run of one preset: the run loop's cold run when the variant has not served yet, else a warm one,
appended to the history with `source: "api"` like any page run. Batching presets take every stream into their
shared step; the others wait in the page's line (lab.serving.line), and past its bound the answer is 429.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import struct
import uuid
from dataclasses import dataclass
from typing import Callable

from lab.errors import LabError
from lab.serving.line import LineFull

# What this API streams; OpenAI's other formats (mp3, opus, aac, flac) would need an encoder in the timed path.
FORMATS = ("pcm", "wav")
OPENAI_FORMATS = ("mp3", "opus", "aac", "flac", "wav", "pcm")
STREAM_FORMATS = ("audio", "sse")
# OpenAI's fields, then the lab's own: `stream` false answers with the whole file at once (Content-Length), `seed`
# and `max_audio_s` are the page's seed and cap on audio length.
FIELDS = ("model", "input", "voice", "response_format", "stream_format", "speed", "instructions", "stream", "seed",
          "max_audio_s")
DEFAULT_MAX_AUDIO_S = 30.0   # a cap for a model that never stops (random weights run to it); text ends real voices
RANDOM_SUFFIX = ":random"    # "<preset>:random": the page's random-weights switch, as a model id
CSM_SPEAKERS = ("0", "1")    # CSM's speaker ids in its prompt ("[0]Hello"): its two voices
OWNER = "speech-latency-lab"
# Where a lab error's field is named in the body (lab.request's names -> the API's).
LAB_FIELDS = {"text": "input", "seed": "seed", "max_audio_s": "max_audio_s", "presets": "model", "queue": None}


class ApiError(Exception):
    """An error as OpenAI's API shapes it: {"error": {"message", "type", "param", "code"}}, with its HTTP status.
    The message starts with the field it names and says how to fix it."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


def from_lab(e: LabError) -> ApiError:
    """A LabError from planning, as the API's error: a full line is 429 with Retry-After, a preset this machine
    cannot run is the `model`'s fault, anything else names the body's field."""
    if isinstance(e, LineFull):
        return ApiError(429, e.message, None, "queue_full", "rate_limit_error", e.retry_after_s)
    if e.where == "queue":
        return ApiError(503, e.message, None, "busy", "server_error", 1)
    param = LAB_FIELDS.get(e.where, "model" if e.where.startswith("preset") else e.where)
    return ApiError(400, f"{param}: {e.message}", param, "invalid_value")


@dataclass(frozen=True)
class Speech:
    """One checked request: which preset (and weights), what to say and how to send it."""
    model: str                 # as the client named it ("csm-tiny", "csm-batched-cuda-graphs:random")
    preset: str
    random_weights: bool
    input: str
    voice: str
    speaker: int
    response_format: str
    stream_format: str
    stream: bool
    seed: int | str
    max_audio_s: float | str


def voices(spec) -> tuple[str, ...]:
    """The voices a preset speaks in: CSM's speakers, hibari's one voice (another voice is another preset's
    model id), none for the others (the field is then left out, or "default")."""
    if spec.family == "csm":
        return CSM_SPEAKERS
    if spec.family == "hibari":
        return (spec.model_id.split(":", 1)[1] if ":" in spec.model_id else "heart",)
    return ()


def runnable(catalog) -> dict[str, tuple[str, bool]]:
    """Model id -> (preset, random weights) for every preset this machine runs: each one as it is, and with
    RANDOM_SUFFIX where the random-weights switch makes a runnable variant of it that it is not already."""
    out = {}
    for name, status in catalog.statuses[False].items():
        if status.available:
            out[name] = (name, False)
    for name, status in catalog.statuses[True].items():
        own = catalog.specs.get(name)
        if status.available and own is not None and status.weights == "random" and own.weights != "random":
            out[name + RANDOM_SUFFIX] = (name, True)
    return out


def models(catalog) -> dict:
    """GET /v1/models: the model ids this machine can run, OpenAI's list shape plus what a client needs to choose
    (family, weights, whether it batches, its voices)."""
    data = []
    for model_id, (name, random_weights) in sorted(runnable(catalog).items()):
        spec = catalog.spec(name, random_weights)
        data.append({"id": model_id, "object": "model", "created": 0, "owned_by": OWNER, "family": spec.family,
                     "weights": spec.weights, "batches": spec.batches, "voices": list(voices(spec)),
                     "description": spec.description})
    return {"object": "list", "data": data}


def parse(body, catalog) -> Speech:
    """The request body checked field by field, each error naming its field and the fix. Text, seed and cap are
    only read here; the page's planning checks them (`SpeechService.start`), so both refuse the same things."""
    if not isinstance(body, dict):
        raise ApiError(400, "body: is not a JSON object; send {\"model\": ..., \"input\": ..., \"voice\": ...}",
                       None, "invalid_body")
    unknown = [k for k in body if k not in FIELDS]
    if unknown:
        raise ApiError(400, f"{unknown[0]}: is not a field of this API; use {', '.join(FIELDS)}", unknown[0],
                       "unknown_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, "model: is missing; name a preset (GET /v1/models lists those this machine runs)",
                       "model", "missing_required_parameter")
    choices = runnable(catalog)
    if model not in choices:
        base = model[: -len(RANDOM_SUFFIX)] if model.endswith(RANDOM_SUFFIX) else model
        status = catalog.statuses[model.endswith(RANDOM_SUFFIX)].get(base)
        why = (f"this machine cannot run it: {status.refusal.sentence}" if status is not None and status.refusal
               else "no such preset")
        raise ApiError(404, f"model: {model!r}: {why}; use one of {', '.join(sorted(choices))} (GET /v1/models)",
                       "model", "model_not_found")
    preset, random_weights = choices[model]
    text = body.get("input")
    if not isinstance(text, str):
        raise ApiError(400, "input: is missing or not a string; send the text to speak", "input",
                       "missing_required_parameter" if text is None else "invalid_type")
    response_format = body.get("response_format", "pcm")
    if response_format not in FORMATS:
        other = response_format in OPENAI_FORMATS
        raise ApiError(400, f"response_format: {response_format!r} is not supported{' here' if other else ''}; use "
                            f"pcm (16-bit little-endian mono at the rate in the X-Sample-Rate header) or wav",
                       "response_format", "unsupported_format" if other else "invalid_value")
    stream_format = body.get("stream_format", "audio")
    if stream_format not in STREAM_FORMATS:
        raise ApiError(400, f"stream_format: {stream_format!r} is not one of {' | '.join(STREAM_FORMATS)}",
                       "stream_format", "invalid_value")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: must be true (audio as it is generated) or false (the whole file at once)",
                       "stream", "invalid_type")
    if stream_format == "sse" and not stream:
        raise ApiError(400, "stream: false has no events to send; leave stream_format out, or stream", "stream",
                       "invalid_value")
    speed = body.get("speed", 1.0)
    if not isinstance(speed, (int, float)) or isinstance(speed, bool) or speed != 1.0:
        raise ApiError(400, f"speed: {speed!r} is not supported; the presets speak at 1.0, leave it out", "speed",
                       "unsupported_value")
    if body.get("instructions"):
        raise ApiError(400, "instructions: not supported by these voices; leave it out", "instructions",
                       "unsupported_value")
    spec = catalog.spec(preset, random_weights)
    voice, speaker = _voice(body.get("voice"), spec)
    return Speech(model, preset, random_weights, text, voice, speaker, response_format, stream_format, stream,
                  body.get("seed", 0), body.get("max_audio_s", DEFAULT_MAX_AUDIO_S))


def parse_socket(body, catalog) -> Speech:
    """One request on the WebSocket (a JSON text frame): the POST body's fields, answered in binary 16-bit PCM
    frames, so `response_format` is pcm and `stream` and `stream_format` do not apply."""
    if isinstance(body, dict):
        for name in ("stream", "stream_format"):
            if name in body:
                raise ApiError(400, f"{name}: does not apply on the WebSocket, which streams binary PCM frames; "
                                    f"leave it out", name, "unknown_parameter")
        if body.get("response_format", "pcm") != "pcm":
            raise ApiError(400, f"response_format: {body['response_format']!r} is not sent on the WebSocket; its "
                                f"frames are 16-bit PCM at the rate speech.started names: use pcm or leave it out",
                           "response_format", "unsupported_format")
    return parse(body, catalog)


def _voice(given, spec) -> tuple[str, int]:
    """(voice, CSM speaker id) for the request's `voice`: left out, "default" or one of the preset's voices."""
    if isinstance(given, dict):   # OpenAI's custom-voice object
        given = given.get("id")
    have = voices(spec)
    if given in (None, "", "default"):
        return (have[0] if have else "default"), 0
    if not isinstance(given, str) or given not in have:
        offer = f"use one of {', '.join(have)}" if have else f"{spec.family} has one voice"
        raise ApiError(400, f"voice: {given!r} is not a voice of {spec.name}; {offer}, or leave it out", "voice",
                       "invalid_value")
    return given, int(given) if spec.family == "csm" else 0


# -- what goes back ------------------------------------------------------------------------------------------------
def wav_header(sample_rate: int, data_bytes: int | None = None) -> bytes:
    """A 44-byte PCM WAV header, 16-bit mono. Streamed, the length is not known yet: the sizes are the largest
    value (0xFFFFFFFF), which players and decoders read as "until the stream ends"."""
    data = 0xFFFFFFFF if data_bytes is None else data_bytes
    riff = 0xFFFFFFFF if data_bytes is None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16) + b"data" + struct.pack("<I", data))


def sse_event(event: dict) -> bytes:
    """One server-sent event as OpenAI's speech stream sends it: `data: {json}` and a blank line."""
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def audio_delta(audio: bytes) -> bytes:
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(audio).decode()})


def audio_done(record: dict | None) -> bytes:
    usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}   # OpenAI's shape; the lab counts no tokens
    return sse_event({"type": "speech.audio.done", "usage": usage,
                      "audio_s": None if record is None else record.get("audio_s")})


def media_type(speech: Speech) -> str:
    if speech.stream_format == "sse":
        return "text/event-stream"
    return "audio/wav" if speech.response_format == "wav" else "audio/pcm"


# -- from the run loop to the client ---------------------------------------------------------------------------------
# What a Stream delivers, in order: ("audio", sample rate, 16-bit PCM bytes) per chunk, then one of ("done", record),
# ("stopped", None) or ("failed", message), and last ("end", None) once the loop has let go of the model.
class Stream:
    """The run loop's hook for one API request (its `on_event`, in the loop's thread): each chunk goes to
    `deliver` the moment it is ready, converted to 16-bit PCM by `to_pcm16` (the web layer's converter), and the
    finished run's record gets the request's API settings before the loop appends it to the history."""

    def __init__(self, speech: Speech, deliver: Callable[[tuple], None], to_pcm16: Callable, request_id: str):
        self.speech, self.deliver, self.to_pcm16, self.request_id = speech, deliver, to_pcm16, request_id

    def on_event(self, e) -> None:
        kind = type(e).__name__   # lab.session's events, by name: this module stays free of the run loop's imports
        if kind == "Chunk":
            self.deliver(("audio", e.chunk.sample_rate, self.to_pcm16(e.chunk.samples)))
        elif kind == "RunDone":
            s = self.speech
            e.record.update(request_id=self.request_id, api={
                "model": s.model, "voice": s.voice, "response_format": s.response_format,
                "stream_format": s.stream_format, "stream": s.stream})
            self.deliver(("done", e.record))
        elif kind == "Stopped":
            self.deliver(("stopped", e.record))
        elif kind == "Failed":
            self.deliver(("failed", e.message))
        elif kind == "Finished":
            self.deliver(("end", None))


def new_request_id() -> str:
    return f"speech-{uuid.uuid4().hex[:20]}"


class SpeechService:
    """Starts API requests through the page's own pieces, handed in where the app is built: `plan` (lab.planning's
    door over the page's catalog: (names, text, seed, max_audio_s, runs, weights) -> Plan), the run loop
    (`run_presets`), the model's `line`, the `history`, the quality `worker`, the `comparisons` clicks start too,
    and `background` (lab.serving.background.Background)."""

    def __init__(self, catalog, plan, run_presets, manager, line, history, quality, comparisons, background):
        self.catalog, self.plan, self.run_presets, self.manager = catalog, plan, run_presets, manager
        self.line, self.history, self.quality, self.comparisons = line, history, quality, comparisons
        self.background = background

    def begin(self, speech: Speech, stream: Stream):
        """The request as a comparison of one preset and one run, planned in its own thread (Comparisons.begin);
        `comparison.wait_planned()` then gives the LabError that refused it, or None once its loop runs."""
        return self.comparisons.begin(stream.request_id, f"api:{stream.request_id}",
                                      lambda c: self.start(c, speech, stream), "api")

    def start(self, comparison, speech: Speech, stream: Stream) -> None:
        planned = self.plan([speech.preset], speech.input, speech.seed, speech.max_audio_s, 1,
                            "random" if speech.random_weights else None)
        specs, request = list(planned.specs), dataclasses.replace(planned.request, speaker=speech.speaker)
        # A batching preset takes the stream into its shared step at once: no line, so no bound but its slots.
        batches = all(s.batches for s in specs)
        place = None if batches else self.line.turn(self.history.estimate_s([s.name for s in specs], 0),
                                                    comparison.cancel)
        events = self.run_presets(self.manager, specs, request, 0, comparison.cancel, self.history, "api", place,
                                  self.quality)
        comparison.plan = (specs, request)
        comparison.run = self.background(events, stream.on_event, comparison.cancel, name=f"api {speech.preset}",
                                         keep_events=False)
