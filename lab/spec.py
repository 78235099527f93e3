"""VariantSpec: the frozen, validated description of one inference variant.

Validation checks values and combinations only, the same on every machine, so a combination that cannot work
anywhere is refused with its reason instead of failing minutes into a weight download or a compile. Whether this
machine can run a valid spec (a GPU, a package, cached weights) is lab.machine's question.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, fields

from lab.errors import LabError

FAMILIES = {
    # family: default model, whether torch axes apply, which weights modes it has, whether a request may carry a
    # spoken user turn (Request.user_audio)
    "csm": {"model": "sesame/csm-1b", "torch": True, "weights": ("pretrained", "random", "tiny"), "user_audio": False},
    "pocket_tts": {"model": "eustlb/pocket-tts", "torch": True, "weights": ("pretrained", "random", "tiny"),
                   "user_audio": False},
    "hibari": {"model": "hibari-tts:heart", "torch": False, "weights": ("pretrained",), "user_audio": False},
    # Its architecture lives in the hub repo's own Python (remote code), so there is no random/tiny config here.
    "minicpm_o": {"model": "openbmb/MiniCPM-o-2_6", "torch": True, "weights": ("pretrained",), "user_audio": True},
    # MiniCPM-o's runnable kin, inside transformers: thinker, talker and token2wav (lab/engines/qwen_omni.py).
    "qwen2.5-omni": {"model": "Qwen/Qwen2.5-Omni-7B", "torch": True, "weights": ("pretrained", "random", "tiny"),
                     "user_audio": True},
    # A speech server elsewhere, through OpenAI's POST /v1/audio/speech (lab/engines/remote.py): `model` is its id
    # there.
    "remote": {"model": "", "torch": False, "weights": ("pretrained",), "user_audio": False},
}
# Where the families that are not torch run: what an axis they do not take is told.
RUNS_ON = {"hibari": "runs on ONNX Runtime on the CPU", "remote": "runs on its server"}
# Model ids whose repository code the lab may run (trust_remote_code), each only at a preset's pinned revision.
# Adding an id here means someone read that repo's Python at the revision the preset pins.
TRUST_REMOTE_CODE_ALLOWLIST = frozenset({"openbmb/MiniCPM-o-2_6"})
REMOTE_CODE_FAMILIES = ("minicpm_o",)   # families that only load through the repo's own code
CHOICES = {
    "family": tuple(FAMILIES),
    "weights": ("pretrained", "random", "tiny"),
    "device": ("cpu", "cuda"),
    "dtype": ("float32", "bfloat16", "float16"),
    "attention": ("eager", "sdpa", "sdpa-flash", "flash_attention_2", "triton"),
    # aot: the step's pieces compiled ahead of time (torch.export + AOTInductor, lab/aot.py), ZeroGPU's route
    "compile": ("off", "inductor", "cuda-graphs", "inductor+cuda-graphs", "aot"),
    "kernels": ("torch", "triton"),
    "quantization": ("none", "bnb-int8", "bnb-nf4", "int8-dynamic", "int8-torchao"),
    "prefill": ("batched", "per-segment"),
    "init_tts": ("build", "request"),
    "streaming": ("per-sentence", "whole"),
    "leading_silence": ("keep", "trim"),
    "decode": ("inline", "thread"),
}


@dataclass(frozen=True)
class VariantSpec:
    family: str
    name: str = ""                  # the preset's name; a label, not part of the identity
    description: str = ""
    model: str = ""                 # hub id or local path; "" means the family's default
    weights: str = "pretrained"
    device: str = "cpu"
    dtype: str = "float32"
    attention: str = "sdpa"
    compile: str = "off"
    kernels: str = "torch"          # csm: the one-token steps' layers through the model's modules or engines/fused.py
    quantization: str = "none"
    prefill: str = "batched"
    first_chunk_frames: int = 1     # frames decoded before the first chunk is sent
    chunk_growth: float = 2.0       # each later chunk is this many times the previous one...
    max_chunk_frames: int = 8       # ...up to this many frames
    trust_remote_code: bool = False  # run the hub repo's own Python: allowlisted ids at a pinned revision only
    revision: str = ""              # the hub commit (40 hex digits) that weights and remote code are pinned to
    init_tts: str = "build"         # minicpm_o: init_tts() at build, or in the first request's session phase
    streaming: str = "per-sentence"  # hibari: a chunk per sentence, or the whole text synthesized before the first
    # hibari: the voice's padded start as it comes (keep), or cut to its first audible sample less a short margin
    # (trim, lab.engines.hibari.LEAD_MARGIN_S): the silence a listener waits through is a latency of its own.
    leading_silence: str = "keep"
    # CPU threads of the model's kernels (torch intra-op, or ONNX Runtime's for hibari): a count, or "auto", one per
    # core less one (lab.engines.torch_common.AUTO_THREADS).
    threads: str = "auto"
    max_streams: int = 1            # csm: above 1, that many listeners share one batched frame step at once
    # pocket_tts: the codec decodes each chunk in the frame loop (inline), or while a thread of its own makes the next
    # chunk's frames (thread): on the CPU the decode then runs on a second core.
    decode: str = "inline"
    # qwen2.5-omni: the token2wav DiT's ODE steps (transformers' default 10; fewer is faster and rougher), and the codes
    # after each chunk that its window waits for (0: a chunk is decoded as soon as its own codes exist).
    dit_steps: int = 10
    lookahead_frames: int = 0
    # remote: the server's base URL (it answers POST /v1/audio/speech), and the voice to ask for where it has voices.
    endpoint: str = ""
    voice: str = ""

    def identity(self) -> dict:
        """What makes the variant: every field but the labels, with the family's default model filled in."""
        ident = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("name", "description")}
        ident["model"] = ident["model"] or FAMILIES[self.family]["model"]
        return ident

    @property
    def key(self) -> str:
        """Equal specs are one variant: the label fields do not count."""
        return json.dumps(self.identity(), sort_keys=True)

    @property
    def takes_user_audio(self) -> bool:
        """Whether a request may carry a spoken user turn for this family (omni models)."""
        return FAMILIES[self.family]["user_audio"]

    @property
    def batches(self) -> bool:
        """Whether many requests share this variant at once (csm with max_streams > 1); every other variant serves
        one request at a time, through the page's line."""
        return self.max_streams > 1

    @property
    def model_id(self) -> str:
        return self.model or FAMILIES[self.family]["model"]

    def with_weights(self, weights: str) -> "VariantSpec":
        """The CLI's --weights and the page's random-weights switch: a family whose weights ship with its package
        (hibari) keeps them, as the real-speech reference row."""
        if weights == self.weights or weights not in FAMILIES[self.family]["weights"]:
            return self
        return self.replace(weights=weights)

    def replace(self, **changes) -> "VariantSpec":
        return validate(dataclasses.replace(self, **changes), where=self.name or "spec")


