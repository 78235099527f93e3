"""Library logic behind the app: preset availability and first-click defaults, A/B votes and their interval,
history filtering, and the comparison's input checks."""
import random

import numpy as np
import pytest

from lab import ab, availability, env, machine, presets
from lab.errors import LabError
from lab.measure import history, report
from lab.measure.metrics import Timeline
from lab.request import validate_inputs
from lab.session import cancelled_record
from lab.spec import VariantSpec

PRESETS = {"hibari": "family: hibari\n", "hibari-whole": "family: hibari\nstreaming: whole\n",
           "pocket-tts-cpu": "family: pocket_tts\n", "csm-cpu": "family: csm\n",
           "csm-sdpa": "family: csm\ndevice: cuda\ndtype: bfloat16\n",
           "csm-sdpa-inductor": "family: csm\ndevice: cuda\ndtype: bfloat16\ncompile: inductor\n",
           "csm-bnb-nf4": "family: csm\ndevice: cuda\ndtype: bfloat16\nquantization: bnb-nf4\n",
           "csm-typo": "family: csm\ncompile: cuda-graph\n"}


@pytest.fixture
def folder(tmp_path):
    for name, text in PRESETS.items():
        (tmp_path / f"{name}.yaml").write_text(text)
    return str(tmp_path)


def test_unavailable_presets_fold_by_reason_and_the_door_says_why(folder):
    catalog = availability.Catalog(folder, weights_here=lambda s: False)     # no GPU here, no hub
    folded = catalog.unavailable_by_reason(False)
    assert sorted(folded["need a GPU"]) == ["csm-bnb-nf4", "csm-sdpa", "csm-sdpa-inductor"]
    assert sorted(folded["need weights that are not cached (the hub is unreachable)"]) == ["csm-cpu",
                                                                                          "pocket-tts-cpu"]
    assert folded["invalid preset file"] == ["csm-typo"]
    with pytest.raises(LabError) as e:
        catalog.runnable_spec("pocket-tts-cpu", random_weights=False)
    assert e.value.where == "preset 'pocket-tts-cpu'" and "switch on random weights" in e.value.message
    assert "huggingface-cli download eustlb/pocket-tts" in e.value.message
    assert catalog.runnable_spec("hibari", random_weights=False).family == "hibari"   # weights in the wheel


def test_random_weights_or_cached_weights_make_pretrained_presets_runnable(folder):
    catalog = availability.Catalog(folder, weights_here=lambda s: False)
    assert {n: s.weights for n, s in catalog.statuses[True].items() if s.available} == {
        "hibari": "pretrained", "hibari-whole": "pretrained", "pocket-tts-cpu": "random", "csm-cpu": "random"}
    assert catalog.runnable_spec("csm-cpu", random_weights=True).weights == "random"
    cached = availability.Catalog(folder, weights_here=lambda s: True)
    assert {n for n, s in cached.statuses[False].items() if s.available} == {"hibari", "hibari-whole",
                                                                             "pocket-tts-cpu", "csm-cpu"}


def test_a_missing_package_is_its_own_reason(folder, monkeypatch):
    monkeypatch.setattr(env, "cuda_available", lambda: True)
    monkeypatch.setattr(env, "has_package", lambda name: name != "bitsandbytes")
    catalog = availability.Catalog(folder, weights_here=lambda s: True)
    assert catalog.statuses[False]["csm-bnb-nf4"].refusal.code == machine.NO_PACKAGE
    assert catalog.unavailable_by_reason(False)["need bitsandbytes (not installed)"] == ["csm-bnb-nf4"]


def test_refused_presets_are_grouped_with_their_model():
    catalog = availability.Catalog(presets.PRESETS_DIR, weights_here=lambda s: False)
    groups = catalog.grouped(True)
    assert list(groups)[:3] == ["csm", "pocket_tts", "hibari"]
    assert {s.name for s in groups["csm"]} == {n for n in presets.available() if n.startswith("csm")}


def test_first_click_is_two_real_voices_on_a_cpu_and_csm_on_a_gpu(folder, monkeypatch):
    catalog = availability.Catalog(folder, weights_here=lambda s: False)
    assert catalog.default_selection(cuda=False) == (["hibari", "hibari-whole"], False)
    monkeypatch.setattr(env, "cuda_available", lambda: True)
    gpu = availability.Catalog(folder, weights_here=lambda s: False)
    assert gpu.default_selection(cuda=True) == (["csm-sdpa", "csm-sdpa-inductor"], True)


def test_option_requirements_name_what_each_option_needs():
    rows = {(r["axis"], r["option"]): r for r in availability.option_requirements()}
    assert "flash-attn" in rows[("attention", "flash_attention_2")]["needs"]
    assert "bitsandbytes" in rows[("quantization", "bnb-nf4")]["needs"]
    assert rows[("attention", "sdpa")]["here"] == "yes"
    # Every option the spec accepts has its row, so the panel cannot fall behind a new one.
    from lab.spec import CHOICES

    for axis in ("attention", "compile", "kernels", "quantization"):
        assert {o for a, o in rows if a == axis} == set(CHOICES[axis]), axis


def test_blind_order_is_random_and_refuses_a_pair_of_one():
    seen = {ab.blind_order("x", "y", random.Random(seed)) for seed in range(20)}
    assert seen == {("x", "y"), ("y", "x")}
    with pytest.raises(LabError, match="pick two different presets"):
        ab.blind_order("x", "x")


def test_wilson_interval_matches_the_textbook_values():
    # Reference values: scipy.stats.binomtest(k, n).proportion_ci(method="wilson").
    assert ab.wilson_interval(8, 10) == pytest.approx((0.4901624715, 0.9433178486), abs=1e-9)
    assert ab.wilson_interval(0, 5) == pytest.approx((0.0, 0.4344824648), abs=1e-9)
    assert ab.wilson_interval(50, 100) == pytest.approx((0.4038315304, 0.5961684696), abs=1e-9)


