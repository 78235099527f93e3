"""A load bench for any speech server that speaks OpenAI's `POST /v1/audio/speech` (this lab's, vLLM-Omni's,
Kokoro-FastAPI's, ...), measured with the lab's own definitions (docs/METRICS.md, "A speech server under load").

    python -m lab.bench --endpoint http://127.0.0.1:7860 --model hibari --concurrency 1,2,4 --requests 20
    python -m lab.bench --endpoint http://HOST:PORT --model csm-batched-cuda-graphs:random --rate 25,50,100 \\
        --requests 3000 --max-audio-s 6 --processes 8
    python -m lab.bench --endpoint URL --model NAME --slo-ttfa-ms 150 --search rate --search-range 10,200
    python -m lab.bench --endpoint inproc --model hibari --concurrency 1      # the engine itself, no HTTP

Each request's audio is read as it arrives, by a small HTTP/1.1 client on asyncio (no client library between
the socket and the clock), and stamped per piece: TTFB is the first audio byte past any WAV header, audible TTFA
the piece that holds the first audible sample, and a real-time player simulated over the pieces gives underruns
and the worst gap (continuity C50/C100/C200). Load is closed-loop concurrency, open-loop Poisson rates, or a
search for the highest load that meets an SLO. `--processes N` spreads the load over N client processes (each
its share of the concurrency or of the rate), each recording its own CPU use, so a big machine's server is not
measured through a saturated client. `--endpoint inproc` runs the same load straight into the engine in this
process: against the server, it shows what HTTP costs.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import resource
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np

from lab.measure import report
from lab.errors import LabError
from lab.measure.metrics import audible_index, stalls, summarize

CONTINUITY_MS = (50, 100, 200)          # C50/C100/C200: share of requests whose worst gap stays under each
CLIENT_BOUND_CPU = 0.8                  # a client process busier than this share of one core may be the bottleneck
DEFAULT_TEXTS = (  # Harvard sentences (public domain), about 2-3 s each in hibari's voice
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
)
START_DELAY_S = 1.0     # client processes start, then all begin together at this offset


# -- one request's audio, as it arrives ------------------------------------------------------------------------------
@dataclass
class Received:
    """One request's answer, stamped as it came (perf_counter s: CLOCK_MONOTONIC, shared by the processes)."""
    text: str
    due_s: float                    # its arrival: when it was due (open loop) or sent (closed loop)
    sent_s: float = 0.0
    status: int = 0
    error: str | None = None
    sample_rate: int | None = None
    pieces: list = field(default_factory=list)          # (stamp, samples) of each piece of audio received
    first_audible: tuple[int, float] | None = None      # (piece index, seconds into the stream)
    keep_audio: bool = False
    audio: list = field(default_factory=list)           # int16 arrays, when kept for WER
    _head: bytes = b""                                  # a WAV header not yet whole
    _odd: bytes = b""                                   # half a sample, split between two pieces
    _wav: bool = False
    _samples: int = 0

    def expect_wav(self) -> None:
        self._wav = True

    def feed(self, data: bytes, stamp: float) -> None:
        """Body bytes as received: the WAV header is read off first, then each piece is audio."""
        if self._wav:
            self._head += data
            data = self._read_header()
            if data is None:
                return
        data = self._odd + data
        whole = len(data) // 2 * 2
        self._odd = data[whole:]
        if whole:
            self.add(np.frombuffer(data[:whole], "<i2"), stamp)

    def add(self, pcm16: np.ndarray, stamp: float) -> None:
        """One piece of 16-bit audio, received at `stamp`."""
        if self.first_audible is None and self.sample_rate:
            at = audible_index(pcm16.astype(np.float32) / 32768.0, self.sample_rate)
            if at >= 0:
                self.first_audible = (len(self.pieces), (self._samples + at) / self.sample_rate)
        self.pieces.append((stamp, len(pcm16)))
        self._samples += len(pcm16)
        if self.keep_audio:
            self.audio.append(pcm16)

    def _read_header(self) -> bytes | None:
        """The audio after a RIFF/WAVE header once the header is whole (its fmt chunk sets the rate), else None."""
        head = self._head
        if len(head) < 12:
            return None
        if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            raise ValueError("response_format wav: the body does not start with a RIFF/WAVE header")
        at = 12
        while len(head) >= at + 8:
            kind, size = head[at:at + 4], struct.unpack_from("<I", head, at + 4)[0]
            if kind == b"data":
                self._wav, self._head = False, b""
                return head[at + 8:]
            if len(head) < at + 8 + size:
                return None
            if kind == b"fmt ":
                _, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", head, at + 8)
                if channels != 1 or bits != 16:
                    raise ValueError(f"response_format wav: {channels} channels of {bits} bits; the bench reads "
                                     f"16-bit mono")
                self.sample_rate = rate
            at += 8 + size + (size & 1)
        return None

    def figures(self) -> dict:
        """The request's figures, each from its arrival (`due_s`): a wait to be sent counts, as a user's would."""
        out = {"text": self.text, "status": self.status, "error": self.error,
               "send_lag_ms": (self.sent_s - self.due_s) * 1e3}
        if self.error or not self.pieces or not self.sample_rate:
            return {**out, "error": self.error or "no audio"}
        rate, t0 = self.sample_rate, self.due_s
        chunks = [(stamp, n / rate) for stamp, n in self.pieces]
        first_t, first_s = chunks[0]
        last_t = chunks[-1][0]
        audio_s = sum(s for _, s in chunks)
        waits = stalls(chunks)
        worst_ms = max(waits, default=0.0) * 1e3
        audible = self.first_audible
        return {**out, "sample_rate": rate, "ttfb_ms": (first_t - t0) * 1e3,
                "audible_ttfa_ms": None if audible is None else (chunks[audible[0]][0] - t0) * 1e3,
                "first_audible_s": None if audible is None else audible[1],
                "audio_s": audio_s, "pieces": len(chunks), "rtf": (last_t - t0) / audio_s,
                "steady_rtf": (last_t - first_t) / (audio_s - first_s) if audio_s > first_s else None,
                "underruns": len(waits), "stall_s": sum(waits, 0.0), "max_gap_ms": worst_ms}


