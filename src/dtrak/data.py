"""Data sets, the paper's splits, and image loading.

A :class:`Dataset` holds a training :class:`Split` and a validation :class:`Split` of images
in ``[-1, 1]``. Every later stage refers to a training example by its position in
``ds.train`` (0..N-1); ``Split.source_indices`` says where each example came from, and
:func:`save_split_indices` writes them next to a run.

How a split is drawn (the paper's protocol, ``sklearn.model_selection.train_test_split``):

* The *pool* is the list of candidate examples in source order: for an image-folder tree,
  classes in label order (CIFAR-10 order, else sorted folder names) and files sorted by name
  within each class; for the official CIFAR-10 archive, the order of its batches. Restricting
  ``data.classes`` drops the other classes; ``source_indices`` are positions in this
  restricted pool (CIFAR-2: positions in its 10,000 training / 2,000 test images).
* A subset is ``train_test_split(positions, train_size=n, stratify=strata,
  random_state=data.split_seed)[0]`` in the order that function returns it (not sorted),
  where ``strata`` is the rank of each example's class *name* in sorted order. For CIFAR-10
  this rank equals the CIFAR-10 label, and the draw does not depend on the order of
  ``data.classes``. A size equal to the pool (or None, where the data set has no paper
  default) takes the whole pool in pool order.
* Labels are positions in ``data.classes`` as given (``classes=("horse", "automobile")``
  labels horses 0); without ``data.classes``, the data set's own class order.
* Only the selected files are decoded: the split is drawn on the file list first.

Data sets are registered by name (:data:`DATASETS`, :func:`register_dataset`) and loaded
with :func:`load_dataset`. Every bad input raises :class:`DataError` with one message
naming the file, path or value and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import tarfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.model_selection import train_test_split

from dtrak.config import DataConfig

__all__ = [
    "ARTBENCH2_STYLES",
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DATASETS",
    "DataError",
    "Dataset",
    "IMAGE_EXTENSIONS",
    "Split",
    "list_images",
    "download_cifar10",
    "load_dataset",
    "load_image_folder",
    "load_split_indices",
    "register_dataset",
    "resize_images",
    "save_split_indices",
    "verify_split_indices",
]

logger = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR10_BATCHES = "cifar-10-batches-py"
ARTBENCH2_STYLES = ("post_impressionism", "ukiyo_e")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


class DataError(ValueError):
    """A data input is missing or invalid; the message names it and the fix."""


# ----------------------------------------------------------------------------- containers


@dataclass(frozen=True, eq=False)
class Split:
    """Examples of one split.

    images: [N, C, H, W] float32 in [-1, 1]; labels: [N] int64 (positions in the data set's
    ``class_names``); source_indices: [N] int64, position of each example in the pool it was
    drawn from (see the module docstring).
    """

    images: torch.Tensor
    labels: np.ndarray
    source_indices: np.ndarray

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4 or len(self.labels) != n or len(self.source_indices) != n:
            raise ValueError(
                f"Split needs images [N,C,H,W] and labels/source_indices [N]; got "
                f"{tuple(self.images.shape)}, {self.labels.shape}, {self.source_indices.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, positions: Sequence[int] | np.ndarray) -> Split:
        """The examples at ``positions`` (into this split), e.g. an LDS subset."""
        pos = np.asarray(positions, dtype=np.int64)
        return Split(self.images[torch.from_numpy(pos)], self.labels[pos], self.source_indices[pos])


@dataclass(frozen=True, eq=False)
class Dataset:
    """A data set: train and validation splits plus metadata.

    ``source`` says where the images were read from (for logs and summaries).
    """

    name: str
    train: Split
    val: Split
    class_names: list[str]
    channels: int
    resolution: int
    source: str = ""

    def summary(self) -> dict:
        """Sizes, class counts per split (by class name), resolution, channels, source."""

        def counts(split: Split) -> dict[str, int]:
            c = np.bincount(split.labels, minlength=len(self.class_names))
            return {name: int(c[i]) for i, name in enumerate(self.class_names)}

        return {
            "name": self.name,
            "source": self.source,
            "resolution": self.resolution,
            "channels": self.channels,
            "class_names": list(self.class_names),
            "train": {"size": len(self.train), "class_counts": counts(self.train)},
            "val": {"size": len(self.val), "class_counts": counts(self.val)},
        }


# ----------------------------------------------------------------------------- registry

DATASETS: dict[str, Callable[[DataConfig], Dataset]] = {}


def register_dataset(name: str) -> Callable[[Callable[[DataConfig], Dataset]], Callable]:
    """Decorator: register ``fn(cfg: DataConfig) -> Dataset`` under ``name``."""

    def wrap(fn: Callable[[DataConfig], Dataset]) -> Callable[[DataConfig], Dataset]:
        DATASETS[name] = fn
        return fn

    return wrap


def load_dataset(cfg: DataConfig) -> Dataset:
    """Load the data set ``cfg.name`` with its train/val splits (see the module docstring)."""
    cfg.validate()
    if cfg.name not in DATASETS:
        raise DataError(
            f"unknown data set data.name={cfg.name!r}; known data sets: {', '.join(DATASETS)}"
        )
    t0 = time.perf_counter()
    ds = DATASETS[cfg.name](cfg)
    logger.info(
        "loaded %s: %d train / %d val images, %dx%dx%d, in %.1f s (%s)",
        ds.name, len(ds.train), len(ds.val), ds.channels, ds.resolution, ds.resolution,
        time.perf_counter() - t0, ds.source,
    )
    return ds


# ----------------------------------------------------------------------------- pixels


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


# ----------------------------------------------------------------------------- image files


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


# ----------------------------------------------------------------------------- pools & splits


@dataclass(frozen=True)
class _Pool:
    """Candidate examples in source order, before a split.

    labels: [N] int64 final labels; strata: [N] int64 stratification ids (rank of the class
    name in sorted order); load: positions [n] -> images [n, C, H, W] in [-1, 1];
    what: how messages name the pool, e.g. "the training pool (/data/cifar10/train)".
    """

    labels: np.ndarray
    strata: np.ndarray
    load: Callable[[np.ndarray], torch.Tensor]
    what: str

    def __len__(self) -> int:
        return len(self.labels)


def _select_classes(
    available: Sequence[str], requested: Sequence[str] | None, where: str
) -> list[str]:
    """The class list to use: ``requested`` (validated against ``available``) or all."""
    if not requested:
        return list(available)
    unknown = [c for c in requested if c not in available]
    if unknown:
        raise DataError(
            f"unknown class(es) {', '.join(map(repr, unknown))} in data.classes for {where}; "
            f"known classes: {', '.join(available)}"
        )
    if len(set(requested)) != len(requested):
        raise DataError(f"data.classes={list(requested)} names a class twice; list each once")
    return list(requested)


def _class_pool(
    class_of: np.ndarray, classes: list[str], load_sources: Callable[[np.ndarray], torch.Tensor],
    what: str,
) -> _Pool:
    """A pool of the examples whose class (``class_of``, [M] str) is in ``classes``.

    ``load_sources`` takes positions in the unrestricted source listing.
    """
    keep = np.flatnonzero(np.isin(class_of, classes))
    names = class_of[keep]
    if len(keep) == 0:
        raise DataError(f"{what} holds no images of the classes {', '.join(classes)}")
    labels = np.array([classes.index(c) for c in names], dtype=np.int64)
    strata = np.unique(names, return_inverse=True)[1].astype(np.int64)
    return _Pool(labels, strata, lambda pos: load_sources(keep[pos]), what)


def _draw(
    pool: _Pool, positions: np.ndarray, size: int | None, seed: int, key: str, stratify: bool
) -> np.ndarray:
    """``size`` of ``positions`` by ``train_test_split`` (stratified); None or all: all."""
    n = len(positions)
    if size is None or size == n:
        return positions
    if size > n:
        raise DataError(
            f"{key}={size} but {pool.what} has {n} images; lower it or omit it"
        )
    strata = pool.strata[positions] if stratify else None
    try:
        chosen, _ = train_test_split(
            positions, train_size=size, stratify=strata, random_state=seed
        )
    except ValueError as e:
        raise DataError(
            f"cannot draw {key}={size} stratified by class from {pool.what} "
            f"({_count_text(pool, positions)}): {e}; change {key} or data.classes"
        ) from e
    return np.asarray(chosen, dtype=np.int64)


def _holdout(
    pool: _Pool, size: int, seed: int, key: str, stratify: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Split one pool into (rest, held-out ``size``), stratified; positions into the pool."""
    n = len(pool)
    if size >= n:
        raise DataError(
            f"{key}={size} but {pool.what} has {n} images, and training needs some; "
            "lower it or omit it"
        )
    try:
        rest, held = train_test_split(
            np.arange(n, dtype=np.int64), test_size=size,
            stratify=pool.strata if stratify else None, random_state=seed,
        )
    except ValueError as e:
        raise DataError(
            f"cannot hold out {key}={size} stratified by class from {pool.what} "
            f"({_count_text(pool, np.arange(n))}): {e}; change {key} or data.classes"
        ) from e
    return np.asarray(rest, dtype=np.int64), np.asarray(held, dtype=np.int64)


