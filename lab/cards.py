"""The GPU a preset meets, and what the lab changes so the preset runs on it.

Presets are written for the device machine (Hopper, 80-141 GB, bf16). The cards Hugging Face Spaces rent are
smaller and older (docs/SPACES.md). `adapt(spec, card)` is the one place that reads a preset against a card: it
returns the spec to build and the changes it made, each as a sentence for the build notes (bf16 -> fp16 where the
card has no native bf16, a feature the card lacks turned off, fewer stream slots where memory holds fewer), or a
Refusal saying why the preset cannot run there. The manager calls it before a build, the CLI before a run, and the
page's Environment panel shows its answer for every preset (`preset_rows`).

`Card` is plain data: `this_card()` reads it from torch, `LAB_CARD=T4` (any key of SPACES_CARDS) stands in one of
the Spaces cards for emulation on a bigger GPU (memory capped to the card's size, features masked as its compute
capability has them), and tests build cards by hand. Importing this module does not import torch.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

from lab import env
from lab.errors import LabError
from lab.machine import NO_GPU, OLD_GPU, SMALL_GPU, ZERO_GPU, Refusal, check
from lab.spec import VariantSpec

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

# -- memory estimates before a build (torch-free): CSM-1B's sizes, from its config (tests check them) --------------
CSM_PARAMS = 1_632_100_161
# One stream slot of the batched engine: backbone keys and values per KV position (16 layers x 8 heads x 128 x k,v
# x 2 bytes), and the fixed part (the depth decoder's 32 positions, the codec transformer's 250-slot window + 8).
CSM_SLOT_BYTES_PER_POSITION = 32_768
CSM_SLOT_FIXED_BYTES = 131_072 + 4_227_072
FULL_KV_POSITIONS = 1024            # lab.engines.csm_batched.BATCHED_POSITIONS
# Parameters of the other families' default models, for the fits-at-all check (rounded up).
FAMILY_PARAMS = {"csm": CSM_PARAMS, "pocket_tts": 120_000_000, "minicpm_o": 8_700_000_000}
BYTES_PER_PARAM = {"none": None, "bnb-int8": 1.1, "bnb-nf4": 0.6}   # None: the dtype's width; bnb keeps some in bf16
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weights_gb(spec: VariantSpec) -> float:
    per_param = BYTES_PER_PARAM.get(spec.quantization) or DTYPE_BYTES[spec.dtype]
    return FAMILY_PARAMS[spec.family] * per_param / 1e9


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


# -- a preset against a card -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Adapted:
    spec: VariantSpec                 # what to build
    changes: tuple[str, ...] = ()     # each change as the build notes say it; empty: runs as written
    notes: tuple[str, ...] = ()       # what holds on this card without changing the spec (PDL off, graphs per call)


def _old_card(card: Card) -> str:
    return f"{card.name} is {card.sm}"


def adapt(spec: VariantSpec, card: Card | None) -> Adapted | Refusal:
    """The spec to build on `card`, with its changes named, or why it cannot run there. CPU specs and machines
    without a GPU pass through: lab.machine.check says what a missing GPU means."""
    if spec.device != "cuda" or card is None:
        return Adapted(spec)
    changes, notes, fields = [], [], {}
    if spec.dtype == "bfloat16" and not card.bf16:
        fields["dtype"] = "float16"
        changes.append(f"dtype: bfloat16 -> float16 ({_old_card(card)}, without native bf16; with real weights the "
                       f"quality guardrail's parity check is the proof)")
    if card.capability < (8, 0):
        if spec.attention == "flash_attention_2":
            return Refusal(OLD_GPU, f"attention: flash_attention_2: the flash-attn package needs compute capability "
                                    f"8.0 or newer ({_old_card(card)}); use attention: sdpa")
        if spec.kernels == "triton":
            fields["kernels"] = "torch"
            changes.append(f"kernels: triton -> torch (the fused Triton kernels are built and checked for sm 8.0 and "
                           f"newer; {_old_card(card)}): the same step through the model's own modules")
        if spec.attention == "triton":
            fields["attention"] = "sdpa"
            changes.append(f"attention: triton -> sdpa (the rows attention kernel needs sm 8.0; {_old_card(card)})")
        if spec.attention == "sdpa-flash":
            fields["attention"] = "sdpa"
            changes.append(f"attention: sdpa-flash -> sdpa (PyTorch's FlashAttention-2 kernel needs sm 8.0; "
                           f"{_old_card(card)}): SDPA picks its memory-efficient kernel")
    if fields.get("kernels", spec.kernels) == "triton" and card.capability < (9, 0):
        notes.append(f"programmatic dependent launch off (a Triton kernel's prologue overlaps the previous one's tail "
                     f"from sm 9.0; {_old_card(card)})")
    if card.zero_gpu:
        refusal = _zero_gpu_refusal(spec)
        if refusal is not None:
            return refusal
        if spec.compile == "inductor":
            fields["compile"] = "aot"
            changes.append("compile: inductor -> aot (ZeroGPU runs no torch.compile: the step is compiled ahead of "
                           "time with torch.export and AOTInductor, as spaces.aoti_* does)")
        if spec.compile == "cuda-graphs":
            notes.append("CUDA graphs captured inside each GPU call: their capture is build cost of every comparison")
    need_gb = weights_gb(spec.replace(**fields) if fields else spec) * 1.15 + 0.5
    if need_gb > card.usable_gb:
        return Refusal(SMALL_GPU, f"the weights need about {need_gb:.1f} GB and {card.name} has "
                                  f"{card.usable_gb:.1f} GB free; use quantization: bnb-nf4 (or bnb-int8), or a bigger "
                                  f"card")
    if spec.batches:
        left_bytes = (card.usable_gb - weights_gb(spec)) * 1e9
        rows, positions = batch_room(left_bytes, spec.max_streams)
        if rows < spec.max_streams:
            fields["max_streams"] = rows
            room = "" if positions == FULL_KV_POSITIONS else f", {positions} KV positions each (about " \
                f"{(positions - 250) / 12.5:.0f} s of audio after a 250-token prompt)"
            changes.append(f"max_streams: {spec.max_streams} -> {rows} stream slots{room}: what "
                           f"{SLOTS_SHARE:.0%} of {card.name}'s {card.usable_gb:.0f} GB free after the weights holds")
    return Adapted(spec.replace(**fields) if fields else spec, tuple(changes), tuple(notes))


def _zero_gpu_refusal(spec: VariantSpec) -> Refusal | None:
    if spec.batches:
        return Refusal(ZERO_GPU, "max_streams above 1: the batched engine's scheduler and its CUDA graphs live across "
                                 "requests, and ZeroGPU lends the GPU for one call at a time; use a one-stream preset "
                                 "(csm-cuda-graphs), or a Space with a dedicated GPU")
    if spec.compile == "inductor+cuda-graphs":
        return Refusal(ZERO_GPU, "compile: inductor+cuda-graphs: ZeroGPU runs no torch.compile, and this experimental "
                                 "route has no ahead-of-time form here; use compile: cuda-graphs (or inductor, which "
                                 "is compiled ahead of time there)")
    if spec.compile == "inductor" and spec.family != "csm":
        return Refusal(ZERO_GPU, f"compile: inductor: ZeroGPU runs no torch.compile, and the ahead-of-time route is "
                                 f"implemented for csm only; use compile: off for {spec.family}")
    return None


def plan(spec: VariantSpec, card: Card | None = None, weights_here=None) -> Adapted | Refusal:
    """What the manager, the CLI and the page ask: lab.machine's check (a GPU, packages, weights), then the card's.
    `card` defaults to this machine's."""
    refusal = check(spec, weights_here)
    if refusal is not None:
        return refusal
    return adapt(spec, this_card() if card is None else card)


