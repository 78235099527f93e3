"""What one synthesis request asks for, validated the same way for the app and the CLI: each error names the
field and the fix."""
from __future__ import annotations

import html
import math
import os
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
BREAK = re.compile(r"<\s*break\b[^<>]*>", re.I)   # SSML's pause
PAUSE = ", "                      # what a <break> becomes: the voices pause at a comma
# Symbols with a common spoken form. A currency sign before a number goes after it: "€5" -> "5 euros".
SYMBOL_WORDS = {"≈": "about", "~": "about", "%": "percent", "&": "and", "+": "plus", "=": "equals", "@": "at",
                "°": "degrees", "×": "times", "÷": "divided by", "±": "plus or minus", "→": "to",
                "≤": "at most", "≥": "at least", "€": "euros", "£": "pounds", "¥": "yen", "#": "number"}
CURRENCY_FIRST = re.compile(r"([€£¥])\s?(\d[\d,.]*)")
AUDIO_FORMATS = "WAV/FLAC/MP3/OGG"


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
    # What normalize_text changed in the text as typed, one note each, for the person who typed it.
    text_notes: tuple[str, ...] = ()

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


def _named(chars) -> str:
    return ", ".join(f"{ch} (U+{ord(ch):04X})" if ch.isprintable() else f"U+{ord(ch):04X}"
                     for ch in sorted(set(chars))[:8])


def _unspoken(ch: str) -> bool:
    """Characters no voice says: emoji and other symbols, joiners and variation selectors, control codes."""
    cat = unicodedata.category(ch)
    if ch in "\n\t":
        return False
    return (cat in ("So", "Sk", "Cc", "Cf", "Co", "Cs", "Cn") or (cat == "Sm" and ch not in SYMBOL_WORDS)
            or unicodedata.name(ch, "").startswith(("VARIATION SELECTOR", "EMOJI MODIFIER", "COMBINING ENCLOSING")))


def normalize_text(text: str, where: str = "text") -> tuple[str, tuple[str, ...]]:
    """Text as pasted (a chat reply, SSML) made speakable, and a note of each change: markup is stripped and a
    <break> becomes a pause; common symbols become words; emoji and symbols with no spoken form are dropped and
    named. Text with nothing speakable left is refused here, up front, with the reason. What the voices cannot say
    (another script) is left for validate_text to refuse."""
    if not isinstance(text, str) or not text.strip():
        raise LabError(where, "is empty; type a sentence to synthesize")
    notes = []
    if BREAK.search(text):
        text = BREAK.sub(PAUSE, text)
        notes.append("each <break> became a pause")
    tags = MARKUP.findall(text)
    if tags:
        text = MARKUP.sub(" ", text)
        notes.append(f"markup removed: {' '.join(sorted(set(t.strip() for t in tags))[:5])}")
    unescaped = html.unescape(text)
    if unescaped != text:
        text = unescaped
        notes.append("HTML entities (&amp; ...) became their characters")
    worded = sorted({ch for ch in text if ch in SYMBOL_WORDS})
    text = CURRENCY_FIRST.sub(lambda m: f"{m.group(2)} {SYMBOL_WORDS[m.group(1)]}", text)
    if worded:
        text = "".join(f" {SYMBOL_WORDS[ch]} " if ch in SYMBOL_WORDS else ch for ch in text)
        notes.append("said as words: " + ", ".join(f"{ch} → {SYMBOL_WORDS[ch]}" for ch in worded))
    dropped = [ch for ch in text if _unspoken(ch)]
    if dropped:
        text = "".join(ch for ch in text if not _unspoken(ch))
        notes.append(f"dropped (no spoken form): {_named(dropped)}")
    if notes:
        text = re.sub(r"[ \t]+", " ", text)
        text = re.sub(r" ([,.!?;:])", r"\1", text).strip()
    if not any(ch.isalnum() for ch in text):
        left = f"only {_named(dropped)}" if dropped and not text.strip() else "no letters or digits"
        raise LabError(where, f"has nothing to speak ({left}); type words to synthesize")
    return text, tuple(notes)


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


