"""Small image utilities: [-1, 1] tensors <-> uint8 arrays and PNG files, image grids.

Images are [N, C, H, W] (or one [C, H, W]) float tensors or arrays in [-1, 1], C = 1 (grey)
or 3 (RGB). PNG files are written as 8-bit 'L' or 'RGB'; a save/load round trip of values
of the form ``u / 127.5 - 1`` (u = 0..255) is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dtrak.data import DataError, load_image_folder

__all__ = ["load_pngs", "make_grid", "save_grid", "save_png", "save_pngs", "to_uint8"]

MIN_TILE = 64  # save_grid's default upscale makes each tile at least this many pixels


def _as_numpy(images: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return images.detach().to("cpu", torch.float32).numpy()
    return np.asarray(images, dtype=np.float32)


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C]; C = 1 is squeezed to [N, H, W].

    A single image [C, H, W] gives [H, W, C] (or [H, W]). Values are clipped to [-1, 1]
    and rounded to the nearest level.
    """
    x = _as_numpy(images)
    if x.ndim not in (3, 4) or x.shape[-3] not in (1, 3):
        raise ValueError(f"expected images [N, C, H, W] or [C, H, W] with C in (1, 3), "
                         f"got shape {tuple(x.shape)}")
    x = np.moveaxis(x, -3, -1)
    u = np.clip(np.rint((np.clip(x, -1.0, 1.0) + 1.0) * 127.5), 0, 255).astype(np.uint8)
    return u[..., 0] if u.shape[-1] == 1 else u


def save_png(image: torch.Tensor | np.ndarray, path: str | Path) -> Path:
    """Save one image [C, H, W] in [-1, 1] as an 8-bit PNG ('L' or 'RGB'); parents created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)
    return path


def save_pngs(
    images: torch.Tensor | np.ndarray, directory: str | Path, prefix: str = "", start: int = 0
) -> list[Path]:
    """Save [N, C, H, W] as ``directory/{prefix}{start + i:06d}.png``; returns the paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i, u in enumerate(to_uint8(images)):
        path = directory / f"{prefix}{start + i:06d}.png"
        Image.fromarray(u).save(path)
        out.append(path)
    return out


def load_pngs(paths: Sequence[str | Path]) -> torch.Tensor:
    """Load image files (in the given order) as [N, C, H, W] float32 in [-1, 1].

    The first file decides C (1 for grey PNGs, else 3); all must share one size
    (DataError naming the odd file otherwise).
    """
    if len(paths) == 0:
        raise DataError("load_pngs got no paths; pass at least one file")
    return load_image_folder(list(paths))[0]


def make_grid(
    images: torch.Tensor | np.ndarray,
    nrow: int | None = None,
    padding: int = 2,
    pad_value: float = 1.0,
    upscale: int = 1,
) -> np.ndarray:
    """Tile [N, C, H, W] in [-1, 1] into one uint8 RGB array [H', W', 3].

    ``nrow`` images per row (default ceil(sqrt(N))); ``padding`` pixels of ``pad_value``
    (in [-1, 1]; 1.0 = white) between and around tiles; ``upscale`` enlarges every tile by
    nearest neighbour first. H' = rows * (H * upscale + padding) + padding, likewise W'.
    """
    x = _as_numpy(images)
    u = to_uint8(x[None] if x.ndim == 3 else x)
    if u.ndim == 3:
        u = np.repeat(u[..., None], 3, axis=-1)
    if upscale < 1 or padding < 0:
        raise ValueError(f"need upscale >= 1 and padding >= 0, got {upscale}, {padding}")
    if upscale > 1:
        u = u.repeat(upscale, axis=1).repeat(upscale, axis=2)
    n, h, w, _ = u.shape
    ncol = max(1, min(n, nrow or math.ceil(math.sqrt(n))))
    nrows = max(1, math.ceil(n / ncol))
    fill = to_uint8(np.full((3, 1, 1), pad_value, dtype=np.float32))[0, 0]
    grid = np.empty((nrows * (h + padding) + padding, ncol * (w + padding) + padding, 3),
                    dtype=np.uint8)
    grid[:] = fill
    for i in range(n):
        r, c = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[top : top + h, left : left + w] = u[i]
    return grid


def save_grid(
    images: torch.Tensor | np.ndarray,
    path: str | Path,
    nrow: int | None = None,
    upscale: int | None = None,
) -> Path:
    """Save :func:`make_grid` of [N, C, H, W] as a PNG.

    ``upscale`` None: enlarge (nearest neighbour) so each tile is at least 64 pixels.
    """
    h, w = _as_numpy(images).shape[-2:]
    if upscale is None:
        upscale = max(1, math.ceil(MIN_TILE / max(1, min(h, w))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_grid(images, nrow=nrow, upscale=upscale)).save(path)
    return path
