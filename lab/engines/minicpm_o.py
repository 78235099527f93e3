"""MiniCPM-o 2.6 (openbmb/MiniCPM-o-2_6) through the model's own streaming API: the notes' speech LLM.

It answers: the request's text (and an optional spoken user turn) is the prompt, and the model streams speech with
the text it speaks. The API this engine calls, as the model card documents it (remote code, pinned revision):

    model.init_tts()                                            # TTS text tokenizer and Vocos vocoder
    model.reset_session()
    model.streaming_prefill(session_id=..., msgs=[{"role": "user", "content": [...]}], tokenizer=...)
    for r in model.streaming_generate(session_id=..., tokenizer=..., generate_audio=True, ...):
        r.audio_wav, r.sampling_rate, r.text

Content items are text strings and float32 mono 16 kHz numpy arrays. The lab's axes change how the model is loaded
(attention, dtype, bitsandbytes, torch.compile), how the prompt is prefilled (per-segment | batched) and where
init_tts runs (build | request); never which API is called.

The notes' phases map onto lab.measure.metrics.PHASES like this; stacked, they are TTFB ("total TTFB"):
    session       session creation: a new session id, reset_session(), and init_tts() when it runs per request
    prefill       the streaming_prefill call(s), with the user's audio resampled to 16 kHz first
    generator     generator creation: the streaming_generate(...) call
    first_frame   time to first response: the generator's first item
    first_decode  that item's audio on the host as float32 samples

Verified against a stand-in of that API only (tests/minicpm_standin.py): no weights could be downloaded where this
was written.
"""
from __future__ import annotations

import threading
import uuid
from typing import Iterator

import numpy as np
import torch

from lab.audio import AudioChunk, resampled
from lab.engines.base import BuildReport
import lab.engines.torch_common as tc
from lab.errors import Cancelled, LabError
from lab.measure.metrics import Timeline
from lab.request import Request, validate_user_audio
from lab.spec import VariantSpec

INPUT_SAMPLE_RATE_HZ = 16000    # the audio encoder (Whisper) takes 16 kHz; streaming_prefill does not resample
OUTPUT_SAMPLE_RATE_HZ = 24000   # Vocos output; every streamed item also says its own .sampling_rate
TTS_EOS = "<|tts_eos|>"         # end-of-speech marker the model can leave in .text
# bitsandbytes quantizes the LLM only. The TTS (ChatTTS), the audio encoder and its projection stay in bf16: they are
# small, and the notes' bnb trouble was in the TTS path. Matched as substrings of module names.
SKIP_QUANT_MODULES = ["tts", "apm", "audio_projection_layer", "audio_avg_pooler", "vpm", "resampler", "lm_head"]


def _from_hub(cls, spec: VariantSpec, **kwargs):
    """Cache first, then the hub (torch_common.load_cached_first); always at the pinned revision."""
    return tc.load_cached_first(cls, spec.model_id, f"revision {spec.revision}",
                                f"download it where the hub is reachable: `huggingface-cli download "
                                f"{spec.model_id} --revision {spec.revision}`", **kwargs)


