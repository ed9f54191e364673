"""The model-family interface: everything the stages and the engine ask of a kind of model.

A family says how to build, load and save a model, which scheduler defines its noise levels,
how a raw batch of examples becomes ``(x0, conditioning)``, how to predict noise (plainly for
training and sampling, functionally for per-sample gradients), which parameters are
attributed, the training loss of a batch, and how to sample. Every stage reaches models only
through a family; adding a family is one module and one :func:`register_family` line in
:mod:`dtrak.families`.

The engine talks to a model through a :class:`DiffusionAdapter`, the family's model bound to
one module (``family.adapter(model, prediction_type, sched)``); whatever the model predicts,
the adapter's ``eps`` is its noise (epsilon) prediction.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from diffusers import DDPMScheduler

from ..config import ConfigError, ModelConfig, SamplingConfig
from ..sampling import SampleBatch

__all__ = [
    "Cond",
    "DiffusionAdapter",
    "FAMILIES",
    "ModelFamily",
    "count_parameters",
    "get_family",
    "load_scheduler",
    "register_family",
]

Cond = dict[str, torch.Tensor]


@runtime_checkable
class DiffusionAdapter(Protocol):
    """How the gradient engine, training and sampling talk to one noise-prediction model.

    Attributes:
        module: the ``torch.nn.Module`` whose parameters are differentiated.
    """

    module: torch.nn.Module

    def prepare(self, batch: Any) -> tuple[torch.Tensor, Cond]:
        """Raw batch -> (clean samples ``x0 [B, C, H, W]``, conditioning ``{name: [B, ...]}``).

        E.g. VAE-encode images to latents and encode prompts for a latent text-to-image model.
        """
        ...

    def eps(self, params_and_buffers: dict[str, torch.Tensor], x_t: torch.Tensor,
            t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Functional noise prediction ``[n, C, H, W]`` from ``x_t [n, C, H, W]``, ``t [n]``.

        Must run ``module`` through ``torch.func.functional_call`` with
        ``params_and_buffers``; ``cond`` tensors have leading dim ``n``. A model that
        predicts something else (v, x0) is converted here to its epsilon prediction, so the
        output functions always see the epsilon parameterisation.
        """
        ...

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """Plain (differentiable) noise prediction, as in training and sampling."""
        ...

    def attributed_parameters(self) -> list[str] | None:
        """Names of the parameters whose gradients are the features (None: all trainable)."""
        ...


