"""Screenshots of the page for the README: the first screen, the compare view, the blind A/B tab and history.

    python docs/screenshots.py                      # starts `python app.py` on a free port, shoots, stops it
    python docs/screenshots.py --url http://127.0.0.1:7860/   # or against a server already running

It clicks what a first-time visitor would: Compare on the default presets (on a CPU, hibari sentence by sentence
against hibari whole), a blind pair as it streams and a vote, then the History tab. Chromium is Debian's (`chromium`), driven
through Playwright's Python package; `playwright install` is not needed.
"""
from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


def start_server() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="lab-screens-")
    env = {**os.environ, "PORT": str(port), "LAB_HISTORY": os.path.join(tmp, "history.jsonl"),
           "LAB_VOTES": os.path.join(tmp, "votes.jsonl"), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(360):
        try:
            urllib.request.urlopen(url, timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"app.py did not come up on {url}")


def shoot(url: str, out_dir: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(url)
        page.wait_for_selector("#compare-btn")
        page.wait_for_function("() => window.labAudio && window.labAudio.connected")
        page.screenshot(path=os.path.join(out_dir, "first.png"), full_page=True)
        page.click("#compare-btn")
        page.wait_for_selector("#overall:has-text('running')", timeout=60_000)
        page.wait_for_selector("#overall:has-text('done:')", timeout=600_000)
        page.wait_for_selector("#chart-main img")
        page.screenshot(path=os.path.join(out_dir, "compare.png"), full_page=True)

        page.get_by_role("tab", name="Blind A/B").click()
        page.click("#ab-play")
        page.wait_for_selector("#vote-a:not([disabled])", timeout=300_000)
        page.click("#vote-a")
        page.wait_for_selector("#ab-msg:has-text('A was')")
        page.screenshot(path=os.path.join(out_dir, "ab.png"), full_page=True)

        page.get_by_role("tab", name="History").click()
        page.wait_for_selector("#h-chart img", timeout=60_000)
        page.screenshot(path=os.path.join(out_dir, "history.png"), full_page=True)
        browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running app; default: start one")
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args()
    proc = None
    url = args.url
    if not url:
        proc, url = start_server()
    try:
        shoot(url, args.out)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
    print(f"wrote first.png, compare.png, ab.png, history.png in {args.out}")


if __name__ == "__main__":
    main()
