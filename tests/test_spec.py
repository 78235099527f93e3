import pytest

from lab import env
from lab.errors import LabError, MissingPackageError
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


def test_cuda_without_gpu_is_refused(monkeypatch):
    monkeypatch.setattr(env, "cuda_available", lambda: False)
    assert "no GPU is visible" in refused({"family": "csm", "device": "cuda", "dtype": "bfloat16"})


def test_bnb_on_cpu_is_refused():
    assert "needs a CUDA GPU" in refused({"family": "csm", "quantization": "bnb-nf4"})


def test_bnb_int8_with_cuda_graphs_is_refused(monkeypatch):
    monkeypatch.setattr(env, "cuda_available", lambda: True)
    monkeypatch.setattr(env, "has_package", lambda name: True)
    msg = refused({"family": "csm", "device": "cuda", "dtype": "bfloat16", "quantization": "bnb-int8",
                   "compile": "cuda-graphs"})
    assert "bnb-int8 cannot run inside a CUDA graph" in msg


def test_missing_optional_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(env, "cuda_available", lambda: True)
    monkeypatch.setattr(env, "has_package", lambda name: name != "flash_attn")
    with pytest.raises(MissingPackageError) as e:
        from_dict({"family": "csm", "device": "cuda", "dtype": "bfloat16", "attention": "flash_attention_2"})
    assert "flash-attn is not installed" in str(e.value) and "pip install flash-attn" in str(e.value)
    monkeypatch.setattr(env, "has_package", lambda name: name != "bitsandbytes")
    with pytest.raises(MissingPackageError, match="pip install bitsandbytes"):
        from_dict({"family": "csm", "device": "cuda", "dtype": "bfloat16", "quantization": "bnb-nf4"})


def test_cuda_graphs_need_csm_on_cuda_and_a_maskable_attention(monkeypatch):
    assert "needs device: cuda" in refused({"family": "csm", "compile": "cuda-graphs"})
    assert "csm only" in refused({"family": "pocket_tts", "compile": "inductor+cuda-graphs"})
    monkeypatch.setattr(env, "cuda_available", lambda: True)
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