def from_dict(data: dict, where: str = "spec") -> VariantSpec:
    """Build and validate a spec from plain data (a YAML preset, CLI flags); unknown keys are refused."""
    if not isinstance(data, dict):
        raise LabError(where, f"expected a mapping of fields, got {type(data).__name__}")
    known = {f.name: f for f in fields(VariantSpec)}
    for key in data:
        if key not in known:
            close = [k for k in known if k.startswith(str(key)[:3])]
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise LabError(where, f"unknown field {key!r}{hint}; known fields: {', '.join(known)}")
    if "family" not in data:
        raise LabError(where, f"family is required: one of {'|'.join(FAMILIES)}")
    if isinstance(data.get("threads"), int) and not isinstance(data["threads"], bool):
        data = {**data, "threads": str(data["threads"])}   # YAML reads `threads: 2` as a number
    for key, value in data.items():
        want = known[key].type
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool),
            "bool": isinstance(value, bool),
        }[want]
        if not ok:
            raise LabError(where, f"{key}: expected {want}, got {type(value).__name__} {value!r}")
    # 2 and 2.0 are one chunk_growth: coerce so equal specs get one key.
    data = {k: float(v) if known[k].type == "float" else v for k, v in data.items()}
    return validate(VariantSpec(**data), where)