def validate_inputs(text, seed, max_audio_s, runs, max_chars: int = MAX_TEXT_CHARS,
                    fields: dict | None = None) -> tuple[Request, int]:
    """A comparison's form, as a person typed it (the page, the A/B tab and the CLI all come through here): the
    shared request (the same text, seed and cap for every preset), its text normalized with a note of each change,
    and the warm runs per preset. `fields` renames the fields in errors (the CLI says --seed)."""
    name = {"seed": "seed", "runs": "runs per preset", "max_audio_s": "max_audio_s", "text": "text", **(fields or {})}
    seed = _whole_number(seed, name["seed"], "0")
    if not 0 <= seed <= MAX_SEED:
        raise LabError(name["seed"], f"{seed} is out of range; use 0 to {MAX_SEED}")
    runs = _whole_number(runs, name["runs"], "3")
    if not 1 <= runs <= MAX_RUNS:
        raise LabError(name["runs"], f"{runs} is out of range; use 1 to {MAX_RUNS} "
                                     f"(one cold run comes first and is reported apart)")
    if max_audio_s is None or (isinstance(max_audio_s, str) and not max_audio_s.strip()):
        raise LabError(name["max_audio_s"], "is empty; type a cap on audio length in seconds, e.g. 8")
    try:
        max_audio_s = float(max_audio_s)
    except (TypeError, ValueError):
        raise LabError(name["max_audio_s"], f"{max_audio_s!r} is not a number of seconds, e.g. 8") from None
    if not (0 < max_audio_s <= 120):   # (nan fails this too)
        raise LabError(name["max_audio_s"], f"{max_audio_s} is out of range; use a value in (0, 120] seconds")
    if isinstance(text, str) and len(text) > max_chars:   # before normalizing: the limit is on what was typed
        validate_text(text, max_chars, name["text"])
    spoken, notes = normalize_text(text if isinstance(text, str) else "", name["text"])
    spoken = validate_text(spoken, max_chars, name["text"])
    return Request(spoken, seed=seed, max_audio_s=max_audio_s, text_notes=notes), runs


def read_audio_file(path: str, where: str = "user_audio") -> tuple[np.ndarray, int]:
    """An uploaded or given audio file as (samples, sample rate), for validate_user_audio: WAV read here, FLAC,
    MP3 and OGG decoded by ffmpeg (to 16 kHz mono). Anything else is refused as not audio, by its first bytes."""
    import subprocess
    import wave

    name = os.path.basename(str(path))
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError as e:
        raise LabError(where, f"{name}: cannot be read ({e.strerror or e}); check the path") from e
    kind = ("wav" if head[:4] == b"RIFF" and head[8:12] == b"WAVE" else "flac" if head[:4] == b"fLaC" else
            "ogg" if head[:4] == b"OggS" else "webm" if head[:4] == b"\x1aE\xdf\xa3" else   # a microphone's
            "mp3" if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0) else None)
    if kind is None:
        raise LabError(where, f"not audio: {name} (expected {AUDIO_FORMATS})")
    if kind == "wav":
        try:
            with wave.open(path, "rb") as w:
                width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
                raw = w.readframes(w.getnframes())
        except (OSError, EOFError, wave.Error) as e:
            raise LabError(where, f"not audio: {name} is not a readable PCM WAV ({e}); convert it with "
                                  f"`ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`") from e
        if width not in (2, 4):
            raise LabError(where, f"{name} has {8 * width}-bit samples; use 16- or 32-bit PCM "
                                  f"(`ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`)")
        return np.frombuffer(raw, f"<i{width}").reshape(-1, channels), rate
    try:
        out = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "s16le", "-ac", "1", "-ar", "16000",
                              "pipe:1"], capture_output=True, timeout=60, check=True).stdout
    except FileNotFoundError as e:
        raise LabError(where, f"{name}: {kind.upper()} needs ffmpeg, which is not installed; upload a WAV, or "
                              f"install ffmpeg") from e
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise LabError(where, f"not audio: {name} could not be decoded as {kind.upper()} (expected "
                              f"{AUDIO_FORMATS})") from e
    return np.frombuffer(out, "<i2"), 16000
