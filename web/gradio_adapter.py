"""Every place the server reaches into Gradio's private internals, in one module, pinned to requirements.txt's
gradio. `missing_internals()` says which of those names a new Gradio no longer has (tests/test_gradio_adapter.py
runs it); nothing else in the project reads or patches a private Gradio name.

What is used, and why:
- `Blocks.postprocess_data` (with `BlockFunction.outputs`/`.batch`, `Block._id`/`.stateful`): patched so that an
  update's skipped outputs are not rebuilt (`skip_without_rebuilding`).
- `Blocks._queue.active_jobs` and `queueing.Event.request`/`.alive`: whether a follower's client went away
  (`gone_check`), so generation stops at its next frame.
- `Blocks.pending_streams` and `route_utils.MediaStream.end_stream`: the HLS segments of a page's earlier runs
  (`forget_streams`).
- `Blocks.state_session_capacity`: launch()'s keyword, which a mounted app (no launch) sets on the Blocks.
"""
from __future__ import annotations

import copy
import inspect
from typing import Callable

BARE_SKIP = {"__type__": "update"}   # what gr.skip() returns, and what Gradio sends the page for one


def skip_without_rebuilding(demo) -> None:
    """Post-process only the outputs an update changes. Gradio 6.31 handles an output left out of an update (or
    given gr.skip()) as a property update: it builds a new copy of the component and re-derives its config, JSON
    schema included, for every such output of every update, and on the server's event loop, which every page's
    updates and the PCM socket wait on. The Compare handler has 55 outputs and changes one or two per update, so
    that work kept the loop busy and many pages' streams stalled (docs/RESULTS.md#the-page-and-the-servers-event-loop).
    The copy is identical to the component, so leaving it out changes nothing the page is sent (tests/test_pcm.py
    checks that against Gradio's own result)."""
    full = demo.postprocess_data

    async def postprocess_data(block_fn, predictions, state):
        outputs = list(block_fn.outputs)
        if isinstance(predictions, dict) and predictions and all(hasattr(k, "_id") for k in predictions):
            given = {k._id: v for k, v in predictions.items()}
            values = [given.get(b._id, BARE_SKIP) for b in outputs]
        elif isinstance(predictions, (list, tuple)) and len(predictions) == len(outputs):
            values = list(predictions)
        else:   # one output, gr.skip() for all, or a shape Gradio itself will judge
            return await full(block_fn, predictions, state)
        changed = [i for i, v in enumerate(values) if not (isinstance(v, dict) and v == BARE_SKIP)]
        if block_fn.batch or len(outputs) < 2 or len(changed) == len(outputs):
            return await full(block_fn, predictions, state)
        sent = {}
        if changed:
            part = copy.copy(block_fn)
            part.outputs = [outputs[i] for i in changed]
            # One output's value goes bare: Gradio wraps a single output's prediction in a list itself.
            part_values = [values[i] for i in changed] if len(changed) > 1 else values[changed[0]]
            sent = dict(zip(changed, await full(part, part_values, state)))
        return [sent[i] if i in sent else None if outputs[i].stateful else dict(BARE_SKIP) for i in range(len(outputs))]

    demo.postprocess_data = postprocess_data


def gone_check(demo, request) -> Callable[[], bool]:
    """A check the run loop calls per event: True once Gradio's queue has let go of this request's job (its client
    disconnected or cancelled it). Gradio closes the handler itself too, but only after the update in flight has
    been post-processed (an audio chunk through ffmpeg), which is slow under load: this way generation stops at its
    next frame (docs/RESULTS.md#the-page-and-the-servers-event-loop). Reads the queue's jobs
    (gradio.queueing.Event.alive); a request not found there is never gone."""
    found: list = []

    def gone() -> bool:
        if not found:
            queue = getattr(demo, "_queue", None)
            jobs = [e for events in (getattr(queue, "active_jobs", None) or []) if events for e in events]
            found.extend(e for e in jobs if getattr(request, "request", None) is not None
                         and getattr(e, "request", None) is request.request)
        return bool(found) and not found[0].alive

    return gone


def forget_streams(demo, session_hash: str | None) -> None:
    """Drop the streamed audio Gradio keeps for this page's earlier runs. Gradio keeps every run's HLS segments
    until the page's session ends, so a tab (or an API client, which has no heartbeat) that compares again and
    again would grow the server (docs/RESULTS.md#memory-over-time); a new compare resets the players, so the old
    ones go."""
    streams = getattr(demo, "pending_streams", None)
    if session_hash and streams is not None:
        for run in streams.pop(session_hash, {}).values():
            for stream in run.values():
                stream.end_stream()


def set_session_capacity(demo, sessions: int) -> None:
    """How many pages' state Gradio keeps in memory, the oldest dropped first (launch() would set it)."""
    demo.state_session_capacity = sessions


def missing_internals() -> list[str]:
    """The private names above that the installed Gradio lacks, one sentence each naming the name and the
    version; empty when every one is there. Builds a throwaway Blocks to look at instances."""
    import gradio as gr
    from gradio import queueing, route_utils

    with gr.Blocks() as demo:
        box = gr.Textbox()
        box.submit(lambda s: s, box, box)
    demo.queue()
    fn = next(iter(demo.fns.values()))
    event = queueing.Event(None, fn, None, None)
    postprocess = getattr(gr.Blocks, "postprocess_data", None)
    found = {
        "Blocks.postprocess_data(block_fn, predictions, state), async": postprocess is not None
        and inspect.iscoroutinefunction(postprocess)
        and list(inspect.signature(postprocess).parameters)[1:4] == ["block_fn", "predictions", "state"],
        "BlockFunction.outputs": isinstance(getattr(fn, "outputs", None), list),
        "BlockFunction.batch": hasattr(fn, "batch"),
        "Block._id": hasattr(box, "_id"),
        "Block.stateful": hasattr(box, "stateful"),
        "Blocks._queue.active_jobs": hasattr(getattr(demo, "_queue", None), "active_jobs"),
        "queueing.Event.request": hasattr(event, "request"),
        "queueing.Event.alive": hasattr(event, "alive"),
        "Blocks.pending_streams": isinstance(getattr(demo, "pending_streams", None), dict),
        "route_utils.MediaStream.end_stream": callable(getattr(getattr(route_utils, "MediaStream", None),
                                                               "end_stream", None)),
        "Blocks.state_session_capacity": hasattr(demo, "state_session_capacity"),
    }
    return [f"gradio {gr.__version__} has no {name}, which web/gradio_adapter.py relies on; pin the gradio in "
            f"requirements.txt back, or update the adapter" for name, ok in found.items() if not ok]
