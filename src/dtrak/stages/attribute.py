"""Attribute images to a model's training data: ``dtrak attribute --model M --data D IMG...``.

The everyday question, "which training images made this?", for any diffusers UNet2DModel
directory and a folder of its training images. The training features are computed once
into a cache (a feature store keyed by the model's weights, the data and the feature
settings) and reused by every later call, so attributing a new image costs one gradient
and one small solve.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..data import load_image_folder
from ..families import get_family
from ..featurize import FeatureSpec, featurize_into
from ..lambdas import prior_lambda_rel
from ..noise import ScheduleConstants
from ..runtime import resolve_device
from ..scoring import KernelSolver

log = logging.getLogger(__name__)

__all__ = ["Attribution", "attribute_images", "default_cache_dir"]

@dataclass(frozen=True)
class Attribution:
    """Scores of one target: ``scores[N]`` over the training images (positive = helps)."""

    target: Path
    scores: np.ndarray
    train_paths: list[Path]
    train_images: torch.Tensor  # [N, C, H, W] in [-1, 1], shared by all targets of a call

    def top(self, k: int, opponents: bool = False) -> list[tuple[int, float, Path]]:
        order = np.argsort(self.scores, kind="stable")
        idx = order[:k] if opponents else order[::-1][:k]
        return [(int(i), float(self.scores[i]), self.train_paths[i]) for i in idx]


def _fingerprint(model_dir: Path, train: torch.Tensor, spec: FeatureSpec, family: str,
                 betas: torch.Tensor) -> str:
    """The training-feature cache key: contents only (model files, images, settings), no paths.

    The model directory's files are hashed by bytes (with their sorted relative names), the
    training images by the loaded tensor, so files replaced in place change the key and a
    moved but identical folder keeps it.
    """
    h = hashlib.blake2b(digest_size=10)
    for f in sorted(f for f in model_dir.rglob("*") if f.is_file()):
        fh = hashlib.blake2b()
        with open(f, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                fh.update(chunk)
        h.update(f.relative_to(model_dir).as_posix().encode() + b"\0" + fh.digest())
    h.update(str((tuple(train.shape), train.dtype)).encode())
    h.update(train.detach().cpu().contiguous().numpy().tobytes())
    h.update(betas.detach().cpu().to(torch.float64).numpy().tobytes())
    h.update(json.dumps({**spec.__dict__, "family": family}, sort_keys=True).encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "dtrak" / "attribute"


def attribute_images(
    model_dir: str | Path,
    data: str | Path,
    images: list[str | Path],
    spec: FeatureSpec,
    model_cfg: ModelConfig | None = None,
    lam_rel: float | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    progress: bool = True,
    device: str = "auto",
) -> list[Attribution]:
    """Score every training image in ``data`` for each image in ``images``.

    Args:
        model_dir: a saved model of ``model_cfg.family`` (default ``unet2d``: a diffusers
            UNet2DModel directory, config.json + safetensors).
        data: the folder of training images (recursive; sorted paths are the columns).
        images: target image files or folders.
        spec: the features (output function, timesteps, projection); D-TRAK by default.
        model_cfg: the family and noise schedule (default: unet2d, linear 1e-4..0.02,
            T = 1000).
        lam_rel: ridge term relative to trace(Phi^T Phi)/N (default: a per-output prior).
        cache_dir: where training features are cached (default ~/.cache/dtrak/attribute).
        device: auto, cpu, cuda or cuda:N.
    """
    model_dir = Path(model_dir)
    model_cfg = model_cfg or ModelConfig()
    family = get_family(model_cfg.family)
    model = family.load(model_dir).to(resolve_device(device))
    ch, res, _ = family.sample_shape(model)
    train, train_paths = load_image_folder(data, resolution=res, channels=ch)
    targets, target_paths = [], []
    for item in images:
        x, p = load_image_folder(item, resolution=res, channels=ch)
        targets.append(x)
        target_paths += p
    target = torch.cat(targets)
    sched = ScheduleConstants.from_scheduler(family.scheduler(model_cfg))
    adapter = family.adapter(model)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    key = _fingerprint(model_dir, train, spec, model_cfg.family, sched.betas)
    store = featurize_into(adapter, train, cache / key / "train", spec, sched, "attribute",
                           "train", batch_size=batch_size, progress=progress)
    phi_train = store.load()
    # targets: a throwaway store per call (targets are few; the training set is the cost)
    tkey = hashlib.blake2b(target.numpy().tobytes(), digest_size=10).hexdigest()
    tstore = featurize_into(adapter, target, cache / key / f"targets-{tkey}", spec, sched,
                            "attribute", "targets", batch_size=batch_size, progress=False)
    solver = KernelSolver(phi_train)
    rel = lam_rel if lam_rel is not None else prior_lambda_rel(spec.output)
    scores = solver.scores(tstore.load(), rel * solver.trace_scale)
    return [Attribution(p, s, train_paths, train)
            for p, s in zip(target_paths, scores, strict=True)]
