"""The data sets by name (CIFAR-10, CIFAR-2, digits, image folders, ArtBench, CelebA) and
their registry: :func:`load_dataset` resolves a :class:`~dtrak.config.DataConfig`.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import tarfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from .files import (
    DataError,
    _has_images,
    _image_mode,
    _load_files,
    _to_float,
    list_images,
    resize_images,
)
from .splits import (
    Dataset,
    _build,
    _class_pool,
    _Pool,
    _select_classes,
)

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

    return _class_pool(np.array(class_of), classes, load, f"{what} ({folder})", files)


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


# the globals an official CIFAR-10 batch (or a re-pickled one, any protocol) names: numpy's
# ndarray rebuilders and plain builtin types; everything else is refused
_CIFAR10_GLOBALS = {
    *((m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray")
      for n in ("_reconstruct", "scalar")),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    *((m, n) for m in ("builtins", "__builtin__")
      for n in ("list", "dict", "tuple", "bytes", "bytearray", "str", "int")),
}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds only arrays, lists and dicts (see ``_CIFAR10_GLOBALS``)."""

    def __init__(self, f, name: str):
        super().__init__(f, encoding="bytes")
        self.name = name

    def find_class(self, module: str, name: str):
        if (module, name) not in _CIFAR10_GLOBALS:
            raise DataError(
                f"refusing to unpickle {module}.{name} from {self.name}: a CIFAR-10 batch "
                "holds only arrays and lists; the file is damaged or not from CIFAR-10"
            )
        return super().find_class(module, name)


def _unpickle_batch(f, name: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file ``f`` (named ``name`` in errors): images [n, 3, 32, 32], labels [n]."""
    # pickle is used ONLY because it is the official CIFAR-10 archive's own format;
    # dtrak never pickles anything of its own, and reads it with a restricted unpickler.
    d = _BatchUnpickler(f, name).load()
    data = d.get(b"data") if isinstance(d, dict) else None
    labels = d.get(b"labels") if isinstance(d, dict) else None
    if (not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32
            or data.dtype != np.uint8 or not isinstance(labels, list | np.ndarray)
            or len(labels) != len(data)):
        raise DataError(
            f"{name} is not a CIFAR-10 batch: expected a dict with b'data' (uint8 [n, 3072]) "
            "and b'labels' (n labels); re-download the official archive"
        )
    y = np.asarray(labels, dtype=np.int64)
    if y.size and (y.min() < 0 or y.max() >= len(CIFAR10_CLASSES)):
        raise DataError(f"{name} has labels outside 0..9; re-download the official archive")
    return data.reshape(-1, 3, 32, 32), y


def _read_cifar10_batches(kind: str, path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """All six batches by name: images [n, 3, 32, 32] uint8, labels [n] int64."""
    wanted = (*_TRAIN_BATCHES, "test_batch")
    batches: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        if kind == "batches":
            for b in wanted:
                if (path / b).is_file():
                    with open(path / b, "rb") as f:
                        batches[b] = _unpickle_batch(f, str(path / b))
        else:
            with tarfile.open(path, "r:gz") as tar:
                for m in tar:
                    if m.isfile() and Path(m.name).name in wanted:
                        batches[Path(m.name).name] = _unpickle_batch(tar.extractfile(m),
                                                                     f"{path}:{m.name}")
    except DataError:
        raise
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
