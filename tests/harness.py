"""The page's test harness: `python app.py` in a subprocess, as the page's tests, the browser benchmark, the soak and
the screenshots start it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AppProcess:
    """`python app.py` in a subprocess on a free loopback port, once it serves, with its history, votes and Gradio
    files in `folder`: what the page's tests, the browser benchmark and the screenshots start. `env`: variables
    set for this server only, over this process's own. `cwd`: the tree whose app.py runs (the browser benchmark
    starts an earlier tree's too); `wait=False` returns at once, to start several servers side by side, and
    `wait_serving()` then waits for each."""

    def __init__(self, folder: str, presets_dir: str | None = None, timeout_s: float = 180,
                 env: dict[str, str] | None = None, cwd: str = ROOT, wait: bool = True):
        os.makedirs(folder, exist_ok=True)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
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
        self.proc = subprocess.Popen([sys.executable, "app.py"], cwd=cwd, env=variables, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        if wait:
            self.wait_serving(timeout_s)

    def wait_serving(self, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=2)
                return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"app.py did not serve {self.url}; its log ends:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return open(self.log_path).read()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:   # uvicorn's graceful shutdown waits on Gradio's open streams: a test server need not
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
