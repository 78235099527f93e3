"""Qwen2.5-Omni (Qwen/Qwen2.5-Omni-7B, -3B) over transformers' own modules, streamed stage by stage.

Three stages, each the model's own module and weights:
    thinker    Qwen2_5OmniThinkerForConditionalGeneration: the audio encoder (for a spoken turn) and the text LLM
    talker     Qwen2_5OmniTalkerForConditionalGeneration: speech codes from the thinker's reply states
    token2wav  Qwen2_5OmniToken2WavModel: a DiT (codes -> mel, an ODE solved in `dit_steps` steps) and BigVGAN

transformers' `generate(return_audio=True)` runs them one after another: the whole text, then every code, then the
whole waveform. Here they stream. The talker's step k reads the thinker's reply state for token k (its last hidden
state plus its embedding, as generate() builds `thinker_reply_part`), so the thinker runs one token ahead of the
talker: one step of each per code, `_pair_step`, until the thinker ends, then the talker alone, `_talker_step`.
Codes go to token2wav in chunks (first_chunk_frames codes, growing by chunk_growth up to max_chunk_frames; one code
is 20 ms of audio at the 7B's sizes). Each chunk's DiT runs over a window: up to DIT_CONTEXT_BLOCKS blocks of codes
already spoken, the chunk, and `lookahead_frames` codes after it (held back until they exist), aligned to the DiT's
attention blocks; BigVGAN vocodes the window's mel and the chunk's samples are kept. The DiT's receptive field
grows with every ODE evaluation, so a chunked waveform is close to, not equal to, the whole-utterance one; with one
chunk covering the answer it equals transformers' token2wav for the same noise (tests/test_qwen_omni.py).

The lab's phases (lab.measure.metrics.PHASES) carry the notes' names here (PHASE_NAMES); stacked, they are TTFB:
    session       caches reset, the request's seeds and the DiT's noise drawn
    prefill       the prompt tokenized, a spoken turn resampled to 16 kHz and encoded, the thinker's prefill
    generator     thinker first token: its first reply token, and that token's reply state the talker needs
    first_frame   talker first codes: the talker's prefill and steps until the first chunk's codes are there
    first_decode  first audio chunk: token2wav over that chunk, samples on the host

The vision tower is never used (no image or video input), so it is not built (random/tiny) or is dropped after
loading (pretrained). Without vision inputs the model's 3D positions (get_rope_index's text-and-audio branch) are
0..n-1 on all three axes, which is what lab.engines.kv's caches give.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from lab.audio import AudioChunk, ChunkEmitter, frames_for, resampled
from lab.engines import torch_common as tc
from lab.engines.kv import GrowingKV, run_layers, static_kv_for
from lab.engines.sampling import pick
from lab.errors import Cancelled, LabError
from lab.measure.metrics import Timeline
from lab.request import Request, validate_user_audio
from lab.spec import VariantSpec

FAMILY = "qwen2.5-omni"
INPUT_SAMPLE_RATE_HZ = 16000     # the audio encoder's mel features are Whisper's, at 16 kHz
OUTPUT_SAMPLE_RATE_HZ = 24000    # BigVGAN's output rate
SPEAKER = "Chelsie"              # generate()'s default voice (spk_dict.pt of the checkpoint)
# The model card's system prompt: with another one the released talker is not trained to speak.
SYSTEM_PROMPT = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving "
                 "auditory and visual inputs, as well as generating text and speech.")
# bitsandbytes quantizes the thinker's LLM only: the audio encoder, talker and token2wav stay in bf16/fp32 (token2wav
# must run in fp32). Matched as substrings of module names.
SKIP_QUANT_MODULES = ["audio_tower", "visual", "talker", "token2wav", "lm_head"]
TALKER_REPETITION_PENALTY = 1.05   # generate()'s default for the talker; greedy picks depend on it
THINKER_MAX_NEW_TOKENS = 1024      # generate()'s default thinker_max_new_tokens
# Random weights never say end-of-text, so the thinker would run beside every code. The answer is cut at this many
# text tokens per second of the request's audio cap (English speech is 2-3 words, about 3-4 tokens, a second), so
# the thinker runs about as long as a real answer's would. Labelled in the build notes.
RANDOM_REPLY_TOKENS_PER_S = 4.0
# The DiT attends within its block and, in some layers, one block back or ahead; a window keeps this many blocks of
# codes already spoken before each chunk.
DIT_CONTEXT_BLOCKS = 2
MAX_THINKER_POSITIONS = 4096       # static KV: system prompt, context, a 30 s spoken turn (750 tokens) and the reply
PHASE_NAMES = {"session": "session", "prefill": "prefill (audio encoder included)", "generator": "thinker first token",
               "first_frame": "talker first codes", "first_decode": "first audio chunk"}


def tiny_config():
    """A Qwen2.5-Omni small enough for CPU tests: the same structure (audio encoder, thinker, talker, DiT, BigVGAN),
    every size shrunk; special ids moved inside the small vocabularies."""
    from transformers import Qwen2_5OmniConfig

    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}   # sums to head_dim / 2
    talker_rope = {**rope, "mrope_section": [2, 2, 2]}
    text = dict(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, rope_parameters=rope)
    audio = dict(num_mel_bins=128, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                 output_dim=32, n_window=50, max_source_positions=1500)
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                  fullatt_block_indexes=[0])
    thinker = dict(text_config=text, audio_config=audio, vision_config=vision, audio_token_index=300,
                   image_token_index=301, video_token_index=302, audio_start_token_id=303, audio_end_token_id=304,
                   user_token_id=305, vision_start_token_id=306, vision_end_token_id=307)
    talker = dict(vocab_size=128, embedding_size=32, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=12, max_position_embeddings=4096,
                  rope_parameters=talker_rope, tts_text_start_token_id=310, tts_text_end_token_id=311,
                  tts_text_pad_token_id=309, tts_codec_start_token_id=121, tts_codec_end_token_id=122,
                  tts_codec_pad_token_id=120, tts_codec_mask_token_id=124, audio_token_index=300,
                  image_token_index=301, video_token_index=302, audio_start_token_id=303, audio_end_token_id=304,
                  vision_start_token_id=306, vision_end_token_id=307)
    dit = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, head_dim=16, ff_mult=2, emb_dim=16,
               block_size=8, look_ahead_layers=[1], look_backward_layers=[0, 2], num_embeds=128, mel_dim=16,
               enc_emb_dim=16, enc_dim=16, enc_channels=[16, 16, 16, 16, 48], enc_attention_channels=8,
               enc_se_channels=8, enc_res2net_scale=2)
    bigvgan = dict(mel_dim=16, upsample_initial_channel=128, resblock_kernel_sizes=[3],
                   resblock_dilation_sizes=[[1, 3, 5]],
                   upsample_rates=[5, 3, 2, 2, 2, 2], upsample_kernel_sizes=[11, 7, 4, 4, 4, 4])
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker,
                             token2wav_config={"dit_config": dit, "bigvgan_config": bigvgan})


def real_size_config():
    """Qwen2.5-Omni-7B's sizes, as its published config.json gives them, for random weights at real size.
    transformers' defaults differ where it matters: their talker is thinker-sized (hidden 3584, 28 layers: a 15B
    model in all), their thinker ties its output head, and their thinker config lacks the vision markers that
    generate()'s position ids read."""
    from transformers import Qwen2_5OmniConfig

    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}
    text = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768,
                tie_word_embeddings=False, rope_parameters=rope)
    vision = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584)
    thinker = dict(text_config=text, vision_config=vision, audio_token_index=151646, image_token_index=151655,
                   video_token_index=151656, audio_start_token_id=151647, audio_end_token_id=151648, user_token_id=872,
                   vision_start_token_id=151652, vision_end_token_id=151653)
    talker = dict(vocab_size=8448, embedding_size=3584, hidden_size=896, intermediate_size=18944,
                  num_hidden_layers=24, num_attention_heads=12, num_key_value_heads=4, head_dim=128,
                  max_position_embeddings=32768, tie_word_embeddings=False, rope_parameters=rope)
    return Qwen2_5OmniConfig(thinker_config=thinker, talker_config=talker)


