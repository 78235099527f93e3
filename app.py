"""Speech Latency Lab, the web page: `python app.py` serves it on http://127.0.0.1:7860.

This is the first, minimal page: pick one preset, type a sentence, hear it stream and read its figures.
The full side-by-side compare, history and blind A/B come with the app issue. All model logic lives in lab/.
"""
import os
import queue
import threading

import gradio as gr
import numpy as np

from lab import presets
from lab.bench import run_once
from lab.engines import AudioChunk
from lab.errors import LabError
from lab.manager import ModelManager
from lab.report import WEIGHTS_NOTE
from lab.request import Request, validate_request

# Variants stay built between clicks, up to this much memory; then the least recently used is freed.
MANAGER = ModelManager(memory_budget_bytes=int(float(os.environ.get("LAB_MEMORY_BUDGET_GB", "16")) * 2**30))
GPU_LOCK = threading.Lock()   # one request on the model at a time; Gradio's queue shows the others their place
SPECS, UNAVAILABLE = presets.load_all()


SERVED: set[str] = set()   # variants that have run once: their first request is the cold one


def _produce(engine, spec, request, out: queue.Queue, cancel: threading.Event):
    """The same run as the CLI's (lab.bench.run_once), apart from Gradio, so the page's encoding of each
    chunk is not in the figures. Chunks, then the run's record, go to the page through `out`."""
    try:
        record, _ = run_once(engine, spec, request, cold=spec.key not in SERVED, run=0, cancel=cancel,
                             on_chunk=lambda chunk, timeline: out.put(chunk))
        SERVED.add(spec.key)
        out.put(record)
    except Exception as e:  # handed to the page as one message
        out.put(e)


def synthesize(preset: str, text: str, seed, max_seconds: float, random_weights: bool,
               progress=gr.Progress()):
    """Stream one preset's audio into the player as it is generated, then show its figures."""
    try:
        if seed is None:
            raise LabError("seed", "is empty; type a whole number, e.g. 0")
        request = validate_request(Request(text, seed=int(seed), max_audio_s=float(max_seconds)))
        spec = presets.load(preset, weights="random" if random_weights else None)
    except LabError as e:
        raise gr.Error(str(e)) from None
    with GPU_LOCK:
        try:
            engine = MANAGER.get(spec, lambda stage, s: progress(0, desc=f"{preset}: {stage} {s:.0f} s"))
        except LabError as e:
            raise gr.Error(str(e)) from None
        items, cancel = queue.Queue(), threading.Event()
        worker = threading.Thread(target=_produce, args=(engine, spec, request, items, cancel), daemon=True)
        worker.start()
        try:
            while isinstance(item := items.get(), AudioChunk):
                yield (item.sample_rate, (np.clip(item.samples, -1, 1) * 32767).astype(np.int16)), "streaming…"
        finally:
            cancel.set()       # the page went away or failed: stop generating
            worker.join()
    if isinstance(item, Exception):
        raise gr.Error(str(item) if isinstance(item, LabError) else f"{preset}: {type(item).__name__}: {item}")
    note = f"\n\n**{WEIGHTS_NOTE[spec.weights]}**" if spec.weights in WEIGHTS_NOTE else ""
    yield gr.skip(), (f"**{preset}** · TTFB **{item['ttfb_ms']:.0f} ms** · RTF **{item['rtf']:.3g}** · "
                      f"{item['audio_s']:.2f} s of audio in {item['chunks']} chunks · underruns {item['underruns']}"
                      f" · build {engine.report.load_s:.1f} s load + {engine.report.warmup_s:.1f} s warm-up{note}")


with gr.Blocks(title="Speech Latency Lab") as demo:
    by_reason: dict[str, list[str]] = {}
    for name, why in UNAVAILABLE.items():
        by_reason.setdefault(why, []).append(f"`{name}`")
    gr.Markdown("# Speech Latency Lab\nHear a streaming voice model and see its time-to-first-byte and "
                "real-time factor.\n\n" + "\n".join(f"- Unavailable here: {', '.join(names)}. *{why}*"
                                                       for why, names in by_reason.items()))
    with gr.Row():
        preset = gr.Dropdown(sorted(SPECS), value="hibari", label="Preset")
        random_weights = gr.Checkbox(False, label="random weights (latency only: the audio is noise)")
    text = gr.Textbox("The quick brown fox jumps over the lazy dog.", label="Text", lines=2)
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0)
        max_seconds = gr.Slider(1, 30, value=8, step=1, label="Cap on audio length (s)")
    go = gr.Button("Synthesize", variant="primary")
    audio = gr.Audio(label="Audio, streamed as it is generated", streaming=True, autoplay=True)
    result = gr.Markdown()
    go.click(synthesize, [preset, text, seed, max_seconds, random_weights], [audio, result])

if __name__ == "__main__":
    port = int(os.environ.get("GRADIO_SERVER_PORT", os.environ.get("PORT", 7860)))
    demo.queue().launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"), server_port=port)