def _validate_remote_code(spec: VariantSpec, where: str) -> None:
    """Remote code runs whatever Python the repo holds, so it is never on by default: only where the preset asks for
    it, pins the commit that was read, and names an allowlisted model. Also MiniCPM-o's own limits."""
    if spec.family not in REMOTE_CODE_FAMILIES:
        for field_name, default in (("trust_remote_code", False), ("revision", ""), ("init_tts", "build")):
            if getattr(spec, field_name) != default:
                raise LabError(where, f"{field_name}: {spec.family} loads through transformers' own classes (or its "
                                      f"package), so {field_name} does not apply; remove the field")
        return
    if not spec.trust_remote_code:
        raise LabError(where, f"trust_remote_code: {spec.family} only loads through its repo's own code "
                              f"(modeling_minicpmo.py); say trust_remote_code: true and pin revision: <commit sha>")
    if spec.model_id not in TRUST_REMOTE_CODE_ALLOWLIST:
        raise LabError(where, f"trust_remote_code: {spec.model_id!r} is not on the allowlist "
                              f"({', '.join(sorted(TRUST_REMOTE_CODE_ALLOWLIST))}); read that repo's code and add "
                              f"the id to TRUST_REMOTE_CODE_ALLOWLIST in lab/spec.py, or use an allowlisted model")
    if not (len(spec.revision) == 40 and all(c in "0123456789abcdef" for c in spec.revision)):
        raise LabError(where, f"revision: {spec.revision!r} does not pin a commit, and trust_remote_code runs the "
                              f"repo's code as of that revision; set revision: to the 40-hex commit sha you reviewed")
    if spec.weights != "pretrained":
        raise LabError(where, f"weights: {spec.family} has no {spec.weights!r} config (its architecture lives in the "
                              f"repo's remote code); use weights: pretrained")
    if spec.device != "cuda":
        raise LabError(where, "device: MiniCPM-o's streaming_generate moves tensors with .cuda(), so it runs on a "
                              "GPU only; use device: cuda")
    if spec.attention not in ("sdpa", "flash_attention_2"):
        why = ("the model does not support eager attention (its model card: sdpa or flash_attention_2, no eager)"
               if spec.attention == "eager" else "the model's own generate loop runs outside the lab's SDPA kernel pin")
        raise LabError(where, f"attention: {spec.attention} is refused for {spec.family}: {why}; "
                              f"use attention: sdpa or flash_attention_2")
    defaults = VariantSpec(family=spec.family)
    for axis in ("first_chunk_frames", "chunk_growth", "max_chunk_frames"):
        if getattr(spec, axis) != getattr(defaults, axis):
            raise LabError(where, f"{axis}: MiniCPM-o streams audio in chunks of its own size, so {axis} does not "
                                  f"apply; remove the field")


def _validate_cpu_int8(spec: VariantSpec, where: str) -> None:
    """int8-dynamic (torch.ao's quantized linear) and int8-torchao (int8 activations and weights) are CPU kernels
    over float32 layers, for the backbone's linears; the flow head and the codec stay in float."""
    q = spec.quantization
    if spec.device != "cpu":
        gpu = "bnb-int8" if q == "int8-dynamic" else "bnb-int8 (or bnb-nf4)"
        raise LabError(where, f"quantization: {q!r} runs on the CPU only (its int8 matmuls are CPU kernels): use "
                              f"device: cpu, or quantization: {gpu} on CUDA")
    if spec.family != "pocket_tts":
        raise LabError(where, f"quantization: {q} is implemented for pocket_tts only; use quantization: none")
    if spec.dtype != "float32":
        raise LabError(where, f"quantization: {q} quantizes float32 layers (activations are quantized from float32 "
                              f"at every call); use dtype: float32")
    if q == "int8-dynamic" and spec.compile != "off":
        raise LabError(where, "quantization: int8-dynamic with compile: inductor: dynamo breaks the step into 22 "
                              "graphs at torch.ao's quantized linears, and it ran slower than eager; use compile: "
                              "off, or quantization: int8-torchao, which is built for torch.compile")


def _validate_triton(spec: VariantSpec, where: str) -> None:
    if spec.family != "csm":
        raise LabError(where, "kernels: triton is implemented for csm only; use kernels: torch")
    # device: cpu is a valid value: the kernels run there under Triton's interpreter (tests); lab.machine refuses
    # it elsewhere.
    if spec.quantization != "none":
        raise LabError(where, f"kernels: triton reads bf16/fp16/fp32 weights, not {spec.quantization}'s packed ones; "
                              f"use quantization: none, or kernels: torch")
    if spec.compile in ("inductor", "inductor+cuda-graphs", "aot"):
        raise LabError(where, f"kernels: triton with compile: {spec.compile}: the layers are already fused kernels "
                              f"and inductor would only wrap them; use compile: cuda-graphs (or off)")
    if spec.attention in ("sdpa-flash", "flash_attention_2"):
        raise LabError(where, f"attention: {spec.attention} with kernels: triton: the prompt runs over the static KV "
                              f"buffers through a mask, and flash kernels take no mask; use attention: sdpa (or "
                              f"eager)")


