"""Speech Latency Lab: build inference variants of streaming speech models and measure them honestly.

What to build is a VariantSpec (lab.spec), how it runs is an Engine (lab.engines), what was measured is a
Timeline and its figures (lab.metrics), and how it is shown is lab.report. Nothing here imports Gradio.
"""
