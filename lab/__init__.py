"""Speech Latency Lab: build inference variants of streaming speech models and measure them honestly.

What to build is a VariantSpec (lab.spec), how it runs is an Engine (lab.engines), what was measured is a
Timeline and its figures (lab.measure.metrics), and how it is shown is lab.measure.report. Nothing here imports Gradio.
"""

import os
import sys

# OpenMP's worker threads spin between parallel regions by default (libgomp), and on two shared cores a spinning
# worker holds the core its partner needs (docs/RESULTS.md#two-cores-and-threads). OpenMP reads this when torch
# loads it, so it holds only where the lab is imported before torch (the app, the CLI, the benchmarks); lab.env
# records whether it did.
OMP_WAIT_POLICY_IN_FORCE = "OMP_WAIT_POLICY" in os.environ or "torch" not in sys.modules
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
