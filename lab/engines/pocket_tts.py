"""PocketTTS (Kyutai's 100M-parameter CPU TTS) through transformers' `PocketTTSForConditionalGeneration`.

PocketTTS has no audio vocabulary. Each frame (80 ms at 24 kHz) is one continuous latent:
  1. the backbone (a causal transformer with a KV cache) runs on the previous latent; the prompt ends
     with the audio BOS position, so the prefill itself yields the first frame's hidden state;
  2. the flow head turns Gaussian noise (zeros when greedy) into the next latent, conditioned on that
     hidden state, in `num_flow_steps` Euler steps;
  3. the end-of-speech head reads the same hidden state: once its logit crosses `eos_threshold`,
     `frames_after_eos` more frames let the codec close the utterance.
This is `generate()`'s loop (generation_pocket_tts.py, `_sample`), written out so that frames can be
decoded while the next ones are made. The latents are decoded chunk by chunk by the audio tokenizer
(a Mimi-style codec without quantizer: latent projection, upsample, windowed transformer, SEANet) with
its streaming state carried across chunks, so streamed audio equals whole-utterance decode.

Temperature: 0 is the model's deterministic mode (`do_sample=False`: the flow starts from zero noise).
Above 0 the noise is `sqrt(temperature)` times Gaussian draws from a generator seeded with
`request.seed`, as `generate(do_sample=True)` does. `request.top_k` does not apply: there are no tokens.
"""
from __future__ import annotations

import math
import threading
from typing import Iterator

import numpy as np
import torch

from lab.audio import AudioChunk, ChunkEmitter, frames_for
from lab.engines.base import Progress
from lab.engines.codec import StreamingMimiDecoder, ahead
from lab.engines.kv import GrowingKV, run_layers
import lab.engines.torch_common as tc
from lab.errors import Cancelled
from lab.measure.metrics import Timeline
from lab.request import Request
from lab.spec import VariantSpec

# `generate`'s defaults when the checkpoint's generation config does not set them (_GENERATION_DEFAULTS).
GENERATION_DEFAULTS = {"num_flow_steps": 1, "eos_threshold": -4.0, "min_frames_before_eos": 6}
# PocketTTSProcessor's defaults: short texts get more frames after end of speech.
SHORT_TEXT_MAX_WORDS, FRAMES_AFTER_EOS_SHORT_TEXT, FRAMES_AFTER_EOS = 4, 4, 2
FADE_IN_S = 0.005  # the processor fades each waveform in: a fresh decoder state starts with a click
# Kept out of bnb quantization: the flow head and the small projections around it are a sliver of the
# weights, run at batch 1, and the adaLN modulation they compute is sensitive to rounding. The CPU int8 schemes
# quantize the backbone's layers only, which keeps these and the codec in float too (as Kyutai's own int8 does).
SKIP_QUANT_MODULES = ["flow_head", "eos_head", "audio_latent_proj", "audio_prompt_proj", "loss_weighting"]


def tiny_config():
    """(model_config, codec_config): a few-hundred-thousand-parameter model and codec with the real structure, for
    fast CPU tests.
    The codec keeps the real 24 kHz rate and 1920-sample frames; its transformer window is shortened
    to 24 positions (1.5 frames) so that a short stream already runs past it."""
    from transformers import PocketTTSAudioTokenizerConfig, PocketTTSConfig

    latent_dim = 8
    model_config = PocketTTSConfig(
        vocab_size=260, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        latent_dim=latent_dim, max_position_embeddings=2048, audio_prompt_token_id=256, audio_latent_token_id=257,
        audio_prompt_bos_token_id=258, audio_bos_token_id=259,
        flow_head_config=dict(hidden_size=64, num_hidden_layers=2, latent_dim=latent_dim, condition_dim=64,
                              frequency_embedding_size=32))
    codec_config = PocketTTSAudioTokenizerConfig(
        hidden_size=32, num_filters=4, upsample_groups=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=64, latent_dim=latent_dim, sliding_window=24, encoder_config=None)
    return model_config, codec_config


