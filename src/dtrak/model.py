"""UNet and noise-schedule presets; load and save in diffusers' own format.

Models are diffusers ``UNet2DModel`` (epsilon prediction) with a ``DDPMScheduler``
(linear betas 1e-4 .. 0.02, T = 1000). A model directory is what ``save_pretrained``
writes (``config.json`` + ``diffusion_pytorch_model.safetensors``), so any diffusers user
can load it, and any diffusers UNet2DModel directory can be attributed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from .config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

__all__ = [
    "UNET_PRESETS",
    "build_scheduler",
    "build_unet",
    "count_parameters",
    "load_unet",
    "save_unet",
    "unet_kwargs",
]

# name -> (block_out_channels, layers_per_block, attention levels, norm groups)
# Level 0 is the highest resolution. The paper's CIFAR model puts attention in the 16x16
# down block (level 1) and its mirror; CelebA at the 5th level.
UNET_PRESETS: dict[str, tuple[tuple[int, ...], int, tuple[int, ...], int]] = {
    "tiny": ((8, 16), 1, (1,), 4),
    "digits": ((16, 32), 1, (1,), 8),
    "cifar-cpu": ((32, 64, 64), 1, (1,), 8),
    "cifar": ((128, 256, 256, 256), 2, (1,), 32),
    "celeba": ((128, 128, 256, 256, 512, 512), 2, (4,), 32),
}


def unet_kwargs(cfg: ModelConfig, channels: int, resolution: int) -> dict:
    """Keyword arguments of ``UNet2DModel`` for a preset plus the config's overrides."""
    if cfg.preset not in UNET_PRESETS:
        raise ConfigError(
            f"model.preset: unknown {cfg.preset!r}; choose one of {', '.join(UNET_PRESETS)}"
        )
    chans, layers, attn, groups = UNET_PRESETS[cfg.preset]
    chans = tuple(cfg.block_out_channels or chans)
    layers = cfg.layers_per_block or layers
    attn = tuple(cfg.attention_levels if cfg.attention_levels is not None else attn)
    levels = len(chans)
    if resolution % (2 ** (levels - 1)) != 0:
        raise ConfigError(
            f"model: {levels} resolution levels need an image side divisible by "
            f"{2 ** (levels - 1)}, got {resolution}; change data.resolution or the channels"
        )
    if any(c % groups for c in chans):
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in chans))
    bad = [a for a in attn if not 0 <= a < levels]
    if bad:
        raise ConfigError(f"model.attention_levels {bad} outside 0..{levels - 1}")
    down = tuple("AttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels))
    up = tuple(reversed(["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in range(levels)]))
    return dict(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=layers,
        block_out_channels=chans,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=groups,
        attention_head_dim=None,  # one head per attention block, as in the paper
        dropout=cfg.dropout,
        resnet_time_scale_shift="scale_shift",
    )


def build_unet(cfg: ModelConfig, channels: int, resolution: int, seed: int | None = None
               ) -> UNet2DModel:
    """A freshly initialised UNet; ``seed`` makes the initialisation reproducible."""
    kwargs = unet_kwargs(cfg, channels, resolution)
    if seed is not None:
        # Initialisers draw from the global generator; fork it so the caller's stream
        # is left untouched and the weights depend on ``seed`` alone.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return UNet2DModel(**kwargs)
    return UNet2DModel(**kwargs)


def build_scheduler(cfg: ModelConfig, kind: str = "ddpm") -> DDPMScheduler | DDIMScheduler:
    """The training (DDPM) or sampling (DDIM) scheduler of the linear schedule."""
    common = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="linear",
        # diffusers' default and the DDPM CIFAR pipelines': clip the predicted x0 to [-1, 1]
        # at each sampling step (training never uses it). Without it, an undertrained model
        # sends a few samples off into saturated noise.
        clip_sample=True,
    )
    if kind == "ddpm":
        return DDPMScheduler(**common)
    if kind == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True)
    raise ConfigError(f"scheduler kind must be ddpm or ddim, got {kind!r}")


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def save_unet(model: UNet2DModel, directory: str | Path) -> None:
    """Write ``config.json`` and ``diffusion_pytorch_model.safetensors``."""
    model.save_pretrained(str(directory), safe_serialization=True)


def load_unet(directory: str | Path) -> UNet2DModel:
    """Load a diffusers UNet2DModel from a local directory (never from a hub)."""
    path = Path(directory)
    if not (path / "config.json").exists():
        raise FileNotFoundError(
            f"no diffusers model at {path}: expected config.json and "
            "diffusion_pytorch_model.safetensors (train one with `dtrak train`)"
        )
    model = UNet2DModel.from_pretrained(str(path), local_files_only=True)
    model.eval()
    return model
