"""The ``sd-lora`` family: Stable Diffusion (or any text-conditioned diffusers UNet) + LoRA.

A model is a :class:`TextToImage`: a ``UNet2DConditionModel``, a frozen CLIP text encoder
and tokenizer, and a frozen ``AutoencoderKL`` (or none: the model then works in pixel space,
latents = images). The base comes from ``model.pretrained``, a local folder laid out as
``StableDiffusionPipeline.save_pretrained`` writes it (``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``); nothing is downloaded.

Two kinds of training, both configs of this family:

- ``model.lora_rank = r`` (> 0): a peft LoRA adapter (``unet.add_adapter``) on
  ``model.lora_targets`` of the pretrained UNet; only the adapter trains and is attributed.
  A saved model is the adapter alone (``pytorch_lora_weights.safetensors``, keys prefixed
  ``unet.`` as diffusers' ``save_lora_weights`` writes them, so ``pipe.load_lora_weights``
  reads it) plus ``dtrak_lora.json`` naming the base folder and the LoRA settings.
- ``model.lora_rank = 0``: every UNet parameter trains (the pretrained UNet, or one built
  from ``model.preset`` when the base folder has no ``unet/``). A saved model is a whole
  pipeline folder, which a LoRA run then names as its ``model.pretrained``.

A raw example is :class:`CaptionedImages` (images in [-1, 1] with one caption each); the
adapter encodes images to latents (``latent_dist.mode()`` times the VAE's scaling factor;
training draws ``latent_dist.sample()``) and captions to ``encoder_hidden_states``
(memoised per caption). :class:`EncodedExamples` holds both already encoded: a run encodes
each of its sets once into ``RUN/cache/<set>/`` (:func:`encode_cached`, the family's
``cached_examples``), and featurization, scoring, ground truth and training (from the
cached posterior mean and std) read them there.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.func import functional_call
from transformers import CLIPTextModel, CLIPTokenizer

from ..artefacts import (
    DamagedArtefactError,
    as_os_error,
    digest,
    load_npy,
    open_npy,
    save_json,
    save_npy,
)
from ..config import ConfigError, ModelConfig, SamplingConfig
from ..sampling import SampleBatch, sample_loop
from .base import Cond, ModelFamily, load_scheduler
from .sd_components import write_model_index
from .unet2d import UNet2DAdapter, build_scheduler

log = logging.getLogger(__name__)

__all__ = [
    "CaptionedImages",
    "EncodedExamples",
    "LORA_FILE",
    "LORA_META",
    "SDLoRAFamily",
    "TEXT_UNET_PRESETS",
    "TextToImage",
    "TextToImageAdapter",
    "caption_of",
    "class_captions",
    "encode_cached",
    "load_base",
    "load_lora",
]

LORA_FILE = "pytorch_lora_weights.safetensors"
LORA_META = "dtrak_lora.json"

# UNet2DConditionModel built from scratch (model.lora_rank = 0 without a pretrained unet/):
# name -> (block_out_channels, layers_per_block, cross-attention levels, norm groups)
TEXT_UNET_PRESETS: dict[str, tuple[tuple[int, ...], int, tuple[int, ...], int]] = {
    "tiny": ((32, 64), 1, (1,), 32),
    "cifar-text": ((64, 128, 128), 1, (1, 2), 32),
}


def caption_of(template: str, class_name: str) -> str:
    """The caption of a class: ``template`` with ``{class}`` replaced (underscores -> spaces)."""
    return template.replace("{class}", class_name.replace("_", " "))


def class_captions(labels: Sequence[int] | np.ndarray, class_names: Sequence[str],
                   template: str) -> tuple[str, ...]:
    return tuple(caption_of(template, class_names[int(i)]) for i in labels)


@dataclass(frozen=True, eq=False)
class CaptionedImages:
    """Images ``[N, C, H, W]`` in [-1, 1] with one caption each (the examples of a
    text-conditioned model). Indexing gives ``{"images": [B, C, H, W], "captions": [B]}``."""

    images: torch.Tensor
    captions: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "captions", tuple(str(c) for c in self.captions))
        if len(self.captions) != self.images.shape[0]:
            raise ValueError(f"CaptionedImages needs one caption per image: "
                             f"{len(self.captions)} captions for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def __getitem__(self, index) -> dict:
        idx = torch.as_tensor(index).reshape(-1).tolist()
        return {"images": self.images[index], "captions": [self.captions[i] for i in idx]}

    def select(self, index) -> CaptionedImages:
        idx = torch.as_tensor(np.asarray(index)).reshape(-1)
        return CaptionedImages(self.images[idx], tuple(self.captions[i] for i in idx.tolist()))

    def digest_parts(self) -> tuple:
        return (self.images, list(self.captions))


@dataclass(frozen=True, eq=False)
class EncodedExamples:
    """Examples already encoded: latents ``[N, c, h, w]`` (scaled VAE modes) and text
    embeddings ``[U, L, D]`` of the distinct captions, ``caption_index [N]`` into them.

    For training (a run's cached training set, :func:`encode_cached`) they also hold
    ``latent_std [N, c, h, w]`` (the posterior std times the VAE's scaling factor: a draw is
    ``latents + latent_std * z``), the same two of the mirrored images (``flipped``,
    ``flipped_std``: ``train.hflip``) and ``empty_index``, the row of the empty caption
    (caption dropout). ``image_shape`` is ``[C, H, W]`` of the images they were encoded
    from (``shape`` is the images' shape, as for :class:`CaptionedImages`) and ``source``
    the digest of those captioned images (the digest of these examples, so a result keyed
    by its examples is the same with and without the cache)."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    caption_index: torch.Tensor
    latent_std: torch.Tensor | None = None
    flipped: torch.Tensor | None = None
    flipped_std: torch.Tensor | None = None
    empty_index: int | None = None
    image_shape: tuple[int, ...] | None = None
    source: str | None = None

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), *(self.image_shape or self.latents.shape[1:])))

    def __getitem__(self, index) -> dict:
        out = {"latents": self.latents[index],
               "encoder_hidden_states": self.embeddings[self.caption_index[index]]}
        for name in ("latent_std", "flipped", "flipped_std"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)[index]
        if self.empty_index is not None:
            out["empty"] = self.embeddings[self.empty_index]
        return out

    def select(self, index) -> EncodedExamples:
        idx = torch.as_tensor(np.asarray(index)).reshape(-1)
        rows = {n: None if getattr(self, n) is None else getattr(self, n)[idx]
                for n in ("latents", "caption_index", "latent_std", "flipped", "flipped_std")}
        return EncodedExamples(embeddings=self.embeddings, empty_index=self.empty_index,
                               image_shape=self.image_shape, **rows)

    def digest_parts(self) -> tuple:
        return (self.latents, self.embeddings, self.caption_index)

    def content_digest(self) -> str | None:
        """The digest of the captioned images these were encoded from (None: unknown)."""
        return self.source


