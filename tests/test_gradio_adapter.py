"""web/gradio_adapter.py reaches into Gradio's private internals: each name it uses must be in the pinned gradio,
and a missing one is named with the version, so an upgrade fails here rather than on a page."""
import os
import re

import gradio as gr

from web import gradio_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_installed_gradio_is_the_pinned_one():
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pinned = re.search(r"^gradio==(\S+)", f.read(), re.M).group(1)
    assert gr.__version__ == pinned, (f"gradio {gr.__version__} is installed but requirements.txt pins {pinned}: "
                                      f"install the pin, or move the pin after this test passes with the new one")


def test_every_private_gradio_name_the_adapter_uses_exists():
    missing = gradio_adapter.missing_internals()
    assert not missing, "\n".join(missing)


def test_a_missing_internal_is_named_with_the_gradio_version(monkeypatch):
    monkeypatch.delattr(gr.Blocks, "postprocess_data")
    missing = gradio_adapter.missing_internals()
    assert missing[0].startswith(f"gradio {gr.__version__} has no Blocks.postprocess_data(block_fn, predictions, "
                                 f"state)") and "web/gradio_adapter.py" in missing[0]
    assert len(missing) == 1, missing   # the others are still there, and not reported
