"""Library logic behind the app: preset availability and first-click defaults, A/B votes and their interval,
history filtering, and the comparison's input checks."""
import random

import pytest

from lab import ab, availability, history, presets
from lab.compare import cancelled_record, figures_line, validate_inputs
from lab.errors import LabError
from lab.metrics import Timeline
from lab.spec import VariantSpec


def statuses(random_weights, cached=False, reachable=False, cuda_presets=False):
    specs = {"hibari": VariantSpec(family="hibari", name="hibari"),
             "pocket-tts-cpu": VariantSpec(family="pocket_tts", name="pocket-tts-cpu"),
             "csm-cpu": VariantSpec(family="csm", name="csm-cpu")}
    refused = {"csm-bnb-nf4": "device: cuda was asked for but no GPU is visible to torch; use device: cpu",
               "csm-fa2": "flash-attn is not installed: attention: flash_attention_2 needs it; install it with "
                          "`pip install flash-attn`",
               "csm-bnb-int8": "bitsandbytes is not installed: quantization: bnb-int8 needs it; install it with "
                               "`pip install bitsandbytes`"}
    if cuda_presets:
        specs["csm-sdpa"] = VariantSpec(family="csm", name="csm-sdpa")
        specs["csm-sdpa-inductor"] = VariantSpec(family="csm", name="csm-sdpa-inductor", compile="inductor")
    return availability.preset_statuses(specs, refused, random_weights, cached=lambda s: cached,
                                        reachable=lambda: reachable)


def test_each_unavailable_preset_says_why_in_a_few_words_and_the_fix_in_full():
    by_name = {s.name: s for s in statuses(random_weights=False)}
    assert by_name["hibari"].available                     # its weights ship in the wheel
    assert by_name["csm-bnb-nf4"].reason == availability.NO_GPU
    assert by_name["csm-fa2"].reason == availability.NO_FLASH_ATTN
    assert by_name["csm-bnb-int8"].reason == availability.NO_BNB
    pocket = by_name["pocket-tts-cpu"]
    assert not pocket.available and pocket.reason == availability.NO_WEIGHTS
    assert "switch on random weights" in pocket.detail and "huggingface-cli download eustlb/pocket-tts" in pocket.detail
    assert pocket.label == "pocket-tts-cpu (unavailable: weights not cached and the hub unreachable)"


def test_random_weights_or_a_cache_or_a_hub_make_pretrained_presets_runnable():
    assert {s.name: s.weights for s in statuses(True) if s.available} == {
        "hibari": "pretrained", "pocket-tts-cpu": "random", "csm-cpu": "random"}
    assert {s.name for s in statuses(False, cached=True) if s.available} == {"hibari", "pocket-tts-cpu", "csm-cpu"}
    assert {s.name for s in statuses(False, reachable=True) if s.available} == {"hibari", "pocket-tts-cpu", "csm-cpu"}


def test_refused_presets_are_grouped_with_their_model():
    specs, refused = presets.load_all()
    groups = availability.grouped(availability.preset_statuses(specs, refused, True, reachable=lambda: False))
    assert list(groups)[:3] == ["csm", "pocket_tts", "hibari"]
    assert {s.name for s in groups["csm"]} == {n for n in presets.available() if n.startswith("csm")}


def test_first_click_is_hibari_against_random_pocket_tts_on_a_cpu_and_csm_on_a_gpu():
    assert availability.default_selection(statuses(False), statuses(True), cuda=False) == (
        ["hibari", "pocket-tts-cpu"], True)
    # Weights cached: no need for the random switch.
    assert availability.default_selection(statuses(False, cached=True), statuses(True, cached=True), False) == (
        ["hibari", "pocket-tts-cpu"], False)
    gpu = availability.default_selection(statuses(False, cuda_presets=True), statuses(True, cuda_presets=True), True)
    assert gpu == (["csm-sdpa", "csm-sdpa-inductor"], True)


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
    (("Hi 🎉", 0, 5, 2), "text", "outside Latin script"),
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
    from lab import report

    cold = {"preset": "p", "weights": "random", "cold": True, "ttfb_ms": 120.0, "rtf": 0.5, "steady_rtf": 0.4,
            "underruns": 0, "stall_s": 0.0, "audio_s": 1.0, "phases_ms": {}, "peak_mem_bytes": 0}
    line = figures_line(report.summary_rows([cold])[0])
    assert line == "cold run only · cold TTFB 120 ms"
    warm = dict(cold, cold=False, ttfb_ms=80.0)
    assert "warm median TTFB **80 ms**" in figures_line(report.summary_rows([cold, warm])[0])