def _count_text(pool: _Pool, positions: np.ndarray) -> str:
    counts = np.bincount(pool.labels[positions])
    return "images per label: " + ", ".join(f"{i}: {c}" for i, c in enumerate(counts))


def _materialize(pool: _Pool, positions: np.ndarray) -> Split:
    positions = np.asarray(positions, dtype=np.int64)
    return Split(pool.load(positions), pool.labels[positions], positions)


def _default_size(size: int | None, default: int | None, pool_size: int, key: str) -> int | None:
    """``size`` if given, else the paper default (capped at the pool size), else None."""
    if size is not None or default is None:
        return size
    if default > pool_size:
        logger.info("%s: paper default %d > pool of %d images; using all", key, default,
                    pool_size)
        return None
    return default


def _default_holdout(default: int | None, pool_size: int, n_classes: int) -> int:
    """Validation hold-out when data.val_size is None: the paper value if the pool is more
    than twice as large, else 10% of the pool (at least one image per class)."""
    if default is not None and 2 * default < pool_size:
        return default
    size = max(n_classes, pool_size // 10)
    if default is not None:
        logger.info("data.val_size: default %d is too large for a pool of %d images; "
                    "holding out %d", default, pool_size, size)
    return size


def _build(
    name: str,
    cfg: DataConfig,
    train_pool: _Pool,
    val_pool: _Pool | None,
    class_names: list[str],
    source: str,
    defaults: tuple[int | None, int | None] = (None, None),
    stratify: bool = True,
) -> Dataset:
    """Draw the splits (file lists first), then decode only the chosen examples.

    With ``val_pool`` None the validation split is held out of ``train_pool`` first
    (``data.val_size``, default the paper value or 10%) and train is drawn from the rest.
    """
    if val_pool is None:
        val_size = cfg.val_size or _default_holdout(defaults[1], len(train_pool),
                                                    len(class_names))
        rest, val_idx = _holdout(train_pool, val_size, cfg.split_seed, "data.val_size", stratify)
        val_pool = train_pool
    else:
        rest = np.arange(len(train_pool), dtype=np.int64)
        val_size = _default_size(cfg.val_size, defaults[1], len(val_pool), "data.val_size")
        val_idx = _draw(val_pool, np.arange(len(val_pool), dtype=np.int64), val_size,
                        cfg.split_seed, "data.val_size", stratify)
    train_size = _default_size(cfg.train_size, defaults[0], len(rest), "data.train_size")
    train_idx = _draw(train_pool, rest, train_size, cfg.split_seed, "data.train_size", stratify)
    train, val = _materialize(train_pool, train_idx), _materialize(val_pool, val_idx)
    c, h = train.images.shape[1], train.images.shape[2]
    return Dataset(name, train, val, class_names, int(c), int(h), source)


# ----------------------------------------------------------------------------- folder pools


def _need_dir(path: Path, what: str, fix: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{what} {path} does not exist or is not a folder; {fix}")
    return path


def _root(cfg: DataConfig, what: str) -> Path:
    if not cfg.root:
        raise DataError(f"data set {cfg.name!r} needs data.root: the folder of {what}")
    root = Path(cfg.root).expanduser()
    if not root.exists():
        raise DataError(f"data.root={cfg.root} does not exist; point it at the folder of {what}")
    return root


def _class_folders(folder: Path) -> list[str]:
    """Sorted names of sub-folders holding at least one image."""
    return sorted(d.name for d in folder.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and _has_images(d))


def _folder_pool(
    folder: Path,
    available: Sequence[str],
    classes: list[str],
    mode: Callable[[Path], str],
    resolution: int | None,
    what: str,
    crop: int | None | bool = None,
) -> _Pool:
    """A pool over ``folder/<class>/*`` for ``classes``, listed in ``available`` order."""
    files: list[Path] = []
    class_of: list[str] = []
    for c in (c for c in available if c in classes):
        d = _need_dir(folder / c, f"class folder for {c!r}", f"add it or drop {c!r} from "
                      "data.classes")
        listed = list_images(d)
        if not listed:
            raise DataError(f"class folder {d} holds no images; add images or drop {c!r}")
        files += listed
        class_of += [c] * len(listed)

    def load(pos: np.ndarray) -> torch.Tensor:
        chosen = [files[i] for i in pos]
        return _load_files(chosen, mode(files[0]), resolution, crop)

    return _class_pool(np.array(class_of), classes, load, f"{what} ({folder})")


def _mode_memo() -> Callable[[Path], str]:
    """One PIL mode per data set, decided by the first file asked about."""
    memo: dict[str, str] = {}

    def mode(path: Path) -> str:
        if "mode" not in memo:
            memo["mode"] = _image_mode(path)
        return memo["mode"]

    return mode


def _folder_dataset(
    name: str, cfg: DataConfig, root: Path, classes_default: Sequence[str] | None,
    known_order: Sequence[str] | None, resolution: int | None,
    defaults: tuple[int | None, int | None] = (None, None),
) -> Dataset:
    """ROOT/train/<class> + ROOT/test/<class>, or ROOT/<class> split stratified."""
    split_layout = (root / "train").is_dir()
    train_dir = root / "train" if split_layout else root
    available = _class_folders(train_dir)
    if known_order is not None:  # e.g. CIFAR-10 label order instead of sorted names
        available = [c for c in known_order if c in available] + [
            c for c in available if c not in known_order]
    if not available:
        raise DataError(
            f"no class folders with images under {train_dir}; expected {train_dir}/<class>/*.png"
        )
    classes = _select_classes(available, cfg.classes or classes_default, f"{name} at {root}")
    mode = _mode_memo()
    train_pool = _folder_pool(train_dir, available, classes, mode, resolution,
                              "the training pool")
    val_pool = None
    if split_layout:
        test_dir = _need_dir(root / "test", "test folder", f"add {root}/test/<class>/ or "
                             "remove the train/ level to split one pool")
        val_pool = _folder_pool(test_dir, available, classes, mode, resolution, "the test pool")
    return _build(name, cfg, train_pool, val_pool, classes, f"image folder {root}", defaults)


# ----------------------------------------------------------------------------- CIFAR-10


def _cache_dir(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or "~/.cache/dtrak").expanduser()


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar10(cache_dir: Path) -> Path:
    """Download the official archive into ``cache_dir`` (MD5 verified); return its path."""
    target = cache_dir / CIFAR10_ARCHIVE
    if target.is_file() and _md5(target) == CIFAR10_MD5:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    logger.info("downloading %s to %s", CIFAR10_URL, target)
    try:
        urllib.request.urlretrieve(CIFAR10_URL, part)
    except OSError as e:
        raise DataError(
            f"could not download {CIFAR10_URL}: {e}; download it by hand and pass "
            "data.root=PATH/cifar-10-python.tar.gz"
        ) from e
    digest = _md5(part)
    if digest != CIFAR10_MD5:
        part.unlink(missing_ok=True)
        raise DataError(
            f"downloaded {CIFAR10_URL} has MD5 {digest}, expected {CIFAR10_MD5}; "
            "retry, or download it by hand and pass data.root"
        )
    part.replace(target)
    return target


def _find_cifar10(cfg: DataConfig) -> tuple[str, Path]:
    """Locate CIFAR-10: ("folder", ROOT) | ("archive", .tar.gz) | ("batches", batches dir)."""
    candidates: list[Path] = []
    if cfg.root:
        root = Path(cfg.root).expanduser()
        if not root.exists() and not cfg.download:
            raise DataError(
                f"data.root={cfg.root} does not exist; point it at an image-folder tree "
                "(ROOT/train/<class>), cifar-10-python.tar.gz, or set data.download=true"
            )
        candidates.append(root)
    candidates.append(_cache_dir(cfg))
    for c in candidates:
        found = _cifar10_at(c)
        if found is not None:
            return found
    if cfg.download:
        return "archive", download_cifar10(_cache_dir(cfg))
    where = f"data.root={cfg.root}" if cfg.root else "no data.root given"
    raise DataError(
        f"CIFAR-10 not found ({where}; cache {_cache_dir(cfg)} has no {CIFAR10_ARCHIVE}): "
        "pass data.root (an image-folder tree ROOT/train/<class>, cifar-10-python.tar.gz, or "
        "a folder holding it or cifar-10-batches-py/) or set data.download=true"
    )


def _cifar10_at(p: Path) -> tuple[str, Path] | None:
    if p.is_file() and p.name.endswith((".tar.gz", ".tgz")):
        return "archive", p
    if not p.is_dir():
        return None
    if (p / "data_batch_1").is_file():
        return "batches", p
    if (p / CIFAR10_BATCHES / "data_batch_1").is_file():
        return "batches", p / CIFAR10_BATCHES
    if (p / CIFAR10_ARCHIVE).is_file():
        return "archive", p / CIFAR10_ARCHIVE
    if (p / "train").is_dir():
        return "folder", p
    return None


_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))


