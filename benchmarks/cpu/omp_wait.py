"""Do OpenMP's spin-waiting or torch's inter-op threads cost anything on two cores? (issue 12)

Each setting runs in its own process, since OpenMP reads its wait policy when torch loads it: libgomp's default
(workers spin a while between parallel regions), OMP_WAIT_POLICY=PASSIVE (they sleep; the lab's default), and the
default with a single inter-op thread. The processes take turns, round by round, so the shared machine's load
falls on all three alike. Each times Pocket TTS's frame step (random weights at real size, int8-dynamic backbone,
no codec decode) at 2 threads and at 1, with the machine's load average.

    python benchmarks/cpu/omp_wait.py --out benchmarks/cpu/<sha>/omp_wait.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SETTINGS = {"libgomp default": {}, "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
            "libgomp default, 1 inter-op thread": {"INTEROP_THREADS": "1"}}


def child() -> None:
    import time

    import torch   # before lab: lab would otherwise set the passive policy before OpenMP loads

    if os.environ.get("INTEROP_THREADS"):
        torch.set_num_interop_threads(int(os.environ["INTEROP_THREADS"]))
    sys.path.insert(0, ROOT)
    from lab.engines import pocket_tts
    from lab.engines.kv import GrowingKV
    from lab.spec import VariantSpec

    model, _, _ = pocket_tts.load(VariantSpec(family="pocket_tts", weights="random", quantization="int8-dynamic"))
    cfg = model.config
    out = {}
    for threads in (2, 1):
        torch.set_num_threads(threads)
        per_frame = []
        with torch.no_grad():
            for _ in range(3):
                kv = GrowingKV(cfg.num_hidden_layers)
                ids = torch.arange(30)[None] % 200
                ids[0, -1] = cfg.audio_bos_token_id
                kv.reserve(ids.shape[1] + 25)
                hidden = pocket_tts.prefill(model, ids, kv)
                zeros = torch.zeros(1, cfg.latent_dim)
                latent, _ = pocket_tts.next_latent(model, hidden, zeros, 1)
                t0 = time.perf_counter()
                for _ in range(25):
                    latent, _ = pocket_tts.frame_step(model, latent[:, None, :].clone(), kv, zeros, 1)
                per_frame.append((time.perf_counter() - t0) / 25 * 1e3)
        out[f"{threads}_threads_ms_per_frame"] = statistics.median(per_frame)
    out["load_average_1min"] = os.getloadavg()[0]
    print(json.dumps(out))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = {name: [] for name in SETTINGS}
    for _ in range(args.rounds):
        for name, extra in SETTINGS.items():
            environment = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "INTEROP_THREADS")}
            done = subprocess.run([sys.executable, __file__, "--child"], env={**environment, **extra},
                                  capture_output=True, text=True, check=True)
            rows[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, rows[name][-1], file=sys.stderr, flush=True)
    summary = {name: {key: {"median": statistics.median(r[key] for r in runs), "min": min(r[key] for r in runs),
                            "max": max(r[key] for r in runs)} for key in runs[0]} for name, runs in rows.items()}
    sys.path.insert(0, ROOT)
    from lab import env

    with open(args.out, "w") as f:
        json.dump({"env": env.environment(), "rounds": rows, "summary": summary}, f, indent=1)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        child()
    else:
        sys.exit(main())
