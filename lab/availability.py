"""The presets a page offers: which run on this machine (with the presets' own weights, or with the random-weights
switch on), why the others do not, what the first click runs, and what each option needs.

One door for a front end: `Catalog.runnable_spec(name, random_weights)` gives the spec to run or raises a LabError
with the reason (lab.machine's sentence). The statuses carry lab.machine's reason codes, so the page groups the
unavailable presets by reason without reading any sentence back apart.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from lab import cards, env, gpu, machine, presets
from lab.errors import LabError
from lab.machine import Refusal
from lab.spec import FAMILIES, VariantSpec

INVALID = "invalid"   # a preset file whose values are refused (its own message says which field)


@dataclass(frozen=True)
class PresetStatus:
    name: str
    family: str
    description: str
    weights: str                  # what would run: the preset's own, or the random-weights switch's
    refusal: Refusal | None       # why it cannot run here; None when it can

    @property
    def available(self) -> bool:
        return self.refusal is None


class Catalog:
    """The presets of one folder, checked against this machine once (the hub probe is slow to repeat)."""

    def __init__(self, presets_dir: str = presets.PRESETS_DIR, weights_here=machine.weights_available,
                 card: "gpu.Card | None | str" = "this machine's"):
        self.presets_dir = presets_dir
        # The card GPU presets are adapted to (lab.cards): what it cannot run is refused here too.
        self.card = gpu.this_card() if card == "this machine's" else card
        self.specs, broken = presets.load_all(presets_dir)
        self.broken = {name: Refusal(INVALID, message) for name, message in broken.items()}
        self.statuses = {rw: self._statuses(rw, weights_here) for rw in (False, True)}

    def spec(self, name: str, random_weights: bool) -> VariantSpec:
        spec = self.specs[name]
        return spec.with_weights("random") if random_weights else spec

    def _statuses(self, random_weights: bool, weights_here) -> dict[str, PresetStatus]:
        out = {}
        for name in sorted({*self.specs, *self.broken}):
            if name in self.broken:
                out[name] = PresetStatus(name, _declared_family(self.presets_dir, name), "", "", self.broken[name])
                continue
            spec = self.spec(name, random_weights)
            verdict = cards.plan(spec, self.card, weights_here) if self.card else machine.check(spec, weights_here)
            out[name] = PresetStatus(name, spec.family, spec.description, spec.weights,
                                     verdict if isinstance(verdict, Refusal) else None)
        return out

    def runnable_spec(self, name: str, random_weights: bool) -> VariantSpec:
        status = self.statuses[bool(random_weights)].get(name)
        if status is None:
            raise LabError(f"preset {name!r}", f"no such preset in {env.shown_path(self.presets_dir)}")
        if status.refusal is not None:
            raise LabError(f"preset {name!r}", status.refusal.sentence)
        return self.spec(name, random_weights)

    def grouped(self, random_weights: bool) -> dict[str, list[PresetStatus]]:
        """Statuses by family, families in FAMILIES order."""
        groups: dict[str, list[PresetStatus]] = {}
        for s in self.statuses[bool(random_weights)].values():
            groups.setdefault(s.family, []).append(s)
        order = [f for f in FAMILIES if f in groups] + [f for f in groups if f not in FAMILIES]
        return {f: groups[f] for f in order}

    def card_rows(self) -> list[dict]:
        """The page's Environment panel: per GPU preset, runs here, runs with changes (named), or cannot run (why)."""
        return cards.preset_rows(self.specs, self.card, lambda s: True)

    def batching(self, names: list[str]) -> list[str]:
        """Of `names`, the presets that serve many listeners at once (no line); the rest take turns."""
        return [n for n in names if n in self.specs and self.specs[n].batches]

    def unavailable_by_reason(self, random_weights: bool) -> dict[str, list[str]]:
        """The presets that cannot run here, folded by reason: {"need a GPU": [names], ...}."""
        folded: dict[str, list[str]] = {}
        for s in self.statuses[bool(random_weights)].values():
            if s.refusal is not None:
                reason = "invalid preset file" if s.refusal.code == INVALID else s.refusal.short
                folded.setdefault(reason, []).append(s.name)
        return folded

    def default_selection(self, cuda: bool) -> tuple[list[str], bool]:
        """What the first click runs: (preset names, random-weights switch).

        On a GPU: the CSM presets, eager-loop sdpa against the fastest one that exists (Triton kernels in a CUDA
        graph, else torch's in one, else inductor). On a CPU: two real voices that differ audibly, hibari
        with its padded start trimmed against hibari as it comes (0.3 s of silence first): the listener hears one
        start sooner (else hibari sentence by sentence against hibari speaking the whole text at once). The switch is on only when a picked preset needs it, so the first click does something real
        with no cache and no hub, and stays on real weights where they are there."""
        runnable = {n for n, s in self.statuses[True].items() if s.available}
        pick: list[str] = []
        if cuda:
            fast = ("csm-triton-cuda-graphs", "csm-cuda-graphs", "csm-sdpa-inductor")
            pick = [n for n in ["csm-sdpa", next((n for n in fast if n in runnable), "")] if n in runnable]
        for pair in (("hibari-trim", "hibari"), ("hibari", "hibari-whole")):
            if len(pick) < 2:
                pick = [n for n in pair if n in runnable]
        if len(pick) < 2:   # a presets folder without those (tests use their own): the first ones that run
            pick = (pick + sorted(n for n in runnable if n not in pick))[:2]
        as_is = {n for n, s in self.statuses[False].items() if s.available}
        return pick, any(n not in as_is for n in pick)


