"""What one synthesis request asks for, validated the same way for the app and the CLI: each error names the
field and the fix."""
from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np

from lab.errors import LabError

MAX_TEXT_CHARS = 1000
MARKUP = re.compile(r"<\s*/?\s*[A-Za-z][^<>]*>")   # an SSML or HTML tag: the voices would read it out
MAX_USER_AUDIO_S = 30.0          # a spoken user turn for models that take audio input (omni models)
MAX_USER_AUDIO_BYTES = 20 * 2**20
MAX_RUNS = 20                    # warm runs per preset; one cold run comes first
MAX_SEED = 2**32 - 1             # numpy's and torch's seeded generators both take this range


@dataclass(frozen=True)
class ContextTurn:
    """An earlier turn of the conversation: text, and optionally the audio that was spoken (mono float32)."""
    text: str
    audio: np.ndarray | None = None
    sample_rate: int = 24000
    speaker: int = 0


@dataclass(frozen=True)
class Request:
    text: str
    seed: int = 0
    max_audio_s: float = 10.0
    speaker: int = 0
    temperature: float = 0.0        # 0 is greedy; above 0 samples on the device with the seeded generator
    top_k: int = 50
    context: tuple[ContextTurn, ...] = field(default_factory=tuple)
    # A spoken user turn, for families with FAMILIES[f]["user_audio"] (omni models); mono float32.
    user_audio: np.ndarray | None = None
    user_audio_sample_rate: int = 16000

    @property
    def user_audio_s(self) -> float | None:
        return None if self.user_audio is None else len(self.user_audio) / self.user_audio_sample_rate


def _is_latin(ch: str) -> bool:
    if ch.isascii():
        return True
    cat = unicodedata.category(ch)
    if cat.startswith(("P", "Z")) or cat == "Sc":        # punctuation, spaces, currency: fine in any script
        return True
    return cat.startswith("L") and "LATIN" in unicodedata.name(ch, "")


def validate_text(text: str, max_chars: int = MAX_TEXT_CHARS, where: str = "text") -> str:
    """The voices here are English plain text: refuse what they cannot say, naming the characters and the fix."""
    if not isinstance(text, str) or not text.strip():
        raise LabError(where, "is empty; type a sentence to synthesize")
    if len(text) > max_chars:
        raise LabError(where, f"has {len(text)} characters, over the limit of {max_chars}; shorten it")
    tag = MARKUP.search(text)
    if tag:
        raise LabError(where, f"has markup ({tag.group(0)[:40]}); the voices read plain text and would speak the "
                              f"tags: remove them")
    bad = sorted({ch for ch in text if not _is_latin(ch) and ch not in "\n\t"})
    if bad:
        shown = " ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in bad[:5])
        raise LabError(where, f"has characters outside Latin script, which the English voices cannot say: "
                              f"{shown}; remove them or spell them out in words")
    return text.strip()


def validate_user_audio(audio, sample_rate: int, where: str = "user_audio") -> np.ndarray:
    """A user's recorded or uploaded turn: mono, finite, non-empty, at most MAX_USER_AUDIO_S long.
    Stereo is averaged to mono; anything else is refused with what to do."""
    if not isinstance(sample_rate, (int, np.integer)) or not (8000 <= sample_rate <= 192000):
        raise LabError(where, f"sample rate {sample_rate!r} is not a plausible audio rate; upload a WAV, FLAC or "
                              f"MP3 recorded at 8-192 kHz")
    a = np.asarray(audio)
    if a.dtype.kind not in "fiu":
        raise LabError(where, f"holds {a.dtype} data, not audio samples; upload a WAV, FLAC or MP3 file")
    if a.nbytes > MAX_USER_AUDIO_BYTES:
        raise LabError(where, f"is {a.nbytes / 2**20:.0f} MiB, over the {MAX_USER_AUDIO_BYTES // 2**20} MiB limit; "
                              f"upload a shorter clip")
    if a.dtype.kind in "iu":   # PCM integers, e.g. Gradio's int16: scale to [-1, 1]
        a = a.astype(np.float32) / float(np.iinfo(a.dtype).max)
    a = a.astype(np.float32)
    if a.ndim == 2:   # (samples, channels), as soundfile and Gradio give it
        a = a.mean(axis=1)
    if a.ndim != 1 or a.size == 0:
        raise LabError(where, "is empty or not a mono/stereo clip; upload a short recording of speech")
    if not np.isfinite(a).all():
        raise LabError(where, "has NaN or infinite samples; re-export the recording")
    if a.size / sample_rate > MAX_USER_AUDIO_S:
        raise LabError(where, f"is {a.size / sample_rate:.1f} s long, over the {MAX_USER_AUDIO_S:.0f} s limit; "
                              f"trim it")
    return a


def validate_request(req: Request, max_chars: int = MAX_TEXT_CHARS) -> Request:
    validate_text(req.text, max_chars)
    if not (0 < req.max_audio_s <= 120):
        raise LabError("max_audio_s", f"{req.max_audio_s} is out of range; use a value in (0, 120] seconds")
    if req.temperature < 0:
        raise LabError("temperature", "must be 0 (greedy) or positive")
    for i, turn in enumerate(req.context):
        validate_text(turn.text, max_chars, where=f"context[{i}].text")
        if turn.audio is not None:
            a = np.asarray(turn.audio)
            if a.ndim != 1 or a.size == 0 or not np.isfinite(a).all():
                raise LabError(f"context[{i}].audio", "must be a non-empty mono float array with finite samples")
            if a.size / turn.sample_rate > 30:
                raise LabError(f"context[{i}].audio", "is longer than 30 s; trim it")
    if req.user_audio is not None:
        validate_user_audio(req.user_audio, req.user_audio_sample_rate)
    return req


def _whole_number(value, field: str, example: str) -> int:
    if value is None or (isinstance(value, str) and not value.strip()):
        raise LabError(field, f"is empty; type a whole number, e.g. {example}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LabError(field, f"{value!r} is not a number; type a whole number, e.g. {example}") from None
    if not math.isfinite(number):
        raise LabError(field, f"{value!r} is not a finite number; type a whole number, e.g. {example}")
    if number != int(number):
        raise LabError(field, f"{value} is not a whole number; type e.g. {example}")
    return int(number)


def validate_inputs(text, seed, max_audio_s, runs, max_chars: int = MAX_TEXT_CHARS) -> tuple[Request, int]:
    """A comparison's form, as a person typed it: the shared request (the same text, seed and cap for every
    preset) and the warm runs per preset."""
    seed = _whole_number(seed, "seed", "0")
    if not 0 <= seed <= MAX_SEED:
        raise LabError("seed", f"{seed} is out of range; use 0 to {MAX_SEED}")
    runs = _whole_number(runs, "runs per preset", "3")
    if not 1 <= runs <= MAX_RUNS:
        raise LabError("runs per preset", f"{runs} is out of range; use 1 to {MAX_RUNS} "
                                          f"(one cold run comes first and is reported apart)")
    if max_audio_s is None:
        raise LabError("max_audio_s", "is empty; type a cap on audio length in seconds, e.g. 8")
    try:
        max_audio_s = float(max_audio_s)
    except (TypeError, ValueError):
        raise LabError("max_audio_s", f"{max_audio_s!r} is not a number of seconds, e.g. 8") from None
    request = validate_request(Request(text if isinstance(text, str) else "", seed=seed, max_audio_s=max_audio_s),
                               max_chars)
    return Request(request.text.strip(), seed=seed, max_audio_s=max_audio_s), runs
