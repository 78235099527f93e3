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
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from tests.harness import AppProcess  # noqa: E402
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--autoplay-policy=no-user-gesture-required"]


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
    app = None if args.url else AppProcess(tempfile.mkdtemp(prefix="lab-screens-"))
    try:
        shoot(args.url or app.url, args.out)
    finally:
        if app:
            app.stop()
    print(f"wrote first.png, compare.png, ab.png, history.png in {args.out}")


if __name__ == "__main__":
    main()
