"""The standard speech API's routes on the page's own server (same host and port): OpenAI's
`POST /v1/audio/speech` and `GET /v1/models`, and a WebSocket on the speech path for clients that keep one open
(docs/API.md). What a request means, how it is checked, planned and framed is lab.serving.speech_api's; this module
only moves bytes between HTTP or the socket and the run loop.

Audio goes out as the run loop makes it: its hook (`Stream.on_event`, in the loop's thread) hands each chunk to
this server's event loop, and the response body sends it as one HTTP chunk. A client that goes away sets the run's
cancel at once (a watch on the connection, not the next write), so generation stops at its next frame.
"""
from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse

from lab.serving import speech_api
from lab.serving.speech_api import ApiError, Speech, SpeechService, Stream
from web.pcm import to_int16_bytes

SPEECH_PATH = "/v1/audio/speech"
MODELS_PATH = "/v1/models"


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers())


async def _watch(request: Request, cancel) -> None:
    """Sets `cancel` when the client disconnects. The body was read already, so the next message is the end."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def _framed(speech: Speech, sample_rate: int, pcm: bytes, first: bool) -> bytes:
    """One chunk as the client asked: raw PCM, WAV (its header before the first chunk), or an SSE delta."""
    audio = (speech_api.wav_header(sample_rate) if first and speech.response_format == "wav" else b"") + pcm
    return speech_api.audio_delta(audio) if speech.stream_format == "sse" else audio


def _begin(speech: Speech, service: SpeechService) -> tuple[asyncio.Queue, Stream, object]:
    """Starts a request, POST's or the socket's: the queue this event loop reads its items from (the run loop's
    thread hands them over), its Stream, and its comparison."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    stream = Stream(speech, lambda item: loop.call_soon_threadsafe(items.put_nowait, item), to_int16_bytes,
                    speech_api.new_request_id())
    return items, stream, service.begin(speech, stream)


