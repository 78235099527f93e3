"""Checks every engine family's tests share."""
from __future__ import annotations

import threading

import pytest

from lab.errors import Cancelled
from lab.measure.metrics import Timeline


def assert_cancel_stops_at_the_next_frame(engine, request) -> None:
    """A cancel raised after the first chunk ends generation before another frame is made."""
    cancel, timeline = threading.Event(), Timeline()
    stream = engine.stream(request, timeline, cancel)
    next(stream)
    frames_at_cancel = len(timeline.frames)
    cancel.set()
    with pytest.raises(Cancelled):
        next(stream)
    assert len(timeline.frames) == frames_at_cancel
