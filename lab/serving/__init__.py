"""Serving: what stands between a front end (the page, an API client) and the run loop, with no torch and no
Gradio. The model's line (one comparison on a one-at-a-time model at a time), each client's cancels, the
comparisons a click started, whose events a page's later Gradio event follows from the start, and the batched
engine's scheduler (who runs in which row, and when arrivals join)."""
