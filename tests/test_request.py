import pytest

from lab.errors import LabError
from lab.request import ContextTurn, Request, validate_request, validate_text


@pytest.mark.parametrize("text,expect", [
    ("", "is empty"), ("   \n ", "is empty"),
    ("x" * 1001, "1001 characters, over the limit of 1000"),
    ("Hello 👋 there", "U+1F44B"),
    ("こんにちは", "outside Latin script"),
    ("Привет", "outside Latin script"),
])
def test_bad_text_is_refused_with_field_and_fix(text, expect):
    with pytest.raises(LabError) as e:
        validate_text(text)
    assert e.value.where == "text" and expect in e.value.message


def test_latin_text_with_accents_and_punctuation_passes():
    assert validate_text("  Café, naïve — “quoted” déjà vu! $9.99  ") == "Café, naïve — “quoted” déjà vu! $9.99"


def test_limit_is_configurable():
    with pytest.raises(LabError, match="over the limit of 10"):
        validate_text("hello world!", max_chars=10)


def test_bad_context_audio_names_the_turn():
    import numpy as np

    req = Request("Hi.", context=(ContextTurn("Earlier.", audio=np.array([np.nan, 0.0], np.float32)),))
    with pytest.raises(LabError) as e:
        validate_request(req)
    assert e.value.where == "context[0].audio"
