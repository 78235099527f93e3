"""The GPU this process runs on, real or emulated, as plain data: what the engines ask of it (its compute
capability, the memory they may fill) and what lab.cards reads presets against.

`Card` is plain data: `this_card()` reads it from torch; `LAB_CARD=T4` (any key of SPACES_CARDS) stands in one of
the Spaces cards for emulation on a bigger GPU (memory capped to the card's size, features masked as its compute
capability has them); tests build cards by hand. Importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from lab import env
from lab.errors import LabError

# What the CUDA context and the allocator's slack take before any tensor: the table's cards count it off.
CONTEXT_GB = 0.6
# Of the memory left after the weights, the share stream slots' KV caches may take; the rest holds the CUDA graphs'
# intermediates and the padded prefill of a crowd of arrivals (lab/engines/csm_batched.py).
SLOTS_SHARE = 0.6
# Below this many slots at full KV room, a batching preset halves each stream's KV room to hold twice as many.
FEW_SLOTS = 16


@dataclass(frozen=True)
class Card:
    name: str
    capability: tuple[int, int]     # CUDA compute capability (major, minor)
    memory_gb: float                # what the card has (ZeroGPU: the slice a call gets)
    bf16: bool                      # native bf16 math (sm 8.0 and newer)
    free_gb: float | None = None    # free now, when read from a live device; None: the card's size less CONTEXT_GB
    zero_gpu: bool = False          # a ZeroGPU slice: the GPU exists only inside a @spaces.GPU call

    @property
    def sm(self) -> str:
        return f"sm {self.capability[0]}.{self.capability[1]}"

    @property
    def usable_gb(self) -> float:
        return self.free_gb if self.free_gb is not None else self.memory_gb - CONTEXT_GB


# The cards of Hugging Face Spaces (its hardware docs, 2026-08; docs/GPU.md), and the device machine's, for emulation
# (LAB_CARD) and for docs/SPACES.md's table.
SPACES_CARDS = {
    "T4": Card("T4", (7, 5), 16, bf16=False),
    "L4": Card("L4", (8, 9), 24, bf16=True),
    "A10G": Card("A10G", (8, 6), 24, bf16=True),
    "L40S": Card("L40S", (8, 9), 48, bf16=True),
    "A100": Card("A100", (8, 0), 80, bf16=True),
    # ZeroGPU's default slice: half an RTX Pro 6000 Blackwell.
    "ZeroGPU": Card("ZeroGPU (RTX Pro 6000 Blackwell, half)", (12, 0), 48, bf16=True, zero_gpu=True),
    "H100": Card("H100", (9, 0), 80, bf16=True),
    "H200": Card("H200", (9, 0), 141, bf16=True),
}

# One stream slot of the batched engine: backbone keys and values per KV position (16 layers x 8 heads x 128 x k,v
# x 2 bytes), and the fixed part (the depth decoder's 32 positions, the codec transformer's 250-slot window + 8).
CSM_SLOT_BYTES_PER_POSITION = 32_768
CSM_SLOT_FIXED_BYTES = 131_072 + 4_227_072
FULL_KV_POSITIONS = 1024            # lab.engines.csm_batched.BATCHED_POSITIONS


def batch_room(free_bytes: float, asked_rows: int, bytes_per_position: int = CSM_SLOT_BYTES_PER_POSITION,
               fixed_bytes: int = CSM_SLOT_FIXED_BYTES, positions: int = FULL_KV_POSITIONS) -> tuple[int, int]:
    """(stream slots, KV positions per slot) whose caches fit SLOTS_SHARE of `free_bytes` (free after the weights):
    as many as asked at full room; where fewer than FEW_SLOTS fit, half the room each (half the audio per stream,
    about 30 s) for twice the slots. At least one slot; the build then fails honestly if even that does not fit."""
    def fit(room: int) -> int:
        return int(SLOTS_SHARE * max(free_bytes, 0)) // (bytes_per_position * room + fixed_bytes)

    rows = fit(positions)
    if rows < min(FEW_SLOTS, asked_rows) and fit(positions // 2) > rows:
        positions //= 2
        rows = fit(positions)
    return max(1, min(asked_rows, rows)), positions


# -- the card this process runs on -------------------------------------------------------------------------------
def emulated_name() -> str | None:
    """LAB_CARD, checked: the Spaces card this process stands in for, or None."""
    name = os.environ.get("LAB_CARD", "")
    if not name:
        return None
    if name not in SPACES_CARDS:
        raise LabError("LAB_CARD", f"{name!r} is not a card the lab knows; use one of {', '.join(SPACES_CARDS)}, "
                                   f"or unset it to read this machine's GPU")
    return name


def zero_gpu_mode() -> bool:
    """On a ZeroGPU Space: the `spaces` package's own switch (SPACES_ZERO_GPU=true, as its config reads it)."""
    return os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "t", "true")


@functools.cache
def _device_card() -> Card | None:
    """The real GPU 0 (name, capability, size), or None without one. Cached: only the free memory changes."""
    if not env.cuda_available():
        return None
    import torch

    props = torch.cuda.get_device_properties(0)
    major, minor = props.major, props.minor
    return Card(props.name, (major, minor), round(props.total_memory / 1e9, 1), bf16=(major, minor) >= (8, 0))


def free_bytes() -> int:
    """The GPU's free memory as this process may use it: the device's free memory, and no more than the per-process
    cap (torch.cuda.set_per_process_memory_fraction, which emulation sets) leaves over what torch has reserved."""
    import torch

    free, total = torch.cuda.mem_get_info()
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda: 1.0)()
    return int(min(free, fraction * total - torch.cuda.memory_reserved()))


def this_card(live_free: bool = True) -> Card | None:
    """The card presets are adapted to: ZeroGPU's slice on a ZeroGPU Space (outside a GPU call CUDA is only
    emulated there, so nothing is asked of it), the card LAB_CARD names (emulated: its memory capped on this GPU),
    or this machine's GPU; None without a GPU. `live_free` reads the free memory now (a CUDA call)."""
    if zero_gpu_mode():
        return SPACES_CARDS["ZeroGPU"]
    name, device = emulated_name(), _device_card()
    if name:
        card = SPACES_CARDS[name]
        if device is not None:
            emulate(card, device)
    elif device is None:
        return None
    else:
        card = device
    if device is not None and live_free:
        card = dataclasses.replace(card, free_gb=free_bytes() / 1e9)
    return card


_EMULATED: dict[str, float] = {}


def emulate(card: Card, device: Card) -> None:
    """Caps this process's GPU memory to `card`'s size (once): the allocator then refuses what the card could not
    hold, and free_bytes() counts from the cap."""
    if card.name in _EMULATED or card.memory_gb >= device.memory_gb:
        return
    import torch

    fraction = card.memory_gb / device.memory_gb
    torch.cuda.set_per_process_memory_fraction(fraction, 0)
    _EMULATED[card.name] = fraction


def capability() -> tuple[int, int]:
    """The compute capability features are decided by: the emulated card's under LAB_CARD, else the device's."""
    card = this_card(live_free=False)
    return card.capability if card else (0, 0)


