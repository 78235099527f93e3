"""A stand-in for MiniCPM-o 2.6, for tests only: the same documented streaming API, no weights.

    init_tts(); reset_session(); streaming_prefill(session_id, msgs, tokenizer);
    streaming_generate(session_id, tokenizer, generate_audio=True, **generation kwargs) -> iterator of items with
    .text, .audio_wav (a torch tensor, or a numpy array) and .sampling_rate

It records every call in order with its arguments, checks them the way the real model would fail on them, and
sleeps in proportion to its input, so the engine's phases have sizes a test can see. It is never used outside
tests/: the lab's engine loads the real model.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch

OUTPUT_SAMPLE_RATE_HZ = 24000


@dataclass
class OmniOutput:
    """The fields of the real model's streamed items."""
    text: str
    audio_wav: object
    sampling_rate: int


class StandInTokenizer:
    """Passed through to the model like the real tokenizer; the engine never tokenizes itself."""


class StandInMiniCPMO(torch.nn.Module):
    # Seconds of work, so each phase has a size: a fixed cost per call plus a cost per unit of input.
    INIT_TTS_S = 0.3
    PREFILL_CALL_S = 0.01
    PREFILL_S_PER_CHAR = 0.0002
    PREFILL_S_PER_AUDIO_S = 0.01
    GENERATE_CALL_S = 0.02
    FIRST_RESPONSE_S = 0.08
    NEXT_RESPONSE_S = 0.03

    def __init__(self, reply=("Hello", "there,", "this", "is", "a", "stand-in."), item_audio_s: float = 0.2,
                 audio_as: str = "tensor"):
        super().__init__()
        self.llm = torch.nn.Linear(16, 16)    # where the real Qwen2 LLM sits (model.llm), for the compile axis
        self.tts = torch.nn.Linear(8, 8)
        self.reply = list(reply)
        self.item_audio_s = item_audio_s
        self.audio_as = audio_as
        self.calls: list[tuple[str, dict]] = []
        self.init_tts_calls = 0
        self.session_id = None
        self.items_produced = 0
        self.generator_closed = False
        self.audio_sent: list[np.ndarray] = []   # every item's audio, as generated

    # -- the documented API ----------------------------------------------------------------------
    def init_tts(self):
        self.calls.append(("init_tts", {}))
        self.init_tts_calls += 1
        time.sleep(self.INIT_TTS_S)

    def reset_session(self):
        self.calls.append(("reset_session", {}))
        self.session_id = None

    def streaming_prefill(self, session_id, msgs, tokenizer, **kwargs):
        assert session_id is not None, "session_id cannot be None"
        assert len(msgs) == 1, "streaming_prefill takes one message per call"
        assert msgs[0]["role"] in ("system", "user", "assistant")
        assert isinstance(tokenizer, StandInTokenizer)
        chars, audio_s = 0, 0.0
        for item in msgs[0]["content"]:
            if isinstance(item, str):
                chars += len(item)
            elif isinstance(item, np.ndarray):
                # The real model hands arrays to Whisper's feature extractor at 16 kHz, mono float32.
                assert item.ndim == 1 and item.dtype == np.float32, (item.shape, item.dtype)
                audio_s += len(item) / 16000
            else:
                raise TypeError(f"Invalid content type: {type(item).__name__}")
        self.session_id = session_id
        self.calls.append(("streaming_prefill", {"session_id": session_id, "msgs": copy.deepcopy(msgs),
                                                 **kwargs}))
        time.sleep(self.PREFILL_CALL_S + chars * self.PREFILL_S_PER_CHAR + audio_s * self.PREFILL_S_PER_AUDIO_S)

    def streaming_generate(self, session_id, tokenizer, generate_audio=True, **kwargs):
        self.calls.append(("streaming_generate", {"session_id": session_id, "generate_audio": generate_audio,
                                                  **kwargs}))
        if session_id != self.session_id:
            raise RuntimeError(f"session {session_id!r} was never prefilled")
        if generate_audio and self.init_tts_calls == 0:
            raise AttributeError("'MiniCPMO' object has no attribute 'tts_processor' (init_tts() was not called)")
        time.sleep(self.GENERATE_CALL_S)
        return self._responses()

    def _responses(self):
        try:
            for i, word in enumerate(self.reply):
                time.sleep(self.FIRST_RESPONSE_S if i == 0 else self.NEXT_RESPONSE_S)
                n = int(self.item_audio_s * OUTPUT_SAMPLE_RATE_HZ)
                t = torch.arange(n) / OUTPUT_SAMPLE_RATE_HZ
                # The noise comes from the global generator, as the real TTS's sampling does: seeded, it repeats.
                audio = 0.1 * torch.sin(2 * torch.pi * 110 * (i + 1) * t) + 0.01 * torch.randn(n)
                self.audio_sent.append(audio.numpy().copy())
                self.items_produced += 1
                text = word + ("<|tts_eos|>" if i == len(self.reply) - 1 else " ")
                yield OmniOutput(text=text, audio_wav=audio if self.audio_as == "tensor" else audio.numpy(),
                                 sampling_rate=OUTPUT_SAMPLE_RATE_HZ)
        finally:
            self.generator_closed = True

    # -- for assertions --------------------------------------------------------------------------
    def prefills(self) -> list[list]:
        """The content list of every streaming_prefill call, in order."""
        return [kw["msgs"][0]["content"] for name, kw in self.calls if name == "streaming_prefill"]

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]
