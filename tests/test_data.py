"""Data sets, paper splits and image loading (tiny fakes under tmp_path; no network)."""

from __future__ import annotations

import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtrak import data
from dtrak.config import DataConfig
from dtrak.data import (
    CIFAR10_CLASSES,
    DATASETS,
    DataError,
    Dataset,
    Split,
    load_dataset,
    load_image_folder,
    load_split_indices,
    save_split_indices,
    verify_split_indices,
)


def _shared_cifar10() -> Path:
    base = os.environ.get("DTRAK_SHARED_DATA")
    root = Path(base) if base else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root / "cifar10"


def _write_image(path: Path, size: tuple[int, int] = (8, 8), mode: str = "RGB", seed: int = 0):
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0]) if mode == "L" else (size[1], size[0], 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path)


def _make_folder(root: Path, counts: dict[str, int], size=(8, 8), mode="RGB") -> Path:
    seed = 0
    for cls, n in counts.items():
        for i in range(n):
            _write_image(root / cls / f"{i:04d}.png", size, mode, seed)
            seed += 1
    return root


def _cifar_batch(n_per_class: int, offset: int) -> dict:
    labels = np.tile(np.arange(10), n_per_class)
    x = (np.arange(len(labels))[:, None] + offset + np.arange(3072)[None]) % 256
    return {b"data": x.astype(np.uint8), b"labels": labels.tolist()}


def _make_cifar_batches(root: Path) -> Path:
    """A tiny cifar-10-batches-py: 5 x 20 training images (2 per class), 40 test images."""
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle.dumps(_cifar_batch(2, 7 * i)))
    (d / "test_batch").write_bytes(pickle.dumps(_cifar_batch(4, 99)))
    return d


# ----------------------------------------------------------------------------- digits


def test_digits_default_split_sizes():
    ds = load_dataset(DataConfig(name="digits"))
    assert (len(ds.train), len(ds.val)) == (1500, 297)
    assert ds.channels == 1 and ds.resolution == 8
    assert ds.train.images.shape == (1500, 1, 8, 8) and ds.train.images.dtype == torch.float32
    assert ds.train.labels.dtype == np.int64 and ds.train.source_indices.dtype == np.int64
    assert float(ds.train.images.min()) == -1.0 and float(ds.train.images.max()) == 1.0
    all_idx = np.concatenate([ds.train.source_indices, ds.val.source_indices])
    assert len(np.unique(all_idx)) == 1797


def test_digits_subset_stratified_reproducible_and_resized():
    cfg = DataConfig(name="digits", resolution=16, train_size=500, val_size=200)
    a, b = load_dataset(cfg), load_dataset(cfg)
    assert (len(a.train), len(a.val)) == (500, 200)
    assert np.array_equal(a.train.source_indices, b.train.source_indices)
    assert np.array_equal(a.val.source_indices, b.val.source_indices)
    assert torch.equal(a.train.images, b.train.images)
    assert not set(a.train.source_indices) & set(a.val.source_indices)
    assert np.bincount(a.train.labels).min() >= 48 and np.bincount(a.val.labels).min() >= 19
    assert a.train.images.shape == (500, 1, 16, 16)
    assert float(a.train.images.min()) >= -1.0 and float(a.train.images.max()) <= 1.0
    other = load_dataset(DataConfig(name="digits", train_size=500, val_size=200, split_seed=1))
    assert not np.array_equal(a.train.source_indices, other.train.source_indices)
    summary = a.summary()
    assert summary["train"]["size"] == 500 and sum(summary["val"]["class_counts"].values()) == 200


def test_digits_errors():
    with pytest.raises(DataError, match=r"data.train_size=6000 .* 1500 images; lower it"):
        load_dataset(DataConfig(name="digits", train_size=6000))
    with pytest.raises(DataError, match=r"unknown class.*'x'.*known classes: 0, 1"):
        load_dataset(DataConfig(name="digits", classes=("1", "x")))
    with pytest.raises(DataError, match=r"unknown data set data.name='mnist'; known.*cifar2.*digits"):
        load_dataset(DataConfig(name="mnist"))
    assert {"digits", "cifar10", "cifar2", "celeba", "artbench", "imagefolder"} <= set(DATASETS)


