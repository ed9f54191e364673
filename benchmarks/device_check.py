"""The device check: what dtrak's paper-scale path costs on this machine's accelerator.

Run through ``benchmarks/device_check.sh`` (which first runs the CUDA-marked tests). With
random weights and no downloads it measures, on ``--device`` (default: CUDA when present):

  train      optimizer steps/s of SPEC's CIFAR UNet (38.3M parameters; the paper says
             35.7M) at batch 128, 32 px, in float32 and (on CUDA) bf16 autocast, as dtrak
             trains (the family's loss);
  featurize  per-sample gradients of that UNet at K = 10 and K = 100 (examples/s), their
             throughput as a ratio of one batched forward+backward of the same B x K inputs,
             and the projection to k = 32768 with SJLT, SRHT and trak's CudaProjector (when
             installed): examples/s of gradients + projection;
  lora       LoRA featurization of a Stable Diffusion 1.x UNet (skipped until the Stable
             Diffusion family exists, and said so);
  kernel     the kernel factorisation for N = 5000, k = 32768 (torch float64 on the device,
             against SciPy on the host in the same run) and the LDS lambda sweep from it;
  projected  the wall clock of the paper-scale CIFAR-2 featurization, (5000 + 2000)
             examples at K = 100, from the measured rate.

``--tiny`` shrinks every size so that the whole check runs on a CPU in about a minute (the
test suite runs it that way). Every figure goes to ``OUT/device_check.json``; a markdown
table to ``OUT/device_check.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dtrak.config import ModelConfig
from dtrak.families import get_family
from dtrak.gradients import full_float32, per_sample_gradients
from dtrak.noise import ScheduleConstants, add_noise, example_noise, timesteps
from dtrak.outputs import get_output
from dtrak.projection import make_projector
from dtrak.runtime import resolve_device
from dtrak.scoring import KernelSolver


@dataclass(frozen=True)
class Sizes:
    """What the check measures at: the paper's sizes, or ``--tiny`` ones for a CPU."""

    model: str = "cifar"  # dtrak's UNet preset: SPEC's CIFAR DDPM UNet, 38.3M parameters
    channels: int = 3
    resolution: int = 32
    train_batch: int = 128
    train_steps: int = 10
    feature_ks: tuple[int, ...] = (10, 100)  # timesteps K
    feature_batch: dict | None = None  # examples per gradient batch, by K
    proj_dim: int = 32768
    kernel_n: int = 5000
    kernel_targets: int = 2000
    kernel_subsets: int = 100
    n_lambdas: int = 20
    paper_examples: int = 5000 + 2000  # CIFAR-2: training set + targets (val + generated)
    paper_K: int = 100


