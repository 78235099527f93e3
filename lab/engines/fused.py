"""Triton kernels for one-token decoder steps (`kernels: triton`): the same layers, in five launches each.

Why: at batch 1 a decoder layer is matrix-vector work plus a dozen small element-wise ops. Through torch each
op is its own kernel (about 25 per layer), and CSM runs 4 layers 31 times and 16 layers once per frame, so even
inside a CUDA graph the launches and cuBLAS's batch-1 matrix kernels, far below memory bandwidth, set the pace,
not the bytes (docs/RESULTS.md#triton-kernels-h100). Here a layer is five kernels:

    1. RMSNorm -> q, k, v projections -> rotary embedding; k and v written straight into the static KV buffers
    2. attention of each query head over the filled KV slots
    3. output projection, added onto the residual stream
    4. RMSNorm -> gate and up projections -> silu(gate) * up
    5. down projection, added onto the residual stream

and CSM's per-codebook head runs with the stack's final norm folded in, and greedy picks through one argmax
kernel. Each kernel lets the next one in the stream launch early (programmatic dependent launch, Hopper and newer)
and loads its first weight tile before waiting for the previous kernel's output: weights never change, so the
next layer's reads overlap this one's tail (docs/RESULTS.md#triton-kernels-h100).

Every kernel reads each weight once, accumulates in float32, and sums in a fixed order (no atomics, no split
reductions, fixed block shapes), so a frame is bit-for-bit repeatable. Rounding follows the torch layers' (each
projection's output is rounded to the model dtype before the next op), but the sums run in another order than
cuBLAS's, so bf16 results differ from the torch path at rounding level. tests/test_fused.py checks each kernel
against torch's ops, a decoder stack against the torch layers, and the frame step's codes against the torch path
and generate().

`FusedStack` takes a transformers Llama-style decoder (CSM's backbone and depth decoder: SiLU-gated MLP, no
biases; it refuses others) as it is: it
concatenates q/k/v and gate/up weights once and points the model's own parameters at slices of the
concatenation, so no weight is held twice and the torch path (the prefill) keeps working on the same memory.
Steps of more than MAX_TOKENS tokens (prompts) run through the torch layers: the kernels are for decoding.

Needs Triton, which ships with CUDA builds of torch. With TRITON_INTERPRET=1 the kernels run on the CPU through
Triton's interpreter (slowly, and without PDL): that is how CI checks them without a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from lab import env, gpu
from lab.engines.kv import StaticKV, run_layers
from lab.engines.sampling import pick as tc_pick

MAX_TOKENS = 2   # the depth decoder's first step feeds 2 tokens; every other decode step feeds 1

# Block shapes, fixed per matrix shape (not autotuned at build) so that every build sums in the same order. The
# entries for CSM-1B's shapes were picked on the H100, with PDL on, by benchmarks/h100/fused_sweep.py (results in
# benchmarks/h100/fused-sweep-2e4e8e7/); other shapes (the tiny test models) take the defaults.
LINEAR_BLOCKS: dict[tuple, tuple] = {    # (N, K, glu, outputs contiguous) -> (rows per program, step, warps)
    (2048, 2048, False, False): (2, 2048, 4), (8192, 2048, True, False): (2, 2048, 2),
    (2048, 8192, False, False): (2, 2048, 4), (2051, 2048, False, False): (2, 2048, 4),
    (1024, 2048, False, False): (1, 2048, 4), (1024, 1024, False, False): (4, 1024, 4),
    (8192, 1024, True, False): (4, 1024, 2), (1024, 8192, False, False): (1, 2048, 8),
    (2051, 1024, False, False): (2, 1024, 2)}
QKV_BLOCKS: dict[tuple, tuple] = {       # (heads + 2 kv heads, head_dim, K) -> (rows per half head, step, warps)
    (48, 64, 2048): (2, 1024, 2), (12, 128, 1024): (2, 1024, 2)}
ATTENTION_BLOCKS: dict[tuple, tuple] = {  # (head_dim, KV slots) -> (slots per step, warps)
    (64, 2048): (128, 2), (128, 32): (16, 2)}
DEFAULT_LINEAR, DEFAULT_TRANSPOSED, DEFAULT_QKV, DEFAULT_ATTENTION = (16, 256, 4), (64, 32, 4), (8, 256, 4), (32, 4)


def pdl_available() -> bool:
    """Programmatic dependent launch: Hopper or newer, not under the interpreter; LAB_TRITON_PDL=0 turns it off.
    Asks the device (CUDA starts), so it is called when kernels are set up, never at import."""
    if os.environ.get("LAB_TRITON_PDL") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    return gpu.capability() >= (9, 0)   # the emulated card's under LAB_CARD


def _launch(warps: int, pdl: bool) -> dict:
    """Launch options. `pdl`: each kernel lets the next one start early (see _start/_wait); it is a constexpr of
    the kernels, so each setting compiles its own variant, and it is read at every launch (a graph captured with
    one setting replays it)."""
    return {"num_warps": warps, "PDL": pdl, **({"launch_pdl": True} if pdl else {})}


@triton.jit
def _rms_scale(x_ptr, stride_xm, K: tl.constexpr, eps, BM: tl.constexpr, M: tl.constexpr, BK: tl.constexpr):
    """1 / rms of each of the M rows of x, as a (BM,) float32 column."""
    rows = tl.arange(0, BM)
    total = tl.zeros([BM], dtype=tl.float32)
    for k0 in range(0, K, BK):
        cols = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                    mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0).to(tl.float32)
        total += tl.sum(x * x, axis=1)
    return 1.0 / tl.sqrt(total / K + eps)


@triton.jit
def _x_block(x_ptr, stride_xm, norm_ptr, rstd, k0, K: tl.constexpr, BM: tl.constexpr, M: tl.constexpr, BK: tl.constexpr,
             NORM: tl.constexpr):
    """A (BM, BK) block of the input rows, RMS-normalized as torch's RMSNorm does it: scaled in float32, rounded
    to the model dtype, times the norm weight (rounded again)."""
    rows = tl.arange(0, BM)
    cols = k0 + tl.arange(0, BK)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                mask=(rows[:, None] < M) & (cols[None, :] < K), other=0.0)
    if NORM:
        w = tl.load(norm_ptr + cols, mask=cols < K, other=0.0)
        x = (x.to(tl.float32) * rstd[:, None]).to(x.dtype)
        x = (x.to(tl.float32) * w[None, :].to(tl.float32)).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _w_tile(w_ptr, rows, stride_wn, stride_wk, k0, N, K, BK: tl.constexpr):
    """Weight rows `rows`, columns k0..k0+BK, as float32."""
    cols = k0 + tl.arange(0, BK)
    return tl.load(w_ptr + rows[:, None] * stride_wn + cols[None, :] * stride_wk,
                   mask=(rows[:, None] < N) & (cols[None, :] < K), other=0.0).to(tl.float32)


@triton.jit
def _dot(x, w):
    """x (BM, BK) times a weight tile (BN, BK): (BM, BN), summed along BK."""
    return tl.sum(x[:, None, :] * w[None, :, :], axis=2)


@triton.jit
def _reduce(x_ptr, stride_xm, norm_ptr, rstd, first_a, first_b, ptr_a, rows_a, ptr_b, rows_b, stride_wn, stride_wk,
            N, K: tl.constexpr, BM: tl.constexpr, M: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr,
            TWO: tl.constexpr):
    """x times the weight rows `rows_a` at ptr_a (and, with TWO, `rows_b` at ptr_b), summed over K in steps of BK:
    two (BM, rows) float32 sums. The first step's tiles come in already loaded (first_a, first_b)."""
    x = _x_block(x_ptr, stride_xm, norm_ptr, rstd, 0, K, BM, M, BK, NORM)
    acc_a = _dot(x, first_a)
    acc_b = acc_a
    if TWO:
        acc_b = _dot(x, first_b)
    for k0 in range(BK, K, BK):
        x = _x_block(x_ptr, stride_xm, norm_ptr, rstd, k0, K, BM, M, BK, NORM)
        acc_a += _dot(x, _w_tile(ptr_a, rows_a, stride_wn, stride_wk, k0, N, K, BK))
        if TWO:
            acc_b += _dot(x, _w_tile(ptr_b, rows_b, stride_wn, stride_wk, k0, N, K, BK))
    return acc_a, acc_b


