"""What the tabs share: chart slots, tables, and the page's side of a click's early start (web/player.js)."""
from __future__ import annotations

import gradio as gr
import pandas as pd


def chart(label: str, elem_id: str, visible: bool = False) -> gr.Plot:
    """A chart slot: a matplotlib figure sent as PNG, hidden until the first one arrives (History's shows at once)."""
    return gr.Plot(label=label, elem_id=elem_id, elem_classes=["chart"], format="png", visible=visible)


def drawn(plot: gr.Plot, fig):
    """The chart as the page gets it (a PNG), encoded here in the handler's thread by the component's own
    postprocess, which also closes the figure: handed the figure, Gradio would encode it on the server's event
    loop, where every page's updates and the PCM sockets wait (docs/DESIGN.md, Serving many pages)."""
    return plot.postprocess(fig)


def shown_chart(plot: gr.Plot, fig):
    return gr.update(value=drawn(plot, fig), visible=True)


def shown_table(rows: list[dict]):
    return gr.update(value=pd.DataFrame(rows), visible=True)


# Gradio's event for a compare or a blind pair first hands the click's start its values (web/player.js's lab.start:
# the click itself started it when the form's last change events had these values); the listener field becomes
# "listener:comparison id:socket". The event goes once the click's first voice is scheduled.
def click_js(kind: str, names: tuple[str, ...]) -> str:
    return f"""(...args) => {{
  if (!window.labAudio) {{ document.querySelectorAll('audio').forEach(a => {{ a.pause(); a.currentTime = 0; }}); return args; }}
  args[0] = window.labAudio.start({kind!r}, {list(names)!r}, args.slice(1));
  return window.labAudio.afterVoice(args[0], args); }}"""


def remember_js(kind: str, names: tuple[str, ...]) -> str:
    """The page keeps the form's values as they change (in the browser only), so a click can send its start before
    Gradio's own click handling runs."""
    return f"(...args) => window.labAudio ? window.labAudio.remember({kind!r}, {list(names)!r}, args) : []"


def remember(demo, kind: str, names: tuple[str, ...], inputs: list, event) -> None:
    """Wires the page's side of a click's early start: the form's values as they change, and the end of the click's
    Gradio event (until then Gradio takes no other click, so the page sends no start either)."""
    for component in inputs:
        component.change(None, inputs, None, js=remember_js(kind, names), api_visibility="private")
    demo.load(None, inputs, None, js=remember_js(kind, names), api_visibility="private")
    event.then(None, None, None, js=f"() => window.labAudio ? window.labAudio.ended({kind!r}) : []",
               api_visibility="private")


STOP_JS = "(listener) => { if (window.labAudio) window.labAudio.stop(); return [listener]; }"
WEIGHTS_SWITCH = "random weights (latency only: the audio is noise)"