PAPER = Sizes(feature_batch={10: 32, 100: 8})
TINY = Sizes(model="tiny", channels=3, resolution=8, train_batch=16, train_steps=3,
             feature_ks=(2, 4), feature_batch={2: 4, 4: 4}, proj_dim=512, kernel_n=300,
             kernel_targets=40, kernel_subsets=16, n_lambdas=5)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny sizes (a CPU, about a minute)")
    ap.add_argument("--out", required=True, help="folder for device_check.json / .md")
    ap.add_argument("--cuda-tests", default=None,
                    help="pytest's output of `pytest -m cuda` (the .sh passes it)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 2) -> float:
    """Best wall-clock seconds of ``repeats`` calls after one warm-up call."""
    fn()
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def peak_memory(device: torch.device) -> float | None:
    """GiB allocated at peak since the last reset (CUDA only)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ------------------------------------------------------------------------------- parts


def build_model(sizes: Sizes, device: torch.device) -> torch.nn.Module:
    family = get_family("unet2d")
    cfg = ModelConfig(preset=sizes.model)
    model = family.build(cfg, (sizes.channels, sizes.resolution, sizes.resolution), seed=0)
    return model.to(device)


def schedule() -> ScheduleConstants:
    return ScheduleConstants.from_scheduler(get_family("unet2d").scheduler(ModelConfig()))


def bench_train(sizes: Sizes, device: torch.device) -> list[dict]:
    """Optimizer steps/s as dtrak trains: the family's loss, AdamW, (bf16) autocast."""
    family = get_family("unet2d")
    train_sched = family.scheduler(ModelConfig())  # what dtrak.train uses (float32)
    gen = torch.Generator().manual_seed(0)
    shape = (sizes.train_batch, sizes.channels, sizes.resolution, sizes.resolution)
    x0 = (torch.rand(shape, generator=gen) * 2 - 1).to(device)
    eps = torch.randn(shape, generator=gen).to(device)
    alphas = train_sched.alphas_cumprod.to(device)
    t = torch.randint(0, len(alphas), (sizes.train_batch,), generator=gen).to(device)
    rows = []
    precisions = ("float32", "bf16") if device.type == "cuda" else ("float32",)
    for precision in precisions:
        model = build_model(sizes, device).train()
        adapter = family.adapter(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if precision == "bf16"
                    else contextlib.nullcontext())

        def steps(n: int, model=model, adapter=adapter, opt=opt, autocast=autocast) -> None:
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                with autocast:
                    loss = family.training_loss(adapter, x0, {}, t, eps, alphas)
                loss.backward()
                opt.step()

        _reset_peak(device)
        seconds = timed(lambda steps=steps: steps(sizes.train_steps), device, repeats=1)
        rows.append({"precision": precision, "batch": sizes.train_batch,
                     "parameters": sum(p.numel() for p in model.parameters()),
                     "steps_per_s": sizes.train_steps / seconds,
                     "images_per_s": sizes.train_steps * sizes.train_batch / seconds,
                     "peak_gib": peak_memory(device)})
        del model, opt
    return rows


def _projectors(p: int, k: int, device: torch.device) -> dict:
    """The projectors to time: SJLT, SRHT, trak's CudaProjector; or why one is left out."""
    out = {}
    for kind in ("sjlt", "srht", "trak-cuda"):
        try:
            out[kind] = make_projector(kind, p, k, seed=0)
        except (ValueError, ImportError) as e:
            out[kind] = str(e).split(";")[0]
    return out


def bench_featurize(sizes: Sizes, device: torch.device) -> list[dict]:
    """Per-sample gradients (vmap), batched forward+backward, projections, per K."""
    model = build_model(sizes, device).eval()
    p = sum(q.numel() for q in model.parameters())
    projectors = _projectors(p, sizes.proj_dim, device)
    return [_featurize_at(sizes, K, model, projectors, device) for K in sizes.feature_ks]


def _featurize_at(sizes: Sizes, K: int, model: torch.nn.Module, projectors: dict,
                  device: torch.device) -> dict:
    adapter = get_family("unet2d").adapter(model)
    sched = schedule()
    B = sizes.feature_batch[K]
    ts = timesteps("uniform", K, len(sched.alphas_cumprod))
    x0 = torch.rand(B, sizes.channels, sizes.resolution, sizes.resolution,
                    generator=torch.Generator().manual_seed(1)) * 2 - 1
    ids = list(range(B))
    _reset_peak(device)
    grads = {}

    def per_sample() -> None:
        grads["g"] = per_sample_gradients(adapter, x0.to(device), ids, "square", ts, sched,
                                          noise_seed=0)

    grad_s = timed(per_sample, device, repeats=1)
    grad_peak = peak_memory(device)
    event = (sizes.channels, sizes.resolution, sizes.resolution)
    eps = example_noise(0, ids, K, event).flatten(0, 1).to(device)
    x0f, tf = x0.to(device).repeat_interleave(K, 0), ts.to(device).repeat(B)
    alphas = sched.alphas_cumprod.to(device)
    out_fn = get_output("square")

    def batched() -> None:
        model.zero_grad(set_to_none=True)
        with full_float32():
            x_t = add_noise(x0f, eps, tf, alphas)
            out_fn(model(x_t, tf).sample, eps, tf, sched).mean().backward()

    batched_s = timed(batched, device, repeats=1)
    model.zero_grad(set_to_none=True)
    row = {"K": K, "batch": B, "p": sum(q.numel() for q in model.parameters()),
           "k": sizes.proj_dim, "grad_examples_per_s": B / grad_s,
           "ratio_to_batched_fwd_bwd": batched_s / grad_s, "grad_peak_gib": grad_peak,
           "projectors": {}}
    g = grads.pop("g")
    for kind, proj in projectors.items():
        if isinstance(proj, str):
            row["projectors"][kind] = {"skipped": proj}
            continue
        proj_s = timed(lambda proj=proj: proj.project(g), device, repeats=1)
        row["projectors"][kind] = {"project_s_per_example": proj_s / B,
                                   "examples_per_s": B / (grad_s + proj_s)}
    return row


def bench_kernel(sizes: Sizes, device: torch.device) -> dict:
    """Kernel factorisation on the device vs SciPy on the host, and the lambda sweep."""
    rng = np.random.default_rng(0)
    n, k = sizes.kernel_n, sizes.proj_dim
    phi = rng.standard_normal((n, k), dtype=np.float32)
    targets = rng.standard_normal((sizes.kernel_targets, k), dtype=np.float32)
    masks = rng.random((sizes.kernel_subsets, n)) < 0.5
    lams = list(np.logspace(-2, 2, sizes.n_lambdas) * float((phi.astype(np.float64) ** 2)
                                                             .sum(1).mean()))
    t0 = time.perf_counter()
    host = KernelSolver(phi)
    host_s = time.perf_counter() - t0
    res = {"N": n, "k": k, "form": host.form, "host_scipy_s": host_s}
    _sync(device)  # the torch path runs on the CPU too (as it would on a GPU), for a ratio
    t0 = time.perf_counter()
    solver = KernelSolver(phi, device=device)
    _sync(device)
    res["device_s"] = time.perf_counter() - t0
    res["speedup_vs_host"] = host_s / res["device_s"]
    res["max_rel_eig_diff"] = float(np.abs(solver.eigenvalues - host.eigenvalues).max()
                                    / host.eigenvalues.max())
    t0 = time.perf_counter()
    pred = solver.predicted_outputs_sweep(targets, lams, masks)
    res.update({"sweep_s": time.perf_counter() - t0, "targets": sizes.kernel_targets,
                "subsets": sizes.kernel_subsets, "lambdas": len(lams),
                "sweep_finite": bool(np.isfinite(pred).all())})
    return res


def projected_cost(sizes: Sizes, features: list[dict]) -> dict:
    """Wall clock of the paper-scale CIFAR-2 featurization from the measured rate at K."""
    row = next((r for r in features if r["K"] == sizes.paper_K), features[-1])
    rates = {kind: v["examples_per_s"] for kind, v in row["projectors"].items()
             if "examples_per_s" in v}
    best = max(rates, key=rates.get)
    seconds = sizes.paper_examples / rates[best]
    return {"examples": sizes.paper_examples, "K": row["K"], "projector": best,
            "examples_per_s": rates[best], "hours": seconds / 3600,
            "note": "one output function; every further output in the same pass shares the "
                    "forward" + ("" if row["K"] == sizes.paper_K else
                                 f" (measured at K = {row['K']}, not {sizes.paper_K}: --tiny)")}


def cuda_test_summary(path: str | None) -> dict | None:
    """``N passed, M skipped, ...`` of the pytest output at ``path``."""
    if not path or not Path(path).exists():
        return None
    text = Path(path).read_text()
    counts = {w: int(n) for n, w in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)",
                                                text)}
    return {"counts": counts, "ok": counts.get("failed", 0) == 0 and not counts.get("error")
            and not counts.get("errors")}