# -- the HTTP client ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    path: str

    @staticmethod
    def parse(url: str) -> "Endpoint":
        """http://HOST:PORT[/v1[/audio/speech]] -> the speech route's host, port and path."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise LabError("--endpoint", f"{url!r} is not an http:// URL; give e.g. http://127.0.0.1:7860 (or "
                                         f"inproc for the engine in this process)")
        path = parts.path.rstrip("/")
        if not path.endswith("/audio/speech"):
            path = (path if path.endswith("/v1") else path + "/v1") + "/audio/speech"
        return Endpoint(parts.hostname, parts.port or 80, path)


async def _read_body(reader: asyncio.StreamReader, headers: dict, received: Received | None) -> bytes:
    """The body (chunked, sized, or to the end), handed to `received` piece by piece as it arrives; returns the
    bytes only when nothing takes them (an error's JSON)."""
    kept = []

    def take(data: bytes) -> None:
        if received is not None:
            received.feed(data, time.perf_counter())
        else:
            kept.append(data)

    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                break
            take(await reader.readexactly(size))
            await reader.readexactly(2)
    else:
        left = int(headers["content-length"]) if "content-length" in headers else None
        while left is None or left > 0:
            data = await reader.read(65536 if left is None else min(65536, left))
            if not data:
                break
            take(data)
            if left is not None:
                left -= len(data)
    return b"".join(kept)


async def http_speech(endpoint: Endpoint, body: dict, received: Received, default_rate: int,
                      timeout_s: float) -> None:
    """One POST, its audio fed to `received` as it arrives; an HTTP error's message goes to `received.error`."""
    payload = json.dumps(body).encode()
    head = (f"POST {endpoint.path} HTTP/1.1\r\nHost: {endpoint.host}:{endpoint.port}\r\nContent-Type: "
            f"application/json\r\nAccept: */*\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n")
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
            received.sent_s = time.perf_counter()
            writer.write(head.encode() + payload)
            await writer.drain()
            status_line = await reader.readline()
            received.status = int(status_line.split()[1]) if len(status_line.split()) > 1 else 0
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                headers[name.strip().lower()] = value.strip()
            if received.status != 200:
                text = (await _read_body(reader, headers, None)).decode("utf-8", "replace")
                try:
                    text = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    pass
                received.error = f"HTTP {received.status}: {text[:300]}"
                return
            received.sample_rate = int(headers.get("x-sample-rate") or default_rate)
            if body.get("response_format") == "wav":
                received.expect_wav()
            await _read_body(reader, headers, received)
    except TimeoutError:
        received.error = f"timed out after {timeout_s:g} s"
    except (OSError, ValueError, asyncio.IncompleteReadError) as e:
        received.error = f"{type(e).__name__}: {e}"
    finally:
        if writer is not None:
            writer.close()


# -- the engine in this process (no HTTP) ---------------------------------------------------------------------------
class InProcess:
    """The preset's engine built here, each request streamed from a thread of its own: the same figures with
    no HTTP, server or client between the engine and the stamps."""

    def __init__(self, model: str, presets_dir: str | None, concurrency: int):
        from lab import presets
        from lab.manager import ModelManager

        name, _, weights = model.partition(":")
        spec = presets.load(name, presets_dir or presets.directory())
        self.spec = spec.with_weights(weights) if weights else spec
        self.engine = ModelManager().get(self.spec)
        self.pool = ThreadPoolExecutor(max_workers=max(1, concurrency))

    def _stream(self, body: dict, received: Received) -> None:
        from lab.measure.metrics import Timeline
        from lab.request import validate_inputs

        request, _ = validate_inputs(body["input"], body.get("seed", 0), body.get("max_audio_s", 30), 1)
        received.sent_s = time.perf_counter()
        for chunk in self.engine.stream(request, Timeline()):
            stamp = time.perf_counter()
            received.sample_rate = chunk.sample_rate
            received.add((np.clip(chunk.samples, -1, 1) * 32767).astype("<i2"), stamp)
        received.status = 200

    async def speech(self, body: dict, received: Received, timeout_s: float) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self.pool, self._stream, body, received)
        except Exception as e:   # reported per request, as an HTTP error would be
            received.error = f"{type(e).__name__}: {e}"


