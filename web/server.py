"""How `python app.py` serves: one FastAPI app with the PCM routes (web.pcm.attach), the speech API's
(web.api.attach: /v1/audio/speech, /v1/models) and the Gradio Blocks mounted at "/", run by uvicorn. Gradio's own
launch() cannot host the extra WebSocket route, so mount_gradio_app does it.
"""
from __future__ import annotations

import inspect
import os
from typing import Any

from fastapi import FastAPI

from web import api as speech_routes
from web.gradio_adapter import skip_without_rebuilding
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


def serve(demo, host: str, port: int, hub: PcmHub, api=None, **launch_kwargs: Any) -> None:
    """Blocks until the server stops (Ctrl-C). Hugging Face Spaces wants host "0.0.0.0", port 7860."""
    import uvicorn

    app = build_app(demo, hub, host=host, port=port, api=api, **launch_kwargs)
    print(f"* Running on http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", flush=True)
    # ws_ping keeps idle sockets alive through proxies (Spaces); the page reconnects anyway if one drops.
    uvicorn.run(app, host=host, port=port, log_level="warning", ws_ping_interval=20, ws_ping_timeout=20)
