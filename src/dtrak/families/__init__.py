"""Model families: each kind of diffusion model is one module and one registration line.

=========  ==================================================================
family     models
=========  ==================================================================
unet2d     pixel-space diffusers ``UNet2DModel`` (the paper's CIFAR / CelebA)
sd-lora    Stable Diffusion + peft LoRA (the paper's ArtBench), or a whole text UNet
=========  ==================================================================

To add one: write a module with a :class:`~dtrak.families.base.ModelFamily` subclass and
register an instance below; ``model.family = "<name>"`` then selects it in every stage.
"""

from __future__ import annotations

from .base import (
    FAMILIES,
    Cond,
    DiffusionAdapter,
    ModelFamily,
    count_parameters,
    get_family,
    load_scheduler,
    register_family,
)
from .sd_lora import CaptionedImages, EncodedExamples, SDLoRAFamily, TextToImageAdapter
from .unet2d import LabelledImages, UNet2DAdapter, UNet2DFamily

__all__ = [
    "FAMILIES",
    "CaptionedImages",
    "Cond",
    "EncodedExamples",
    "DiffusionAdapter",
    "LabelledImages",
    "ModelFamily",
    "TextToImageAdapter",
    "UNet2DAdapter",
    "count_parameters",
    "get_family",
    "load_scheduler",
    "register_family",
]

register_family(UNet2DFamily())
register_family(SDLoRAFamily())