class TextToImage(torch.nn.Module):
    """A text-conditioned latent (or pixel) diffusion model: UNet + text encoder (+ VAE).

    ``base`` is the pipeline folder it was loaded from and ``lora`` its LoRA settings
    (None: the whole UNet is the model).
    """

    def __init__(self, unet: UNet2DConditionModel, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, vae: AutoencoderKL | None = None,
                 base: str | None = None, lora: dict | None = None) -> None:
        super().__init__()
        self.unet = unet
        self.text_encoder = text_encoder.requires_grad_(False).eval()
        self.vae = vae.requires_grad_(False).eval() if vae is not None else None
        self.tokenizer = tokenizer
        self.base = base
        self.lora = lora

    @property
    def config(self):
        return self.unet.config

    def train(self, mode: bool = True) -> TextToImage:
        self.training = mode
        self.unet.train(mode)  # the frozen parts stay in eval mode
        return self

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @torch.no_grad()
    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(captions), padding="max_length", truncation=True,
                             max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        p = next(self.text_encoder.parameters())
        return self.text_encoder(ids.to(p.device))[0].to(p.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None,
                      sample: bool = False) -> torch.Tensor:
        """Latents of images in [-1, 1]: the scaled mode (or a draw with ``sample``)."""
        if self.vae is None:
            return images
        p = next(self.vae.parameters())
        dist = self.vae.encode(images.to(p.device, p.dtype)).latent_dist
        if sample:  # the draw on the CPU generator, so a run means the same on every device
            z = torch.randn(dist.mean.shape, generator=generator).to(p.device, p.dtype)
            lat = dist.mean + dist.std * z
        else:
            lat = dist.mode()
        return lat * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.vae is None:
            return latents
        return self.vae.decode(latents / self.scaling_factor).sample