MAX_STREAMS = 4096


def _validate_batched(spec: VariantSpec, where: str) -> None:
    """max_streams > 1: lab/engines/csm_batched.py, whose step runs every stream's row through the model's own
    modules (cuBLAS) over per-row KV buffers."""
    if spec.family != "csm":
        raise LabError(where, "max_streams: batched serving is implemented for csm only; use max_streams: 1")
    if not 1 <= spec.max_streams <= MAX_STREAMS:
        raise LabError(where, f"max_streams: {spec.max_streams} is out of range; use 1 to {MAX_STREAMS}")
    if spec.kernels != "torch":
        raise LabError(where, "max_streams with kernels: triton: the fused kernels are shaped for one stream; use "
                              "kernels: torch for many streams (csm-triton-cuda-graphs stays the fastest for one)")
    if spec.quantization != "none":
        raise LabError(where, f"max_streams with quantization: {spec.quantization}: the batched step is graphed and "
                              f"bitsandbytes cannot be captured; use quantization: none")
    if spec.attention not in ("sdpa", "eager", "triton"):
        raise LabError(where, f"max_streams with attention: {spec.attention}: each stream attends over its own row "
                              f"through a mask, and flash kernels take no mask; use attention: triton "
                              f"(lab/engines/fused.py's kernel for that) or sdpa")
    if spec.prefill != "batched":
        raise LabError(where, "max_streams with prefill: per-segment: arriving prompts are prefilled together in one "
                              "padded batch; use prefill: batched")


def _validate_qwen_omni(spec: VariantSpec, where: str) -> None:
    if spec.family != "qwen2.5-omni":
        raise LabError(where, "dit_steps and lookahead_frames are qwen2.5-omni's token2wav axes; remove them")
    if not 2 <= spec.dit_steps <= 64:
        raise LabError(where, f"dit_steps: {spec.dit_steps} is out of range; use 2 (one ODE interval) to 64 "
                              f"(transformers' default is 10)")
    if not 0 <= spec.lookahead_frames <= 64:
        raise LabError(where, f"lookahead_frames: {spec.lookahead_frames} is out of range; use 0 to 64 codes")
    if spec.dtype == "float16":
        raise LabError(where, "dtype: float16 is refused for qwen2.5-omni: the model card runs bfloat16 (or float32 "
                              "on the CPU); use dtype: bfloat16")


def validate(spec: VariantSpec, where: str = "spec") -> VariantSpec:
    """Refuse before any build what cannot work on any machine, saying why and what to change."""
    for field_name, allowed in CHOICES.items():
        value = getattr(spec, field_name)
        if value not in allowed:
            raise LabError(where, f"{field_name}: {value!r} is not one of {'|'.join(allowed)}")
    _validate_remote_code(spec, where)
    fam = FAMILIES[spec.family]
    if spec.weights not in fam["weights"]:
        raise LabError(where, f"weights: {spec.family} has no {spec.weights!r} config "
                              f"(its weights ship with the package); use weights: pretrained")
    if spec.first_chunk_frames < 1 or spec.max_chunk_frames < spec.first_chunk_frames:
        raise LabError(where, "first_chunk_frames must be >= 1 and max_chunk_frames >= first_chunk_frames")
    if spec.chunk_growth < 1.0:
        raise LabError(where, f"chunk_growth: {spec.chunk_growth} would shrink chunks; use 1.0 or more")

    _validate_axes_of_one_family(spec, where)
    if not fam["torch"]:
        defaults = VariantSpec(family=spec.family)
        for axis in ("device", "dtype", "attention", "compile", "kernels", "quantization"):
            if getattr(spec, axis) != getattr(defaults, axis):
                raise LabError(where, f"{axis}: {spec.family} {RUNS_ON[spec.family]}, so {axis} does not "
                                      f"apply; remove the field")
        return spec

    _validate_torch(spec, where)
    return spec


