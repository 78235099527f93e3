import numpy as np
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


def test_user_audio_is_checked_and_normalised():
    from lab.request import MAX_USER_AUDIO_S, validate_user_audio

    stereo_pcm = (np.ones((1600, 2)) * 16384).astype(np.int16)
    mono = validate_user_audio(stereo_pcm, 16000)
    assert mono.shape == (1600,) and mono.dtype == np.float32 and abs(mono[0] - 0.5) < 1e-3
    for bad, sr, words in [(np.zeros(0, np.float32), 16000, "empty"),
                           (np.full(100, np.nan, np.float32), 16000, "NaN"),
                           (np.zeros(int(16000 * (MAX_USER_AUDIO_S + 1)), np.float32), 16000, "limit"),
                           (np.zeros(100, np.float32), 12, "sample rate"),
                           (np.array(["a", "b"]), 16000, "not audio")]:
        with pytest.raises(LabError, match=words) as e:
            validate_user_audio(bad, sr)
        assert e.value.where == "user_audio"
    with pytest.raises(LabError, match="user_audio"):
        validate_request(Request("Hello.", user_audio=np.zeros(0, np.float32)))
