"""lab/engines/fused.py's Triton kernels (`kernels: triton`): each against a float64 reference on fresh random inputs, a
decoder stack against the torch layers, and the CSM frame step against the torch path's codes. Without a GPU they
run through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1); the H100 benchmark times them."""
import pytest
import torch
from conftest import TINY_CSM

from lab import env, machine
from lab.engines import csm
from lab.engines.kv import run_layers, static_kv_for
from lab.errors import LabError
from lab.measure.metrics import Timeline
from lab.request import ContextTurn, Request

fused = pytest.importorskip("lab.engines.fused", reason="Triton is not installed")
DEVICE = "cuda" if env.cuda_available() else "cpu"
TEXT = "Hello there, this is a streaming test."


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


def rms_ref(x, w, eps):
    """torch's RMSNorm as CSM's layers run it (float32 inside, rounded to the input dtype, times the weight)."""
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


# Triton's CPU interpreter casts float32 to bfloat16 by truncation, not to nearest as the GPU does, so bf16 is
# checked on a GPU only; float16 (which numpy rounds to nearest) stands in for a half type here.
HALF_TYPES = [torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5)] + [(t, 1e-2) for t in HALF_TYPES])
@pytest.mark.parametrize("m", [1, 2])
def test_linear_and_its_fused_options_match_the_torch_ops(dtype, tol, m):
    """Against torch's own ops in the same dtype (what the torch layers compute), measured in float64."""
    g = torch.Generator().manual_seed(m)
    k, n = 96, 40   # not multiples of the block shapes: the edges are masked
    F = torch.nn.functional

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(DEVICE, dtype)

    x, w, w2, norm = rand(m, k), rand(n, k), rand(2 * n, k), rand(k)
    assert rel_err(fused.linear(x, w), F.linear(x, w).double()) < tol
    xn = rms_ref(x, norm, 1e-5)
    assert rel_err(fused.linear(x, w, norm=norm, eps=1e-5), F.linear(xn, w).double()) < tol
    gate, up = F.linear(xn, w2).split(n, dim=-1)
    assert rel_err(fused.linear(x, w2, norm=norm, eps=1e-5, glu=True), (F.silu(gate) * up).double()) < tol
    out, other = rand(m, n), rand(m, n)
    assert rel_err(fused.linear(x, w, residual=other), (other + F.linear(x, w)).double()) < tol
    expected = (out + F.linear(x, w)).double()
    fused.linear(x, w, out, residual=out)   # in place, as the residual stream runs
    assert rel_err(out, expected) < tol
    # CSM's codebook heads: (positions, width, vocab), one picked on the device; stored either way round.
    index = torch.tensor([3], device=DEVICE)
    for stack in (rand(5, k, n), rand(5, n, k).transpose(1, 2)):
        assert rel_err(fused.linear(x, stack, transposed=True, index=index, index_offset=-1),
                       (x @ stack[2]).double()) < tol


def _tiny_model(attention="sdpa"):
    spec = TINY_CSM.replace(device=DEVICE, kernels="triton", attention=attention)
    model, _ = csm.load(spec)
    return spec, model


@pytest.mark.parametrize("n", [1, 2])
def test_a_stack_over_static_kv_matches_the_torch_layers(n):
    """Prompt through the torch layers, then n tokens through the kernels and, from the same cache, through torch:
    hidden states and the keys/values written agree to float32 rounding."""
    assert fused.ATTENTION_BLOCKS.get((16, 64), fused.DEFAULT_ATTENTION)[0] == 32   # the two-block premise below
    _, model = _tiny_model()
    stack = model.backbone_model
    fs = fused.FusedStack(stack, 64)
    g = torch.Generator().manual_seed(n)
    # 40 prompt positions: attention then spans two 32-slot blocks, so the online softmax rescales across them.
    prompt = torch.randn(1, 40, stack.config.hidden_size, generator=g).to(DEVICE)
    step = torch.randn(1, n, stack.config.hidden_size, generator=g).to(DEVICE)
    caches = [static_kv_for(stack.config, 64, torch.float32, DEVICE) for _ in range(2)]
    outs = []
    for cache, runner in zip(caches, (fs.run, lambda h, kv: run_layers(stack, h, kv))):
        with torch.no_grad():
            run_layers(stack, prompt, cache)
            outs.append(runner(step, cache))
    assert rel_err(outs[0], outs[1].double()) < 1e-5
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        assert rel_err(a[:, :, : 40 + n], b[:, :, : 40 + n].double()) < 1e-5
    assert torch.equal(caches[0].pos, caches[1].pos)


