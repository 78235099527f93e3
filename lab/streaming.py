"""Chunk scheduling, and stateful streaming decode for Mimi-style codecs (conv + transformer + SEANet).

Decoding each chunk on its own clicks at the edges: a causal convolution needs the previous chunk's
last samples as left context, and a transposed convolution spills (kernel - stride) samples into the
next chunk. `StreamingSeanet` carries both across calls, so the streamed audio equals whole-utterance
decode. It walks the transformers modules (MimiConv1d, MimiConvTranspose1d, MimiResnetBlock and their
PocketTTS copies) by shape, not by class, and never changes their weights or forward.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def chunk_frames(first: int, growth: float, largest: int) -> Iterator[int]:
    """Frames per chunk: a small first chunk for TTFB, then growing chunks so decode calls amortize."""
    size = float(first)
    while True:
        yield int(size)
        size = min(size * growth, float(largest))


def _is_conv(m: nn.Module) -> bool:
    return isinstance(getattr(m, "conv", None), nn.Conv1d) and hasattr(m, "padding_total")


def _is_conv_transpose(m: nn.Module) -> bool:
    return isinstance(getattr(m, "conv", None), nn.ConvTranspose1d)


def _is_resnet(m: nn.Module) -> bool:
    return hasattr(m, "block") and hasattr(m, "shortcut")


class StreamingSeanet:
    """Runs a list of causal conv layers chunk by chunk, carrying each layer's state between calls."""

    def __init__(self, layers):
        self.layers = list(layers)
        for m in self._convs():
            if _is_conv(m):
                if not m.causal:
                    raise ValueError("streaming decode needs causal convolutions (config.use_causal_conv)")
                if int(m.conv.stride[0]) != 1:
                    raise ValueError("streaming decode supports only stride-1 convolutions in the decoder")
            if _is_conv_transpose(m) and m.padding_left != 0:
                raise ValueError("streaming decode needs transposed convs that trim only on the right")
        self.state: dict[int, torch.Tensor] = {}

    def _convs(self):
        for layer in self.layers:
            if _is_resnet(layer):
                yield from layer.block
                yield layer.shortcut
            else:
                yield layer

    def reset(self) -> None:
        self.state.clear()

    def _conv(self, m, x):
        pad = int(m.padding_total)
        prev = self.state.get(id(m))
        if prev is None:
            # First chunk: the layer's own left padding, exactly as a whole decode starts.
            x_in = m._pad1d(x, (pad, 0), mode=m.pad_mode)
        else:
            x_in = torch.cat([prev, x], dim=-1)
        if pad:
            self.state[id(m)] = x_in[..., x_in.shape[-1] - pad:]
        return m.conv(x_in)

    def _conv_transpose(self, m, x):
        y = m.conv(x)
        tail = int(m.padding_right)  # kernel - stride samples that the next input frame also writes to
        prev = self.state.get(id(m))
        if prev is not None:
            bias = m.conv.bias
            # The overlap was computed with bias already added once; add only the partial sums.
            y[..., :tail] += prev - (bias[None, :, None] if bias is not None else 0)
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
    then SEANet with carried conv state. Works for `MimiModel` (CSM's codec)."""

    def __init__(self, codec):
        self.codec = codec
        dec = codec.decoder
        self.upsample = StreamingSeanet([dec.upsample]) if dec.upsample is not None else None
        self.seanet = StreamingSeanet(dec.decoder_seanet.layers)
        self.transformer = dec.decoder_transformer
        self.cache = None

    def reset(self) -> None:
        self.seanet.reset()
        if self.upsample is not None:
            self.upsample.reset()
        from transformers import DynamicCache
        self.cache = DynamicCache(config=self.codec.decoder.config)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """latents (1, hidden, frames) -> audio samples (frames * samples_per_frame,) on the device."""
        if self.cache is None:
            self.reset()
        h = self.upsample(latents) if self.upsample is not None else latents
        h = self.transformer(h.transpose(1, 2), cache=self.cache, use_cache=True).last_hidden_state
        return self.seanet(h.transpose(1, 2))[0, 0]

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (1, num_codebooks, frames) -> audio samples for exactly those frames."""
        return self.decode_latents(self.codec.quantizer.decode(codes))


def frames_for(max_audio_s: float, frame_rate_hz: float) -> int:
    """The frame cap for a request: whole frames that fit in max_audio_s (at least one), the same rule for
    every engine so the protocol's "same cap for every preset" holds."""
    return max(1, int(max_audio_s * frame_rate_hz + 1e-6))
