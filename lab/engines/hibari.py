"""hibari-tts: a real English voice whose ONNX weights ship inside the wheel, so it speaks offline.

It streams per sentence: G2P for every sentence is the prefill, the ONNX acoustic model produces the
first sentence's frames, and its DSP vocoder is the codec decode. It is the CPU reference row in every
comparison because its audio is real speech on any machine.

`streaming: whole` runs the very same steps but holds every sentence back until the last one is synthesized, as a
non-streaming TTS would: one chunk, and a TTFB that grows with the text. Against `per-sentence` it is the same
voice starting later, which a listener hears.

`leading_silence: trim` cuts the silence the voice pads its start with (about 0.3 s) from the stream's first chunk:
it starts LEAD_MARGIN_S before the first audible sample (lab.measure.metrics.audible_index: the lab's "first audible").
The rest of the stream, and the first chunk from the cut on, are the untrimmed samples.
"""
from __future__ import annotations

import os
import threading
from typing import Iterator

import numpy as np

from lab.audio import AudioChunk
from lab.engines.base import BuildReport, Engine, StageClock
from lab.errors import Cancelled, LabError, MissingPackageError
from lab.measure.metrics import Timeline, audible_index
from lab.request import Request
from lab.spec import VariantSpec

# Kept before the first audible sample by leading_silence: trim: a soft onset (a fricative, a breath) rises through
# -60 to -50 dBFS in the windows before the first one that reaches -50, so this keeps the consonant whole while being
# too short to hear as a wait. Four whole 10 ms windows (metrics.AUDIBLE_WINDOW_S): the trimmed stream's windows
# line up with the untrimmed one's, so its first audible sample sits exactly this far in.
LEAD_MARGIN_S = 0.04


def lead_cut(samples: np.ndarray, sample_rate: int) -> int:
    """Where leading_silence: trim starts the stream's first chunk: LEAD_MARGIN_S before its first audible sample,
    never before sample 0; 0 (keep it whole) when nothing in it is audible."""
    at = audible_index(samples, sample_rate)
    return max(0, at - round(LEAD_MARGIN_S * sample_rate)) if at >= 0 else 0


class HibariEngine(Engine):
    def __init__(self, spec: VariantSpec, tts, threads: int):
        super().__init__(spec, tts.sample_rate, BuildReport(tokenizer="hibari G2P (misaki phonemes)"))
        self.tts = tts
        self.ort_threads = threads
        self.sync = lambda: None    # ONNX Runtime on the CPU: its work is done when run() returns

    def use_threads(self) -> int:
        # ONNX Runtime's session owns its thread pool, sized at build; torch's setting does not reach it.
        return self.ort_threads

    def _stream(self, request: Request, timeline: Timeline, cancel: threading.Event | None
                ) -> Iterator[AudioChunk]:
        from hibari import dsp

        timeline.sync = self.sync
        timeline.mark("request")
        rng = np.random.default_rng(request.seed)  # the vocoder's noise: seeded, so runs are bit-identical
        timeline.mark("session")
        sentences = [self.tts.ids(p) for p in self.tts.phonemize(request.text)]
        timeline.mark("prefill")
        timeline.mark("generator")
        budget = int(request.max_audio_s * self.sample_rate)
        # Hibari.from_ids skips id lists with no phoneme between the pads; so do we.
        spoken = [s for s in sentences if len(s) >= 3]
        held, chunk_index = [], 0
        for index, ids in enumerate(spoken):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            # The same two steps as Hibari.from_ids, split so the phases show model time and vocoder time.
            out = self.tts.sess.run(None, {"ids": np.asarray([ids], np.int64), "speed": np.asarray([1.0], np.float32)})
            timeline.frame()
            if index == 0:
                timeline.mark("first_frame")
            audio = dsp.synth(*(o[0] for o in out), rng).astype(np.float32)[:budget]
            budget -= len(audio)
            held.append(audio)
            last = budget <= 0 or index == len(spoken) - 1
            if self.spec.streaming == "whole" and not last:
                continue
            if chunk_index == 0:
                timeline.mark("first_decode")
            samples, held = np.concatenate(held), []
            if chunk_index == 0 and self.spec.leading_silence == "trim":
                samples = samples[lead_cut(samples, self.sample_rate):]
            timeline.chunk(len(samples) / self.sample_rate)
            yield AudioChunk(samples, self.sample_rate, chunk_index)
            chunk_index += 1
            if last:
                break


def ort_threads(spec: VariantSpec) -> int:
    """ONNX Runtime's intra- and inter-op threads (hibari sets both): the spec's count, or for auto one per CPU
    less one, as for torch (lab.engines.torch_common.AUTO_THREADS)."""
    return max(1, (os.cpu_count() or 1) - 1) if spec.threads == "auto" else int(spec.threads)


def build(spec: VariantSpec, progress) -> HibariEngine:
    try:
        import hibari
    except ImportError as e:
        raise MissingPackageError("family", "hibari-tts", why="family: hibari needs it") from e
    voice = spec.model_id.split(":", 1)[1] if ":" in spec.model_id else "heart"
    if voice not in hibari.voices.VOICES:
        raise LabError("model", f"hibari has no voice {voice!r}; use one of "
                                f"{', '.join('hibari-tts:' + v for v in hibari.voices.VOICES)}")
    clock = StageClock(progress)
    threads = ort_threads(spec)
    try:
        tts, load_s = clock.run("loading", lambda: hibari.Hibari(voice=voice, threads=threads))
    except OSError as e:
        raise LabError("model", f"hibari voice {voice!r} is not in the wheel and could not be downloaded; "
                                f"use hibari-tts:heart, which ships inside it") from e
    engine = HibariEngine(spec, tts, threads)

    def warm_up():
        for _ in engine.stream(Request("Warm up."), Timeline()):
            pass

    _, warmup_s = clock.run("warming up", warm_up)
    model_bytes = os.path.getsize(tts.model_path)
    engine.report = BuildReport(load_s=load_s, warmup_s=warmup_s, memory_bytes=model_bytes,
                                params=0, tokenizer="hibari G2P (misaki phonemes)",
                                notes=[f"ONNX Runtime on {threads} CPU thread{'s' * (threads > 1)} (intra- and "
                                       f"inter-op); parameter count not exposed by the wheel"])
    return engine
