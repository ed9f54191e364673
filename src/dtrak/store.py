"""On-disk feature store: ``.npy`` memmaps with a per-example done mask and metadata.

A store directory holds::

    features.npy   float32 [N, k]   row i = features of example i
    done.npy       uint8   [N]      1 once row i is written and flushed
    meta.json      what made the features (model, output function, K, k, seeds, projector)

Rows are flushed before their done flag, so a killed run loses at most the batch in
flight and resumes bit-identically. Shard workers (``--shard i/N``) take disjoint rows
(id % N == i) of the same memmaps, so several processes fill one store without races.
A store whose metadata differs from the caller's refuses to mix, naming the keys.

A training set too large for one file goes into a :class:`ShardedStore`: consecutive rows
split into shards, each shard a :class:`FeatureStore` of its own (memmap, done mask,
metadata) under one top-level ``meta.json``, so independent workers fill one shard each.
:func:`make_store` creates either kind (an existing store keeps its own layout), and
:func:`open_store` opens either.
Both kinds of store are read back in blocks of rows (:meth:`FeatureStore.blocks`,
:meth:`ShardedStore.blocks`) by plain file reads: nothing stays mapped, so a pass over
a store of any size holds one block in memory (what :mod:`dtrak.streaming` relies on).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from .artefacts import DamagedArtefactError, create_npy, open_npy

log = logging.getLogger(__name__)

__all__ = ["FeatureStore", "ShardedStore", "StoreMismatchError", "make_store", "open_store",
           "parse_shard", "read_rows"]


class StoreMismatchError(ValueError):
    """A store exists with different settings than the ones asked for."""


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"i/N"`` -> (i, N); None -> (0, 1)."""
    if not text:
        return 0, 1
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError as e:
        raise ValueError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from e
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= i < N")
    return i, n


def _normalise(meta: dict) -> dict:
    return json.loads(json.dumps(meta, sort_keys=True))


def _make_atomically(directory: Path, fill: Callable[[Path], None]) -> None:
    """Create ``directory`` by filling a private folder and renaming it into place: two
    workers starting at once cannot both create it, and a kill never leaves it half made."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
    except BaseException:  # a full disk, a kill: leave no half-made folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(directory)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another worker won the race
        if not (directory / "meta.json").exists():
            raise


def _check_meta(directory: Path, meta: dict) -> None:
    """Refuse a store whose saved ``meta.json`` differs from ``meta``, naming the keys."""
    saved = json.loads((directory / "meta.json").read_text())
    keys = sorted(set(saved) | set(meta))
    diff = [k for k in keys if saved.get(k) != meta.get(k)]
    if diff:
        detail = ", ".join(f"{k}: stored {saved.get(k)!r} vs asked {meta.get(k)!r}"
                           for k in diff)
        raise StoreMismatchError(
            f"feature store {directory} was made with other settings ({detail}); "
            "use another run directory, or --overwrite to recompute"
        )


def _data_offset(path: Path) -> int:
    """Byte offset of the data in a ``.npy`` file (after its header)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            np.lib.format.read_array_header_1_0(f)
        else:
            np.lib.format.read_array_header_2_0(f)
        return f.tell()


