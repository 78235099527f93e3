"""Speech Latency Lab, the web page: `python app.py` serves it on http://127.0.0.1:7860.

Compare: pick presets, hear each one stream into its own player, read TTFB/RTF side by side. Blind A/B: two
presets, same text and seed, vote, then see the names. How many: listeners one variant holds. History: every run
this server made. This file assembles the tabs (web/tabs/) over the server's objects (web.lab_app); the plan is
lab.planning's, the run loop lab.session's (the CLI's too), the figures lab.report's.
"""
from __future__ import annotations

import html
import os
import threading

import gradio as gr

from lab.request import MAX_USER_AUDIO_BYTES
from web import gradio_adapter, server
from web.lab_app import LabApp
from web.tabs.ab import AbTab
from web.tabs.compare import CompareTab
from web.tabs.history import HistoryTab
from web.tabs.how_many import HowManyTab

# A chart's label on its own line: Gradio floats it over the image's top left, where it covered the chart's title.
CHART_CSS = '.chart label[data-testid="block-label"].float { position: static; margin: var(--block-label-margin); }'

LAB = LabApp.from_env()

with gr.Blocks(title="Speech Latency Lab") as demo:
    LAB.demo = demo
    gr.Markdown("# Speech Latency Lab\nHear streaming voice models and compare their time-to-first-byte (TTFB) and "
                "real-time factor (RTF), measured the same way every time. **Random weights give real latency but "
                "noise for audio**; hibari is real speech.")
    gr.Markdown("\n\n".join(f"⚠️ {html.escape(str(p))}" for p in (LAB.history.problem, LAB.votes.problem) if p),
                elem_id="bookkeeping-banner")
    # The page's id for its PCM socket; a click's Gradio event carries "listener:comparison id:socket" in it.
    listener = gr.Textbox(visible=False, elem_id="listener-id")
    compare = CompareTab(LAB, listener)
    AbTab(LAB, listener)
    HowManyTab(LAB, [n for f in LAB.family_order for n in compare.preset_choices(f)])
    HistoryTab(LAB)
    demo.unload(LAB.on_unload)
# Sessions whose page state Gradio keeps in memory, the oldest dropped first (its default is 10000).
gradio_adapter.set_session_capacity(demo, int(os.environ.get("LAB_MAX_SESSIONS", "256")))


if __name__ == "__main__":
    if os.environ.get("LAB_PREWARM", "1") != "0":
        threading.Thread(target=LAB.prewarm, daemon=True, name="prewarm").start()
    # Gradio's own queue is bounded too (events other than compare and A/B, which wait in the model's line).
    server.serve(demo.queue(default_concurrency_limit=4, max_size=4 * LAB.max_waiting),
                 host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                 port=int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860), hub=LAB.hub, api=LAB.speech,
                 # Refuse big uploads before they are decoded; lab.request.validate_user_audio caps length and size.
                 max_file_size=f"{MAX_USER_AUDIO_BYTES // 2**20}mb", css=CHART_CSS)
