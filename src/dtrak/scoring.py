"""Scores: kernel solves, the lambda sweep, and the numerical cores of every method.

Sign convention (the whole package follows it): a score ``tau[x, z] > 0`` means training
example ``z`` *helps* target ``x``, i.e. including ``z`` lowers the model's loss on ``x``.
Every core returns a ``[M targets, N train]`` float32 matrix with that convention; the
method registry (:mod:`dtrak.methods`) carries a ``sign`` note per method saying why.

TRAK / D-TRAK (SPEC section 4)::

    tau(x) = phi(x)^T (Phi^T Phi + lam I)^-1 Phi^T          # a row of N scores

with ``Phi`` the ``[N, k]`` training features. :class:`KernelSolver` factorises the smaller
of the primal Gram ``Phi^T Phi`` (k x k) and the dual Gram ``Phi Phi^T`` (N x N) once, with a
symmetric eigendecomposition in float64; every lambda after that costs two matrix products.
Both forms reduce to ``tau = (phi_x A) diag(1 / (S + lam)) B^T``:

- primal, ``Phi^T Phi = V S V^T``:  ``A = V``,           ``B = Phi V``;
- dual,   ``Phi Phi^T = U S U^T``:  ``A = Phi^T U``,     ``B = U``

(the dual uses ``(Phi^T Phi + lam I)^-1 Phi^T = Phi^T (Phi Phi^T + lam I)^-1``).
:func:`solve_reference` is the plain ``np.linalg.solve`` oracle the fast path is tested
against.

Lambda grids, priors and selection live in :mod:`dtrak.lambdas`; the solver takes any
lambda, and ``KernelSolver.trace_scale = trace(Phi^T Phi) / N`` is the scale of the relative
grid.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import scipy.linalg
import torch

__all__ = [
    "KernelSolver",
    "as_matrix",
    "check_lambda",
    "choose_form",
    "cosine_scores",
    "das_reference",
    "das_scores",
    "datamodel_scores",
    "dot_scores",
    "eigh_gram",
    "empirical_influence",
    "ensemble_average",
    "random_scores",
    "relative_influence",
    "renormalized_influence",
    "solve_reference",
    "tracin_scores",
    "trak_scores",
]

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------


def as_matrix(x: np.ndarray, name: str, dtype: type = np.float64) -> np.ndarray:
    """Check that ``x`` is a finite 2-D array and return it as ``dtype``."""
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, features], got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape}); pass at least one row and column")
    arr = arr.astype(dtype, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; check the features that produced it")
    return arr


def check_lambda(lam: float) -> float:
    lam = float(lam)
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"lambda must be a finite number >= 0, got {lam!r}")
    return lam


# ---------------------------------------------------------------------------------------------
# Kernel solver
# ---------------------------------------------------------------------------------------------


def choose_form(n: int, k: int) -> str:
    """The cheaper factorisation for ``N`` examples of ``k`` features: ``"primal"`` iff k <= N.

    Both forms cost one Gram product (N k min(N, k)), one eigh (min(N, k)^3) and one
    basis change (N k min(N, k)), so the smaller Gram wins.
    """
    return "primal" if k <= n else "dual"


def eigh_gram(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric eigendecomposition of a finite float64 Gram (overwritten to save memory).

    Divide and conquer (``driver="evd"``): its time does not depend on the spectrum, whereas
    the default MRRR driver was 2-4x slower on rank-deficient Grams (N < k primal, N > k dual,
    or features of low intrinsic rank) in benchmarks/bench_scoring.py.
    """
    return scipy.linalg.eigh(gram, overwrite_a=True, check_finite=False, driver="evd")


