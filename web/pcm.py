"""Low-latency PCM path to the browser: a hub the run loop publishes into, and the WebSocket that carries it.

The model's run loop (a plain worker thread) calls PcmHub.start_run / send_chunk / end_run; each call converts
what it must (float32 -> int16 bytes) and hands the message to the server's asyncio loop with
call_soon_threadsafe, so publishing never blocks on the network. The page (web/player.js) plays the chunks with
Web Audio and answers with a "report" per run (when the first audible sample was played, relative to the server's
request stamp) and a "played" message when the run's audio ended; the worker waits for those with wait_report /
wait_played.

Wire format (one WebSocket per page, /lab/pcm?listener=<id>):
  text   {"type":"run", run_id, slot, sample_rate, t_request_s, label, transport, ...}
  binary uint32 LE header length N | N bytes UTF-8 JSON header | int16 LE mono PCM
         header: {run_id, slot, index, sample_rate, t_ready_s, t_sent_s, audible_at}
  text   {"type":"end", run_id, slot, chunks, samples, ...}
  text   {"type":"done", comparison_id, stopped}            a comparison this page started has ended
  text   {"type":"pong", t_client_ms, t_server_s}     (answer to the page's {"type":"ping", t_client_ms})
From the page, besides ping, "report" and "played": commands, handed to `PcmHub.on_command(listener, message)`:
  text   {"type":"start", id, kind, inputs, t_click_ms, t_click_s}   a click on Compare or Play: its run starts now
  text   {"type":"stop"}                                             Stop: this page's comparisons end
All server stamps are time.perf_counter() seconds.

No Gradio import here: web/server.py mounts the Gradio app next to these routes.
"""
from __future__ import annotations

import asyncio
import json
import logging
import struct
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

import numpy as np
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse

from lab.audio import pcm16

log = logging.getLogger(__name__)

WS_PATH = "/lab/pcm"
PLAYER_JS_PATH = "/lab/player.js"
PLAYER_JS_FILE = Path(__file__).with_name("player.js")
# Reports and "played" notes kept for wait_*; older ones are forgotten so a long-lived server does not grow.
MAX_KEPT_RUNS = 512


def encode_chunk(header: dict, pcm_int16_le: bytes) -> bytes:
    """One binary message: header length, JSON header, PCM."""
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return struct.pack("<I", len(head)) + head + pcm_int16_le


def decode_chunk(message: bytes) -> tuple[dict, np.ndarray]:
    """Inverse of encode_chunk (for tests and tools): the header and the int16 samples."""
    (n,) = struct.unpack_from("<I", message, 0)
    header = json.loads(message[4:4 + n].decode("utf-8"))
    return header, np.frombuffer(message[4 + n:], dtype="<i2")


def to_int16_bytes(samples: np.ndarray) -> bytes:
    """float32 mono in [-1, 1] -> little-endian int16 bytes (clipped, not wrapped)."""
    return pcm16(samples).tobytes()


class _Connection:
    """One page's socket: its loop, an outgoing queue drained by one sender task, and a send lock."""

    def __init__(self, websocket: WebSocket, loop: asyncio.AbstractEventLoop):
        self.websocket = websocket
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()  # unbounded: a put never waits
        # The sender task and the immediate pong answers both send; one frame at a time.
        self.send_lock = asyncio.Lock()


class _Kept:
    """run_id -> message received from the page, with a condition the waiting worker threads sleep on."""

    def __init__(self, cond: threading.Condition):
        self._cond = cond
        self._items: OrderedDict[str, dict] = OrderedDict()

    def put(self, run_id: Any, item: dict) -> None:
        with self._cond:
            self._items[str(run_id)] = item
            while len(self._items) > MAX_KEPT_RUNS:
                self._items.popitem(last=False)
            self._cond.notify_all()

    def wait(self, run_id: Any, timeout_s: float) -> dict | None:
        key = str(run_id)
        deadline_s = time.monotonic() + timeout_s
        with self._cond:
            while key not in self._items:
                left_s = deadline_s - time.monotonic()
                if left_s <= 0:
                    return None
                self._cond.wait(left_s)
            return self._items[key]

    def get(self, run_id: Any) -> dict | None:
        with self._cond:
            return self._items.get(str(run_id))


