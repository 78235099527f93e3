"""The History tab: every run this server made (and the CLI's, if they share the file), filtered, charted and
downloadable."""
from __future__ import annotations

import datetime
import html

import gradio as gr
import pandas as pd

from lab.measure import history, quality, report
from web.lab_app import LabApp
from web.tabs.common import chart, drawn


class HistoryTab:
    def __init__(self, lab: LabApp):
        self.lab = lab
        with gr.Tab("History", id="history") as tab:
            gr.Markdown("Every run this server has made (and the CLI's, if they share the file), newest first.")
            with gr.Row():
                picked = gr.CheckboxGroup(sorted(lab.catalog.statuses[False]), label="presets (none ticked = all)",
                                          elem_id="h-presets")
                weights = gr.CheckboxGroup(["pretrained", "random", "tiny"], label="weights (none = all)")
                kind = gr.Radio(["all", "cold", "warm", "cancelled"], value="all", label="runs")
                text = gr.Textbox(label="text contains")
            refresh = gr.Button("Refresh", elem_id="h-refresh")
            note = gr.Markdown()
            self.chart = chart("Filtered runs", "h-chart", visible=True)
            table = gr.Dataframe(interactive=False, elem_id="h-table")
            with gr.Row():
                files = [gr.DownloadButton("Download CSV", elem_id="h-csv"),
                         gr.DownloadButton("Download JSON", elem_id="h-json"),
                         gr.DownloadButton("Download chart PNG", elem_id="h-png")]
        inputs, outputs = [picked, weights, kind, text], [table, self.chart, picked, note, *files]
        refresh.click(self.history_view, inputs, outputs, api_name="history")
        tab.select(self.history_view, inputs, outputs, api_visibility="private")
        for control in (weights, kind):
            control.change(self.history_view, inputs, outputs, api_visibility="private")
        text.submit(self.history_view, inputs, outputs, api_visibility="private")

    def history_view(self, picked, weights, kind, text_contains):
        """The filtered history as a table, a chart, and CSV/JSON/PNG files to download."""
        journal = self.lab.history
        records = quality.merged(history.read(journal))
        names = sorted({*self.lab.catalog.statuses[False], *(r["preset"] for r in records if "preset" in r)})
        chosen = history.filter_runs(records, picked or None, weights or None, kind or "all", text_contains or "")
        exports = report.export_history(chosen, self.lab.history_export_dir, f"history: {len(chosen)} runs")
        kept = f"; ⚠️ {journal.problem}" if journal.problem else ""
        note = f"{len(chosen)} of {len(records)} records (file: `{journal.shown}`{html.escape(kept)})"
        newest_first = [{"when": datetime.datetime.fromtimestamp(r.get("time", 0)).strftime("%Y-%m-%d %H:%M:%S"),
                         "source": r.get("source", "cli"), **r} for r in reversed(chosen)]
        table = pd.DataFrame(report.run_table(newest_first, extra=("when", "source", "text")))
        return (table, drawn(self.chart, exports["figure"]),
                gr.update(choices=names, value=[n for n in (picked or []) if n in names]), note,
                exports["csv"], exports["json"], exports["png"])