class TextToImageAdapter(UNet2DAdapter):
    """A :class:`TextToImage` bound for the engine: the UNet is the differentiated module,
    conditioning is ``{"encoder_hidden_states": [B, L, D]}``."""

    def __init__(self, model: TextToImage, prediction_type: str = "epsilon",
                 sched: Any = None) -> None:
        super().__init__(model.unet, prediction_type, sched)
        self.model = model
        self._text: dict[str, torch.Tensor] = {}

    def text(self, captions: Sequence[str]) -> torch.Tensor:
        """``encoder_hidden_states [B, L, D]``, each distinct caption encoded once."""
        new = [c for c in dict.fromkeys(captions) if c not in self._text]
        if new:
            for c, e in zip(new, self.model.encode_text(new), strict=True):
                self._text[c] = e
        return torch.stack([self._text[c] for c in captions])

    def prepare(self, batch) -> tuple[torch.Tensor, Cond]:
        if isinstance(batch, EncodedExamples | CaptionedImages):
            parts = [self.prepare(batch[torch.arange(i, min(i + 64, len(batch)))])
                     for i in range(0, len(batch), 64)]
            return (torch.cat([x for x, _ in parts]),
                    {"encoder_hidden_states": torch.cat([c["encoder_hidden_states"]
                                                         for _, c in parts])})
        if isinstance(batch, dict) and "latents" in batch:
            p = next(self.module.parameters())
            return (batch["latents"].to(p.device, p.dtype),
                    {"encoder_hidden_states": batch["encoder_hidden_states"].to(p.device,
                                                                                p.dtype)})
        if not (isinstance(batch, dict) and "images" in batch and "captions" in batch):
            raise ValueError(
                "a text-conditioned model needs captioned examples (CaptionedImages, or a dict "
                "with images [B, C, H, W] and captions), got "
                f"{type(batch).__name__}; give each image its caption (a class folder with "
                "model.caption_template, or a metadata.jsonl with a text column)")
        x0 = self.model.encode_images(batch["images"])
        return x0, {"encoder_hidden_states": self.text(batch["captions"]).to(x0.dtype)}

    def eps(self, params_and_buffers: dict[str, torch.Tensor], x_t: torch.Tensor,
            t: torch.Tensor, cond: Cond) -> torch.Tensor:
        kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"], "return_dict": False}
        out = functional_call(self.module, params_and_buffers, (x_t, t), kwargs)[0]
        return self.to_eps(out, x_t, t)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        out = self.module(x_t, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
        return self.to_eps(out, x_t, t)

    def attributed_parameters(self) -> list[str] | None:
        if self.model.lora is None:
            return None
        return [n for n, _ in self.module.named_parameters() if ".lora_" in n]


# ----------------------------------------------------------------------------- on disk


def _need_base(directory: str | Path | None, need_unet: bool) -> Path:
    if directory is None:
        raise ConfigError("model.pretrained: the sd-lora family needs a local Stable Diffusion "
                          "folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/ as "
                          "StableDiffusionPipeline.save_pretrained writes it)")
    path = Path(directory).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model.pretrained = {path}: no such folder; point it at a "
                                "local Stable Diffusion folder (nothing is downloaded)")
    missing = [s for s in ("text_encoder", "tokenizer") + (("unet",) if need_unet else ())
               if not (path / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{path} has no {', '.join(s + '/' for s in missing)} subfolder: expected a Stable "
            "Diffusion folder as StableDiffusionPipeline.save_pretrained(DIR) writes it "
            "(unet/, vae/, text_encoder/, tokenizer/, scheduler/)")
    return path


_BASES: dict[tuple, TextToImage] = {}


def _stamp(path: Path) -> tuple:
    return tuple((f.relative_to(path).as_posix(), f.stat().st_mtime_ns, f.stat().st_size)
                 for f in sorted(path.rglob("*")) if f.is_file())


def load_base(directory: str | Path, need_unet: bool = True) -> TextToImage:
    """A fresh copy of the pipeline folder's model (loaded from disk once per process)."""
    return copy.deepcopy(_shared_base(directory, need_unet))


def _shared_base(directory: str | Path, need_unet: bool = True) -> TextToImage:
    """The pipeline folder's model as loaded once per process (read it, never change it)."""
    path = _need_base(directory, need_unet).resolve()
    key = (str(path), _stamp(path))
    if key not in _BASES:
        try:
            tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
            te = CLIPTextModel.from_pretrained(str(path / "text_encoder"),
                                               local_files_only=True, torch_dtype=torch.float32)
            vae = (AutoencoderKL.from_pretrained(str(path / "vae"), local_files_only=True,
                                                 torch_dtype=torch.float32)
                   if (path / "vae").is_dir() else None)
            unet = (UNet2DConditionModel.from_pretrained(str(path / "unet"),
                                                         local_files_only=True,
                                                         torch_dtype=torch.float32)
                    if (path / "unet").is_dir() else None)
        except (OSError, ValueError, RuntimeError) as e:
            raise DamagedArtefactError(
                f"{path}: cannot load the Stable Diffusion components ({str(e).strip()[:300]});"
                " check that each subfolder holds its config and weights") from e
        _BASES.clear()  # one base at a time
        _BASES[key] = TextToImage(unet, te, tok, vae, base=str(path))
    return _BASES[key]


# ----------------------------------------------------------------------------- the encoding cache
# RUN/cache/<set>/: each example set encoded once, so no stage runs the VAE or the text
# encoder on it again. One .npy file per array, each written atomically after meta.json:
#   latents.npy       [N, c, h, w]  the scaled VAE mode (the images themselves without a VAE,
#                                   then not written)
#   latent_std.npy    [N, c, h, w]  posterior std x scaling factor (training draws)
#   flipped.npy, flipped_std.npy    the same of the mirrored images (train.hflip)
#   embeddings.npy    [U, L, D]     the distinct captions' text embeddings, then ""
#   caption_index.npy [N]           each example's row of embeddings.npy
#   meta.json                       digests of the captioned images and of the encoders
# A killed encoding leaves meta.json and the files finished so far: the next call computes
# the missing files only. Stale (other images, captions or encoder weights): recomputed with
# a warning. Damaged (a file's size or shape disagrees): DamagedArtefactError naming it.

CACHE_VERSION = 1


def _encoder_digest(model: TextToImage) -> str:
    """A digest of what encoding depends on: VAE and text-encoder weights, the tokenizer."""
    known = getattr(model, "_encoder_digest", None)
    if known is None:
        tok = model.tokenizer
        parts = [tok.model_max_length, len(tok), *model.text_encoder.state_dict().values()]
        if model.vae is not None:
            parts += [model.scaling_factor, *model.vae.state_dict().values()]
        known = digest(*parts)
        model._encoder_digest = known  # the frozen encoders of a loaded base never change
    return known


def _cache_damaged(path: Path, what: str | Exception) -> DamagedArtefactError:
    if isinstance(what, Exception):  # check_npy's "PATH is damaged (WHAT); ..."
        found = re.search(r"is damaged \((.*)\); delete", str(what))
        what = found.group(1) if found else str(what)
    return DamagedArtefactError(
        f"{path} is damaged ({what}); delete it (or its folder {path.parent}) and run again: "
        "the encoding cache is recomputed")


@torch.no_grad()
def _posterior(model: TextToImage, images: torch.Tensor, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The scaled VAE posterior (mean, std) of images in [-1, 1], on the CPU."""
    vae = model.vae
    dist = vae.encode(images.to(device, next(vae.parameters()).dtype)).latent_dist
    s = model.scaling_factor
    return (dist.mean * s).float().cpu(), (dist.std * s).float().cpu()


def _encode_arrays(model: TextToImage, images: torch.Tensor, device: torch.device,
                   flip: bool, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    means, stds = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        m, s = _posterior(model, x.flip(-1) if flip else x, device)
        means.append(m)
        stds.append(s)
    return torch.cat(means).numpy(), torch.cat(stds).numpy()


def _on(model: TextToImage, device: torch.device) -> TextToImage:
    """The shared base's encoders on ``device`` (a copy unless it is the CPU)."""
    if device.type == "cpu":
        return model
    return TextToImage(model.unet, copy.deepcopy(model.text_encoder).to(device),
                       model.tokenizer, None if model.vae is None
                       else copy.deepcopy(model.vae).to(device), model.base)


def _read_meta(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict):
            raise ValueError("not a JSON object")
        return meta
    except (ValueError, OSError) as e:
        raise _cache_damaged(path, f"unreadable: {e}") from e


def encode_cached(examples: CaptionedImages, base: str | Path, directory: str | Path,
                  flips: bool = False, device: str | torch.device = "cpu",
                  indices: Sequence[int] | None = None) -> EncodedExamples:
    """``examples`` encoded by the VAE and text encoder of the pipeline folder ``base``,
    read from (and the first time written to) the cache folder ``directory``.

    ``flips``: also the encodings of the mirrored images. ``indices``: ``examples`` are
    those rows of a set cached before (a farm worker's subset): the cache must exist and
    fit (same encoders, same captions at those rows); nothing is written.
    """
    directory, device = Path(directory), torch.device(device)
    model = _shared_base(base, need_unet=False)
    has_vae = model.vae is not None
    meta_path = directory / "meta.json"
    if indices is not None:
        return _cached_subset(examples, model, directory, flips, indices)
    captions = list(dict.fromkeys([*examples.captions, ""]))
    want = {"version": CACHE_VERSION, "examples": digest(examples),
            "encoder": _encoder_digest(model), "n": len(examples),
            "image_shape": list(examples.images.shape[1:]), "captions": captions,
            "vae": has_vae}
    meta = _read_meta(meta_path)
    if meta is not None and any(meta.get(k) != v for k, v in want.items()):
        changed = [k for k, v in want.items() if meta.get(k) != v]
        log.warning("the encoding cache %s is stale (%s changed): encoding the set again",
                    directory, ", ".join(changed))
        meta = None
    if meta is None:
        if directory.exists():
            for f in directory.glob("*.npy"):
                f.unlink()
        directory.mkdir(parents=True, exist_ok=True)
        save_json(meta_path, {**want, "latent_shape": None})
        meta = _read_meta(meta_path)
    runner = _on(model, device)
    n, row = len(examples), {c: i for i, c in enumerate(captions)}

    def need(name: str, shape: tuple, dtype, compute) -> np.ndarray:
        path = directory / f"{name}.npy"
        if path.exists():
            try:
                return load_npy(path, shape, dtype)
            except DamagedArtefactError as e:
                raise _cache_damaged(path, e) from e
        arr = compute()
        save_npy(path, arr)
        return arr

    index = need("caption_index", (n,), np.int64,
                 lambda: np.array([row[c] for c in examples.captions], dtype=np.int64))
    emb = need("embeddings", None, np.float32, lambda: torch.cat(
        [runner.encode_text(captions[i:i + 64]).float().cpu()
         for i in range(0, len(captions), 64)]).numpy())
    if emb.shape[0] != len(captions):
        raise _cache_damaged(directory / "embeddings.npy",
                             f"{emb.shape[0]} rows for {len(captions)} captions")
    parts: dict[str, Any] = {}
    if has_vae:
        shape = meta.get("latent_shape")
        pair: dict[bool, tuple] = {}

        def encoded(flip: bool, which: int):
            if flip not in pair:
                pair[flip] = _encode_arrays(runner, examples.images, device, flip)
            return pair[flip][which]

        names = [("latents", False, 0), ("latent_std", False, 1)]
        names += [("flipped", True, 0), ("flipped_std", True, 1)] if flips else []
        for name, flip, which in names:
            full = None if shape is None else (n, *shape)
            parts[name] = need(name, full, np.float32,
                               lambda f=flip, w=which: encoded(f, w))
            if shape is None:
                shape = list(parts[name].shape[1:])
                save_json(meta_path, {**meta, "latent_shape": shape})
                meta = {**meta, "latent_shape": shape}
        tensors = {k: torch.from_numpy(v) for k, v in parts.items()}
    else:  # pixel space: the latents are the images (not stored again)
        tensors = {"latents": examples.images}
    return EncodedExamples(embeddings=torch.from_numpy(emb),
                           caption_index=torch.from_numpy(index),
                           empty_index=row[""], image_shape=tuple(examples.images.shape[1:]),
                           source=digest(*examples.digest_parts()), **tensors)


def _cached_subset(examples: CaptionedImages, model: TextToImage, directory: Path,
                   flips: bool, indices: Sequence[int]) -> EncodedExamples:
    meta_path = directory / "meta.json"
    meta = _read_meta(meta_path)
    if meta is None:
        raise FileNotFoundError(f"no encoding cache at {directory} (no meta.json): run the "
                                "stage that writes it (`dtrak run`) first")
    if meta.get("encoder") != _encoder_digest(model) or meta.get("version") != CACHE_VERSION:
        raise DamagedArtefactError(
            f"the encoding cache {directory} was made with other encoder weights than those "
            f"of {model.base}; delete {directory} and run again")
    idx = np.asarray(indices, dtype=np.int64)
    n, captions = int(meta["n"]), meta["captions"]
    index = _load_cached(directory / "caption_index.npy", (n,), np.int64)
    if [captions[int(i)] for i in index[idx]] != list(examples.captions):
        raise DamagedArtefactError(
            f"the captions cached in {directory} differ from the training captions; delete "
            f"{directory} and run again")
    emb = np.array(_load_cached(directory / "embeddings.npy", None, np.float32))
    tensors: dict[str, torch.Tensor] = {}
    if meta.get("vae"):
        shape = (n, *meta["latent_shape"])
        names = ["latents", "latent_std"] + (["flipped", "flipped_std"] if flips else [])
        for name in names:
            tensors[name] = torch.from_numpy(
                np.ascontiguousarray(_load_cached(directory / f"{name}.npy", shape,
                                                  np.float32)[idx]))
    else:
        tensors["latents"] = examples.images
    return EncodedExamples(embeddings=torch.from_numpy(emb),
                           caption_index=torch.from_numpy(np.ascontiguousarray(index[idx])),
                           empty_index=captions.index(""),
                           image_shape=tuple(meta["image_shape"]), **tensors)


def _load_cached(path: Path, shape, dtype) -> np.ndarray:
    if not path.exists():
        raise FileNotFoundError(f"the encoding cache lacks {path}: run the stage that writes "
                                "it (`dtrak run`) first")
    try:
        return open_npy(path, shape, dtype, mode="r")
    except DamagedArtefactError as e:
        raise _cache_damaged(path, e) from e


def _lora_config(lora: dict) -> LoraConfig:
    return LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"],
                      init_lora_weights=lora.get("init", "gaussian"),
                      target_modules=list(lora["targets"]))


def _lora_settings(cfg: ModelConfig) -> dict:
    return {"rank": cfg.lora_rank, "alpha": float(cfg.lora_alpha or cfg.lora_rank),
            "targets": list(cfg.lora_targets), "init": cfg.lora_init}


def save_model(model: TextToImage, directory: str | Path) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        if model.lora is not None:
            state = get_peft_model_state_dict(model.unet, adapter_name="default")
            save_file({f"unet.{k}": v.detach().contiguous().cpu().float()
                       for k, v in state.items()}, str(directory / LORA_FILE))
            (directory / LORA_META).write_text(json.dumps(
                {"base": model.base, "lora": model.lora}, indent=2) + "\n")
            return
        model.unet.save_pretrained(str(directory / "unet"))
        model.text_encoder.save_pretrained(str(directory / "text_encoder"))
        model.tokenizer.save_pretrained(str(directory / "tokenizer"))
        if model.vae is not None:
            model.vae.save_pretrained(str(directory / "vae"))
        if model.base and (Path(model.base) / "scheduler").is_dir():
            load_scheduler(model.base, "scheduler").save_pretrained(str(directory / "scheduler"))
    except SafetensorError as e:
        raise as_os_error(e, directory) from e
    _model_index(directory, model.vae is not None)


def _model_index(directory: Path, has_vae: bool) -> None:
    write_model_index(directory, True, has_vae)


def load_lora(base: str | Path, lora_dir: str | Path) -> TextToImage:
    """The base pipeline folder with the LoRA adapter of ``lora_dir`` (dtrak's or a
    diffusers ``save_lora_weights`` folder: ``pytorch_lora_weights.safetensors``)."""
    lora_dir = Path(lora_dir)
    weights = lora_dir / LORA_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no LoRA weights at {weights}: expected {LORA_FILE} as "
                                "diffusers' save_lora_weights (or dtrak train) writes it")
    model = load_base(base)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise DamagedArtefactError(f"{weights} is damaged ({e}); train the LoRA again") from e
    unet_state = {k.removeprefix("unet."): v for k, v in state.items()
                  if k.startswith("unet.") or "." in k and not k.startswith("text_encoder.")}
    meta_path = lora_dir / LORA_META
    try:
        if meta_path.is_file():
            lora = json.loads(meta_path.read_text())["lora"]
            model.unet.add_adapter(_lora_config(lora), adapter_name="default")
            result = set_peft_model_state_dict(model.unet, unet_state, adapter_name="default")
            bad = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
            missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k]
            if bad or missing:
                raise ValueError(f"{len(bad)} unexpected and {len(missing)} missing LoRA "
                                 f"weights (e.g. {(bad or missing)[0]})")
        else:
            model.unet.load_lora_adapter(unet_state, prefix=None, adapter_name="default")
            cfg = model.unet.peft_config["default"]
            lora = {"rank": cfg.r, "alpha": float(cfg.lora_alpha),
                    "targets": sorted(cfg.target_modules), "init": "gaussian"}
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(
            f"the LoRA at {lora_dir} does not fit the UNet of {base} ({str(e).strip()[:300]});"
            " give the base model it was trained on") from e
    model.unet.requires_grad_(False)
    for n, p in model.unet.named_parameters():
        p.requires_grad_(".lora_" in n)
    model.lora = lora
    return model.eval()