class PcmHub:
    """Routes runs' PCM from worker threads to the listening pages and the pages' reports back.

    Thread-safe. Publishing (start_run, send_chunk, end_run) costs a dict, the int16 conversion and one
    call_soon_threadsafe; a message for a listener that is not connected is dropped and counted, never raised.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: dict[str, _Connection] = {}
        self._runs: OrderedDict[str, tuple[int, int]] = OrderedDict()  # run_id -> (slot, sample_rate)
        self._reports = _Kept(threading.Condition())
        self._played = _Kept(threading.Condition())
        self.dropped = 0  # messages published for listeners that were not connected
        self.pings = 0
        # A page's commands (a click's start, Stop): called on the server's event loop, so it must hand the work
        # to a thread and return at once.
        self.on_command: Callable[[str, dict], None] | None = None

    # -- publishing (worker thread) -------------------------------------------------------------------------
    def start_run(self, listener: str, run_id: Any, slot: int, sample_rate: int, t_request_s: float,
                  label: str = "", transport: str = "pcm", **extra: Any) -> bool:
        """Announce a run: the page's player for `slot` resets to position 0 and waits for audio.

        extra keys (JSON-safe) travel in the message too, e.g. stream_path for transport "gradio".
        """
        with self._lock:
            self._runs[str(run_id)] = (int(slot), int(sample_rate))
            while len(self._runs) > MAX_KEPT_RUNS:
                self._runs.popitem(last=False)
        message = {"type": "run", "run_id": run_id, "slot": int(slot), "sample_rate": int(sample_rate),
                   "t_request_s": float(t_request_s), "label": str(label), "transport": str(transport), **extra}
        return self._publish(listener, ("text", message, None))

    def send_chunk(self, listener: str, run_id: Any, index: int, samples: np.ndarray, t_ready_s: float,
                   audible_at: int = -1, *, slot: int | None = None, sample_rate: int | None = None) -> bool:
        """One chunk of float32 mono audio. audible_at: index inside this chunk of the run's first audible
        sample, or -1. slot and sample_rate default to the run's (from start_run). t_sent_s is stamped on the
        server loop when the frame is handed to the socket."""
        run_slot, run_rate = self._run_meta(run_id)
        slot = run_slot if slot is None else slot
        sample_rate = run_rate if sample_rate is None else sample_rate
        header = {"run_id": run_id, "slot": int(slot), "index": int(index), "sample_rate": int(sample_rate),
                  "t_ready_s": float(t_ready_s), "audible_at": int(audible_at)}
        if not self.connected(listener):  # skip the conversion for nobody
            return self._drop()
        return self._publish(listener, ("chunk", header, to_int16_bytes(samples)))

    def end_run(self, listener: str, run_id: Any, chunks: int, samples: int, **extra: Any) -> bool:
        """The run has no more chunks: `chunks` sent in all, `samples` in all. extra keys travel too, e.g.
        slot, or first_audible_s for transport "gradio"."""
        message = {"type": "end", "run_id": run_id, "slot": self._run_meta(run_id)[0], "chunks": int(chunks),
                   "samples": int(samples), **extra}
        return self._publish(listener, ("text", message, None))

    def publish_text(self, listener: str, message: dict) -> bool:
        """Any other text message to the page (JSON-safe), in order with the runs' messages."""
        return self._publish(listener, ("text", message, None))

    # -- waiting for the page (worker thread) ----------------------------------------------------------------
    def wait_report(self, run_id: Any, timeout_s: float) -> dict | None:
        """The page's report for run_id (it may have arrived already), or None after timeout_s."""
        return self._reports.wait(run_id, timeout_s)

    def wait_played(self, run_id: Any, timeout_s: float) -> dict | None:
        """The page's note that run_id's audio finished playing, or None after timeout_s."""
        return self._played.wait(run_id, timeout_s)

    def report(self, run_id: Any) -> dict | None:
        return self._reports.get(run_id)

    def connected(self, listener: str) -> bool:
        with self._lock:
            return listener in self._connections

    def listeners(self) -> list[str]:
        with self._lock:
            return list(self._connections)

    # -- internals -------------------------------------------------------------------------------------------
    def _run_meta(self, run_id: Any) -> tuple[int, int]:
        with self._lock:
            return self._runs.get(str(run_id), (0, 24000))

    def _drop(self) -> bool:
        with self._lock:
            self.dropped += 1
        return False

    def _publish(self, listener: str, item: tuple) -> bool:
        with self._lock:
            connection = self._connections.get(listener)
        if connection is None:
            return self._drop()
        try:
            connection.loop.call_soon_threadsafe(connection.queue.put_nowait, item)
        except RuntimeError:  # the loop closed under us (server shutting down)
            return self._drop()
        return True

    def _register(self, listener: str, connection: _Connection) -> None:
        # A reconnect with the same id replaces the old socket: the page only listens on its newest one.
        with self._lock:
            self._connections[listener] = connection

    def _unregister(self, listener: str, connection: _Connection) -> None:
        with self._lock:
            if self._connections.get(listener) is connection:
                del self._connections[listener]

    def _on_page_message(self, listener: str, message: dict) -> None:
        kind = message.get("type")
        if kind in ("start", "stop") and self.on_command is not None:
            message["t_received_s"] = time.perf_counter()
            self.on_command(listener, message)
        elif kind == "report" and "run_id" in message:
            message["t_received_s"] = time.perf_counter()
            self._reports.put(message["run_id"], message)
        elif kind == "played" and "run_id" in message:
            message["t_received_s"] = time.perf_counter()
            self._played.put(message["run_id"], message)


