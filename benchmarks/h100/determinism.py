"""Is the inductor+cuda-graphs step deterministic? Runs one request several times with graph replay on and off
(same compiled functions), reports the first frame where codes differ, then steps 12 frames both ways from one
prefill and prints how far the backbone states drift. NO_CUDNN_SDP=1 switches PyTorch's cuDNN attention off.

    python benchmarks/h100/determinism.py
"""
import os, sys, torch
sys.path.insert(0, os.getcwd())
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch._dynamo.utils import counters
from lab import presets
from lab.engines import csm, torch_common as tc
from lab.request import Request
from lab.metrics import Timeline
from fastpath import TEXT  # noqa: E402
if os.environ.get("NO_CUDNN_SDP"):
    torch.backends.cuda.enable_cudnn_sdp(False)
spec = presets.load("csm-inductor-cuda-graphs", weights="random")
eng = csm.build(spec, lambda s, t: None)
req = Request(TEXT, max_audio_s=6.4)
def run(graphs):
    eng.use_graphs = graphs
    before = tc.compiled_graph_count()
    list(eng.stream(req, Timeline()))
    return eng.last_codes.clone(), tc.compiled_graph_count() - before
g1, c1 = run(True); d1, c2 = run(False); g2, c3 = run(True); d2, c4 = run(False); g3, _ = run(True)
def first(a, b):
    same = (a == b).all(-1)
    return None if bool(same.all()) else int((~same).nonzero()[0, 0])
print("graph vs graph:", first(g1, g2), first(g1, g3), " direct vs direct:", first(d1, d2), " graph vs direct:", first(g1, d1))
print("compiles during: graph", c1, "direct", c2, "graph", c3, "direct", c4)
print("recompiles counter:", dict(counters["recompiles"]) if "recompiles" in counters else None)
# per-frame hidden difference: run frames manually from the same prefill
with torch.no_grad():
    segs = eng._segments(req); emb = torch.cat(segs, 1)
    eng.use_graphs = True
    runner = eng._graphed_frame(0.0, 0)
    eng.kv.reset(); h = eng.prefill_step(emb); hg = []
    x = h
    for i in range(12):
        c, x = runner(x, None); hg.append((c.clone(), x.clone()))
    eng.kv.reset(); h = eng.prefill_step(emb); x = h
    for i in range(12):
        c, x = eng.frame(x, None, 0.0, 0)
        cg, xg = hg[i]
        print(i, "codes equal", bool(torch.equal(c, cg)), "hidden max diff", float((x.float() - xg.float()).abs().max()))
