"""Whether this machine can run a valid VariantSpec, as a reason code and a sentence with the fix.

lab.spec says whether a variant makes sense anywhere; this module says whether it runs here: a GPU, the optional
packages it needs, and pretrained weights that are cached or downloadable. The page groups presets by the code,
the CLI and the manager refuse with the sentence; nobody parses the sentence back apart.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlparse

from lab import env
from lab.errors import LabError
from lab.spec import FAMILIES, VariantSpec

# Reason codes, and how the page says each one in a few words.
NO_GPU, OLD_GPU, NO_PACKAGE, NO_WEIGHTS = "no-gpu", "old-gpu", "no-package", "no-weights"
# lab.cards' codes: the card's memory cannot hold the preset; ZeroGPU cannot run it
SMALL_GPU, ZERO_GPU = "small-gpu", "zero-gpu"


@dataclass(frozen=True)
class Refusal:
    code: str           # one of the codes above
    sentence: str       # what is missing and how to fix it
    package: str = ""   # for NO_PACKAGE: which one

    @property
    def short(self) -> str:
        return {NO_GPU: "need a GPU", OLD_GPU: "need a newer GPU", NO_PACKAGE: f"need {self.package} (not installed)",
                NO_WEIGHTS: "need weights that are not cached (the hub is unreachable)",
                SMALL_GPU: "need more GPU memory", ZERO_GPU: "cannot run under ZeroGPU"}[self.code]


def _missing(package: str, pip_name: str, why: str) -> Refusal:
    return Refusal(NO_PACKAGE, f"{package} is not installed: {why}; install it with `pip install {pip_name}`",
                   package)


def check(spec: VariantSpec, weights_here=None) -> Refusal | None:
    """Why this machine cannot run `spec`, or None. `weights_here(spec) -> bool` checks pretrained weights (the
    default looks in the Hugging Face cache, then whether the hub answers); pass `lambda s: True` to skip it."""
    if spec.device == "cuda" and not env.cuda_available():
        return Refusal(NO_GPU, "device: cuda was asked for but no GPU is visible to torch; run it on a machine with "
                               "an NVIDIA GPU, or use device: cpu")
    if spec.family == "minicpm_o" and not env.cuda_available():
        return Refusal(NO_GPU, "MiniCPM-o has no CPU path; run this preset on a machine with an NVIDIA GPU")
    if spec.family == "qwen2.5-omni" and spec.device != "cuda" and spec.weights != "tiny":
        return Refusal(NO_GPU, "Qwen2.5-Omni at real size (about 10B parameters with the talker and token2wav) runs "
                               "on a GPU; use device: cuda, or weights: tiny on the CPU")
    if spec.quantization.startswith("bnb") and not env.has_package("bitsandbytes"):
        return _missing("bitsandbytes", "bitsandbytes", f"quantization: {spec.quantization} needs it")
    if spec.quantization == "int8-torchao" and not env.has_package("torchao"):
        return _missing("torchao", "torchao", "quantization: int8-torchao needs it; quantization: int8-dynamic "
                                              "uses torch's own int8 kernels instead")
    if spec.attention == "flash_attention_2" and not env.has_package("flash_attn"):
        return _missing("flash-attn", "flash-attn", "attention: flash_attention_2 needs it; attention: sdpa-flash "
                                                    "uses PyTorch's built-in FlashAttention-2 kernel instead")
    for axis, fix in (("kernels", "kernels: torch"), ("attention", "attention: sdpa")):
        if getattr(spec, axis) != "triton":
            continue
        if spec.device != "cuda" and not env.triton_interpreted():
            return Refusal(NO_GPU, f"{axis}: triton runs on a CUDA GPU (on the CPU only under TRITON_INTERPRET=1, "
                                   f"for tests); use device: cuda, or {fix}")
        if not env.has_package("triton"):
            return _missing("triton", "triton", f"{axis}: triton needs it (CUDA builds of torch ship it)")
        # Below compute capability 8.0, lab.cards.adapt turns the Triton kernels off, saying so in the build notes.
    if spec.weights == "pretrained" and FAMILIES[spec.family]["torch"] and not (weights_here or weights_available)(spec):
        fetch = f"huggingface-cli download {spec.model_id}" + (f" --revision {spec.revision}" if spec.revision else "")
        return Refusal(NO_WEIGHTS, f"{spec.model_id} is not in the Hugging Face cache and the hub is unreachable; "
                                   f"switch on random weights (latency only), or download it with `{fetch}` where "
                                   f"the hub is reachable")
    return None


def require(spec: VariantSpec, weights_here=None) -> None:
    """Raise the refusal as a LabError naming the preset: what the manager and the CLI do before a build."""
    refusal = check(spec, weights_here)
    if refusal is not None:
        raise LabError(f"preset {spec.name!r}" if spec.name else "spec", refusal.sentence)


# -- pretrained weights ----------------------------------------------------------------------------------------
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
    return isinstance(try_to_load_from_cache(source, "config.json", revision=spec.revision or None), str)


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


def weights_available(spec: VariantSpec) -> bool:
    return weights_cached(spec) or hub_reachable()
