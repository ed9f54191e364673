"""Benchmark of the attribution engine: per-sample gradients and projections on CPU.

Measures, in one run on one machine:
  (a) per-sample gradient throughput (dtrak.gradients.per_sample_gradients, vmap over
      examples, each a batch of K timesteps) against a plain batched forward+backward of the
      same model on the same B*K noisy inputs, in (example, timestep) pairs per second;
  (b) fast projectors (srht, sjlt) against the dense regenerate-per-call reference
      (gaussian, rademacher) at p ~ 1M and k = 4096, 32768, with their inner-product error;
  (c) projection time / gradient time per example for the model of (a);
  (d) the hook engine (dtrak.hooks, attribution.gradients = "hooks") and the factored kron
      projector in the comparison of (a), and kron's Gram error on the model's gradients.
All compared gradient paths run interleaved (one repeat of each in turn), and the load
average is recorded before and after (``loadavg_before``/``loadavg_after`` in the JSON):
a figure taken with other jobs on the cores is not a quiet-machine figure.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/bench_engine.py --out benchmarks/engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings

import torch
from diffusers import UNet2DModel

from dtrak.families import UNet2DAdapter
from dtrak.gradients import param_order, per_sample_gradients
from dtrak.hooks import hook_gradients, kron_layers
from dtrak.noise import ScheduleConstants, add_noise, example_noise, timesteps
from dtrak.outputs import get_output
from dtrak.projection import DenseProjector, KronProjector, make_projector


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=None, help="write the results as JSON to this path")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--batch", type=int, default=16, help="examples per gradient batch")
    ap.add_argument("--K", type=int, default=10, help="timesteps per example")
    ap.add_argument("--chunk", type=int, default=8,
                    help="chunk_size of per_sample_gradients (examples per vmap call)")
    ap.add_argument("--resolution", type=int, default=16)
    ap.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--output", default="square", help="output function")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timing rounds: the min is reported, and the median of the per-round "
                         "ratios with a bootstrap interval")
    ap.add_argument("--gradients-only", action="store_true",
                    help="time the gradient paths (a, d) only: no projector tables")
    ap.add_argument("--proj-p", type=int, default=1_000_000, help="p of the projector benchmark")
    ap.add_argument("--proj-k", type=int, nargs="+", default=[4096, 32768])
    ap.add_argument("--proj-batch", type=int, default=16, help="vectors per projection call")
    ap.add_argument("--dense-blocks", type=int, default=4,
                    help="dense projector: time this many 1024-row blocks and extrapolate")
    ap.add_argument("--error-seeds", type=int, default=5, help="projection seeds for the error")
    ap.add_argument("--kron-k", type=int, default=4096,
                    help="proj_dim of the kron projector timed in (a) (its true k is reported)")
    ap.add_argument("--skip-fallback", action="store_true",
                    help="skip timing vmap with the fused SDPA kernel (per-example fallback)")
    return ap.parse_args()


def build_model(args) -> UNet2DModel:
    """The digits-size UNet: one attention level (the second), one head, scale-shift norm."""
    levels = len(args.channels)
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=args.resolution, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=tuple(args.channels),
        down_block_types=tuple("AttnDownBlock2D" if i == 1 else "DownBlock2D"
                               for i in range(levels)),
        up_block_types=tuple(reversed(["AttnUpBlock2D" if i == 1 else "UpBlock2D"
                                       for i in range(levels)])),
        norm_num_groups=8, attention_head_dim=None, resnet_time_scale_shift="scale_shift",
    ).eval()


# With one thread, the process CPU time is the robust clock on a shared machine: it leaves
# out the time the process waits for a core (wall times here varied by 2x under load).
# With more threads it would add the threads up, so the wall clock is used instead.
CLOCK = {"name": "process CPU time", "fn": time.process_time}


def _once(fn) -> float:
    t0 = CLOCK["fn"]()
    fn()
    return CLOCK["fn"]() - t0


def best_time(fn, repeats: int) -> float:
    """Minimum time (``CLOCK``) of ``repeats`` calls after one warm-up call."""
    fn()
    return min(_once(fn) for _ in range(max(1, repeats)))


# --- (a) gradients ------------------------------------------------------------------------


def bench_gradients(args, model) -> dict:
    sched = ScheduleConstants.linear()
    ts = timesteps("uniform", args.K)
    B, K = args.batch, args.K
    x0 = torch.rand(B, 1, args.resolution, args.resolution) * 2 - 1
    ids = list(range(B))
    adapter = UNet2DAdapter(model)
    out_fn = get_output(args.output)

    def per_sample():
        return per_sample_gradients(adapter, x0, ids, args.output, ts, sched, noise_seed=0,
                                    chunk_size=args.chunk)

    eps = example_noise(0, ids, K, (1, args.resolution, args.resolution)).flatten(0, 1)
    x0f, tf = x0.repeat_interleave(K, 0), ts.repeat(B)

    def batched():
        model.zero_grad(set_to_none=True)
        x_t = add_noise(x0f, eps, tf, sched.alphas_cumprod)
        out_fn(model(x_t, tf).sample, eps, tf, sched).mean().backward()

    def noise_only():
        example_noise(0, ids, K, (1, args.resolution, args.resolution))

    kron = kron_projector(model, args.kron_k)

    # featurization hands the hook engine the same buffer block after block (a fresh B x p
    # array costs a page fault per 4 KiB page); so does the benchmark
    buffer = torch.empty(1, B, sum(p.numel() for p in model.parameters()))

    def hooks():
        return hook_gradients(adapter, x0, ids, [args.output], ts, sched, noise_seed=0,
                              out=buffer)

    def hooks_kron():
        return hook_gradients(adapter, x0, ids, [args.output], ts, sched, noise_seed=0,
                              projector=kron)

    # Interleave the measurements so background load hits all alike; report the minimum.
    fns = {"per_sample_s": per_sample, "batched_fwd_bwd_s": batched, "hooks_s": hooks,
           "hooks_kron_s": hooks_kron}
    if not args.skip_fallback:
        fns["fused_sdpa_vmap_s"] = lambda: _fused_sdpa_vmap(per_sample)
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in fns.items():
            times[name].append(_once(fn))
    res = {"B": B, "K": K, "chunk": args.chunk, "p": sum(p.numel() for p in model.parameters())}
    res.update({name: min(t) for name, t in times.items()})
    res["times"] = times
    res["paired"] = {name: paired_ratio(times["batched_fwd_bwd_s"], times[name])
                     for name in ("per_sample_s", "hooks_s", "hooks_kron_s")}
    res["noise_s"] = best_time(noise_only, args.repeats)
    res["per_sample_pairs_per_s"] = B * K / res["per_sample_s"]
    res["batched_pairs_per_s"] = B * K / res["batched_fwd_bwd_s"]
    res["ratio"] = res["per_sample_pairs_per_s"] / res["batched_pairs_per_s"]
    res["hooks_ratio"] = res["batched_fwd_bwd_s"] / res["hooks_s"]
    res["hooks_kron_ratio"] = res["batched_fwd_bwd_s"] / res["hooks_kron_s"]
    res["kron_k"] = kron.k
    res["grad_s_per_example"] = res["per_sample_s"] / B
    return res


def paired_ratio(reference: list[float], path: list[float], n_boot: int = 2000) -> dict:
    """Throughput of ``path`` over ``reference`` from the rounds: each round's ratio
    ``reference_i / path_i`` (the two timed back to back, so a slow spell of the machine
    hits both), their median, and a bootstrap 95% interval of that median over rounds."""
    r = torch.tensor(reference, dtype=torch.float64) / torch.tensor(path, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    idx = torch.randint(len(r), (n_boot, len(r)), generator=gen)
    boot = r[idx].median(dim=1).values
    return {"median": r.median().item(), "lo": boot.quantile(0.025).item(),
            "hi": boot.quantile(0.975).item(), "rounds": len(r)}


def kron_projector(model, proj_dim: int, model_id: int = 0) -> KronProjector:
    """The kron projector of ``model`` (all parameters) for the budget ``proj_dim``."""
    order = param_order(model)
    return KronProjector(sum(n for _, n in order), proj_dim, seed=0, model_id=model_id,
                         order=order, layers=kron_layers(model, order))


def kron_errors(args, model, grads: torch.Tensor) -> list[dict]:
    """kron's Gram / cosine errors on the model's gradients (its map applied to the
    materialised gradients: the same features as the hook path), beside sjlt's."""
    rows = []
    for k in args.proj_k:
        errs = [gram_error(grads, kron_projector(model, k, i).project(grads))
                for i in range(args.error_seeds)]
        rows.append({"kind": "kron", "proj_dim": k, "k": kron_projector(model, k).k,
                     "gram_rel_err": sum(e[0] for e in errs) / len(errs),
                     "cos_abs_err": sum(e[1] for e in errs) / len(errs),
                     "sjlt_same_k": projection_error("sjlt", grads,
                                                     kron_projector(model, k).k,
                                                     args.error_seeds)})
    return rows