def _unpickle_batch(f) -> tuple[np.ndarray, np.ndarray]:
    # pickle is used ONLY because it is the official CIFAR-10 archive's own format;
    # dtrak never pickles anything of its own.
    d = pickle.load(f, encoding="bytes")
    data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(d[b"labels"], dtype=np.int64)


def _read_cifar10_batches(kind: str, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All six batches by name: images [n, 3, 32, 32] uint8, labels [n] int64."""
    wanted = (*_TRAIN_BATCHES, "test_batch")
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        if kind == "batches":
            for b in wanted:
                if (path / b).is_file():
                    with open(path / b, "rb") as f:
                        batches[b] = _unpickle_batch(f)
        else:
            with tarfile.open(path, "r:gz") as tar:
                for m in tar:
                    if m.isfile() and Path(m.name).name in wanted:
                        batches[Path(m.name).name] = _unpickle_batch(tar.extractfile(m))
    except (OSError, EOFError, tarfile.TarError, pickle.UnpicklingError, KeyError,
            ValueError) as e:
        raise DataError(f"cannot read CIFAR-10 from {path}: {e}; re-download the archive") from e
    missing = [b for b in wanted if b not in batches]
    if missing:
        raise DataError(
            f"CIFAR-10 at {path} lacks {', '.join(missing)}; re-download the official archive"
        )
    return batches


def _cifar10_array_pools(
    kind: str, path: Path, classes: list[str], resolution: int | None
) -> tuple[_Pool, _Pool]:
    batches = _read_cifar10_batches(kind, path)
    names = np.array(CIFAR10_CLASSES)

    def pool(keys: Sequence[str], what: str) -> _Pool:
        x = np.concatenate([batches[k][0] for k in keys])
        y = np.concatenate([batches[k][1] for k in keys])
        return _class_pool(names[y], classes,
                           lambda pos: resize_images(_to_float(x[pos]), resolution),
                           f"{what} ({path})")

    return pool(_TRAIN_BATCHES, "the training pool"), pool(("test_batch",), "the test pool")


def _cifar(name: str, cfg: DataConfig, default_classes: Sequence[str] | None,
           defaults: tuple[int | None, int | None]) -> Dataset:
    kind, path = _find_cifar10(cfg)
    if kind == "folder":
        return _folder_dataset(name, cfg, path, default_classes, CIFAR10_CLASSES,
                               cfg.resolution, defaults)
    classes = _select_classes(CIFAR10_CLASSES, cfg.classes or default_classes,
                              f"{name} (CIFAR-10)")
    train_pool, test_pool = _cifar10_array_pools(kind, path, classes, cfg.resolution)
    return _build(name, cfg, train_pool, test_pool, classes, f"CIFAR-10 {kind} {path}",
                  defaults)


@register_dataset("cifar10")
def cifar10(cfg: DataConfig) -> Dataset:
    """CIFAR-10 from an image-folder tree or the official archive (see :func:`_find_cifar10`).

    data.classes restricts the classes; train_size/val_size None: all images.
    """
    return _cifar("cifar10", cfg, None, (None, None))


@register_dataset("cifar2")
def cifar2(cfg: DataConfig) -> Dataset:
    """CIFAR-2 (automobile = 0, horse = 1; data.classes overrides): paper sizes 5000 / 1000."""
    return _cifar("cifar2", cfg, ("automobile", "horse"), (5000, 1000))


# ----------------------------------------------------------------------------- other sets


@register_dataset("digits")
def digits(cfg: DataConfig) -> Dataset:
    """scikit-learn's 1797 8x8 grey digits (no download), classes "0".."9".

    val = stratified hold-out of data.val_size from all images (default 297, or 10% when
    data.classes leaves fewer than 594 images); train = stratified data.train_size of the
    rest (default all). Pixels 0..16 map to [-1, 1]; data.resolution resizes with
    :func:`resize_images`.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(bunch.data.astype(np.float32).reshape(-1, 1, 8, 8) / 8.0 - 1.0)
    x = resize_images(x, cfg.resolution)
    names = np.array([str(int(t)) for t in bunch.target])
    available = [str(i) for i in range(10)]
    classes = _select_classes(available, cfg.classes, "digits")
    pool = _class_pool(names, classes, lambda pos: x[torch.from_numpy(pos)],
                       "the digits pool (1797 images)")
    return _build("digits", cfg, pool, None, classes, "sklearn.datasets.load_digits",
                  defaults=(None, 297))


@register_dataset("imagefolder")
def imagefolder(cfg: DataConfig) -> Dataset:
    """ROOT/<class>/* (split stratified: val_size default 10%) or ROOT/train|test/<class>/*.

    Classes are sorted folder names; data.resolution center-crops and resizes.
    """
    root = _root(cfg, "images (ROOT/<class>/* or ROOT/train/<class>/*)")
    return _folder_dataset("imagefolder", cfg, root, None, None, cfg.resolution)


@register_dataset("artbench")
def artbench(cfg: DataConfig) -> Dataset:
    """ArtBench by style: ROOT/<style>/* or ROOT/train|test/<style>/*.

    Default styles post_impressionism, ukiyo_e (ArtBench-2); resolution default 256;
    paper sizes 5000 / 1000 (capped at the pool size).
    """
    root = _root(cfg, "ArtBench images (ROOT/<style>/* or ROOT/train/<style>/*)")
    return _folder_dataset("artbench", cfg, root, ARTBENCH2_STYLES, None,
                           cfg.resolution or 256, defaults=(5000, 1000))


def _celeba_partitions(root: Path) -> dict[int, list[str]]:
    """File names per partition of ROOT/list_eval_partition.txt, sorted by name."""
    listing = root / "list_eval_partition.txt"
    if not listing.is_file():
        raise DataError(f"CelebA partition list {listing} is missing; it ships with CelebA")
    parts: dict[int, list[str]] = {}
    for lineno, line in enumerate(listing.read_text().splitlines(), 1):
        fields = line.replace(",", " ").split()
        if not fields or fields[0] == "image_id":
            continue
        if len(fields) != 2 or not fields[1].isdigit():
            raise DataError(f"{listing}:{lineno}: expected '<file> <partition>', got {line!r}")
        parts.setdefault(int(fields[1]), []).append(fields[0])
    return {k: sorted(v) for k, v in parts.items()}


@register_dataset("celeba")
def celeba(cfg: DataConfig) -> Dataset:
    """CelebA: ROOT/img_align_celeba/*.jpg + ROOT/list_eval_partition.txt.

    train = data.train_size (default 5000) from partition 0, val = data.val_size (default
    1000) from partition 1, plain random draws (no labels: all 0); center crop 140, resize
    to data.resolution (default 64).
    """
    root = _root(cfg, "CelebA (img_align_celeba/ and list_eval_partition.txt)")
    img_dir = _need_dir(root / "img_align_celeba", "CelebA image folder",
                        "data.root must hold img_align_celeba/")
    parts = _celeba_partitions(root)
    res = cfg.resolution or 64
    mode = _mode_memo()

    def pool(part: int, what: str) -> _Pool:
        files = [img_dir / f for f in parts.get(part, [])]
        if not files:
            raise DataError(f"{root}/list_eval_partition.txt lists no images of partition {part}")
        n = len(files)
        return _Pool(np.zeros(n, np.int64), np.zeros(n, np.int64),
                     lambda pos: _load_files([files[i] for i in pos], mode(files[0]), res, 140),
                     f"{what} ({img_dir}, partition {part})")

    return _build("celeba", cfg, pool(0, "the training pool"), pool(1, "the validation pool"),
                  ["face"], f"CelebA {root}", defaults=(5000, 1000), stratify=False)


# ----------------------------------------------------------------------------- saved indices


def save_split_indices(ds: Dataset, path: str | Path) -> Path:
    """Write the chosen examples as JSON: train/val source indices and labels, plus metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": ds.name,
        "class_names": list(ds.class_names),
        "resolution": ds.resolution,
        "channels": ds.channels,
        "source": ds.source,
        "train": ds.train.source_indices.tolist(),
        "val": ds.val.source_indices.tolist(),
        "train_labels": ds.train.labels.tolist(),
        "val_labels": ds.val.labels.tolist(),
    }
    path.write_text(json.dumps(payload) + "\n")
    return path


def load_split_indices(path: str | Path) -> dict:
    """Read :func:`save_split_indices` JSON; the four index/label lists become int64 arrays."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"split index file {path} does not exist; run the data stage first")
    try:
        d = json.loads(path.read_text())
        for key in ("train", "val", "train_labels", "val_labels"):
            d[key] = np.asarray(d[key], dtype=np.int64)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"split index file {path} is not valid: {e}; re-run the data stage") from e
    return d


def verify_split_indices(ds: Dataset, saved: dict | str | Path) -> None:
    """Raise DataError unless ``ds`` selects the same examples as the saved split indices."""
    d = saved if isinstance(saved, dict) else load_split_indices(saved)
    for split_name in ("train", "val"):
        split = getattr(ds, split_name)
        same = np.array_equal(split.source_indices, np.asarray(d[split_name])) and np.array_equal(
            split.labels, np.asarray(d[f"{split_name}_labels"]))
        if not same:
            raise DataError(
                f"the {split_name} split of data set {ds.name!r} differs from the saved split "
                "indices; the data or data config changed since the run was made: restore "
                "them or start a new run"
            )
