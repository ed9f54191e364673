"""The sampling loop with per-image seeds: DDIM (eta 0, 50 steps, the paper's) or DDPM.

Image i starts from noise drawn by a generator seeded with ``1000 * gen_seed + i``, and any
noise a stochastic sampler adds at a step comes from that image's own generator, so each
image is the same whatever the batch size or which other images share its batch. The
generators are CPU generators whatever the device, so the seeds mean the same everywhere.

The predicted clean image x0_hat at every step can be kept: Journey TRAK re-noises it to
that step's timestep to build a target's features along its sampling trajectory.

The loop knows nothing of model classes: a model family (:mod:`dtrak.families`) hands it
a noise-prediction function and its scheduler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .config import SamplingConfig

log = logging.getLogger(__name__)

__all__ = ["SampleBatch", "image_seed", "sample_loop"]

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> eps


@dataclass(frozen=True)
class SampleBatch:
    images: torch.Tensor  # [B, C, H, W] in [-1, 1] (clamped)
    trajectory: torch.Tensor | None  # [B, S, C, H, W] predicted x0 at every step
    timesteps: torch.Tensor  # [S] the sampler's timesteps, in sampling order


def image_seed(gen_seed: int, i: int) -> int:
    """The seed of generated image ``i`` (paper: 1000 * gen_seed + i)."""
    return 1000 * gen_seed + i


@torch.no_grad()
def sample_loop(
    predict: Predict,
    scheduler,
    shape: Sequence[int],
    cfg: SamplingConfig,
    image_ids: Sequence[int],
    keep_trajectory: bool,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    clamp: bool = True,
) -> SampleBatch:
    """Generate the images with ids ``image_ids`` ([C, H, W] each) in one batch.

    ``scheduler`` is a diffusers scheduler (DDIM or DDPM); its timesteps are set to
    ``cfg.steps``. Returns images clamped to [-1, 1] on the CPU in float32; ``trajectory``
    holds x0_hat per step (unclamped) when ``keep_trajectory``. ``clamp=False`` leaves the
    result unclamped (latents, which a VAE then decodes).
    """
    scheduler.set_timesteps(cfg.steps)
    gens = [torch.Generator().manual_seed(image_seed(cfg.gen_seed, i)) for i in image_ids]
    x = torch.stack([torch.randn(*shape, generator=g) for g in gens]).to(device, dtype)
    x = x * scheduler.init_noise_sigma
    traj = []
    extra = {"eta": cfg.eta} if cfg.sampler == "ddim" else {}
    for t in scheduler.timesteps:
        eps = predict(x, t.to(device))
        out = scheduler.step(eps, t, x, generator=gens, **extra)
        x = out.prev_sample
        if keep_trajectory:
            traj.append(out.pred_original_sample.float().cpu())
    images = (x.clamp(-1, 1) if clamp else x).float().cpu()
    trajectory = torch.stack(traj, dim=1) if keep_trajectory else None
    return SampleBatch(images, trajectory, scheduler.timesteps.clone())