class ModelFamily(ABC):
    """A kind of diffusion model. Subclasses implement the abstract methods."""

    name: str = ""
    description: str = ""
    takes_text: bool = False  # examples carry captions (a text-conditioned model)

    # --- models on disk
    @abstractmethod
    def build(self, cfg: ModelConfig, example_shape: Sequence[int], seed: int | None = None
              ) -> torch.nn.Module:
        """A freshly initialised model for examples of ``example_shape`` (``[C, H, W]``)."""

    @abstractmethod
    def load(self, directory: str | Path) -> torch.nn.Module:
        """A saved model (eval mode, CPU, float32) from a local directory; never a hub."""

    @abstractmethod
    def save(self, model: torch.nn.Module, directory: str | Path) -> None:
        """Write the model in its library's own open format."""

    # --- noise levels and prediction
    @abstractmethod
    def scheduler(self, cfg: ModelConfig, kind: str = "ddpm"):
        """The training (``ddpm``) or sampling (``ddim``) diffusers scheduler."""

    @abstractmethod
    def adapter(self, model: torch.nn.Module, prediction_type: str = "epsilon",
                sched: Any = None) -> DiffusionAdapter:
        """The model bound for the engine: prepare, predict, functional eps.

        ``prediction_type`` (epsilon, v_prediction, sample) is what the model outputs and
        ``sched`` (anything with ``alphas_cumprod [T]``) the schedule that converts it to
        the epsilon prediction.
        """

    def bind(self, model: torch.nn.Module, prediction_type: str = "epsilon",
             sched: Any = None) -> DiffusionAdapter:
        """``adapter(model, prediction_type, sched)``; an epsilon model is bound as
        ``adapter(model)``, so families written before prediction types keep working."""
        if prediction_type == "epsilon":
            return self.adapter(model)
        return self.adapter(model, prediction_type, sched)

    def load_scheduler(self, directory: str | Path, subfolder: str | None = None):
        """The noise schedule a model was trained with, from a diffusers scheduler folder."""
        return load_scheduler(directory, subfolder)

    def conditioning(self, model: torch.nn.Module) -> str | None:
        """The conditioning the model needs: ``"class_labels"``, or None (unconditional)."""
        return None

    @abstractmethod
    def sample(self, model: torch.nn.Module, cfg: ModelConfig, sampling: SamplingConfig,
               image_ids: Sequence[int], keep_trajectory: bool) -> SampleBatch:
        """Generate images ``image_ids`` (per-image seeds) with the model where it is."""

    @abstractmethod
    def sample_shape(self, model: torch.nn.Module) -> tuple[int, ...]:
        """``(C, H, W)`` of a generated image."""

    # --- training (defaults: epsilon prediction on every trainable parameter)
    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def noise_shape(self, example_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one example's ``x0`` (and of its noise) given its raw shape."""
        return tuple(example_shape)

    def model_noise_shape(self, model: torch.nn.Module, example_shape: Sequence[int]
                          ) -> tuple[int, ...]:
        """Shape of one example's ``x0`` for this model (a latent model's latent shape)."""
        return self.noise_shape(example_shape)

    def examples(self, images: torch.Tensor, labels: Any, class_names: Sequence[str],
                 cfg: ModelConfig, captions: Sequence[str] | None = None) -> Any:
        """The raw examples of images with their labels (default: the images alone)."""
        return images

    def cached_examples(self, examples: Any, cfg: ModelConfig, directory: str | Path,
                        flips: bool = False, device: str | torch.device = "cpu",
                        indices: Sequence[int] | None = None) -> Any:
        """``examples`` (a whole example set) as read from a cache of their encodings in
        ``directory``, written the first time (e.g. a latent model's VAE latents and text
        embeddings), so that no later stage encodes them again; ``device`` encodes them.

        ``flips``: also the encodings of the mirrored images (training with ``train.hflip``).
        ``indices``: ``examples`` are those rows of a set cached before (a farm worker's
        subset), read from the cache without writing it. Default: the examples unchanged
        (nothing to cache).
        """
        return examples

    def generation_prompts(self, class_names: Sequence[str], cfg: ModelConfig, n: int
                           ) -> list[str] | None:
        """The prompts of generated images ``0..n-1`` (None: the family takes no text)."""
        return None

    def training_inputs(self, adapter: DiffusionAdapter, batch: Any, cfg: ModelConfig,
                        generator: torch.Generator) -> tuple[torch.Tensor, Cond]:
        """``(x0, conditioning)`` of a training batch (randomness from ``generator``)."""
        return adapter.prepare(batch)

    def training_loss(self, adapter: DiffusionAdapter, x0: torch.Tensor, cond: Cond,
                      t: torch.Tensor, eps: torch.Tensor, alphas_cumprod: torch.Tensor
                      ) -> torch.Tensor:
        """L_Simple of a batch: ``mean (eps - eps_theta(x_t, t))^2``."""
        a = alphas_cumprod[t].view(-1, *([1] * (x0.dim() - 1)))
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = adapter.predict(x_t, t, cond)
        return torch.nn.functional.mse_loss(pred.float(), eps)

    def describe(self, model: torch.nn.Module) -> dict:
        return {"family": self.name, "parameters": count_parameters(model)}


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if not family.name:
        raise ValueError("a model family needs a name")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES:
        raise ConfigError(f"model.family: unknown {name!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def load_scheduler(directory: str | Path, subfolder: str | None = None) -> DDPMScheduler:
    """A ``DDPMScheduler`` from a local diffusers scheduler folder (``scheduler_config.json``;
    ``subfolder="scheduler"`` in a pipeline folder): its beta schedule, number of timesteps
    and prediction type. Any diffusers scheduler's config is read (DDIM, PNDM, ...): only the
    training noise schedule matters for attribution."""
    folder = Path(directory) / (subfolder or "")
    if not (folder / "scheduler_config.json").is_file():
        raise FileNotFoundError(
            f"no diffusers scheduler at {folder}: expected scheduler_config.json (as "
            "scheduler.save_pretrained(DIR) writes it, or a pipeline folder's scheduler/)")
    try:
        return DDPMScheduler.from_pretrained(str(directory), subfolder=subfolder,
                                             local_files_only=True)
    except (NotImplementedError, ValueError, OSError, TypeError) as e:
        raise ValueError(f"{folder}: cannot build the noise schedule from "
                         f"scheduler_config.json ({str(e).strip()})") from e


def count_parameters(model: torch.nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
