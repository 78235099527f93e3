"""Checks tap.js on synthetic sound, where the true answer is known, in the same headless Chromium as run.py.

    python benchmarks/browser/check_tap.py

A blank page on a loopback server (AudioWorklet needs a secure context: 127.0.0.1 is one) gets tap.js as an init
script and plays, after a click on a button with id compare-btn:

  webaudio  buffers through a GainNode to the destination, each 0.30 s of silence then 0.40 s of a 440 Hz tone
            (RMS -20, -45 and -55 dBFS), 1 s apart. The tap must find an onset at the tone's first sample for the
            first two and none for the third (below -50 dBFS). The truth is the tone's context time (where it was
            scheduled), so this checks the detection and its frame arithmetic, not the browser's clock mapping;
            the difference on the performance clock (the tap's mapping when the onset came against the mapping
            when the tone was scheduled) is printed too: it moves when the audio thread fell behind meanwhile
            (the sound really came later), which a loaded 2-core machine does.
  gap       two tones 0.20 s apart (less than the 300 ms of quiet an onset needs): one onset, not two.
  media     an <audio> element playing a WAV (0.50 s of silence, then the tone at -20 dBFS). The truth here is the
            element's first 'playing' event + 0.50 s + the page context's output latency (how web/player.js
            estimates the Gradio path); the difference is the capture path's own latency and the event's lag.
  alive     the tap runs with no output connection (it has none: numberOfOutputs 0) and no input: its processor
            keeps counting frames.

Prints each check's error in ms and exits non-zero when one fails.
"""
from __future__ import annotations

import functools
import http.server
import os
import shutil
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--autoplay-policy=no-user-gesture-required"]
TOLERANCE_MS = 3.0    # the 1 ms hop, and a 440 Hz sine's first millisecond

PAGE = """<!doctype html><meta charset=utf-8><title>tap check</title>
<button id=compare-btn>Compare</button><audio id=player-0></audio>
<script>
const ctx = new AudioContext({latencyHint: "interactive"});
const gain = ctx.createGain(); gain.connect(ctx.destination);
function tone(seconds, silenceS, dbfs, sr) {
  const n = Math.round(seconds * sr), lead = Math.round(silenceS * sr), a = Math.pow(10, dbfs / 20) * Math.SQRT2;
  const x = new Float32Array(n);
  for (let i = lead; i < n; i++) x[i] = a * Math.sin(2 * Math.PI * 440 * (i - lead) / sr);
  return x;
}
function perfAt(t) { const ts = ctx.getOutputTimestamp(); return ts.performanceTime + (t - ts.contextTime) * 1000; }
window.truth = [];
function play(x, at, label, leadS) {
  const b = ctx.createBuffer(1, x.length, ctx.sampleRate); b.getChannelData(0).set(x);
  const s = ctx.createBufferSource(); s.buffer = b; s.connect(gain); s.start(at);
  window.truth.push({label, t_ms: perfAt(at + leadS), ctx_time_s: at + leadS});
}
document.getElementById("compare-btn").addEventListener("click", () => {
  const t0 = ctx.currentTime + 0.1, sr = ctx.sampleRate;
  play(tone(0.7, 0.3, -20, sr), t0, "-20 dBFS", 0.3);
  play(tone(0.7, 0.3, -45, sr), t0 + 1.0, "-45 dBFS", 0.3);
  play(tone(0.7, 0.3, -55, sr), t0 + 2.0, "-55 dBFS (inaudible)", 0.3);
  play(tone(0.2, 0.0, -20, sr), t0 + 3.0, "gap: first", 0.0);
  play(tone(0.2, 0.0, -20, sr), t0 + 3.4, "gap: second (0.2 s after)", 0.0);
});
function wav(seconds, silenceS, dbfs) {
  const sr = 48000, x = tone(seconds, silenceS, dbfs, sr), buf = new ArrayBuffer(44 + 2 * x.length), v = new DataView(buf);
  const w = (o, s) => [...s].forEach((c, i) => v.setUint8(o + i, c.charCodeAt(0)));
  w(0, "RIFF"); v.setUint32(4, 36 + 2 * x.length, true); w(8, "WAVEfmt "); v.setUint32(16, 16, true);
  v.setUint16(20, 1, true); v.setUint16(22, 1, true); v.setUint32(24, sr, true); v.setUint32(28, 2 * sr, true);
  v.setUint16(32, 2, true); v.setUint16(34, 16, true); w(36, "data"); v.setUint32(40, 2 * x.length, true);
  x.forEach((s, i) => v.setInt16(44 + 2 * i, Math.round(s * 32767), true));
  return URL.createObjectURL(new Blob([buf], {type: "audio/wav"}));
}
window.playMedia = () => {
  const el = document.getElementById("player-0");
  el.addEventListener("playing", e => {
    const lat = ctx.outputLatency > 0 ? ctx.outputLatency : ctx.baseLatency;
    window.truth.push({label: "media", t_ms: e.timeStamp + 500 + lat * 1000});
  }, {once: true});
  el.src = wav(1.2, 0.5, -20); el.play();
};
</script>"""


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):   # noqa: N802
        body = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def first_onset_after(onsets: list[dict], t_ms: float, path: str | None = None) -> dict | None:
    later = [o for o in onsets if o["t_ms"] >= t_ms and (path is None or o["path"] == path)]
    return min(later, key=lambda o: o["t_ms"]) if later else None