# -- load --------------------------------------------------------------------------------------------------------------
def poisson_offsets_s(count: int, rate_hz: float, seed: int) -> list[float]:
    """Arrival offsets of a Poisson process at `rate_hz`: seeded exponential gaps, the first at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate_hz, count)
    return list(np.cumsum(gaps) - gaps[0])


async def run_share(job: dict, target=None) -> dict:
    """One process's share of a load level: `job` says the endpoint, the body, the load ("closed": `concurrency`
    workers back to back; "open": Poisson at `rate_hz`) and `requests`; returns each request's figures and this
    process's CPU seconds."""
    started_cpu = resource.getrusage(resource.RUSAGE_SELF)
    start_at = job["start_at"]
    endpoint = None if target is not None else Endpoint.parse(job["endpoint"])
    texts, count = job["texts"], job["requests"]
    done: list[Received] = []
    keep = job.get("keep_audio", 0)

    async def one(index: int, due: float) -> None:
        body = {**job["body"], "input": texts[(job["offset"] + index) % len(texts)]}
        received = Received(body["input"], due, keep_audio=index < keep)
        if target is not None:
            await target.speech(body, received, job["timeout_s"])
        else:
            await http_speech(endpoint, body, received, job["default_rate"], job["timeout_s"])
        done.append(received)

    await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    last_note = time.perf_counter()
    if job["mode"] == "closed":
        counter = iter(range(count))

        async def worker() -> None:
            for index in counter:
                await one(index, time.perf_counter())

        tasks = [asyncio.create_task(worker()) for _ in range(job["concurrency"])]
    else:
        tasks = []
        for index, offset in enumerate(poisson_offsets_s(count, job["rate_hz"], job["seed"])):
            await asyncio.sleep(max(0.0, start_at + offset - time.perf_counter()))
            tasks.append(asyncio.create_task(one(index, start_at + offset)))
    while not all(t.done() for t in tasks):
        await asyncio.sleep(0.2)
        if job.get("progress") and time.perf_counter() - last_note > 5:
            last_note = time.perf_counter()
            print(f"  [{job['label']}] {len(done)}/{count} done", file=sys.stderr, flush=True)
    for t in tasks:
        t.result()
    used = resource.getrusage(resource.RUSAGE_SELF)
    wall_s = time.perf_counter() - start_at
    cpu_s = (used.ru_utime - started_cpu.ru_utime) + (used.ru_stime - started_cpu.ru_stime)
    return {"requests": [r.figures() for r in done], "cpu_s": cpu_s, "wall_s": wall_s,
            "audio": [{"text": r.text, "sample_rate": r.sample_rate,
                       "pcm16": base64.b64encode(np.concatenate(r.audio).tobytes()).decode()}
                      for r in done if r.audio and r.sample_rate]}


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def run_level(options: dict, mode: str, value: float, target=None) -> dict:
    """One load level (`value`: concurrency, or rate in requests/s), over `options["processes"]` client
    processes, summarized (`summary`)."""
    processes = 1 if target is not None else max(1, int(options["processes"]))
    count = int(options["requests"]) if mode == "closed" else max(int(options["requests"]),
                                                                   round(value * options["duration_s"]))
    label = f"{'concurrency' if mode == 'closed' else 'rate'} {value:g}"
    counts = _split(count, processes)
    shares = _split(int(value), processes) if mode == "closed" else [value / processes] * processes
    start_at = time.perf_counter() + (START_DELAY_S if processes > 1 else 0.05)
    jobs = []
    for i in range(processes):
        if counts[i] == 0 or (mode == "closed" and shares[i] == 0):
            continue
        jobs.append({"endpoint": options["endpoint"], "body": options["body"], "texts": options["texts"],
                     "mode": mode, "concurrency": shares[i] if mode == "closed" else None,
                     "rate_hz": shares[i] if mode == "open" else None, "requests": counts[i],
                     "offset": sum(counts[:i]), "seed": options["seed"] + 1000 * i, "start_at": start_at,
                     "timeout_s": options["timeout_s"], "default_rate": options["default_rate"],
                     "keep_audio": math.ceil(options["wer_requests"] / processes), "label": f"{label}, client {i}",
                     "progress": i == 0})
    if target is not None or len(jobs) == 1:
        shares_done = [asyncio.run(run_share(jobs[0], target))]
    else:
        children = [subprocess.Popen([sys.executable, "-m", "lab.loadbench", "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True) for _ in jobs]
        for child, job in zip(children, jobs):
            child.stdin.write(json.dumps(job))
            child.stdin.close()
        shares_done = []
        for child in children:
            out = child.stdout.read()
            if child.wait() != 0:
                raise RuntimeError(f"a client process failed (exit {child.returncode}); its stderr is above")
            shares_done.append(json.loads(out))
    level = summary([r for s in shares_done for r in s["requests"]], [s["cpu_s"] for s in shares_done],
                    [s["wall_s"] for s in shares_done])
    level.update(mode=mode, concurrency=int(value) if mode == "closed" else None,
                 rate_hz=value if mode == "open" else None)
    if target is not None:   # the engine runs in this process: its CPU is the engine's, not a client's
        level["client"].update(includes_engine=True, client_bound=None)
    audio = [a for s in shares_done for a in s["audio"]][: options["wer_requests"]]
    if audio:
        level["wer"] = corpus_wer(audio)
    return level


def summary(requests: list[dict], cpu_s: list[float], wall_s: list[float]) -> dict:
    """A level's figures over its requests (docs/METRICS.md, "A speech server under load")."""
    ok = [r for r in requests if not r.get("error")]
    errors: dict[str, int] = {}
    for r in requests:
        if r.get("error"):
            key = str(r.get("status") or "no answer")
            errors[key] = errors.get(key, 0) + 1
    gaps = [r["max_gap_ms"] for r in ok]
    out = {"requests": len(requests), "ok": len(ok), "errors": errors,
           "first_errors": sorted({r["error"] for r in requests if r.get("error")})[:3]}
    for key in (f.key for f in report.LOAD_FIGURES):   # declared once, in lab.report
        out[key] = summarize([r.get(key) for r in (requests if key == "send_lag_ms" else ok)])
    out["underruns"] = int(sum(r["underruns"] for r in ok))
    out["streams_with_underruns"] = int(sum(r["underruns"] > 0 for r in ok))
    # Continuity counts every request: one that failed had no stream to keep going.
    out["continuity"] = {f"c{ms}": (sum(g < ms for g in gaps) / len(requests) if requests else None)
                         for ms in CONTINUITY_MS}
    wall = max(wall_s, default=0.0)
    out["audio_s"] = sum(r["audio_s"] for r in ok)
    out["wall_s"] = wall
    out["goodput_audio_s_per_s"] = out["audio_s"] / wall if wall > 0 else None
    out["achieved_rate_hz"] = len(requests) / wall if wall > 0 else None
    util = [c / w if w > 0 else 0.0 for c, w in zip(cpu_s, wall_s)]
    out["client"] = {"processes": len(cpu_s), "cpu_s": sum(cpu_s), "cpu_util": util,
                     "cpu_util_max": max(util, default=0.0),
                     "client_bound": max(util, default=0.0) > CLIENT_BOUND_CPU}
    return out


def corpus_wer(audio: list[dict]) -> dict:
    """The quality guardrail's WER over what came back (lab.quality: Whisper tiny.en, normalized), weighted by
    each text's word count; only meaningful for real speech."""
    from lab.measure import quality

    scores, words = [], []
    for a in audio:
        pcm = np.frombuffer(base64.b64decode(a["pcm16"]), "<i2").astype(np.float32) / 32768.0
        scores.append(quality.assess(pcm, a["sample_rate"], a["text"]))
        words.append(len(quality.normalize(a["text"]).split()))
    wer = sum(s["wer"] * n for s, n in zip(scores, words)) / max(1, sum(words))
    return {"corpus_wer": wer, "scored": len(scores), "transcripts": [s["transcript"] for s in scores[:3]]}


def meets(level: dict, slo_ttfa_ms: float) -> bool:
    """The SLO: every request answered, audible TTFA p95 within `slo_ttfa_ms`, and C100 = 100%."""
    p95 = level["audible_ttfa_ms"]["p95"]
    return (level["ok"] == level["requests"] and p95 is not None and p95 <= slo_ttfa_ms
            and level["continuity"]["c100"] == 1.0)


def slo_search(probe, lo: float, hi: float, integer: bool, tolerance: float = 0.05, most: int = 12):
    """The highest load in [lo, hi] whose level passes `probe(value) -> bool`, by bisection on a log scale
    (passing is taken to fall with load); None when `lo` fails. Stops when the bracket is within one stream
    (integer) or `tolerance` of the load, or after `most` probes."""
    tried: list[tuple[float, bool]] = []

    def test(v):
        passed = probe(v)
        tried.append((v, passed))
        return passed

    if not test(lo):
        return None, tried
    if test(hi):
        return hi, tried
    good, bad = lo, hi
    while len(tried) < most:
        if (bad - good <= 1) if integer else (bad - good <= tolerance * good):
            break
        mid = math.sqrt(good * bad) if good > 0 else (good + bad) / 2
        mid = min(max(round(mid), good + 1), bad - 1) if integer else mid
        if test(mid):
            good = mid
        else:
            bad = mid
    return good, tried


def level_line(level: dict) -> str:
    """One level as a line, while the bench runs."""
    def q(key, at, digits=0):
        v = level[key][at]
        return "-" if v is None else f"{v:.{digits}f}"

    load = f"concurrency {level['concurrency']}" if level["mode"] == "closed" else f"rate {level['rate_hz']:g}/s"
    c, cpu = level["continuity"], level["client"]
    wer = f", WER {level['wer']['corpus_wer']:.1%}" if level.get("wer") else ""
    note = (" (client-bound?)" if cpu["client_bound"] else
            " (the engine's too: in-process)" if cpu.get("includes_engine") else "")
    return (f"{load}: {level['ok']}/{level['requests']} ok, TTFB p50 {q('ttfb_ms', 'median')} p95 "
            f"{q('ttfb_ms', 'p95')} ms, audible TTFA p50 {q('audible_ttfa_ms', 'median')} p95 "
            f"{q('audible_ttfa_ms', 'p95')} ms, steady RTF p99 {q('steady_rtf', 'p99', 3)}, C50/C100/C200 "
            f"{c['c50']:.0%}/{c['c100']:.0%}/{c['c200']:.0%}, goodput {level['goodput_audio_s_per_s'] or 0:.1f} "
            f"audio s/s{wer}; client CPU max {cpu['cpu_util_max']:.0%} of a core over {cpu['processes']} "
            f"process{'es' * (cpu['processes'] > 1)}{note}")


def _numbers(text: str | None, flag: str, integer: bool) -> list:
    if not text:
        return []
    try:
        values = [int(v) if integer else float(v) for v in str(text).replace(" ", "").split(",")]
    except ValueError:
        values = [0]
    if not values or min(values) <= 0:
        raise LabError(flag, f"{text!r} is not a comma list of {'whole ' if integer else ''}numbers above 0; "
                             f"use e.g. {'1,4,16' if integer else '5,10,20'}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m lab.bench --endpoint URL", description=__doc__.split("\n")[0])
    p.add_argument("--endpoint", required=True, help="the server's base URL (http://HOST:PORT, /v1 optional), or "
                   "inproc: the preset's engine built in this process")
    p.add_argument("--model", required=True, help="the model the server knows (here: a preset name; "
                   "NAME:random for random weights)")
    p.add_argument("--voice", help="the voice field (left out when not given)")
    p.add_argument("--format", default="pcm", choices=["pcm", "wav"], help="response_format")
    p.add_argument("--concurrency", help="closed loop: comma list of concurrent requests, e.g. 1,4,16")
    p.add_argument("--rate", help="open loop: comma list of Poisson arrival rates in requests/s, e.g. 5,10,20")
    p.add_argument("--requests", type=int, default=20, help="requests per level (a rate level sends at least "
                   "rate × --duration-s)")
    p.add_argument("--duration-s", type=float, default=10.0, help="open loop: seconds of arrivals per level")
    p.add_argument("--slo-ttfa-ms", type=float, help="SLO search: the highest load whose audible TTFA p95 is at "
                   "most this, with C100 = 100%% and no errors")
    p.add_argument("--search", choices=["rate", "concurrency"], default="concurrency")
    p.add_argument("--search-range", default="1,64", help="lo,hi of the SLO search")
    p.add_argument("--search-probes", type=int, default=12, help="at most this many levels in the SLO search")
    p.add_argument("--text", action="append", help="text to say (repeat for several; default: Harvard sentences)")
    p.add_argument("--max-audio-s", type=float, help="the lab's cap on audio per request (sent as max_audio_s; "
                   "other servers may refuse the field)")
    p.add_argument("--extra", default="{}", help="more JSON fields for the request body")
    p.add_argument("--processes", type=int, default=1, help="client processes sharing the load")
    p.add_argument("--wer", type=int, default=0, metavar="N", help="score N requests' audio per level with the "
                   "quality guardrail's WER (real speech only)")
    p.add_argument("--sample-rate", type=int, default=24000, help="pcm's rate when the server sends no "
                   "X-Sample-Rate header (OpenAI's pcm is 24 kHz)")
    p.add_argument("--timeout-s", type=float, default=120.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the Poisson arrivals")
    p.add_argument("--presets-dir", help="inproc: the presets folder (default: LAB_PRESETS_DIR or presets/)")
    p.add_argument("--out", default="results/load", help="folder for load.json and the charts")
    p.add_argument("--warmup", type=int, default=2, help="requests sent (and not counted) before the first level")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        concurrency = _numbers(args.concurrency, "--concurrency", True)
        rates = _numbers(args.rate, "--rate", False)
        search_range = _numbers(args.search_range, "--search-range", args.search == "concurrency")
        if args.slo_ttfa_ms is not None and len(search_range) != 2:
            raise LabError("--search-range", "give lo,hi, e.g. 1,64")
        if not (concurrency or rates or args.slo_ttfa_ms):
            raise LabError("--concurrency", "no load given; give --concurrency, --rate or --slo-ttfa-ms")
        try:
            extra = json.loads(args.extra)
        except ValueError as e:
            raise LabError("--extra", f"is not JSON ({e}); give e.g. '{{\"seed\": 1}}'") from None
        inproc = args.endpoint == "inproc"
        if not inproc:
            Endpoint.parse(args.endpoint)
    except LabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _raise_file_limit()
    body = {"model": args.model, "response_format": args.format, **extra}
    if args.voice:
        body["voice"] = args.voice
    if args.max_audio_s:
        body["max_audio_s"] = args.max_audio_s
    options = {"endpoint": args.endpoint, "body": body, "texts": args.text or list(DEFAULT_TEXTS),
               "requests": args.requests, "duration_s": args.duration_s, "processes": args.processes,
               "seed": args.seed, "timeout_s": args.timeout_s, "default_rate": args.sample_rate,
               "wer_requests": args.wer}
    target = None
    if inproc:
        print(f"building {args.model} in this process…", file=sys.stderr, flush=True)
        target = InProcess(args.model, args.presets_dir,
                           max([*concurrency, *([int(search_range[1])] if args.search == "concurrency" and
                                                args.slo_ttfa_ms else []), 64]))
    results = bench(options, concurrency, rates, args.slo_ttfa_ms, args.search, search_range, args.warmup, target,
                    args.search_probes)
    results["target"] = {"endpoint": args.endpoint, "model": args.model, "format": args.format}
    write(results, args.out)
    print(f"wrote {args.out}/load.json and its charts")
    return 0


def bench(options: dict, concurrency: list, rates: list, slo_ttfa_ms: float | None, search: str,
          search_range: list, warmup: int, target=None, search_probes: int = 12) -> dict:
    """Warm-up requests, then each closed-loop level, each open-loop level, and the SLO search, a line per level."""
    from lab import env

    results = {"client_env": {"cpu_count": os.cpu_count(), "python": sys.version.split()[0],
                              "commit": env.git_commit()},
               "body": options["body"], "levels": [], "slo": None}
    if warmup:
        warm = run_level({**options, "requests": warmup, "wer_requests": 0, "processes": 1}, "closed", 1, target)
        print(f"warm-up: {warm['ok']}/{warm['requests']} ok" + (f" ({warm['first_errors'][0]})"
                                                                if warm["first_errors"] else ""), flush=True)
    for mode, values in (("closed", concurrency), ("open", rates)):
        for value in values:
            level = run_level(options, mode, value, target)
            results["levels"].append(level)
            print(level_line(level), flush=True)
    if slo_ttfa_ms is not None:
        mode = "closed" if search == "concurrency" else "open"
        probes = []

        def probe(value):
            level = run_level({**options, "wer_requests": 0}, mode, value, target)
            level["passed"] = meets(level, slo_ttfa_ms)
            probes.append(level)
            print(f"SLO probe: {level_line(level)} -> {'meets' if level['passed'] else 'misses'} the SLO",
                  flush=True)
            return level["passed"]

        answer, _ = slo_search(probe, search_range[0], search_range[1], search == "concurrency", most=search_probes)
        results["slo"] = {"audible_ttfa_p95_ms": slo_ttfa_ms, "c100": 1.0, "search": search, "answer": answer,
                          "range": search_range, "probes": probes}
        print(f"SLO search: the highest {search} with audible TTFA p95 <= {slo_ttfa_ms:g} ms and C100 = 100%: "
              f"{answer if answer is not None else f'none (even {search_range[0]} misses)'}", flush=True)
    return results


def write(results: dict, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "load.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    title = f"{results.get('target', {}).get('model', '')} at {results.get('target', {}).get('endpoint', '')}"
    for mode, name in (("closed", "concurrency"), ("open", "rate")):
        levels = [lvl for lvl in results["levels"] if lvl["mode"] == mode]
        if levels:
            report.load_chart(levels, f"{title}, {name} sweep", os.path.join(out_dir, f"load-{name}.png"))
    if results.get("slo"):
        report.load_chart(results["slo"]["probes"], f"{title}, SLO search (audible TTFA p95 <= "
                          f"{results['slo']['audible_ttfa_p95_ms']:g} ms, C100 = 100%)",
                          os.path.join(out_dir, "slo.png"), slo_ms=results["slo"]["audible_ttfa_p95_ms"])


def _raise_file_limit() -> None:
    """Many concurrent requests are many sockets: take the hard limit on open files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _worker() -> int:
    """A client process (`--worker`): one job as JSON on stdin, its share's results as JSON on stdout."""
    _raise_file_limit()
    job = json.loads(sys.stdin.read())
    json.dump(asyncio.run(run_share(job)), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(_worker() if sys.argv[1:] == ["--worker"] else main())
