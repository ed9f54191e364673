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
(memoised per caption). :class:`EncodedExamples` holds both already encoded (the run's
cached latents and text embeddings).
"""

from __future__ import annotations

import copy
import json
import logging
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

from ..artefacts import DamagedArtefactError, as_os_error
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
    embeddings ``[U, L, D]`` of the distinct captions, ``caption_index [N]`` into them."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    caption_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.latents.shape[0])

    def __getitem__(self, index) -> dict:
        return {"latents": self.latents[index],
                "encoder_hidden_states": self.embeddings[self.caption_index[index]]}

    def digest_parts(self) -> tuple:
        return (self.latents, self.embeddings, self.caption_index)


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
            return batch["latents"], {"encoder_hidden_states": batch["encoder_hidden_states"]}
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
    return copy.deepcopy(_BASES[key])


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
        prompt with probability ``model.caption_dropout`` (classifier-free guidance)."""
        captions = list(batch["captions"])
        drop = torch.rand(len(captions), generator=generator) < cfg.caption_dropout
        captions = ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]
        x0 = adapter.model.encode_images(batch["images"], generator, sample=True)
        return x0, {"encoder_hidden_states": adapter.text(captions).to(x0.dtype)}

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
