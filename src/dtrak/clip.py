"""CLIP image embeddings from a local model directory (CLIP baselines, counterfactual metric).

The paper's CLIP baselines and its counterfactual "CLIP cosine" use OpenAI's ViT-B/32. dtrak
never downloads: give a directory written by ``save_pretrained``, e.g.::

    from transformers import CLIPModel, CLIPImageProcessor
    CLIPModel.from_pretrained("openai/clip-vit-base-patch32").save_pretrained("clip-b32")
    CLIPImageProcessor.from_pretrained("openai/clip-vit-base-patch32").save_pretrained("clip-b32")

and pass it as ``--set attribution.clip_path=clip-b32``.

Preprocessing matches CLIP's image processor on square images: pixels in [-1, 1] go to
[0, 1], grey images are repeated to 3 channels, the image is resized (bicubic, antialiased)
to the model's ``image_size`` and normalised with the processor's ``image_mean`` /
``image_std`` (OpenAI's values when the directory has no processor config). Embeddings are the
projected image features (``CLIPModel.get_image_features``), not normalised.

Models are cached per directory and embeddings per (directory, tensor object) in memory, so
scoring a target set with both clip-dot and clip-cos embeds it once.
"""

from __future__ import annotations

import logging
import weakref
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

__all__ = ["OPENAI_MEAN", "OPENAI_STD", "clip_cosine", "clip_embed", "load_clip", "preprocess"]

#: OpenAI CLIP's normalisation (used when the model directory has no processor config).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# (resolved path, id(images)) -> (weak reference to the images, embeddings [N, d])
_EMBED_CACHE: dict[tuple[str, int], tuple[weakref.ref, np.ndarray]] = {}


def _resolve(path: str | Path) -> str:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"no CLIP model at {p} (expected config.json and weights written by "
            "save_pretrained); save e.g. openai/clip-vit-base-patch32 there with "
            "CLIPModel.from_pretrained(...).save_pretrained(DIR) on a machine with network"
        )
    return str(p.resolve())


def load_clip(path: str | Path):
    """``(CLIPModel in eval mode, CLIPImageProcessor or None)`` from a local directory.

    The processor is None when the directory has no ``preprocessor_config.json``.
    """
    return _load(_resolve(path))


@lru_cache(maxsize=2)
def _load(path: str):
    try:
        from transformers import CLIPImageProcessor, CLIPModel
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the CLIP baselines need transformers: pip install 'dtrak[clip]'"
        ) from err
    model = CLIPModel.from_pretrained(path, local_files_only=True)
    model.eval()
    processor = None
    if (Path(path) / "preprocessor_config.json").is_file():
        processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    log.info("loaded CLIP from %s (image size %d)", path, model.config.vision_config.image_size)
    return model, processor


def _mean_std(processor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = getattr(processor, "image_mean", None) if processor is not None else None
    std = getattr(processor, "image_std", None) if processor is not None else None
    return tuple(mean or OPENAI_MEAN), tuple(std or OPENAI_STD)


def preprocess(images: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """``[N, C, H, W]`` in [-1, 1] (C = 1 or 3) -> CLIP pixel values ``[N, 3, size, size]``."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(
            f"CLIP needs images [N, C, H, W] with C = 1 or 3 in [-1, 1], got "
            f"{tuple(images.shape)}"
        )
    x = (images.float() + 1) / 2
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s


@torch.no_grad()
def _embed(model, processor, images: torch.Tensor, batch_size: int) -> np.ndarray:
    size = model.config.vision_config.image_size
    mean, std = _mean_std(processor)
    device = next(model.parameters()).device
    out = []
    for lo in range(0, images.shape[0], batch_size):
        pixels = preprocess(images[lo:lo + batch_size], size, mean, std).to(device)
        feats = model.get_image_features(pixel_values=pixels)
        # transformers >= 5 returns a model output whose pooler_output is the projection
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
        out.append(feats.float().cpu())
    return torch.cat(out).numpy()


def clip_embed(images: torch.Tensor | np.ndarray, clip_path: str | Path, batch_size: int = 64
               ) -> np.ndarray:
    """CLIP image embeddings ``[N, C, H, W]`` (in [-1, 1]) -> ``[N, d]`` float32.

    Cached in memory per (model directory, tensor object): pass the same tensor (or array)
    again and the embeddings are reused.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = _resolve(clip_path)
    key = (path, id(images))
    hit = _EMBED_CACHE.get(key)
    if hit is not None and hit[0]() is images and hit[1].shape[0] == images.shape[0]:
        return hit[1]
    model, processor = _load(path)
    pixels = images if isinstance(images, torch.Tensor) else torch.as_tensor(np.asarray(images))
    emb = _embed(model, processor, pixels, batch_size)
    try:
        ref = weakref.ref(images)
    except TypeError:  # not weak-referenceable: do not cache
        return emb
    # drop entries whose tensor is gone, so ids reused by new tensors never hit
    for k in [k for k, (r, _) in _EMBED_CACHE.items() if r() is None]:
        del _EMBED_CACHE[k]
    _EMBED_CACHE[key] = (ref, emb)
    return emb


def clip_cosine(a_images: torch.Tensor | np.ndarray, b_images: torch.Tensor | np.ndarray,
                clip_path: str | Path, batch_size: int = 64) -> np.ndarray:
    """Row-wise cosine similarity of CLIP embeddings: ``[N, C, H, W] x 2 -> [N]`` float32."""
    if a_images.shape[0] != b_images.shape[0]:
        raise ValueError(
            f"clip_cosine compares images pairwise: got {a_images.shape[0]} and "
            f"{b_images.shape[0]} images"
        )
    a = clip_embed(a_images, clip_path, batch_size).astype(np.float64)
    b = clip_embed(b_images, clip_path, batch_size).astype(np.float64)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (np.sum(a * b, axis=1) / np.where(denom == 0, 1.0, denom)).astype(np.float32)
