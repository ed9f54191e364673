"""TRAK scores from a feature store of any size: memory O(k^2 + block x k) whatever N.

:class:`~dtrak.scoring.KernelSolver` holds ``Phi`` and ``Phi V`` (``[N, k]`` float64 each) in
memory; at N = 10^6 and k = 4096 that is 64 GB. Here the training features stay on disk and
are read block by block (:meth:`dtrak.store.FeatureStore.blocks`, no memory map):

- :func:`accumulate_gram`: ``Phi^T Phi`` (k x k) summed in float64 from float32 blocks,
  with its progress saved every few blocks, so a killed accumulation resumes where it
  stopped and ends with the same matrix bit for bit;
- :class:`StreamingKernel`: the primal eigendecomposition ``Phi^T Phi = V S V^T`` of that
  Gram, cached beside the progress files (a one-time preparation);
- :func:`stream_scores`: for targets ``phi_x [T, k]``, the query transform
  ``W = (Phi^T Phi + lam I)^-1 phi_x^T = V diag(1 / (S + lam)) V^T phi_x^T`` (``[k, T]``,
  solved once), then one pass ``scores[:, block] = (Phi_block W)^T`` over the store, written
  into a ``[T, N]`` array or memmap when asked, and the exact top-m proponents and opponents
  of every target kept in the same pass (no ``[T, N]`` matrix needed for those).

The oracle is :class:`~dtrak.scoring.KernelSolver` with ``form="primal"``: same scores (to
float64 rounding), same ``trace_scale``, same top-m as ``argsort`` of its scores.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import scipy.linalg

from .artefacts import digest, load_npy, save_json, save_npy
from .scoring import as_matrix, check_lambda, eigh_gram

__all__ = ["StreamingKernel", "TopK", "accumulate_gram", "stream_predicted_outputs_sweep",
           "stream_scores", "top_from_scores"]

logger = logging.getLogger(__name__)

BLOCK_ROWS = 4096
CHECKPOINT_EVERY = 16  # blocks between two saves of the partial Gram


class BlockStore(Protocol):
    """What a pass needs of a store (FeatureStore, ShardedStore)."""

    n: int
    k: int
    meta: dict

    def blocks(self, block_rows: int, start: int = 0): ...


# ---------------------------------------------------------------------------------------------
# The Gram, accumulated block by block with checkpoints
# ---------------------------------------------------------------------------------------------


class _Widen:
    """float32 blocks to float64 in one reused buffer (no fresh pages to fault in per block)."""

    def __init__(self) -> None:
        self.buffer = np.empty((0, 0), dtype=np.float64)

    def __call__(self, block: np.ndarray) -> np.ndarray:
        if self.buffer.shape[0] < block.shape[0] or self.buffer.shape[1] != block.shape[1]:
            self.buffer = np.empty(block.shape, dtype=np.float64)
        out = self.buffer[: block.shape[0]]
        np.copyto(out, block)
        return out


def _store_id(store: BlockStore) -> str:
    return digest(store.meta)


def _resume(directory: Path, store: BlockStore) -> tuple[int, np.ndarray]:
    """``(next row, partial upper-triangular Gram)`` saved in ``directory``, or a fresh start."""
    fresh = 0, np.zeros((store.k, store.k), dtype=np.float64, order="F")
    path = directory / "progress.json"
    if not path.exists():
        return fresh
    progress = _load_json(path)
    if progress.get("store") != _store_id(store):
        logger.warning("%s is the progress of another store: starting the Gram afresh", path)
        return fresh
    gram = load_npy(directory / progress["gram"], (store.k, store.k), np.float64)
    logger.info("resuming the Gram at row %d of %d", progress["next_row"], store.n)
    return int(progress["next_row"]), np.asfortranarray(gram)


def _load_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def _save_progress(directory: Path, store: BlockStore, next_row: int, gram: np.ndarray) -> None:
    """Save the partial Gram under a new name, then point progress.json at it, then delete the
    old one: a kill at any moment leaves a consistent (row, Gram) pair."""
    name = f"gram-{next_row:012d}.npy"
    save_npy(directory / name, gram)
    old = directory / "progress.json"
    previous = _load_json(old).get("gram") if old.exists() else None
    save_json(old, {"next_row": next_row, "gram": name, "store": _store_id(store),
                    "n": store.n, "k": store.k})
    if previous and previous != name:
        (directory / previous).unlink(missing_ok=True)


def _clear_progress(directory: Path) -> None:
    for path in directory.glob("gram-*.npy"):
        path.unlink()
    (directory / "progress.json").unlink(missing_ok=True)


def accumulate_gram(store: BlockStore, directory: str | Path | None = None,
                    block_rows: int = BLOCK_ROWS, checkpoint_every: int = CHECKPOINT_EVERY
                    ) -> np.ndarray:
    """``Phi^T Phi`` of the store's features: ``[k, k]`` float64 (symmetric).

    Each float32 block is widened to float64 and added with a rank-B update (BLAS ``syrk``,
    half the products of a full ``B^T B``). With ``directory``, the partial sum and the next
    row are saved there every ``checkpoint_every`` blocks; a later call resumes from them
    (blocks are aligned to multiples of ``block_rows``, so resuming with the same block size
    gives the uninterrupted result bit for bit). The complete sum is saved too (a kill
    during the factorisation that follows loses nothing);
    :meth:`StreamingKernel.prepare` clears these files once the factorisation is saved.
    """
    if directory is not None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        start, gram = _resume(directory, store)
    else:
        start, gram = 0, np.zeros((store.k, store.k), dtype=np.float64, order="F")
    widen = _Widen()
    for count, (_, stop, block) in enumerate(store.blocks(block_rows, start), 1):
        wide = widen(block)
        # upper triangle of gram += wide^T wide (wide.T is Fortran-ordered: no copy)
        gram = scipy.linalg.blas.dsyrk(1.0, wide.T, beta=1.0, c=gram, trans=0, lower=0,
                                       overwrite_c=1)
        if directory is not None and (count % checkpoint_every == 0 or stop == store.n):
            _save_progress(directory, store, stop, gram)
    return np.triu(gram) + np.triu(gram, 1).T


# ---------------------------------------------------------------------------------------------
# The factorisation
# ---------------------------------------------------------------------------------------------


class StreamingKernel:
    """The primal factorisation ``Phi^T Phi = V S V^T`` of a store's features.

    Args:
        eigenvalues: ``[k]`` float64 (ascending; clipped at 0).
        eigenvectors: ``[k, k]`` float64, ``V``.
        n: N, the number of training examples.
        trace: ``trace(Phi^T Phi)``.

    Attributes:
        trace_scale: ``trace(Phi^T Phi) / N``, as :attr:`KernelSolver.trace_scale`.
    """

    def __init__(self, eigenvalues: np.ndarray, eigenvectors: np.ndarray, n: int,
                 trace: float) -> None:
        self.eigenvalues = np.clip(np.asarray(eigenvalues, dtype=np.float64), 0.0, None)
        self.eigenvectors = np.asarray(eigenvectors, dtype=np.float64)
        self.n, self.k = int(n), self.eigenvalues.size
        self.trace_scale = float(trace) / self.n
        # as KernelSolver: eigenvalues below this count as zero
        self._tol = max(self.eigenvalues[-1], np.finfo(np.float64).tiny) * self.k * 1e-13

    def __repr__(self) -> str:
        return f"StreamingKernel(n={self.n}, k={self.k})"

    @classmethod
    def from_gram(cls, gram: np.ndarray, n: int) -> StreamingKernel:
        """Factorise a Gram ``[k, k]`` float64 (overwritten) of ``n`` examples."""
        trace = float(np.trace(gram))
        evals, vecs = eigh_gram(gram)
        return cls(evals, vecs, n, trace)

    @classmethod
    def prepare(cls, store: BlockStore, directory: str | Path,
                block_rows: int = BLOCK_ROWS, checkpoint_every: int = CHECKPOINT_EVERY
                ) -> StreamingKernel:
        """The factorisation of ``store``'s features, cached in ``directory``.

        The first call accumulates the Gram (resumable, see :func:`accumulate_gram`),
        factorises it and saves ``eigenvalues.npy``, ``eigenvectors.npy`` and
        ``kernel.json``; later calls for the same store read them back.
        """
        directory = Path(directory)
        cached = cls._load(directory, store)
        if cached is not None:
            return cached
        gram = accumulate_gram(store, directory, block_rows, checkpoint_every)
        kernel = cls.from_gram(gram, store.n)
        save_npy(directory / "eigenvalues.npy", kernel.eigenvalues)
        save_npy(directory / "eigenvectors.npy", kernel.eigenvectors)
        save_json(directory / "kernel.json", {"store": _store_id(store), "n": store.n,
                                              "k": store.k,
                                              "trace": kernel.trace_scale * store.n})
        _clear_progress(directory)
        return kernel

    @classmethod
    def _load(cls, directory: Path, store: BlockStore) -> StreamingKernel | None:
        path = directory / "kernel.json"
        if not path.exists():
            return None
        info = _load_json(path)
        if info.get("store") != _store_id(store):
            logger.warning("%s factorises another store: factorising again", directory)
            return None
        k = store.k
        return cls(load_npy(directory / "eigenvalues.npy", (k,), np.float64),
                   load_npy(directory / "eigenvectors.npy", (k, k), np.float64),
                   store.n, info["trace"])

    @property
    def full_rank(self) -> bool:
        return bool(self.eigenvalues[0] > self._tol)

    def inverse_spectrum(self, lam: float) -> np.ndarray:
        """``1 / (S + lam)`` as ``[k]``; refuses lam == 0 on a singular Gram."""
        lam = check_lambda(lam)
        if lam == 0 and not self.full_rank:
            raise ValueError(
                f"lambda = 0 needs a full-rank Gram, but Phi^T Phi (k = {self.k}, "
                f"N = {self.n}) is singular; use lambda > 0")
        return 1.0 / (self.eigenvalues + lam)

    def query(self, target_features: np.ndarray, lam: float) -> np.ndarray:
        """The query transform ``(Phi^T Phi + lam I)^-1 phi_x^T``: ``[T, k] -> [k, T]`` float64."""
        phi_x = as_matrix(target_features, "target_features")
        if phi_x.shape[1] != self.k:
            raise ValueError(
                f"target_features have {phi_x.shape[1]} features but the training features "
                f"have {self.k}; featurize targets and training set with the same projector")
        v = self.eigenvectors
        return v @ ((phi_x @ v) * self.inverse_spectrum(lam)).T


# ---------------------------------------------------------------------------------------------
# Streaming scores and top-m
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopK:
    """The exact top-m of every target's scores (ties: the lower training id first).

    Attributes:
        proponents: ``[T, m]`` int64 training ids, highest score first.
        proponent_scores: ``[T, m]`` float32, their scores.
        opponents: ``[T, m]`` int64 training ids, lowest score first.
        opponent_scores: ``[T, m]`` float32.
    """

    proponents: np.ndarray
    proponent_scores: np.ndarray
    opponents: np.ndarray
    opponent_scores: np.ndarray


class _Largest:
    """The m largest values per row seen so far, with their column ids."""

    def __init__(self, rows: int, m: int) -> None:
        self.m = m
        self.values = np.empty((rows, 0), dtype=np.float32)
        self.ids = np.empty((rows, 0), dtype=np.int64)

    def update(self, start: int, values: np.ndarray) -> None:
        """Add columns ``start : start + B`` with ``values [rows, B]``."""
        ids = np.broadcast_to(np.arange(start, start + values.shape[1]), values.shape)
        vals = np.concatenate([self.values, values], axis=1)
        ids = np.concatenate([self.ids, ids], axis=1)
        order = np.lexsort((ids, -vals))[:, : self.m]  # per row: value down, then id up
        self.values = np.take_along_axis(vals, order, axis=1)
        self.ids = np.take_along_axis(ids, order, axis=1)


def top_from_scores(scores: np.ndarray, m: int) -> TopK:
    """Reference: :class:`TopK` of an in-memory ``[T, N]`` score matrix by a full sort."""
    scores = np.asarray(scores, dtype=np.float32)
    ids = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    pro = np.lexsort((ids, -scores))[:, :m]
    opp = np.lexsort((ids, scores))[:, :m]
    return TopK(pro, np.take_along_axis(scores, pro, 1), opp, np.take_along_axis(scores, opp, 1))


def stream_scores(kernel: StreamingKernel, store: BlockStore, target_features: np.ndarray,
                  lam: float, top: int = 0, out: np.ndarray | None = None,
                  block_rows: int = BLOCK_ROWS) -> TopK | None:
    """TRAK scores of targets against the store, in one pass over it.

    Args:
        kernel: the store's factorisation (:meth:`StreamingKernel.prepare`).
        store: the training features ``[N, k]`` (read in blocks).
        target_features: ``[T, k]``.
        lam: the ridge term (absolute: multiply a relative one by ``kernel.trace_scale``).
        top: m > 0 keeps the exact top-m proponents and opponents of every target.
        out: a writable ``[T, N]`` float32 array (in memory, or a memmap from
            :func:`dtrak.artefacts.create_npy`) that receives all the scores.

    Returns:
        :class:`TopK` with ``[T, min(m, N)]`` arrays when ``top > 0``, else None.
    """
    if store.k != kernel.k or store.n != kernel.n:
        raise ValueError(f"the kernel was factorised for N={kernel.n}, k={kernel.k} but the "
                         f"store holds N={store.n}, k={store.k}; prepare it for this store")
    w = kernel.query(target_features, lam)  # [k, T]
    t = w.shape[1]
    if out is not None and tuple(out.shape) != (t, store.n):
        raise ValueError(f"out must have shape ({t}, {store.n}), got {tuple(out.shape)}")
    m = min(int(top), store.n)
    high, low = (_Largest(t, m), _Largest(t, m)) if m > 0 else (None, None)
    widen = _Widen()
    for start, stop, block in store.blocks(block_rows):
        scores = (widen(block) @ w).T.astype(np.float32)  # [T, B]
        if out is not None:
            out[:, start:stop] = scores
        if high is not None:
            high.update(start, scores)
            low.update(start, -scores)
    if high is None:
        return None
    return TopK(high.ids, high.values, low.ids, -low.values)


def stream_predicted_outputs_sweep(kernel: StreamingKernel, store: BlockStore,
                                   target_features: np.ndarray, lams: list[float],
                                   masks: np.ndarray, block_rows: int = BLOCK_ROWS
                                   ) -> np.ndarray:
    """LDS predictions at every lambda from one pass over the store: ``[L, M, T]`` float64.

    Equal to :meth:`dtrak.scoring.KernelSolver.predicted_outputs_sweep` (primal form): the
    pass accumulates ``masks @ Phi`` (``[M, k]``, float64), after which each lambda costs
    ``M x k x T``; no score matrix and no ``Phi`` in memory.
    """
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != bool or masks.shape[1] != store.n:
        raise ValueError(f"masks must be bool [M subsets, N={store.n}], got {masks.dtype} "
                         f"{masks.shape}; use dtrak.lds.subset_masks on the same training set")
    if store.k != kernel.k or store.n != kernel.n:
        raise ValueError(f"the kernel was factorised for N={kernel.n}, k={kernel.k} but the "
                         f"store holds N={store.n}, k={store.k}; prepare it for this store")
    phi_x = as_matrix(target_features, "target_features")
    subset_sums = np.zeros((masks.shape[0], store.k))
    widen = _Widen()
    for start, stop, block in store.blocks(block_rows):
        subset_sums += masks[:, start:stop].astype(np.float64) @ widen(block)
    v = kernel.eigenvectors
    basis, projected = subset_sums @ v, phi_x @ v  # [M, k], [T, k]
    out = np.empty((len(lams), masks.shape[0], phi_x.shape[0]))
    for i, lam in enumerate(lams):
        out[i] = -((basis * kernel.inverse_spectrum(lam)) @ projected.T)
    return out