def environment(device: torch.device) -> dict:
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "device": str(device), "host": platform.node(), "cpus": os.cpu_count(),
           "python": platform.python_version()}
    if device.type == "cuda":
        env.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   gpu_memory_gib=torch.cuda.get_device_properties(device).total_memory / 2**30)
    else:
        env["gpu"] = None
    return env


# ------------------------------------------------------------------------------- report


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}"


def markdown(res: dict) -> str:
    env = res["environment"]
    lines = [f"Device check, {env['date']}: {env.get('gpu') or 'CPU'} ({env['device']}), "
             f"torch {env['torch']}, sizes: {res['sizes']}.", ""]
    if res["cuda_tests"] is not None:
        lines += [f"CUDA-marked tests: {res['cuda_tests']['counts']}", ""]
    lines += ["| part | setting | figure |", "|---|---|---|"]
    for r in res["train"]:
        lines.append(f"| train | UNet of {r['parameters']:,} parameters, batch {r['batch']}, "
                     f"{r['precision']} | {_f(r['steps_per_s'])} steps/s "
                     f"({_f(r['images_per_s'])} images/s), peak {_f(r['peak_gib'])} GiB |")
    for r in res["featurize"]:
        lines.append(f"| per-sample gradients | K = {r['K']}, B = {r['batch']} | "
                     f"{_f(r['grad_examples_per_s'])} examples/s = "
                     f"{_f(r['ratio_to_batched_fwd_bwd'])} x batched fwd+bwd, "
                     f"peak {_f(r['grad_peak_gib'])} GiB |")
        for kind, v in r["projectors"].items():
            fig = (f"skipped: {v['skipped']}" if "skipped" in v else
                   f"{_f(v['examples_per_s'])} examples/s (projection "
                   f"{_f(v['project_s_per_example'] * 1e3)} ms/example)")
            lines.append(f"| featurize | K = {r['K']}, {kind}, k = {r['k']} | {fig} |")
    lines.append(f"| featurize LoRA (SD 1.x UNet) | rank 128, 32x32 latents | "
                 f"skipped: {res['lora']['skipped']} |")
    kr = res["kernel"]
    dev = (f"; torch float64 on {env['device']} {_f(kr['device_s'])} s = "
           f"{_f(kr['speedup_vs_host'])} x SciPy (eigenvalues agree to "
           f"{_f(kr['max_rel_eig_diff'], 2)})")
    lines.append(f"| kernel | N = {kr['N']}, k = {kr['k']} ({kr['form']}) | SciPy on the host "
                 f"{_f(kr['host_scipy_s'])} s{dev} |")
    lines.append(f"| lambda sweep | {kr['targets']} targets x {kr['subsets']} subsets x "
                 f"{kr['lambdas']} lambdas | {_f(kr['sweep_s'])} s |")
    pc = res["projected"]
    lines.append(f"| projected | CIFAR-2 featurization, {pc['examples']} examples, K = "
                 f"{pc['K']}, {pc['projector']} | {_f(pc['hours'])} h ({pc['note']}) |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    sizes = TINY if args.tiny else PAPER
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res = {"environment": environment(device),
           "sizes": "tiny" if args.tiny else "paper",
           "cuda_tests": cuda_test_summary(args.cuda_tests)}
    print(f"device check on {device} ({res['sizes']} sizes)", flush=True)
    res["train"] = bench_train(sizes, device)
    print(f"  train: {[round(r['steps_per_s'], 3) for r in res['train']]} steps/s", flush=True)
    res["featurize"] = bench_featurize(sizes, device)
    print(f"  featurize: {[round(r['grad_examples_per_s'], 3) for r in res['featurize']]} "
          "examples/s", flush=True)
    res["lora"] = {"skipped": "no Stable Diffusion model family in dtrak yet"}
    res["kernel"] = bench_kernel(sizes, device)
    print(f"  kernel: {res['kernel']}", flush=True)
    res["projected"] = projected_cost(sizes, res["featurize"])
    res["seconds"] = time.perf_counter() - t0
    (out / "device_check.json").write_text(json.dumps(res, indent=2, default=float))
    (out / "device_check.md").write_text(markdown(res))
    print(markdown(res))
    ok = res["cuda_tests"] is None or res["cuda_tests"]["ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
