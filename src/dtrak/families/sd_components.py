"""Small Stable Diffusion components built offline: a CLIP tokenizer, text encoder, VAE, UNet.

Used for the text-conditioned CPU experiments (a small base model trained from scratch in
pixel space, then LoRA fine-tunes of it) and for tests. Nothing is downloaded: the
tokenizer is a byte-level CLIP tokenizer whose vocabulary is the 256 byte symbols (and their
end-of-word forms) with no merges, written as ``vocab.json`` + ``merges.txt``; the models are
randomly initialised from small configs (the sizes diffusers' own tests use).

:func:`write_pipeline` writes a folder laid out as ``StableDiffusionPipeline.save_pretrained``
writes one (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``); ``model.pretrained`` of the ``sd-lora`` family reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

__all__ = [
    "TINY_UNET",
    "TINY_VAE",
    "tiny_text_encoder",
    "tiny_unet",
    "tiny_vae",
    "write_model_index",
    "write_pipeline",
    "write_tokenizer",
]

#: A UNet2DConditionModel of diffusers' tests (cross-attention dim 32).
TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4,
    out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
    norm_num_groups=32, attention_head_dim=8)

#: An AutoencoderKL of diffusers' tests (4 latent channels, one downsampling: factor 2).
TINY_VAE = dict(
    block_out_channels=(32, 64), in_channels=3, out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4,
    norm_num_groups=32)


def _bytes_to_unicode() -> list[str]:
    """The 256 printable symbols byte-level BPE uses for the bytes (GPT-2's table)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
          + list(range(ord("®"), ord("ÿ") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs, strict=True))]


def write_tokenizer(directory: str | Path, max_length: int = 77) -> CLIPTokenizer:
    """A character-level CLIP tokenizer in ``directory`` (514 tokens, no merges)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                        model_max_length=max_length)
    tok.save_pretrained(str(directory))
    return tok


def tiny_text_encoder(vocab_size: int = 514, hidden_size: int = 32, layers: int = 2,
                      max_length: int = 77, seed: int = 0) -> CLIPTextModel:
    """A randomly initialised CLIP text encoder (diffusers' test sizes)."""
    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1,
        hidden_size=hidden_size, intermediate_size=37, layer_norm_eps=1e-5,
        num_attention_heads=4, num_hidden_layers=layers, vocab_size=vocab_size,
        max_position_embeddings=max_length)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(config).eval()


def tiny_unet(seed: int = 0, **changes) -> UNet2DConditionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**{**TINY_UNET, **changes})


def tiny_vae(seed: int = 0, **changes) -> AutoencoderKL:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(**{**TINY_VAE, **changes})


def write_model_index(directory: str | Path, has_unet: bool = True,
                      has_vae: bool = True) -> None:
    """``model_index.json`` of a StableDiffusionPipeline folder (no safety checker)."""
    index = {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None], "requires_safety_checker": False,
        "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"] if has_unet else [None, None],
        "vae": ["diffusers", "AutoencoderKL"] if has_vae else [None, None],
    }
    Path(directory, "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_pipeline(directory: str | Path, unet: UNet2DConditionModel | None = None,
                   vae: AutoencoderKL | None = None, text_encoder: CLIPTextModel | None = None,
                   tokenizer: CLIPTokenizer | None = None,
                   scheduler: DDPMScheduler | None = None) -> Path:
    """A Stable Diffusion pipeline folder; missing text parts are the tiny random ones.

    ``unet`` or ``vae`` None leaves that subfolder out (a text-encoder-only base for a UNet
    trained from scratch; a pixel-space model without a VAE).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = write_tokenizer(directory / "tokenizer")
    else:
        tokenizer.save_pretrained(str(directory / "tokenizer"))
    text_encoder = text_encoder if text_encoder is not None else tiny_text_encoder(
        vocab_size=len(tokenizer))
    text_encoder.save_pretrained(str(directory / "text_encoder"))
    scheduler = scheduler or DDPMScheduler(beta_start=0.00085, beta_end=0.012,
                                           beta_schedule="scaled_linear", clip_sample=False)
    scheduler.save_pretrained(str(directory / "scheduler"))
    if unet is not None:
        unet.save_pretrained(str(directory / "unet"))
    if vae is not None:
        vae.save_pretrained(str(directory / "vae"))
    write_model_index(directory, unet is not None, vae is not None)
    return directory
