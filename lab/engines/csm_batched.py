"""CSM for many listeners at once: every stream's frame in one batched step, streams joining and leaving at any
frame boundary (continuous batching). `max_streams > 1` in a csm spec builds this engine.

The step is `CsmEngine._frame`, unchanged: it is written over a batch of rows, and here each row is one stream,
over caches with one row per stream, each at its own position (lab.engines.kv.RowKV). The codec decodes that frame
for every row in the same step, with per-row streaming state, so no stream waits for another's chunk. What this
module adds is the model runner around the step, in one thread of its own; who runs in which row, and when arrivals
join, is lab.serving.scheduler's (torch-free, tested on a fake clock):

- `stream(request)` hands the request to the scheduler and yields its chunks as they come. There is no per-engine
  lock (Engine.stream holds one): many callers stream at once.
- At each frame boundary the scheduler admits waiting requests into free slots, and this prefills their prompts
  together (right-padded, in one forward), runs one frame for every active slot, and hands each stream its frame. A
  stream that ends (EOS, its cap, a cancel, a consumer that went away) frees its slot for the next frame.
- On CUDA the step replays from a CUDA graph per bucket: the smallest power of two of rows covering the highest
  active slot (slots are given lowest first, so active rows stay packed at the front), and, with SDPA, the smallest
  length covering the longest stream, so attention reads only as far as the longest stream has come (the Triton
  rows attention skips what no stream has reached by itself, over one length).
- The host handles frame t while the GPU runs frame t+1: each frame's codes and audio are copied into one of two
  pinned buffers, and the host waits only for the older one.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from lab.audio import AudioChunk, ChunkEmitter, frames_for
from lab.engines.codec import StreamingMimiDecoder
from lab import gpu
from lab.engines.csm import COMPILED, FRAME_RATE_HZ, CsmEngine
from lab.engines.csm import build as build_csm
from lab.engines.kv import GrowingKV, RowKV, static_kv_for
import lab.engines.torch_common as tc
from lab.errors import Cancelled, LabError
from lab.measure.metrics import Timeline
from lab.request import Request
from lab.serving.scheduler import AdmissionPolicy, Scheduler
from lab.spec import VariantSpec

# KV room per stream: 1024 positions hold a prompt of up to 250 tokens and 60 s of audio (750 frames).
BATCHED_POSITIONS = 1024
LENGTH_BUCKETS = (256, 512, 1024)
SAMPLING_TOP_K = 50         # one top-k for every sampled stream in a batch (the per-row temperature varies)
_MASK31 = 0x7FFFFFFF


def row_uniforms(seeds: torch.Tensor, steps: torch.Tensor, codebooks: int, ids: int) -> torch.Tensor:
    """Draws in (0, 1), shaped (codebooks, rows, ids), from each row's seed and frame counter alone: a
    counter-based hash on the device (capturable, no generator state), so a stream's draws are the same whichever
    neighbours share its batch. Every product stays below 2**63."""
    index = torch.arange(codebooks * ids, device=seeds.device).view(codebooks, 1, ids)
    h = ((seeds * 0x27D4EB2F + steps * 0x165667B1) & _MASK31)[None, :, None] ^ ((index * 0x9E3779B1) & _MASK31)
    for multiplier in (0x45D9F3B, 0x2C1B3C6D, 0x297A2D39):
        h = ((h ^ (h >> 15)) * multiplier) & _MASK31
    return (h.float() + 0.5) / float(_MASK31 + 1)


def bucket(n: int, sizes) -> int:
    return next(s for s in sizes if s >= n)


@dataclass
class Ticket:
    """One request in the batched engine: what the caller waits on, and the scheduler's bookkeeping for it."""
    request: Request
    timeline: Timeline
    cancel: threading.Event | None
    prompt_len: int
    max_frames: int
    text_ids: list[int] | None = None   # a text-only prompt: embedded with the other arrivals' at admission
    prompt: torch.Tensor | None = None  # else its embeddings (1, positions, width), built at open()
    out: queue.Queue = field(default_factory=queue.Queue)   # AudioChunk, an exception, or None at the end
    row: int = -1
    launched: int = 0                   # frames launched on the device for it
    frames: int = 0                     # frames the host has taken
    kept: int = 0                       # of them, frames of speech (not the end-of-speech frame)
    # The stream's codes and audio, frame by frame, in buffers allocated at admission: a chunk is a view of its
    # frames, because joining them into a new array stalls the host when many streams are due a chunk at once,
    # and the GPU waits for the host's next launch meanwhile (docs/GPU.md, "H200, 1024 streams in real time").
    codes: np.ndarray | None = None     # (max_frames, codebooks)
    audio: np.ndarray | None = None     # (max_frames, samples)
    emitter: ChunkEmitter | None = None
    abandoned: bool = False             # its consumer went away (a closed page): free the slot
    done: bool = False

    @property
    def playing(self) -> bool:
        """Whether it has sent a chunk (the scheduler caps admissions while any stream plays)."""
        return self.emitter is not None and self.emitter.index > 0

    def chunks(self) -> Iterator[AudioChunk]:
        try:
            while (item := self.out.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.abandoned = not self.done

    @property
    def all_codes(self) -> np.ndarray:
        return self.codes[: self.kept] if self.codes is not None else np.zeros((0, 0), np.int64)


class BatchedCsmEngine(CsmEngine):
    """The model runner of many CSM streams: it binds, steps, captures, prefills, launches and takes; which request
    runs in which row, and when arrivals join, is its scheduler's (lab.serving.scheduler)."""
    # The step runs at a bucket of rows and a KV length per graph: with inductor, each piece is compiled once over
    # symbolic sizes (and once for a single row, which dynamo always specializes), not once per bucket.
    compile_options = {"dynamic": True}

    def __init__(self, spec: VariantSpec, model, processor, rows: int | None = None):
        # The single-stream state CsmEngine sets up is left small (growing caches): this engine's step runs over
        # the row caches below, bound to the step per bucket (`_bind`).
        super().__init__(spec, model, processor, static_kv=False)
        self.cache_positions = min(self.config.max_position_embeddings, BATCHED_POSITIONS)
        self.rows_asked = rows or spec.max_streams
        self.rows = self.rows_asked
        if self.device.type == "cuda":
            self.rows, self.cache_positions = self._room_that_fits()
        # fused.rows_attention (attention: triton) skips the slots no stream has reached, so a shorter view saves
        # it nothing; and with inductor a view shorter than its buffer is slower, not faster (docs/GPU.md, "H200,
        # 1024 streams in real time"). One length there: a third of the graphs to compile and capture.
        self.length_buckets = (self.cache_positions,) if spec.attention == "triton" else tuple(
            b for b in LENGTH_BUCKETS if b < self.cache_positions) + (self.cache_positions,)
        self.row_buckets = tuple(1 << i for i in range(self.rows.bit_length()) if 1 << i < self.rows) + (self.rows,)
        width = self.model.backbone_model.embed_tokens.embed_audio_tokens.weight.dtype
        self.row_kv = RowKV.allocate(self.config, self.rows, self.cache_positions, width, self.device)
        self.row_depth_kv = static_kv_for(self.config.depth_decoder_config, self.num_codebooks, width, self.device,
                                          rows=self.rows)
        self.row_codec = StreamingMimiDecoder(self.model.codec_model, static_positions=2 * self.cache_positions,
                                              rows=self.rows)
        self.row_codec.reset()
        if spec.attention == "triton":
            # Every stream's decode step attends through one Triton program per (row, kv head) over that row's mask:
            # SDPA's choice here (cuDNN's flash kernel) works in tiles of 64 queries for the 1-4 a decode step has.
            from lab.engines import fused

            fused.use_rows_attention(*self.attention_stacks())
        self.hidden_rows = torch.zeros(self.rows, self.config.hidden_size, dtype=width, device=self.device)
        self.temperature_rows = torch.zeros(self.rows, 1, device=self.device)
        self.seed_rows = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self.step_rows = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        # With inductor the codec's frame is compiled too: at 1024 rows it is a quarter of the step, most of it
        # small element-wise work and state copies around the convolutions. Its sizes are left to dynamo, which
        # makes only the row count symbolic once it changes: with every size symbolic (dynamic=True), inductor
        # fails to lower the convolutions over the carried state (torch 2.13).
        self.decode_rows = self._decode_rows
        if spec.compile in COMPILED:
            self.decode_rows = tc.compile_own(self._decode_rows)
        self.prefill_rows = tc.with_attention(spec, self._prefill_rows, prompt=True)
        self.step_graphs: dict[tuple, tuple] = {}      # (rows, length, sampled) -> (graph, (codes, audio))
        self.pool = torch.cuda.graph_pool_handle() if self.graphed else None
        self.scheduler = Scheduler(self.rows, AdmissionPolicy())
        self.frames_run = 0         # batched steps since build, and the rows they carried: for the sweep
        self.rows_run = 0
        # The interpreter's switch interval is left as Python sets it: a shorter one made this engine slower
        # beside busy page handlers, not faster (docs/GPU.md, "H200, many streams").
        self.runner = threading.Thread(target=self._serve, daemon=True, name=f"batched {spec.name}")
        self.runner.start()

    def attention_stacks(self) -> tuple:
        """The stacks a batched frame attends in: the backbone, the depth decoder, the codec's decoder transformer."""
        return (self.model.backbone_model, self.model.depth_decoder.model,
                self.model.codec_model.decoder.decoder_transformer)

    def _room_that_fits(self) -> tuple[int, int]:
        """(stream slots, KV positions each) whose caches fit the card's free memory after the weights, under the
        per-process cap where one is set (lab.gpu.batch_room: fewer slots, or half the room each on a small card)."""
        codec = self.model.codec_model.decoder.decoder_transformer.config
        fixed = (per_stream_bytes(self.config.depth_decoder_config, self.num_codebooks)
                 + per_stream_bytes(codec, (getattr(codec, "sliding_window", None) or 2 * self.cache_positions) + 8))
        return gpu.batch_room(gpu.free_bytes(), self.rows_asked, per_stream_bytes(self.config, 1), fixed,
                                self.cache_positions)

    def build_notes(self, graphs: int) -> list[str]:
        notes = [f"{self.rows} stream slots, {self.cache_positions} KV positions each"
                 + (f" ({self.rows_asked} asked; the GPU's free memory holds {self.rows})"
                    if self.rows < self.rows_asked else "")
                 + (f" (a {BATCHED_POSITIONS}-position room each held too few)"
                    if self.cache_positions < min(self.config.max_position_embeddings, BATCHED_POSITIONS) else "")]
        if graphs:
            notes.append(f"{graphs} CUDA graphs captured (rows {self.row_buckets[0]}..{self.rows} x lengths "
                         f"{'/'.join(map(str, self.length_buckets))} x greedy/sampled)")
        return notes

    # -- the step for one bucket -----------------------------------------------------------------
    def _bind(self, rows: int, length: int) -> None:
        """Point the frame step's caches at the first `rows` rows and `length` positions (views: no copies)."""
        self.kv = self.row_kv.view(rows, length)
        self.depth_kv = self.row_depth_kv.view(rows)
        self.codec_rows = self.row_codec.view(rows)

    def _batch_step(self, rows: int, sampled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame for the first `rows` rows: codes (rows, codebooks), and each row's audio for that frame
        (rows, samples) decoded with its own codec state."""
        uniform, temperature = None, 0.0
        if sampled:
            uniform = row_uniforms(self.seed_rows[:rows], self.step_rows[:rows], self.num_codebooks, self.audio_ids)
            temperature = self.temperature_rows[:rows]
        codes, hidden = self.frame(self.hidden_rows[:rows], uniform, temperature, SAMPLING_TOP_K)
        self.hidden_rows[:rows].copy_(hidden)
        self.step_rows[:rows].add_(1)
        return codes, self.decode_rows(codes)

    def _decode_rows(self, codes: torch.Tensor) -> torch.Tensor:
        """Each row's frame of codes (rows, codebooks) -> its audio (rows, samples), from its own codec state."""
        return self.codec_rows.decode(codes[:, :, None]).float()

    @torch.no_grad()
    def _run_step(self, rows: int, length: int, sampled: bool) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.use_graphs:
            self._bind(rows, length)
            return self._batch_step(rows, sampled)
        graph, outputs = self.step_graphs[(rows, length, sampled)]   # bound to its views when captured
        graph.replay()
        return outputs

    @torch.no_grad()
    def capture_graphs(self) -> int:
        """A graph per (rows bucket, length bucket, greedy or sampled), captured before any stream runs: capturing
        runs the step, which would move a live stream on. They share one memory pool (they never replay at once)."""
        for rows in self.row_buckets:
            for length in self.length_buckets:
                for sampled in (False, True):
                    self._bind(rows, length)
                    # The first capture warms the libraries up (cuBLAS handles, workspaces); after it, one run
                    # before each capture is enough, and each extra run costs build time (docs/GPU.md).
                    self.step_graphs[(rows, length, sampled)] = tc.capture_graph(
                        lambda: self._batch_step(rows, sampled), warmup_runs=1 if self.step_graphs else 3,
                        pool=self.pool)
        self.row_kv.pos.zero_()
        self.row_codec.reset()
        return len(self.step_graphs)

    # -- requests in -----------------------------------------------------------------------------
    def open(self, request: Request, timeline: Timeline, cancel: threading.Event | None = None) -> Ticket:
        """Queue a request; its chunks come from `ticket.chunks()`. Refuses up front what would not fit its row."""
        timeline.mark("request")
        if request.temperature > 0 and request.top_k != SAMPLING_TOP_K:
            raise LabError("top_k", f"the batched variant samples every stream with top_k {SAMPLING_TOP_K}; use "
                                    f"top_k {SAMPLING_TOP_K}, or a preset with max_streams: 1")
        # The caller's thread does no device work for a text prompt: a small copy to the GPU from here would wait
        # behind the frame in flight (one stream), so each arrival would cost a frame. The scheduler embeds the
        # arrivals' tokens together. A spoken context is encoded here (its codec work cannot be batched).
        text_ids, prompt = None, None
        if request.context:
            with torch.no_grad():
                prompt = torch.cat(self.build_prompt(request), dim=1)
            prompt_len = prompt.shape[1]
        else:
            text_ids = [int(i) for i in self._text_ids(request.text, request.speaker)]
            prompt_len = len(text_ids)
        max_frames = frames_for(request.max_audio_s, FRAME_RATE_HZ)
        # +2: the last frame runs the backbone over its codes, and one more frame may run before the host sees
        # that the stream ended (the host handles frame t while the device runs t+1).
        if prompt_len + max_frames + 2 > self.cache_positions:
            room_s = (self.cache_positions - prompt_len - 2) / FRAME_RATE_HZ
            raise LabError("max_audio_s", f"the prompt ({prompt_len} positions) plus {max_frames} frames does "
                                          f"not fit a stream's KV row ({self.cache_positions} positions); use "
                                          f"max_audio_s of at most {max(room_s, 0):.1f}, or a shorter text")
        ticket = Ticket(request, timeline, cancel, prompt_len, max_frames, text_ids, prompt)
        self.scheduler.add(ticket)
        return ticket

    def stream(self, request: Request, timeline: Timeline,
               cancel: threading.Event | None = None) -> Iterator[AudioChunk]:
        ticket = self.open(request, timeline, cancel)
        yield from ticket.chunks()
        self.last_codes = torch.as_tensor(ticket.all_codes)
        self.served = True

    def place_in_line(self, ticket: Ticket) -> int:
        """0 once the ticket has a slot (or has ended); else its place among the requests waiting for one."""
        return self.scheduler.place_in_line(ticket)

    def busy(self) -> bool:
        return self.scheduler.busy()

    def close(self) -> None:
        self.scheduler.close()
        self.runner.join(timeout=30)
        super().close()

    # -- the frame loop: the scheduler says who runs, this runs them -----------------------------
    def _serve(self) -> None:
        in_flight = None    # the frame launched last, which the host handles after launching the next
        flip = 0
        host = [self._host_buffers() for _ in range(2)] if self.device.type == "cuda" else None
        while True:
            scheduled = self.scheduler.next_frame(in_flight is not None)
            if scheduled is None:
                return
            cancelled, admit = scheduled
            for ticket in cancelled:    # cancelled before it got a slot
                self._finish(ticket, Cancelled())
            try:
                if admit:
                    self._admit(admit)
                launched = self._launch(host[flip] if host else None)
                flip ^= 1
                if in_flight is not None:
                    self._take(*in_flight)
                in_flight = launched
            except BaseException as e:   # a failed step fails the streams in it; the engine keeps serving
                error = e if isinstance(e, LabError) else LabError(
                    "engine", f"the batched step failed ({type(e).__name__}: {e}); the log has the details")
                import traceback

                traceback.print_exception(e)
                for ticket in [t for t in self.scheduler.slots if t is not None]:
                    self._finish(ticket, error)
                in_flight = None

    @property
    def samples_per_frame(self) -> int:
        return int(round(self.sample_rate / FRAME_RATE_HZ))

    def _host_buffers(self):
        return (torch.zeros(self.rows, self.num_codebooks, dtype=torch.long, pin_memory=True),
                torch.zeros(self.rows, self.samples_per_frame, pin_memory=True), torch.cuda.Event())

    @torch.no_grad()
    def _admit(self, tickets: list[Ticket]) -> None:
        """Prefill the arrivals together: prompts right-padded into one batch through the backbone (causal, so a
        real position never sees padding), their keys and values copied into their rows, each row's state reset."""
        # torch's thread count is the process's, and another variant may have set its own since the last round.
        self.threads = self.use_threads()
        for t in tickets:
            t.timeline.mark("session")      # the wait for a slot ends here
        lens = [t.prompt_len for t in tickets]
        longest = max(lens)
        width = self.model.backbone_model.embed_tokens.embed_audio_tokens.weight
        embeds = torch.zeros(len(tickets), longest, width.shape[-1], dtype=width.dtype, device=self.device)
        texts = [i for i, t in enumerate(tickets) if t.text_ids is not None]
        if texts:   # one copy to the device and one embedding call for every text-only arrival
            ids = torch.zeros(len(texts), longest, dtype=torch.long)
            for j, i in enumerate(texts):
                ids[j, : lens[i]] = torch.tensor(tickets[i].text_ids)
            embeds.index_copy_(0, torch.tensor(texts, device=self.device),
                               self.model.embed_text_tokens(ids.to(self.device)))
        for i, t in enumerate(tickets):
            if t.prompt is not None:
                embeds[i, : lens[i]] = t.prompt[0]
        fresh = GrowingKV(self.config.num_hidden_layers)
        out = self.prefill_rows(embeds, fresh)
        rows = torch.tensor([t.row for t in tickets], device=self.device)
        lengths = torch.tensor(lens, device=self.device)
        for layer in range(self.config.num_hidden_layers):
            self.row_kv.keys[layer][:, :, :longest].index_copy_(0, rows, fresh.keys[layer])
            self.row_kv.values[layer][:, :, :longest].index_copy_(0, rows, fresh.values[layer])
        self.row_kv.reset_rows(rows, lengths)
        self.hidden_rows.index_copy_(0, rows, out[torch.arange(len(tickets), device=self.device), lengths - 1])
        self.row_codec.reset(rows)
        settings = torch.tensor([[t.request.temperature] for t in tickets], device=self.device)
        self.temperature_rows.index_copy_(0, rows, settings)
        self.seed_rows.index_copy_(0, rows, torch.tensor([t.request.seed for t in tickets], device=self.device))
        self.step_rows.index_fill_(0, rows, 0)
        self.row_kv.active.index_fill_(0, rows, 1)
        for t in tickets:   # stamped once the device is done: one sync per admission, never per frame
            if t is tickets[0]:
                self.sync()
            t.timeline.mark("prefill")
            t.emitter = ChunkEmitter(self.spec, t.timeline, self.sample_rate)
            t.codes = np.empty((t.max_frames, self.num_codebooks), np.int64)
            t.audio = np.empty((t.max_frames, self.samples_per_frame), np.float32)
            t.timeline.mark("generator")

    def _prefill_rows(self, embeds: torch.Tensor, kv) -> torch.Tensor:
        """The backbone over (arrivals, positions, width), normed: every position's state. The engine calls it as
        `prefill_rows`, under the prompts' attention context (tc.with_attention, prompt=True)."""
        return self.kernels.run_layers(self.model.backbone_model, embeds, kv)

    def _launch(self, buffers):
        """Run one frame for every active slot; returns what `_take` needs, or None when no slot is active."""
        active = [t for t in self.scheduler.slots if t is not None]
        if not active:
            return None
        rows = bucket(max(t.row for t in active) + 1, self.row_buckets)
        length = bucket(max(t.prompt_len + t.launched for t in active) + 2, self.length_buckets)
        sampled = any(t.request.temperature > 0 for t in active)
        codes, audio = self._run_step(rows, length, sampled)
        for t in active:
            t.launched += 1
        self.frames_run += 1
        self.rows_run += len(active)
        if buffers is None:                 # CPU: the step already ran
            return active, codes.numpy(), audio.numpy(), None
        codes_host, audio_host, done = buffers
        codes_host[:rows].copy_(codes, non_blocking=True)
        audio_host[:rows].copy_(audio, non_blocking=True)
        done.record()
        return active, codes_host.numpy(), audio_host.numpy(), done

    def _take(self, active: list[Ticket], codes: np.ndarray, audio: np.ndarray, done) -> None:
        """The host's share of one frame: each stream's codes and audio, a chunk where one is due, and the end of
        streams that stopped."""
        if done is not None:
            done.synchronize()
        eos = (codes[:, :-1] == self.config.codebook_eos_token_id).all(-1)
        for t in active:
            if t.done:
                continue
            if t.abandoned or (t.cancel is not None and t.cancel.is_set()):
                self._finish(t, Cancelled())
                continue
            t.frames += 1
            t.timeline.frame()
            if t.frames == 1:
                t.timeline.mark("first_frame")
            stop = bool(eos[t.row])
            if not stop:
                t.codes[t.kept] = codes[t.row]
                t.audio[t.kept] = audio[t.row]
                t.emitter.add(t.kept)            # pending frames are indices into t.audio
                t.kept += 1
            finished = stop or t.frames >= t.max_frames
            if t.emitter.pending and t.emitter.due(finished):
                frames = t.emitter.take()
                t.out.put(t.emitter.emit(t.audio[frames[0]: frames[-1] + 1].reshape(-1)))
            if finished:
                self._finish(t)

    def _finish(self, ticket: Ticket, error: BaseException | None = None) -> None:
        ticket.done = True
        # Only the frame loop's thread frees slots and admits, so the row is not reused before this write is queued.
        if self.scheduler.release(ticket):
            self.row_kv.active[ticket.row] = 0   # a device write, queued: no host sync
        if error is not None:
            ticket.out.put(error)
        ticket.out.put(None)


def per_stream_bytes(config, positions: int = BATCHED_POSITIONS, dtype_bytes: int = 2) -> int:
    """KV bytes one stream slot holds in one stack's cache: `positions` keys and values per layer, bf16."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * positions * dtype_bytes


def build(spec: VariantSpec, progress) -> BatchedCsmEngine:
    """CSM's build (lab.engines.csm.build: load, warm-up, report) with this engine's class: max_streams > 1."""
    return build_csm(spec, progress, BatchedCsmEngine)
