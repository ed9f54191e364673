"""The ``unet2d`` family: pixel-space diffusers ``UNet2DModel``s, the paper's CIFAR/CelebA arm.

Models are diffusers ``UNet2DModel`` (epsilon prediction) with a ``DDPMScheduler``
(linear betas 1e-4 .. 0.02, T = 1000). A model directory is what ``save_pretrained``
writes (``config.json`` + ``diffusion_pytorch_model.safetensors``), so any diffusers user
can load it, and any diffusers UNet2DModel directory can be attributed. A raw example is an
image tensor in [-1, 1]; a class-conditional UNet takes ``{"class_labels": [B]}`` as
conditioning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from torch.func import functional_call

from ..artefacts import DamagedArtefactError
from ..config import ConfigError, ModelConfig, SamplingConfig
from ..sampling import SampleBatch, sample_loop
from .base import Cond, ModelFamily

log = logging.getLogger(__name__)

__all__ = [
    "UNET_PRESETS",
    "UNet2DAdapter",
    "UNet2DFamily",
    "build_scheduler",
    "build_unet",
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
    try:
        model = UNet2DModel.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise DamagedArtefactError(
            f"{path}: cannot load the model ({str(e).strip()}); its weights are damaged or "
            "truncated: delete the folder and train it again") from e
    model.eval()
    return model


class UNet2DAdapter:
    """A pixel-space diffusers ``UNet2DModel`` bound for the engine.

    ``prepare(batch)`` takes images ``[B, C, H, W]`` in ``[-1, 1]`` (or ``[B, K, C, H, W]``,
    one clean image per timestep, for Journey TRAK) and returns them with an empty
    conditioning dict; pass ``{"class_labels": LongTensor[B]}`` as ``cond`` for a
    class-conditional UNet.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.module = model

    def prepare(self, batch: torch.Tensor) -> tuple[torch.Tensor, Cond]:
        if not isinstance(batch, torch.Tensor) or batch.dim() not in (4, 5):
            raise ValueError(
                "UNet2DAdapter.prepare expects an image tensor [B, C, H, W] in [-1, 1], got "
                f"{type(batch).__name__} {tuple(getattr(batch, 'shape', ()))}"
            )
        return batch, {}

    def eps(self, params_and_buffers: dict[str, torch.Tensor], x_t: torch.Tensor,
            t: torch.Tensor, cond: Cond) -> torch.Tensor:
        kwargs = {**cond, "return_dict": False}
        return functional_call(self.module, params_and_buffers, (x_t, t), kwargs)[0]

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.module(x_t, t, **cond).sample

    def attributed_parameters(self) -> list[str] | None:
        return None  # every trainable parameter


class UNet2DFamily(ModelFamily):
    name = "unet2d"
    description = "pixel-space diffusers UNet2DModel, epsilon prediction, linear betas"

    def build(self, cfg: ModelConfig, example_shape: Sequence[int], seed: int | None = None
              ) -> UNet2DModel:
        return build_unet(cfg, int(example_shape[0]), int(example_shape[-1]), seed=seed)

    def load(self, directory: str | Path) -> UNet2DModel:
        return load_unet(directory)

    def save(self, model: torch.nn.Module, directory: str | Path) -> None:
        save_unet(model, directory)

    def scheduler(self, cfg: ModelConfig, kind: str = "ddpm"):
        return build_scheduler(cfg, kind)

    def adapter(self, model: torch.nn.Module) -> UNet2DAdapter:
        return UNet2DAdapter(model)

    def sample_shape(self, model: torch.nn.Module) -> tuple[int, ...]:
        s = model.config.sample_size
        return (model.config.in_channels, s, s)

    def sample(self, model: torch.nn.Module, cfg: ModelConfig, sampling: SamplingConfig,
               image_ids: Sequence[int], keep_trajectory: bool) -> SampleBatch:
        p = next(model.parameters())
        model.eval()
        return sample_loop(lambda x, t: model(x, t).sample, build_scheduler(cfg, sampling.sampler),
                           self.sample_shape(model), sampling, list(image_ids), keep_trajectory,
                           p.device, p.dtype)
