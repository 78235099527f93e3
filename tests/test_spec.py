import pytest

from lab import env, machine
from lab.errors import LabError
from lab.spec import VariantSpec, from_dict


def refused(data):
    with pytest.raises(LabError) as e:
        from_dict(data, where="presets/x.yaml")
    return str(e.value)


def test_unknown_field_is_refused_with_a_suggestion():
    msg = refused({"family": "csm", "atention": "sdpa"})
    assert msg.startswith("presets/x.yaml: unknown field 'atention'") and "attention" in msg


def test_wrong_type_names_field_and_type():
    assert "first_chunk_frames: expected int, got str" in refused({"family": "csm", "first_chunk_frames": "2"})
    assert "first_chunk_frames: expected int, got bool" in refused({"family": "csm", "first_chunk_frames": True})


def test_bad_choice_lists_the_allowed_values():
    assert "compile: 'cuda-graph' is not one of off|inductor|cuda-graphs|inductor+cuda-graphs" in refused({"family": "csm", "compile": "cuda-graph"})


def test_missing_family():
    assert "family is required" in refused({"weights": "tiny"})


def test_what_this_machine_lacks_is_a_reason_code_and_a_sentence_not_a_value_error(monkeypatch):
    gpu = from_dict({"family": "csm", "device": "cuda", "dtype": "bfloat16"})   # a valid value on any machine
    monkeypatch.setattr(env, "cuda_available", lambda: False)
    refusal = machine.check(gpu, weights_here=lambda s: True)
    assert refusal.code == machine.NO_GPU and "no GPU is visible" in refusal.sentence
    with pytest.raises(LabError, match="no GPU is visible"):
        machine.require(gpu.replace(name="csm-gpu"), weights_here=lambda s: True)
    cpu = from_dict({"family": "csm"})
    assert machine.check(cpu, weights_here=lambda s: False).code == machine.NO_WEIGHTS
    assert machine.check(cpu, weights_here=lambda s: True) is None


def test_bnb_on_cpu_is_refused():
    assert "needs a CUDA GPU" in refused({"family": "csm", "quantization": "bnb-nf4"})


def test_bnb_int8_with_cuda_graphs_is_refused():
    msg = refused({"family": "csm", "device": "cuda", "dtype": "bfloat16", "quantization": "bnb-int8",
                   "compile": "cuda-graphs"})
    assert "bnb-int8 cannot run inside a CUDA graph" in msg


def test_missing_optional_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(env, "cuda_available", lambda: True)
    monkeypatch.setattr(env, "has_package", lambda name: name != "flash_attn")
    fa2 = from_dict({"family": "csm", "device": "cuda", "dtype": "bfloat16", "attention": "flash_attention_2"})
    refusal = machine.check(fa2, weights_here=lambda s: True)
    assert refusal.code == machine.NO_PACKAGE and refusal.package == "flash-attn"
    assert "flash-attn is not installed" in refusal.sentence and "pip install flash-attn" in refusal.sentence
    monkeypatch.setattr(env, "has_package", lambda name: name != "bitsandbytes")
    nf4 = from_dict({"family": "csm", "device": "cuda", "dtype": "bfloat16", "quantization": "bnb-nf4"})
    assert "pip install bitsandbytes" in machine.check(nf4, weights_here=lambda s: True).sentence


def test_cuda_graphs_need_csm_on_cuda_and_a_maskable_attention():
    assert "needs device: cuda" in refused({"family": "csm", "compile": "cuda-graphs"})
    assert "csm only" in refused({"family": "pocket_tts", "compile": "inductor+cuda-graphs"})
    msg = refused({"family": "csm", "device": "cuda", "dtype": "bfloat16", "attention": "sdpa-flash",
                   "compile": "cuda-graphs"})
    assert "flash kernels take no mask" in msg and "use attention: sdpa" in msg
    ok = from_dict({"family": "csm", "device": "cuda", "dtype": "bfloat16", "compile": "inductor+cuda-graphs"})
    assert ok.compile == "inductor+cuda-graphs"


def test_random_weights_for_a_family_without_config():
    assert "hibari has no 'random' config" in refused({"family": "hibari", "weights": "random"})


def test_torch_axes_do_not_apply_to_onnx_family():
    assert "attention: hibari runs on ONNX Runtime" in refused({"family": "hibari", "attention": "eager"})


