"""Cost model of the paper-scale LDS: how long the subset-model farm takes, on CPU and on Ray.

For each data set of the paper (SPEC sections 2, 3, 5 and 8.1) this measures the seconds of
one training step of the paper's model on this machine's CPU, then prints a Markdown table:
models to train (M subsets x seeds), optimizer steps per model, seconds per step at the
paper's batch, total machine-hours, and the wall clock of the farm over N Ray workers:

    wall(N) = ceil(models / N) x steps x s/step + models x job overhead + Ray start

Each worker is assumed to be one machine like this one (2 cores, one model at a time).
Job overhead and Ray start default to what ``benchmarks/ray_overhead.py`` measured here
(5 ms per job once Ray runs, 14 s to start Ray).

Measurement: one full training step (DDPM noising at a random timestep, forward, MSE on
epsilon, backward, grad-norm clip 1.0, AdamW step) with ``--steps`` timed steps after one
warm-up (fewer, at least one, past ``--max-seconds``), fp32,
``torch.set_num_threads(--threads)``. The batch is cut below the paper's
(per-model ``measure_batch`` in MODELS) so that each measurement stays near a
minute and well under 12 GB; s/step at the paper's batch is then scaled linearly per
example. Pixel models: diffusers ``UNet2DModel`` from dtrak's ``cifar`` / ``celeba`` presets
(the SPEC configs). ArtBench-2: the Stable Diffusion 1.x ``UNet2DConditionModel`` config
(written inline, random init, no download) at the 32 x 32 latent of 256 px, with peft LoRA
rank 128 on to_q/to_k/to_v/to_out.0 (only LoRA trains), random text embeddings [B, 77, 768];
the VAE encode and the CLIP text encoder are left out (they are frozen, so their outputs
can be cached once per image), and it runs in fp32 (the paper trains in fp16 on a GPU).

Usage:
    python benchmarks/lds_cost_model.py [--steps 3] [--max-seconds 120] [--threads 2]
        [--only cifar,celeba,sd]
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Ray costs measured by benchmarks/ray_overhead.py on this machine.
RAY_JOB_OVERHEAD_S = 0.005
RAY_START_S = 14.0
WORKERS = (1, 8, 64)

# Standard Stable Diffusion 1.x UNet (v1.4 / v1.5 share it), sample_size for 256 px.
SD_UNET_CONFIG = dict(
    sample_size=32,
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
)
LORA_RANK = 128


@dataclass(frozen=True)
class Model:
    key: str
    description: str
    measure_batch: int


MODELS = {
    "cifar": Model("cifar", "UNet2DModel, SPEC CIFAR config, 32x32x3", 4),
    "celeba": Model("celeba", "UNet2DModel, SPEC CelebA config, 64x64x3", 1),
    "sd": Model("sd", f"SD 1.x UNet2DConditionModel + LoRA r{LORA_RANK}, latent 32x32x4", 1),
}


@dataclass(frozen=True)
class DataSet:
    name: str
    n_train: int
    model: str
    epochs: int
    batch: int
    subsets: int = 64
    seeds: int = 3
    alpha: float = 0.5


# SPEC sections 2, 3, 5, 8.1.
DATASETS = (
    DataSet("CIFAR-2", 5000, "cifar", 200, 128),
    DataSet("CIFAR-10", 50000, "cifar", 200, 128),
    DataSet("CelebA", 5000, "celeba", 200, 128),
    DataSet("ArtBench-2", 5000, "sd", 100, 64),
)


def steps_per_model(n: int, epochs: int, batch: int) -> int:
    """Optimizer steps: epochs x ceil(n / batch), as ``dtrak.train.total_steps``."""
    return epochs * math.ceil(n / batch)


def build(key: str) -> tuple[torch.nn.Module, list[torch.nn.Parameter], tuple[int, ...], bool]:
    """The model, its trainable parameters, the shape of one example, and whether it is
    text-conditioned."""
    if key in ("cifar", "celeba"):
        from diffusers import UNet2DModel

        from dtrak.config import ModelConfig
        from dtrak.families.unet2d import unet_kwargs

        res = 32 if key == "cifar" else 64
        torch.manual_seed(0)
        model = UNet2DModel(**unet_kwargs(ModelConfig(preset=key), 3, res))
        return model, list(model.parameters()), (3, res, res), False
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    model = UNet2DConditionModel(**SD_UNET_CONFIG)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK,
                                 init_lora_weights="gaussian",
                                 target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, (4, 32, 32), True


def measure(key: str, batch: int, steps: int, max_seconds: float) -> dict:
    """Seconds per training step at ``batch``: the mean of ``steps`` timed steps after one
    warm-up, fewer (at least one) once the timed steps pass ``max_seconds``."""
    t0 = time.perf_counter()
    model, params, shape, text = build(key)
    build_s = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in params)
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6)
    betas = torch.linspace(1e-4, 0.02, 1000)
    abar = torch.cumprod(1 - betas, 0)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 1):
        x0 = torch.rand((batch, *shape), generator=gen) * 2 - 1
        eps = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        a = abar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        start = time.perf_counter()
        if text:
            cond = torch.randn((batch, 77, 768), generator=gen)
            out = model(xt, t, encoder_hidden_states=cond).sample
        else:
            out = model(xt, t).sample
        loss = F.mse_loss(out, eps)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:
            times.append(time.perf_counter() - start)
            if sum(times) > max_seconds:
                break
    return dict(key=key, batch=batch, s_step=sum(times) / len(times), n=len(times),
                s_min=min(times), s_max=max(times), build_s=build_s, params=n_params,
                trainable=n_train,
                peak_rss_gb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


def hms(seconds: float) -> str:
    """Seconds as a short human duration."""
    h = seconds / 3600
    if h >= 24 * 365:
        return f"{h / (24 * 365):,.1f} y"
    if h >= 48:
        return f"{h / 24:,.1f} d"
    if h >= 1:
        return f"{h:,.1f} h"
    return f"{seconds / 60:,.1f} min"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps after 1 warm-up")
    ap.add_argument("--max-seconds", type=float, default=120,
                    help="stop timing a model after this many timed seconds (>= 1 step)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--only", default="cifar,celeba,sd",
                    help="comma list of models to measure (cifar, celeba, sd)")
    ap.add_argument("--job-overhead", type=float, default=RAY_JOB_OVERHEAD_S)
    ap.add_argument("--ray-start", type=float, default=RAY_START_S)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    wanted = [k for k in args.only.split(",") if k]

    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
          f"torch {torch.__version__}, {args.threads} threads\n")
    measured = {}
    for key in wanted:
        m = MODELS[key]
        r = measure(key, m.measure_batch, args.steps, args.max_seconds)
        measured[key] = r
        print(f"measured {key}: {r['s_step']:.2f} s/step at batch {r['batch']} "
              f"(min {r['s_min']:.2f}, max {r['s_max']:.2f}, {r['n']} timed steps), "
              f"{r['params'] / 1e6:.1f}M params ({r['trainable'] / 1e6:.2f}M trained), "
              f"build {r['build_s']:.1f} s, peak RSS so far {r['peak_rss_gb']:.1f} GB",
              flush=True)
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    print("| model | params (trained) | measured batch | timed steps | s/step measured | "
          "s/example |")
    print("|---|---|---|---|---|---|")
    for key, r in measured.items():
        print(f"| {MODELS[key].description} | {r['params'] / 1e6:.1f}M "
              f"({r['trainable'] / 1e6:.2f}M) | {r['batch']} | {r['n']} | {r['s_step']:.2f} | "
              f"{r['s_step'] / r['batch']:.3f} |")
    print()

    head = ["data set", "N train / subset", "model", "batch", "models (M x seeds)",
            "steps / model", "s/step (paper batch)", "machine-h (all models)",
            "+ full model"] + [f"wall, N = {n}" for n in WORKERS]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for d in DATASETS:
        if d.model not in measured:
            continue
        r = measured[d.model]
        s_step = r["s_step"] / r["batch"] * d.batch
        n_sub = int(d.n_train * d.alpha)
        steps = steps_per_model(n_sub, d.epochs, d.batch)
        full_steps = steps_per_model(d.n_train, d.epochs, d.batch)
        models = d.subsets * d.seeds
        total_h = models * steps * s_step / 3600
        full_h = full_steps * s_step / 3600
        walls = [math.ceil(models / n) * steps * s_step + models * args.job_overhead
                 + args.ray_start for n in WORKERS]
        row = [d.name, f"{d.n_train:,} / {n_sub:,}", d.model, str(d.batch),
               f"{d.subsets} x {d.seeds} = {models}", f"{steps:,}", f"{s_step:.1f}",
               f"{total_h:,.0f}", f"{full_h:,.0f} h"] + [hms(w) for w in walls]
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