def _declared_family(presets_dir: str, name: str) -> str:
    """The family a refused preset declares in its YAML, read without validating it: a refused preset has no
    spec, but the page still groups it with its model."""
    import yaml

    try:
        with open(os.path.join(presets_dir, f"{name}.yaml"), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        return str(data.get("family", "other")) if isinstance(data, dict) else "other"
    except (OSError, yaml.YAMLError):
        return "other"


def option_requirements() -> list[dict]:
    """What each attention, compile, kernels and quantization option needs, and whether this machine has it."""
    cuda = env.cuda_available()
    bnb, flash = env.has_package("bitsandbytes"), env.has_package("flash_attn")
    rows = [
        ("attention", "eager", "nothing", True),
        ("attention", "sdpa", "nothing (PyTorch scaled_dot_product_attention)", True),
        ("attention", "sdpa-flash", "a CUDA GPU and bfloat16/float16 (PyTorch's built-in FlashAttention-2 kernel)",
         cuda),
        ("attention", "flash_attention_2", "a CUDA GPU, bfloat16/float16 and `pip install flash-attn`", cuda and flash),
        ("attention", "triton", "a CUDA GPU and Triton; CSM with max_streams above 1 only (one kernel program per "
                                "stream row, over that row's mask)", cuda and env.has_package("triton")),
        ("compile", "off", "nothing", True),
        ("compile", "inductor", "a C++ compiler on the CPU (Triton on a GPU); the first build compiles for seconds "
                                "to a minute", True),
        ("compile", "cuda-graphs", "a CUDA GPU; CSM (the whole frame step replayed from one CUDA graph) and "
                                   "Qwen2.5-Omni (the thinker's and talker's one-token steps)", cuda),
        ("compile", "inductor+cuda-graphs", "a CUDA GPU; CSM only; compiles for about a minute (experimental: "
                                            "not deterministic run to run)", cuda),
        ("compile", "aot", "CSM one stream only; a C++ compiler (Triton on a GPU); the step's pieces compiled ahead of "
                           "time (torch.export + AOTInductor), packages kept on disk: ZeroGPU's route", True),
        ("kernels", "torch", "nothing (the model's own modules)", True),
        ("kernels", "triton", "a CUDA GPU and Triton (CUDA builds of torch ship it); CSM only; no bitsandbytes, no "
                              "inductor", cuda and env.has_package("triton")),
        ("quantization", "none", "nothing", True),
        ("quantization", "bnb-int8", "a CUDA GPU and `pip install bitsandbytes`; not inside CUDA graphs", cuda and bnb),
        ("quantization", "bnb-nf4", "a CUDA GPU and `pip install bitsandbytes`", cuda and bnb),
        ("quantization", "int8-dynamic", "the CPU; Pocket TTS only, float32, compile: off (torch's own int8 "
                                         "kernels: fast on CPUs with VNNI, slower than float on some without)", True),
        ("quantization", "int8-torchao", "the CPU and `pip install torchao`; Pocket TTS only, float32; fast only "
                                         "with compile: inductor", env.has_package("torchao")),
    ]
    return [{"axis": a, "option": o, "needs": n, "here": "yes" if ok else "no"} for a, o, n, ok in rows]
