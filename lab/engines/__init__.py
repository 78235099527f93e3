"""Engines: one module per model family, each wrapping the real model class, and the pieces only engines use (KV
caches, Triton kernels, sampling, the codec's streaming decode).

`build(spec)` is the only way in: it imports the spec's module lazily, so a CPU-only install never imports what it
does not use, and importing this package loads no torch. What an engine is lives in lab.engines.base.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lab.engines.base import Engine, Progress
    from lab.spec import VariantSpec

FAMILY_MODULES = {"csm": "lab.engines.csm", "pocket_tts": "lab.engines.pocket_tts", "hibari": "lab.engines.hibari",
                  "minicpm_o": "lab.engines.minicpm_o", "qwen2.5-omni": "lab.engines.qwen_omni",
                  "remote": "lab.engines.remote"}
# Keyed here rather than chosen in csm.py, so the one-stream engine never imports its batched subclass.
BATCHED_MODULES = {"csm": "lab.engines.csm_batched"}


def module_name(spec: VariantSpec) -> str:
    """The module whose `build(spec, progress)` builds this spec."""
    if spec.batches:
        return BATCHED_MODULES[spec.family]
    return FAMILY_MODULES[spec.family]


def build(spec: VariantSpec, progress: Progress | None = None) -> Engine:
    module = importlib.import_module(module_name(spec))
    engine = module.build(spec, progress or (lambda stage, s: None))
    engine.served = False   # the build's own warm-up requests do not make the first caller's request warm
    return engine