def main() -> int:
    from playwright.sync_api import sync_playwright

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    failures = []

    def check(name: str, ok: bool, detail: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
        if not ok:
            failures.append(name)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.add_init_script(path=os.path.join(HERE, "tap.js"))
        page.goto(url)
        page.wait_for_function("() => labTap.snapshot().contexts.some(c => c.ready)", timeout=10_000)
        frame_a = page.evaluate("labTap.snapshot().contexts[0].tap_frame")
        page.wait_for_timeout(1500)
        snap = page.evaluate("labTap.snapshot()")
        frame_b = snap["contexts"][0]["tap_frame"]
        check("alive", frame_b is not None and frame_a is not None and frame_b > frame_a,
              f"the processor counted frames {frame_a} -> {frame_b} with no input and no output connection "
              f"(context {snap['contexts'][0]['state']}, {snap['contexts'][0]['sample_rate']} Hz)")
        check("no onset in silence", not snap["onsets"], f"{len(snap['onsets'])} onsets before any sound")

        page.click("#compare-btn")
        page.wait_for_timeout(4500)
        snap = page.evaluate("labTap.snapshot()")
        truth = page.evaluate("truth")
        clicks = [c for c in snap["clicks"] if c["type"] == "click"]
        check("click", len(clicks) == 1 and clicks[0]["button"] == "compare-btn" and clicks[0]["trusted"],
              f"{clicks[:1]}; listener ran {clicks[0]['seen_ms'] - clicks[0]['t_ms']:.1f} ms after the event's stamp"
              if clicks else "no click recorded")
        onsets = snap["onsets"]
        for t in truth:
            if "gap: second" in t["label"]:
                continue
            later = [o for o in onsets if o["ctx_time_s"] >= t["ctx_time_s"] - 0.05]
            found = min(later, key=lambda o: o["ctx_time_s"]) if later else None
            within = found is not None and abs(found["ctx_time_s"] - t["ctx_time_s"]) < 0.2
            if "inaudible" in t["label"]:
                check(t["label"], not within, "no onset" if not within else f"onset at {found['level_dbfs']:.1f} dBFS")
                continue
            err = None if not within else (found["ctx_time_s"] - t["ctx_time_s"]) * 1000
            check(t["label"], err is not None and abs(err) <= TOLERANCE_MS,
                  "no onset" if err is None else f"onset {err:+.1f} ms from the true first sample in context time; "
                  f"{found['t_ms'] - t['t_ms']:+.1f} ms on the performance clock against the time predicted when "
                  f"it was scheduled (level {found['level_dbfs']:.1f} dBFS)")
        gap = next(t for t in truth if t["label"].startswith("gap: first"))
        in_gap = [o for o in onsets if gap["ctx_time_s"] - 0.05 <= o["ctx_time_s"] <= gap["ctx_time_s"] + 0.8]
        check("gap", len(in_gap) == 1, f"{len(in_gap)} onset(s) for two tones 0.2 s apart (one expected)")
        check("offsets", len(snap["offsets"]) >= 3, f"{len(snap['offsets'])} ends of loud stretches seen")
        srcs = snap["sources"]
        check("sources", len(srcs) == 5, f"{len(srcs)} scheduled buffers recorded (5 played)")

        page.evaluate("labTap.reset()")
        page.evaluate("playMedia()")
        page.wait_for_timeout(2500)
        snap = page.evaluate("labTap.snapshot()")
        truth = [t for t in page.evaluate("truth") if t["label"] == "media"]
        found = first_onset_after(snap["onsets"], truth[0]["t_ms"] - 300, "media") if truth else None
        err = None if found is None else found["t_ms"] - truth[0]["t_ms"]
        check("media", err is not None and -50 <= err <= 250,
              "no onset" if err is None else f"captured onset {err:+.1f} ms from 'playing' + lead + output latency "
                                             f"({found['source']}, level {found['level_dbfs']:.1f} dBFS)")
        check("errors", not snap["errors"], f"{snap['errors'][:3]}")
        browser.close()
    server.shutdown()
    print("all checks passed" if not failures else f"failed: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
