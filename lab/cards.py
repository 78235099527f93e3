"""The GPU a preset meets, and what the lab changes so the preset runs on it.

Presets are written for the device machine (Hopper, 80-141 GB, bf16). The cards Hugging Face Spaces rent are
smaller and older (docs/SPACES.md). `adapt(spec, card)` is the one place that reads a preset against a card: it
returns the spec to build and the changes it made, each as a sentence for the build notes (bf16 -> fp16 where the
card has no native bf16, a feature the card lacks turned off, fewer stream slots where memory holds fewer), or a
Refusal saying why the preset cannot run there. The manager calls it before a build, the CLI before a run, and the
page's Environment panel shows its answer for every preset (`preset_rows`).

The card itself (`Card`, `this_card()`, LAB_CARD's emulation) is lab.gpu's. Importing this module does not import
torch.
"""
from __future__ import annotations

from dataclasses import dataclass

from lab import env
from lab.errors import LabError
from lab.gpu import FULL_KV_POSITIONS, SLOTS_SHARE, SPACES_CARDS, Card, batch_room, this_card
from lab.machine import NO_GPU, OLD_GPU, SMALL_GPU, ZERO_GPU, Refusal, check
from lab.spec import VariantSpec

# -- memory estimates before a build (torch-free): CSM-1B's sizes, from its config (tests check them) --------------
CSM_PARAMS = 1_632_100_161
# Parameters of the other families' default models, for the fits-at-all check (rounded up).
FAMILY_PARAMS = {"csm": CSM_PARAMS, "pocket_tts": 120_000_000, "minicpm_o": 8_700_000_000,
                 "qwen2.5-omni": 11_000_000_000}   # thinker, talker and token2wav at the default config, no vision
BYTES_PER_PARAM = {"none": None, "bnb-int8": 1.1, "bnb-nf4": 0.6}   # None: the dtype's width; bnb keeps some in bf16
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def weights_gb(spec: VariantSpec) -> float:
    per_param = BYTES_PER_PARAM.get(spec.quantization) or DTYPE_BYTES[spec.dtype]
    return FAMILY_PARAMS[spec.family] * per_param / 1e9


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
    try:
        changed = spec.replace(**fields) if fields else spec
    except LabError as e:   # a change this family does not take (qwen2.5-omni runs no fp16): the card cannot run it
        return Refusal(OLD_GPU, f"{e.message} ({_old_card(card)}, so the preset cannot run there); use a card of "
                                f"compute capability 8.0 or newer")
    need_gb = weights_gb(changed) * 1.15 + 0.5
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
