"""CSM (sesame/csm-1b) over transformers' CsmForConditionalGeneration.

Per frame, CSM runs its backbone once (one token: the previous frame's 32 codebook embeddings summed)
to predict codebook 0, then its depth decoder 31 times for codebooks 1..31. `CsmEngine._frame` is that step,
written once over the model's own layers and weights; variants change how it is wrapped (torch.compile, a CUDA
graph, the attention kernel, quantized weights) and which kernels serve its layers (`self.kernels`: the model's
modules through lab/engines/kv.py, or lab/engines/fused.py's Triton kernels), never which step runs.
"""
from __future__ import annotations

import threading
from typing import Iterator

import numpy as np
import torch

from lab.audio import AudioChunk, ChunkEmitter, chunk_frames, frames_for
from lab.engines.codec import StreamingMimiDecoder
import lab.engines.torch_common as tc
from lab.errors import Cancelled, LabError
from lab.measure.metrics import Timeline
from lab.request import ContextTurn, Request
from lab.spec import VariantSpec

FRAME_RATE_HZ = 12.5
SKIP_QUANT_MODULES = ["codec_model", "lm_head", "codebooks_head"]  # keep the codec and the heads in full precision


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


def load(spec: VariantSpec):
    """(model on its device, processor or None): the real checkpoint and processor, or random/tiny weights."""
    from transformers import CsmConfig, CsmForConditionalGeneration

    if spec.weights == "pretrained":
        model = tc.from_pretrained(CsmForConditionalGeneration, spec, spec.model_id, SKIP_QUANT_MODULES)
        processor = tc.load_processor(spec)
    else:
        config = tiny_config() if spec.weights == "tiny" else CsmConfig()
        model = tc.init_random(CsmForConditionalGeneration, config, spec, SKIP_QUANT_MODULES)
        processor = None
    if spec.quantization == "none":   # bnb places quantized weights itself
        model = model.to(spec.device)
    return model.eval(), processor


GRAPHED = ("cuda-graphs", "inductor+cuda-graphs")
COMPILED = ("inductor", "inductor+cuda-graphs")