@triton.jit
def _start(PDL: tl.constexpr):
    """With programmatic dependent launch (PDL), let the next kernel in the stream start now: it loads its weights
    (which nothing writes) while this one runs, and waits in _wait before touching anything else."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _wait(PDL: tl.constexpr):
    """Until the previous kernel has finished and its writes are visible. Every load of something a kernel writes,
    and every store, comes after this."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def _linear_kernel(x_ptr, w_ptr, out_ptr, res_ptr, norm_ptr, index_ptr, N, K: tl.constexpr, stride_xm, stride_om,
                   stride_rm, stride_wn, stride_wk, stride_wi, index_offset, eps, M: tl.constexpr, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, RESIDUAL: tl.constexpr,
                   INDEXED: tl.constexpr, PDL: tl.constexpr):
    """out = x @ W.T for M rows of x, BN output features per program. Options: RMS-normalize x first (NORM); W holds
    [gate; up] and out = silu(gate) * up (GLU); add `res` (RESIDUAL; it may be out itself: each program reads and
    writes only its own outputs); W is one slice of a stack of weights, picked by an index held on the device
    (INDEXED: CSM's per-codebook heads)."""
    _start(PDL)
    pid = tl.program_id(0)
    rows = pid * BN + tl.arange(0, BN)
    if INDEXED:   # the index is written on the device: wait before reading it
        _wait(PDL)
        w_ptr += (tl.load(index_ptr) + index_offset).to(tl.int64) * stride_wi
    # The first weight tile is loaded before waiting on the previous kernel: with PDL that overlaps its tail.
    w = _w_tile(w_ptr, rows, stride_wn, stride_wk, 0, N, K, BK)
    w_up = w
    if GLU:
        w_up = _w_tile(w_ptr + N * stride_wn, rows, stride_wn, stride_wk, 0, N, K, BK)
    if not INDEXED:
        _wait(PDL)
    rstd = tl.zeros([BM], dtype=tl.float32)
    if NORM:
        rstd = _rms_scale(x_ptr, stride_xm, K, eps, BM, M, BK)
    acc, acc_up = _reduce(x_ptr, stride_xm, norm_ptr, rstd, w, w_up, w_ptr, rows, w_ptr + N * stride_wn, rows,
                          stride_wn, stride_wk, N, K, BM, M, BK, NORM, GLU)
    dtype = out_ptr.dtype.element_ty
    out = acc.to(dtype)
    if GLU:
        gate = out.to(tl.float32)
        out = (gate / (1.0 + tl.exp(-gate))).to(dtype)          # silu, rounded as torch rounds it
        out = (out.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
    m = tl.arange(0, BM)
    where = out_ptr + m[:, None] * stride_om + rows[None, :]
    mask = (m[:, None] < M) & (rows[None, :] < N)
    if RESIDUAL:
        res = tl.load(res_ptr + m[:, None] * stride_rm + rows[None, :], mask=mask, other=0.0)
        out = (res.to(tl.float32) + out.to(tl.float32)).to(dtype)
    tl.store(where, out, mask=mask)


@triton.jit
def _qkv_rope_kernel(x_ptr, w_ptr, norm_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                     K: tl.constexpr, eps, stride_xm, stride_cache_head, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                     HEAD_DIM: tl.constexpr, M: tl.constexpr, BM: tl.constexpr, HALF: tl.constexpr,
                     BK: tl.constexpr, PDL: tl.constexpr):
    """RMSNorm, then the [q; k; v] projection, then the rotary embedding on q and k. Each program owns HALF rows of
    one head's first half and the matching HALF rows of its second half, the pairs that rotary mixes. Queries go
    to q (M, HEADS, HEAD_DIM); keys and values straight into the KV buffers at positions pos..pos+M-1."""
    _start(PDL)
    pid = tl.program_id(0)
    per_head: tl.constexpr = HEAD_DIM // 2 // HALF
    head = pid // per_head
    j = (pid % per_head) * HALF + tl.arange(0, HALF)           # columns within the head's first half
    rows_a = head * HEAD_DIM + j
    rows_b = rows_a + HEAD_DIM // 2
    n_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    w_a = _w_tile(w_ptr, rows_a, K, 1, 0, n_rows, K, BK)     # before the wait: see _linear_kernel
    w_b = _w_tile(w_ptr, rows_b, K, 1, 0, n_rows, K, BK)
    _wait(PDL)
    rstd = _rms_scale(x_ptr, stride_xm, K, eps, BM, M, BK)
    a, b = _reduce(x_ptr, stride_xm, norm_ptr, rstd, w_a, w_b, w_ptr, rows_a, w_ptr, rows_b, K, 1, n_rows, K, BM, M,
                   BK, True, True)
    dtype = q_ptr.dtype.element_ty
    a = a.to(dtype).to(tl.float32)
    b = b.to(dtype).to(tl.float32)
    m = tl.arange(0, BM)
    pos = tl.load(pos_ptr) + m                                  # (BM,) positions of the M tokens
    mask = m[:, None] < M
    if head < HEADS + KV_HEADS:
        # q * cos + rotate_half(q) * sin, with rotate_half(q) = [-q2, q1]; each product rounded as torch does.
        tab = pos[:, None] * HEAD_DIM + j[None, :]
        cos_a = tl.load(cos_ptr + tab, mask=mask, other=0.0).to(tl.float32)
        sin_a = tl.load(sin_ptr + tab, mask=mask, other=0.0).to(tl.float32)
        cos_b = tl.load(cos_ptr + tab + HEAD_DIM // 2, mask=mask, other=0.0).to(tl.float32)
        sin_b = tl.load(sin_ptr + tab + HEAD_DIM // 2, mask=mask, other=0.0).to(tl.float32)
        a_new = (a * cos_a).to(dtype).to(tl.float32) - (b * sin_a).to(dtype).to(tl.float32)
        b = (b * cos_b).to(dtype).to(tl.float32) + (a * sin_b).to(dtype).to(tl.float32)
        a = a_new
    if head < HEADS:
        base = q_ptr + m[:, None] * (HEADS * HEAD_DIM) + head * HEAD_DIM
    elif head < HEADS + KV_HEADS:
        base = k_cache_ptr + (head - HEADS) * stride_cache_head + pos[:, None] * HEAD_DIM
    else:
        base = v_cache_ptr + (head - HEADS - KV_HEADS) * stride_cache_head + pos[:, None] * HEAD_DIM
    tl.store(base + j[None, :], a.to(dtype), mask=mask)
    tl.store(base + j[None, :] + HEAD_DIM // 2, b.to(dtype), mask=mask)


@triton.jit
def _attention_kernel(q_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, scale, stride_cache_head,
                      HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, MAX_KEYS: tl.constexpr,
                      BS: tl.constexpr, PDL: tl.constexpr):
    """One query (token m, head h) per program, over KV slots 0..pos+m (causal), softmax in float32. Keys and values
    come from the previous kernel, so everything waits for it. Where one block of BS slots covers the whole buffer,
    every slot is loaded unmasked, not gated on pos: slots not written yet hold finite values (zeros, or an
    earlier request's), and the causal mask gives them weight 0. Otherwise an online softmax runs over blocks up to
    the buffer's size, skipping those past the filled slots: the bound stays a compile-time constant, so a CUDA
    graph replays it at any position. (The sweep picked 16-slot blocks for CSM's 32-slot depth buffers.)"""
    _start(PDL)
    _wait(PDL)
    pid = tl.program_id(0)
    m = pid // HEADS
    h = pid % HEADS
    kv_head = h // (HEADS // KV_HEADS)
    n_keys = tl.load(pos_ptr) + m + 1
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + (m * HEADS + h) * HEAD_DIM + d).to(tl.float32)
    k_base = k_cache_ptr + kv_head * stride_cache_head
    v_base = v_cache_ptr + kv_head * stride_cache_head
    if BS == MAX_KEYS:
        s = tl.arange(0, BS)
        k = tl.load(k_base + s[:, None] * HEAD_DIM + d[None, :]).to(tl.float32)
        v = tl.load(v_base + s[:, None] * HEAD_DIM + d[None, :]).to(tl.float32)
        score = tl.where(s < n_keys, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
        p = tl.exp(score - tl.max(score, axis=0))
        acc = tl.sum(p[:, None] * v, axis=0)
        total = tl.sum(p, axis=0)
    else:
        best = tl.full([1], float("-inf"), dtype=tl.float32)
        total = tl.zeros([1], dtype=tl.float32)
        acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
        for s0 in range(0, MAX_KEYS, BS):
            if s0 < n_keys:
                s = s0 + tl.arange(0, BS)
                live = s < n_keys
                k = tl.load(k_base + s[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
                score = tl.where(live, tl.sum(k * q[None, :], axis=1) * scale, float("-inf"))
                new_best = tl.maximum(best, tl.max(score, axis=0))
                p = tl.exp(score - new_best)
                shrink = tl.exp(best - new_best)
                v = tl.load(v_base + s[:, None] * HEAD_DIM + d[None, :], mask=live[:, None], other=0.0).to(tl.float32)
                acc = acc * shrink + tl.sum(p[:, None] * v, axis=0)
                total = total * shrink + tl.sum(p, axis=0)
                best = new_best
    tl.store(out_ptr + (m * HEADS + h) * HEAD_DIM + d, (acc / total).to(out_ptr.dtype.element_ty))


@triton.jit
def _rmsnorm_kernel(x_ptr, w_ptr, out_ptr, K: tl.constexpr, eps, stride_xm, BK: tl.constexpr, PDL: tl.constexpr):
    _start(PDL)
    _wait(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BK)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < K, other=0.0)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / K + eps)
    w = tl.load(w_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
    y = ((xf * rstd).to(x.dtype).to(tl.float32) * w).to(x.dtype)
    tl.store(out_ptr + row * K + cols, y, mask=cols < K)


# -- launchers ------------------------------------------------------------------------------------------------
def _m_block(m: int) -> int:
    return triton.next_power_of_2(m)


def linear(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor | None = None, *, norm: torch.Tensor | None = None,
           eps: float = 1e-6, glu: bool = False, residual: torch.Tensor | None = None, transposed: bool = False,
           index: torch.Tensor | None = None, index_offset: int = 0, pdl: bool = False) -> torch.Tensor:
    """x (M, K) @ W.T -> (M, N), into `out` if given. W is `weight` (N, K) as nn.Linear keeps it, or (K, N) with
    transposed=True; with `index`, `weight` is a stack (S, ...) of such matrices and slice index + index_offset
    (read on the device) is used. norm: RMSNorm x first with this weight. glu: W is [gate; up] and the result
    silu(gate) * up. residual: (M, N) added to the result; it may be `out` itself. pdl: see _launch."""
    m, k = x.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    w2 = weight[0] if index is not None else weight
    stride_wn, stride_wk = (w2.stride(1), w2.stride(0)) if transposed else (w2.stride(0), w2.stride(1))
    n = w2.shape[1] if transposed else w2.shape[0]
    if (w2.shape[0] if transposed else w2.shape[1]) != k:
        raise ValueError(f"linear: x has {k} features, the weight {tuple(w2.shape)} (transposed={transposed})")
    n = n // 2 if glu else n
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    # A weight stored contiguous along its outputs wants wide row blocks and short reduction steps to keep loads
    # whole (TritonKernels stores CSM's codebook heads the other way round, which is faster).
    along_outputs = stride_wn == 1 and stride_wk != 1
    rows, cols, warps = LINEAR_BLOCKS.get((n, k, glu, along_outputs),
                                          DEFAULT_TRANSPOSED if along_outputs else DEFAULT_LINEAR)
    _linear_kernel[(triton.cdiv(n, rows),)](
        x, weight, out, residual if residual is not None else out, norm if norm is not None else x,
        index if index is not None else x, n, k, x.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, stride_wn, stride_wk,
        weight.stride(0) if index is not None else 0, index_offset, eps,
        M=m, BM=_m_block(m), BN=rows, BK=cols, NORM=norm is not None, GLU=glu, RESIDUAL=residual is not None,
        INDEXED=index is not None, **_launch(warps, pdl))
    return out


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, N, stride_xm, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The index of each row's largest value, the first one on ties (as torch.argmax picks)."""
    _start(PDL)
    _wait(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_xm + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
    tl.store(out_ptr + row, tl.argmax(x, axis=0, tie_break_left=True).to(tl.int64))


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, pdl: bool = False) -> torch.Tensor:
    m, k = x.shape
    out = torch.empty_like(x)
    _rmsnorm_kernel[(m,)](x, weight, out, k, eps, x.stride(0), BK=triton.next_power_of_2(k), **_launch(4, pdl))
    return out


def qkv_rope(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor, eps: float, cos: torch.Tensor,
             sin: torch.Tensor, pos: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
             kv_heads: int, pdl: bool = False) -> None:
    """RMSNorm(x) @ [Wq; Wk; Wv].T with rotary at positions pos.. (a device tensor): queries into q (M, heads,
    head_dim), keys and values into the (1, kv_heads, slots, head_dim) buffers."""
    m, width = x.shape
    heads, head_dim = q.shape[1], q.shape[2]
    n_heads = heads + 2 * kv_heads
    half, cols, warps = QKV_BLOCKS.get((n_heads, head_dim, width), DEFAULT_QKV)
    half = min(half, head_dim // 2)
    _qkv_rope_kernel[(n_heads * (head_dim // 2 // half),)](
        x, weight, norm, cos, sin, pos, q, keys, values, width, eps, x.stride(0), keys.stride(1), HEADS=heads,
        KV_HEADS=kv_heads, HEAD_DIM=head_dim, M=m, BM=_m_block(m), HALF=half, BK=cols, **_launch(warps, pdl))


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, out: torch.Tensor,
              scale: float, pdl: bool = False) -> None:
    """Causal attention of q (M, heads, head_dim) at positions pos.. over the filled slots of the KV buffers."""
    m, heads, head_dim = q.shape
    kv_heads, max_slots = keys.shape[1], keys.shape[2]
    slots, warps = ATTENTION_BLOCKS.get((head_dim, max_slots), DEFAULT_ATTENTION)
    _attention_kernel[(m * heads,)](
        q, keys, values, pos, out, scale, keys.stride(1), HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
        MAX_KEYS=max_slots, BS=min(slots, triton.next_power_of_2(max_slots)), **_launch(warps, pdl))


class FusedStack:
    """One transformers decoder stack (layers, rotary_emb, norm, config) run through the kernels above."""

    def __init__(self, stack: torch.nn.Module, max_positions: int):
        config = stack.config
        self.stack = stack
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        if self.head_dim % 2 or self.heads % self.kv_heads:
            raise ValueError(f"head_dim {self.head_dim} must be even, and heads a multiple of kv heads")
        self.eps = config.rms_norm_eps
        self.layers = stack.layers[: config.num_hidden_layers]
        self.qkv, self.gate_up = [], []
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"kernels: triton's MLP kernel is SiLU-gated (CSM's); this stack uses "
                             f"{config.hidden_act}: use kernels: torch")
        for layer in self.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if any(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj,
                                                 mlp.up_proj, mlp.down_proj)):
                raise ValueError("kernels: triton covers projections without bias (CSM's); this stack has biases: "
                                 "use kernels: torch")
            self.qkv.append(_concatenate(attn.q_proj, attn.k_proj, attn.v_proj))
            self.gate_up.append(_concatenate(mlp.gate_proj, mlp.up_proj))
        # The rotary tables from the model's own rotary module, for every position the KV buffers hold: the kernel
        # looks up its position on the device (and any rope scaling the config asks for is already in them).
        weight = stack.norm.weight
        probe = torch.zeros(1, 1, self.head_dim, dtype=weight.dtype, device=weight.device)
        positions = torch.arange(max_positions, device=weight.device)[None]
        cos, sin = stack.rotary_emb(probe, position_ids=positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()

    @torch.no_grad()
    def run(self, hidden: torch.Tensor, kv: StaticKV, norm: bool = True, pdl: bool = False) -> torch.Tensor:
        """Drop-in for lab.engines.kv.run_layers over static KV buffers."""
        n = hidden.shape[1]
        if n > MAX_TOKENS:
            return run_layers(self.stack, hidden, kv, norm)
        # The kernels read their positions from kv.pos on the device. kv.positions, the torch path's record of the
        # positions just run, is not kept: a reader of it fails loudly instead of reading stale positions.
        kv.positions = None
        x = hidden[0] if hidden.stride(-1) == 1 else hidden[0].contiguous()   # (n, width)
        q = torch.empty(n, self.heads, self.head_dim, dtype=x.dtype, device=x.device)
        attended = torch.empty(n, self.heads * self.head_dim, dtype=x.dtype, device=x.device)
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            qkv_rope(x, self.qkv[i], layer.input_layernorm.weight, self.eps, self.cos, self.sin, kv.pos, q,
                     kv.keys[i], kv.values[i], self.kv_heads, pdl=pdl)
            attention(q, kv.keys[i], kv.values[i], kv.pos, attended, attn.scaling, pdl=pdl)
            # The residual stream: a new buffer at the first layer (the caller's input stays as it was), then
            # updated in place.
            x = linear(attended, attn.o_proj.weight, x if i else None, residual=x, pdl=pdl)
            inner = linear(x, self.gate_up[i], norm=layer.post_attention_layernorm.weight, eps=self.eps, glu=True,
                           pdl=pdl)
            linear(inner, mlp.down_proj.weight, x, residual=x, pdl=pdl)
        kv.advance(n)
        out = rmsnorm(x, self.stack.norm.weight, self.eps, pdl) if norm else x
        return out[None]


def _concatenate(*linears: torch.nn.Linear) -> torch.Tensor:
    """The linears' weights stacked into one (sum of rows, K) tensor, and each linear's weight made a view of its
    slice, so the torch path reads the same memory and nothing is held twice."""
    fused = torch.cat([lin.weight.detach() for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(fused[start: start + rows], requires_grad=False)
        start += rows
    return fused


class TritonKernels:
    """The engine's kernel hooks (see lab.engines.torch_common.TorchKernels), served by the kernels above. `stacks`
    maps each decoder stack the engine runs to the number of positions its KV buffers hold. `pdl`: programmatic
    dependent launch; None asks the device (pdl_available). Every launch reads `self.pdl`, so a benchmark can set it
    and capture again to compare on and off."""

    def __init__(self, stacks: dict[torch.nn.Module, int], stacked_heads: tuple[torch.nn.Module, ...] = (),
                 pdl: bool | None = None):
        self.pdl = pdl_available() if pdl is None else pdl
        self.stacks = {id(stack): FusedStack(stack, positions) for stack, positions in stacks.items()}
        for head in stacked_heads:
            # CSM keeps each codebook head as (width, vocab), contiguous along the vocab: read that way a
            # matrix-vector product strides across rows, which is slow (docs/RESULTS.md#triton-kernels-h100).
            # Stored (vocab, width) instead, with the parameter a transposed view of it: one copy for both paths.
            rows_major = head.weight.detach().transpose(1, 2).contiguous()
            head.weight = torch.nn.Parameter(rows_major.transpose(1, 2), requires_grad=False)

    def run_layers(self, stack: torch.nn.Module, hidden: torch.Tensor, kv: StaticKV, norm: bool = True):
        return self.stacks[id(stack)].run(hidden, kv, norm, self.pdl)

    def linear(self, module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if module.bias is not None:
            raise ValueError("kernels: triton covers projections without bias (CSM's): use kernels: torch")
        return linear(x.reshape(-1, x.shape[-1]), module.weight, pdl=self.pdl).reshape(*x.shape[:-1], -1)

    def codebooks_head(self, head: torch.nn.Module, norm: torch.nn.Module, hidden: torch.Tensor, kv: StaticKV):
        # The norm runs inside the head's kernel. The last position run is kv.pos - 1, and position p uses matrix
        # p - 1: matrix kv.pos - 2, read on the device.
        return linear(hidden, head.weight, norm=norm.weight, eps=norm.variance_epsilon, transposed=True,
                      index=kv.pos, index_offset=-2, pdl=self.pdl)

    def pick(self, logits: torch.Tensor, temperature: float, top_k: int, uniform: torch.Tensor | None) -> torch.Tensor:
        if temperature != 0:
            return tc_pick(logits, temperature, top_k, uniform)
        out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        _argmax_kernel[(logits.shape[0],)](logits, out, logits.shape[1], logits.stride(0),
                                           BLOCK=triton.next_power_of_2(logits.shape[1]), **_launch(4, self.pdl))
        return out


# -- attention for many streams at once (the batched engine) -------------------------------------------------------
ROWS_ATTENTION = "lab_rows"   # the name the batched engine's stacks are given in transformers' AttentionInterface
ROWS_ATTENTION_MAX_QUERIES = 64   # queries per (row, kv head) program: a decode step's, never a prompt's
ROWS_ATTENTION_SLOTS = 64         # keys per step of the online softmax


@triton.jit
def _rows_attention_kernel(q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, scale, keys,
                           sq_r, sq_h, sq_n, sk_r, sk_h, sk_l, sv_r, sv_h, sv_l, sm_r, sm_n, so_r, so_h, so_n,
                           N: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BQ: tl.constexpr,
                           BS: tl.constexpr):
    """One program per (stream row, kv head): the GROUP query heads that share that kv head, times the step's N
    tokens, as one block of queries, so each key and value is read once for all of them and the scores are a matrix
    product. The row's own mask says which slots each token may attend to; softmax in float32, online over blocks
    of BS slots. A block no token of the row may attend is skipped before its keys and values are read: a row's
    cost follows how far its stream has come, not the length of the view (the batched engine binds the whole
    buffer, whose far slots are empty for every stream in the first seconds)."""
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    i = tl.arange(0, BQ)
    head = kv_head * GROUP + i // N
    token = i % N
    live = i < GROUP * N
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + row * sq_r + head[:, None] * sq_h + token[:, None] * sq_n + d[None, :], mask=live[:, None],
                other=0.0)
    best = tl.full([BQ], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BQ], dtype=tl.float32)
    acc = tl.zeros([BQ, HEAD_DIM], dtype=tl.float32)
    for s0 in range(0, keys, BS):
        s = s0 + tl.arange(0, BS)
        inside = s < keys
        allowed = tl.load(mask_ptr + row * sm_r + token[:, None] * sm_n + s[None, :],
                          mask=live[:, None] & inside[None, :], other=0) != 0
        # Skipping is exact: a block with no allowed slot adds 0 to the sums and leaves the running max alone.
        if tl.max(allowed.to(tl.int32)) > 0:
            k = tl.load(k_ptr + row * sk_r + kv_head * sk_h + s[:, None] * sk_l + d[None, :],
                        mask=inside[:, None], other=0.0)
            score = tl.where(allowed, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
            new_best = tl.maximum(best, tl.max(score, axis=1))
            base = tl.where(new_best == float("-inf"), 0.0, new_best)   # no slot allowed yet: keep exp() finite
            p = tl.exp(score - base[:, None])
            shrink = tl.exp(best - base)
            v = tl.load(v_ptr + row * sv_r + kv_head * sv_h + s[:, None] * sv_l + d[None, :],
                        mask=inside[:, None], other=0.0)
            acc = acc * shrink[:, None] + tl.dot(p.to(v.dtype), v)
            total = total * shrink + tl.sum(p, axis=1)
            best = new_best
    out = acc / tl.where(total == 0.0, 1.0, total)[:, None]   # a row that may attend nowhere (a free slot): zeros
    tl.store(out_ptr + row * so_r + head[:, None] * so_h + token[:, None] * so_n + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=live[:, None])


# An operator of its own: inside a step compiled by inductor, dynamo sees one opaque call (the shapes below), not a
# Triton launch to trace.
@torch.library.custom_op("lab::rows_attention", mutates_args=())
def rows_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, allowed: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """query (rows, heads, n, head_dim), key and value (rows, kv heads, slots, head_dim), allowed (rows, 1, n, slots)
    boolean, or (1, 1, n, slots) shared by every row; returns (rows, n, heads, head_dim), the layout transformers'
    attention functions return."""
    rows, heads, n, head_dim = query.shape
    kv_heads, slots = key.shape[1], key.shape[2]
    group = heads // kv_heads
    out = torch.empty(rows, n, heads, head_dim, dtype=query.dtype, device=query.device)
    block = max(16, triton.next_power_of_2(group * n))
    _rows_attention_kernel[(rows, kv_heads)](
        query, key, value, allowed, out, scale, slots, query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2), value.stride(0), value.stride(1), value.stride(2),
        allowed.stride(0) if allowed.shape[0] > 1 else 0, allowed.stride(2),
        out.stride(0), out.stride(2), out.stride(1),
        N=n, GROUP=group, HEAD_DIM=head_dim, BQ=block,
        BS=min(ROWS_ATTENTION_SLOTS, max(16, triton.next_power_of_2(slots))), num_warps=4)   # the depth decoder: 32
    return out


@rows_attention.register_fake
def _rows_attention_shape(query, key, value, allowed, scale):
    rows, heads, n, head_dim = query.shape
    return query.new_empty(rows, n, heads, head_dim)


def rows_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-function signature: a decode step over per-row masks (the batched engine's) runs the
    kernel above; anything else (a prompt, a mask of another form) goes to transformers' SDPA function."""
    heads, kv_heads = query.shape[1], key.shape[1]
    mask = attention_mask
    if (mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1
            or mask.shape[0] not in (1, query.shape[0]) or mask.stride(-1) != 1 or heads % kv_heads
            or any(t.stride(-1) != 1 for t in (query, key, value))
            or (heads // kv_heads) * query.shape[2] > ROWS_ATTENTION_MAX_QUERIES):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return rows_attention(query, key, value, attention_mask, scale), None


def use_rows_attention(*stacks: torch.nn.Module) -> None:
    """Point these stacks' attention at rows_attention_forward (their masks stay SDPA's boolean form)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ROWS_ATTENTION, rows_attention_forward)
    for stack in stacks:
        stack.config._attn_implementation = ROWS_ATTENTION
