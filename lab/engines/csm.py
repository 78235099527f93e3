"""CSM (sesame/csm-1b) over transformers' CsmForConditionalGeneration.

Per frame, CSM runs its backbone once (one token: the previous frame's 32 codebook embeddings summed)
to predict codebook 0, then its depth decoder 31 times for codebooks 1..31. `depth_frame` and
`backbone_step` below are that step, written once; variants change how they are wrapped
(torch.compile, attention kernel, quantized weights), never which function runs.
"""
from __future__ import annotations

import threading
from typing import Iterator

import numpy as np
import torch

from lab.engines import AudioChunk, BuildReport, Engine, StageClock
from lab.engines import torch_common as tc
from lab.errors import Cancelled, LabError
from lab.metrics import Timeline
from lab.request import ContextTurn, Request
from lab.spec import VariantSpec
from lab.streaming import StreamingMimiDecoder, chunk_frames, frames_for

FRAME_RATE_HZ = 12.5
SKIP_QUANT = ["codec_model", "lm_head", "codebooks_head"]  # keep the codec and the heads in full precision


def tiny_config():
    """A CSM small enough for CPU tests: same structure, every size shrunk."""
    from transformers import CsmConfig

    codec = dict(model_type="mimi", hidden_size=32, num_filters=4, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=16, intermediate_size=64, codebook_dim=16,
                 vector_quantization_hidden_dimension=16, codebook_size=64, num_quantizers=4,
                 num_semantic_quantizers=1, upsampling_ratios=[8, 6, 5, 4], upsample_groups=32, sliding_window=32)
    depth = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=2, head_dim=16, num_codebooks=4, vocab_size=64, backbone_hidden_size=64)
    return CsmConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, num_codebooks=4, vocab_size=64, codebook_size=64,
                     text_vocab_size=300, bos_token_id=256, pad_token_id=257, audio_token_id=258,
                     audio_eos_token_id=259, codebook_pad_token_id=63, codebook_eos_token_id=0,
                     max_position_embeddings=1024, depth_decoder_config=depth, codec_config=codec)


def load_model(spec: VariantSpec):
    """(model on its device, processor or None): the real checkpoint and processor, or random/tiny weights."""
    from transformers import CsmConfig, CsmForConditionalGeneration

    if spec.weights == "pretrained":
        model = tc.from_pretrained(CsmForConditionalGeneration, spec, spec.model_id, SKIP_QUANT)
        processor = tc.load_processor(spec)
    else:
        config = tiny_config() if spec.weights == "tiny" else CsmConfig()
        model = tc.init_random(CsmForConditionalGeneration, config, spec, SKIP_QUANT)
        processor = None
    if spec.quantization == "none":   # bnb places quantized weights itself
        model = model.to(spec.device)
    return model.eval(), processor


