"""What a stream of speech is, with no torch: AudioChunk, 16-bit PCM, and the chunk schedule every frame loop shares.
The page and the PCM socket import this, so serving audio never loads a model's dependencies."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from lab.errors import LabError
from lab.measure.metrics import Timeline


@dataclass
class AudioChunk:
    samples: np.ndarray         # float32 mono
    sample_rate: int
    index: int
    text: str = ""              # text generated with this audio, for models that answer (minicpm_o); else ""

    @property
    def audio_s(self) -> float:
        return len(self.samples) / self.sample_rate


def pcm16(samples: np.ndarray) -> np.ndarray:
    """float32 samples in [-1, 1] as little-endian 16-bit PCM, clipped (not wrapped): what WAV files, the PCM
    socket and Gradio's players take."""
    return (np.clip(np.asarray(samples, np.float32).reshape(-1), -1.0, 1.0) * 32767).astype("<i2")


def chunk_frames(first: int, growth: float, largest: int) -> Iterator[int]:
    """Frames per chunk: a small first chunk for TTFB, then growing chunks so decode calls amortize."""
    size = float(first)
    while True:
        yield int(size)
        size = min(size * growth, float(largest))


class ChunkEmitter:
    """The chunking every frame loop shares: frames wait in `pending` until a chunk is due (the schedule's
    target is reached, or generation finished); the loop then `take()`s them, decodes them its own way, and
    `emit()`s the samples, which stamps the timeline and numbers the chunk.

        emitter.add(frame)
        if emitter.due(finished):
            yield emitter.emit(decode(emitter.take()))
    """

    def __init__(self, spec, timeline: Timeline, sample_rate: int):
        self.sizes = chunk_frames(spec.first_chunk_frames, spec.chunk_growth, spec.max_chunk_frames)
        self.target_frames = next(self.sizes)
        self.pending: list = []
        self.index = 0          # of the next chunk emitted: 0 until the first one is out
        self.timeline, self.sample_rate = timeline, sample_rate

    def add(self, frame) -> None:
        self.pending.append(frame)

    def due(self, finished: bool) -> bool:
        return len(self.pending) >= self.target_frames or finished

    def take(self) -> list:
        """The pending frames, and the schedule moved on to the next chunk's size."""
        frames, self.pending = self.pending, []
        self.target_frames = next(self.sizes)
        return frames

    def emit(self, samples: np.ndarray) -> AudioChunk:
        """Samples on the host (float32 mono) as the next AudioChunk; the first one stamps `first_decode`."""
        if self.index == 0:
            self.timeline.mark("first_decode")
        self.timeline.chunk(len(samples) / self.sample_rate)
        chunk = AudioChunk(samples, self.sample_rate, self.index)
        self.index += 1
        return chunk


def frames_for(max_audio_s: float, frame_rate_hz: float) -> int:
    """The frame cap for a request: whole frames that fit in max_audio_s (at least one), the same rule for
    every engine so the protocol's "same cap for every preset" holds."""
    return max(1, int(max_audio_s * frame_rate_hz + 1e-6))


def resampled(audio: np.ndarray, sample_rate: int, target_hz: int, where: str, model: str) -> np.ndarray:
    """Mono float32 at `target_hz`, the rate `model`'s audio encoder takes; `where` names the field in the error
    (scipy, which resamples, is optional)."""
    audio = np.asarray(audio, np.float32)
    if sample_rate == target_hz:
        return audio
    try:
        from scipy.signal import resample_poly
    except ImportError as e:
        raise LabError(where, f"is {sample_rate} Hz and {model} takes {target_hz} Hz; resampling needs scipy "
                              f"(`pip install scipy`), or upload {target_hz // 1000} kHz audio") from e
    g = math.gcd(target_hz, int(sample_rate))
    return resample_poly(audio, target_hz // g, int(sample_rate) // g).astype(np.float32)
