"""What the torch engines share: dtype names, loading by hub id, quantization configs, memory, sampling.

Each engine's own loop stays in its module (two engines may repeat a few lines rather than
share a clever abstraction); only what truly means the same thing for every torch model lives here.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import types
import warnings

import torch

from lab.engines.base import BuildReport, Engine, StageClock, process_peak_bytes, reset_process_peak
from lab.engines.kv import run_layers as kv_run_layers
from lab.engines.sampling import pick
from lab.errors import LabError
from lab.spec import VariantSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attn_implementation(spec: VariantSpec) -> str:
    # sdpa-flash is SDPA with the backend pinned at run time (see attention_context); triton loads as SDPA and the
    # batched engine then points its decode steps at lab.engines.fused.rows_attention (prompts stay SDPA's).
    return "sdpa" if spec.attention in ("sdpa-flash", "triton") else spec.attention


def _pinned_backends(spec: VariantSpec, prompt: bool) -> list | None:
    """SDPA's backends for this spec's steps (None: SDPA picks). `sdpa-flash` pins PyTorch's own FlashAttention-2
    kernel. A prompt on CUDA (`prompt`) keeps SDPA to FlashAttention, memory-efficient and math: cuDNN's attention,
    which SDPA prefers on Hopper, builds an execution plan for every new shape, and almost every prompt is a new
    length (docs/GPU.md, "H200, 1024 streams"). Decode steps keep SDPA's choice (fixed shapes)."""
    from torch.nn.attention import SDPBackend

    if spec.attention == "sdpa-flash":
        return [SDPBackend.FLASH_ATTENTION]
    if prompt and spec.device == "cuda" and spec.attention in ("sdpa", "triton"):
        return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return None


def attention_context(spec: VariantSpec, prompt: bool = False):
    """The context a step of this spec runs under: SDPA's backends pinned where `_pinned_backends` says, else none."""
    backends = _pinned_backends(spec, prompt)
    if backends is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel(backends)


def with_attention(spec: VariantSpec, fn, prompt: bool = False):
    """`fn` run under the spec's attention context (`prompt`: `fn` is a prompt's prefill): a no-op wrapper unless
    SDPA's backends are pinned."""
    if _pinned_backends(spec, prompt) is None:
        return fn

    def pinned(*args, **kwargs):
        with attention_context(spec, prompt):
            return fn(*args, **kwargs)

    return pinned


def quantization_config(spec: VariantSpec, skip_modules: list[str]):
    """bitsandbytes' config for transformers' loader; None for the CPU int8 schemes, which quantize_int8 applies to
    a loaded float32 model."""
    if not spec.quantization.startswith("bnb"):
        return None
    from transformers import BitsAndBytesConfig  # bitsandbytes itself was checked by spec validation

    if spec.quantization == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=DTYPES[spec.dtype], llm_int8_skip_modules=skip_modules)


def load_cached_first(cls, source: str, what: str, fix: str, **kwargs):
    """`cls.from_pretrained(source, **kwargs)`, the local cache first, so an unreachable hub costs no retries when
    the files are cached; then the hub. Every loader in the lab goes through here, so a miss always reads the same:
    a LabError naming `what` failed and `fix`."""
    try:
        return cls.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError:
        pass
    if os.path.isabs(source) or source.startswith("."):
        raise LabError("model", f"{source!r} is not a directory with a saved model (config.json and weights); "
                                f"fix the path, or use weights: random for latency-only runs")
    try:
        return cls.from_pretrained(source, **kwargs)
    except OSError as e:
        raise LabError("weights", f"{source!r}: {what} could not be loaded: not in the Hugging Face cache and the hub "
                                  f"is unreachable ({type(e).__name__}); {fix}") from e


def from_pretrained(cls, spec: VariantSpec, source: str, skip_modules: list[str], **kwargs):
    """The one model-loading path: by hub id or local directory, with attention, dtype and quantization."""
    qconfig = quantization_config(spec, skip_modules)
    return load_cached_first(
        cls, source, "the weights", f"download them with `huggingface-cli download {source}` where the hub is "
                                    f"reachable, or use weights: random for latency-only runs",
        attn_implementation=attn_implementation(spec), dtype=DTYPES[spec.dtype], quantization_config=qconfig,
        device_map=spec.device if qconfig is not None else None, **kwargs)


