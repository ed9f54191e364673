"""The ``unet2d`` family: pixel-space diffusers ``UNet2DModel``s, the paper's CIFAR/CelebA arm.

Models are diffusers ``UNet2DModel`` with a ``DDPMScheduler`` (by default linear betas
1e-4 .. 0.02, T = 1000, epsilon prediction; ``model.beta_schedule``,
``model.num_train_timesteps`` and ``model.prediction_type`` choose others). A model directory
is what ``save_pretrained`` writes (``config.json`` + ``diffusion_pytorch_model.safetensors``),
so any diffusers user can load it, and any diffusers UNet2DModel directory can be attributed
with its own scheduler (:meth:`~dtrak.families.base.ModelFamily.load_scheduler`). A raw
example is an image tensor in [-1, 1], or :class:`LabelledImages` for a class-conditional
UNet, which takes ``{"class_labels": LongTensor[B]}`` as conditioning.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from safetensors import SafetensorError
from torch.func import functional_call

from ..artefacts import DamagedArtefactError, as_os_error
from ..config import PREDICTION_TYPES, ConfigError, ModelConfig, SamplingConfig
from ..sampling import SampleBatch, sample_loop
from .base import Cond, ModelFamily

log = logging.getLogger(__name__)

__all__ = [
    "LabelledImages",
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
    """The training (DDPM) or sampling (DDIM) scheduler of the config's noise schedule."""
    common = dict(
        num_train_timesteps=cfg.num_train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule=cfg.beta_schedule,
        prediction_type=cfg.prediction_type,
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
    try:
        model.save_pretrained(str(directory), safe_serialization=True)
    except SafetensorError as e:  # a full disk: raised as the OSError it is
        raise as_os_error(e, directory) from e


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


@dataclass(frozen=True, eq=False)
class LabelledImages:
    """Images ``[N, C, H, W]`` in ``[-1, 1]`` with class labels ``[N]``: the examples of a
    class-conditional UNet. Indexing gives ``{"images": [B, C, H, W], "class_labels": [B]}``,
    which :meth:`UNet2DAdapter.prepare` turns into images and ``{"class_labels": ...}``."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        labels = torch.as_tensor(self.labels, dtype=torch.long)
        if labels.shape != (self.images.shape[0],):
            raise ValueError(f"LabelledImages needs one label per image: {tuple(labels.shape)} "
                             f"labels for {self.images.shape[0]} images")
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index) -> dict[str, torch.Tensor]:
        return {"images": self.images[index], "class_labels": self.labels[index]}


def _abar_shaped(sched: Any, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``abar_t`` broadcastable against ``like [n, C, H, W]`` (vmap-safe indexing)."""
    abar = sched.alphas_cumprod.to(device=like.device)[t].to(like.dtype)
    return abar.reshape(*abar.shape, *([1] * (like.dim() - abar.dim())))


class UNet2DAdapter:
    """A pixel-space diffusers ``UNet2DModel`` bound for the engine.

    ``prepare(batch)`` takes images ``[B, C, H, W]`` in ``[-1, 1]`` (or ``[B, K, C, H, W]``,
    one clean image per timestep, for Journey TRAK) and returns them with an empty
    conditioning dict; a class-conditional UNet takes a dict ``{"images": ...,
    "class_labels": LongTensor[B]}`` (a batch of :class:`LabelledImages`) and gets
    ``{"class_labels": ...}`` as conditioning.

    ``eps`` and ``predict`` always return the model's *epsilon* (noise) prediction, so every
    output function is the one of the epsilon parameterisation, whatever the model predicts
    (``prediction_type``, as in its diffusers scheduler config), with
    ``a = sqrt(abar_t)``, ``s = sqrt(1 - abar_t)``:

    - ``epsilon``: the output as it is;
    - ``v_prediction`` (``v = a eps - s x0``): ``eps = a v + s x_t``;
    - ``sample`` (the model predicts ``x0``): ``eps = (x_t - a x0_hat) / s``.

    The last two need the noise schedule: ``sched`` is anything with an ``alphas_cumprod``
    tensor ``[T]`` (:class:`~dtrak.noise.ScheduleConstants`, a diffusers scheduler).
    """

    def __init__(self, model: torch.nn.Module, prediction_type: str = "epsilon",
                 sched: Any = None) -> None:
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction type {prediction_type!r}; dtrak attributes "
                             f"models that predict one of {', '.join(PREDICTION_TYPES)}")
        if prediction_type != "epsilon" and not isinstance(
                getattr(sched, "alphas_cumprod", None), torch.Tensor):
            raise ValueError(f"a {prediction_type} model needs its noise schedule to give its "
                             "epsilon prediction: pass sched= (ScheduleConstants or a diffusers "
                             "scheduler)")
        self.module = model
        self.prediction_type = prediction_type
        self.sched = sched

    def prepare(self, batch: torch.Tensor | dict) -> tuple[torch.Tensor, Cond]:
        if isinstance(batch, dict) and "images" in batch:
            images, _ = self.prepare(batch["images"])
            return images, {k: v for k, v in batch.items() if k != "images"}
        if not isinstance(batch, torch.Tensor) or batch.dim() not in (4, 5):
            raise ValueError(
                "UNet2DAdapter.prepare expects an image tensor [B, C, H, W] in [-1, 1] (or a "
                "dict with images and class_labels), got "
                f"{type(batch).__name__} {tuple(getattr(batch, 'shape', ()))}"
            )
        return batch, {}

    def to_eps(self, out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The epsilon prediction from the model's raw output (see the class docstring)."""
        if self.prediction_type == "epsilon":
            return out
        abar = _abar_shaped(self.sched, t, out)
        if self.prediction_type == "v_prediction":
            return abar.sqrt() * out + (1.0 - abar).sqrt() * x_t
        return (x_t - abar.sqrt() * out) / (1.0 - abar).sqrt()

    def eps(self, params_and_buffers: dict[str, torch.Tensor], x_t: torch.Tensor,
            t: torch.Tensor, cond: Cond) -> torch.Tensor:
        kwargs = {**cond, "return_dict": False}
        out = functional_call(self.module, params_and_buffers, (x_t, t), kwargs)[0]
        return self.to_eps(out, x_t, t)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        return self.to_eps(self.module(x_t, t, **cond).sample, x_t, t)

    def attributed_parameters(self) -> list[str] | None:
        return None  # every trainable parameter


class UNet2DFamily(ModelFamily):
    name = "unet2d"
    description = "pixel-space diffusers UNet2DModel (epsilon, v or x0 prediction)"

    def build(self, cfg: ModelConfig, example_shape: Sequence[int], seed: int | None = None
              ) -> UNet2DModel:
        return build_unet(cfg, int(example_shape[0]), int(example_shape[-1]), seed=seed)

    def load(self, directory: str | Path) -> UNet2DModel:
        return load_unet(directory)

    def save(self, model: torch.nn.Module, directory: str | Path) -> None:
        save_unet(model, directory)

    def scheduler(self, cfg: ModelConfig, kind: str = "ddpm"):
        return build_scheduler(cfg, kind)

    def adapter(self, model: torch.nn.Module, prediction_type: str = "epsilon",
                sched: Any = None) -> UNet2DAdapter:
        return UNet2DAdapter(model, prediction_type, sched)

    def conditioning(self, model: torch.nn.Module) -> str | None:
        c = model.config
        if c.class_embed_type == "identity":
            raise ValueError("this UNet2DModel is conditioned on embedding vectors "
                             "(class_embed_type='identity'); dtrak conditions on class labels "
                             "only (num_class_embeds or class_embed_type='timestep')")
        labelled = c.num_class_embeds is not None or c.class_embed_type is not None
        return "class_labels" if labelled else None

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
