"""Peak memory of featurization as the number of examples grows.

Each size runs in a fresh process (so peak RSS is its own), featurizing N random images
through the digits-size UNet into a memmap feature store. Features go to disk batch by
batch, so the peak should stay flat in N; the in-memory reference (all features held in a
list) grows with N x k. Prints a table; --out writes JSON.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py --out mem.json

``--engines`` measures instead the peak memory PER EXAMPLE of featurizing one batch with
each gradient engine and projector (issue 20): vmap + sjlt, hooks + sjlt, hooks + kron, at
two model sizes, the engine benchmark's default UNet (bench_engine.build_model, p ~ 0.75M,
1x16x16) and SPEC's CIFAR UNet (preset "cifar", 3x32x32, ~38.3M parameters, random
weights). Each (model, engine, B) runs in a fresh process: its peak RSS minus the peak after
loading the model (imports, weights, inputs) is the featurization's peak; per example is the
slope between the two batch sizes (what the projector's tables and other fixed costs add
cancels out). A reference row, "batched", is one plain batched forward+backward of the same
B x K noisy inputs (no per-example gradients, no features): the activations every engine
keeps for its backward, the floor of the others. One torch thread. Prints a markdown table; --out writes JSON with the load
average before and after each configuration.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_memory.py --engines --out mem_engines.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


ENGINE_CHILD = r"""
import resource, sys, tempfile, torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[5])
from dtrak.config import ModelConfig
from dtrak.families import UNet2DAdapter, get_family
from dtrak.featurize import FeatureSpec, featurize_into
from dtrak.noise import ScheduleConstants
model_name, engine, B, k, K = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[6])
if model_name == "engine":  # benchmarks/bench_engine.py's default model
    import argparse
    from bench_engine import build_model
    model = build_model(argparse.Namespace(resolution=16, channels=[32, 64]))
    shape = (1, 16, 16)
else:  # SPEC's CIFAR UNet, random weights
    model = get_family("unet2d").build(ModelConfig(preset="cifar"), (3, 32, 32), seed=0)
    shape = (3, 32, 32)