def test_prebuffered_pairs_are_loudness_matched_without_clipping():
    quiet = (0.01 * np.sin(np.linspace(0, 200, 24000))).astype(np.float32)
    loud = (0.9 * np.sin(np.linspace(0, 300, 24000))).astype(np.float32)
    rms = [float(np.sqrt(np.mean(ab.loudness_matched(x) ** 2))) for x in (quiet, loud)]
    assert rms[0] == pytest.approx(rms[1], rel=1e-3) == pytest.approx(10 ** (ab.TARGET_RMS_DBFS / 20), rel=1e-3)
    spiky = np.zeros(24000, np.float32)
    spiky[100] = 1.0
    assert np.max(np.abs(ab.loudness_matched(spiky))) <= 0.99


def test_votes_persist_and_tally_per_pair_whichever_side_played_as_a(tmp_path):
    path = str(tmp_path / "votes.jsonl")
    for _ in range(9):
        ab.record_vote(path, "hibari", "pocket", "A")      # hibari as A, preferred
    for _ in range(3):
        ab.record_vote(path, "pocket", "hibari", "B")      # hibari as B, preferred
    ab.record_vote(path, "pocket", "hibari", "same")
    ab.record_vote(path, "csm", "hibari", "A")
    rows = {(r["first"], r["second"]): r for r in ab.tally(history.read(path))}
    row = rows[("hibari", "pocket")]
    assert (row["first_wins"], row["second_wins"], row["same"], row["votes"]) == (12, 0, 1, 13)
    assert row["ci95_lo"] > 0.5 and row["verdict"] == "hibari preferred"
    assert rows[("csm", "hibari")]["verdict"].startswith("no clear preference")
    with pytest.raises(LabError, match="vote"):
        ab.record_vote(path, "a", "b", "C")
    with pytest.raises(LabError, match="listening mode"):
        ab.record_vote(path, "a", "b", "A", mode="loud")


def test_history_filters_by_preset_weights_kind_and_text():
    recs = [{"preset": "a", "weights": "random", "cold": True, "text": "Hello there"},
            {"preset": "a", "weights": "random", "cold": False, "text": "Hello there", "source": "app"},
            {"preset": "b", "weights": "pretrained", "cold": False, "text": "Other words"},
            {"preset": "b", "weights": "pretrained", "cold": False, "cancelled": True, "text": "Other"},
            {"choice": "A"}]   # not a run
    assert len(history.filter_runs(recs)) == 4
    assert [r["cold"] for r in history.filter_runs(recs, presets=["a"])] == [True, False]
    assert len(history.filter_runs(recs, kind="warm")) == 2
    assert len(history.filter_runs(recs, kind="cancelled")) == 1
    assert len(history.filter_runs(recs, weights=["pretrained"], text_contains="other")) == 2
    assert len(history.filter_runs(recs, source="app")) == 1


@pytest.mark.parametrize("args,field,expect", [
    (("", 0, 5, 2), "text", "is empty"),
    (("Hi السلام", 0, 5, 2), "text", "outside Latin script"),
    (("x" * 1001, 0, 5, 2), "text", "over the limit"),
    (("Hi.", -1, 5, 2), "seed", "out of range; use 0 to 4294967295"),
    (("Hi.", None, 5, 2), "seed", "is empty"),
    (("Hi.", 1.5, 5, 2), "seed", "not a whole number"),
    (("Hi.", 0, 0, 2), "max_audio_s", "out of range"),
    (("Hi.", 0, 500, 2), "max_audio_s", "out of range"),
    (("Hi.", 0, 5, 0), "runs per preset", "out of range; use 1 to 20"),
    (("Hi.", 0, 5, 99), "runs per preset", "out of range"),
])
def test_compare_inputs_are_refused_with_field_and_fix(args, field, expect):
    with pytest.raises(LabError) as e:
        validate_inputs(*args)
    assert e.value.where == field and expect in e.value.message


def test_compare_inputs_give_one_shared_request():
    request, runs = validate_inputs("  Hello there. ", 7.0, "3.5", 2)
    assert (request.text, request.seed, request.max_audio_s, runs) == ("Hello there.", 7, 3.5, 2)


def test_a_cancelled_run_records_its_frames_against_the_cancel_time():
    tl = Timeline()
    t0 = tl.mark("request")
    tl.frames.extend([t0 + 0.1, t0 + 0.2])
    tl.chunks.append((t0 + 0.2, 0.16))
    rec = cancelled_record(VariantSpec(family="csm", name="x", weights="tiny"), validate_inputs("Hi.", 0, 5, 1)[0],
                           tl, t0 + 0.25, run=0, cold=True)
    assert rec["cancelled"] and rec["frame_s"] == pytest.approx([0.1, 0.2]) and rec["cancel_s"] == pytest.approx(0.25)
    assert rec["audio_s"] == pytest.approx(0.16)


def test_a_preset_with_only_its_cold_run_gets_a_result_line_not_a_crash():
    cold = {"preset": "p", "weights": "random", "cold": True, "ttfb_ms": 120.0, "rtf": 0.5, "steady_rtf": 0.4,
            "underruns": 0, "stall_s": 0.0, "audio_s": 1.0, "phases_ms": {}, "peak_mem_bytes": 0}
    line = report.result_line(report.summary_rows([cold])[0])
    assert line == "cold run only · cold TTFB 120.0 ms"
    warm = dict(cold, cold=False, ttfb_ms=80.0)
    assert "warm median TTFB **80.0** ms" in report.result_line(report.summary_rows([cold, warm])[0])