def load(spec: VariantSpec):
    """(model, codec, processor or None) on the spec's device, in its dtype, attention and quantization."""
    from transformers import (PocketTTSAudioTokenizerConfig, PocketTTSAudioTokenizerModel,
                              PocketTTSConfig, PocketTTSForConditionalGeneration)

    cls, dtype = PocketTTSForConditionalGeneration, tc.DTYPES[spec.dtype]
    if spec.weights == "pretrained":
        model = tc.from_pretrained(cls, spec, spec.model_id, SKIP_QUANT_MODULES)
        # The processor holds the tokenizer, the chat template and the audio tokenizer (the codec).
        processor = tc.load_processor(spec, dtype=dtype)
        codec = processor.audio_tokenizer
    else:
        # Random init at real size (latency only: the audio is noise), or the tiny test config. The encoder
        # half of the codec is left out: without voice cloning nothing is encoded.
        if spec.weights == "tiny":
            model_config, codec_config = tiny_config()
        else:
            model_config, codec_config = PocketTTSConfig(), PocketTTSAudioTokenizerConfig(encoder_config=None)
        model = tc.init_random(cls, model_config, spec, SKIP_QUANT_MODULES)
        codec = tc.init_random(PocketTTSAudioTokenizerModel, codec_config, spec, quantize=False)
        processor = None
    if not spec.quantization.startswith("bnb"):   # bitsandbytes placed the model itself (device_map)
        model = model.to(spec.device)
    tc.quantize_int8(spec, model.model.layers)   # the CPU int8 schemes: the backbone's attention and MLP linears
    return model.eval(), codec.to(spec.device, dtype).eval(), processor