def test_split_select_and_dataset_container():
    ds = load_dataset(DataConfig(name="digits", train_size=40, val_size=20))
    sub = ds.train.select([3, 1])
    assert len(sub) == 2 and sub.source_indices[0] == ds.train.source_indices[3]
    assert torch.equal(sub.images[1], ds.train.images[1])
    assert isinstance(ds, Dataset) and isinstance(sub, Split)


def test_split_indices_round_trip(tmp_path):
    ds = load_dataset(DataConfig(name="digits", train_size=40, val_size=20))
    path = save_split_indices(ds, tmp_path / "run" / "split.json")
    d = load_split_indices(path)
    assert np.array_equal(d["train"], ds.train.source_indices)
    assert np.array_equal(d["val_labels"], ds.val.labels)
    assert d["class_names"] == ds.class_names and d["resolution"] == 8
    verify_split_indices(ds, path)
    other = load_dataset(DataConfig(name="digits", train_size=40, val_size=20, split_seed=3))
    with pytest.raises(DataError, match="differs from the saved split"):
        verify_split_indices(other, d)
    with pytest.raises(DataError, match="does not exist"):
        load_split_indices(tmp_path / "nope.json")


# ----------------------------------------------------------------------------- CIFAR-2 (shared)


def test_cifar2_paper_split_from_shared_folder(monkeypatch):
    root = _shared_cifar10()
    if not (root / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 folder {root} is absent")
    cfg = DataConfig(name="cifar2", root=str(root))
    ds = load_dataset(cfg)
    assert ds.class_names == ["automobile", "horse"]
    assert ds.train.images.shape == (5000, 3, 32, 32) and ds.val.images.shape == (1000, 3, 32, 32)
    assert np.bincount(ds.train.labels).tolist() == [2500, 2500]
    assert np.bincount(ds.val.labels).tolist() == [500, 500]
    assert ds.train.source_indices.max() < 10_000 and ds.val.source_indices.max() < 2_000
    assert len(np.unique(ds.train.source_indices)) == 5000
    # The pool is automobile 0..4999 then horse 5000..9999, files sorted by name.
    i = int(ds.train.source_indices[0])
    cls, pos = CIFAR10_CLASSES[1 if i < 5000 else 7], i % 5000
    with Image.open(root / "train" / cls / f"{pos:04d}.jpg") as im:
        ref = np.array(im.convert("RGB"))
    assert torch.allclose(ds.train.images[0], torch.from_numpy(ref).permute(2, 0, 1) / 127.5 - 1)
    # Same indices on a second run (split drawn on the file list; decoding skipped here).
    monkeypatch.setattr(data.loaders, "_load_files",
                        lambda paths, *a, **k: torch.zeros(len(paths), 3, 32, 32))
    again = load_dataset(cfg)
    assert np.array_equal(again.train.source_indices, ds.train.source_indices)
    assert np.array_equal(again.val.source_indices, ds.val.source_indices)


# ----------------------------------------------------------------------------- official archive


def test_fake_official_archive_directory_and_tarball(tmp_path):
    batches = _make_cifar_batches(tmp_path / "extracted")
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "extracted"),
                                 cache_dir=str(tmp_path / "cache")))
    assert (len(ds.train), len(ds.val)) == (100, 40) and ds.class_names == list(CIFAR10_CLASSES)
    raw = _cifar_batch(2, 7)[b"data"][0].reshape(3, 32, 32)
    first = int(np.flatnonzero(ds.train.source_indices == 0)[0])
    assert torch.allclose(ds.train.images[first], torch.from_numpy(raw).float() / 127.5 - 1)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(batches, arcname="cifar-10-batches-py")
    ds2 = load_dataset(DataConfig(name="cifar2", root=str(tar_path), resolution=16,
                                  cache_dir=str(tmp_path / "cache")))
    assert ds2.class_names == ["automobile", "horse"] and ds2.resolution == 16
    assert (len(ds2.train), len(ds2.val)) == (20, 8)  # paper sizes capped at the tiny pools
    assert np.bincount(ds2.train.labels).tolist() == [10, 10]


def test_class_order_sets_labels_not_the_draw(tmp_path):
    _make_cifar_batches(tmp_path)
    kw = dict(name="cifar2", root=str(tmp_path), train_size=10, val_size=4,
              cache_dir=str(tmp_path / "cache"))
    a = load_dataset(DataConfig(**kw))
    b = load_dataset(DataConfig(**kw, classes=("horse", "automobile")))
    assert np.array_equal(a.train.source_indices, b.train.source_indices)
    assert np.array_equal(a.train.labels, 1 - b.train.labels)
    assert b.class_names == ["horse", "automobile"]