class CsmEngine(Engine):
    def __init__(self, spec: VariantSpec, model, processor):
        self.spec = spec
        self.model = model
        self.config = model.config
        self.processor = processor
        self.tokenizer = None if processor else tc.ByteTokenizer(self.config.text_vocab_size, self.config.bos_token_id)
        self.sample_rate = self.config.codec_config.sampling_rate
        self.device = torch.device(spec.device)
        self.codec = StreamingMimiDecoder(self.model.codec_model)
        self.sync = tc.device_sync(spec.device)
        self.prefill_step = self._backbone_step
        self.backbone_step = self._backbone_step
        self.depth_frame = self._depth_frame
        if spec.compile == "inductor":
            # Static caches give the compiled step fixed shapes, so it compiles once rather than per length.
            from transformers import StaticCache

            self.cache_positions = self.config.max_position_embeddings
            self.backbone_cache = StaticCache(config=self.config, max_cache_len=self.cache_positions)
            self.depth_cache = StaticCache(config=self.config.depth_decoder_config,
                                           max_cache_len=self.config.num_codebooks)
            # Only the one-token decode step is compiled: prompts vary in length, and a compiled prefill would
            # recompile for each new length (40 s on the first request after the build, measured on the H100).
            self.backbone_step = torch.compile(self._backbone_step)
            self.depth_frame = torch.compile(self._depth_frame)
        # The attention kernel choice wraps the model's steps only, never the codec or the caller's code.
        self.prefill_step, self.backbone_step, self.depth_frame = (
            tc.with_attention(spec, f) for f in (self.prefill_step, self.backbone_step, self.depth_frame))
        self.last_codes: torch.Tensor | None = None  # (frames, codebooks) of the last request, for checks
        self.report = BuildReport()

    # -- the per-frame step: one function each, whatever wraps them ------------------------------
    def _backbone_step(self, embeds: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """Backbone over `embeds` (1, n, hidden), extending `cache`; the last position's hidden state."""
        out = self.model.backbone_model(inputs_embeds=embeds, position_ids=position_ids, cache=cache, use_cache=True)
        # A fresh (hidden,) row: a slice keeps the prompt's stride, and the compiled depth step guards on
        # strides, so every new prompt length would recompile it (9 s on the H100's first request).
        return out.last_hidden_state[:, -1].clone(memory_format=torch.contiguous_format)

    def _depth_frame(self, hidden: torch.Tensor, cache, temperature: float, top_k: int, generator) -> torch.Tensor:
        """One frame's codes (1, num_codebooks): codebook 0 from the backbone head, the rest from the depth decoder."""
        depth = self.model.depth_decoder
        # The heads score vocab_size ids (2051 for CSM-1B) but the codec has codebook_size entries (2048): the
        # extra ids are specials, never audio, and would index past the codec's codebook.
        audio_ids = self.config.codec_config.codebook_size
        code = tc.pick(self.model.lm_head(hidden)[..., :audio_ids], temperature, top_k, generator)
        codes = [code]
        # Position 0 holds the backbone state, position 1 codebook 0, as generate() feeds them.
        ids = torch.stack([torch.zeros_like(code), code], dim=1)
        logits = depth(input_ids=ids, backbone_last_hidden_state=hidden, cache=cache, use_cache=True,
                       logits_to_keep=1).logits[:, -1]
        for _ in range(self.config.num_codebooks - 1):
            code = tc.pick(logits[..., :audio_ids], temperature, top_k, generator)
            codes.append(code)
            if len(codes) == self.config.num_codebooks:
                break
            logits = depth(input_ids=code[:, None], cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return torch.stack(codes, dim=1)

    # -- prompt ----------------------------------------------------------------------------------
    def _text_ids(self, text: str, speaker: int) -> list[int]:
        if self.processor is not None:
            conv = [{"role": str(speaker), "content": [{"type": "text", "text": text}]}]
            return self.processor.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"][0]
        return self.tokenizer(f"[{speaker}]{text}")

    @torch.no_grad()
    def _segments(self, request: Request) -> list[torch.Tensor]:
        """Prompt embeddings, one tensor per turn: each context turn's text, then its audio as codec frames
        closed by the audio-EOS frame, and last the text to speak."""
        backbone = self.model.backbone_model
        segments = []
        for i, turn in enumerate((*request.context, ContextTurn(request.text, speaker=request.speaker))):
            ids = torch.tensor([self._text_ids(turn.text, turn.speaker)], device=self.device)
            parts = [self.model.embed_text_tokens(ids)]
            if turn.audio is not None:
                if turn.sample_rate != self.sample_rate:
                    raise LabError(f"context[{i}].sample_rate",
                                   f"is {turn.sample_rate} Hz; CSM's codec takes {self.sample_rate} Hz audio: "
                                   f"resample it first")
                wav = torch.as_tensor(np.asarray(turn.audio, np.float32), device=self.device)[None, None]
                codes = self.model.codec_model.encode(wav.to(self.model.codec_model.dtype)).audio_codes
                codes = codes[:, : self.config.num_codebooks].transpose(1, 2)  # (1, frames, codebooks)
                eos = torch.full_like(codes[:, :1], self.config.codebook_eos_token_id)
                parts.append(backbone.embed_tokens(torch.cat([codes, eos], dim=1)))
            segments.append(torch.cat(parts, dim=1))
        return segments

    def _new_cache(self, which: str):
        if self.spec.compile == "inductor":
            cache = self.backbone_cache if which == "backbone" else self.depth_cache
            cache.reset()
            return cache
        from transformers import DynamicCache

        cfg = self.config if which == "backbone" else self.config.depth_decoder_config
        return DynamicCache(config=cfg)

    # -- streaming -------------------------------------------------------------------------------
    @torch.no_grad()
    def _stream(self, request: Request, timeline: Timeline, cancel: threading.Event | None
                ) -> Iterator[AudioChunk]:
        timeline.sync = self.sync
        timeline.mark("request")
        generator = torch.Generator(self.device).manual_seed(request.seed)
        cache = self._new_cache("backbone")
        self.codec.reset()
        max_frames = frames_for(request.max_audio_s, FRAME_RATE_HZ)
        timeline.mark("session")

        segments = self._segments(request)
        prompt_len = sum(seg.shape[1] for seg in segments)
        if self.spec.compile == "inductor" and prompt_len + max_frames > self.cache_positions:
            room_s = (self.cache_positions - prompt_len) / FRAME_RATE_HZ
            raise LabError("max_audio_s", f"the prompt ({prompt_len} positions) plus {max_frames} frames does not "
                                          f"fit the compiled KV cache ({self.cache_positions} positions); use "
                                          f"max_audio_s of at most {max(room_s, 0):.1f}, or a shorter context")
        if self.spec.prefill == "batched":
            segments = [torch.cat(segments, dim=1)]
        pos = 0
        for seg in segments:  # per-segment: one forward per turn, each extending the cache
            positions = torch.arange(pos, pos + seg.shape[1], device=self.device)[None]
            hidden = self.prefill_step(seg, positions, cache)
            pos += seg.shape[1]
        timeline.mark("prefill")
        sizes = chunk_frames(self.spec.first_chunk_frames, self.spec.chunk_growth, self.spec.max_chunk_frames)
        timeline.mark("generator")

        all_codes, pending, frames, index = [], [], 0, 0
        target = next(sizes)
        while frames < max_frames:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            codes = self.depth_frame(hidden, self._new_cache("depth"), request.temperature, request.top_k,
                                     generator)
            pending.append(codes)
            frames += 1
            timeline.frame()
            if frames == 1:
                timeline.mark("first_frame")
            if len(pending) == target or frames == max_frames:
                # The host looks at the codes only here, once per chunk, not once per frame.
                block = torch.cat(pending)                      # (n, codebooks)
                eos = (block[:, :-1] == self.config.codebook_eos_token_id).all(-1)
                stop = bool(eos.any())
                if stop:
                    block = block[: int(eos.nonzero()[0, 0])]
                pending = []
                if len(block):
                    all_codes.append(block)
                    audio = self.codec.decode(block.T[None]).float().cpu().numpy()
                    if index == 0:
                        timeline.mark("first_decode")
                    timeline.chunk(len(audio) / self.sample_rate)
                    yield AudioChunk(audio, self.sample_rate, index)
                    index += 1
                if stop:
                    break
                target = next(sizes)
            embeds = self.model.backbone_model.embed_tokens(codes[:, None, :])
            hidden = self.backbone_step(embeds, torch.tensor([[pos]], device=self.device), cache)
            pos += 1
        self.last_codes = torch.cat(all_codes) if all_codes else None

    def close(self) -> None:
        for name in ("model", "codec", "processor", "backbone_cache", "depth_cache", "prefill_step", "backbone_step",
                     "depth_frame", "last_codes"):
            self.__dict__.pop(name, None)



def build(spec: VariantSpec, progress) -> CsmEngine:
    clock = StageClock(progress, tc.device_sync(spec.device))
    baseline_bytes = tc.reset_peak_memory(spec.device)
    (model, processor), load_s = clock.run("loading", lambda: load_model(spec))
    engine = CsmEngine(spec, model, processor)

    def warm_up():
        # One short request: runs every kernel once and, with inductor, compiles the step.
        for _ in engine.stream(Request("Warm up.", max_audio_s=4 / FRAME_RATE_HZ), Timeline()):
            pass

    _, warmup_s = clock.run("compiling" if spec.compile == "inductor" else "warming up", warm_up)
    engine.report = BuildReport(
        load_s=load_s, warmup_s=warmup_s, params=tc.param_count(engine.model),
        # On a GPU, what the variant keeps allocated (weights, quantization state, static caches): what eviction
        # frees. On the CPU, its parameter and buffer bytes.
        memory_bytes=(tc.allocated_bytes(spec.device) - baseline_bytes) if spec.device == "cuda"
        else tc.memory_bytes(engine.model),
        peak_mem_bytes=tc.peak_memory_bytes(spec.device, baseline_bytes),
        tokenizer=engine.processor.__class__.__name__ if engine.processor else tc.ByteTokenizer.name)
    return engine