def next_latent(model, hidden: torch.Tensor, noise: torch.Tensor, num_flow_steps: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """From the backbone's last hidden state (1, positions, hidden): the next normalised latent (1, latent_dim) and
    its end-of-speech logit (1,), as `generate` computes them."""
    condition = hidden[:, -1, :]
    eos_logit = model.eos_head(condition)[:, 0].float()
    return model.sample_latent(condition, noise, num_flow_steps), eos_logit


def prompt_embeds(model, prompt_ids: torch.Tensor) -> torch.Tensor:
    """The prompt's input embeddings, as `PocketTTSModel.forward` builds them: token embeddings, with the learnt BOS
    latent at the audio BOS position (the prompt's last), through the same projection as generated latents."""
    backbone = model.model
    bos = backbone.embed_audio_latents(backbone.bos_latent)
    embeds = backbone.embed_tokens(prompt_ids)
    return torch.where((prompt_ids == model.config.audio_bos_token_id)[..., None], bos.to(embeds.dtype), embeds)


def prefill(model, prompt_ids: torch.Tensor, kv: GrowingKV) -> torch.Tensor:
    """The backbone over the whole prompt; its last hidden state is the first frame's condition."""
    return run_layers(model.model, prompt_embeds(model, prompt_ids), kv)


def frame_step(model, prev_latent: torch.Tensor, kv: GrowingKV, noise: torch.Tensor,
               num_flow_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One frame: the backbone on the previous latent (one new cache position), then the flow head. The model's own
    layers and heads, called by lab.engines.kv.run_layers rather than through `model.forward`, whose per-call work (the
    token embedding and masks of a general forward, a mask builder, output bookkeeping) a one-position step does not
    need. This is the function `compile: inductor` compiles; every variant runs it."""
    hidden = run_layers(model.model, model.model.embed_audio_latents(prev_latent), kv)
    return next_latent(model, hidden, noise, num_flow_steps)


class PocketTTSEngine(tc.TorchEngine):
    def __init__(self, spec: VariantSpec, model, codec, processor=None, fade_in_s: float = FADE_IN_S):
        super().__init__(spec, int(codec.config.sampling_rate))
        self.model, self.codec, self.processor = model, codec, processor
        self.device = torch.device(spec.device)
        self.sync = tc.device_sync(spec.device)
        self.frame_samples = int(codec.config.frame_size)
        self.fade_in_samples = int(fade_in_s * self.sample_rate)
        self.decoder = StreamingMimiDecoder(codec)
        # The checkpoint's generation config, else `generate`'s defaults.
        setting = {name: default if getattr(model.generation_config, name, None) is None
                   else getattr(model.generation_config, name) for name, default in GENERATION_DEFAULTS.items()}
        self.num_flow_steps = int(setting["num_flow_steps"])
        self.min_frames_before_eos = int(setting["min_frames_before_eos"])
        # Random weights have a random end-of-speech head: its logits sit near 0, above the -4 threshold,
        # so every utterance would end at frame 6. Latency runs need full-length audio, so only trained
        # weights listen to it. None turns the check (and its per-frame host sync) off.
        self.eos_threshold: float | None = float(setting["eos_threshold"]) if spec.weights == "pretrained" else None
        step = tc.compile_own(frame_step) if spec.compile == "inductor" else frame_step
        # The pinned attention kernel (sdpa-flash) wraps the model's calls only, as in the CSM engine.
        self.step = tc.with_attention(spec, step)
        self.prefill = tc.with_attention(spec, prefill)
        # One cache for the engine's requests (one at a time): its buffers are allocated once, then reused.
        self.kv = GrowingKV(model.config.num_hidden_layers)
        self.stand_in = None if processor is not None else tc.ByteTokenizer(
            vocab_size=min(self._placeholder_ids()), bos_id=None)
        self._latents: list[torch.Tensor] = []  # the latest request's normalised latents, one (1, latent_dim) a frame
        self.prefill_threads = 0   # the CPU threads the latest request's prefill ran on (tc.free_cores)
        self.decode_threads = 0    # the most its chunks' decodes ran on (inline decode: tc.free_cores)

    def _placeholder_ids(self) -> list[int]:
        c = self.model.config
        return [c.audio_prompt_bos_token_id, c.audio_prompt_token_id, c.audio_bos_token_id, c.audio_latent_token_id]

    def build_prompt(self, request: Request) -> tuple[torch.Tensor, int]:
        """The prompt ids (1, length), ending with the audio BOS position, and the frames to generate after
        end of speech (the processor's rule: more for texts of few words)."""
        text = request.text
        if self.processor is not None:
            conversation = [{"role": "user", "content": [{"type": "text", "text": text}]}]
            prompt = self.processor.apply_chat_template(conversation, tokenize=False)
            inputs = self.processor(text=prompt, return_tensors="pt")
            return inputs["input_ids"].to(self.device), int(inputs["frames_after_eos"][0])
        ids = self.stand_in(text) + [self.model.config.audio_bos_token_id]
        words = len(text.split())
        frames_after_eos = FRAMES_AFTER_EOS_SHORT_TEXT if words <= SHORT_TEXT_MAX_WORDS else FRAMES_AFTER_EOS
        return torch.tensor([ids], device=self.device), frames_after_eos

    def max_frames(self, request: Request, prompt_ids: torch.Tensor) -> int:
        """The request's audio budget, capped by `generate`'s own budget for this text length."""
        placeholders = torch.tensor(self._placeholder_ids(), device=self.device)
        num_text_tokens = int((~torch.isin(prompt_ids, placeholders)).sum())
        text_budget = math.ceil((num_text_tokens / 3 + 2) * self.model.config.frame_rate)
        return max(1, min(frames_for(request.max_audio_s, self.sample_rate / self.frame_samples), text_budget))

    def decode(self, latents: list[torch.Tensor], first: bool) -> np.ndarray:
        """Normalised latents of one chunk -> float32 samples, continuing the codec's streaming state."""
        codec_latents = self.model.denormalize_latents(torch.stack(latents, dim=1))  # (1, frames, latent_dim)
        hidden = self.codec.latent_proj(codec_latents.to(self.codec.dtype).transpose(1, 2))
        samples = self.decoder.decode_latents(hidden).float()
        if first:
            samples[: self.fade_in_samples] *= torch.linspace(0, 1, self.fade_in_samples, device=samples.device)
        return samples.cpu().numpy()

    @property
    def last_latents(self) -> torch.Tensor:
        """The latest request's latents in the codec's space, (1, frames, latent_dim): what `generate` returns as
        `audio_latents` and what a whole-utterance decode takes."""
        return self.model.denormalize_latents(torch.stack(self._latents, dim=1))

    @torch.no_grad()
    def _stream(self, request: Request, timeline: Timeline,
                cancel: threading.Event | None) -> Iterator[AudioChunk]:
        timeline.sync = self.sync
        timeline.mark("request")
        emitter = ChunkEmitter(self.spec, timeline, self.sample_rate)
        chunks = self._latent_chunks(request, timeline, cancel, emitter)
        if self.spec.decode == "thread":
            # The frames of the next chunk are made on a thread of their own while this one decodes the last: on
            # two cores the codec's share of a frame (about 40% of it, int8 on one thread) leaves the loop's path.
            chunks = ahead(chunks, threads=self.threads)
        self.decode_threads = 0
        for latents, first in chunks:
            # No pinned kernel here: the codec's windowed attention passes a mask, which the flash kernel refuses.
            if self.spec.decode == "thread":   # the frame loop has the other core
                samples = self.decode(latents, first)
            else:
                with tc.free_cores() as threads:
                    samples = self.decode(latents, first)
                self.decode_threads = max(self.decode_threads, threads)
            yield emitter.emit(samples)

    @torch.no_grad()
    def _latent_chunks(self, request: Request, timeline: Timeline, cancel: threading.Event | None,
                       emitter: ChunkEmitter) -> Iterator[tuple[list[torch.Tensor], bool]]:
        """The frame loop: each chunk's latents as it falls due, and whether it is the first. Decorated on its own: under
        decode: thread it runs in another thread, where the caller's no_grad does not hold."""
        cfg, dtype = self.model.config, self.model.dtype
        kv = self.kv
        kv.reset()
        generator = torch.Generator(self.device).manual_seed(request.seed)
        noise_scale = math.sqrt(request.temperature)
        self.decoder.reset()
        timeline.mark("session")

        prompt_ids, frames_after_eos = self.build_prompt(request)
        max_frames = self.max_frames(request, prompt_ids)
        kv.reserve(prompt_ids.shape[1] + max_frames)
        with tc.free_cores() as self.prefill_threads:
            hidden = self.prefill(self.model, prompt_ids, kv)
        timeline.mark("prefill")

        zeros = torch.zeros(1, cfg.latent_dim, device=self.device, dtype=dtype)
        self._latents = []
        frames_left = None  # frames still to make once end of speech is heard
        first = True
        timeline.mark("generator")

        for frame_index in range(max_frames):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            noise = zeros if noise_scale == 0 else noise_scale * torch.randn(
                1, cfg.latent_dim, device=self.device, dtype=dtype, generator=generator)
            if frame_index == 0:   # the prefill already ran the backbone for this frame
                latent, eos_logit = next_latent(self.model, hidden, noise, self.num_flow_steps)
                del hidden
            else:  # a fresh contiguous (1, 1, latent_dim) input, so a compiled step keeps one stride
                latent, eos_logit = self.step(self.model, latent[:, None, :].clone(), kv, noise, self.num_flow_steps)
            timeline.frame()
            if frame_index == 0:
                timeline.mark("first_frame")
            emitter.add(latent)
            self._latents.append(latent)
            # `generate`'s end-of-speech rule (PocketTTSEosThresholdCriteria); `.item()` syncs once a frame.
            if frames_left is not None:
                frames_left -= 1
            elif (self.eos_threshold is not None and frame_index >= self.min_frames_before_eos
                  and eos_logit.item() > self.eos_threshold):
                frames_left = frames_after_eos
            finished = frames_left == 0 or frame_index == max_frames - 1
            if not emitter.due(finished):
                continue
            yield emitter.take(), first
            first = False
            if finished:
                return


def build(spec: VariantSpec, progress: Progress) -> PocketTTSEngine:
    clock, baseline_bytes, (model, codec, processor), load_s = tc.begin_build(spec, progress, lambda: load(spec))
    fade_in_s = getattr(processor, "fade_in_duration", FADE_IN_S)
    engine = PocketTTSEngine(spec, model, codec, processor, fade_in_s)

    def warm_up():
        # Eight frames: long enough for inductor to compile the step and recompile it once the cache
        # length turns dynamic, so the first real request only pays for its own prefill.
        eight_frames_s = 8 * engine.frame_samples / engine.sample_rate
        request = Request(text="Warm up the frame loop.", seed=0, max_audio_s=eight_frames_s)
        for _ in engine.stream(request, Timeline()):
            pass

    _, warmup_s = clock.run("compiling" if spec.compile == "inductor" else "warming up", warm_up)
    engine.report = tc.build_report(
        spec, baseline_bytes, [model, codec], load_s=load_s, warmup_s=warmup_s,
        tokenizer=(f"{type(processor.tokenizer).__name__} ({spec.model_id})" if processor is not None
                   else tc.ByteTokenizer.name),
        notes=[] if spec.weights == "pretrained" else [
            f"{spec.weights} weights: latency only, the audio is noise; end-of-speech is ignored, so every "
            f"request runs to max_audio_s (or the model's text-length budget)"],
    )
    return engine
