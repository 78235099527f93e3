"""How `python app.py` serves: one FastAPI app with the PCM routes (web.pcm.attach), the speech API's
(web.api.attach: /v1/audio/speech, /v1/models) and the Gradio Blocks mounted at "/", run by uvicorn. Gradio's own
launch() cannot host the extra WebSocket route, so mount_gradio_app does it.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Callable

from fastapi import FastAPI

from web import api as speech_routes
from web.pcm import PLAYER_JS_PATH, PcmHub, attach

# launch() keywords that mean nothing when uvicorn runs the app here (they belong to gradio's own server loop).
_LAUNCH_ONLY = {"inline", "inbrowser", "share", "debug", "quiet", "prevent_thread_lock", "show_api",
                "max_threads", "share_server_address", "share_server_protocol", "share_server_tls_certificate",
                "strict_cors", "server_name", "server_port"}

PLAYER_SCRIPT_TAG = f'<script src="{PLAYER_JS_PATH}"></script>'


def build_app(demo, hub: PcmHub, host: str = "0.0.0.0", port: int = 7860, api=None, **launch_kwargs: Any) -> FastAPI:
    """The FastAPI app: PCM routes and the speech API (`api`, a lab.serving.speech_api.SpeechService) first, Gradio
    at "/". Call demo.queue(...) before, as before launch().

    launch_kwargs are mount_gradio_app's keywords (max_file_size, allowed_paths, theme, css, head, ...); the
    page's <head> also gets the player.js script tag, so window.labAudio exists on the Gradio page.
    """
    import gradio as gr

    accepted = set(inspect.signature(gr.mount_gradio_app).parameters)
    unknown = set(launch_kwargs) - accepted - _LAUNCH_ONLY
    if unknown:
        raise TypeError(f"serve(): mount_gradio_app takes no {sorted(unknown)}")
    kwargs = {k: v for k, v in launch_kwargs.items() if k in accepted}
    kwargs["head"] = (kwargs.get("head") or "") + PLAYER_SCRIPT_TAG
    if os.environ.get("LAB_GRADIO_SKIPS") != "rebuild":   # "rebuild": Gradio's own way, to measure against
        skip_without_rebuilding(demo)
    app = FastAPI()
    attach(app, hub)
    if api is not None:
        speech_routes.attach(app, api)
    return gr.mount_gradio_app(app, demo, path="/", server_name=host, server_port=port, **kwargs)


BARE_SKIP = {"__type__": "update"}   # what gr.skip() returns, and what Gradio sends the page for one


def skip_without_rebuilding(demo) -> None:
    """Post-process only the outputs an update changes. Gradio 6.31 handles an output left out of an update (or
    given gr.skip()) as a property update: it builds a new copy of the component and re-derives its config, JSON
    schema included, for every such output of every update, and on the server's event loop, which every page's
    updates and the PCM socket wait on. The Compare handler has 55 outputs and changes one or two per update, so
    each update cost 25 ms of event loop instead of 1 (docs/DESIGN.md, Serving many pages); 16 pages comparing
    kept the loop busy and their streams stalled. The copy is identical to the component, so leaving it out
    changes nothing the page is sent (tests/test_pcm.py checks that against Gradio's own result)."""
    import copy

    full = demo.postprocess_data

    async def postprocess_data(block_fn, predictions, state):
        outputs = list(block_fn.outputs)
        if isinstance(predictions, dict) and predictions and all(hasattr(k, "_id") for k in predictions):
            given = {k._id: v for k, v in predictions.items()}
            values = [given.get(b._id, BARE_SKIP) for b in outputs]
        elif isinstance(predictions, (list, tuple)) and len(predictions) == len(outputs):
            values = list(predictions)
        else:   # one output, gr.skip() for all, or a shape Gradio itself will judge
            return await full(block_fn, predictions, state)
        changed = [i for i, v in enumerate(values) if not (isinstance(v, dict) and v == BARE_SKIP)]
        if block_fn.batch or len(outputs) < 2 or len(changed) == len(outputs):
            return await full(block_fn, predictions, state)
        sent = {}
        if changed:
            part = copy.copy(block_fn)
            part.outputs = [outputs[i] for i in changed]
            # One output's value goes bare: Gradio wraps a single output's prediction in a list itself.
            part_values = [values[i] for i in changed] if len(changed) > 1 else values[changed[0]]
            sent = dict(zip(changed, await full(part, part_values, state)))
        return [sent[i] if i in sent else None if outputs[i].stateful else dict(BARE_SKIP) for i in range(len(outputs))]

    demo.postprocess_data = postprocess_data


def gone_check(demo, request) -> Callable[[], bool]:
    """A check the run loop calls per event: True once Gradio's queue has let go of this request's job (its client
    disconnected or cancelled it). Gradio closes the handler itself too, but only after the update in flight has
    been post-processed (an audio chunk through ffmpeg), about 2 s under load: this way generation stops at its
    next frame. Reads the queue's jobs (gradio.queueing.Event.alive); a request not found there is never gone."""
    found: list = []

    def gone() -> bool:
        if not found:
            queue = getattr(demo, "_queue", None)
            jobs = [e for events in (getattr(queue, "active_jobs", None) or []) if events for e in events]
            found.extend(e for e in jobs if getattr(request, "request", None) is not None
                         and getattr(e, "request", None) is request.request)
        return bool(found) and not found[0].alive

    return gone


def forget_streams(demo, session_hash: str | None) -> None:
    """Drop the streamed audio Gradio keeps for this page's earlier runs. Gradio keeps every run's HLS segments
    until the page's session ends, so a tab (or an API client, which has no heartbeat) that compares again and
    again grew the server by about 2 MB a compare; a new compare resets the players, so the old ones go."""
    streams = getattr(demo, "pending_streams", None)
    if session_hash and streams is not None:
        for run in streams.pop(session_hash, {}).values():
            for stream in run.values():
                stream.end_stream()


def serve(demo, host: str, port: int, hub: PcmHub, api=None, **launch_kwargs: Any) -> None:
    """Blocks until the server stops (Ctrl-C). Hugging Face Spaces wants host "0.0.0.0", port 7860."""
    import uvicorn

    app = build_app(demo, hub, host=host, port=port, api=api, **launch_kwargs)
    print(f"* Running on http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", flush=True)
    # ws_ping keeps idle sockets alive through proxies (Spaces); the page reconnects anyway if one drops.
    uvicorn.run(app, host=host, port=port, log_level="warning", ws_ping_interval=20, ws_ping_timeout=20)


class AppProcess:
    """`python app.py` in a subprocess on a free loopback port, once it serves, with its history, votes and Gradio
    files in `folder`: what the page's tests, the browser benchmark and the screenshots start. `env`: variables
    set for this server only, over this process's own."""

    def __init__(self, folder: str, presets_dir: str | None = None, timeout_s: float = 180,
                 env: dict[str, str] | None = None):
        import socket
        import subprocess
        import sys
        import time
        import urllib.request

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.history, self.votes = os.path.join(folder, "history.jsonl"), os.path.join(folder, "votes.jsonl")
        self.log_path, self.url = os.path.join(folder, "server.log"), f"http://127.0.0.1:{port}/"
        variables = {**os.environ, "PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "HF_HUB_OFFLINE": "1",
                     "GRADIO_ANALYTICS_ENABLED": "False", "LAB_HISTORY": self.history, "LAB_VOTES": self.votes,
                     "GRADIO_TEMP_DIR": os.path.join(folder, "gradio")}
        variables.pop("LAB_PRESETS_DIR", None)
        if presets_dir:
            variables["LAB_PRESETS_DIR"] = presets_dir
        variables.update(env or {})
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=root, env=variables, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"app.py did not serve {self.url}; its log:\n{open(self.log_path).read()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        import subprocess

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
