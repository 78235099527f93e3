"""Card-aware presets (lab.cards) with faked cards and device properties, and ZeroGPU mode off and on. No GPU."""
import inspect
import sys
import types

import pytest

from lab import availability, cards, engines, gpu, presets, session, zerogpu
from lab.cards import Adapted
from lab.gpu import SPACES_CARDS
from lab.engines.base import BuildReport, Engine
from lab.errors import LabError
from lab.machine import OLD_GPU, SMALL_GPU, ZERO_GPU, Refusal
from lab.manager import ModelManager
from lab.spec import VariantSpec

PRESETS, _ = presets.load_all(presets.PRESETS_DIR)


@pytest.fixture
def gpu_here(monkeypatch):
    """lab.machine sees a GPU (the card itself is the test's)."""
    monkeypatch.setattr(cards.env, "cuda_available", lambda: True)


def adapted(name: str, card: str) -> Adapted | Refusal:
    return cards.adapt(PRESETS[name], SPACES_CARDS[card])


@pytest.mark.parametrize("card", list(SPACES_CARDS))
def test_the_fastest_preset_on_each_spaces_card_changes_only_what_that_card_lacks(card):
    got = adapted("csm-triton-cuda-graphs", card)
    c = SPACES_CARDS[card]
    assert isinstance(got, Adapted)
    assert got.spec.dtype == ("bfloat16" if c.bf16 else "float16")
    assert got.spec.kernels == ("triton" if c.capability >= (8, 0) else "torch")
    pdl_off = any("programmatic dependent launch off" in n for n in got.notes)
    assert pdl_off == ((8, 0) <= c.capability < (9, 0))   # on the T4 the Triton kernels themselves are off
    assert all(c.sm in change for change in got.changes)   # every change names the card's capability


def test_a_t4_gets_fp16_and_the_build_notes_say_so(gpu_here):
    built = []

    def builder(spec, progress):
        built.append(spec)
        return Engine(spec, 24000, BuildReport(notes=["2 CUDA graphs captured"]))

    manager = ModelManager(builder=builder, card=lambda: SPACES_CARDS["T4"])
    engine = manager.get(PRESETS["csm-triton-cuda-graphs"])
    assert built[0].dtype == "float16" and built[0].kernels == "torch"
    assert engine.report.notes[0].startswith("dtype: bfloat16 -> float16 (T4 is sm 7.5")
    assert engine.report.notes[-1] == "2 CUDA graphs captured"   # the engine's own notes follow the card's
    assert manager.get(PRESETS["csm-triton-cuda-graphs"]) is engine   # still one variant, keyed by the preset asked


def test_an_l4_keeps_bf16_and_the_notes_say_pdl_is_off(gpu_here):
    manager = ModelManager(builder=lambda spec, progress: Engine(spec, 24000),
                           card=lambda: SPACES_CARDS["L4"])
    engine = manager.get(PRESETS["csm-triton-cuda-graphs"])
    assert engine.spec.dtype == "bfloat16" and engine.spec.kernels == "triton"
    assert engine.report.notes == ["programmatic dependent launch off (a Triton kernel's prologue overlaps the "
                                   "previous one's tail from sm 9.0; L4 is sm 8.9)"]


def test_what_a_card_cannot_run_is_refused_before_loading_with_the_fix(gpu_here):
    fa2 = adapted("csm-fa2", "T4")
    assert fa2.code == OLD_GPU and "use attention: sdpa" in fa2.sentence
    big = adapted("minicpm-o-sdpa-compile-batched", "T4")
    assert big.code == SMALL_GPU and "bnb-nf4" in big.sentence
    assert isinstance(adapted("minicpm-o-bnb-nf4", "T4"), Adapted)   # quantized, the same model fits
    zero = adapted("csm-batched-cuda-graphs", "ZeroGPU")
    assert zero.code == ZERO_GPU and "csm-cuda-graphs" in zero.sentence

    built = []
    manager = ModelManager(builder=lambda spec, progress: built.append(spec), card=lambda: SPACES_CARDS["ZeroGPU"])
    with pytest.raises(LabError, match="preset 'csm-batched-cuda-graphs': max_streams above 1.*ZeroGPU"):
        manager.get(PRESETS["csm-batched-cuda-graphs"])
    assert built == []


def test_inductor_becomes_ahead_of_time_compilation_on_zerogpu():
    got = adapted("csm-sdpa-inductor", "ZeroGPU")
    assert got.spec.compile == "aot" and "AOTInductor" in got.changes[0]
    assert adapted("csm-inductor-cuda-graphs", "ZeroGPU").code == ZERO_GPU
    graphs = adapted("csm-cuda-graphs", "ZeroGPU")
    assert graphs.spec == PRESETS["csm-cuda-graphs"] and "build cost" in graphs.notes[0]


def test_batching_slots_shrink_with_the_card_and_their_caches_fit_its_free_memory():
    slots = {name: adapted("csm-batched-cuda-graphs", name).spec.max_streams
             for name in ("T4", "L4", "L40S", "A100", "H200")}
    assert slots["T4"] < slots["L4"] < slots["L40S"] < slots["A100"] <= slots["H200"] == 1024
    for name in ("T4", "L4", "L40S"):
        card, spec = SPACES_CARDS[name], PRESETS["csm-batched-cuda-graphs"]
        caches_gb = slots[name] * (gpu.FULL_KV_POSITIONS * gpu.CSM_SLOT_BYTES_PER_POSITION
                                   + gpu.CSM_SLOT_FIXED_BYTES) / 1e9
        assert caches_gb <= gpu.SLOTS_SHARE * (card.usable_gb - cards.weights_gb(spec))
        assert f"max_streams: 1024 -> {slots[name]}" in adapted("csm-batched-cuda-graphs", name).changes[-1]