def read_rows(path: str | Path, k: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of a C-ordered float32 ``[n, k]`` ``.npy`` file: ``[stop - start, k]``.

    A plain read into a fresh array, no memory map, so the pages read are never counted in
    the process's resident memory (a pass over a 16 GB store stays at one block).
    """
    path = Path(path)
    out = np.empty((stop - start, k), dtype=np.float32)
    with open(path, "rb") as f:
        f.seek(_data_offset(path) + start * k * 4)
        got = f.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:
        raise DamagedArtefactError(f"{path} is damaged (rows {start}:{stop} are past its "
                                   "end); delete it and featurize again")
    return out


def _file_blocks(path: Path, k: int, n: int, block_rows: int, offset: int, start: int
                 ) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, rows)`` of a file holding rows ``offset:offset + n``, from global row
    ``start`` on, in blocks aligned to ``block_rows`` of the file."""
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    lo = max(start - offset, 0)
    while lo < n:
        hi = min(lo - lo % block_rows + block_rows, n)
        yield offset + lo, offset + hi, read_rows(path, k, lo, hi)
        lo = hi


class FeatureStore:
    """Create or open the store at ``directory`` for ``n`` examples of dimension ``k``."""

    shard_rows: int | None = None  # one file, no shards (see ShardedStore)

    def __init__(self, directory: str | Path, n: int, k: int, meta: dict,
                 overwrite: bool = False) -> None:
        self.directory = Path(directory)
        self.n, self.k = int(n), int(k)
        self.meta = _normalise({**meta, "n": self.n, "k": self.k})
        if overwrite and self.directory.exists():
            shutil.rmtree(self.directory)
        if not (self.directory / "meta.json").exists():
            self._create()
        self._check()
        # checked against the metadata: a short file is refused, never grown back with zeros
        self.features = open_npy(self.directory / "features.npy", (self.n, self.k), np.float32)
        self.done = open_npy(self.directory / "done.npy", (self.n,), np.uint8)

    @classmethod
    def open(cls, directory: str | Path) -> FeatureStore:
        """Open an existing store with whatever metadata it has."""
        directory = Path(directory)
        path = directory / "meta.json"
        if not path.exists():
            raise FileNotFoundError(f"no feature store at {directory} (run `dtrak featurize`)")
        meta = json.loads(path.read_text())
        return cls(directory, meta["n"], meta["k"], meta)

    def _create(self) -> None:
        def fill(tmp: Path) -> None:
            create_npy(tmp / "features.npy", (self.n, self.k), np.float32)
            create_npy(tmp / "done.npy", (self.n,), np.uint8)
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True))

        _make_atomically(self.directory, fill)

    def _check(self) -> None:
        _check_meta(self.directory, self.meta)

    # ------------------------------------------------------------------ progress
    def missing(self, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
        """Example ids of this shard not yet written (ascending)."""
        i, n = shard
        ids = np.flatnonzero(self.done == 0)
        return ids[ids % n == i]

    def missing_mask(self) -> np.ndarray:
        """``[N]`` bool: True where a row is not yet written."""
        return np.asarray(self.done) == 0

    def done_rows(self, ids: np.ndarray) -> np.ndarray:
        """``[B]`` bool: whether rows ``ids`` are written."""
        return np.asarray(self.done[ids]) != 0

    @property
    def complete(self) -> bool:
        return bool(self.done.all())

    def write(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Write rows ``ids`` ([B]) with ``values`` ([B, k]); flush, then mark them done."""
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (len(ids), self.k):
            raise ValueError(f"expected features of shape ({len(ids)}, {self.k}), "
                             f"got {values.shape}")
        self.features[ids] = values
        self.features.flush()
        self.done[ids] = 1
        self.done.flush()

    def load(self) -> np.ndarray:
        """All features [N, k] (float32, in memory); refuses an incomplete store."""
        self._refuse_incomplete()
        return np.array(self.features)

    def _refuse_incomplete(self) -> None:
        if not self.complete:
            left = int((self.done == 0).sum())
            raise ValueError(
                f"feature store {self.directory} is incomplete ({left} of {self.n} examples "
                "missing); run `dtrak featurize` again to finish it"
            )

    def blocks(self, block_rows: int, start: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, features [stop - start, k] float32)`` from row ``start`` on, in
        blocks of ``block_rows`` rows (aligned to multiples of it), read without a memory
        map; refuses an incomplete store."""
        self._refuse_incomplete()
        return _file_blocks(self.directory / "features.npy", self.k, self.n, block_rows, 0,
                            start)


class ShardedStore:
    """A feature store split into shards of consecutive rows, filled shard by shard.

    Layout::

        meta.json          the caller's metadata + n, k, shard_rows
        shard-00000/       a FeatureStore of rows 0 : shard_rows
        shard-00001/       a FeatureStore of rows shard_rows : 2 shard_rows, ...

    A shard is created (atomically) the first time a worker asks for it with
    :meth:`shard`, so workers on different machines each allocate only their own rows; its
    metadata is the store's plus its position, so a shard of another store is refused.

    Args:
        directory: the store's folder.
        n, k: examples and feature dimension.
        meta: what made the features (compared on every open; a mismatch is refused).
        shard_rows: rows per shard (the last shard may be shorter).
    """

    def __init__(self, directory: str | Path, n: int, k: int, meta: dict, shard_rows: int,
                 overwrite: bool = False) -> None:
        if int(shard_rows) < 1 or int(n) < 1 or int(k) < 1:
            raise ValueError(f"a sharded store needs n, k, shard_rows >= 1, got {n}, {k}, "
                             f"{shard_rows}")
        self.directory = Path(directory)
        self.n, self.k, self.shard_rows = int(n), int(k), int(shard_rows)
        self.meta = _normalise({**meta, "n": self.n, "k": self.k,
                                "shard_rows": self.shard_rows})
        if overwrite and self.directory.exists():
            shutil.rmtree(self.directory)
        if not (self.directory / "meta.json").exists():
            _make_atomically(self.directory, lambda tmp: (tmp / "meta.json").write_text(
                json.dumps(self.meta, indent=2, sort_keys=True)))
        _check_meta(self.directory, self.meta)
        self._shards: dict[int, FeatureStore] = {}  # opened once, kept open

    @classmethod
    def open(cls, directory: str | Path) -> ShardedStore:
        """Open an existing sharded store with whatever metadata it has."""
        directory = Path(directory)
        path = directory / "meta.json"
        if not path.exists():
            raise FileNotFoundError(f"no sharded feature store at {directory}")
        meta = json.loads(path.read_text())
        if "shard_rows" not in meta:
            raise ValueError(f"{directory} is a feature store without shards; open it with "
                             "FeatureStore.open (or dtrak.store.open_store)")
        return cls(directory, meta["n"], meta["k"], meta, meta["shard_rows"])

    @property
    def n_shards(self) -> int:
        return -(-self.n // self.shard_rows)

    def rows(self, i: int) -> tuple[int, int]:
        """The global rows ``(start, stop)`` of shard ``i``."""
        if not 0 <= i < self.n_shards:
            raise ValueError(f"shard {i} of a store with {self.n_shards} shards")
        return i * self.shard_rows, min((i + 1) * self.shard_rows, self.n)

    def _shard_dir(self, i: int) -> Path:
        return self.directory / f"shard-{i:05d}"

    def shard(self, i: int) -> FeatureStore:
        """Shard ``i`` as a :class:`FeatureStore` of its ``stop - start`` rows (created on
        first use); its row ``j`` is the store's row ``start + j``."""
        if i not in self._shards:
            start, stop = self.rows(i)
            meta = {key: v for key, v in self.meta.items() if key not in ("n", "k")}
            self._shards[i] = FeatureStore(self._shard_dir(i), stop - start, self.k,
                                           {**meta, "shard": i, "shard_start": start})
        return self._shards[i]

    def _existing(self, i: int) -> FeatureStore | None:
        if i in self._shards or (self._shard_dir(i) / "meta.json").exists():
            return self.shard(i)
        return None

    def _by_shard(self, ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """``(shard i, mask of ids in it)`` for each shard that global ``ids`` touch."""
        which = ids // self.shard_rows
        for i in np.unique(which):
            yield int(i), which == i

    # ------------------------------------------------------------------ progress
    def missing(self) -> np.ndarray:
        """Example ids (global, ascending) not yet written."""
        out = []
        for i in range(self.n_shards):
            start, stop = self.rows(i)
            shard = self._existing(i)
            out.append(np.arange(start, stop) if shard is None else start + shard.missing())
        return np.concatenate(out)

    def missing_mask(self) -> np.ndarray:
        """``[N]`` bool: True where a row is not yet written (the done masks only)."""
        out = np.ones(self.n, dtype=bool)
        for i in range(self.n_shards):
            if (shard := self._existing(i)) is not None:
                start, stop = self.rows(i)
                out[start:stop] = shard.missing_mask()
        return out

    def done_rows(self, ids: np.ndarray) -> np.ndarray:
        """``[B]`` bool: whether global rows ``ids`` are written (reads only their shards)."""
        ids = self._checked_ids(ids)
        out = np.zeros(len(ids), dtype=bool)
        for i, sel in self._by_shard(ids):
            if (shard := self._existing(i)) is not None:
                out[sel] = shard.done_rows(ids[sel] - self.rows(i)[0])
        return out

    @property
    def complete(self) -> bool:
        return all((s := self._existing(i)) is not None and s.complete
                   for i in range(self.n_shards))

    def _checked_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.n):
            raise ValueError(f"example ids must lie in [0, {self.n}), got {ids.min()}.."
                             f"{ids.max()}")
        return ids

    def write(self, ids: np.ndarray, values: np.ndarray) -> None:
        """Write global rows ``ids`` ([B]) with ``values`` ([B, k]), shard by shard."""
        ids = self._checked_ids(ids)
        values = np.asarray(values, dtype=np.float32)
        if values.shape != (len(ids), self.k):
            raise ValueError(f"expected features of shape ({len(ids)}, {self.k}), "
                             f"got {values.shape}")
        for i, sel in self._by_shard(ids):
            self.shard(i).write(ids[sel] - self.rows(i)[0], values[sel])

    def blocks(self, block_rows: int, start: int = 0) -> Iterator[tuple[int, int, np.ndarray]]:
        """``(start, stop, features [stop - start, k] float32)`` from global row ``start`` on,
        in blocks of at most ``block_rows`` rows that never cross a shard; refuses an
        incomplete store."""
        if not self.complete:
            raise ValueError(
                f"sharded feature store {self.directory} is incomplete ({len(self.missing())} "
                f"of {self.n} examples missing); finish every shard first")
        for i in range(self.n_shards):
            lo, hi = self.rows(i)
            if hi > start:
                yield from _file_blocks(self._shard_dir(i) / "features.npy", self.k, hi - lo,
                                        block_rows, lo, start)

    def load(self) -> np.ndarray:
        """All features ``[N, k]`` float32 in memory (small stores, tests)."""
        out = np.empty((self.n, self.k), dtype=np.float32)
        for start, stop, block in self.blocks(self.shard_rows):
            out[start:stop] = block
        return out


def make_store(directory: str | Path, n: int, k: int, meta: dict, shard_rows: int | None = None,
               overwrite: bool = False) -> FeatureStore | ShardedStore:
    """Create or open the store at ``directory``: a :class:`ShardedStore` of ``shard_rows``
    rows per shard, or one :class:`FeatureStore` (``shard_rows=None``).

    A store already there keeps its own layout (the layout never changes a feature), so a
    run made with the other layout is completed, not refused; its metadata is checked as
    always. ``overwrite`` starts afresh in the layout asked for.
    """
    saved = Path(directory) / "meta.json"
    if saved.exists() and not overwrite:
        shard_rows = json.loads(saved.read_text()).get("shard_rows")
    if shard_rows is None:
        return FeatureStore(directory, n, k, meta, overwrite=overwrite)
    return ShardedStore(directory, n, k, meta, shard_rows, overwrite=overwrite)


def open_store(directory: str | Path) -> FeatureStore | ShardedStore:
    """The feature store at ``directory``, sharded or not."""
    path = Path(directory) / "meta.json"
    if path.exists() and "shard_rows" in json.loads(path.read_text()):
        return ShardedStore.open(directory)
    return FeatureStore.open(directory)
