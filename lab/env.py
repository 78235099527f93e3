"""What this machine can run, probed once: GPU, optional packages, versions.

Validation (lab.spec) asks this module instead of importing optional packages itself, so a missing
package becomes a sentence ("bitsandbytes is not installed") and never an ImportError mid-build.
"""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import platform
import subprocess

import lab


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def has_package(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def triton_interpreted() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on the CPU through its interpreter: slow, for tests only."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@functools.cache
def cuda_capability() -> tuple[int, int]:
    """(major, minor) of GPU 0; (0, 0) without one."""
    import torch

    return torch.cuda.get_device_capability(0) if torch.cuda.is_available() else (0, 0)


@functools.cache
def git_commit() -> str:
    if os.environ.get("LAB_COMMIT"):   # set where the tree travels without .git (the GPU machine)
        return os.environ["LAB_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.cache
def cpu_model() -> dict:
    """The CPU's name, family and model numbers, and the int8 and wide-vector instructions it has (/proc/cpuinfo):
    which CPU option wins depends on them (int8 matmuls are fast with VNNI, slow without)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        return {"cpu_model": platform.processor() or platform.machine(), "cpu_isa": None}
    name = info.get("model name", platform.machine())
    if "cpu family" in info:
        name += f" (family {info['cpu family']} model {info.get('model', '?')})"
    flags = info.get("flags", "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8") if f in flags]
    return {"cpu_model": name, "cpu_isa": " ".join(isa) or None}


@functools.cache
def environment() -> dict:
    """The facts docs/METRICS.md asks to record with every result."""
    import torch

    env = {
        "device": platform.processor() or platform.machine(),
        **cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "bitsandbytes": _version("bitsandbytes"),
        "triton": _version("triton"),
        "gradio": _version("gradio"),
        "onnxruntime": _version("onnxruntime"),
        "hibari_tts": _version("hibari-tts"),
        "commit": git_commit(),
        # Thread settings: on a 2-core machine, torch's threads, ONNX Runtime's and a web server's compete. These
        # are the process's; each variant sets its own count (its `threads`), which every run record holds.
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "omp_wait_policy": (os.environ.get("OMP_WAIT_POLICY") if lab.OMP_WAIT_POLICY_IN_FORCE
                            else "libgomp's default: torch loaded before the lab set it"),
        "torchao": _version("torchao"),
        "cuda": None,
        "driver": None,
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


APP_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shown_path(path: str) -> str:
    """A path as a visitor may see it: relative to the app folder, or only its file name when it lies outside
    (the server's own folders are not a visitor's business; the server's log has the full path)."""
    full = os.path.abspath(path)
    if os.path.commonpath([full, APP_ROOT]) == APP_ROOT:
        return os.path.relpath(full, APP_ROOT)
    return f"…/{os.path.basename(full)}"


def trim_heap() -> None:
    """Hands freed heap pages back to the OS (glibc's malloc_trim). A server runs each comparison in fresh threads,
    and glibc keeps each thread arena's high-water mark: without this its RSS crept up with every compare."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass
