"""KV caches for the lab's own step functions, and the one function that runs a transformer stack over them.

The engines call the models' own decoder layers (transformers' modules and weights, untouched), but own the
loop around them: the positions, the attention mask and the cache. That is what lets one step function run
three ways: eagerly, compiled by inductor, and captured in a CUDA graph.

- `GrowingKV` appends keys and values each step, as transformers' DynamicCache does. Attention reads only
  what is filled, so eager steps stay cheap, but shapes change every step: no fixed graph.
- `StaticKV` writes into buffers allocated once, at a position held on the device. Every step has the same
  shapes and no host sync (no `.item()`, no Python branch on a device value), so it compiles once and can be
  captured; a mask hides the slots not written yet.
- `RowKV` is StaticKV with one row per stream, each row at its own position (many listeners through one step:
  lab/engines/csm_batched.py). A view of its first rows and positions shares its buffers, so a CUDA graph per
  bucket of streams reads and writes exactly its part. With a sliding window it can be a ring of slots.
"""
from __future__ import annotations

import torch
from torch import nn


def to_mask(allowed: torch.Tensor, attn_implementation: str, dtype: torch.dtype, batched: bool = False
            ) -> torch.Tensor:
    """A (queries, keys) boolean "may attend" matrix (or (rows, 1, queries, keys) when `batched`) in the form the
    model's attention function takes: boolean for SDPA, additive (0 or the dtype's minimum) for eager."""
    if attn_implementation == "eager":
        allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    return allowed if batched else allowed[None, None]


