"""Image files on disk: listing, decoding, resizing, stacking into tensors in [-1, 1]."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class DataError(ValueError):
    """A data input is missing or invalid; the message names it and the fix."""


def _to_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float32 [N, C, H, W] in [-1, 1]."""
    arr = np.ascontiguousarray(arr)
    if not arr.flags.writeable:  # e.g. np.asarray of a PIL image
        arr = arr.copy()
    return torch.from_numpy(arr).float().div_(127.5).sub_(1.0)


def resize_images(images: torch.Tensor, resolution: int | None) -> torch.Tensor:
    """Resize [N, C, H, W] to [N, C, r, r], bilinear with antialiasing; no-op if same size.

    Values stay within the input range (the result is clamped to [-1, 1]).
    """
    if resolution is None or tuple(images.shape[-2:]) == (resolution, resolution):
        return images
    out = F.interpolate(
        images, size=(resolution, resolution), mode="bilinear", align_corners=False,
        antialias=True,
    )
    return out.clamp_(-1.0, 1.0)


def _center_crop(arr: np.ndarray, size: int | None) -> np.ndarray:
    """Center crop [H, W(, C)] to [s, s]; size None: the largest square."""
    h, w = arr.shape[:2]
    s = min(h, w) if size is None else size
    top, left = (h - s) // 2, (w - s) // 2
    return arr[top : top + s, left : left + s]


def _is_image(entry: os.DirEntry) -> bool:
    name = entry.name
    return (not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
            and entry.is_file())