def _drop_vision(model) -> None:
    """No image or video input reaches the model, so its vision tower is dead weight (about 0.7B parameters)."""
    model.thinker.model.visual = None


def _random_model(cls, config, spec: VariantSpec):
    """Real-size (or tiny) random weights, built on the meta device without the vision tower and materialised on the
    spec's device, then initialised by transformers' own initialisers: a 7B builds in seconds on a GPU. The same
    weights every build, without touching the caller's RNG."""
    with torch.device("meta"):
        model = cls._from_config(config, attn_implementation=tc.attn_implementation(spec), dtype=tc.DTYPES[spec.dtype])
    _drop_vision(model)
    model.to_empty(device=spec.device)
    for module in model.modules():   # to_empty leaves every module marked as initialised from the meta build
        module.__dict__.pop("_is_hf_initialized", None)
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            tensor.__dict__.pop("_is_hf_initialized", None)
    with torch.random.fork_rng(devices=[torch.device(spec.device)] if spec.device == "cuda" else []):
        torch.manual_seed(0)
        model.initialize_weights()
        _init_left_out(model)
    return model


def _init_left_out(model) -> None:
    """What transformers' initialisers leave alone because the module's own __init__ sets it (lost by to_empty):
    BigVGAN's SnakeBeta alpha and beta, zeros in log scale."""
    from transformers.models.qwen2_5_omni import modeling_qwen2_5_omni as qo

    for module in model.modules():
        if isinstance(module, qo.Qwen2_5OmniSnakeBeta):
            module.alpha.data.zero_()
            module.beta.data.zero_()


def random_speaker(model) -> dict:
    """A voice for random/tiny weights, which ship no spk_dict.pt: seeded random conditioning and reference mel of
    the checkpoint's shapes, and the talker's own text-start token."""
    dit = model.config.token2wav_config.dit_config
    g = torch.Generator().manual_seed(0)
    return {"bos_token": model.config.talker_config.tts_text_start_token_id,
            "cond": torch.randn(1, dit.enc_emb_dim, generator=g),
            "ref_mel": torch.randn(1, 300, dit.mel_dim, generator=g)}


