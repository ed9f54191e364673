"""Generation with per-image seeds: DDIM (eta 0, 50 steps, the paper's) or DDPM.

Image i starts from noise drawn by a generator seeded with ``1000 * gen_seed + i``, and any
noise a stochastic sampler adds at a step comes from that image's own generator, so each
image is the same whatever the batch size or which other images share its batch.

The predicted clean image x0_hat at every step can be kept: Journey TRAK re-noises it to
that step's timestep to build a target's features along its sampling trajectory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from diffusers import UNet2DModel

from .config import ModelConfig, SamplingConfig
from .model import build_scheduler

log = logging.getLogger(__name__)

__all__ = ["SampleBatch", "image_seed", "sample_images"]


@dataclass(frozen=True)
class SampleBatch:
    images: torch.Tensor  # [B, C, H, W] in [-1, 1] (clamped)
    trajectory: torch.Tensor | None  # [B, S, C, H, W] predicted x0 at every step
    timesteps: torch.Tensor  # [S] the sampler's timesteps, in sampling order


def image_seed(gen_seed: int, i: int) -> int:
    """The seed of generated image ``i`` (paper: 1000 * gen_seed + i)."""
    return 1000 * gen_seed + i


@torch.no_grad()
def sample_images(
    model: UNet2DModel,
    model_cfg: ModelConfig,
    cfg: SamplingConfig,
    image_ids: list[int] | range,
    keep_trajectory: bool | None = None,
) -> SampleBatch:
    """Generate the images with ids ``image_ids`` in one batch.

    Returns images clamped to [-1, 1]; ``trajectory`` holds x0_hat per step (unclamped)
    when ``keep_trajectory`` (default ``cfg.save_trajectory``).
    """
    keep = cfg.save_trajectory if keep_trajectory is None else keep_trajectory
    device = next(model.parameters()).device
    model.eval()
    sched = build_scheduler(model_cfg, cfg.sampler)
    sched.set_timesteps(cfg.steps)
    c, s = model.config.in_channels, model.config.sample_size
    gens = [torch.Generator().manual_seed(image_seed(cfg.gen_seed, i)) for i in image_ids]
    x = torch.stack([torch.randn(c, s, s, generator=g) for g in gens]).to(device)
    x = x * sched.init_noise_sigma
    traj = []
    extra = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    for t in sched.timesteps:
        eps = model(x, t.to(device)).sample
        out = sched.step(eps, t, x, generator=gens, **extra)
        x = out.prev_sample
        if keep:
            traj.append(out.pred_original_sample.float().cpu())
    images = x.clamp(-1, 1).float().cpu()
    trajectory = torch.stack(traj, dim=1) if keep else None
    return SampleBatch(images, trajectory, sched.timesteps.clone())