async def _send_text(connection: _Connection, message: dict) -> None:
    async with connection.send_lock:
        await connection.websocket.send_text(json.dumps(message, separators=(",", ":")))


async def _sender(connection: _Connection) -> None:
    """Drain the queue in publish order; chunk headers get t_sent_s right before their frame goes out."""
    try:
        while True:
            kind, payload, pcm = await connection.queue.get()
            if kind == "chunk":
                async with connection.send_lock:
                    payload["t_sent_s"] = time.perf_counter()
                    await connection.websocket.send_bytes(encode_chunk(payload, pcm))
            else:
                await _send_text(connection, payload)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass  # the page went away; _serve_socket unregisters it


def _parse(text: str | None) -> dict | None:
    if not text:
        return None
    try:
        message = json.loads(text)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


async def _serve_socket(websocket: WebSocket, hub: PcmHub) -> None:
    listener = websocket.query_params.get("listener", "")
    if not listener or len(listener) > 128:
        await websocket.close(code=1008)
        return
    await websocket.accept()
    connection = _Connection(websocket, asyncio.get_running_loop())
    hub._register(listener, connection)
    sender = asyncio.create_task(_sender(connection))
    try:
        while True:
            frame = await websocket.receive()
            if frame["type"] == "websocket.disconnect":
                break
            message = _parse(frame.get("text"))
            if message is None:
                continue  # binary or malformed: the page only sends JSON text
            if message.get("type") == "ping":
                # Answer at once, stamped as late as possible: the page halves the round trip around it.
                async with connection.send_lock:
                    pong = {"type": "pong", "t_client_ms": message.get("t_client_ms"),
                            "t_server_s": time.perf_counter()}
                    await websocket.send_text(json.dumps(pong))
                hub.pings += 1
            else:
                hub._on_page_message(listener, message)
    except (WebSocketDisconnect, RuntimeError, OSError):
        pass
    finally:
        hub._unregister(listener, connection)
        sender.cancel()


def attach(app: FastAPI, hub: PcmHub) -> None:
    """Add the WebSocket route and GET /lab/player.js to app.

    The routes go to the front of the route list, so they win over a Gradio app mounted at "/" whether attach
    runs before or after mount_gradio_app.
    """
    before = len(app.router.routes)

    @app.websocket(WS_PATH)
    async def lab_pcm_socket(websocket: WebSocket) -> None:
        await _serve_socket(websocket, hub)

    @app.get(PLAYER_JS_PATH, include_in_schema=False)
    async def lab_player_js() -> FileResponse:
        return FileResponse(PLAYER_JS_FILE, media_type="text/javascript")

    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = added
