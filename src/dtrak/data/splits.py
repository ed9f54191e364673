"""Splits: a data set as a training and a validation split, drawn by the paper's protocol.

See :mod:`dtrak.data` for how a split is drawn.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from ..config import DataConfig
from .files import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Split:
    """Examples of one split.

    images: [N, C, H, W] float32 in [-1, 1]; labels: [N] int64 (positions in the data set's
    ``class_names``); source_indices: [N] int64, position of each example in the pool it was
    drawn from (see the module docstring); files: [N] the image file of each example, for
    data sets read from files (None otherwise), e.g. to look up its caption.
    """

    images: torch.Tensor
    labels: np.ndarray
    source_indices: np.ndarray
    files: tuple[Path, ...] | None = None

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4 or len(self.labels) != n or len(self.source_indices) != n or (
                self.files is not None and len(self.files) != n):
            raise ValueError(
                f"Split needs images [N,C,H,W] and labels/source_indices [N]; got "
                f"{tuple(self.images.shape)}, {self.labels.shape}, {self.source_indices.shape}"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def select(self, positions: Sequence[int] | np.ndarray) -> Split:
        """The examples at ``positions`` (into this split), e.g. an LDS subset."""
        pos = np.asarray(positions, dtype=np.int64)
        files = None if self.files is None else tuple(self.files[i] for i in pos)
        return Split(self.images[torch.from_numpy(pos)], self.labels[pos], self.source_indices[pos],
                     files)


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


@dataclass(frozen=True)
class _Pool:
    """Candidate examples in source order, before a split.

    labels: [N] int64 final labels; strata: [N] int64 stratification ids (rank of the class
    name in sorted order); load: positions [n] -> images [n, C, H, W] in [-1, 1];
    what: how messages name the pool, e.g. "the training pool (/data/cifar10/train)";
    files: [N] the file of each example (None: not read from files).
    """

    labels: np.ndarray
    strata: np.ndarray
    load: Callable[[np.ndarray], torch.Tensor]
    what: str
    files: tuple[Path, ...] | None = None

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
    what: str, files: Sequence[Path] | None = None,
) -> _Pool:
    """A pool of the examples whose class (``class_of``, [M] str) is in ``classes``.

    ``load_sources`` takes positions in the unrestricted source listing, as ``files`` (the
    file of each listed example, if any) is indexed.
    """
    keep = np.flatnonzero(np.isin(class_of, classes))
    names = class_of[keep]
    if len(keep) == 0:
        raise DataError(f"{what} holds no images of the classes {', '.join(classes)}")
    labels = np.array([classes.index(c) for c in names], dtype=np.int64)
    strata = np.unique(names, return_inverse=True)[1].astype(np.int64)
    kept = None if files is None else tuple(files[i] for i in keep)
    return _Pool(labels, strata, lambda pos: load_sources(keep[pos]), what, kept)


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
    files = None if pool.files is None else tuple(pool.files[i] for i in positions)
    return Split(pool.load(positions), pool.labels[positions], positions, files)


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
