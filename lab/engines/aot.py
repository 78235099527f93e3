"""compile: aot: a step piece compiled ahead of time with torch.export and AOTInductor, the route ZeroGPU takes
(`spaces.aoti_*`), since ZeroGPU runs no torch.compile: each @spaces.GPU call is a fresh process, and a package on
disk loads in it without compiling again.

`AheadOfTime(fn, model, caches)` stands in for `fn` (an engine's step piece). On the first call with a new
signature (tensor shapes and dtypes, and the values of the other arguments, such as the sampling settings) it
exports `fn` with the KV caches it writes as explicit inputs (export records their in-place writes, and the compiled
code makes them into the same buffers), compiles the package, and loads it with the model's weights as user-managed
constants: the package holds code only, and reads the very tensors the eager path reads. Later calls run the
package. Packages are kept in LAB_AOT_DIR (default ~/.cache/speech-latency-lab/aot), named by the signature, so a
second process with the same spec loads instead of compiling.
"""
from __future__ import annotations

import hashlib
import os

import torch
from torch import nn

AOT_DIR = os.environ.get("LAB_AOT_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "speech-latency-lab", "aot")


def _cache_tensors(caches) -> list[torch.Tensor]:
    return [t for kv in caches for t in (*kv.keys, *kv.values, kv.pos)]


def _point(caches, tensors) -> list[tuple]:
    """Point each cache at `tensors` (in _cache_tensors' order); returns what to restore."""
    saved, it = [], iter(tensors)
    for kv in caches:
        saved.append((kv.keys, kv.values, kv.pos, kv.positions))
        kv.keys = [next(it) for _ in kv.keys]
        kv.values = [next(it) for _ in kv.values]
        kv.pos = next(it)
    return saved


def _restore(caches, saved) -> None:
    for kv, (keys, values, pos, positions) in zip(caches, saved):
        kv.keys, kv.values, kv.pos, kv.positions = keys, values, pos, positions


class _Piece(nn.Module):
    """What export traces: `fn` over (its tensor arguments, the caches' tensors), the rest of its arguments fixed."""

    def __init__(self, model: nn.Module, fn, caches, call):
        super().__init__()
        self.model = model          # its parameters become the package's constants
        self.fn, self.caches, self.call = fn, caches, call

    def forward(self, tensor_args: list[torch.Tensor], cache_tensors: list[torch.Tensor]):
        saved = _point(self.caches, cache_tensors)
        try:
            return self.fn(*self.call(tensor_args))
        finally:
            _restore(self.caches, saved)


class AheadOfTime:
    def __init__(self, fn, model: nn.Module, caches, label: str):
        self.fn, self.model, self.caches, self.label = fn, model, caches, label
        self.packages: dict[tuple, object] = {}     # signature -> loaded package
        self.compiled_s = 0.0                       # export + compile time so far, for the build notes
        self.loaded = 0                             # packages found on disk instead of compiled

    def __call__(self, *args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        signature = tuple((tuple(a.shape), str(a.dtype), str(a.device)) if isinstance(a, torch.Tensor) else repr(a)
                          for a in args)
        package = self.packages.get(signature)
        if package is None:
            package = self.packages[signature] = self._compile(args, signature)
        return package(tensors, _cache_tensors(self.caches))

    def _compile(self, args, signature):
        import time

        t0 = time.perf_counter()
        slots = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

        def call(tensor_args):   # the traced call: tensors from the inputs, the rest as given now
            full = list(args)
            for i, t in zip(slots, tensor_args):
                full[i] = t
            return full

        piece = _Piece(self.model, self.fn, self.caches, call)
        caches = _cache_tensors(self.caches)
        weights = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        key = hashlib.sha256(repr((self.label, signature, [(tuple(t.shape), str(t.dtype)) for t in caches],
                                   sorted(weights.items()), torch.__version__)).encode()).hexdigest()[:20]
        path = os.path.join(AOT_DIR, f"{self.label}-{key}.pt2")
        os.makedirs(AOT_DIR, exist_ok=True)
        exported = torch.export.export(piece, ([args[i] for i in slots], caches), strict=False)
        if os.path.exists(path):
            self.loaded += 1
        else:
            # The weights stay out of the package: it loads them from the model below (user-managed: no copy).
            # Written aside and renamed, so a killed build leaves no half package; the packager wants a .pt2 name.
            part = path[:-len(".pt2")] + ".part.pt2"
            torch._inductor.aoti_compile_and_package(
                exported, package_path=part, inductor_configs={"aot_inductor.package_constants_in_so": False})
            os.replace(part, path)
        package = torch._inductor.aoti_load_package(path)
        package.load_constants({**exported.state_dict, **exported.constants}, check_full_update=True,
                               user_managed=True)
        self.compiled_s += time.perf_counter() - t0
        return package