def require(spec: VariantSpec, card: Card | None = None) -> Adapted:
    """adapt() on this machine's card (or `card`), its refusal raised as a LabError naming the preset: what the
    manager and the CLI do before a build."""
    verdict = adapt(spec, this_card() if card is None else card)
    if isinstance(verdict, Refusal):
        raise LabError(f"preset {spec.name!r}" if spec.name else "spec", verdict.sentence)
    return verdict


def preset_rows(specs: dict[str, VariantSpec], card: Card | None, weights_here=None) -> list[dict]:
    """One row per preset that asks for a GPU, for the page's Environment panel: runs here, runs with changes
    (named), or cannot run (why)."""
    rows = []
    for name, spec in sorted(specs.items()):
        if spec.device != "cuda":
            continue
        if card is None:
            verdict = Refusal(NO_GPU, "no GPU is visible to torch; run it on a machine with an NVIDIA GPU")
        else:
            verdict = check(spec, weights_here) if env.cuda_available() else None
            verdict = verdict or adapt(spec, card)
        if isinstance(verdict, Refusal):
            status, detail = "cannot run", verdict.sentence
        elif verdict.changes:
            status, detail = "runs with changes", "; ".join(verdict.changes + verdict.notes)
        else:
            status, detail = "runs here", "; ".join(verdict.notes)
        rows.append({"preset": name, "card": card.name if card else "none", "status": status, "what": detail})
    return rows