def _fused_sdpa_vmap(per_sample) -> None:
    """``per_sample()`` with the default fused SDPA kernel, i.e. WITHOUT dtrak's MATH pinning
    (vmap then runs the fused CPU kernel through its per-example fallback loop)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import dtrak.gradients as gr

    original = gr.sdpa_kernel
    gr.sdpa_kernel = lambda backends: sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the "no batching rule" performance warnings
            per_sample()
    finally:
        gr.sdpa_kernel = original


# --- (b) projectors -----------------------------------------------------------------------


def gram_error(g: torch.Tensor, pg: torch.Tensor) -> tuple[float, float]:
    """(relative Frobenius error of the Gram matrix, mean abs error of off-diagonal cosines)."""
    g, pg = g.double(), pg.double()
    gram, pgram = g @ g.T, pg @ pg.T
    rel = ((pgram - gram).norm() / gram.norm()).item()
    cos = gram / gram.diag().sqrt().outer(gram.diag().sqrt())
    pcos = pgram / pgram.diag().sqrt().outer(pgram.diag().sqrt())
    off = ~torch.eye(g.shape[0], dtype=torch.bool)
    return rel, (pcos - cos)[off].abs().mean().item()


def projection_error(kind: str, g: torch.Tensor, k: int, seeds: int) -> dict:
    """Mean Gram/cosine error of ``kind`` on the rows of ``g`` over ``seeds`` projections.

    The dense projectors are too slow to apply many times at p ~ 1M, so they are measured
    on vectors with the same Gram matrix: a Gaussian projection's error depends on the vectors
    only through their Gram matrix (rotation invariance), so for ``gaussian`` the B x B factor
    R of g^T = QR gives the error exactly in distribution; for ``rademacher`` (not rotation
    invariant) R is spread by a random rotation over 2048 coordinates, like dense vectors.
    """
    if kind in ("gaussian", "rademacher"):
        r = torch.linalg.qr(g.double().T).R.T
        if kind == "rademacher":
            gen = torch.Generator().manual_seed(12345)
            rot = torch.linalg.qr(torch.randn(2048, r.shape[1], generator=gen, dtype=r.dtype)).Q
            r = r @ rot.T
        g = r.float()
    errs = [gram_error(g, make_projector(kind, g.shape[1], k, seed=0, model_id=i).project(g))
            for i in range(seeds)]
    return {"gram_rel_err": sum(e[0] for e in errs) / seeds,
            "cos_abs_err": sum(e[1] for e in errs) / seeds}


def dense_time_per_example(p: int, k: int, kind: str, batch: int, blocks: int, repeats: int
                           ) -> float:
    """Seconds per example of DenseProjector at (p, k), extrapolated from ``blocks`` blocks."""
    sub_p = blocks * 1024
    proj = DenseProjector(sub_p, k, kind=kind, block_size=1024)
    g = torch.randn(batch, sub_p)
    t = best_time(lambda: proj.project(g), max(1, repeats - 1))
    return t * (p / sub_p) / batch


def bench_projectors(args, grads: torch.Tensor) -> list[dict]:
    rows = []
    g_rand = torch.randn(args.proj_batch, args.proj_p)
    for k in args.proj_k:
        for kind in ("srht", "sjlt", "gaussian", "rademacher"):
            row = {"kind": kind, "k": k, "p": args.proj_p}
            if kind in ("srht", "sjlt"):
                proj = make_projector(kind, args.proj_p, k, seed=0, model_id=0)
                row["s_per_example"] = best_time(lambda p=proj: p.project(g_rand),
                                                 args.repeats) / args.proj_batch
                row["extrapolated"] = False
                gproj = make_projector(kind, grads.shape[1], k, seed=0, model_id=0)
                row["s_per_example_model_p"] = best_time(lambda p=gproj: p.project(grads),
                                                         args.repeats) / grads.shape[0]
            else:
                row["s_per_example"] = dense_time_per_example(
                    args.proj_p, k, kind, args.proj_batch, args.dense_blocks, args.repeats)
                row["s_per_example_model_p"] = row["s_per_example"] * grads.shape[1] / args.proj_p
                row["extrapolated"] = True
            row["random"] = projection_error(kind, g_rand, k, args.error_seeds)
            row["gradients"] = projection_error(kind, grads, k, args.error_seeds)
            rows.append(row)
    return rows


# --- report -------------------------------------------------------------------------------


def machine() -> dict:
    return {"platform": platform.platform(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "clock": CLOCK["name"], "cpus": os.cpu_count()}


def save(result: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    if args.threads != 1:
        CLOCK.update(name="wall time", fn=time.perf_counter)
    model = build_model(args)
    loadavg_before = os.getloadavg()
    t0 = time.perf_counter()
    result = {"machine": machine(), "loadavg_before": list(loadavg_before),
              "args": vars(args), "gradients": bench_gradients(args, model)}
    if not args.gradients_only:
        ts = timesteps("uniform", args.K)
        grads = per_sample_gradients(
            UNet2DAdapter(model), torch.rand(args.batch, 1, args.resolution, args.resolution)
            * 2 - 1, list(range(args.batch)), args.output, ts, ScheduleConstants.linear(),
            noise_seed=1)
        result["projectors"] = bench_projectors(args, grads)
        for row in result["projectors"]:
            row["proj_over_grad"] = (row["s_per_example_model_p"]
                                     / result["gradients"]["grad_s_per_example"])
        result["kron"] = kron_errors(args, model, grads)
    result.update(loadavg_after=list(os.getloadavg()), wall_s=time.perf_counter() - t0)
    print_gradients(result)
    if not args.gradients_only:
        print_projectors(result)
    print_load(result)
    save(result, args.out)


def print_gradients(r: dict) -> None:
    g = r["gradients"]
    print(f"(a) model p={g['p']:,}, B={g['B']}, K={g['K']}, chunk={g['chunk']}, "
          f"threads={r['machine']['threads']}, clock: {r['machine']['clock']}, "
          f"min of {r['args']['repeats']} interleaved repeats")
    print(f"    per-sample grads (vmap, MATH attention): {g['per_sample_s']:.3f} s "
          f"= {g['per_sample_pairs_per_s']:.1f} pairs/s (noise generation {g['noise_s']:.4f} s)")
    print(f"    batched fwd+bwd (one gradient):          {g['batched_fwd_bwd_s']:.3f} s "
          f"= {g['batched_pairs_per_s']:.1f} pairs/s")
    print(f"    ratio per-sample / batched throughput:   {g['ratio']:.3f}")
    print(f"    hooks (one batched backward):            {g['hooks_s']:.3f} s, ratio "
          f"{g['hooks_ratio']:.3f}")
    print(f"    hooks + kron projection (k={g['kron_k']}):{'':<6}{g['hooks_kron_s']:.3f} s, "
          f"ratio {g['hooks_kron_ratio']:.3f}")
    if "fused_sdpa_vmap_s" in g:
        print(f"    (vmap with the fused SDPA kernel, per-example fallback: "
              f"{g['fused_sdpa_vmap_s']:.3f} s)")
    print("    per-round ratios to batched (back to back in each round): median [95% interval]")
    for name, label in (("per_sample_s", "vmap"), ("hooks_s", "hooks"),
                        ("hooks_kron_s", "hooks + kron")):
        q = g["paired"][name]
        print(f"      {label:<13} {q['median']:.3f} [{q['lo']:.3f}, {q['hi']:.3f}] over "
              f"{q['rounds']} rounds")


def print_projectors(r: dict) -> None:
    print("(b,c) projectors; time per example; errors: Gram rel. Frobenius / mean |cos err|")
    print(f"    {'kind':<11}{'k':>7}{'ms/ex p=' + str(r['args']['proj_p']):>18}"
          f"{'ms/ex model p':>15}{'proj/grad':>11}{'err random':>18}{'err gradients':>18}")
    for row in r["projectors"]:
        mark = "*" if row["extrapolated"] else " "
        print(f"    {row['kind']:<11}{row['k']:>7}{1e3 * row['s_per_example']:>17.2f}{mark}"
              f"{1e3 * row['s_per_example_model_p']:>15.2f}{row['proj_over_grad']:>11.3f}"
              f"{row['random']['gram_rel_err']:>9.4f}/{row['random']['cos_abs_err']:.4f}"
              f"{row['gradients']['gram_rel_err']:>9.4f}/{row['gradients']['cos_abs_err']:.4f}")
    print("    * dense: timed on a few 1024-row blocks and extrapolated linearly in p")
    print("(d) kron on the model's gradients: Gram rel. Frobenius / mean |cos err| "
          "(sjlt at the same k)")
    for row in r["kron"]:
        sj = row["sjlt_same_k"]
        print(f"    proj_dim {row['proj_dim']:>7} -> k {row['k']:>7}: "
              f"{row['gram_rel_err']:.4f}/{row['cos_abs_err']:.4f}  "
              f"(sjlt {sj['gram_rel_err']:.4f}/{sj['cos_abs_err']:.4f})")


def print_load(r: dict) -> None:
    la, lb = r["loadavg_before"], r["loadavg_after"]
    print(f"load average before {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}, after "
          f"{lb[0]:.2f} {lb[1]:.2f} {lb[2]:.2f} ({r['machine']['cpus']} cpus)")
    print(f"total wall time {r['wall_s']:.1f} s")


if __name__ == "__main__":
    main()
