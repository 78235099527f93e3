"""The How many tab: how many listeners one batching variant holds, as the CLI's --streams sweep
(lab.concurrency.sweep): a table row and the chart redrawn after each level."""
from __future__ import annotations

import html

import gradio as gr

from lab import concurrency, planning
from lab.measure import report
from lab.errors import LabError
from web.lab_app import LabApp
from web.tabs.common import WEIGHTS_SWITCH, chart, shown_chart, shown_table

SWEEP_TEXT = "Streaming speech should start at once and keep pace with the listener, even on a busy machine tonight."


class HowManyTab:
    def __init__(self, lab: LabApp, choices: list[str]):
        self.lab = lab
        with gr.Tab("How many", id="how-many"):
            batching = lab.catalog.batching(choices)
            gr.Markdown("How many listeners one variant holds: that many streams at once, each saying the text, and "
                        "each stream's TTFB (from the moment all were sent), steady RTF, stalls, and the audio "
                        "seconds made per second. " + ("" if batching else "**No batching preset runs here**: they "
                        "need a GPU (`csm-batched-inductor-cuda-graphs` is the fastest: 1024 streams in real time "
                        "on an H200, README How many)."))
            with gr.Row():
                preset = gr.Dropdown(batching, value=batching[0] if batching else None, label="batching preset",
                                     elem_id="m-preset")
                streams = gr.Textbox("1,4,16,64", label="streams at once", info="comma list, e.g. 1,16,256",
                                     elem_id="m-streams")
                seconds = gr.Number(6.4, label="audio per stream (s)", elem_id="m-seconds")
                random_weights = gr.Checkbox(lab.default_random, label=WEIGHTS_SWITCH)
            text = gr.Textbox(SWEEP_TEXT, label="text each stream says", elem_id="m-text")
            go = gr.Button("Sweep", variant="primary", interactive=bool(batching), elem_id="m-go")
            status = gr.Markdown(elem_id="m-status")
            self.chart = chart("Goodput and per-stream figures", "m-chart")
            table = gr.Dataframe(interactive=False, elem_id="m-table", visible=False)   # shown with the first level
        go.click(self.how_many, [preset, streams, seconds, text, random_weights], [status, table, self.chart],
                 concurrency_limit=1, api_name="how_many")

    def how_many(self, preset, streams, seconds, text, random_weights):
        """A concurrency sweep of one preset, planned as the CLI's --streams: each level's row and the chart, as
        each level ends."""
        try:
            chosen = planning.plan(self.lab.catalog, [preset] if preset else [], text, 0, seconds, 1,
                                   weights=self.lab.weights(random_weights), streams=streams)
        except LabError as e:
            yield f"⚠️ {html.escape(str(e))}", None, None
            return
        spec, request, levels = chosen.specs[0], chosen.request, list(chosen.levels)
        yield f"building {html.escape(spec.name)} (once; later sweeps reuse it)…", None, None
        engine = self.lab.manager.get(spec)
        done = []
        for level in concurrency.sweep(engine, spec, request, levels):
            done.append(level)
            figure = report.sweep_chart(done, f"{spec.name}, {request.max_audio_s:g} s per stream")
            yield (f"{len(done)} of {len(levels)} levels", shown_table(report.sweep_table(done)),
                   shown_chart(self.chart, figure))