def test_a_card_with_little_room_halves_each_streams_kv_for_more_slots():
    rows, positions = gpu.batch_room(0.4e9, 1024)
    assert positions == gpu.FULL_KV_POSITIONS // 2 and rows > 0
    assert gpu.batch_room(50e9, 8) == (8, gpu.FULL_KV_POSITIONS)   # what is asked, where it fits


def test_free_memory_counts_from_the_per_process_cap(monkeypatch):
    """An 80 GB card capped to a T4's 16 GB with 3 GB reserved has 13 GB for this process, not the card's 70."""
    import torch

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (70e9, 80e9))
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda: 0.2, raising=False)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 3e9)
    assert gpu.free_bytes() == pytest.approx(13e9)


def test_the_estimates_match_csm_1b_config():
    import torch
    from transformers import CsmConfig, CsmForConditionalGeneration

    from lab.engines.csm_batched import per_stream_bytes

    config = CsmConfig()
    with torch.device("meta"):
        model = CsmForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == cards.CSM_PARAMS
    codec = config.codec_config
    assert per_stream_bytes(config, 1) == gpu.CSM_SLOT_BYTES_PER_POSITION
    assert (per_stream_bytes(config.depth_decoder_config, config.num_codebooks)
            + per_stream_bytes(codec, codec.sliding_window + 8)) == gpu.CSM_SLOT_FIXED_BYTES


def test_the_environment_panel_has_a_line_per_gpu_preset(gpu_here):
    catalog = availability.Catalog(presets.PRESETS_DIR, weights_here=lambda s: True, card=SPACES_CARDS["T4"])
    rows = {r["preset"]: r for r in catalog.card_rows()}
    assert set(rows) == {n for n, s in PRESETS.items() if s.device == "cuda"}
    assert rows["csm-sdpa"]["status"] == "runs with changes" and "float16" in rows["csm-sdpa"]["what"]
    big = rows["minicpm-o-sdpa-compile-batched"]
    assert big["status"] == "cannot run" and "GB" in big["what"]
    # and the page does not offer what the card refuses
    assert catalog.statuses[False]["minicpm-o-sdpa-compile-batched"].refusal.code == SMALL_GPU
    assert catalog.statuses[True]["csm-sdpa"].available

    h200 = availability.Catalog(presets.PRESETS_DIR, weights_here=lambda s: True, card=SPACES_CARDS["H200"])
    on_h200 = h200.card_rows()
    assert {r["preset"] for r in on_h200 if r["status"] == "runs here"} >= {"csm-sdpa", "csm-batched-cuda-graphs"}
    assert all("not installed" in r["what"] for r in on_h200 if r["status"] != "runs here")   # a package, not the card


def test_without_a_gpu_every_gpu_preset_says_why():
    rows = availability.Catalog(presets.PRESETS_DIR, weights_here=lambda s: True, card=None).card_rows()
    assert rows and all(r["status"] == "cannot run" and "no GPU" in r["what"] for r in rows)


def test_lab_card_stands_in_a_spaces_card_and_a_wrong_name_is_refused(monkeypatch):
    monkeypatch.setattr(cards.env, "cuda_available", lambda: False)   # no device: nothing to cap
    gpu._device_card.cache_clear()
    monkeypatch.setenv("LAB_CARD", "T4")
    assert gpu.this_card() == SPACES_CARDS["T4"] and gpu.capability() == (7, 5)
    monkeypatch.setenv("LAB_CARD", "V100")
    with pytest.raises(LabError, match="LAB_CARD.*T4, L4"):
        gpu.this_card()


def test_off_zerogpu_the_decorator_changes_nothing(monkeypatch):
    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    monkeypatch.setitem(sys.modules, "spaces", None)   # importing it would fail: it must not be imported

    def loop():
        yield 1

    assert zerogpu.gpu(loop) is loop
    assert inspect.isgeneratorfunction(session.run_presets)   # the run loop as written, not a wrapper


def test_on_zerogpu_the_loop_runs_under_spaces_gpu_and_the_card_is_zerogpus(monkeypatch):
    calls = []
    fake = types.SimpleNamespace(GPU=lambda duration: (lambda fn: calls.append(duration) or ("under GPU", fn)))
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")

    def loop():
        yield 1

    assert zerogpu.gpu(loop) == ("under GPU", loop) and calls == [zerogpu.DURATION_S]
    assert gpu.this_card() == SPACES_CARDS["ZeroGPU"]   # from the table: outside a call CUDA is emulated


def test_aot_is_refused_where_it_is_not_implemented():
    with pytest.raises(LabError, match="compile: aot"):
        VariantSpec(family="pocket_tts", compile="aot").replace()
    with pytest.raises(LabError, match="compile: aot"):
        VariantSpec(family="csm", device="cuda", dtype="bfloat16", compile="aot", max_streams=4).replace()
