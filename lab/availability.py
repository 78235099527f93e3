"""Which presets can run on this machine, and for those that cannot, a short reason a person can act on.

`lab.presets.load_all` already refuses what cannot work (no GPU, a package missing); this adds what only
shows at build time (pretrained weights that are neither cached nor downloadable) and sorts everything into
the few reasons the page shows: no GPU, bitsandbytes or flash-attn not installed, weights not cached and the
hub unreachable. It also picks what the first click runs, and says what each option needs.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Callable
from urllib.parse import urlparse

from lab import env
from lab.presets import PRESETS_DIR
from lab.spec import FAMILIES, VariantSpec

NO_GPU = "no GPU"
NO_BNB = "bitsandbytes not installed"
NO_FLASH_ATTN = "flash-attn not installed"
NO_WEIGHTS = "weights not cached and the hub unreachable"


@dataclass(frozen=True)
class PresetStatus:
    name: str
    family: str
    description: str
    weights: str                  # what would run: the preset's own, or the random-weights switch's
    available: bool
    reason: str = ""              # one of the constants above, or the loader's own message
    detail: str = ""              # the full sentence, with the fix

    @property
    def label(self) -> str:
        return self.name if self.available else f"{self.name} (unavailable: {self.reason})"


def classify(message: str) -> str:
    """The short reason behind a refusal message from lab.spec / lab.presets."""
    if "no GPU" in message:
        return NO_GPU
    if "bitsandbytes is not installed" in message:
        return NO_BNB
    if "flash-attn is not installed" in message:
        return NO_FLASH_ATTN
    return message


def weights_cached(spec: VariantSpec) -> bool:
    """Pretrained weights are on disk: a local directory with a config, or the hub id in the HF cache."""
    source = spec.model_id
    if os.path.isdir(source):
        return os.path.exists(os.path.join(source, "config.json"))
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    # At the preset's pinned revision, if it has one: a cache made with `--revision <sha>` has no refs/main.
    return isinstance(try_to_load_from_cache(source, "config.json", revision=spec.revision or None),
                      str)


_HUB_PROBE: dict[str, tuple[float, bool]] = {}


def hub_reachable(timeout_s: float = 1.5, ttl_s: float = 300.0) -> bool:
    """A TCP connect to the hub endpoint, remembered for `ttl_s`, so listing presets never hangs the page."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    now = time.monotonic()
    if endpoint in _HUB_PROBE and now - _HUB_PROBE[endpoint][0] < ttl_s:
        return _HUB_PROBE[endpoint][1]
    url = urlparse(endpoint)
    try:
        with socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout_s):
            ok = True
    except OSError:
        ok = False
    _HUB_PROBE[endpoint] = (now, ok)
    return ok


def preset_statuses(specs: dict[str, VariantSpec], unavailable: dict[str, str], random_weights: bool = False,
                    presets_dir: str = PRESETS_DIR, cached: Callable[[VariantSpec], bool] = weights_cached,
                    reachable: Callable[[], bool] = hub_reachable) -> list[PresetStatus]:
    """Every preset, in name order, with whether it can run here given the random-weights switch."""
    out = []
    for name in sorted({*specs, *unavailable}):
        if name in unavailable:
            detail = unavailable[name]
            out.append(PresetStatus(name, refused_family(presets_dir, name), "", "", False, classify(detail),
                                    f"{name}: {detail}"))
            continue
        spec = specs[name]
        weights = "random" if random_weights and "random" in FAMILIES[spec.family]["weights"] else spec.weights
        if weights == "pretrained" and FAMILIES[spec.family]["torch"] and not cached(spec) and not reachable():
            out.append(PresetStatus(name, spec.family, spec.description, weights, False, NO_WEIGHTS,
                                    f"{name}: {spec.model_id} is not in the Hugging Face cache and the hub is "
                                    f"unreachable; switch on random weights (latency only), or download it with "
                                    f"`huggingface-cli download {spec.model_id}"
                                    f"{' --revision ' + spec.revision if spec.revision else ''}` "
                                    f"where the hub is reachable"))
            continue
        out.append(PresetStatus(name, spec.family, spec.description, weights, True))
    return out


def grouped(statuses: list[PresetStatus]) -> dict[str, list[PresetStatus]]:
    """Statuses by family, families in FAMILIES order."""
    groups: dict[str, list[PresetStatus]] = {}
    for s in statuses:
        groups.setdefault(s.family, []).append(s)
    order = [f for f in FAMILIES if f in groups] + [f for f in groups if f not in FAMILIES]
    return {f: groups[f] for f in order}


def default_selection(own: list[PresetStatus], random: list[PresetStatus], cuda: bool) -> tuple[list[str], bool]:
    """What the first click runs: (preset names, random-weights switch), from the statuses with the presets' own
    weights and with the switch on.

    On a GPU: the CSM presets, eager-loop sdpa against the fastest one that exists (Triton kernels in a CUDA
    graph, else torch's in one, else inductor). On a CPU: hibari (real speech) against Pocket TTS. The switch is
    on only when a picked preset needs it (its weights are neither cached nor downloadable), so the first click
    does something real with no cache and no hub, and stays on real weights where they are there."""
    runnable = {s.name for s in random if s.available}
    pick: list[str] = []
    if cuda:
        fast = ("csm-triton-cuda-graphs", "csm-cuda-graphs", "csm-sdpa-inductor")
        wanted = ["csm-sdpa", next((n for n in fast if n in runnable), "")]
        pick = [n for n in wanted if n in runnable]
    if not pick:
        pick = [n for n in ("hibari", "pocket-tts-cpu") if n in runnable]
    if len(pick) < 2:   # a presets folder without those (tests use their own): the first ones that run
        pick = (pick + sorted(n for n in runnable if n not in pick))[:2]
    runs_as_is = {s.name for s in own if s.available}
    return pick, any(n not in runs_as_is for n in pick)


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
        ("compile", "off", "nothing", True),
        ("compile", "inductor", "a C++ compiler on the CPU (Triton on a GPU); the first build compiles for seconds "
                                "to a minute", True),
        ("compile", "cuda-graphs", "a CUDA GPU; CSM only (the whole frame step replayed from one CUDA graph)", cuda),
        ("compile", "inductor+cuda-graphs", "a CUDA GPU; CSM only; compiles for about a minute (experimental: "
                                            "not deterministic run to run)", cuda),
        ("kernels", "torch", "nothing (the model's own modules)", True),
        ("kernels", "triton", "a CUDA GPU and Triton (CUDA builds of torch ship it); CSM only; no bitsandbytes, no "
                              "inductor", cuda and env.has_package("triton")),
        ("quantization", "none", "nothing", True),
        ("quantization", "bnb-int8", "a CUDA GPU and `pip install bitsandbytes`; not inside CUDA graphs", cuda and bnb),
        ("quantization", "bnb-nf4", "a CUDA GPU and `pip install bitsandbytes`", cuda and bnb),
    ]
    return [{"axis": a, "option": o, "needs": n, "here": "yes" if ok else "no"} for a, o, n, ok in rows]


def refused_family(presets_dir: str, name: str) -> str:
    """The family a refused preset declares in its YAML, read without validating it: a refused preset has no
    spec, but the page still groups it with its model."""
    import yaml

    try:
        with open(os.path.join(presets_dir, f"{name}.yaml"), encoding="utf-8") as f:
            data = yaml.safe_load(f)
        return str(data.get("family", "other")) if isinstance(data, dict) else "other"
    except (OSError, yaml.YAMLError):
        return "other"