def quantize_random(cls, model, spec: VariantSpec, skip_modules: list[str]):
    """Random weights can only be quantized the way real ones are: save, then load with the bnb config."""
    tmp = tempfile.mkdtemp(prefix="lab-random-")
    try:
        model.save_pretrained(tmp)
        del model
        return from_pretrained(cls, spec, tmp, skip_modules)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def quantize_int8(spec: VariantSpec, linears: torch.nn.Module) -> None:
    """The CPU int8 schemes, in place, on every nn.Linear under `linears` (the layers that dominate a frame's time:
    at batch 1 a frame reads every weight once, so a quarter of the bytes is most of the gain).
    int8-dynamic: torch.ao's dynamic quantization, int8 weights with activations quantized per call (fbgemm).
    int8-torchao: torchao's int8 dynamic-activation, int8-weight tensors, which need torch.compile to be fast."""
    if spec.quantization == "int8-dynamic":
        from torch.ao.quantization import quantize_dynamic

        with warnings.catch_warnings():   # torch.ao's notice that this API moves to torchao; it still ships in torch
            warnings.simplefilter("ignore")
            quantize_dynamic(linears, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    elif spec.quantization == "int8-torchao":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(linears, Int8DynamicActivationInt8WeightConfig())


# `threads: auto`: one per core less one, which the server, the stream to the browser and the machine's other work
# use; OMP_NUM_THREADS where it is set. On 2 cores that is 1 thread, because a second thread contends with the
# server for the other core (docs/RESULTS.md#two-cores-and-threads).
AUTO_THREADS = torch.get_num_threads() if os.environ.get("OMP_NUM_THREADS") else max(1, torch.get_num_threads() - 1)


def thread_count(spec: VariantSpec) -> int:
    return AUTO_THREADS if spec.threads == "auto" else int(spec.threads)


def use_threads(spec: VariantSpec) -> int:
    """Sets torch's intra-op threads to the spec's count, in the calling thread, and returns it. Called at build and
    at every request, in the thread that runs it: the setting outlives the request (under OpenMP it belongs to the
    thread, and new threads start from the process's last one), and variants of different counts take turns in one
    process. Inductor's CPU code is generated for the count in force when it compiles, so the build sets it before
    the warm-up compiles."""
    threads = thread_count(spec)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


# Every core the process may use (OMP_NUM_THREADS where it is set): what a prompt's prefill and a chunk's codec decode
# take where they are free.
ALL_THREADS = torch.get_num_threads()


@contextlib.contextmanager
def free_cores():
    """Every core for a burst of large kernels (a prompt's prefill, a chunk's codec decode), in the calling thread,
    when the machine's load leaves them free; the thread's count again after it. Yields the count it runs on. Such a
    burst runs with nothing else of the request beside it, so a free core shortens it (the first chunk's: the TTFB);
    where the other cores are busy it is slower on them all, and the frames (small products) keep the spec's count
    either way (docs/RESULTS.md#two-cores-and-threads)."""
    threads = torch.get_num_threads()
    if threads >= ALL_THREADS or os.getloadavg()[0] > ALL_THREADS - 0.5:
        yield threads
        return
    torch.set_num_threads(ALL_THREADS)
    try:
        yield ALL_THREADS
    finally:
        torch.set_num_threads(threads)


def build_report(spec: VariantSpec, baseline_bytes: int, modules: list[torch.nn.Module], **fields):
    """A build's BuildReport with its size figures taken the same way for every torch engine. memory_bytes: on a GPU,
    what the variant keeps allocated since `baseline_bytes` (weights, quantization state, static caches, graph
    pools): what eviction frees; on the CPU, its parameter and buffer bytes. peak_mem_bytes: the build's peak."""
    return BuildReport(
        params=sum(param_count(m) for m in modules),
        memory_bytes=(allocated_bytes(spec.device) - baseline_bytes) if spec.device == "cuda"
        else sum(memory_bytes(m) for m in modules),
        peak_mem_bytes=peak_memory_bytes(spec.device, baseline_bytes), **fields)


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds; a tensor subclass (torchao's int8 weights) holds its inner tensors."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def memory_bytes(module: torch.nn.Module) -> int:
    """Parameter and buffer bytes, and the int8 weights of torch.ao's dynamic quantized linears, which are
    neither (packed parameters)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    packed = [m for m in module.modules() if isinstance(m, DynamicQuantizedLinear)]
    packed_bytes = sum(tensor_bytes(m.weight()) + (tensor_bytes(m.bias()) if m.bias() is not None else 0)
                       for m in packed)
    return packed_bytes + sum(tensor_bytes(t) for t in [*module.parameters(), *module.buffers()])


def param_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def allocated_bytes(device: str) -> int:
    return torch.cuda.memory_allocated() if device == "cuda" else 0


def reset_peak_memory(device: str, collect: bool = False) -> int:
    """Start a peak-memory window; returns what is allocated already (other variants kept by the manager),
    so the window's peak can be told apart from them. On the CPU it resets the process's high-water mark.
    `collect` first frees unreachable objects: a build passes it, so that garbage from an engine dropped
    earlier is not freed mid-build and subtracted from this variant's memory, which could make it negative."""
    if collect:
        import gc

        gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return reset_process_peak()


def peak_memory_bytes(device: str, baseline_bytes: int = 0) -> int:
    """CUDA: torch.cuda.max_memory_allocated since reset_peak_memory, less its baseline. CPU: the process's
    peak resident memory since the reset (VmHWM), which counts every variant resident in the process."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() - baseline_bytes
    return process_peak_bytes()


class TorchEngine(Engine):
    """An engine whose kernels are torch's: it runs on the spec's torch threads, and on a GPU its peak memory is the
    device's, counted apart from the other variants the manager keeps."""

    def use_threads(self) -> int:
        return use_threads(self.spec)

    def reset_peak_memory(self) -> None:
        self._memory_baseline_bytes = reset_peak_memory(self.spec.device)

    def peak_memory_bytes(self) -> int:
        """GPU: what the variant holds resident (weights, static caches) plus the run's transient peak. CPU: the
        process's peak resident memory during the run, every resident variant included."""
        if self.spec.device != "cuda":
            return peak_memory_bytes("cpu")
        return self.report.memory_bytes + peak_memory_bytes("cuda", self._memory_baseline_bytes)


def begin_build(spec: VariantSpec, progress, load):
    """The opening every torch engine's build shares: a stage clock that waits for the device, a peak-memory
    window starting from what other variants already hold, and `load()` timed as the "loading" stage.
    Returns (clock, baseline bytes, what load returned, load seconds). The spec's threads are set first: inductor's
    CPU code is generated for the count in force when the warm-up compiles."""
    use_threads(spec)
    clock = StageClock(progress, device_sync(spec.device))
    baseline_bytes = reset_peak_memory(spec.device, collect=True)
    loaded, load_s = clock.run("loading", load)
    return clock, baseline_bytes, loaded, load_s


def init_random(cls, config, spec: VariantSpec, skip_modules: list[str] = (), quantize: bool = True):
    """Real-size (or tiny) random initialisation on the spec's device: the same weights every build, without
    touching the caller's RNG. Codec codebooks, which transformers initialises to zeros (so every code would
    decode to the same sound), get random entries: noise, but noise that depends on the codes."""
    with torch.random.fork_rng(devices=[]), torch.device(spec.device):
        torch.manual_seed(0)
        model = cls._from_config(config, attn_implementation=attn_implementation(spec), dtype=DTYPES[spec.dtype])
        for module in model.modules():
            if hasattr(module, "embed_sum") and hasattr(module, "_embed"):
                module.embed_sum.normal_()
                module._embed = None
    if quantize and spec.quantization.startswith("bnb"):
        model = quantize_random(cls, model, spec, list(skip_modules))
    return model


def load_processor(spec: VariantSpec, **kwargs):
    """The model's real processor (tokenizer, chat template, codec), local cache first."""
    from transformers import AutoProcessor

    return load_cached_first(AutoProcessor, spec.model_id, "the processor",
                             "use weights: random for latency-only runs", **kwargs)


def capture_graph(fn, warmup_runs: int = 3, pool=None):
    """Records one call of `fn` (no arguments: it reads and writes tensors that outlive it) into a CUDA graph.
    It first runs `fn` a few times on a side stream, as PyTorch's CUDA-graph docs ask, so lazy set-up (cuBLAS
    workspaces, compiled kernels, allocator pools) happens outside the capture. Returns (graph, the recorded
    call's outputs: tensors that every replay overwrites). `pool`: a memory pool shared with other graphs that never
    replay at the same time (the batched engine's graph per bucket), so their intermediates share memory."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup_runs):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    failed, out = None, None
    try:
        with torch.cuda.graph(graph, pool=pool):
            try:
                out = fn()
            except Exception as e:    # the op that broke the capture; ending the capture then fails too
                failed = e
    except Exception:
        if failed is None:
            raise
    if failed is not None:
        raise LabError("compile", f"CUDA graph capture failed at {type(failed).__name__}: {failed}; this variant's "
                                  f"step is not capturable here: use compile: inductor or off") from failed
    return graph, out


def compile_own(fn, **options):
    """torch.compile of `fn` for one engine. Dynamo keeps compiled graphs per code object, so a second engine
    compiling the same function reuses the first one's graphs wherever the guards pass: CPU code that inductor
    generated for another thread count, and one shared recompile limit. A copy of the code object gives each
    engine its own. A bound method (an engine's step piece) is copied and bound to the same engine."""
    func = getattr(fn, "__func__", fn)
    own = types.FunctionType(func.__code__.replace(), func.__globals__, func.__name__, func.__defaults__,
                             func.__closure__)
    if hasattr(fn, "__self__"):
        own = types.MethodType(own, fn.__self__)
    return torch.compile(own, **options)


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process so far: the difference across a build is its compile count."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def device_sync(device: str):
    return torch.cuda.synchronize if device == "cuda" else (lambda: None)


class TorchKernels:
    """The hooks a step function calls for its heavy work (`kernels: torch`), served by the model's own modules
    and kv.run_layers. fused.TritonKernels serves the same hooks from its kernels (`kernels: triton`);
    the step itself is the same either way."""

    @staticmethod
    def run_layers(stack: torch.nn.Module, hidden: torch.Tensor, kv, norm: bool = True) -> torch.Tensor:
        return kv_run_layers(stack, hidden, kv, norm)

    @staticmethod
    def linear(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        return module(x)

    @staticmethod
    def codebooks_head(head: torch.nn.Module, norm: torch.nn.Module, hidden: torch.Tensor, kv) -> torch.Tensor:
        """CSM's per-position head over norm(hidden), hidden (1, width) the last position `kv` ran: (1, vocab)."""
        return head(norm(hidden)[:, None], kv.positions[-1:])[:, -1]

    @staticmethod
    def pick(logits: torch.Tensor, temperature: float, top_k: int, uniform: torch.Tensor | None) -> torch.Tensor:
        return pick(logits, temperature, top_k, uniform)


class ByteTokenizer:
    """Deterministic stand-in for random and tiny weights, which have no real tokenizer: UTF-8 bytes mapped
    into the model's text vocabulary. Its ids mean nothing to a trained model; results name it."""

    name = "byte-level stand-in (random/tiny weights)"

    def __init__(self, vocab_size: int, bos_id: int | None = None, reserved: int = 4):
        self.vocab_size, self.bos_id, self.reserved = vocab_size, bos_id, reserved

    def __call__(self, text: str) -> list[int]:
        span = self.vocab_size - self.reserved
        ids = [self.reserved + b % span for b in text.encode("utf-8")]
        return ([self.bos_id] if self.bos_id is not None and self.bos_id < self.vocab_size else []) + ids