def load_model(directory: str | Path) -> TextToImage:
    """A saved model: a LoRA folder (``dtrak_lora.json`` names its base) or a pipeline
    folder (the whole UNet)."""
    path = Path(directory)
    if (path / LORA_META).is_file():
        base = json.loads((path / LORA_META).read_text())["base"]
        return load_lora(base, path)
    if (path / "unet").is_dir():
        return load_base(path).eval()
    raise FileNotFoundError(
        f"no text-to-image model at {path}: expected a LoRA folder ({LORA_FILE} + "
        f"{LORA_META}) or a Stable Diffusion folder (unet/, text_encoder/, tokenizer/); train "
        "one with `dtrak train`")


def _unet_from_preset(cfg: ModelConfig, channels: int, resolution: int,
                      cross_dim: int) -> UNet2DConditionModel:
    if cfg.preset not in TEXT_UNET_PRESETS:
        raise ConfigError(f"model.preset: {cfg.preset!r} is no text-conditioned UNet preset; "
                          f"choose one of {', '.join(TEXT_UNET_PRESETS)} (or give "
                          "model.pretrained a folder with a unet/)")
    chans, layers, attn, groups = TEXT_UNET_PRESETS[cfg.preset]
    chans = tuple(cfg.block_out_channels or chans)
    layers = cfg.layers_per_block or layers
    attn = tuple(cfg.attention_levels if cfg.attention_levels is not None else attn)
    if any(c % groups for c in chans):
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in chans))
    down = tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D"
                 for i in range(len(chans)))
    up = tuple(reversed(["CrossAttnUpBlock2D" if i in attn else "UpBlock2D"
                         for i in range(len(chans))]))
    return UNet2DConditionModel(
        sample_size=resolution, in_channels=channels, out_channels=channels,
        block_out_channels=chans, layers_per_block=layers, down_block_types=down,
        up_block_types=up, cross_attention_dim=cross_dim, norm_num_groups=groups,
        attention_head_dim=8, dropout=cfg.dropout)


