"""One planning layer (lab.planning): the page's forms and the command line refuse the same bad input with the same
words (the same field and message; the CLI names the field by its flag), and note the same things."""
import html
import os
import subprocess
import sys
import wave

import gradio as gr
import numpy as np
import pytest

from lab import availability, cli, env, machine, planning, presets
from lab.measure import history
from lab.errors import LabError
from lab.manager import ModelManager
from lab.serving.line import ModelLine
from lab.spec import VariantSpec
from web.lab_app import LabApp
from web.pcm import PcmHub
from web.tabs.ab import AbTab
from web.tabs.compare import CompareTab, refused
from web.tabs.how_many import HowManyTab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXT = "Two short words."


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page's tabs over the CLI's presets folder, as app.py builds them (no server: their planning paths)."""
    tmp = tmp_path_factory.mktemp("page")
    lab = LabApp(presets.PRESETS_DIR, history.Journal(str(tmp / "h.jsonl")), history.Journal(str(tmp / "v.jsonl")),
                 1.0, 4, ModelManager(2**30), ModelLine(4), availability.Catalog(presets.PRESETS_DIR), PcmHub())
    with gr.Blocks() as demo:
        lab.demo = demo
        listener = gr.Textbox(visible=False)
        tabs = {"compare": CompareTab(lab, listener), "ab": AbTab(lab, listener), "how_many": HowManyTab(lab, [])}
    return tabs


@pytest.fixture(scope="module")
def not_audio(tmp_path_factory):
    path = tmp_path_factory.mktemp("turn") / "notes.wav"
    path.write_text("these are words, not samples")
    return str(path)


@pytest.fixture(scope="module")
def spoken_turn(tmp_path_factory):
    path = tmp_path_factory.mktemp("turn") / "turn.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) / 8) * 8000).astype("<i2").tobytes())
    return str(path)


def form(page, presets_ticked=("hibari",), **values) -> dict:
    """The Compare form's values by name, as the page sends them: every ticked name in the first family's group."""
    tab = page["compare"]
    inputs = {"order": "\n".join(presets_ticked), "text": TEXT, "seed": 0, "max_audio_s": 2, "runs": 1,
              "random_weights": False, "user_audio": None, "transport": "pcm",
              **{name: [] for name in tab.input_names if name.startswith("presets ")}, **values}
    inputs[next(n for n in tab.input_names if n.startswith("presets "))] = list(presets_ticked)
    return inputs


def cli_argv(tmp_path, *args) -> list[str]:
    """The CLI's flags for the form's defaults, then `args` (argparse keeps a flag's last value)."""
    return ["--text", TEXT, "--max-seconds", "2", "--runs", "1", "--out", str(tmp_path), *args]


def refusal(plan, *args, **kwargs) -> LabError:
    with pytest.raises(LabError) as e:
        plan(*args, **kwargs)
    return e.value


def needs_weights_here() -> bool:
    return machine.weights_cached(presets.load("csm-cpu"))


# (the page's form, changed; the CLI's flags, added; what the words say)
BAD = {
    "empty text": ({"text": "  "}, ["--presets", "hibari", "--text", "  "], "is empty"),
    "another script": ({"text": "مرحبا"}, ["--presets", "hibari", "--text", "مرحبا"], "outside Latin script"),
    "nothing to speak": ({"text": "<b>🎉</b>"}, ["--presets", "hibari", "--text", "<b>🎉</b>"], "nothing to speak"),
    "a fractional seed": ({"seed": "1.5"}, ["--presets", "hibari", "--seed", "1.5"], "not a whole number"),
    "a negative seed": ({"seed": -1}, ["--presets", "hibari", "--seed", "-1"], "out of range"),
    "no warm runs": ({"runs": 0}, ["--presets", "hibari", "--runs", "0"], "out of range"),
    "a cap that is not a number": ({"max_audio_s": "abc"}, ["--presets", "hibari", "--max-seconds", "abc"],
                                   "not a number of seconds"),
    "a misspelt preset": ({"presets_ticked": ("hibary",)}, ["--presets", "hibary"], "did you mean hibari"),
    "a preset twice": ({"presets_ticked": ("hibari", "hibari")}, ["--presets", "hibari", "hibari"], "twice"),
    "no preset": ({"presets_ticked": ()}, [], "none chosen"),
    "a GPU preset here": ({"presets_ticked": ("csm-sdpa",), "random_weights": True},
                          ["--presets", "csm-sdpa", "--weights", "random"], "no GPU is visible"),
    "pretrained weights not here": ({"presets_ticked": ("csm-cpu",)}, ["--presets", "csm-cpu"],
                                    "not in the Hugging Face cache"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_the_page_and_the_cli_refuse_the_same_input_with_the_same_words(case, page, tmp_path):
    if case == "a GPU preset here" and env.cuda_available():
        pytest.skip("this machine has a GPU: csm-sdpa runs here")
    if case == "pretrained weights not here" and needs_weights_here():
        pytest.skip("csm-cpu's weights are cached here")
    changes, flags, words = BAD[case]
    changes = dict(changes)
    ticked = changes.pop("presets_ticked", ("hibari",))
    on_page = refusal(page["compare"].plan, form(page, ticked, **changes))
    on_cli = refusal(cli.plan, cli.parse_args(cli_argv(tmp_path, *flags)))
    assert (on_page.where, on_page.message) == (on_cli.where, on_cli.message)
    assert words in on_page.message


def test_a_file_that_is_not_audio_is_refused_alike_whoever_would_hear_it(page, tmp_path, not_audio):
    on_page = refusal(page["compare"].plan, form(page, user_audio=not_audio))
    on_cli = refusal(cli.plan, cli.parse_args(cli_argv(tmp_path, "--presets", "hibari", "--user-audio", not_audio)))
    assert (on_page.where, on_page.message) == (on_cli.where, on_cli.message) == ("user_audio",
                                                                                  "not audio: notes.wav (expected "
                                                                                  "WAV/FLAC/MP3/OGG)")


def test_the_cli_says_the_pages_words_at_its_flag_and_the_page_at_its_field(page, tmp_path, capsys):
    e = refusal(page["compare"].plan, form(page, seed="1.5"))
    assert cli.main(cli_argv(tmp_path, "--presets", "hibari", "--seed", "1.5")) == 2
    assert capsys.readouterr().err.strip() == f"error: --seed: {e.message}"
    shown = refused(e)
    assert html.unescape(shown["numbers_error"]) == f"⚠️ seed: {e.message}" and shown["text_error"] == ""


def test_a_spoken_turn_for_text_only_presets_is_noted_not_refused_on_the_page_and_the_cli(page, tmp_path,
                                                                                          spoken_turn):
    """The settled disagreement: the page dropped it with a note, the CLI refused; now both note it."""
    on_page = page["compare"].plan(form(page, user_audio=spoken_turn))
    on_cli = cli.plan(cli.parse_args(cli_argv(tmp_path, "--presets", "hibari", "--user-audio", spoken_turn)))
    assert on_page.notes == on_cli.notes == (("user_audio", "not sent: none of these presets takes a spoken turn; "
                                                            "they say the text only"),)
    assert on_page.request.user_audio is None and on_cli.request.user_audio is None


def test_a_spoken_turn_goes_to_the_presets_that_take_one_and_names_the_others(spoken_turn):
    omni = VariantSpec(family="minicpm_o", name="omni", device="cuda", dtype="bfloat16")
    hibari = VariantSpec(family="hibari", name="hibari")
    request, notes = planning._with_turn(planning.Request(TEXT), spoken_turn, [omni, hibari])
    assert request.user_audio is not None and request.user_audio_sample_rate == 16000
    assert notes == ["ignored by hibari, which take text only"]


def test_a_blind_pair_and_the_cli_refuse_bad_text_alike(page, tmp_path):
    pair = {"first": "hibari", "second": "hibari-whole", "text": "مرحبا", "seed": 0, "random_weights": False}
    on_page = refusal(page["ab"].plan, pair)
    on_cli = refusal(cli.plan, cli.parse_args(cli_argv(tmp_path, "--presets", "hibari", "--text", "مرحبا")))
    assert (on_page.where, on_page.message) == (on_cli.where, on_cli.message)


def test_how_many_and_the_cli_sweep_refuse_bad_stream_counts_alike(page, tmp_path):
    status, _, _ = next(page["how_many"].how_many("hibari", "1,x", 1.0, TEXT, False))
    on_cli = refusal(cli.plan, cli.parse_args(cli_argv(tmp_path, "--presets", "hibari", "--streams", "1,x")))
    assert html.unescape(status) == f"⚠️ {on_cli.where}: {on_cli.message}" and on_cli.where == "streams"


def test_a_batching_preset_takes_at_most_its_slots_and_any_other_serves_streams_in_turn():
    catalog = availability.Catalog(os.path.join(ROOT, "tests", "presets"), weights_here=lambda s: True)
    slots = catalog.specs["csm-tiny-batched"].max_streams
    e = refusal(planning.plan, catalog, ["csm-tiny-batched"], TEXT, 0, 1, 1, streams=f"1,{slots + 1}")
    assert e.where == "streams" and f"this variant's {slots} slots" in e.message
    assert planning.plan(catalog, ["csm-tiny"], TEXT, 0, 1, 1, streams=f"1,{slots + 1}").levels == (1, slots + 1)


def test_the_page_takes_at_most_its_players_and_the_cli_any_number():
    catalog = availability.Catalog(presets.PRESETS_DIR)
    names = ["hibari", "hibari-whole", "hibari-trim"]
    e = refusal(planning.plan, catalog, names, TEXT, 0, 1, 1, most_presets=2)
    assert (e.where, e.message) == ("presets", "3 chosen; a comparison takes at most 2, drop some")
    assert [s.name for s in planning.plan(catalog, names, TEXT, 0, 1, 1).specs] == names


def test_planning_loads_no_torch():
    code = "import sys, lab.planning; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0, "lab.planning imported torch"
