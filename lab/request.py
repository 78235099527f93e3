"""What one synthesis request asks for, validated the same way for the app and the CLI."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

import numpy as np

from lab.errors import LabError

MAX_TEXT_CHARS = 1000


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


def _is_latin(ch: str) -> bool:
    if ch.isascii():
        return True
    cat = unicodedata.category(ch)
    if cat.startswith(("P", "Z")) or cat == "Sc":        # punctuation, spaces, currency: fine in any script
        return True
    return cat.startswith("L") and "LATIN" in unicodedata.name(ch, "")


def validate_text(text: str, max_chars: int = MAX_TEXT_CHARS, where: str = "text") -> str:
    """The voices here are English: refuse what they cannot say, naming the characters and the fix."""
    if not isinstance(text, str) or not text.strip():
        raise LabError(where, "is empty; type a sentence to synthesize")
    if len(text) > max_chars:
        raise LabError(where, f"has {len(text)} characters, over the limit of {max_chars}; "
                              f"shorten it or raise the limit (--max-chars)")
    bad = sorted({ch for ch in text if not _is_latin(ch) and ch not in "\n\t"})
    if bad:
        shown = " ".join(f"{ch!r} (U+{ord(ch):04X})" for ch in bad[:5])
        raise LabError(where, f"has characters outside Latin script, which the English voices cannot say: "
                              f"{shown}; remove them or spell them out in words")
    return text.strip()


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
    return req
