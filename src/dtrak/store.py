"""On-disk feature store: ``.npy`` memmaps with a per-example done mask and metadata.

A store directory holds::

    features.npy   float32 [N, k]   row i = features of example i
    done.npy       uint8   [N]      1 once row i is written and flushed
    meta.json      what made the features (model, output function, K, k, seeds, projector)

Rows are flushed before their done flag, so a killed run loses at most the batch in
flight and resumes bit-identically. Shard workers (``--shard i/N``) take disjoint rows
(id % N == i) of the same memmaps, so several processes fill one store without races.
A store whose metadata differs from the caller's refuses to mix, naming the keys.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from .artefacts import create_npy, open_npy

log = logging.getLogger(__name__)

__all__ = ["FeatureStore", "StoreMismatchError", "parse_shard"]


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


class FeatureStore:
    """Create or open the store at ``directory`` for ``n`` examples of dimension ``k``."""

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
        # Build in a private folder and rename it into place: two shard workers starting
        # at once cannot both create, and a kill never leaves a half-made store.
        self.directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.directory.with_name(f".{self.directory.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            create_npy(tmp / "features.npy", (self.n, self.k), np.float32)
            create_npy(tmp / "done.npy", (self.n,), np.uint8)
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2, sort_keys=True))
        except BaseException:  # a full disk, a kill: leave no half-made folder behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            tmp.rename(self.directory)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # another worker won the race
            if not (self.directory / "meta.json").exists():
                raise

    def _check(self) -> None:
        saved = json.loads((self.directory / "meta.json").read_text())
        keys = sorted(set(saved) | set(self.meta))
        diff = [k for k in keys if saved.get(k) != self.meta.get(k)]
        if diff:
            detail = ", ".join(f"{k}: stored {saved.get(k)!r} vs asked {self.meta.get(k)!r}"
                               for k in diff)
            raise StoreMismatchError(
                f"feature store {self.directory} was made with other settings ({detail}); "
                "use another run directory, or --overwrite to recompute"
            )

    # ------------------------------------------------------------------ progress
    def missing(self, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
        """Example ids of this shard not yet written (ascending)."""
        i, n = shard
        ids = np.flatnonzero(self.done == 0)
        return ids[ids % n == i]

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
        if not self.complete:
            left = int((self.done == 0).sum())
            raise ValueError(
                f"feature store {self.directory} is incomplete ({left} of {self.n} examples "
                "missing); run `dtrak featurize` again to finish it"
            )
        return np.array(self.features)
