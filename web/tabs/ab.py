"""The Blind A/B tab: two presets say the same text with the same seed, which plays as A is random, the names are
shown after the vote; the tally per pair with its interval."""
from __future__ import annotations

import html

import gradio as gr
import pandas as pd

from lab import ab, env, planning, session
from lab.measure import history, report
from lab.errors import LabError
from lab.serving.background import Background
from lab.audio import pcm16
from web import listen
from web.lab_app import EXAMPLES, LabApp, session_key
from web.tabs.common import WEIGHTS_SWITCH, click_js, remember

# The inputs of Play by name, in the order its Gradio event lists them after the listener (as Compare's).
AB_INPUTS = ("first", "second", "text", "seed", "random_weights", "mode")


class AbTab:
    def __init__(self, lab: LabApp, listener: gr.Textbox):
        self.lab, self.listener = lab, listener
        with gr.Tab("Blind A/B", id="ab"):
            inputs = self._form()
            self.go = gr.Button("Play a blind pair", variant="primary", elem_id="ab-play")
            self.msg = gr.Markdown(elem_id="ab-msg")
            with gr.Row():
                gr.HTML('<div id="pcm-slot-6" class="pcm-slot"></div>')
                gr.HTML('<div id="pcm-slot-7" class="pcm-slot"></div>')
            with gr.Row():
                self.players = [gr.Audio(label="A", interactive=False, elem_id="player-a"),
                                gr.Audio(label="B", interactive=False, elem_id="player-b")]
            with gr.Row():
                self.votes = [gr.Button("A sounds better", interactive=False, elem_id="vote-a"),
                              gr.Button("Same", interactive=False, elem_id="vote-same"),
                              gr.Button("B sounds better", interactive=False, elem_id="vote-b")]
            self.trial = gr.State(None)
            self.tally = gr.Dataframe(self.tally_table, label="Tally per pair: share of decided votes for the first "
                                      "preset, binomial 95% interval (Wilson)", interactive=False, elem_id="ab-tally")
        self._wire(inputs)
        lab.starts["ab"] = (self.start, AB_INPUTS)

    def _form(self) -> list:
        gr.Markdown("Two presets say the same text with the same seed. Which one plays as **A** is random; the names "
                    "are shown after you vote. *As it streams*: each side plays as it is generated, with its real "
                    "start delay, so latency is judged too. *Pre-buffered*: both are generated first and loudness "
                    "matched, so only the sound is judged.")
        runnable = [n for n, s in self.lab.catalog.statuses[True].items() if s.available]
        defaults = self.lab.default_presets
        with gr.Row():   # the default pair is the first click's: on a CPU, two real voices
            first = gr.Dropdown(runnable, value=(defaults + [None])[0], label="Preset 1", elem_id="ab-first")
            second = gr.Dropdown(runnable, value=(defaults + [None, None])[1], label="Preset 2", elem_id="ab-second")
            random_weights = gr.Checkbox(False, label=WEIGHTS_SWITCH)
        with gr.Row():
            text = gr.Textbox(EXAMPLES[1], label="Text", elem_id="ab-text")
            seed = gr.Number(0, label="Seed", precision=None)
            mode = gr.Radio([("as it streams", "streamed"), ("pre-buffered, loudness matched", "prebuffered")],
                            value="streamed", label="Listening mode", elem_id="ab-mode")
        return [first, second, text, seed, random_weights, mode]

    def _wire(self, inputs: list) -> None:
        a, same, b = self.votes
        played = self.go.click(self.play, [self.listener, *inputs], [*self.players, self.msg, self.trial, a, same, b],
                               js=click_js("ab", AB_INPUTS), concurrency_limit=None, api_name="ab_play",
                               show_progress_on=[self.msg])
        remember(self.lab.demo, "ab", AB_INPUTS, inputs, played)
        for button, choice in ((a, "A"), (b, "B"), (same, "same")):
            button.click(lambda t, c=choice: self.vote(c, t), [self.trial], [self.msg, self.trial, self.tally, a, same,
                                                                            b], api_name=f"vote_{choice.lower()}")

    def plan(self, inputs: dict) -> planning.Plan:
        """The form's values by name (AB_INPUTS) as lab.planning's plan of a blind pair, or its LabError."""
        return planning.plan_pair(self.lab.catalog, inputs.get("first"), inputs.get("second"), inputs.get("text"),
                                  inputs.get("seed"), weights=self.lab.weights(inputs.get("random_weights")))

    def start(self, comparison, inputs: dict) -> None:
        """A blind pair (in its planning thread): which plays as A is drawn by the plan, once; then as Compare's."""
        lab = self.lab
        mode = inputs.get("mode") if inputs.get("mode") in ab.MODES else "streamed"
        chosen = self.plan(inputs)
        specs, req = list(chosen.specs), chosen.request
        place = lab.line.turn(lab.history.estimate_s([s.name for s in specs], 1), comparison.cancel)
        events = session.run_presets(lab.manager, specs, req, 1, comparison.cancel, lab.history, "ab", place)
        trial = {"a": specs[0].name, "b": specs[1].name, "text": req.text, "seed": req.seed, "mode": mode,
                 "weights": {s.name: s.weights for s in specs}}
        comparison.plan = (specs, req, trial)
        comparison.run = Background(events, listen.ab_hook(lab.hub, comparison.listener, mode, comparison),
                                    comparison.cancel)

    def play(self, listener, first, second, text, seed, random_weights, mode, request: gr.Request):
        """Both presets say the same text with the same seed; which plays as A is random; the names stay on the
        server (gr.State) until the vote. `mode`: "streamed" (each side at its real start delay) or "prebuffered"."""
        hidden, key, lab = gr.update(interactive=False), session_key(request), self.lab
        comparison = lab.joined("ab", request, listener, (first, second, text, seed, random_weights, mode))
        lab.sessions.open(key, comparison.cancel)
        try:
            if comparison.wait_planned() is not None:
                raise comparison.error
            specs, req, trial = comparison.plan
            audio, not_saved = listen.ab_pair(comparison.run.follow(), trial["mode"])
        except LabError as e:
            return None, None, f"⚠️ {html.escape(str(e))}", None, hidden, hidden, hidden
        finally:
            lab.sessions.close(key, comparison.cancel)
            env.trim_heap()
        on = gr.update(interactive=True)
        notes = [report.WEIGHTS_NOTE.get(s.weights, "") for s in specs]
        players = [gr.update(value=(sr, pcm16(x)), label=side + (f": {note}" if note else ""))
                   for side, (sr, x), note in zip("AB", audio, notes)]
        return (*players, pair_message(specs, req, not_saved), trial, on, on, on)

    def vote(self, choice, trial):
        off = gr.update(interactive=False)
        if not trial:
            return "⚠️ vote: play a pair first", None, self.tally_table(), off, off, off
        try:
            ab.record_vote(self.lab.votes, trial["a"], trial["b"], choice, text=trial["text"], seed=trial["seed"],
                           weights=trial["weights"], mode=trial["mode"])
            unsaved = ""
        except history.NotWritten as e:   # the vote is kept in memory and counted; the reveal is not withheld
            unsaved = f"\n\n⚠️ vote not written: {html.escape(str(e))}"
        picked = {"A": f"A ({trial['a']})", "B": f"B ({trial['b']})", "same": "same"}[choice]
        return (f"You voted **{picked}**. A was **{trial['a']}**, B was **{trial['b']}**.{unsaved}", None,
                self.tally_table(), off, off, off)

    def tally_table(self) -> pd.DataFrame:
        return pd.DataFrame(ab.tally_table(history.read(self.lab.votes)))


def pair_message(specs, req, not_saved: str | None) -> str:
    """What the listener reads over the pair: what to do, what changed in the text, what went wrong."""
    msg = "Listen to both, then vote. The names are shown after your vote."
    if req.text_notes:
        msg += "\n\nℹ️ text changed before synthesis: " + html.escape("; ".join(req.text_notes))
    if not_saved:
        msg += f"\n\n⚠️ {html.escape(not_saved)}"
    if len({s.weights for s in specs}) > 1:
        msg += "\n\n⚠️ A and B use different weights, and each player says which: this pair is not blind."
    return msg