def _validate_axes_of_one_family(spec: VariantSpec, where: str) -> None:
    """The fields that only some families (or the batched engine) take, and the thread count."""
    if spec.threads != "auto" and not (spec.threads.isdigit() and int(spec.threads) >= 1):
        raise LabError(where, f"threads: {spec.threads!r} is not a thread count; use threads: 1, 2 (any count of 1 "
                              f"or more) or auto")
    if spec.streaming != "per-sentence" and spec.family != "hibari":
        raise LabError(where, f"streaming: {spec.family} streams in frame chunks (first_chunk_frames, chunk_growth, "
                              f"max_chunk_frames); streaming: {spec.streaming} is for hibari; remove the field")
    if spec.leading_silence != "keep" and spec.family != "hibari":
        raise LabError(where, f"leading_silence: {spec.leading_silence} is implemented for hibari only (it pads its "
                              f"start); remove the field")
    if spec.max_streams != 1:
        _validate_batched(spec, where)
    if spec.attention == "triton" and spec.max_streams == 1:
        raise LabError(where, "attention: triton is the batched engine's kernel (one program per stream row over that "
                              "row's mask); set max_streams above 1, or for one stream use kernels: triton with "
                              "attention: sdpa")
    _validate_remote(spec, where)
    if spec.decode != "inline" and spec.family != "pocket_tts":
        raise LabError(where, f"decode: {spec.decode} is implemented for pocket_tts only (csm decodes inside its "
                              f"frame graph on the GPU); remove the field")


def _validate_remote(spec: VariantSpec, where: str) -> None:
    if spec.family != "remote":
        for field_name in ("endpoint", "voice"):
            if getattr(spec, field_name):
                raise LabError(where, f"{field_name}: is for family: remote (a speech server elsewhere); remove "
                                      f"the field")
        return
    if not spec.endpoint.startswith(("http://", "https://")):
        raise LabError(where, f"endpoint: {spec.endpoint!r} is not a server's URL; give its base URL, e.g. "
                              f"endpoint: http://127.0.0.1:8000 (it must answer POST /v1/audio/speech)")
    if not spec.model:
        raise LabError(where, "model: family: remote asks the server for a model by its id; set model: to one of "
                              "the ids its GET /v1/models lists")
    if spec.threads != "auto":
        raise LabError(where, f"threads: family: remote {RUNS_ON['remote']}, so threads does not apply; remove "
                              f"the field")


def _validate_torch(spec: VariantSpec, where: str) -> None:
    """What the torch families' axes need of each other: quantization, attention kernels, compile, Triton."""
    if spec.quantization.startswith("bnb"):
        if spec.device != "cuda":
            raise LabError(where, f"quantization: {spec.quantization} needs a CUDA GPU (bitsandbytes kernels); "
                                  f"use quantization: none on the CPU")
        if spec.quantization == "bnb-int8" and spec.compile in ("cuda-graphs", "inductor+cuda-graphs"):
            raise LabError(where, "bnb-int8 cannot run inside a CUDA graph (LLM.int8 syncs with the host); "
                                  "use compile: off, or quantization: bnb-nf4")
    if spec.quantization.startswith("int8-"):
        _validate_cpu_int8(spec, where)
    if spec.attention == "flash_attention_2":
        if spec.device != "cuda" or spec.dtype == "float32":
            raise LabError(where, "attention: flash_attention_2 needs device: cuda and dtype bfloat16 or float16")
    if spec.attention == "sdpa-flash" and spec.dtype == "float32" and spec.device == "cuda":
        raise LabError(where, "attention: sdpa-flash has no float32 kernel on CUDA; use dtype: bfloat16")
    if spec.compile in ("cuda-graphs", "inductor+cuda-graphs"):
        if spec.family != "csm" and not (spec.family == "qwen2.5-omni" and spec.compile == "cuda-graphs"):
            raise LabError(where, f"compile: {spec.compile} is implemented for csm only (cuda-graphs also for "
                                  f"qwen2.5-omni); use compile: inductor")
        if spec.device != "cuda":
            raise LabError(where, f"compile: {spec.compile} needs device: cuda; on the CPU use compile: inductor")
    if spec.compile == "aot" and (spec.family != "csm" or spec.max_streams > 1):
        raise LabError(where, "compile: aot is implemented for csm's one-stream step (each piece is exported at one "
                              "shape); use compile: inductor, or max_streams: 1")
    if spec.kernels == "triton":
        _validate_triton(spec, where)
    if spec.family == "qwen2.5-omni" or (spec.dit_steps, spec.lookahead_frames) != (10, 0):
        _validate_qwen_omni(spec, where)
    if spec.family in ("csm", "qwen2.5-omni") and spec.compile != "off" and \
            spec.attention in ("sdpa-flash", "flash_attention_2"):
        raise LabError(where, f"attention: {spec.attention} with compile: {spec.compile}: the compiled and graphed "
                              f"steps attend over fixed-size KV buffers through a mask, and flash kernels take no "
                              f"mask; use attention: sdpa (or eager), or compile: off")