def load(spec: VariantSpec):
    """(model, tokenizer) as the model card loads them, with the variant's attention, dtype and quantization.
    Tests replace this function with a stand-in; nothing else in the engine knows how the model was made."""
    from transformers import AutoModel, AutoTokenizer

    if not spec.trust_remote_code:   # validation refuses this already; the loader never trusts by default
        raise LabError("trust_remote_code", "MiniCPM-o needs trust_remote_code: true with a pinned revision")
    qconfig = tc.quantization_config(spec, SKIP_QUANT_MODULES)
    try:
        model = _from_hub(
            AutoModel, spec, trust_remote_code=spec.trust_remote_code, revision=spec.revision,
            code_revision=spec.revision,   # remote code pulled from another repo is pinned too
            attn_implementation=spec.attention,
            # torch_dtype, not dtype: the remote code targets transformers 4.44, where dtype is not a load argument.
            torch_dtype=tc.DTYPES[spec.dtype], quantization_config=qconfig,
            device_map=spec.device if qconfig is not None else None,   # bnb places quantized weights itself
            # Speech in and out: the vision tower is not loaded. init_tts=True builds the TTS module's weights;
            # model.init_tts() (below, once) still has to load its tokenizer and vocoder.
            init_vision=False, init_audio=True, init_tts=True)
        tokenizer = _from_hub(AutoTokenizer, spec, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    except ImportError as e:
        raise LabError("family", f"MiniCPM-o's remote code needs packages that are not installed ({e}); install the "
                                 f"model card's list: pip install librosa soundfile vector-quantize-pytorch vocos "
                                 f"Pillow") from e
    if qconfig is None:
        model = model.to(spec.device)   # a bnb model is already placed and refuses .to()
    return model.eval(), tokenizer


def to_input_rate(audio: np.ndarray, sample_rate: int, where: str) -> np.ndarray:
    return resampled(audio, sample_rate, INPUT_SAMPLE_RATE_HZ, where, 'MiniCPM-o')


def _host_samples(audio_wav) -> np.ndarray:
    """An item's .audio_wav (a torch tensor on the device, or a numpy array) as float32 mono samples on the host."""
    if audio_wav is None:
        return np.zeros(0, np.float32)
    if isinstance(audio_wav, torch.Tensor):
        audio_wav = audio_wav.detach().float().cpu().numpy()
    return np.asarray(audio_wav, np.float32).reshape(-1)


class MiniCPMOEngine(tc.TorchEngine):
    def __init__(self, spec: VariantSpec, model, tokenizer):
        # The sample rate is updated from the items' .sampling_rate.
        super().__init__(spec, OUTPUT_SAMPLE_RATE_HZ, BuildReport(tokenizer=type(tokenizer).__name__))
        self.model = model
        self.tokenizer = tokenizer
        self.sync = tc.device_sync(spec.device)
        self.last_text = ""                        # what the model said in the last request
        if spec.compile == "inductor":
            # The LLM's forward only: every prefill and every generate step runs through it; the TTS and the vocoder
            # run as they are. Default mode, dynamic shapes: the KV cache grows each step, and mode="reduce-overhead"
            # would capture CUDA graphs, which is the separate cuda-graphs axis.
            model.llm.forward = torch.compile(model.llm.forward, dynamic=True)

    def init_tts_once(self) -> bool:
        """model.init_tts() exactly once per loaded model. It loads the TTS tokenizer and the Vocos vocoder onto the
        GPU; a second call on the same instance builds them again, and duplicate init_tts under bitsandbytes is
        where the notes hit GPU allocation trouble. The flag lives on the model, so it holds for every engine that
        wraps that instance. Returns whether it ran now."""
        if getattr(self.model, "_lab_tts_initialised", False):
            return False
        self.model.init_tts()
        self.model._lab_tts_initialised = True
        return True

    # -- prompt ----------------------------------------------------------------------------------
    def prefill_contents(self, request: Request, user_audio: np.ndarray | None) -> list[list]:
        """The content list of each streaming_prefill call, in order. The items are every context turn's text and
        audio, then the request's text, then the spoken user turn. per-segment: one call per item. batched (the
        notes' win): every text string in one call, and the audio concatenated into one array in one more call."""
        items: list = []
        for i, turn in enumerate(request.context):
            items.append(turn.text)
            if turn.audio is not None:
                items.append(to_input_rate(turn.audio, turn.sample_rate, f"context[{i}].audio"))
        items.append(request.text)
        if user_audio is not None:
            items.append(to_input_rate(user_audio, request.user_audio_sample_rate, "user_audio"))
        if self.spec.prefill == "per-segment":
            return [[item] for item in items]
        texts = [item for item in items if isinstance(item, str)]
        audio = [item for item in items if not isinstance(item, str)]
        return [texts] + ([[np.concatenate(audio)]] if audio else [])

    def _sampling(self, request: Request) -> dict:
        # streaming_generate takes these through **kwargs into its generation config. Temperature 0 is greedy, as
        # everywhere in the lab; the TTS samples either way, from the seeded global generator.
        if request.temperature == 0:
            return {"do_sample": False}
        return {"temperature": request.temperature, "top_k": request.top_k}

    # -- streaming -------------------------------------------------------------------------------
    @torch.inference_mode()
    def _stream(self, request: Request, timeline: Timeline, cancel: threading.Event | None
                ) -> Iterator[AudioChunk]:
        # Refused before the clock starts: a bad upload is the caller's input, not model time.
        user_audio = None
        if request.user_audio is not None:
            user_audio = validate_user_audio(request.user_audio, request.user_audio_sample_rate)
        timeline.sync = self.sync
        timeline.mark("request")
        responses = self._start(request, user_audio, timeline)

        budget_samples, pending_text, index, items = 0, "", 0, 0
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    raise Cancelled()
                item = next(responses, None)   # the model's work happens here, one item at a time
                if item is None:
                    break
                items += 1
                timeline.frame()
                if items == 1:
                    timeline.mark("first_frame")
                text = (getattr(item, "text", "") or "").replace(TTS_EOS, "")
                self.last_text += text
                pending_text += text
                audio = _host_samples(getattr(item, "audio_wav", None))
                if audio.size == 0:            # a text-only item: its text goes with the next audio
                    continue
                rate = int(getattr(item, "sampling_rate", None) or OUTPUT_SAMPLE_RATE_HZ)
                if index == 0:
                    self.sample_rate = rate
                    budget_samples = int(request.max_audio_s * rate)
                    timeline.mark("first_decode")
                elif rate != self.sample_rate:
                    raise LabError("model", f"MiniCPM-o changed its output rate mid-stream ({self.sample_rate} -> "
                                            f"{rate} Hz); the revision may not match this engine")
                audio = audio[:budget_samples]
                budget_samples -= len(audio)
                timeline.chunk(len(audio) / rate)
                yield AudioChunk(audio, rate, index, text=pending_text)
                pending_text, index = "", index + 1
                if budget_samples <= 0:
                    break
        finally:
            # Stop the model's generation when the caller stops (cancel, budget, or an error): closing the generator
            # ends it where it is, instead of leaving a half-run loop holding the session.
            close = getattr(responses, "close", None)
            if close is not None:
                close()

    def _start(self, request: Request, user_audio, timeline: Timeline):
        """A fresh session, the prompt prefilled, and the model's generator of (text, audio) items."""
        session_id = uuid.uuid4().hex   # a new id makes the first prefill start a fresh KV cache
        self.model.reset_session()
        if self.spec.init_tts == "request":
            self.init_tts_once()
        torch.manual_seed(request.seed)   # the TTS samples from the global generator
        self.last_text = ""
        timeline.mark("session")
        for content in self.prefill_contents(request, user_audio):
            self.model.streaming_prefill(session_id=session_id, msgs=[{"role": "user", "content": content}],
                                         tokenizer=self.tokenizer)
        timeline.mark("prefill")
        responses = self.model.streaming_generate(session_id=session_id, tokenizer=self.tokenizer,
                                                  generate_audio=True, **self._sampling(request))
        timeline.mark("generator")
        return responses


def build(spec: VariantSpec, progress) -> MiniCPMOEngine:
    clock, baseline_bytes, (model, tokenizer), load_s = tc.begin_build(spec, progress, lambda: load(spec))
    engine = MiniCPMOEngine(spec, model, tokenizer)
    notes, warmup_s = [], 0.0
    if spec.init_tts == "build":
        # Its seconds are part of getting the variant ready, so they count in load_s (and are shown apart here).
        _, tts_s = clock.run("init_tts", engine.init_tts_once)
        load_s += tts_s
        notes.append(f"init_tts at build: {tts_s:.2f} s, included in load_s")

        def warm_up():
            # One short answer: runs every kernel once and, with inductor, compiles the LLM's forward.
            for _ in engine.stream(Request("Say hello.", max_audio_s=1.0), Timeline()):
                pass

        _, warmup_s = clock.run("compiling" if spec.compile == "inductor" else "warming up", warm_up)
    else:
        # A warm-up request would run init_tts here and hide it; the first real request (the cold run) pays it
        # in its session phase instead, and compiles there too.
        notes.append("init_tts per request: it runs once per loaded model, in the first request's session phase "
                     "(the cold run); no warm-up at build")
    engine.report = tc.build_report(spec, baseline_bytes, [model], load_s=load_s, warmup_s=warmup_s,
                                    tokenizer=type(tokenizer).__name__, notes=notes)
    return engine
