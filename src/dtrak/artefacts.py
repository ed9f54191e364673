"""Reading and writing a run's artefacts so that a damaged one is never used.

``.npy`` files are opened only after their header and their size on disk agree: numpy's
``mmap_mode="r+"`` silently grows a short file back to full size with zeros, which would
turn a truncated feature store into rows of zeros that its done mask calls finished. New
memory-mapped files get their disk space allocated up front, so a full disk fails at
creation with an ``OSError`` rather than as a bus error in the middle of a write. Small
arrays and JSON files are written to a temporary name and renamed into place, so a kill
leaves either the old file or the new one. Digests name what an artefact was made from.

numpy has no checked open (``np.load`` trusts the header and ``r+`` resizes), hence these
few lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DamagedArtefactError", "as_os_error", "check_npy", "create_npy", "digest",
           "load_npy", "open_npy", "save_json", "save_npy"]


class DamagedArtefactError(ValueError):
    """A file of a run is short, unreadable or of another shape than its metadata says."""


def _damaged(path: Path, what: str) -> DamagedArtefactError:
    return DamagedArtefactError(
        f"{path} is damaged ({what}); delete it and run the stage again to recompute it")


def as_os_error(error: Exception, path: str | Path) -> Exception:
    """The ``OSError`` behind a library's write error (safetensors reports a full disk as
    ``SafetensorError: ... (os error 28)``), or the error itself when there is none."""
    found = re.search(r"os error (\d+)", str(error))
    if found is None:
        return error
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def check_npy(path: str | Path, shape: tuple | None = None, dtype: Any = None
              ) -> tuple[tuple, np.dtype]:
    """The (shape, dtype) of the ``.npy`` file at ``path``, after checking that its size on
    disk matches its header (and ``shape`` / ``dtype`` when given)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                head = np.lib.format.read_array_header_1_0(f)
            else:
                head = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise _damaged(path, f"unreadable header: {e}") from e
    file_shape, _, file_dtype = head
    expected = offset + int(np.prod(file_shape, dtype=np.int64)) * file_dtype.itemsize
    size = path.stat().st_size
    if size != expected:
        raise _damaged(path, f"{size} bytes on disk, its header says {expected}")
    if shape is not None and tuple(file_shape) != tuple(shape):
        raise _damaged(path, f"shape {tuple(file_shape)}, expected {tuple(shape)}")
    if dtype is not None and file_dtype != np.dtype(dtype):
        raise _damaged(path, f"dtype {file_dtype}, expected {np.dtype(dtype)}")
    return tuple(file_shape), file_dtype


def open_npy(path: str | Path, shape: tuple | None = None, dtype: Any = None,
             mode: str = "r+") -> np.memmap:
    """Memory-map a checked ``.npy`` file (never resized: see :func:`check_npy`)."""
    check_npy(path, shape, dtype)
    return np.load(path, mmap_mode=mode)


def create_npy(path: str | Path, shape: tuple, dtype: Any) -> np.memmap:
    """A new zero-filled ``.npy`` memmap whose disk space is allocated now."""
    path = Path(path)
    try:
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=tuple(shape))
        arr.flush()
        if hasattr(os, "posix_fallocate") and arr.nbytes:
            with open(path, "r+b") as f:
                os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
    except OSError as e:  # posix_fallocate's error names no file: say which one
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    return arr


def load_npy(path: str | Path, shape: tuple | None = None, dtype: Any = None) -> np.ndarray:
    """Read a checked ``.npy`` file into memory."""
    check_npy(path, shape, dtype)
    return np.load(path)


def save_npy(path: str | Path, array: np.ndarray) -> None:
    """Write ``array`` to ``path`` atomically (a kill leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def save_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float))
    tmp.replace(path)


def digest(*parts: Any) -> str:
    """A short content digest of JSON-able values and arrays (order matters)."""
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        known = part.content_digest() if hasattr(part, "content_digest") else None
        if known is not None:  # examples that know the digest of what they were made from
            h.update(b"d" + known.encode())
        elif hasattr(part, "digest_parts"):  # examples made of several arrays (and captions)
            h.update(b"d" + digest(*part.digest_parts()).encode())
        elif isinstance(part, np.ndarray | bytes):
            data = part.tobytes() if isinstance(part, np.ndarray) else part
            h.update(b"a" + data)
        elif hasattr(part, "numpy"):  # a torch tensor
            h.update(b"a" + part.detach().cpu().numpy().tobytes())
        else:
            h.update(b"j" + json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()
