"""KV caches for the lab's own step functions, and the one function that runs a transformer stack over them.

The engines call the models' own decoder layers (transformers' modules and weights, untouched), but own the
loop around them: the positions, the attention mask and the cache. That is what lets one step function run
three ways: eagerly, compiled by inductor, and captured in a CUDA graph.

- `GrowingKV` appends keys and values each step, as transformers' DynamicCache does. Attention reads only
  what is filled, so eager steps stay cheap, but shapes change every step: no fixed graph.
- `StaticKV` writes into buffers allocated once, at a position held on the device. Every step has the same
  shapes and no host sync (no `.item()`, no Python branch on a device value), so it compiles once and can be
  captured; a mask hides the slots not written yet.
"""
from __future__ import annotations

import torch
from torch import nn


def to_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """A (queries, keys) boolean "may attend" matrix in the form the model's attention function takes:
    boolean for SDPA, additive (0 or the dtype's minimum) for the eager implementation."""
    if attn_implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[None, None]
    return allowed[None, None]


class GrowingKV:
    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.reset()

    def reset(self) -> None:
        self.keys: list[torch.Tensor | None] = [None] * self.num_layers
        self.values: list[torch.Tensor | None] = [None] * self.num_layers
        self.length = 0
        self.positions: torch.Tensor | None = None   # of the tokens in the last prepare()

    def next_position(self) -> int:
        return self.length

    def prepare(self, n: int, device, attn_implementation: str, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Position ids (1, n) for the next n tokens, and their attention mask (None where the kernel's own
        causal rule is already right)."""
        positions = self.positions = torch.arange(self.length, self.length + n, device=device)
        if attn_implementation == "flash_attention_2":
            return positions[None], None   # flash-attn masks causally itself, aligned to the last query
        if n == 1 or (self.length == 0 and attn_implementation != "eager"):
            return positions[None], None   # one query sees everything; SDPA's is_causal covers a fresh prompt
        keys = torch.arange(self.length + n, device=device)
        return positions[None], to_mask(keys[None, :] <= positions[:, None], attn_implementation, dtype)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        self.length += n


class StaticKV:
    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_positions: int, dtype, device,
                 window: int | None = None):
        self.max_positions, self.window = max_positions, window
        shape = (1, kv_heads, max_positions, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)   # next position to write, on the device
        self.slots = torch.arange(max_positions, device=device)
        self.positions: torch.Tensor | None = None   # of the tokens in the last prepare(), where update() writes

    def next_position(self) -> torch.Tensor:
        return self.pos

    def reset(self) -> None:
        # The old keys stay in the buffers: the mask hides every slot until it is written again.
        self.pos.zero_()

    def prepare(self, n: int, device, attn_implementation: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.positions = self.pos + self.slots[:n]
        allowed = self.slots[None, :] <= positions[:, None]
        if self.window is not None:
            allowed &= self.slots[None, :] > positions[:, None] - self.window
        return positions[None], to_mask(allowed, attn_implementation, dtype)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # index_copy_ with the device-held positions: no host sync. docs/GPU.md warns that index_copy_
        # broke graph replay in some transformers versions; the GPU benchmark checks replay against eager.
        self.keys[layer_idx].index_copy_(2, self.positions, key)
        self.values[layer_idx].index_copy_(2, self.positions, value)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        self.pos.add_(n)


def static_kv_for(config, max_positions: int, dtype, device, window: int | None = None) -> StaticKV:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return StaticKV(config.num_hidden_layers, config.num_key_value_heads, head_dim, max_positions, dtype, device,
                    window)


def run_layers(stack: nn.Module, hidden: torch.Tensor, kv, norm: bool = True) -> torch.Tensor:
    """The stack's decoder layers over `hidden` (1, n, width), extending `kv`. `stack` is a transformers decoder
    (layers, rotary_emb, config, and a final norm): the same modules its own forward calls, in the same order."""
    config = stack.config
    positions, mask = kv.prepare(hidden.shape[1], hidden.device, config._attn_implementation, hidden.dtype)
    position_embeddings = stack.rotary_emb(hidden, position_ids=positions)
    for layer in stack.layers[: config.num_hidden_layers]:
        hidden = layer(hidden, attention_mask=mask, position_ids=positions, cache=kv, use_cache=True,
                       position_embeddings=position_embeddings)
    kv.advance(hidden.shape[1])
    return stack.norm(hidden) if norm else hidden
