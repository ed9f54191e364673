"""Peak memory of featurization as the number of examples grows.

Each size runs in a fresh process (so peak RSS is its own), featurizing N random images
through the digits-size UNet into a memmap feature store. Features go to disk batch by
batch, so the peak should stay flat in N; the in-memory reference (all features held in a
list) grows with N x k. Prints a table; --out writes JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py --out mem.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import resource, sys, tempfile, torch
torch.set_num_threads(1)
from dtrak.config import ModelConfig
from dtrak.featurize import FeatureSpec, featurize_into
from dtrak.families import UNet2DAdapter
from dtrak.families.unet2d import build_scheduler, build_unet
from dtrak.noise import ScheduleConstants
n, k, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
model = build_unet(ModelConfig(preset="digits"), 1, 8, seed=0)
sched = ScheduleConstants.from_scheduler(build_scheduler(ModelConfig()))
x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
spec = FeatureSpec(output="square", n_timesteps=10, projector="sjlt", proj_dim=k)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with tempfile.TemporaryDirectory() as d:
    if mode == "store":
        featurize_into(UNet2DAdapter(model), x, d + "/f", spec, sched, "m", "train",
                       batch_size=32, progress=False)
    else:  # reference: every projected row kept in memory, plus the raw gradients
        from dtrak.featurize import projector_for
        from dtrak.gradients import param_order, per_sample_gradients
        p = sum(c for _, c in param_order(model))
        proj = projector_for(spec, p, "m")
        rows, grads = [], []
        for lo in range(0, n, 32):
            ids = torch.arange(lo, min(n, lo + 32))
            g = per_sample_gradients(UNet2DAdapter(model), x[ids], ids, "square",
                                     spec.timesteps(1000), sched, 0)
            grads.append(g)
            rows.append(proj.project(g))
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def peak_mb(n: int, k: int, mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(k), mode], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) / 1024, int(out[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="64,256,1024")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    print(f"{'N':>6} {'store peak MB':>14} {'in-memory peak MB':>18}")
    for n in (int(s) for s in args.sizes.split(",")):
        base, store = peak_mb(n, args.k, "store")
        _, ref = peak_mb(n, args.k, "memory")
        rows.append({"n": n, "k": args.k, "baseline_mb": base, "store_peak_mb": store,
                     "in_memory_peak_mb": ref})
        print(f"{n:>6} {store:>14.0f} {ref:>18.0f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