def test_equal_specs_share_one_key():
    a = from_dict({"family": "csm", "name": "a", "weights": "tiny"})
    b = from_dict({"family": "csm", "name": "b", "description": "other label", "weights": "tiny",
                   "model": "sesame/csm-1b"})
    c = from_dict({"family": "csm", "weights": "tiny", "attention": "eager"})
    assert a.key == b.key and a.key != c.key
    assert VariantSpec(family="csm").model_id == "sesame/csm-1b"
    assert from_dict({"family": "csm", "chunk_growth": 2}).key == from_dict({"family": "csm", "chunk_growth": 2.0}).key


def test_streaming_whole_is_hibari_only():
    assert from_dict({"family": "hibari", "streaming": "whole"}).streaming == "whole"
    assert "streaming: whole is for hibari" in refused({"family": "csm", "streaming": "whole"})
    assert "streaming: 'all' is not one of per-sentence|whole" in refused({"family": "hibari", "streaming": "all"})


def test_leading_silence_trim_is_hibari_only_and_keep_is_the_default():
    assert VariantSpec(family="hibari").leading_silence == "keep"
    assert from_dict({"family": "hibari", "leading_silence": "trim"}).leading_silence == "trim"
    assert from_dict({"family": "hibari", "leading_silence": "trim"}).key != from_dict({"family": "hibari"}).key
    for family in ("csm", "pocket_tts"):
        assert ("leading_silence: trim is implemented for hibari only (it pads its start); remove the field"
                in refused({"family": family, "leading_silence": "trim"}))
    assert "leading_silence: 'cut' is not one of keep|trim" in refused({"family": "hibari", "leading_silence": "cut"})


@pytest.mark.parametrize("scheme,fix", [("int8-dynamic", "quantization: bnb-int8 on CUDA"),
                                        ("int8-torchao", "quantization: bnb-int8 (or bnb-nf4) on CUDA")])
def test_cpu_int8_on_cuda_is_refused_with_the_fix(scheme, fix):
    msg = refused({"family": "pocket_tts", "device": "cuda", "quantization": scheme})
    assert msg.startswith(f"presets/x.yaml: quantization: '{scheme}' runs on the CPU only")
    assert "use device: cpu, or " + fix in msg


def test_cpu_int8_needs_float32_pocket_tts_and_int8_dynamic_stays_eager():
    assert "use dtype: float32" in refused({"family": "pocket_tts", "dtype": "bfloat16",
                                            "quantization": "int8-dynamic"})
    assert "implemented for pocket_tts only" in refused({"family": "csm", "quantization": "int8-dynamic"})
    assert "use compile: off" in refused({"family": "pocket_tts", "quantization": "int8-dynamic",
                                          "compile": "inductor"})
    assert from_dict({"family": "pocket_tts", "quantization": "int8-torchao", "compile": "inductor"})



def test_decode_thread_is_pocket_tts_only():
    assert from_dict({"family": "pocket_tts", "decode": "thread"}).decode == "thread"
    assert "decode: thread is implemented for pocket_tts only" in refused({"family": "csm", "decode": "thread"})
    assert "decode: 'async' is not one of inline|thread" in refused({"family": "pocket_tts", "decode": "async"})

def test_torchao_missing_is_a_sentence_with_the_install(monkeypatch):
    monkeypatch.setattr(env, "has_package", lambda name: name != "torchao")
    refusal = machine.check(from_dict({"family": "pocket_tts", "weights": "tiny", "quantization": "int8-torchao"}))
    assert refusal.code == machine.NO_PACKAGE and refusal.package == "torchao"
    assert "pip install torchao" in refusal.sentence and "int8-dynamic" in refusal.sentence


def test_threads_is_a_count_or_auto_and_yaml_numbers_are_counts():
    assert from_dict({"family": "pocket_tts", "threads": 2}).key == from_dict({"family": "pocket_tts",
                                                                              "threads": "2"}).key
    assert from_dict({"family": "hibari", "threads": 1}).threads == "1"   # ONNX Runtime's threads
    for bad in ("0", "two", "-1"):
        assert f"threads: '{bad}' is not a thread count; use threads: 1, 2" in refused({"family": "pocket_tts",
                                                                                        "threads": bad})
    assert "threads: expected str, got bool" in refused({"family": "pocket_tts", "threads": True})
