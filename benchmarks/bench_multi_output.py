"""Benchmark: all seven output functions in one pass vs one output function at a time.

The output-function ablation needs the gradients of loss, elbo, square, avg, l1, l2 and
linf for every example. ``per_sample_gradients_multi`` shares the UNet forward pass and
batches the backward passes (``jacrev`` over the vector of outputs); the reference is seven
``per_sample_gradients`` calls on the same inputs. Reports the speed-up (reference time /
multi time) and the largest relative difference of the gradients.

Usage (the benchmark model of configs/cifar2-bench.toml):
    python benchmarks/bench_multi_output.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from dtrak.config import ModelConfig
from dtrak.families import UNet2DAdapter, count_parameters
from dtrak.families.unet2d import build_scheduler, build_unet
from dtrak.gradients import per_sample_gradients, per_sample_gradients_multi
from dtrak.noise import ScheduleConstants, timesteps

OUTPUTS = ["loss", "elbo", "square", "avg", "l1", "l2", "linf"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=16, help="examples per call")
    ap.add_argument("--K", type=int, nargs="+", default=[10, 100], help="timesteps")
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32, 32])
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="timing repeats (min reported)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    cfg = ModelConfig(preset="cifar-cpu", block_out_channels=tuple(args.channels))
    unet = build_unet(cfg, 3, args.resolution, seed=0)
    adapter = UNet2DAdapter(unet)
    sched = ScheduleConstants.from_scheduler(build_scheduler(cfg))
    x0 = torch.rand(args.batch, 3, args.resolution, args.resolution,
                    generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = torch.arange(args.batch)
    rows = []
    for K in args.K:
        ts = timesteps("uniform", K, 1000)
        per_sample_gradients_multi(adapter, x0[:2], ids[:2], OUTPUTS, ts, sched, 0)  # warm-up
        t_multi, t_single = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            multi = per_sample_gradients_multi(adapter, x0, ids, OUTPUTS, ts, sched, 0)
            t_multi.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            single = [per_sample_gradients(adapter, x0, ids, o, ts, sched, 0) for o in OUTPUTS]
            t_single.append(time.perf_counter() - t0)
        err = max(float((multi[j] - s).abs().max() / s.abs().max().clamp_min(1e-30))
                  for j, s in enumerate(single))
        rows.append({"K": K, "batch": args.batch, "multi_s": min(t_multi),
                     "seven_single_s": min(t_single),
                     "speedup": min(t_single) / min(t_multi), "max_rel_diff": err})
    print(json.dumps({"parameters": count_parameters(unet), "threads": args.threads,
                      "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