class CsmEngine(tc.TorchEngine):
    """One frame step, `_frame`, run three ways: eagerly (compile: off), with its pieces compiled by inductor,
    or replayed from a CUDA graph that holds the whole frame; its layers served by the model's modules or by
    lab/engines/fused.py's Triton kernels (kernels: torch | triton)."""

    compile_options: dict = {}   # torch.compile's, for the pieces of the step (the batched engine's differ)

    def __init__(self, spec: VariantSpec, model, processor, static_kv: bool | None = None):
        from lab.engines.kv import GrowingKV, static_kv_for

        super().__init__(spec, model.config.codec_config.sampling_rate)
        self.model = model
        self.config = model.config
        self.processor = processor
        self.tokenizer = None if processor else tc.ByteTokenizer(self.config.text_vocab_size, self.config.bos_token_id)
        self.device = torch.device(spec.device)
        self.sync = tc.device_sync(spec.device)
        self.num_codebooks = self.config.num_codebooks
        # The heads score vocab_size ids (2051 for CSM-1B) but the codec has codebook_size entries (2048): the
        # extra ids are specials, never audio, and would index past the codec's codebook.
        self.audio_ids = self.config.codec_config.codebook_size
        self.graphed = spec.compile in GRAPHED
        # Compiled and graphed steps need fixed shapes: static KV buffers, as do the Triton kernels (they write
        # keys and values into them). Eager torch steps read only what is filled.
        if static_kv is None:
            static_kv = spec.compile != "off" or spec.kernels == "triton"
        if spec.kernels == "triton" and not static_kv:
            raise ValueError("kernels: triton writes keys and values into static KV buffers: leave static_kv unset")
        self.static = static_kv
        self.cache_positions = self.config.max_position_embeddings
        width_dtype = self.model.backbone_model.embed_tokens.embed_audio_tokens.weight.dtype
        if self.static:
            self.kv = static_kv_for(self.config, self.cache_positions, width_dtype, self.device)
            self.depth_kv = static_kv_for(self.config.depth_decoder_config, self.num_codebooks, width_dtype,
                                          self.device)
        else:
            self.kv = GrowingKV(self.config.num_hidden_layers)
            self.depth_kv = GrowingKV(self.config.depth_decoder_config.num_hidden_layers)
        # The codec's decoder transformer runs at twice the frame rate (its upsampler doubles it).
        codec_positions = 2 * self.cache_positions if self.graphed else None
        self.codec = StreamingMimiDecoder(self.model.codec_model, static_positions=codec_positions)
        # What the step calls for its layers and projections: the model's modules, or the same weights through
        # lab.engines.fused's kernels. The step below is the same either way.
        self.kernels = tc.TorchKernels()
        if spec.kernels == "triton":
            from lab.engines.fused import TritonKernels

            self.kernels = TritonKernels({self.model.backbone_model: self.cache_positions,
                                          self.model.depth_decoder.model: self.num_codebooks},
                                         stacked_heads=(self.model.depth_decoder.codebooks_head,))

        self._wrap_steps(spec)
        self.use_graphs = self.graphed   # False runs the very same step without replaying graphs (for checks)
        self.frame_graphs: dict[tuple, tuple] = {}     # sampling settings -> (graph, its codes output)
        self.decode_graphs: dict[int, tuple] = {}      # frames per chunk -> (graph, codes input, audio output)
        if self.graphed:
            self.hidden_in = torch.zeros(1, self.config.hidden_size, dtype=width_dtype, device=self.device)
            self.uniform_in = torch.zeros(self.num_codebooks, self.audio_ids, device=self.device)
        self.last_codes: torch.Tensor | None = None  # (frames, codebooks) of the last request, for checks

    def _wrap_steps(self, spec: VariantSpec) -> None:
        """The frame's pieces as the spec's compile asks: eager, compiled by inductor, or compiled ahead of time;
        then the attention kernel's context around the model's steps."""
        self.prefill_step, self.backbone_step = self._backbone_step, self._backbone_step
        self.head, self.depth_first, self.depth_step = self._head, self._depth_first, self._depth_step
        if spec.compile in COMPILED:
            # The pieces are compiled, not the whole frame: each compiles once (positions are device tensors,
            # shapes are fixed), where one whole frame unrolls 31 depth steps into one slow compile. The prefill
            # stays eager: prompts vary in length and each new length would recompile.
            # Each engine compiles its own copy: the one-stream and the batched engine share these methods, and
            # dynamo's recompile limit is per code object.
            self.backbone_step = tc.compile_own(self._backbone_step, **self.compile_options)
            self.head, self.depth_first, self.depth_step = (
                tc.compile_own(f, **self.compile_options) for f in (self._head, self._depth_first, self._depth_step))
        elif spec.compile == "aot":
            # The same pieces, compiled ahead of time (ZeroGPU's route, lab/aot.py), each over the caches it writes.
            from lab.engines.aot import AheadOfTime

            self.backbone_step = AheadOfTime(self._backbone_step, self.model, [self.kv], "csm-backbone")
            self.head = AheadOfTime(self._head, self.model, [], "csm-head")
            self.depth_first = AheadOfTime(self._depth_first, self.model, [self.depth_kv], "csm-depth-first")
            self.depth_step = AheadOfTime(self._depth_step, self.model, [self.depth_kv], "csm-depth-step")
        # The attention kernel choice wraps the model's steps only, never the codec or the caller's code.
        self.prefill_step = tc.with_attention(spec, self.prefill_step, prompt=True)
        self.frame = tc.with_attention(spec, self._frame)

    # -- the frame step: written once; compile and CUDA graphs wrap it ---------------------------
    def _frame(self, hidden: torch.Tensor, uniform: torch.Tensor | None, temperature: float, top_k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame from the backbone state `hidden` (1, width): its codes (1, codebooks), codebook 0 from the
        backbone head and the rest from the depth decoder; then the backbone over those codes, whose state
        starts the next frame. `uniform` (codebooks, audio ids) feeds sampling; None when greedy."""
        u = (lambda i: None) if uniform is None else (lambda i: uniform[i])
        code = self.head(hidden, u(0), temperature, top_k)
        codes = [code]
        self.depth_kv.reset()
        logits = self.depth_first(hidden, code)
        for i in range(1, self.num_codebooks):
            code = self.kernels.pick(logits[..., : self.audio_ids], temperature, top_k, u(i))
            codes.append(code)
            if i < self.num_codebooks - 1:
                logits = self.depth_step(code)
        codes = torch.stack(codes, dim=1)
        return codes, self.backbone_step(self.model.backbone_model.embed_tokens(codes[:, None, :]))

    def _backbone_step(self, embeds: torch.Tensor) -> torch.Tensor:
        """Backbone over `embeds` (1, n, width), extending the KV cache; the last position's state (1, width)."""
        out = self.kernels.run_layers(self.model.backbone_model, embeds, self.kv)
        # A fresh contiguous row: a slice keeps the prompt's stride, and a compiled step guards on strides.
        return out[:, -1].clone(memory_format=torch.contiguous_format)

    def _head(self, hidden: torch.Tensor, uniform, temperature: float, top_k: int) -> torch.Tensor:
        return self.kernels.pick(self.kernels.linear(self.model.lm_head, hidden)[..., : self.audio_ids], temperature,
                                 top_k, uniform)

    def _depth_first(self, hidden: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
        """Depth decoder over [backbone state, codebook 0] at positions 0 and 1, as generate() feeds them:
        the logits for codebook 1."""
        embeds = torch.cat([hidden[:, None], self.model.depth_decoder.model.embed_tokens(code[:, None])], dim=1)
        return self._depth_logits(embeds)

    def _depth_step(self, code: torch.Tensor) -> torch.Tensor:
        """Codebook i-1 in at position i: the logits for codebook i. Each codebook has its own slice of the
        embedding table, at offset (i-1) * vocab_size."""
        depth = self.model.depth_decoder.model
        # code + (position - 1) * vocab_size; the position is a device tensor with static KV: no host sync.
        offset = torch.add(code[:, None], self.depth_kv.next_position(), alpha=depth.config.vocab_size)
        return self._depth_logits(depth.embed_tokens(offset - depth.config.vocab_size))

    def _depth_logits(self, embeds: torch.Tensor) -> torch.Tensor:
        depth = self.model.depth_decoder
        hidden = self.kernels.run_layers(depth.model, self.kernels.linear(depth.model.inputs_embeds_projector, embeds),
                                         self.depth_kv, norm=False)
        # The head keeps one weight per position, and the kv knows the position just run (a device tensor); it
        # applies the stack's final norm too, so the Triton kernels can fold it into the head's.
        return self.kernels.codebooks_head(depth.codebooks_head, depth.model.norm, hidden[:, -1], self.depth_kv)

    # -- CUDA graphs -----------------------------------------------------------------------------
    @torch.no_grad()   # as every request runs: a capture under autograd would compile and record other kernels
    def graphed_frame(self, temperature: float, top_k: int):
        """The frame step as a CUDA graph for these sampling settings, captured on first use (it runs the step a
        few times, so call it before a request resets its caches). Replays chain: the graph writes the next
        backbone state into its own input, so the host launches one replay per frame and nothing else."""
        key = (temperature, top_k) if temperature > 0 else (0.0, 0)
        if key not in self.frame_graphs:
            uniform = self.uniform_in if temperature > 0 else None

            def step():
                codes, hidden = self.frame(self.hidden_in, uniform, temperature, top_k)
                self.hidden_in.copy_(hidden)
                return codes

            self.frame_graphs[key] = tc.capture_graph(step)
        graph, codes_out = self.frame_graphs[key]

        def run(hidden: torch.Tensor, uniform: torch.Tensor | None):
            if hidden is not self.hidden_in:
                self.hidden_in.copy_(hidden)
            if uniform is not None:
                self.uniform_in.copy_(uniform)
            graph.replay()
            return codes_out.clone(), self.hidden_in   # the next replay overwrites codes_out

        return run

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (1, codebooks, n) -> audio on the device; replayed from a graph where one was captured for n."""
        entry = self.decode_graphs.get(codes.shape[-1]) if self.use_graphs else None
        if entry is None:
            return self.codec.decode(codes)
        graph, codes_in, audio_out = entry
        codes_in.copy_(codes)
        graph.replay()
        return audio_out

    @torch.no_grad()
    def capture_graphs(self) -> int:
        """Captures the greedy frame step and the codec decode for every chunk size the spec's schedule makes.
        Returns the number of graphs."""
        self.graphed_frame(0.0, 0)
        sizes, gen = set(), chunk_frames(self.spec.first_chunk_frames, self.spec.chunk_growth,
                                         self.spec.max_chunk_frames)
        while (n := next(gen)) not in sizes:
            sizes.add(n)
        for n in sorted(sizes):
            codes_in = torch.zeros(1, self.num_codebooks, n, dtype=torch.long, device=self.device)
            self.codec.reset()
            graph, audio_out = tc.capture_graph(lambda: self.codec.decode(codes_in))
            self.decode_graphs[n] = (graph, codes_in, audio_out)
        self.codec.reset()
        return len(self.frame_graphs) + len(self.decode_graphs)

    def build_notes(self, graphs: int) -> list[str]:
        return [f"{graphs} CUDA graphs captured (1 frame step, {graphs - 1} codec chunk sizes)"] if graphs else []

    # -- prompt ----------------------------------------------------------------------------------
    def _text_ids(self, text: str, speaker: int) -> list[int]:
        if self.processor is not None:
            conv = [{"role": str(speaker), "content": [{"type": "text", "text": text}]}]
            # CsmProcessor returns tensors (its text_kwargs say "pt"): a list of ids either way
            return [int(i) for i in self.processor.apply_chat_template(conv, tokenize=True, return_dict=True)
                    ["input_ids"][0]]
        return self.tokenizer(f"[{speaker}]{text}")

    @torch.no_grad()
    def build_prompt(self, request: Request) -> list[torch.Tensor]:
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
                codes = codes[:, : self.num_codebooks].transpose(1, 2)  # (1, frames, codebooks)
                eos = torch.full_like(codes[:, :1], self.config.codebook_eos_token_id)
                parts.append(backbone.embed_tokens(torch.cat([codes, eos], dim=1)))
            segments.append(torch.cat(parts, dim=1))
        return segments

    # -- streaming -------------------------------------------------------------------------------
    @torch.no_grad()
    def _stream(self, request: Request, timeline: Timeline, cancel: threading.Event | None
                ) -> Iterator[AudioChunk]:
        timeline.sync = self.sync
        timeline.mark("request")
        generator = torch.Generator(self.device).manual_seed(request.seed)
        sampled = request.temperature > 0
        if self.use_graphs:     # captured before the resets below: capturing runs the step
            frame = self.graphed_frame(request.temperature, request.top_k)
        else:
            frame = lambda hidden, uniform: self.frame(hidden, uniform, request.temperature, request.top_k)  # noqa: E731
        self.kv.reset()
        self.codec.reset()
        max_frames = frames_for(request.max_audio_s, FRAME_RATE_HZ)
        timeline.mark("session")

        segments = self.build_prompt(request)
        prompt_len = sum(seg.shape[1] for seg in segments)
        # +1: the last frame also runs the backbone over its codes (the state a next frame would start from).
        if self.static and prompt_len + max_frames + 1 > self.cache_positions:
            room_s = (self.cache_positions - prompt_len - 1) / FRAME_RATE_HZ
            raise LabError("max_audio_s", f"the prompt ({prompt_len} positions) plus {max_frames} frames does not "
                                          f"fit the static KV cache ({self.cache_positions} positions); use "
                                          f"max_audio_s of at most {max(room_s, 0):.1f}, or a shorter context")
        if self.spec.prefill == "batched":
            segments = [torch.cat(segments, dim=1)]
        for seg in segments:  # per-segment: one forward per turn, each extending the cache
            hidden = self.prefill_step(seg)
        timeline.mark("prefill")
        emitter = ChunkEmitter(self.spec, timeline, self.sample_rate)
        timeline.mark("generator")

        all_codes = []
        for frame_index in range(max_frames):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            uniform = torch.rand(self.num_codebooks, self.audio_ids, generator=generator,
                                 device=self.device) if sampled else None
            codes, hidden = frame(hidden, uniform)
            emitter.add(codes)
            timeline.frame()
            if frame_index == 0:
                timeline.mark("first_frame")
            if not emitter.due(finished=frame_index == max_frames - 1):
                continue
            # The host looks at the codes only here, once per chunk, not once per frame.
            block = torch.cat(emitter.take())                 # (n, codebooks)
            eos = (block[:, :-1] == self.config.codebook_eos_token_id).all(-1)
            stop = bool(eos.any())
            if stop:
                block = block[: int(eos.nonzero()[0, 0])]
            if len(block):
                all_codes.append(block)
                yield emitter.emit(self._decode(block.T[None]).float().cpu().numpy())
            if stop:
                break
        self.last_codes = torch.cat(all_codes) if all_codes else None


def build(spec: VariantSpec, progress, engine_class: type[CsmEngine] = CsmEngine) -> CsmEngine:
    """One build for both CSM engines: one stream (CsmEngine), or many through one batched step, whose module passes
    its class (lab.engines.csm_batched.build, max_streams > 1)."""
    clock, baseline_bytes, (model, processor), load_s = tc.begin_build(spec, progress, lambda: load(spec))
    engine = engine_class(spec, model, processor)

    def warm_up():
        # Captures the graphs (compiling first, with inductor), then one short request runs every kernel once.
        graphs = engine.capture_graphs() if engine.graphed else 0
        for _ in engine.stream(Request("Warm up.", max_audio_s=4 / FRAME_RATE_HZ), Timeline()):
            pass
        return graphs

    compiles_before = tc.compiled_graph_count()
    stage = ("compiling" if spec.compile in COMPILED else "compiling ahead of time" if spec.compile == "aot"
             else "capturing CUDA graphs" if engine.graphed else "warming up")
    graphs, warmup_s = clock.run(stage, warm_up)
    notes = engine.build_notes(graphs)
    if spec.compile in COMPILED:
        notes.append(f"inductor compiled {tc.compiled_graph_count() - compiles_before} graphs")
    if spec.compile == "aot":
        pieces = [engine.backbone_step, engine.head, engine.depth_first, engine.depth_step]
        notes.append(f"AOTInductor: {sum(len(p.packages) for p in pieces)} packages in "
                     f"{sum(p.compiled_s for p in pieces):.1f} s ({sum(p.loaded for p in pieces)} loaded from disk)")
    engine.report = tc.build_report(
        spec, baseline_bytes, [engine.model], load_s=load_s, warmup_s=warmup_s, notes=notes,
        tokenizer=engine.processor.__class__.__name__ if engine.processor else tc.ByteTokenizer.name)
    return engine