def load(spec: VariantSpec):
    """(model on its device, processor or None): the real checkpoint with its processor and voices, or random/tiny
    weights (a byte-level stand-in tokenizer and Whisper's feature extractor then make the prompt)."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    cls = Qwen2_5OmniForConditionalGeneration
    if spec.weights == "pretrained":
        # Qwen2_5OmniForConditionalGeneration.from_pretrained also loads spk_dict.pt (the voices) from the same repo.
        model = tc.from_pretrained(cls, spec, spec.model_id, SKIP_QUANT_MODULES)
        _drop_vision(model)
        processor = tc.load_processor(spec)
    else:
        config = tiny_config() if spec.weights == "tiny" else real_size_config()
        model = _random_model(cls, config, spec)
        model.speaker_map = {SPEAKER: random_speaker(model)}
        if spec.quantization.startswith("bnb"):
            model = _quantize_random(cls, model, spec)
        processor = None
    if spec.quantization == "none":   # bnb places quantized weights itself
        model = model.to(spec.device)
    model.token2wav.float()   # token2wav runs in float32, as generate() makes sure too
    return model.eval(), processor


def _quantize_random(cls, model, spec: VariantSpec):
    """Random weights quantized the way real ones are: saved with a voice file, loaded back with the bnb config."""
    import shutil
    import tempfile

    tmp = tempfile.mkdtemp(prefix="lab-qwen-omni-random-")
    try:
        model.save_pretrained(tmp)
        torch.save(model.speaker_map, f"{tmp}/spk_dict.pt")
        del model
        model = tc.from_pretrained(cls, spec, tmp, SKIP_QUANT_MODULES)
        _drop_vision(model)
        return model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_input_rate(audio: np.ndarray, sample_rate: int, where: str) -> np.ndarray:
    return resampled(audio, sample_rate, INPUT_SAMPLE_RATE_HZ, where, 'Qwen2.5-Omni')


@dataclass(eq=False)
class _Run:
    """One request's state between the engine's stages: sampling, caps, the DiT's noise, the prompt's states, the
    tokens and codes so far (device tensors; the host reads codes once per chunk), and how far speech has gone."""
    temperature: float
    top_k: int
    draw: Callable = None            # n -> uniforms for one pick, or None (greedy)
    pair_graph: Any = None
    talker_graph: Any = None
    max_codes: int = 0
    max_tokens: int = 0
    noise: Any = None
    talker_embeds: Any = None
    prompt_hidden: Any = None
    token: Any = None                # the thinker's next token
    tokens: list = field(default_factory=list)
    code: Any = None                 # the talker's latest code
    codes: list = field(default_factory=list)
    seen: Any = None                 # codes the talker has said (its repetition penalty)
    done: Any = None
    index: Any = None
    block: Any = None                # the codes as the host last read them
    thinker_running: bool = True
    ended_at: int | None = None      # where the talker's end code is, once the host has seen it
    available: int = 0               # codes that may be spoken
    emitted: int = 0                 # codes already spoken

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


class QwenOmniEngine(tc.TorchEngine):
    """The thinker one token ahead of the talker, `_pair_step`, then the talker alone, `_talker_step`; each written
    once and run eagerly (compile: off, growing KV), compiled by inductor, or replayed from a CUDA graph (static KV);
    token2wav per chunk, `_decode_window`."""

    def __init__(self, spec: VariantSpec, model, processor):
        super().__init__(spec, OUTPUT_SAMPLE_RATE_HZ)
        self.model, self.processor = model, processor
        self.thinker, self.talker, self.token2wav = model.thinker, model.talker, model.token2wav
        self.text_stack, self.talker_stack = self.thinker.model.language_model, self.talker.model
        self.device = torch.device(spec.device)
        self.sync = tc.device_sync(spec.device)
        thinker_config, talker_config = model.config.thinker_config, model.config.talker_config
        self.audio_token_id = thinker_config.audio_token_index
        self.dit, self.vocoder = self.token2wav.code2wav_dit_model, self.token2wav.code2wav_bigvgan_model
        dit_config, vocoder_config = self.dit.config, self.vocoder.config
        self.mel_per_code = dit_config.repeats
        self.samples_per_mel = int(np.prod(vocoder_config.upsample_rates))
        self.code_rate_hz = OUTPUT_SAMPLE_RATE_HZ / (self.mel_per_code * self.samples_per_mel)
        self.codes_per_block = max(1, dit_config.block_size // self.mel_per_code)
        self.tokenizer = None if processor else tc.ByteTokenizer(260, reserved=4)

        self._codes_and_voice(model.speaker_map, talker_config, dit_config)
        self._steps(spec)
        self.last_text = ""                                 # what the thinker said in the last request
        self.last_tokens: list[int] = []                    # its token ids
        self.last_codes: torch.Tensor | None = None         # the talker's codes of the last request, for checks

    def _codes_and_voice(self, speakers: dict, talker_config, dit_config) -> None:
        """The voice, the thinker's end ids and token cap, the talker's special codes and what it may pick."""
        voice = speakers.get(SPEAKER) or next(iter(speakers.values()))
        self.cond = voice["cond"].to(self.device).float()
        self.ref_mel = voice["ref_mel"].to(self.device).float()
        eos = self.thinker.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        self.thinker_eos = torch.tensor(eos or [-1], device=self.device)   # -1: no id ends the answer
        self.thinker_max_tokens = THINKER_MAX_NEW_TOKENS
        self.token_cap = torch.tensor(THINKER_MAX_NEW_TOKENS, device=self.device)   # this request's, on the device
        self.codec_pad, self.codec_bos = self.talker.codec_pad_token, self.talker.codec_bos_token
        self.codec_mask, self.codec_end = self.talker.codec_mask_token, self.talker.codec_eos_token
        self.talker_eos = torch.tensor([self.codec_pad, self.codec_end], device=self.device)  # as generate()'s
        embed = self.text_stack.embed_tokens
        with torch.no_grad():
            ids = torch.tensor([[voice["bos_token"], talker_config.tts_text_end_token_id,
                                 talker_config.tts_text_pad_token_id]], device=self.device)
            self.text_bos_embed, self.eos_embed, self.pad_embed = embed(ids).split(1, dim=1)
            # What the talker may pick: not its start code (generate() suppresses it), and no code token2wav cannot
            # decode (ids past the DiT's codebook that are not an end code). A trained talker never picks those; a
            # random one would index past the DiT's embedding.
            vocab = self.talker.codebook_size
            allowed = torch.arange(vocab, device=self.device) <= dit_config.num_embeds
            allowed[self.talker_eos] = True
            allowed[self.codec_bos] = False
            self.talker_logit_mask = torch.zeros(1, vocab, device=self.device).masked_fill(~allowed, float("-inf"))


    def _steps(self, spec: VariantSpec) -> None:
        """The KV caches and the step functions as the spec's compile asks: eager over growing caches, or static
        caches with inductor-compiled or CUDA-graphed one-token steps (and the graphs' input buffers)."""
        embed = self.text_stack.embed_tokens
        self.graphed = spec.compile == "cuda-graphs"
        self.static = spec.compile != "off"   # compiled and graphed steps need fixed shapes: static KV buffers
        width_dtype = embed.weight.dtype if embed.weight.dtype.is_floating_point else tc.DTYPES[spec.dtype]
        if self.static:
            self.thinker_kv = static_kv_for(self.text_stack.config, MAX_THINKER_POSITIONS, width_dtype, self.device)
            self.talker_kv = static_kv_for(self.talker_stack.config, MAX_THINKER_POSITIONS, width_dtype, self.device)
        else:
            self.thinker_kv = GrowingKV(self.text_stack.config.num_hidden_layers)
            self.talker_kv = GrowingKV(self.talker_stack.config.num_hidden_layers)
            self.thinker_kv.reserve(512)
            self.talker_kv.reserve(1024)
        self.thinker_forward, self.talker_forward = self._thinker_forward, self._talker_forward
        if spec.compile == "inductor":
            # The one-token forwards only (fixed shapes over static KV); prefills stay eager, as every prompt is a
            # new length.
            self.thinker_forward = tc.compile_own(self._thinker_forward)
            self.talker_forward = tc.compile_own(self._talker_forward)
        self.prefill = tc.with_attention(spec, self._prefill_stack, prompt=True)
        self.pair_step = tc.with_attention(spec, self._pair_step)
        self.talker_step = tc.with_attention(spec, self._talker_step)
        self.graphs: dict[tuple, tuple] = {}     # (which step, sampling settings) -> (graph, its outputs)
        if self.graphed:
            self.code_in = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.token_in = torch.zeros(1, 1, dtype=torch.long, device=self.device)
            self.done_in = torch.zeros(1, 1, dtype=torch.bool, device=self.device)
            self.index_in = torch.zeros((), dtype=torch.long, device=self.device)
            self.seen_in = torch.zeros(1, self.talker.codebook_size, dtype=torch.bool, device=self.device)
            self.uniform_thinker = torch.zeros(1, self.thinker.vocab_size, device=self.device)
            self.uniform_talker = torch.zeros(1, self.talker.codebook_size, device=self.device)

    # -- the steps: written once; compile and CUDA graphs wrap them -----------------------------------
    def _thinker_forward(self, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The thinker over one token (1, 1): the logits of the next one, and the token's reply state for the
        talker, its last hidden state plus its embedding (generate()'s thinker_reply_part)."""
        embeds = self.text_stack.embed_tokens(token)
        hidden = run_layers(self.text_stack, embeds, self.thinker_kv)
        return self.thinker.lm_head(hidden[:, -1]).float(), hidden + embeds

    def _talker_forward(self, embeds: torch.Tensor) -> torch.Tensor:
        """The talker over input states (1, n, thinker width), extending its KV: the logits of the next code."""
        hidden = run_layers(self.talker_stack, self.talker.thinker_to_talker_proj(embeds), self.talker_kv)
        return self.talker.codec_head(hidden[:, -1]).float()

    def _talker_pick(self, logits: torch.Tensor, seen: torch.Tensor, temperature: float, top_k: int,
                     uniform: torch.Tensor | None) -> torch.Tensor:
        """The next code from the talker's logits, as generate()'s processors have it: the repetition penalty over
        every code so far (the prompt's included), the start code suppressed; then greedy or top-k sampling."""
        penalized = torch.where(logits < 0, logits * TALKER_REPETITION_PENALTY, logits / TALKER_REPETITION_PENALTY)
        logits = torch.where(seen, penalized, logits) + self.talker_logit_mask
        return pick(logits, temperature, top_k, uniform)

    def _talker_step(self, code: torch.Tensor, reply: torch.Tensor, seen: torch.Tensor, temperature: float,
                     top_k: int, uniform: torch.Tensor | None) -> torch.Tensor:
        """One talker step: the last code (1, 1) embedded plus the reply state (1, 1, width) in, the next code
        (1, 1) out; `seen` (1, codebook) gets the code it read."""
        seen.scatter_(1, code, True)
        logits = self.talker_forward(self.talker_stack.embed_tokens(code) + reply)
        return self._talker_pick(logits, seen, temperature, top_k, uniform)[:, None]

    def _pair_step(self, code: torch.Tensor, token: torch.Tensor, done: torch.Tensor, index: torch.Tensor,
                   seen: torch.Tensor, temperature: float, top_k: int, uniform_thinker: torch.Tensor | None,
                   uniform_talker: torch.Tensor | None):
        """Talker step k with the thinker one token ahead. The thinker reads token k (index) and gives token k+1;
        token k's reply state goes to the talker, or the text end's embedding where token k ends the answer
        (end-of-text, or the thinker's token cap), or the text pad's once it has ended (`done`), as generate()
        lays out the reply. Every value stays on the device: no host sync. Returns (code, next token, done, k+1)."""
        logits, reply = self.thinker_forward(token)
        ends = done | torch.isin(token, self.thinker_eos) | (index >= self.token_cap - 1)
        reply = torch.where(done[..., None], self.pad_embed, torch.where(ends[..., None], self.eos_embed, reply))
        next_token = pick(logits, temperature, top_k, uniform_thinker)[:, None]
        next_code = self._talker_step(code, reply, seen, temperature, top_k, uniform_talker)
        return next_code, next_token, ends, index + 1

    # -- CUDA graphs ------------------------------------------------------------------------------
    @torch.no_grad()
    def graphed_steps(self, temperature: float, top_k: int):
        """(pair step, talker step) for these sampling settings, each replayed from a CUDA graph captured on first
        use over the static inputs above; each replay writes its outputs into its own inputs, so replays chain."""
        settings = (temperature, top_k) if temperature > 0 else (0.0, 0)
        sampled = temperature > 0
        if ("pair", settings) not in self.graphs:
            def pair():
                code, token, done, index = self.pair_step(
                    self.code_in, self.token_in, self.done_in, self.index_in, self.seen_in, temperature, top_k,
                    self.uniform_thinker if sampled else None, self.uniform_talker if sampled else None)
                self.code_in.copy_(code)
                self.token_in.copy_(token)
                self.done_in.copy_(done)
                self.index_in.copy_(index)

            def talker():
                code = self.talker_step(self.code_in, self.pad_embed, self.seen_in, temperature, top_k,
                                        self.uniform_talker if sampled else None)
                self.code_in.copy_(code)

            self.graphs[("pair", settings)] = tc.capture_graph(pair)
            self.graphs[("talker", settings)] = tc.capture_graph(talker)
        return self.graphs[("pair", settings)][0], self.graphs[("talker", settings)][0]

    @torch.no_grad()
    def capture_graphs(self) -> int:
        self.graphed_steps(0.0, 0)
        return len(self.graphs)

    # -- prompt ------------------------------------------------------------------------------------
    def build_prompt(self, request: Request, user_audio: np.ndarray | None):
        """(token ids (1, n), segment lengths, audio features and their mask, or None): the system prompt, each
        context turn and the request as user turns (text, then its audio), and the assistant's opening. Segments
        are the turns, for prefill: per-segment."""
        turns = [(turn.text, None if turn.audio is None else to_input_rate(turn.audio, turn.sample_rate,
                                                                           f"context[{i}].audio"))
                 for i, turn in enumerate(request.context)]
        turns.append((request.text, None if user_audio is None
                      else to_input_rate(user_audio, request.user_audio_sample_rate, "user_audio")))
        clips = [audio for _, audio in turns if audio is not None]
        if self.processor is not None:
            return self._processor_prompt(turns, clips)
        features = mask = None
        if clips:
            features, mask = self._stand_in_features(clips)
        ids, lengths = self._stand_in_ids(turns, mask)
        return torch.tensor([ids], device=self.device), lengths, features, mask

    def _processor_prompt(self, turns, clips):
        """The model card's way: the chat template with the system prompt, then the processor over the text and the
        clips (Whisper features; each audio marker expanded to its clip's token count)."""
        conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]
        for text, audio in turns:
            content = [{"type": "text", "text": text}]
            if audio is not None:
                content.append({"type": "audio", "audio": "<the clip>"})   # rendered as the audio markers only
            conversation.append({"role": "user", "content": content})
        prompt = self.processor.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        out = self.processor(text=prompt if isinstance(prompt, str) else prompt[0], audio=clips or None,
                             return_tensors="pt")
        ids = out["input_ids"].to(self.device)
        start = self.processor.tokenizer.convert_tokens_to_ids("<|im_start|>")
        starts = (ids[0] == start).nonzero()[:, 0].tolist() + [ids.shape[1]]
        starts = [0] + [s for s in starts if s > 0]
        lengths = [b - a for a, b in zip(starts[:-1], starts[1:]) if b > a]
        return ids, lengths, out.get("input_features"), out.get("feature_attention_mask")

    def _stand_in_features(self, clips: list[np.ndarray]):
        """Whisper's log-mel features of 16 kHz clips, (clips, mel bins, frames), and their mask of real frames:
        the extractor the real processor wraps, built here from the config (it has no weights)."""
        from transformers import WhisperFeatureExtractor

        if not hasattr(self, "_extractor"):
            self._extractor = WhisperFeatureExtractor(
                feature_size=self.model.config.thinker_config.audio_config.num_mel_bins,
                sampling_rate=INPUT_SAMPLE_RATE_HZ)
        out = self._extractor(clips, sampling_rate=INPUT_SAMPLE_RATE_HZ, return_attention_mask=True,
                              padding="longest", return_tensors="pt")
        return out["input_features"], out["attention_mask"]

    def audio_tokens(self, feature_frames: int) -> int:
        """How many audio tokens the encoder makes of a clip's feature frames (its two stride-2 stages)."""
        return ((feature_frames - 1) // 2 + 1 - 2) // 2 + 1

    def _stand_in_ids(self, turns, mask):
        """A deterministic stand-in for random/tiny weights: UTF-8 bytes for text, the model's own audio markers
        around as many audio tokens as the encoder makes of each clip."""
        config = self.model.config.thinker_config
        segments = [self.tokenizer(f"system: {SYSTEM_PROMPT}\n")]
        clip = 0
        for text, audio in turns:
            ids = self.tokenizer(f"user: {text}\n")
            if audio is not None:
                n = self.audio_tokens(int(mask[clip].sum()))
                ids += [config.audio_start_token_id] + [self.audio_token_id] * n + [config.audio_end_token_id]
                clip += 1
            segments.append(ids)
        segments[-1] = segments[-1] + self.tokenizer("assistant:")
        return [t for seg in segments for t in seg], [len(seg) for seg in segments]

    def _prompt_embeds(self, ids: torch.Tensor, features, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """The thinker's input embeddings of the prompt, with the audio encoder's states at the audio tokens, and
        the talker's copy of them (generate() zeroes the audio positions there)."""
        embeds = self.text_stack.embed_tokens(ids)
        if features is None:
            return embeds, embeds
        audio_at = (ids == self.audio_token_id)[..., None]
        features = features.to(self.device, self.thinker.model.audio_tower.conv1.weight.dtype)
        mask = mask.to(self.device)
        if self.spec.prefill == "per-segment":   # one encoder call per clip, as each turn comes
            states = torch.cat([self.thinker.get_audio_features(features[i:i + 1], mask[i:i + 1]).last_hidden_state
                                for i in range(len(features))])
        else:                                    # every clip through the encoder in one call
            states = self.thinker.get_audio_features(features, mask).last_hidden_state
        merged = embeds.masked_scatter(audio_at, states.to(embeds.dtype))
        return merged, embeds.masked_fill(audio_at, 0)

    def _prefill_stack(self, embeds: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        """The thinker over the prompt's embeddings, in one forward (batched) or one per turn (per-segment): the
        last hidden state of every position."""
        if self.spec.prefill == "batched":
            return run_layers(self.text_stack, embeds, self.thinker_kv)
        parts, start = [], 0
        for n in lengths:
            parts.append(run_layers(self.text_stack, embeds[:, start:start + n], self.thinker_kv))
            start += n
        return torch.cat(parts, dim=1)

    def _talker_prompt(self, prompt_hidden: torch.Tensor, talker_embeds: torch.Tensor, reply: torch.Tensor):
        """The talker's prompt as generate() builds it: the prompt's thinker states plus embeddings, the voice's
        text-start embedding, then the first reply token's state; the codec's pad and start codes added to the last
        two positions."""
        codes = self.talker_stack.embed_tokens(torch.tensor([[self.codec_pad, self.codec_bos]], device=self.device))
        embeds = torch.cat([prompt_hidden + talker_embeds, self.text_bos_embed, reply], dim=1)
        return torch.cat([embeds[:, :-2], embeds[:, -2:] + codes], dim=1)

    # -- token2wav ---------------------------------------------------------------------------------
    def _dit_sample(self, codes: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Mel (1, mel_dim, frames) of codes (1, n) from the ODE's initial state `noise` (1, frames, mel_dim): the
        DiT's own sample() with the noise passed in, so that a window reuses each position's noise."""
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import RungeKutta4ODESolver

        frames = codes.shape[1] * self.mel_per_code
        cond = self.cond.unsqueeze(1).repeat(1, frames, 1)
        guidance, sway = 0.5, -1.0   # token2wav's defaults

        def velocity(t, x):
            out = self.dit(hidden_states=x, quantized_code=codes, speaker_embedding=cond,
                           condition_vector=self.ref_mel, time_step=t, apply_cfg=True)
            guided, null = torch.chunk(out, 2, dim=0)
            return guided + (guided - null) * guidance

        t = torch.linspace(0, 1, self.spec.dit_steps, device=codes.device, dtype=cond.dtype)
        t = t + sway * (torch.cos(torch.pi / 2 * t) - 1 + t)
        return RungeKutta4ODESolver(function=velocity, initial_value=noise).integrate(t)[-1].permute(0, 2, 1)

    def _decode_window(self, codes: torch.Tensor, noise: torch.Tensor, keep_from: int, keep_to: int) -> np.ndarray:
        """Samples of the window's codes keep_from..keep_to (float32, host): the DiT over the whole window, BigVGAN
        over its mel, the kept codes' samples cut out."""
        mel = self._dit_sample(codes, noise)
        wave = self.vocoder(mel).reshape(-1)   # BigVGAN's forward returns it on the host
        per_code = self.mel_per_code * self.samples_per_mel
        return wave[keep_from * per_code: keep_to * per_code].float().numpy()

    def window(self, start: int, end: int, available: int) -> tuple[int, int]:
        """The DiT window for a chunk of codes start..end: from DIT_CONTEXT_BLOCKS blocks before it (at a block
        boundary, as in a whole decode) to `lookahead_frames` codes after it, within the `available` codes."""
        first = max(0, (start // self.codes_per_block - DIT_CONTEXT_BLOCKS) * self.codes_per_block)
        return first, min(available, end + self.spec.lookahead_frames)

    # -- streaming -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _stream(self, request: Request, timeline: Timeline, cancel: threading.Event | None
                ) -> Iterator[AudioChunk]:
        user_audio = None
        if request.user_audio is not None:   # refused before the clock starts: the caller's input, not model time
            user_audio = validate_user_audio(request.user_audio, request.user_audio_sample_rate)
        timeline.sync = self.sync
        timeline.mark("request")
        run = self._session(request)
        timeline.mark("session")
        self._prefill(run, request, user_audio)
        timeline.mark("prefill")
        self._first_codes(run, timeline)
        emitter = ChunkEmitter(self.spec, timeline, self.sample_rate)
        for step in range(1, run.max_codes + 1):
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            finished = step == run.max_codes
            if not finished:
                self._step(run)
                timeline.frame()
            # A chunk is due when its codes and the window's look-ahead after them exist, or at the end.
            if not finished and len(run.codes) < run.emitted + emitter.target_frames + self.spec.lookahead_frames:
                continue
            finished = self._look(run) or finished
            yield from self._due_chunks(run, emitter, timeline, finished)
            if finished:
                break
        self.last_codes = torch.cat(run.codes, dim=1)[0, :run.available].cpu()

    def _session(self, request: Request) -> "_Run":
        """The request's sampling, graphs, caches reset, caps and the DiT's noise: everything before the prompt."""
        run = _Run(request.temperature, request.top_k)
        if self.graphed:   # captured before the resets below: capturing runs the steps
            run.pair_graph, run.talker_graph = self.graphed_steps(run.temperature, run.top_k)
        generator = torch.Generator(self.device).manual_seed(request.seed)
        run.draw = (lambda n: torch.rand(1, n, generator=generator, device=self.device)) if run.sampled \
            else (lambda n: None)
        self.thinker_kv.reset()
        self.talker_kv.reset()
        run.max_codes = frames_for(request.max_audio_s, self.code_rate_hz)
        run.max_tokens = self.thinker_max_tokens
        if self.spec.weights != "pretrained":
            run.max_tokens = min(run.max_tokens, max(2, math.ceil(request.max_audio_s * RANDOM_REPLY_TOKENS_PER_S)))
        self.token_cap.fill_(run.max_tokens)
        # The DiT's initial noise for every mel frame the answer may have, from the request's seed, on the CPU's
        # generator: a position has the same noise in every window, and a prefix of it is what a whole decode of
        # that length draws (torch's CPU normal fill goes in blocks of 16 values; mel_dim is a multiple of 16).
        run.noise = torch.randn(1, (run.max_codes + self.spec.lookahead_frames) * self.mel_per_code, self.dit.mel_dim,
                                generator=torch.Generator().manual_seed(request.seed)).to(self.device)
        return run

    def _prefill(self, run: "_Run", request: Request, user_audio) -> None:
        """The prompt (and a spoken turn through the audio encoder) into the thinker, and its first token."""
        ids, lengths, features, mask = self.build_prompt(request, user_audio)
        prompt_len = ids.shape[1]
        if self.static and prompt_len + min(run.max_tokens, run.max_codes) + 2 > MAX_THINKER_POSITIONS:
            raise LabError("max_audio_s", f"the prompt ({prompt_len} positions) and the answer do not fit the static "
                                          f"KV cache ({MAX_THINKER_POSITIONS} positions); use a shorter context or "
                                          f"spoken turn, or compile: off")
        embeds, run.talker_embeds = self._prompt_embeds(ids, features, mask)
        run.prompt_hidden = self.prefill(embeds, lengths)
        logits = self.thinker.lm_head(run.prompt_hidden[:, -1]).float()
        run.token = pick(logits, run.temperature, run.top_k, run.draw(self.thinker.vocab_size))[:, None]

    def _first_codes(self, run: "_Run", timeline: Timeline) -> None:
        """The thinker's second token (the "generator" phase ends there), then the talker's prompt and its first
        code; the graphs' inputs set."""
        if bool(torch.isin(run.token, self.thinker_eos)):
            raise LabError("model", "the thinker ended its answer at its first token, so there is nothing to speak; "
                                    "try another prompt or seed")
        run.tokens = [run.token]
        first = run.token
        logits, reply = self.with_steps(lambda: self.thinker_forward(first))
        run.token = pick(logits, run.temperature, run.top_k, run.draw(self.thinker.vocab_size))[:, None]
        timeline.mark("generator")
        run.seen = torch.zeros(1, self.talker.codebook_size, dtype=torch.bool, device=self.device)
        run.seen[0, [self.codec_mask, self.codec_pad, self.codec_bos]] = True   # the talker prompt's codec ids
        talker_prompt = self._talker_prompt(run.prompt_hidden, run.talker_embeds, reply)
        run.code = self._talker_pick(self.with_steps(lambda: self.talker_forward(talker_prompt), prompt=True),
                                     run.seen, run.temperature, run.top_k,
                                     run.draw(self.talker.codebook_size))[:, None]
        run.done = torch.zeros(1, 1, dtype=torch.bool, device=self.device)
        run.index = torch.ones((), dtype=torch.long, device=self.device)
        if self.graphed:
            for buffer, value in ((self.code_in, run.code), (self.token_in, run.token), (self.done_in, run.done),
                                  (self.index_in, run.index), (self.seen_in, run.seen)):
                buffer.copy_(value)
        run.codes = [run.code]

    def _step(self, run: "_Run") -> None:
        """One code more: the thinker's and the talker's step together while the thinker speaks, then the talker
        alone; replayed from a CUDA graph, or run as it is."""
        if self.graphed:
            if run.sampled:
                self.uniform_talker.copy_(run.draw(self.talker.codebook_size))
            if run.thinker_running:
                if run.sampled:
                    self.uniform_thinker.copy_(run.draw(self.thinker.vocab_size))
                run.tokens.append(self.token_in.clone())   # token k, which this replay reads
                run.pair_graph.replay()
            else:
                run.talker_graph.replay()
            run.code = self.code_in.clone()
        elif run.thinker_running:   # the thinker's uniforms are drawn first, then the talker's
            run.code, next_token, run.done, run.index = self.pair_step(
                run.code, run.token, run.done, run.index, run.seen, run.temperature, run.top_k,
                run.draw(self.thinker.vocab_size), run.draw(self.talker.codebook_size))
            run.tokens.append(run.token)
            run.token = next_token
        else:
            run.code = self.talker_step(run.code, self.pad_embed, run.seen, run.temperature, run.top_k,
                                        run.draw(self.talker.codebook_size))
        run.codes.append(run.code)

    def _look(self, run: "_Run") -> bool:
        """The host reads the codes, once per chunk: whether the talker has ended, and whether the thinker has."""
        run.block = torch.cat(run.codes, dim=1)[0]
        ends = torch.isin(run.block, self.talker_eos).nonzero()
        if len(ends):
            run.ended_at = int(ends[0, 0])
        run.available = run.ended_at if run.ended_at is not None else len(run.codes)
        if run.thinker_running:
            run.thinker_running = not bool(self.done_in if self.graphed else run.done)
        return run.ended_at is not None

    def _due_chunks(self, run: "_Run", emitter: ChunkEmitter, timeline: Timeline, finished: bool
                    ) -> Iterator[AudioChunk]:
        """Every chunk whose codes, and the look-ahead after them, are there (every one left, at the end)."""
        ahead = self.spec.lookahead_frames
        while run.emitted < run.available and (finished or run.available - run.emitted >= emitter.target_frames + ahead):
            end = min(run.available, run.emitted + emitter.target_frames)
            if run.emitted == 0:
                timeline.mark("first_frame")
            first, last = self.window(run.emitted, end, run.available)
            samples = self._decode_window(run.block[None, first:last],
                                          run.noise[:, first * self.mel_per_code:last * self.mel_per_code],
                                          run.emitted - first, end - first)
            chunk = emitter.emit(samples)
            chunk.text = self._text(run.tokens, run.emitted == 0, run.max_tokens)
            yield chunk
            run.emitted = end
            emitter.take()

    def with_steps(self, fn, prompt: bool = False):
        """`fn` run under the spec's attention context (`prompt`: a prompt-length forward)."""
        return tc.with_attention(self.spec, fn, prompt=prompt)()

    def _text(self, tokens: list[torch.Tensor], first: bool, max_tokens: int) -> str:
        """The text of the thinker's answer tokens new since the last chunk (the answer ends at its first
        end-of-text or at max_tokens; tokens the thinker ran on after that are dropped); last_text gathers it."""
        if first:
            self.last_text, self.last_tokens = "", []
        eos = set(self.thinker_eos.tolist())
        answer = [int(t) for t in torch.cat(tokens, dim=1)[0].tolist()][:max_tokens]
        answer = answer[:next((i for i, t in enumerate(answer) if t in eos), len(answer))]
        new = answer[len(self.last_tokens):]
        self.last_tokens += new
        if self.processor is None:   # the stand-in tokenizer's ids mean nothing: say how many there are
            text = f"<{len(new)} tokens>" if new else ""
        else:
            text = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        self.last_text += text
        return text

    def build_notes(self, graphs: int) -> list[str]:
        notes = ["vision tower left out: no image or video input (" +
                 ("dropped after loading" if self.spec.weights == "pretrained" else "not built") + ")"]
        if self.spec.weights != "pretrained":
            notes.append(f"random/tiny weights: a random voice, and the answer cut at {RANDOM_REPLY_TOKENS_PER_S:g} "
                         f"text tokens per second of the audio cap (random weights never end a sentence)")
        if graphs:
            notes.append(f"{graphs} CUDA graphs captured (thinker+talker step, talker step)")
        notes.append(f"token2wav: DiT {self.spec.dit_steps} steps; chunks of {self.spec.first_chunk_frames} codes "
                     f"first ({1000 / self.code_rate_hz:.0f} ms each), {self.spec.lookahead_frames} codes look-ahead")
        return notes


def build(spec: VariantSpec, progress) -> QwenOmniEngine:
    clock, baseline_bytes, (model, processor), load_s = tc.begin_build(spec, progress, lambda: load(spec))
    engine = QwenOmniEngine(spec, model, processor)

    def warm_up():
        # Captures the graphs (compiling first, with inductor), then one short answer runs every kernel once.
        graphs = engine.capture_graphs() if engine.graphed else 0
        for _ in engine.stream(Request("Say hello.", max_audio_s=0.5), Timeline()):
            pass
        return graphs

    compiles_before = tc.compiled_graph_count()
    stage = ("compiling" if spec.compile == "inductor" else "capturing CUDA graphs" if engine.graphed
             else "warming up")
    graphs, warmup_s = clock.run(stage, warm_up)
    notes = engine.build_notes(graphs)
    if spec.compile == "inductor":
        notes.append(f"inductor compiled {tc.compiled_graph_count() - compiles_before} graphs")
    engine.report = tc.build_report(spec, baseline_bytes, [model], load_s=load_s, warmup_s=warmup_s, notes=notes,
                                    tokenizer=type(processor).__name__ if processor else tc.ByteTokenizer.name)
    return engine