model.eval()
p = sum(q.numel() for q in model.parameters())
x = torch.rand(B, *shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
sched = ScheduleConstants.linear()
import time
if engine == "batched":  # reference: one batched forward+backward of the B*K noisy inputs
    from dtrak.noise import add_noise, example_noise, timesteps
    from dtrak.outputs import get_output
    ts = timesteps("uniform", K)
    eps = example_noise(0, list(range(B)), K, shape).flatten(0, 1)
    x0f, tf = x.repeat_interleave(K, 0), ts.repeat(B)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    x_t = add_noise(x0f, eps, tf, sched.alphas_cumprod)
    get_output("square")(model(x_t, tf).sample, eps, tf, sched).mean().backward()
    true_k = 0
else:
    gradients, projector = {"vmap": ("vmap", "sjlt"), "hooks": ("hooks", "sjlt"),
                            "kron": ("hooks", "kron")}[engine]
    spec = FeatureSpec(output="square", n_timesteps=K, projector=projector, proj_dim=k)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        store = featurize_into(UNet2DAdapter(model), x, d + "/f", spec, sched, "m", "train",
                               batch_size=B, progress=False, gradients=gradients)
        true_k = store.load().shape[1]
wall = time.perf_counter() - t0
print(base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, p, true_k, wall)
"""


def engine_peak(model: str, engine: str, b: int, k: int, K: int) -> dict:
    """One configuration in a fresh process: baseline and peak RSS (MB), p, true k, wall s."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    la0 = os.getloadavg()
    out = subprocess.run([sys.executable, "-c", ENGINE_CHILD, model, engine, str(b), str(k),
                          str(Path(__file__).resolve().parent), str(K)], check=True,
                         capture_output=True, text=True, env=env).stdout.split()[-5:]
    return {"model": model, "engine": engine, "B": b, "K": K, "proj_dim": k,
            "baseline_mb": int(out[0]) / 1024, "peak_mb": int(out[1]) / 1024,
            "featurize_peak_mb": (int(out[1]) - int(out[0])) / 1024, "p": int(out[2]),
            "k": int(out[3]), "wall_s": float(out[4]), "loadavg_before": list(la0),
            "loadavg_after": list(os.getloadavg())}


ENGINE_LABELS = {"batched": "batched fwd+bwd (reference, no features)", "vmap": "vmap + sjlt",
                 "hooks": "hooks + sjlt", "kron": "hooks + kron"}


def engines_main(args) -> None:
    batches = {"engine": [int(b) for b in args.engine_batches.split(",")],
               "cifar": [int(b) for b in args.cifar_batches.split(",")]}
    runs, rows = [], []
    t0 = time.perf_counter()
    la_start = os.getloadavg()
    for model in args.models.split(","):
        for engine in args.engine_list.split(","):
            got = []
            for b in batches[model]:
                r = engine_peak(model, engine, b, args.k, args.K)
                print(f"  {model} {engine} B={b}: peak {r['peak_mb']:.0f} MB, baseline "
                      f"{r['baseline_mb']:.0f} MB, featurize {r['featurize_peak_mb']:.0f} MB, "
                      f"{r['wall_s']:.1f} s, load {r['loadavg_before'][0]:.2f} -> "
                      f"{r['loadavg_after'][0]:.2f}", file=sys.stderr, flush=True)
                runs.append(r)
                got.append(r)
            lo, hi = got[0], got[-1]
            slope = (hi["featurize_peak_mb"] - lo["featurize_peak_mb"]) / (hi["B"] - lo["B"])
            rows.append({"model": model, "engine": engine, "p": lo["p"], "k": lo["k"],
                         "B": [g["B"] for g in got],
                         "featurize_peak_mb": [g["featurize_peak_mb"] for g in got],
                         "per_example_mb": slope,
                         "per_example_over_p_floats": slope * 2**20 / (4 * lo["p"])})
    la_end = os.getloadavg()
    print(f"Peak RSS of featurizing one batch (fresh process, 1 thread, output square, "
          f"K = {args.K}, proj_dim {args.k}); featurize = peak - peak after loading the model; "
          f"per example = slope over B")
    print()
    print("| model | p | engine | k | B | featurize peak (MB) | per example (MB) "
          "| per example / (4 p bytes) |")
    print("|---|---:|---|---:|---|---|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['p'] / 1e6:.2f}M | {ENGINE_LABELS[r['engine']]} | {r['k'] or '-'} "
              f"| {', '.join(map(str, r['B']))} "
              f"| {', '.join(f'{m:.0f}' for m in r['featurize_peak_mb'])} "
              f"| {r['per_example_mb']:.1f} | {r['per_example_over_p_floats']:.2f} |")
    print()
    print(f"load average at start {la_start[0]:.2f} {la_start[1]:.2f} {la_start[2]:.2f}, "
          f"at end {la_end[0]:.2f} {la_end[1]:.2f} {la_end[2]:.2f} ({os.cpu_count()} cpus); "
          f"wall {time.perf_counter() - t0:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "loadavg_start": list(la_start),
                       "loadavg_end": list(la_end), "rows": rows, "runs": runs}, f, indent=2)


def peak_mb(n: int, k: int, mode: str) -> tuple[float, float]:
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(k), mode], check=True,
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) / 1024, int(out[1]) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", default="64,256,1024")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--out", default=None)
    ap.add_argument("--engines", action="store_true",
                    help="per-example peak of vmap / hooks / hooks+kron at two model sizes")
    ap.add_argument("--models", default="engine,cifar", help="--engines: engine, cifar")
    ap.add_argument("--engine-batches", default="4,16", help="--engines: B of the 0.75M model")
    ap.add_argument("--cifar-batches", default="1,2", help="--engines: B of the 38M model")
    ap.add_argument("--K", type=int, default=10, help="--engines: timesteps per example")
    ap.add_argument("--engine-list", default="batched,vmap,hooks,kron",
                    help="--engines: batched (one plain batched forward+backward of the B*K "
                         "inputs, the activation floor), vmap, hooks, kron")
    args = ap.parse_args()
    if args.engines:
        engines_main(args)
        return
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