class SDLoRAFamily(ModelFamily):
    name = "sd-lora"
    takes_text = True
    description = ("Stable Diffusion (diffusers UNet2DConditionModel + CLIP text encoder + "
                   "optional VAE) with a peft LoRA adapter, or the whole UNet")

    def build(self, cfg: ModelConfig, example_shape: Sequence[int], seed: int | None = None
              ) -> TextToImage:
        full = not cfg.lora_rank
        model = load_base(cfg.pretrained, need_unet=not full)
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            if full:
                if model.unet is None:
                    channels, res = int(example_shape[0]), int(example_shape[-1])
                    if model.vae is not None:
                        channels = int(model.vae.config.latent_channels)
                        res //= 2 ** (len(model.vae.config.block_out_channels) - 1)
                    model.unet = _unet_from_preset(cfg, channels, res,
                                                   model.text_encoder.config.hidden_size)
                model.unet.requires_grad_(True)
            else:
                model.lora = _lora_settings(cfg)
                model.unet.requires_grad_(False)
                model.unet.add_adapter(_lora_config(model.lora), adapter_name="default")
                for n, p in model.unet.named_parameters():
                    p.requires_grad_(".lora_" in n)
        return model

    def load(self, directory: str | Path) -> TextToImage:
        return load_model(directory)

    def save(self, model: torch.nn.Module, directory: str | Path) -> None:
        save_model(model, directory)

    def scheduler(self, cfg: ModelConfig, kind: str = "ddpm"):
        folder = Path(cfg.pretrained).expanduser() / "scheduler" if cfg.pretrained else None
        if folder is None or not (folder / "scheduler_config.json").is_file():
            return build_scheduler(cfg, kind)
        ddpm = load_scheduler(folder.parent, "scheduler")
        if ddpm.config.num_train_timesteps != cfg.num_train_timesteps:
            raise ConfigError(
                f"model.num_train_timesteps = {cfg.num_train_timesteps} but the scheduler of "
                f"{folder.parent} has {ddpm.config.num_train_timesteps}: set it to that")
        if kind == "ddpm":
            return ddpm
        if kind == "ddim":
            return DDIMScheduler.from_config(ddpm.config)
        raise ConfigError(f"scheduler kind must be ddpm or ddim, got {kind!r}")

    def adapter(self, model: torch.nn.Module, prediction_type: str = "epsilon",
                sched: Any = None) -> TextToImageAdapter:
        return TextToImageAdapter(model, prediction_type, sched)

    def conditioning(self, model: torch.nn.Module) -> str | None:
        return "encoder_hidden_states"

    def examples(self, images: torch.Tensor, labels: Any, class_names: Sequence[str],
                 cfg: ModelConfig, captions: Sequence[str] | None = None) -> CaptionedImages:
        """Images with their captions: ``captions`` as given, else each image's class
        caption (``model.caption_template``)."""
        if captions is None:
            captions = class_captions(np.asarray(labels), class_names, cfg.caption_template)
        return CaptionedImages(images, tuple(captions))

    def cached_examples(self, examples: Any, cfg: ModelConfig, directory: str | Path,
                        flips: bool = False, device: str | torch.device = "cpu",
                        indices: Sequence[int] | None = None) -> Any:
        """Captioned images as :class:`EncodedExamples` read from the encoding cache in
        ``directory`` (written the first time; see :func:`encode_cached`)."""
        if not isinstance(examples, CaptionedImages):
            return examples
        return encode_cached(examples, cfg.pretrained, directory, flips, device, indices)

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.unet.parameters() if p.requires_grad]

    def model_noise_shape(self, model: torch.nn.Module, example_shape: Sequence[int]
                          ) -> tuple[int, ...]:
        return self.latent_shape(model, example_shape)

    def latent_shape(self, model: TextToImage, example_shape: Sequence[int]) -> tuple[int, ...]:
        c, h, w = (int(s) for s in example_shape)
        if model.vae is None:
            return (c, h, w)
        f = 2 ** (len(model.vae.config.block_out_channels) - 1)
        return (int(model.vae.config.latent_channels), h // f, w // f)

    def generation_prompts(self, class_names: Sequence[str], cfg: ModelConfig, n: int
                           ) -> list[str]:
        """Image i is prompted with the caption of class ``i mod C``."""
        return [caption_of(cfg.caption_template, class_names[i % len(class_names)])
                for i in range(n)]

    def training_inputs(self, adapter: TextToImageAdapter, batch: dict, cfg: ModelConfig,
                        generator: torch.Generator) -> tuple[torch.Tensor, Cond]:
        """Latents drawn from the VAE posterior and captions, each dropped to the empty
        prompt with probability ``model.caption_dropout`` (classifier-free guidance).

        A batch of cached :class:`EncodedExamples` draws the same: ``mean + std * z`` with
        ``z`` from the same generator, the mirrored images' encodings where ``flip``."""
        if "latents" in batch:
            return self._cached_training_inputs(adapter, batch, cfg, generator)
        captions = list(batch["captions"])
        drop = torch.rand(len(captions), generator=generator) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        x0 = adapter.model.encode_images(batch["images"], generator, sample=True)
        return x0, {"encoder_hidden_states": adapter.text(captions).to(x0.dtype)}

    def _cached_training_inputs(self, adapter: TextToImageAdapter, batch: dict,
                                cfg: ModelConfig, generator: torch.Generator
                                ) -> tuple[torch.Tensor, Cond]:
        n = batch["latents"].shape[0]
        if "empty" not in batch:
            raise ValueError("training from encoded examples needs the empty caption's "
                             "embedding (a training set from the encoding cache)")
        drop = torch.rand(n, generator=generator) < cfg.caption_dropout
        mean, std, flip = batch["latents"], batch.get("latent_std"), batch.get("flip")
        if flip is not None:
            where = flip.view(-1, 1, 1, 1)
            if std is None:  # pixel space: the latents are the images
                mean = torch.where(where, mean.flip(-1), mean)
            elif "flipped" not in batch:
                raise ValueError("train.hflip needs the encodings of the mirrored images: "
                                 "cache the training set with flips")
            else:
                mean = torch.where(where, batch["flipped"], mean)
                std = torch.where(where, batch["flipped_std"], std)
        p = next(adapter.module.parameters())
        if std is not None:  # latent_dist.sample(): the draw on the CPU generator
            z = torch.randn(mean.shape, generator=generator)
            x0 = (mean + std * z).to(p.device)
        else:
            x0 = mean.to(p.device)
        emb = torch.where(drop.view(-1, 1, 1), batch["empty"].unsqueeze(0),
                          batch["encoder_hidden_states"])
        return x0, {"encoder_hidden_states": emb.to(p.device, x0.dtype)}

    def sample_shape(self, model: torch.nn.Module) -> tuple[int, ...]:
        s = model.unet.config.sample_size
        if model.vae is None:
            return (model.unet.config.in_channels, s, s)
        f = 2 ** (len(model.vae.config.block_out_channels) - 1)
        return (int(model.vae.config.in_channels), s * f, s * f)

    def sample(self, model: torch.nn.Module, cfg: ModelConfig, sampling: SamplingConfig,
               image_ids: Sequence[int], keep_trajectory: bool,
               prompts: Sequence[str] | None = None) -> SampleBatch:
        if prompts is None or len(prompts) != len(image_ids):
            raise ValueError("a text-conditioned model samples from prompts: one per image")
        p = next(model.unet.parameters())
        model.eval()
        cond = model.encode_text(prompts).to(p.dtype)
        g = sampling.guidance_scale
        uncond = model.encode_text([""] * len(prompts)).to(p.dtype) if g != 1 else None
        unet = model.unet

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if uncond is None:
                return unet(x, t, encoder_hidden_states=cond).sample
            e_u, e_c = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat(
                [uncond, cond])).sample.chunk(2)
            return e_u + g * (e_c - e_u)

        c, h, w = self.sample_shape(model)
        shape = self.latent_shape(model, (c, h, w))
        out = sample_loop(predict, self.scheduler(cfg, sampling.sampler), shape, sampling,
                          list(image_ids), keep_trajectory, p.device, p.dtype,
                          clamp=model.vae is None)
        if model.vae is None:
            return out
        images = model.decode(out.images.to(p.device, p.dtype)).clamp(-1, 1).float().cpu()
        traj = None
        if out.trajectory is not None:  # decoded x0 predictions, step by step
            traj = torch.stack([model.decode(out.trajectory[:, s].to(p.device, p.dtype))
                                .float().cpu() for s in range(out.trajectory.shape[1])], 1)
        return SampleBatch(images, traj, out.timesteps)

    def describe(self, model: torch.nn.Module) -> dict:
        out = super().describe(model)
        out.update(base=model.base, lora=model.lora)
        return out
