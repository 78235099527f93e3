"""Stateful streaming decode for Mimi-style codecs (conv + transformer + SEANet), and the frame loop run ahead of
its decode. The chunk schedule itself is torch-free and lives in lab.audio.

Decoding each chunk on its own clicks at the edges: a causal convolution needs the previous chunk's
last samples as left context, and a transposed convolution spills (kernel - stride) samples into the
next chunk. `StreamingSeanet` carries both across calls, so the streamed audio equals whole-utterance
decode. It walks the transformers modules (MimiConv1d, MimiConvTranspose1d, MimiResnetBlock and their
PocketTTS copies) by shape, not by class, and never changes their weights or forward.

With `static=True` every piece of state lives in a buffer allocated once and updated in place (conv context,
transposed-conv overlap, the decoder transformer's keys and values at a device-held position), so decoding a
chunk of a given size has fixed shapes and no host sync: it can be captured in a CUDA graph.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lab.engines.kv import RowKV, run_layers, static_kv_for


def ahead(items: Iterator, threads: int) -> Iterator:
    """Runs the iterator `items` on a thread of its own and yields its items here as they come, so the caller's
    work on one item (a codec decode) overlaps the making of the next (the frame loop): on the CPU, two cores instead
    of one in turn. Its exception is raised here, after the items before it. Closing this generator stops `items` at
    its next item and waits for its thread, so the engine's state is free when this returns. `threads`: torch's
    intra-op threads in that thread (OpenMP's setting is per thread). The first item is handled alone: the thread
    waits until the caller asks for the second, so nothing competes with the work that sets the TTFB."""
    out: queue.Queue = queue.Queue()
    stop, first_handled = threading.Event(), threading.Event()
    end = object()

    def run():
        torch.set_num_threads(threads)
        try:
            for index, item in enumerate(items):
                out.put(item)
                if index == 0:
                    first_handled.wait()
                if stop.is_set():
                    break
        except BaseException as e:   # handed to the caller's thread, which raises it
            out.put(_Raised(e))
        finally:
            if hasattr(items, "close"):
                items.close()
            out.put(end)

    worker = threading.Thread(target=run, daemon=True, name="frames ahead")
    worker.start()
    try:
        while (item := out.get()) is not end:
            if isinstance(item, _Raised):
                raise item.error
            yield item
            first_handled.set()
    finally:
        stop.set()
        first_handled.set()
        worker.join()


@dataclass
class _Raised:
    error: BaseException


def _is_conv(m: nn.Module) -> bool:
    return isinstance(getattr(m, "conv", None), nn.Conv1d) and hasattr(m, "padding_total")


def _is_conv_transpose(m: nn.Module) -> bool:
    return isinstance(getattr(m, "conv", None), nn.ConvTranspose1d)


def _is_resnet(m: nn.Module) -> bool:
    return hasattr(m, "block") and hasattr(m, "shortcut")


def conv_transpose(conv: nn.ConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)`: on CUDA as taps and overlap-add where the layer allows (`overlap_add_conv_transpose`), because
    cuDNN serves some of Mimi's layers with a slow grouped dgrad kernel at many rows
    (docs/RESULTS.md#the-batched-csm-engine-h200-unless-named); on the CPU the conv's own kernel, which is faster
    there (docs/RESULTS.md#the-default-cpu-presets-against-earlier-trees)."""
    if x.is_cuda and overlaps_whole_strides(conv):
        return overlap_add_conv_transpose(conv, x)
    return conv(x)


def overlaps_whole_strides(conv: nn.ConvTranspose1d) -> bool:
    """A dense or depthwise transposed conv whose kernel is a whole number of strides (all of Mimi's decoder's)."""
    depthwise = conv.groups == conv.in_channels == conv.out_channels
    return ((depthwise or conv.groups == 1) and conv.kernel_size[0] % conv.stride[0] == 0 and conv.padding[0] == 0
            and conv.output_padding[0] == 0 and conv.dilation[0] == 1)


def overlap_add_conv_transpose(conv: nn.ConvTranspose1d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a conv that `overlaps_whole_strides`, as each input step's taps (one matrix product, or
    products for depthwise) and their overlap-add."""
    cin, cout, kernel, stride = conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0]
    depthwise = conv.groups == cin == cout
    rows, _, steps = x.shape
    if depthwise:    # (rows, channels, steps, kernel), in float32
        taps = x.float()[..., None] * conv.weight.float()[None, :, 0, None, :]
    else:            # weight (cin, cout, kernel): one product over cin for every (cout, tap); the sums in float32
        taps = (x.transpose(1, 2) @ conv.weight.reshape(cin, cout * kernel)).view(rows, steps, cout, kernel)
        taps = taps.float().transpose(1, 2)
    overlap = kernel // stride           # input steps that write each output sample
    # Input step i, tap k = j * stride + m writes output sample (i + j) * stride + m.
    taps = taps.reshape(rows, cout, steps, overlap, stride)
    y = sum(nn.functional.pad(taps[:, :, :, j].reshape(rows, cout, steps * stride),
                              (j * stride, (overlap - 1 - j) * stride)) for j in range(overlap))
    if conv.bias is not None:
        y = y + conv.bias.float()[None, :, None]
    return y.to(x.dtype)


class StreamingSeanet:
    """Runs a list of causal conv layers chunk by chunk, carrying each layer's state between calls. With `static`
    and `rows` > 1, each row of the batch is its own stream, with its own state."""

    def __init__(self, layers, static: bool = False, rows: int = 1):
        self.layers = list(layers)
        self.static = static
        for m in self._convs():
            if _is_conv(m):
                if not m.causal:
                    raise ValueError("streaming decode needs causal convolutions (config.use_causal_conv)")
                if int(m.conv.stride[0]) != 1:
                    raise ValueError("streaming decode supports only stride-1 convolutions in the decoder")
            if _is_conv_transpose(m) and m.padding_left != 0:
                raise ValueError("streaming decode needs transposed convs that trim only on the right")
        # Read once, here: the modules keep these as device buffers, and int() of one is a host sync (and illegal
        # inside a CUDA-graph capture).
        self.context: dict[int, int] = {id(m): int(m.padding_total) if _is_conv(m) else int(m.padding_right)
                                        for m in self._convs() if _is_conv(m) or _is_conv_transpose(m)}
        self.state: dict[int, torch.Tensor] = {}
        if static:
            for m in self._convs():
                if _is_conv(m) and m.pad_mode != "constant":
                    raise ValueError("static streaming decode needs constant (zero) conv padding")
                if self.context.get(id(m)):
                    channels = m.conv.in_channels if _is_conv(m) else m.conv.out_channels
                    self.state[id(m)] = m.conv.weight.new_zeros(rows, channels, self.context[id(m)])
            self.reset()

    def _convs(self):
        for layer in self.layers:
            if _is_resnet(layer):
                yield from layer.block
                yield layer.shortcut
            else:
                yield layer

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Every stream starts afresh, or (static) only the streams in `rows` (a device tensor of row indices)."""
        if not self.static:
            self.state.clear()
            return
        # Buffers that make the first chunk run the same code as every later one: zeros are exactly the
        # constant left padding a whole decode starts with, and an overlap equal to the bias adds nothing.
        for m in self._convs():
            buf = self.state.get(id(m))
            if buf is None:
                continue
            bias = m.conv.bias if _is_conv_transpose(m) else None
            start = bias[None, :, None].expand_as(buf) if bias is not None else torch.zeros_like(buf)
            if rows is None:
                buf.copy_(start)
            else:
                buf.index_copy_(0, rows, start[: len(rows)])

    def view(self, rows: int) -> "StreamingSeanet":
        """The first `rows` streams, sharing this one's state buffers (a CUDA graph per bucket of streams)."""
        part = object.__new__(StreamingSeanet)
        part.__dict__.update(self.__dict__)
        part.state = {k: v[:rows] for k, v in self.state.items()}
        return part

    def _conv(self, m, x):
        pad = self.context[id(m)]
        prev = self.state.get(id(m))
        if prev is None:
            # First chunk: the layer's own left padding, exactly as a whole decode starts.
            x_in = m._pad1d(x, (pad, 0), mode=m.pad_mode)
        else:
            x_in = torch.cat([prev, x], dim=-1)
        if pad and self.static:
            prev.copy_(x_in[..., x_in.shape[-1] - pad:])
        elif pad:
            self.state[id(m)] = x_in[..., x_in.shape[-1] - pad:]
        return m.conv(x_in)

    def _conv_transpose(self, m, x):
        y = conv_transpose(m.conv, x)
        tail = self.context[id(m)]  # kernel - stride samples that the next input frame also writes to
        prev = self.state.get(id(m))
        if prev is not None:
            bias = m.conv.bias
            # The overlap was computed with bias already added once; add only the partial sums.
            y[..., :tail] += prev - (bias[None, :, None] if bias is not None else 0)
        if self.static:
            prev.copy_(y[..., y.shape[-1] - tail:])
        else:
            self.state[id(m)] = y[..., y.shape[-1] - tail:].clone()
        return y[..., : y.shape[-1] - tail]

    def _layer(self, m, x):
        if _is_conv(m):
            return self._conv(m, x)
        if _is_conv_transpose(m):
            return self._conv_transpose(m, x)
        if _is_resnet(m):
            h = x
            for sub in m.block:
                h = self._layer(sub, h)
            return self._layer(m.shortcut, x) + h
        return m(x)  # activations, identity

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = self._layer(layer, x)
        return x


class StreamingMimiDecoder:
    """Mimi codes -> audio, chunk by chunk: RVQ decode, upsample, decoder transformer with its KV cache,
    then SEANet with carried conv state. Works for `MimiModel` (CSM's codec).

    `static_positions`: run on static state (see the module docstring), with room for that many decoder
    transformer positions (the codec's internal frame rate times the longest audio).

    `rows` > 1 (static only): a batch of independent streams, one per row, each with its own conv state and its own
    position in a ring of decoder-transformer slots (lab.engines.kv.RowKV), so streams join and leave at any frame."""

    def __init__(self, codec, static_positions: int | None = None, rows: int = 1):
        self.codec = codec
        dec = codec.decoder
        static = static_positions is not None
        self.rows = rows
        self.upsample = StreamingSeanet([dec.upsample], static, rows) if dec.upsample is not None else None
        self.seanet = StreamingSeanet(dec.decoder_seanet.layers, static, rows)
        self.transformer = dec.decoder_transformer
        self.static_kv = None
        if static:
            weight = next(self.transformer.parameters())
            cfg = self.transformer.config
            window = getattr(cfg, "sliding_window", None)
            if rows > 1:
                # A ring of slots: the window, plus room for the positions one decode call writes (two per frame;
                # the batched engine decodes one frame per call). Without a window, the positions asked for.
                slots = -(-(window + 8) // 8) * 8 if window else static_positions
                self.static_kv = RowKV.allocate(cfg, rows, slots, weight.dtype, weight.device, window,
                                                ring=window is not None)
            else:
                self.static_kv = static_kv_for(cfg, static_positions, weight.dtype, weight.device, window=window)
        self.cache = None

    def reset(self, rows: torch.Tensor | None = None) -> None:
        """Every stream starts afresh, or (rows > 1) only those in `rows`, a device tensor of row indices."""
        self.seanet.reset(rows)
        if self.upsample is not None:
            self.upsample.reset(rows)
        if self.static_kv is not None:
            if self.rows == 1:
                self.static_kv.reset()
            else:
                self.static_kv.reset_rows(rows if rows is not None else self.static_kv.slots.new_tensor(
                    range(self.rows)))
            self.cache = self.static_kv
            return
        from transformers import DynamicCache
        self.cache = DynamicCache(config=self.codec.decoder.config)

    def view(self, rows: int) -> "StreamingMimiDecoder":
        """The first `rows` streams, sharing every state buffer (a CUDA graph per bucket of streams)."""
        part = object.__new__(StreamingMimiDecoder)
        part.__dict__.update(self.__dict__)
        part.upsample = self.upsample.view(rows) if self.upsample is not None else None
        part.seanet = self.seanet.view(rows)
        part.static_kv = part.cache = self.static_kv.view(rows)
        return part

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (1, hidden, frames) -> audio samples (frames * samples_per_frame,) on the device; with rows > 1,
        latents (rows, hidden, frames) -> (rows, samples)."""
        if self.cache is None:
            self.reset()
        h = self.upsample(latents) if self.upsample is not None else latents
        if self.static_kv is not None:
            h = run_layers(self.transformer, h.transpose(1, 2), self.static_kv, norm=False)
        else:
            h = self.transformer(h.transpose(1, 2), cache=self.cache, use_cache=True).last_hidden_state
        audio = self.seanet(h.transpose(1, 2))[:, 0]
        return audio if self.rows > 1 else audio[0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (1, num_codebooks, frames) -> audio samples for exactly those frames (rows > 1: one row each)."""
        return self.decode_latents(self.codec.quantizer.decode(codes))