def _factorise(phi: np.ndarray, form: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigenvalues and the bases ``(A, B)`` of the Gram (SciPy, float64, on the CPU)."""
    if form == "primal":
        evals, vecs = eigh_gram(phi.T @ phi)
        return evals, vecs, phi @ vecs
    evals, vecs = eigh_gram(phi @ phi.T)
    return evals, phi.T @ vecs, vecs


def _factorise_torch(phi: np.ndarray, form: str, device: torch.device
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_factorise` with the Gram product, eigh and basis change in torch float64 on
    ``device`` (a GPU); the bases come back to host memory for the sweeps."""
    x = torch.from_numpy(phi).to(device)
    if form == "primal":
        evals, vecs = torch.linalg.eigh(x.T @ x)
        a, b = vecs, x @ vecs
    else:
        evals, vecs = torch.linalg.eigh(x @ x.T)
        a, b = x.T @ vecs, vecs
    return evals.cpu().numpy(), a.cpu().numpy(), b.cpu().numpy()


class KernelSolver:
    """Factorise the TRAK kernel once, then score any targets at any lambda.

    Args:
        train_features: ``Phi``, ``[N, k]`` training features (any float dtype; the solver
            works in float64).
        form: ``"primal"`` factorises ``Phi^T Phi`` (k x k), ``"dual"`` factorises
            ``Phi Phi^T`` (N x N), ``"auto"`` picks the smaller (primal when ``k <= N``).
        device: None factorises with SciPy on the CPU; a torch device (``"cuda"``) does the
            Gram product and eigendecomposition there in float64 (the same result to float64
            rounding; the sweeps then run on the host).

    Attributes:
        n: N, the number of training examples.
        k: the feature dimension.
        form: the form used, ``"primal"`` or ``"dual"``.
        rank_dim: r = k (primal) or N (dual), the number of eigenvalues.
        eigenvalues: ``[r]`` float64, the Gram's eigenvalues (ascending, clipped at 0).
        trace_scale: ``trace(Phi^T Phi) / N`` = mean squared feature norm, the kernel's scale
            (multiply a relative lambda by it).
    """

    def __init__(self, train_features: np.ndarray, form: str = "auto",
                 device: str | torch.device | None = None) -> None:
        phi = as_matrix(train_features, "train_features")
        if form not in ("auto", "primal", "dual"):
            raise ValueError(f"unknown form {form!r}; use 'auto', 'primal' or 'dual'")
        self.n, self.k = phi.shape
        self.form = choose_form(self.n, self.k) if form == "auto" else form
        if device is None:
            evals, self._a, self._b = _factorise(phi, self.form)
        else:
            evals, self._a, self._b = _factorise_torch(phi, self.form, torch.device(device))
        self.eigenvalues = np.clip(evals, 0.0, None)
        self.rank_dim = self.eigenvalues.size
        self.trace_scale = float(np.einsum("ij,ij->", phi, phi) / self.n)
        # Eigenvalues below this count as zero (rank-deficient Gram).
        self._tol = max(self.eigenvalues[-1], np.finfo(np.float64).tiny) * self.rank_dim * 1e-13
        logger.debug("KernelSolver: N=%d k=%d form=%s", self.n, self.k, self.form)

    def __repr__(self) -> str:
        return f"KernelSolver(n={self.n}, k={self.k}, form={self.form!r})"

    @property
    def full_rank(self) -> bool:
        """Whether the factorised Gram has no (numerically) zero eigenvalue."""
        return bool(self.eigenvalues[0] > self._tol)

    def _inverse_spectrum(self, lam: float) -> np.ndarray:
        """``1 / (S + lam)`` as ``[r]``; refuses lam == 0 on a singular Gram."""
        lam = check_lambda(lam)
        if lam == 0 and not self.full_rank:
            n_zero = int(np.sum(self.eigenvalues <= self._tol))
            raise ValueError(
                f"lambda = 0 needs a full-rank Gram, but the {self.form} Gram ({self.rank_dim} x "
                f"{self.rank_dim}) has {n_zero} zero eigenvalue(s) (N={self.n}, k={self.k}); "
                "use lambda > 0, or form='dual' when N < k"
            )
        return 1.0 / (self.eigenvalues + lam)

    def project(self, target_features: np.ndarray) -> np.ndarray:
        """Targets in the eigenbasis: ``phi_x A``, ``[M, k] -> [M, r]`` float64.

        Compute it once and pass it to :meth:`scores_from_projection` to score many lambdas.
        """
        phi_x = as_matrix(target_features, "target_features")
        if phi_x.shape[1] != self.k:
            raise ValueError(
                f"target_features have {phi_x.shape[1]} features but the training features "
                f"have {self.k}; featurize targets and training set with the same projector"
            )
        return phi_x @ self._a

    def scores_from_projection(self, projected: np.ndarray, lam: float) -> np.ndarray:
        """Scores from :meth:`project`'s output: ``[M, r] -> [M, N]`` float32."""
        return ((projected * self._inverse_spectrum(lam)) @ self._b.T).astype(np.float32)

    def scores(self, target_features: np.ndarray, lam: float) -> np.ndarray:
        """TRAK scores ``phi_x (Phi^T Phi + lam I)^-1 Phi^T``: ``[M, k] -> [M, N]`` float32.

        ``lam = 0`` is allowed only on a full-rank Gram; in the dual form with N < k it gives
        the pseudo-inverse solution (the limit lam -> 0).
        """
        return self.scores_from_projection(self.project(target_features), lam)

    def iter_sweep(
        self, target_features: np.ndarray, lams: Sequence[float]
    ) -> Iterator[tuple[float, np.ndarray]]:
        """Yield ``(lam, scores [M, N] float32)`` for each lambda, projecting targets once."""
        projected = self.project(target_features)
        for lam in lams:
            yield float(lam), self.scores_from_projection(projected, lam)

    def sweep(self, target_features: np.ndarray, lams: Sequence[float]) -> np.ndarray:
        """Scores at every lambda: ``[M, k] -> [L, M, N]`` float32 (one factorisation)."""
        lams = list(lams)
        if not lams:
            raise ValueError("sweep needs at least one lambda")
        out = np.empty((len(lams), len(target_features), self.n), dtype=np.float32)
        for i, (_, s) in enumerate(self.iter_sweep(target_features, lams)):
            out[i] = s
        return out

    def predicted_outputs_sweep(
        self, target_features: np.ndarray, lams: Sequence[float], masks: np.ndarray
    ) -> np.ndarray:
        """LDS predictions at every lambda without materialising scores: ``[L, M, T]`` float64.

        Entry ``[l, m, t]`` is ``sum_{z in S_m} (-tau_z(x_t))`` at ``lams[l]``, i.e. equal to
        ``dtrak.lds.predicted_outputs(self.scores(targets, lam), masks)`` (minus: the LDS
        compares with a loss). With ``masks @ B`` computed once, each lambda costs
        ``M x r x T`` instead of ``T x r x N``; pass the result as ``predictions=`` to
        :func:`dtrak.lds.select_lambda`.

        Args:
            target_features: ``[T, k]``.
            lams: ``[L]`` lambdas.
            masks: ``[M, N]`` bool subset masks.
        """
        masks = np.asarray(masks)
        if masks.ndim != 2 or masks.dtype != bool or masks.shape[1] != self.n:
            raise ValueError(
                f"masks must be bool [M subsets, N={self.n}], got {masks.dtype} {masks.shape}; "
                "use dtrak.lds.subset_masks on the same training set"
            )
        projected = self.project(target_features)
        subset_basis = masks.astype(np.float64) @ self._b  # [M, r]
        lams = list(lams)
        out = np.empty((len(lams), masks.shape[0], projected.shape[0]))
        for i, lam in enumerate(lams):
            out[i] = -((subset_basis * self._inverse_spectrum(lam)) @ projected.T)
        return out

    def scores_blocks(
        self, target_features: np.ndarray, lam: float, block_size: int
    ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Yield ``(start, stop, scores [stop - start, N] float32)`` over blocks of targets.

        Memory stays bounded by ``block_size x max(N, r)`` whatever the number of targets;
        ``target_features`` may be a memmap.
        """
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._inverse_spectrum(lam)  # validate lambda before the first block
        for start in range(0, len(target_features), block_size):
            stop = min(start + block_size, len(target_features))
            yield start, stop, self.scores(np.asarray(target_features[start:stop]), lam)

    def _train_in_eigenbasis(self) -> np.ndarray:
        """``C [N, r]`` with ``(Phi^T Phi + lam I)^-1 phi_z = Q diag(1 / (S + lam)) C[z]``.

        Q has orthonormal columns (V in the primal, ``Phi^T U S^-1/2`` in the dual), so the
        norm of the left side is the norm of ``C[z] / (S + lam)``.
        """
        if self.form == "primal":
            return self._b  # Phi V
        return self._b * np.sqrt(self.eigenvalues)  # U sqrt(S)

    def influence_norms(self, lam: float) -> np.ndarray:
        """``||(Phi^T Phi + lam I)^-1 phi(z)||`` for every training example: ``[N]`` float64."""
        inv = self._inverse_spectrum(lam)
        return np.linalg.norm(self._train_in_eigenbasis() * inv, axis=1)

    def feature_norms(self) -> np.ndarray:
        """``||phi(z)||`` for every training example, from the factorisation: ``[N]`` float64."""
        return np.linalg.norm(self._train_in_eigenbasis(), axis=1)

    def leverages(self, lam: float) -> np.ndarray:
        """``h_z = phi(z)^T (Phi^T Phi + lam I)^-1 phi(z)`` for every training example: ``[N]``
        float64, in [0, 1) for lam > 0 (the diagonal of the ridge hat matrix)."""
        c = self._train_in_eigenbasis()
        return np.einsum("nr,r,nr->n", c, self._inverse_spectrum(lam), c)


def das_scores(solver: KernelSolver, target_features: np.ndarray, residual: np.ndarray,
               lam: float, leave_one_out: bool = False, square: bool = False) -> np.ndarray:
    """DAS scores ``[M, N]`` float32 from unit-normalised features (:mod:`dtrak.methods.das`).

    ``s(x, z) = phi(x)^T (Phi^T Phi + lam I)^-1 phi(z) * e_z``, divided by ``1 - h_z`` (the
    training example's own leverage, :meth:`KernelSolver.leverages`) when ``leave_one_out``,
    and squared when ``square``. ``residual``: the weights ``e_z`` ``[N]``.
    """
    e = np.asarray(residual, dtype=np.float64)
    if e.shape != (solver.n,) or not np.all(np.isfinite(e)):
        raise ValueError(f"residual weights must be finite, shape ({solver.n},), got {e.shape}")
    weight = e / (1.0 - solver.leverages(lam)) if leave_one_out else e
    s = solver.scores(target_features, lam).astype(np.float64) * weight
    return (s * s if square else s).astype(np.float32)


def das_reference(train_features: np.ndarray, target_features: np.ndarray, residual: np.ndarray,
                  lam: float, leave_one_out: bool = False, square: bool = False) -> np.ndarray:
    """Oracle for :func:`das_scores`: the kernel inverse by ``np.linalg.inv`` in float64 and
    each leverage as its own quadratic form, example by example. Plain and slow on purpose."""
    phi = as_matrix(train_features, "train_features")
    phi_x = as_matrix(target_features, "target_features")
    inv = np.linalg.inv(phi.T @ phi + check_lambda(lam) * np.eye(phi.shape[1]))
    out = np.empty((len(phi_x), len(phi)))
    for z in range(len(phi)):
        w = residual[z] / (1.0 - phi[z] @ inv @ phi[z]) if leave_one_out else residual[z]
        for x in range(len(phi_x)):
            out[x, z] = (phi_x[x] @ inv @ phi[z]) * w
    return (out * out if square else out).astype(np.float32)


def solve_reference(
    train_features: np.ndarray, target_features: np.ndarray, lam: float
) -> np.ndarray:
    """Oracle: ``phi_x (Phi^T Phi + lam I)^-1 Phi^T`` by ``np.linalg.solve`` in float64.

    ``[N, k], [M, k] -> [M, N]`` float32. Plain and slow on purpose (one k x k solve).
    """
    phi = as_matrix(train_features, "train_features")
    phi_x = as_matrix(target_features, "target_features")
    lam = check_lambda(lam)
    gram = phi.T @ phi + lam * np.eye(phi.shape[1])
    return (np.linalg.solve(gram, phi_x.T).T @ phi.T).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Similarity baselines
# ---------------------------------------------------------------------------------------------


def _same_width(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"target features have {a.shape[1]} columns but training features have "
            f"{b.shape[1]}; compute both with the same feature extractor"
        )


def _unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm; all-zero rows stay zero (their cosine is 0)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    n_zero = int(np.sum(norms == 0))
    if n_zero:
        logger.warning("%d all-zero feature row(s): their cosine scores are set to 0", n_zero)
    return x / np.where(norms == 0, 1.0, norms)


def random_scores(n_targets: int, n_train: int, seed: int) -> np.ndarray:
    """IID N(0, 1) scores ``[n_targets, n_train]`` float32 from ``default_rng(seed)``."""
    if n_targets < 1 or n_train < 1:
        raise ValueError(f"random_scores needs n_targets, n_train >= 1, got {n_targets}, {n_train}")
    return np.random.default_rng(seed).standard_normal((n_targets, n_train)).astype(np.float32)


_SIMILARITY_SIGN = (
    "similar = helps. For raw pixels / CLIP embeddings: a training image that looks like the "
    "target is assumed to help it. For loss-gradient features g: a gradient step on z moves "
    "theta by -eta g(z), changing the loss on x by -eta g(x).g(z), so a positive dot product "
    "lowers the loss on x (helps)"
)


def dot_scores(target_features: np.ndarray, train_features: np.ndarray) -> np.ndarray:
    """``[M, d], [N, d] -> [M, N]`` float32 dot products (pixels, CLIP, loss gradients)."""
    a = as_matrix(target_features, "target_features")
    b = as_matrix(train_features, "train_features")
    _same_width(a, b)
    return (a @ b.T).astype(np.float32)


def cosine_scores(target_features: np.ndarray, train_features: np.ndarray) -> np.ndarray:
    """``[M, d], [N, d] -> [M, N]`` float32 cosine similarities (zero rows give 0)."""
    a = as_matrix(target_features, "target_features")
    b = as_matrix(train_features, "train_features")
    _same_width(a, b)
    return (_unit_rows(a) @ _unit_rows(b).T).astype(np.float32)


def tracin_scores(
    per_checkpoint: Sequence[tuple[np.ndarray, np.ndarray]], cosine: bool = False
) -> np.ndarray:
    """Average over checkpoints of dot (or cosine) scores.

    Args:
        per_checkpoint: one ``(target_features [M, d], train_features [N, d])`` pair per
            checkpoint (loss-gradient features of that checkpoint).
        cosine: cosine similarity instead of the dot product.

    Returns:
        ``[M, N]`` float32.
    """
    if len(per_checkpoint) == 0:
        raise ValueError("tracin_scores needs at least one checkpoint's (targets, train) pair")
    score = cosine_scores if cosine else dot_scores
    total = sum(score(t, z).astype(np.float64) for t, z in per_checkpoint)
    return (total / len(per_checkpoint)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# TRAK and its reweightings
# ---------------------------------------------------------------------------------------------


def trak_scores(solver: KernelSolver, target_features: np.ndarray, lam: float) -> np.ndarray:
    """``solver.scores(target_features, lam)``: ``[M, k] -> [M, N]`` float32."""
    return solver.scores(target_features, lam)


def relative_influence(solver: KernelSolver, target_features: np.ndarray, lam: float) -> np.ndarray:
    """TRAK scores with column z divided by ``solver.influence_norms(lam)[z]``: ``[M, N]``.

    Columns whose norm is 0 (an all-zero training feature) are 0.
    """
    norms = solver.influence_norms(lam)
    scores = solver.scores(target_features, lam).astype(np.float64)
    return (scores / np.where(norms == 0, np.inf, norms)).astype(np.float32)


def renormalized_influence(
    solver: KernelSolver,
    target_features: np.ndarray,
    lam: float,
    train_features: np.ndarray | None = None,
) -> np.ndarray:
    """TRAK scores with column z divided by ``||phi(z)||``: ``[M, N]`` float32.

    ``train_features [N, k]`` gives the norms; ``None`` takes them from the factorisation.
    Columns whose norm is 0 are 0.
    """
    if train_features is None:
        norms = solver.feature_norms()
    else:
        phi = as_matrix(train_features, "train_features")
        if phi.shape != (solver.n, solver.k):
            raise ValueError(
                f"train_features has shape {phi.shape} but the solver was built on "
                f"({solver.n}, {solver.k}); pass the same training features"
            )
        norms = np.linalg.norm(phi, axis=1)
    scores = solver.scores(target_features, lam).astype(np.float64)
    return (scores / np.where(norms == 0, np.inf, norms)).astype(np.float32)


def ensemble_average(score_matrices: Sequence[np.ndarray]) -> np.ndarray:
    """Mean of equally shaped ``[M, N]`` score matrices, float32."""
    if len(score_matrices) == 0:
        raise ValueError("ensemble_average needs at least one score matrix")
    shapes = {np.shape(s) for s in score_matrices}
    if len(shapes) != 1:
        raise ValueError(f"score matrices differ in shape {sorted(shapes)}; score the same sets")
    total = sum(np.asarray(s, dtype=np.float64) for s in score_matrices)
    return (total / len(score_matrices)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Retraining-based methods (from the LDS subset models)
# ---------------------------------------------------------------------------------------------


def _check_masks_outputs(masks: np.ndarray, outputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks = np.asarray(masks)
    outputs = as_matrix(outputs, "outputs")
    if masks.ndim != 2 or masks.dtype != bool:
        raise ValueError(
            f"masks must be a bool array [models, N], got {masks.dtype} {masks.shape}; "
            "use dtrak.lds.subset_masks"
        )
    if masks.shape[0] != outputs.shape[0]:
        raise ValueError(
            f"masks has {masks.shape[0]} models but outputs has {outputs.shape[0]} rows; "
            "outputs must be [models, targets] in the order of the masks"
        )
    return masks, outputs


def empirical_influence(masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """Leave-z-out difference of mean losses.

    Args:
        masks: ``[M_models, N]`` bool, model m trained on the examples marked True.
        outputs: ``[M_models, T]`` the loss of model m on target t.

    Returns:
        ``[T, N]`` float32; a column whose example is in every model or in none is 0
        (a warning says how many).
    """
    masks, outputs = _check_masks_outputs(masks, outputs)
    inc = masks.astype(np.float64)
    n_in, n_out = inc.sum(axis=0), (1.0 - inc).sum(axis=0)
    sum_in = inc.T @ outputs
    sum_out = (1.0 - inc).T @ outputs
    undefined = (n_in == 0) | (n_out == 0)
    if np.any(undefined):
        logger.warning(
            "empirical_influence: %d training example(s) are in every model or in none; "
            "their scores are set to 0 (use more or different subsets)",
            int(undefined.sum()),
        )
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = sum_out / n_out[:, None] - sum_in / n_in[:, None]
    diff[undefined] = 0.0
    return diff.T.astype(np.float32)


def datamodel_scores(masks: np.ndarray, outputs: np.ndarray, ridge_alpha: float) -> np.ndarray:
    """Linear datamodels: ``outputs ~ b + masks @ w`` by ridge, scores ``-w``.

    Minimises ``||Y - b - X w||^2 + ridge_alpha ||w||^2`` per target (same as
    ``sklearn.linear_model.Ridge(alpha=ridge_alpha, fit_intercept=True)``), in closed form on
    the centred data, solving in whichever of the N x N or M x M systems is smaller.

    Args:
        masks: ``[M_models, N]`` bool.
        outputs: ``[M_models, T]`` losses.
        ridge_alpha: > 0 (>= 0 when the centred Gram is invertible).

    Returns:
        ``[T, N]`` float32.
    """
    masks, outputs = _check_masks_outputs(masks, outputs)
    alpha = float(ridge_alpha)
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"ridge_alpha must be a finite number >= 0, got {ridge_alpha!r}")
    x = masks.astype(np.float64)
    x -= x.mean(axis=0)
    y = outputs - outputs.mean(axis=0)
    n_models, n_train = x.shape
    try:
        if n_train <= n_models:
            coef = scipy.linalg.solve(x.T @ x + alpha * np.eye(n_train), x.T @ y, assume_a="sym")
        else:
            coef = x.T @ scipy.linalg.solve(x @ x.T + alpha * np.eye(n_models), y, assume_a="sym")
    except np.linalg.LinAlgError as err:
        raise ValueError(
            f"datamodel ridge system is singular (ridge_alpha={alpha}); use ridge_alpha > 0"
        ) from err
    return (-coef.T).astype(np.float32)