@pytest.mark.slow
def test_the_frame_step_through_the_kernels_gives_the_torch_paths_codes():
    """The engine's one step function, served by the kernels, against the same step served by the model's modules
    (tests/test_csm.py checks those against generate() too): the same codes, greedy, with a context turn; two runs
    are identical; and the codes are transformers generate()'s."""
    spec, model = _tiny_model()
    engine = csm.CsmEngine(spec, model, None)
    reference = csm.CsmEngine(spec.replace(kernels="torch"), model, None, static_kv=True)
    assert isinstance(engine.kernels, fused.TritonKernels)

    def codes_of(e, request):
        for _ in e.stream(request, Timeline()):
            pass
        return e.last_codes.clone()

    # Under Triton's interpreter each frame costs seconds, so no frame runs twice for one check: the plain request
    # is compared with the torch path and with generate(), the one with context with the torch path and with a
    # second run of the kernels.
    plain = Request(TEXT, max_audio_s=0.64)      # 8 frames
    codes = codes_of(engine, plain)
    assert len(codes) == round(plain.max_audio_s * csm.FRAME_RATE_HZ)
    assert torch.equal(codes, codes_of(reference, plain))
    ids = torch.tensor([engine.tokenizer(f"[0]{TEXT}")], device=DEVICE)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, do_sample=False, depth_decoder_do_sample=False, max_new_tokens=len(codes))
    assert torch.equal(ref[0], codes)
    with_context = Request(TEXT, max_audio_s=0.4, context=(ContextTurn("An earlier turn.", speaker=1),))   # 5 frames
    codes = codes_of(engine, with_context)
    assert len(codes) == round(with_context.max_audio_s * csm.FRAME_RATE_HZ)
    assert torch.equal(codes, codes_of(reference, with_context))
    assert torch.equal(codes, codes_of(engine, with_context))


def test_the_model_keeps_one_copy_of_each_weight():
    """The fused q/k/v and gate/up matrices are the model's own parameters: its modules read slices of them."""
    _, model = _tiny_model()
    layer = model.backbone_model.layers[0]
    before = [p.detach().clone() for p in (layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight)]
    fs = fused.FusedStack(model.backbone_model, 16)
    q, up = layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight
    assert torch.equal(q, before[0]) and torch.equal(up, before[1])
    assert q.untyped_storage().data_ptr() == fs.qkv[0].untyped_storage().data_ptr()
    assert up.untyped_storage().data_ptr() == fs.gate_up[0].untyped_storage().data_ptr()


def test_triton_kernels_refuse_what_they_do_not_cover(monkeypatch):
    tiny = TINY_CSM.replace(device=DEVICE)
    for changes, field in ((dict(compile="inductor"), "compile: inductor"), (dict(family="pocket_tts"), "csm only"),
                           (dict(attention="sdpa-flash"), "sdpa-flash")):
        with pytest.raises(LabError, match=field):
            tiny.replace(kernels="triton", **changes)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if not env.cuda_available():     # a valid value, but not on this machine: lab.machine says why
        refusal = machine.check(TINY_CSM.replace(kernels="triton"), weights_here=lambda s: True)
        assert refusal.code == machine.NO_GPU and "kernels: triton runs on a CUDA GPU" in refusal.sentence