def _has_images(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(_is_image(e) for e in it)


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in ``folder`` (extensions :data:`IMAGE_EXTENSIONS`), sorted by name.

    Recursive listings are sorted by relative path. Hidden files and folders are skipped.
    """
    folder = Path(folder)
    if not recursive:
        with os.scandir(folder) as it:
            names = sorted(e.name for e in it if _is_image(e))
        return [folder / n for n in names]
    rel: list[str] = []
    for dirpath, dirnames, _ in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        sub = os.path.relpath(dirpath, folder)
        prefix = "" if sub == "." else sub.replace(os.sep, "/") + "/"
        with os.scandir(dirpath) as it:
            rel += [prefix + e.name for e in it if _is_image(e)]
    return [folder / r for r in sorted(rel)]


def _image_mode(path: Path, channels: int | None = None) -> str:
    """PIL mode to convert to: 'L' for 1 channel, else 'RGB' (from ``channels`` or the file)."""
    if channels is not None:
        if channels not in (1, 3):
            raise DataError(f"channels={channels} is not supported; use 1 (grey) or 3 (RGB)")
        return "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as im:
            return "L" if im.mode in _GREY_MODES else "RGB"
    except FileNotFoundError as e:
        raise DataError(f"image file {path} does not exist") from e
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}; remove or replace the file") from e


def _read_image(path: Path, mode: str, crop: int | None | bool) -> np.ndarray:
    """Decode one file to uint8 [H, W] (mode L) or [H, W, 3] (RGB), center-cropped if asked.

    crop: an int crops to that square, True to the largest square, False/None not at all.
    """
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert(mode))
    except FileNotFoundError as e:
        raise DataError(f"image file {path} does not exist; check the data folder") from e
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e}; remove or replace the file") from e
    if crop is True:
        return _center_crop(arr, None)
    if crop:
        h, w = arr.shape[:2]
        if min(h, w) < crop:
            raise DataError(
                f"image {path} is {w}x{h}, smaller than the {crop}-pixel center crop"
            )
        return _center_crop(arr, crop)
    return arr


def _decode_files(paths: Sequence[Path], mode: str, crop: int | None | bool) -> list[np.ndarray]:
    """Decode files in order, in chunks over a few threads (PIL releases the GIL to decode)."""
    chunks = [paths[i : i + 256] for i in range(0, len(paths), 256)]
    workers = min(4, os.cpu_count() or 1, len(chunks))

    def decode(chunk: Sequence[Path]) -> list[np.ndarray]:
        return [_read_image(p, mode, crop) for p in chunk]

    if workers <= 1:
        return decode(paths)
    with ThreadPoolExecutor(workers) as ex:
        return [a for arrays in ex.map(decode, chunks) for a in arrays]


def _stack_images(
    arrays: list[np.ndarray], paths: Sequence[Path], resolution: int | None, resize_hint: str
) -> torch.Tensor:
    """Decoded uint8 arrays -> [N, C, H, W] in [-1, 1], resized to ``resolution`` if given.

    Without a resolution all images must share one square size; the first one that does not
    raises DataError naming the file (``resize_hint`` names the setting that fixes it).
    """
    arrays = [a[..., None] if a.ndim == 2 else a for a in arrays]
    shape0 = arrays[0].shape
    odd = next((i for i, a in enumerate(arrays) if a.shape != shape0), None)
    if odd is None:
        if resolution is None and shape0[0] != shape0[1]:
            raise DataError(
                f"image {paths[0]} is {shape0[1]}x{shape0[0]}, not square; set {resize_hint} "
                "to center-crop and resize"
            )
        x = _to_float(np.stack(arrays).transpose(0, 3, 1, 2))
        return resize_images(x, resolution)
    if resolution is None:
        h, w = arrays[odd].shape[:2]
        raise DataError(
            f"image {paths[odd]} is {w}x{h} but {paths[0]} is {shape0[1]}x{shape0[0]}; all "
            f"images must share one size: set {resize_hint} to resize them, or remove the file"
        )
    return torch.cat(
        [resize_images(_to_float(a.transpose(2, 0, 1)[None]), resolution) for a in arrays]
    )


def _load_files(
    paths: Sequence[Path],
    mode: str,
    resolution: int | None,
    crop: int | None | bool = None,
    resize_hint: str = "data.resolution",
) -> torch.Tensor:
    """Decode and stack files: [N, C, H, W] in [-1, 1] (C = 1 for mode 'L', else 3)."""
    if not paths:
        return torch.zeros(0, 1 if mode == "L" else 3, resolution or 1, resolution or 1)
    if resolution is not None and crop is None:
        crop = True  # resizing non-square images: center-crop them to a square first
    return _stack_images(_decode_files(paths, mode, crop), paths, resolution, resize_hint)


def load_image_folder(
    path: str | Path | Sequence[str | Path],
    resolution: int | None = None,
    channels: int | None = None,
) -> tuple[torch.Tensor, list[Path]]:
    """Load user images (e.g. attribution targets): a folder (recursive), a file, or a list.

    Returns images [N, C, H, W] float32 in [-1, 1] and their paths (folders sorted by
    relative path, lists in the order given). ``resolution`` center-crops to a square and
    resizes; without it all images must share one square size. ``channels`` (1 or 3) forces
    grey or RGB; by default the first image decides.
    """
    if isinstance(path, str | Path):
        p = Path(path)
        if not p.exists():
            raise DataError(f"image path {p} does not exist; pass a folder of images or a file")
        paths = list_images(p, recursive=True) if p.is_dir() else [p]
        if not paths:
            raise DataError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {p}; check the folder"
            )
    else:
        paths = [Path(q) for q in path]
        if not paths:
            raise DataError("the list of image files is empty; pass at least one file")
    mode = _image_mode(paths[0], channels)
    images = _load_files(paths, mode, resolution, resize_hint="resolution")
    return images, paths


METADATA_FILE = "metadata.jsonl"


def _read_metadata(meta: Path) -> dict[Path, str]:
    """``resolved image path -> text`` of one metadata.jsonl (one JSON object per line with
    ``file_name``, relative to the file's folder, and ``text``)."""
    out: dict[Path, str] = {}
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[(meta.parent / row["file_name"]).resolve()] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{meta} line {n}: expected a JSON object with \"file_name\" and "
                            f"\"text\" ({e}); fix that line") from e
    return out


def metadata_captions(files: Sequence[Path], root: str | Path) -> list[str] | None:
    """The caption of each image file from a ``metadata.jsonl`` with ``file_name`` and
    ``text`` columns (the diffusers / datasets image-folder convention): the nearest one
    from the image's folder up to ``root``. None when ``root`` has no metadata.jsonl (at
    its top, or in its ``train``/``test`` folders): the images take class captions then.
    An image that no metadata.jsonl captions is refused, naming the image and the file."""
    root = Path(root).expanduser().resolve()
    if not any((root / d / METADATA_FILE).is_file() for d in ("", "train", "test")):
        return None
    tables: dict[Path, dict[Path, str]] = {}
    out = []
    for f in files:
        f = Path(f).resolve()
        meta = next((d / METADATA_FILE for d in [f.parent, *f.parent.parents]
                     if (d / METADATA_FILE).is_file() and d.is_relative_to(root)), None)
        if meta is None:
            raise DataError(f"{f} has no caption: no {METADATA_FILE} in its folder or above it "
                            f"up to {root}; add one with its \"file_name\" and \"text\"")
        if meta not in tables:
            tables[meta] = _read_metadata(meta)
        if f not in tables[meta]:
            raise DataError(f"{f} has no caption in {meta}: add a line with \"file_name\" "
                            f"\"{f.relative_to(meta.parent).as_posix()}\" and its \"text\"")
        out.append(tables[meta][f])
    return out
