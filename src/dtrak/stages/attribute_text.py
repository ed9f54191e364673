"""Attribute images to the training data of a LoRA fine-tune of Stable Diffusion.

``dtrak attribute --model SD_DIR --lora LORA_DIR --data IMAGES --prompt "..." IMG...``: the
base is a local Stable Diffusion folder (as ``StableDiffusionPipeline.save_pretrained``
writes it), the LoRA a folder with ``pytorch_lora_weights.safetensors`` (diffusers'
``save_lora_weights``, or a dtrak run's model); features are gradients with respect to the
LoRA parameters only.

Each training image needs its caption, found the way diffusers' and datasets' image folders
keep them:

- ``metadata.jsonl`` beside the images (one JSON object per line with ``file_name`` and
  ``text``), looked up from the image's folder upwards to the data folder;
- else the image's class folder with ``caption_template`` (``{class}`` = the folder name,
  underscores as spaces), e.g. ``a {class} painting``.

Each target is conditioned on ``--prompt`` (its generation prompt). Training features are
cached under the cache folder, keyed by the LoRA weights, the base, images, captions and the
feature settings.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..data import load_image_folder
from ..families import get_family
from ..families.sd_lora import LORA_FILE, CaptionedImages, caption_of, load_lora
from ..featurize import FeatureSpec, featurize_into
from ..lambdas import prior_lambda_rel
from ..noise import ScheduleConstants
from ..runtime import resolve_device
from ..scoring import KernelSolver
from .attribute import Attribution, default_cache_dir

__all__ = ["attribute_lora_images", "image_captions"]


def _metadata(folder: Path, root: Path) -> dict[str, str] | None:
    """``file path -> text`` of the nearest metadata.jsonl from ``folder`` up to ``root``."""
    for d in [folder, *folder.parents]:
        meta = d / "metadata.jsonl"
        if meta.is_file():
            out = {}
            for n, line in enumerate(meta.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    out[str((d / row["file_name"]).resolve())] = str(row["text"])
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(f"{meta} line {n}: expected a JSON object with file_name "
                                     f"and text ({e})") from e
            return out
        if d == root:
            break
    return None


def image_captions(paths: list[Path], root: Path, template: str | None) -> list[str]:
    """The caption of each training image (see the module docstring)."""
    root = root.resolve()
    out = []
    for p in paths:
        p = p.resolve()
        meta = _metadata(p.parent, root) if root.is_dir() else None
        if meta is not None:
            if str(p) not in meta:
                raise ValueError(f"{p} has no caption: add a line with \"file_name\" "
                                 f"\"{p.name}\" and its \"text\" to the metadata.jsonl of "
                                 "its folder")
            out.append(meta[str(p)])
        elif template is not None and root.is_dir() and p.parent != root:
            out.append(caption_of(template, p.relative_to(root).parts[0]))
        else:
            raise ValueError(
                f"{p} has no caption: put a metadata.jsonl (file_name, text) beside the "
                "images, or put the images in class folders and pass --caption-template, "
                "e.g. 'a {class} painting'")
    return out


def _fingerprint(*parts) -> str:
    h = hashlib.blake2b(digest_size=10)
    for part in parts:
        if isinstance(part, Path):
            for f in sorted(x for x in part.rglob("*") if x.is_file()) if part.is_dir() else [
                    part]:
                h.update(f.name.encode() + f.read_bytes())
        elif isinstance(part, torch.Tensor):
            h.update(part.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()


def attribute_lora_images(
    base: str | Path, lora: str | Path, data: str | Path, images: list[str | Path],
    prompt: str, spec: FeatureSpec, caption_template: str | None = None,
    lam_rel: float | None = None, cache_dir: str | Path | None = None, batch_size: int = 16,
    progress: bool = True, device: str = "auto",
) -> list[Attribution]:
    """Score every training image of a LoRA fine-tune for each image in ``images``."""
    family = get_family("sd-lora")
    on = resolve_device(device)
    model = load_lora(base, lora).to(on)
    sched = ScheduleConstants.from_scheduler(family.load_scheduler(Path(base), "scheduler"))
    adapter = family.adapter(model)
    ch, res, _ = family.sample_shape(model)
    train, paths = load_image_folder(data, resolution=res, channels=ch)
    captions = image_captions(paths, Path(data), caption_template)
    xs, tpaths = [], []
    for item in images:
        x, p = load_image_folder(item, resolution=res, channels=ch)
        xs.append(x)
        tpaths += p
    targets = CaptionedImages(torch.cat(xs), (prompt,) * len(tpaths))
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _fingerprint(Path(lora) / LORA_FILE, Path(base) / "unet" / "config.json", train,
                       captions, spec.__dict__, "sd-lora")
    store = featurize_into(adapter, CaptionedImages(train, tuple(captions)),
                           cache / key / "train", spec, sched, "attribute", "train",
                           batch_size=batch_size, progress=progress)
    th = _fingerprint(targets.images, prompt)
    tstore = featurize_into(adapter, targets, cache / key / f"targets-{th}", spec, sched,
                            "attribute", "targets", batch_size=batch_size, progress=False)
    rel, lam_from = ((lam_rel, "given") if lam_rel is not None
                     else (prior_lambda_rel(spec.output), f"the prior for {spec.output}"))
    solver = KernelSolver(store.load(), device=None if on.type == "cpu" else on)
    scores = solver.scores(tstore.load(), rel * solver.trace_scale)
    source = f"{lora} (LoRA on {base})"
    return [Attribution(p, np.asarray(s), paths, train, lam_rel=float(rel), lam_from=lam_from,
                        source=source) for p, s in zip(tpaths, scores, strict=True)]
