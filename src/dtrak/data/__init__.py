"""Data sets, the paper's splits, and image loading.

Three modules, one concept each: :mod:`~dtrak.data.files` (image files on disk),
:mod:`~dtrak.data.splits` (splits and their saved indices) and :mod:`~dtrak.data.loaders`
(the data sets by name).

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

from .files import (
    IMAGE_EXTENSIONS,
    METADATA_FILE,
    DataError,
    list_images,
    load_image_folder,
    metadata_captions,
    resize_images,
)
from .loaders import (
    ARTBENCH2_STYLES,
    CIFAR10_CLASSES,
    CIFAR10_MD5,
    CIFAR10_URL,
    DATASETS,
    download_cifar10,
    load_dataset,
    register_dataset,
)
from .splits import (
    Dataset,
    Split,
    load_split_indices,
    save_split_indices,
    verify_split_indices,
)

__all__ = [
    "ARTBENCH2_STYLES",
    "CIFAR10_CLASSES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DATASETS",
    "DataError",
    "Dataset",
    "IMAGE_EXTENSIONS",
    "METADATA_FILE",
    "Split",
    "list_images",
    "download_cifar10",
    "load_dataset",
    "load_image_folder",
    "load_split_indices",
    "metadata_captions",
    "register_dataset",
    "resize_images",
    "save_split_indices",
    "verify_split_indices",
]