def attach(app: FastAPI, service: SpeechService) -> None:
    """Adds the API's routes in front of the app's other routes, so a Gradio app mounted at "/" never takes them."""
    before = len(app.router.routes)

    @app.get(MODELS_PATH)
    async def list_models() -> JSONResponse:
        return JSONResponse(speech_api.models(service.catalog))

    @app.post(SPEECH_PATH)
    async def create_speech(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"null")
        except ValueError as e:
            return error_response(ApiError(400, f"body: is not JSON ({e}); send a JSON object", None,
                                           "invalid_json"))
        try:
            speech = speech_api.parse(body, service.catalog)
        except ApiError as e:
            return error_response(e)
        items, stream, comparison = _begin(speech, service)
        watcher = asyncio.create_task(_watch(request, comparison.cancel))
        refused = await asyncio.to_thread(comparison.wait_planned)
        if refused is not None:
            watcher.cancel()
            return error_response(speech_api.from_lab(refused))
        first = await items.get()   # the rate goes in the headers, and a run that fails before audio is an error
        if first[0] != "audio":
            watcher.cancel()
            message = first[1] if first[0] == "failed" else "the run ended before any audio"
            return error_response(ApiError(500, f"model: {speech.model}: {message}", "model", "run_failed",
                                           "server_error"))
        sample_rate = first[1]
        headers = {"X-Sample-Rate": str(sample_rate), "X-Request-Id": stream.request_id, "Cache-Control": "no-store"}
        if not speech.stream:
            return await _whole(speech, first, items, watcher, comparison, headers)
        return StreamingResponse(_body(speech, first, items, watcher, comparison), headers=headers,
                                 media_type=speech_api.media_type(speech))

    @app.websocket(SPEECH_PATH)
    async def speech_socket(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                if not await _socket_request(websocket, await websocket.receive_text(), service):
                    return
        except WebSocketDisconnect:
            return

    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = added


async def _body(speech: Speech, first: tuple, items: asyncio.Queue, watcher: asyncio.Task, comparison):
    """The streamed answer: each chunk as it comes. A client gone mid-stream has set the cancel (the watcher); a
    body closed for any other reason sets it here."""
    ended = False
    try:
        yield _framed(speech, first[1], first[2], True)
        while True:
            kind, *rest = await items.get()
            if kind == "audio":
                yield _framed(speech, rest[0], rest[1], False)
            elif kind == "done" and speech.stream_format == "sse":
                yield speech_api.audio_done(rest[0])
            elif kind == "end":
                ended = True
                return
    finally:
        watcher.cancel()
        if not ended:
            comparison.cancel.set()


async def _whole(speech: Speech, first: tuple, items: asyncio.Queue, watcher: asyncio.Task, comparison,
                 headers: dict) -> Response:
    """`stream: false`: the whole file once the run is done, with its length."""
    sample_rate, parts, outcome = first[1], [first[2]], None
    try:
        while True:
            kind, *rest = await items.get()
            if kind == "audio":
                parts.append(rest[1])
            elif kind in ("done", "stopped", "failed"):
                outcome = (kind, rest[0])
            elif kind == "end":
                break
    finally:
        watcher.cancel()
    if outcome is None or outcome[0] != "done":
        message = outcome[1] if outcome and outcome[0] == "failed" else "the run was stopped before its end"
        return error_response(ApiError(500, f"model: {speech.model}: {message}", "model", "run_failed",
                                       "server_error"))
    pcm = b"".join(parts)
    head = speech_api.wav_header(sample_rate, len(pcm)) if speech.response_format == "wav" else b""
    return Response(head + pcm, media_type=speech_api.media_type(speech), headers=headers)


async def _socket_request(websocket: WebSocket, text: str, service: SpeechService) -> bool:
    """One request on the socket, answered as speech.started (rate and id), a binary frame of 16-bit PCM per chunk,
    and speech.audio.done, or an error event; the socket stays open for the next. While audio streams, a
    speech.cancel frame or the client's going stops the run at its next frame. False once the client has gone."""
    try:
        speech = speech_api.parse_socket(json.loads(text or "null"), service.catalog)
    except ValueError as e:
        return await _send_error(websocket, ApiError(400, f"body: is not JSON ({e}); send a JSON object", None,
                                                     "invalid_json"))
    except ApiError as e:
        return await _send_error(websocket, e)
    items, stream, comparison = _begin(speech, service)
    watcher = asyncio.create_task(_watch_socket(websocket, comparison.cancel))
    try:
        refused = await asyncio.to_thread(comparison.wait_planned)
        if refused is not None:
            return await _send_error(websocket, speech_api.from_lab(refused))
        started, done = False, None
        while True:
            kind, *rest = await items.get()
            if kind == "audio":
                if not started:
                    started = True
                    await websocket.send_json({"type": "speech.started", "request_id": stream.request_id,
                                               "sample_rate": rest[0], "format": "pcm_s16le"})
                await websocket.send_bytes(rest[1])
            elif kind == "done":   # sent at the end, once the model is free for this socket's next request
                done = {"type": "speech.audio.done", "request_id": stream.request_id, "audio_s": rest[0].get("audio_s")}
            elif kind in ("stopped", "failed"):
                message = rest[0] if kind == "failed" else "the run was stopped before its end"
                await _send_error(websocket, ApiError(500, f"model: {speech.model}: {message}", "model",
                                                      "run_failed" if kind == "failed" else "cancelled",
                                                      "server_error"))
            elif kind == "end":   # the loop has let go of the model
                if watcher.done() and (watcher.exception() is not None or watcher.result()):
                    return False
                if done is not None:
                    await websocket.send_json(done)
                return True
    except WebSocketDisconnect:
        comparison.cancel.set()
        return False
    finally:
        watcher.cancel()


async def _watch_socket(websocket: WebSocket, cancel) -> bool:
    """While a request streams: sets `cancel` when the client goes (returns True) or sends speech.cancel; any
    other frame is answered that one request runs at a time."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            cancel.set()
            return True
        try:
            kind = json.loads(message.get("text") or "null").get("type")
        except (ValueError, AttributeError):
            kind = None
        if kind == "speech.cancel":
            cancel.set()
        else:
            await _send_error(websocket, ApiError(409, "body: a request is still streaming on this socket; send "
                                                       "the next after its speech.audio.done, or send "
                                                       "{\"type\": \"speech.cancel\"} to stop it", None, "busy"))


async def _send_error(websocket: WebSocket, e: ApiError) -> bool:
    """An error event, OpenAI's error object inside; False if the client has gone."""
    try:
        await websocket.send_json({"type": "error", "status": e.status, **e.body()})
        return True
    except (WebSocketDisconnect, RuntimeError):
        return False