class GrowingKV:
    """`reserve(positions)` (the CPU loops): keys and values go into buffers allocated once and kept across requests,
    and attention reads a view of the part filled so far. Without it, each step concatenates, as DynamicCache does,
    which allocates and copies the whole cache of every layer every step."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.capacity = 0
        self._buffers: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.reset()

    def reserve(self, positions: int) -> None:
        """Room for `positions` tokens; the buffers are (re)allocated at the next update if they are smaller."""
        self.capacity = max(self.capacity, positions)

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
        end = self.length + key.shape[-2]
        if self.capacity:
            return self._write(key, value, layer_idx, end)
        if self.keys[layer_idx] is None:
            self.keys[layer_idx], self.values[layer_idx] = key, value
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], key], dim=-2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], value], dim=-2)
        return self.keys[layer_idx], self.values[layer_idx]

    def _write(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, end: int):
        if self._buffers is None or self._buffers[0][0].shape[-2] < max(end, self.capacity) or \
                self._buffers[0][0].shape[:2] != key.shape[:2] or self._buffers[0][0].dtype != key.dtype:
            shape = (*key.shape[:2], max(end, self.capacity), key.shape[-1])
            self._buffers = [(key.new_empty(shape), key.new_empty(shape)) for _ in range(self.num_layers)]
            for i, (k, v) in enumerate(self._buffers):   # what this request already wrote, into the new buffers
                if self.keys[i] is not None:
                    k[..., : self.keys[i].shape[-2], :].copy_(self.keys[i])
                    v[..., : self.values[i].shape[-2], :].copy_(self.values[i])
        keys, values = self._buffers[layer_idx]
        keys[..., self.length: end, :].copy_(key)
        values[..., self.length: end, :].copy_(value)
        self.keys[layer_idx], self.values[layer_idx] = keys[..., :end, :], values[..., :end, :]
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        self.length += n


class StaticKV:
    """`rows` > 1: a batch whose rows all stand at the same position (CSM's depth decoder, which every stream runs
    from position 0 in each frame)."""

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, max_positions: int, dtype, device,
                 window: int | None = None, rows: int = 1):
        self.max_positions, self.window = max_positions, window
        shape = (rows, kv_heads, max_positions, head_dim)
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

    def view(self, rows: int) -> "StaticKV":
        """The first `rows` rows, sharing the buffers and the position."""
        part = object.__new__(StaticKV)
        part.__dict__.update(self.__dict__)
        part.keys, part.values = [k[:rows] for k in self.keys], [v[:rows] for v in self.values]
        return part


class RowKV:
    """Static KV buffers with one row per stream, each at its own position `pos[row]`, on the device. A row whose
    `active` flag is 0 (a free slot) runs along in a batched step but does not advance. Rows join and leave between
    steps (`reset_rows`), which is what lets streams start and end at any frame.

    `ring`: with a sliding window, slot = position % slots, so a stream of any length needs only window + a few
    slots (the codec's decoder transformer: 256 slots instead of two per frame of the longest stream). Keys are
    cached after their rotary embedding, so where a key sits in the buffer does not matter, only the mask."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], pos: torch.Tensor,
                 active: torch.Tensor, window: int | None = None, ring: bool = False,
                 slots: torch.Tensor | None = None):
        self.keys, self.values, self.pos, self.active = keys, values, pos, active
        self.window, self.ring = window, ring
        self.length = keys[0].shape[2]
        # A view takes its parent's: a CUDA graph captured over a view reads this tensor at every replay, so it
        # must live as long as the buffers do, not as long as the view object.
        self.slots = torch.arange(self.length, device=pos.device) if slots is None else slots
        self.positions: torch.Tensor | None = None   # (rows, n) of the tokens in the last prepare()
        self.row_index: torch.Tensor | None = None   # (rows, 1): 0..rows-1, for the indexed cache writes

    @classmethod
    def allocate(cls, config, rows: int, max_positions: int, dtype, device, window: int | None = None,
                 ring: bool = False) -> "RowKV":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        shape = (rows, config.num_key_value_heads, max_positions, head_dim)
        layers = range(config.num_hidden_layers)
        return cls([torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
                   [torch.zeros(shape, dtype=dtype, device=device) for _ in layers],
                   torch.zeros(rows, dtype=torch.long, device=device),
                   torch.zeros(rows, dtype=torch.long, device=device), window, ring)

    def view(self, rows: int, length: int | None = None) -> "RowKV":
        """The first `rows` rows and (not for a ring) the first `length` positions, sharing the buffers: attention
        then reads only as far as the longest stream in the bucket, not the whole allocation."""
        length = self.length if length is None or self.ring else length
        return RowKV([k[:rows, :, :length] for k in self.keys], [v[:rows, :, :length] for v in self.values],
                     self.pos[:rows], self.active[:rows], self.window, self.ring, self.slots[:length])

    def next_position(self) -> torch.Tensor:
        return self.pos[:, None]

    def reset_rows(self, rows: torch.Tensor, positions: torch.Tensor | None = None) -> None:
        """Rows that start a new stream: their position goes to 0 (or `positions`, after a prefill wrote them);
        what the last stream left in the buffers stays, hidden by the mask until it is written again."""
        self.pos.index_copy_(0, rows, torch.zeros_like(rows) if positions is None else positions)

    def prepare(self, n: int, device, attn_implementation: str, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        positions = self.positions = self.pos[:, None] + self.slots[:n]             # (rows, n)
        self.row_index = torch.arange(positions.shape[0], device=positions.device)[:, None]   # once per stack
        query = positions[:, :, None]
        if self.ring:
            # The position each slot holds for this query: the latest p <= query with p % slots == slot.
            held = query - torch.remainder(query - self.slots, self.length)
            allowed = (held >= 0) & (query - held < self.window)
        else:
            allowed = self.slots <= query
            if self.window is not None:
                allowed &= self.slots > query - self.window
        return positions, to_mask(allowed[:, None], attn_implementation, dtype, batched=True)

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        # A free row may stand past the end of a view (its last stream was longer): clamp its write into range.
        # Its output is thrown away; an active row never needs the clamp (the engine checks room at admission).
        at = torch.remainder(self.positions, self.length) if self.ring else self.positions.clamp(max=self.length - 1)
        # An indexed write (index_put_), not scatter_: inductor writes it into the buffer in place, where a scatter
        # into a graph input is rebuilt out of place (the whole cache read, copied and written back every step).
        # Indices on dims 0 and 2 put (rows, n) first: the values go in as (rows, n, heads, head_dim).
        self.keys[layer_idx][self.row_index, :, at] = key.transpose(1, 2)
        self.values[layer_idx][self.row_index, :, at] = value.transpose(1, 2)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n: int) -> None:
        self.pos.add_(self.active * n)


def static_kv_for(config, max_positions: int, dtype, device, window: int | None = None, rows: int = 1) -> StaticKV:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return StaticKV(config.num_hidden_layers, config.num_key_value_heads, head_dim, max_positions, dtype, device,
                    window, rows)


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