def test_cifar10_missing_and_download_checksum(tmp_path, monkeypatch):
    cfg = DataConfig(name="cifar10", cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"CIFAR-10 not found.*data.root.*data.download=true"):
        load_dataset(cfg)
    with pytest.raises(DataError, match=r"data.root=.*nope does not exist"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path / "nope"),
                                cache_dir=str(tmp_path / "cache")))

    def fake_urlretrieve(url, filename):
        assert url == data.CIFAR10_URL
        Path(filename).write_bytes(b"not the archive")

    monkeypatch.setattr(data.loaders.urllib.request, "urlretrieve", fake_urlretrieve)
    with pytest.raises(DataError, match=r"MD5 .* expected c58f30108f718f92721af3b95e74349a"):
        load_dataset(DataConfig(name="cifar10", download=True, cache_dir=str(tmp_path / "c")))
    assert not list((tmp_path / "c").iterdir())


def test_corrupt_archive_member(tmp_path):
    d = _make_cifar_batches(tmp_path)
    (d / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"cannot read CIFAR-10"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path),
                                cache_dir=str(tmp_path / "cache")))


# ----------------------------------------------------------------------------- image folders


def test_imagefolder_flat_split_and_train_test_layout(tmp_path):
    _make_folder(tmp_path / "flat", {"a": 10, "b": 10})
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "flat"), val_size=4))
    assert (len(ds.train), len(ds.val)) == (16, 4) and ds.class_names == ["a", "b"]
    assert np.bincount(ds.val.labels).tolist() == [2, 2]
    assert not set(ds.train.source_indices) & set(ds.val.source_indices)
    root = tmp_path / "tree"
    _make_folder(root / "train", {"a": 6, "b": 6, "c": 6})
    _make_folder(root / "test", {"a": 3, "b": 3, "c": 3})
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), classes=("c", "a"),
                                 train_size=8, resolution=4))
    assert (len(ds.train), len(ds.val)) == (8, 6) and ds.class_names == ["c", "a"]
    assert ds.train.images.shape == (8, 3, 4, 4) and np.bincount(ds.train.labels).tolist() == [4, 4]


def test_imagefolder_grey_images_give_one_channel(tmp_path):
    _make_folder(tmp_path, {"a": 4, "b": 4}, mode="L")
    ds = load_dataset(DataConfig(name="imagefolder", root=str(tmp_path), val_size=2))
    assert ds.channels == 1 and ds.train.images.shape[1:] == (1, 8, 8)


def test_imagefolder_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.*missing does not exist"):
        load_dataset(DataConfig(name="imagefolder", root=str(tmp_path / "missing")))
    with pytest.raises(DataError, match=r"needs data.root"):
        load_dataset(DataConfig(name="imagefolder"))
    root = _make_folder(tmp_path / "ok", {"a": 6, "b": 6})
    with pytest.raises(DataError, match=r"unknown class\(es\) 'zebra'.*known classes: a, b"):
        load_dataset(DataConfig(name="imagefolder", root=str(root), classes=("a", "zebra")))
    with pytest.raises(DataError, match=r"data.train_size=100 but the training pool .* has 10"):
        load_dataset(DataConfig(name="imagefolder", root=str(root), val_size=2, train_size=100))
    with pytest.raises(DataError, match=r"data.val_size=12 but the training pool"):
        load_dataset(DataConfig(name="imagefolder", root=str(root), val_size=12))


