"""ZeroGPU mode: on a ZeroGPU Space (SPACES_ZERO_GPU=true, the switch the `spaces` package reads) a comparison's GPU
work runs inside `@spaces.GPU`, and nowhere else is anything different.

What ZeroGPU changes, and where the lab meets it:
- The GPU exists only inside a decorated call, which runs in a worker forked for it. `gpu` decorates the run loop
  (lab.session.run_presets), so a comparison's builds and runs happen in one call, and its events come back to
  the page as they happen. A variant built in a call is gone after it: every comparison builds again, and its CUDA
  graphs are captured inside the call, their cost shown as the build's.
- torch.compile does not run there: lab.cards.adapt turns compile: inductor into compile: aot (lab/aot.py), whose
  packages a later call loads from disk, and refuses what has no such route (batching presets, whose scheduler
  and graphs outlive a call; inductor+cuda-graphs; inductor outside csm), with the reason on the page.
- The card is ZeroGPU's slice (lab.gpu.SPACES_CARDS["ZeroGPU"]), read from the table: outside a call CUDA is
  only emulated, so nothing asks the device.
"""
from __future__ import annotations

import os

from lab.gpu import zero_gpu_mode

# The longest a comparison's call may hold the GPU; ZeroGPU schedules shorter calls first.
DURATION_S = int(os.environ.get("LAB_ZEROGPU_DURATION_S", "120"))


def gpu(fn):
    """`fn` under `spaces.GPU` on a ZeroGPU Space; elsewhere `fn` itself, unchanged (the `spaces` package is imported
    only there)."""
    if not zero_gpu_mode():
        return fn
    import spaces

    return spaces.GPU(duration=DURATION_S)(fn)