def test_corrupt_and_wrongly_sized_images(tmp_path):
    root = _make_folder(tmp_path / "bad", {"a": 4, "b": 4})
    (root / "b" / "0002.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"cannot read image .*b/0002.png.*remove or replace"):
        load_dataset(DataConfig(name="imagefolder", root=str(root), val_size=2))
    root = _make_folder(tmp_path / "sizes", {"a": 4, "b": 4})
    _write_image(root / "a" / "0001.png", size=(10, 10))
    with pytest.raises(DataError, match=r"a/0001.png is 10x10 but .* set data.resolution"):
        load_dataset(DataConfig(name="imagefolder", root=str(root), val_size=2))
    ds = load_dataset(DataConfig(name="imagefolder", root=str(root), val_size=2, resolution=8))
    assert ds.train.images.shape[1:] == (3, 8, 8)


def test_load_image_folder_recursive_list_and_errors(tmp_path):
    _write_image(tmp_path / "t" / "z.png", seed=1)
    _write_image(tmp_path / "t" / "sub" / "a.png", seed=2)
    (tmp_path / "t" / "notes.txt").write_text("ignored")
    images, paths = load_image_folder(tmp_path / "t")
    assert [p.name for p in paths] == ["a.png", "z.png"] and images.shape == (2, 3, 8, 8)
    grey, _ = load_image_folder([paths[1]], resolution=4, channels=1)
    assert grey.shape == (1, 1, 4, 4)
    with pytest.raises(DataError, match="does not exist"):
        load_image_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty")


# ----------------------------------------------------------------------------- CelebA, ArtBench


def test_fake_celeba(tmp_path):
    lines = []
    for i in range(10):
        name = f"{i + 1:06d}.jpg"
        _write_image(tmp_path / "img_align_celeba" / name, size=(150, 160), seed=i)
        lines.append(f"{name} {0 if i < 6 else 1}")
    (tmp_path / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset(DataConfig(name="celeba", root=str(tmp_path), train_size=4, val_size=2,
                                 resolution=16))
    assert ds.train.images.shape == (4, 3, 16, 16) and len(ds.val) == 2
    assert ds.train.labels.tolist() == [0] * 4 and ds.val.source_indices.max() < 4
    with pytest.raises(DataError, match="data.train_size=7 but the training pool"):
        load_dataset(DataConfig(name="celeba", root=str(tmp_path), train_size=7))


def test_fake_artbench_default_styles(tmp_path):
    _make_folder(tmp_path, {"post_impressionism": 6, "ukiyo_e": 6, "baroque": 6}, size=(12, 12))
    ds = load_dataset(DataConfig(name="artbench", root=str(tmp_path), val_size=4, resolution=8))
    assert ds.class_names == ["post_impressionism", "ukiyo_e"]
    assert (len(ds.train), len(ds.val)) == (8, 4) and ds.resolution == 8
    ds = load_dataset(DataConfig(name="artbench", root=str(tmp_path), resolution=8))
    assert (len(ds.train), len(ds.val)) == (10, 2)  # paper 5000/1000 exceed this tiny pool



# ----------------------------------------------------------------------------- unpickling safety


class _Evil:
    """Unpickles into a call that writes a marker file (stands in for os.system)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "ran")


def test_cifar_batch_refuses_code_and_checks_its_shape(tmp_path):
    d = _make_cifar_batches(tmp_path)
    marker = tmp_path / "pwned"
    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": []}))
    cfg = DataConfig(name="cifar10", root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match=r"refusing to unpickle pathlib.*write_text from "
                       r".*data_batch_2: a CIFAR-10 batch holds only arrays"):
        load_dataset(cfg)
    assert not marker.exists()
    (d / "data_batch_2").write_bytes(pickle.dumps((os.system, ("touch " + str(marker),))))
    with pytest.raises(DataError, match=r"refusing to unpickle (posix|nt)\.system"):
        load_dataset(cfg)
    assert not marker.exists()
    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8),
                                                  b"labels": [0, 1]}))
    with pytest.raises(DataError, match=r"data_batch_2 is not a CIFAR-10 batch"):
        load_dataset(cfg)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar_batch_genuine_format_loads(tmp_path, protocol):
    d = _make_cifar_batches(tmp_path)
    batch = _cifar_batch(2, 3)  # the official keys: data, labels, batch_label, filenames
    batch.update({b"batch_label": b"training batch 2 of 5",
                  b"filenames": [b"%d.png" % i for i in range(20)]})
    (d / "data_batch_2").write_bytes(pickle.dumps(batch, protocol=protocol))
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path),
                                 cache_dir=str(tmp_path / "cache")))
    assert (len(ds.train), len(ds.val)) == (100, 40)
    pos = int(np.flatnonzero(ds.train.source_indices == 20)[0])  # first image of batch 2
    raw = batch[b"data"][0].reshape(3, 32, 32)
    assert torch.allclose(ds.train.images[pos], torch.from_numpy(raw).float() / 127.5 - 1)
