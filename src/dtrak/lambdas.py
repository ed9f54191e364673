"""Lambda, the kernel's ridge term: its grids, its priors and its selection by LDS, in one place.

Grids. The paper's grid is :data:`PAPER_LAMBDAS` ({1, 2, 5} x 10^e, e = -2..6), absolute.
Small prototypes (SPEC section 7) found that the best lambda differs by orders of magnitude
between output functions (about 0.1 x trace/N for the loss, 1e-3..1e-4 x trace/N for the
D-TRAK functions), so :func:`lambda_grid` also offers a *relative* grid: {1, 2, 5} x 10^e for
e = -6..3, times ``KernelSolver.trace_scale = trace(Phi^T Phi) / N``.

Priors. :func:`prior_lambda_rel` is the value used when no LDS has chosen one.

Selection (:func:`select_lambda`): ``"paper"`` picks the lambda with the best LDS on the very
targets it reports (optimistic, as in the paper); ``"heldout"`` cross-fits on two halves of
the targets so that no reported number was used to pick its own lambda.
:func:`chosen_lambdas` reads the held-out choices a run's LDS saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .lds import (
    LDSResult,
    _actual_2d,
    _check_boot,
    _check_lds_shapes,
    _nanmean_quiet,
    _result,
    predicted_outputs,
    spearman_rows,
)

__all__ = [
    "PAPER_LAMBDAS",
    "RELATIVE_LAMBDAS",
    "chosen_lambdas",
    "lambda_grid",
    "per_target_spearman_by_lambda",
    "predictions_by_lambda",
    "prior_lambda_rel",
    "select_lambda",
    "split_targets",
]


# ----------------------------------------------------------------------------- grids


def _decade_grid(exponents: Sequence[int], mantissas: Sequence[float]) -> tuple[float, ...]:
    return tuple(float(m) * 10.0**e for e in exponents for m in mantissas)


#: The paper's lambda grid: {1, 2, 5} x 10^e for e = -2..6 (27 values, absolute).
PAPER_LAMBDAS: tuple[float, ...] = _decade_grid(range(-2, 7), (1, 2, 5))
#: The default relative grid: {1, 2, 5} x 10^e for e = -6..3 (30 values), times trace/N.
#: It reaches far above trace/N: at large lambda the kernel tends to a plain gradient dot
#: product, and some output functions prefer that end (a grid edge would truncate them).
RELATIVE_LAMBDAS: tuple[float, ...] = _decade_grid(range(-6, 4), (1, 2, 5))


def lambda_grid(
    scale: str = "absolute",
    trace_scale: float | None = None,
    exponents: Sequence[int] | None = None,
    mantissas: Sequence[float] = (1.0, 2.0, 5.0),
) -> np.ndarray:
    """Return a lambda grid, ascending, as a float64 array ``[L]``.

    Args:
        scale: ``"absolute"`` (alias ``"paper"``): the values themselves, by default the
            paper's :data:`PAPER_LAMBDAS`. ``"relative"``: the values times ``trace_scale``
            (the kernel's scale ``trace(Phi^T Phi) / N``, :attr:`KernelSolver.trace_scale`),
            by default :data:`RELATIVE_LAMBDAS` (e = -6..3). Relative is the better default
            because the best lambda moves by orders of magnitude between output functions
            (about 0.1 x trace/N for ``loss``, 1e-3..1e-4 x trace/N for D-TRAK functions).
        trace_scale: required for ``"relative"``; must be > 0.
        exponents: decades e of the grid {mantissas} x 10^e (default: per scale, see above).
        mantissas: the values within a decade.
    """
    if scale in ("absolute", "paper"):
        exps = range(-2, 7) if exponents is None else exponents
        grid = np.array(_decade_grid(exps, mantissas))
    elif scale == "relative":
        if trace_scale is None or not np.isfinite(trace_scale) or trace_scale <= 0:
            raise ValueError(
                f"lambda_grid('relative') needs trace_scale > 0, got {trace_scale!r}; "
                "pass KernelSolver(train_features).trace_scale"
            )
        exps = range(-6, 4) if exponents is None else exponents
        grid = np.array(_decade_grid(exps, mantissas)) * float(trace_scale)
    else:
        raise ValueError(
            f"unknown lambda scale {scale!r}; use 'absolute' (or 'paper') or 'relative'"
        )
    if grid.size == 0:
        raise ValueError("the lambda grid is empty; pass at least one exponent and mantissa")
    return np.sort(grid)


# ----------------------------------------------------------------------------- priors

# Prior ridge values relative to the kernel's scale trace(Phi^T Phi)/N, used only when no
# LDS has selected lambda: SPEC section 7 found about 0.1 for the loss and 1e-3..1e-4 for
# the D-TRAK output functions.
_LAMBDA_PRIOR = {"loss": 1e-1, "elbo": 1e-1}
_LAMBDA_PRIOR_DEFAULT = 1e-3


def prior_lambda_rel(output: str) -> float:
    """The ridge prior of an output function, relative to trace(Phi^T Phi)/N."""
    return _LAMBDA_PRIOR.get(output, _LAMBDA_PRIOR_DEFAULT)


def chosen_lambdas(lds_json: str | Path, relative: bool = False
                   ) -> dict[tuple[str, str], float]:
    """``(method, target set) -> lambda`` chosen on held-out targets by a saved LDS (or {}).

    ``relative``: the lambdas relative to their kernel's trace(Phi^T Phi)/N (``lambda_rel``),
    which carry over to features of the same settings recomputed elsewhere.
    """
    path = Path(lds_json)
    if not path.exists():
        return {}
    recs = json.loads(path.read_text())["records"]
    key = "lambda_rel" if relative else "lambda"
    return {(r["method"], r["targets"]): r[key] for r in recs
            if r.get("lambda_selection") == "heldout" and r.get(key) is not None}


# ----------------------------------------------------------------------------- selection


ScoresByLambda = np.ndarray | Callable[[int], np.ndarray]


def predictions_by_lambda(
    scores_by_lambda: ScoresByLambda | None, masks: np.ndarray, n_lams: int | None = None
) -> np.ndarray:
    """Predicted outputs at every lambda: ``[L, M, T]`` float64.

    Computing these is the expensive part of lambda selection when scores come from a
    callable; compute them once and pass ``predictions=`` to :func:`select_lambda` (both modes)
    and :func:`per_target_spearman_by_lambda`.

    Args:
        scores_by_lambda: ``[L, T, N]`` or a callable ``lambda_index -> [T, N]`` (then pass
            ``n_lams``), e.g. ``lambda i: solver.scores(targets, lams[i])``; a callable keeps
            one score matrix in memory at a time.
        masks: ``[M, N]`` bool.
        n_lams: L (required with a callable; checked against an array).
    """
    if callable(scores_by_lambda):
        if n_lams is None:
            raise ValueError("pass n_lams when scores_by_lambda is a callable")
        get = scores_by_lambda
    else:
        arr = np.asarray(scores_by_lambda)
        if arr.ndim != 3 or (n_lams is not None and arr.shape[0] != n_lams):
            raise ValueError(
                f"scores_by_lambda must be [L={n_lams or 'L'}, T, N] (one matrix per lambda) or a "
                f"callable lambda_index -> [T, N]; got shape {arr.shape}"
            )
        n_lams, get = arr.shape[0], arr.__getitem__
    if n_lams < 1:
        raise ValueError("lambda selection needs at least one lambda")
    return np.stack([predicted_outputs(get(i), masks) for i in range(n_lams)])


def per_target_spearman_by_lambda(
    scores_by_lambda: ScoresByLambda | None,
    masks: np.ndarray,
    actual: np.ndarray,
    n_lams: int | None = None,
    predictions: np.ndarray | None = None,
) -> np.ndarray:
    """Per-target Spearman at every lambda: ``[L, T]``.

    Args:
        scores_by_lambda: ``[L, T, N]`` or a callable ``lambda_index -> [T, N]`` (then pass
            ``n_lams``); ignored (may be None) when ``predictions`` is given.
        masks: ``[M, N]`` bool.
        actual: ``[M, T]`` (or ``[S, M, T]``, averaged over seeds).
        n_lams: L, needed only with a callable.
        predictions: ``[L, M, T]`` from :func:`predictions_by_lambda`, to skip recomputing.
    """
    if predictions is None:
        predictions = predictions_by_lambda(scores_by_lambda, masks, n_lams)
    predictions = np.asarray(predictions, dtype=np.float64)
    if predictions.ndim != 3:
        raise ValueError(f"predictions must be [L, M, T], got shape {predictions.shape}")
    actual = _actual_2d(actual)
    _check_lds_shapes(predictions[0], actual)
    return np.stack([spearman_rows(p, actual) for p in predictions])


def split_targets(n_targets: int, split_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The two target halves of held-out lambda selection: ``(idx_a, idx_b)``, sorted.

    A random permutation from ``default_rng(split_seed)``; half A has ``n_targets // 2``.
    """
    if n_targets < 2:
        raise ValueError(f"held-out lambda selection needs >= 2 targets, got {n_targets}")
    perm = np.random.default_rng(split_seed).permutation(n_targets)
    half = n_targets // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def _best_lambda(rho: np.ndarray, targets: np.ndarray | None = None) -> int:
    """Index of the lambda with the best mean Spearman over ``targets`` (ties: smallest)."""
    sub = rho if targets is None else rho[:, targets]
    means = _nanmean_quiet(sub)
    if np.all(np.isnan(means)):
        raise ValueError("every lambda gives NaN Spearman on these targets; check the outputs")
    return int(np.nanargmax(means))


def select_lambda(
    scores_by_lambda: ScoresByLambda | None,
    lams: Sequence[float],
    masks: np.ndarray,
    actual: np.ndarray,
    mode: str = "paper",
    split_seed: int = 0,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    predictions: np.ndarray | None = None,
) -> dict:
    """Choose lambda by LDS and report the LDS that goes with the choice.

    Modes:
        ``"paper"``: the lambda with the best LDS on all the evaluated targets; the LDS and
            interval at that lambda. Optimistic: the targets pick their own lambda.
        ``"heldout"``: targets split into halves A and B (:func:`split_targets` with
            ``split_seed``); lambda_A is the best on A and is evaluated on B only, lambda_B
            the best on B evaluated on A. The reported ``lds`` is the mean of the two held-out
            LDS values (each half weighted 1/2); the bootstrap resamples subsets with both
            lambdas fixed (each target scored at the lambda chosen on the other half).
            ``lam`` is the lambda chosen on all targets (the one to use from now on),
            ``lams_heldout`` is ``[lambda_A, lambda_B]``.

    Args:
        scores_by_lambda: ``[L, T, N]`` or a callable ``lambda_index -> [T, N]``.
        lams: ``[L]`` the lambdas, in the order of ``scores_by_lambda``.
        masks: ``[M, N]`` bool; actual: ``[M, T]`` (or ``[S, M, T]``).
        split_seed: the seed of the heldout split.
        n_boot, seed, ci: the bootstrap.
        predictions: ``[L, M, T]`` from :func:`predictions_by_lambda`; then
            ``scores_by_lambda`` is ignored (may be None). Use it to run both modes while
            computing the scores once.

    Returns:
        dict with ``lam``, ``lds``, ``ci_low``, ``ci_high``, ``boot_sd`` (in %),
        ``lambda_selection`` (the mode), ``lds_by_lambda`` (``[L]`` LDS on all targets, in %,
        for plots), ``lams`` and, in heldout mode, ``lams_heldout`` (``[lambda_A, lambda_B]``)
        and ``lds_heldout`` (``[on B, on A]``, in %); ``pred`` (``[M, T]``, the predictions
        that were scored) and ``weights`` (``[T]`` target weights, or None), which
        :func:`difference` takes to compare two methods.
    """
    _check_boot(n_boot, ci)
    if mode not in ("paper", "heldout"):
        raise ValueError(f"unknown lambda selection mode {mode!r}; use 'paper' or 'heldout'")
    lams = np.asarray(lams, dtype=np.float64)
    if lams.ndim != 1 or lams.size == 0:
        raise ValueError("lams must be a non-empty 1-D sequence of lambdas")
    if predictions is None:
        predictions = predictions_by_lambda(scores_by_lambda, masks, n_lams=lams.size)
    preds = np.asarray(predictions, dtype=np.float64)
    if preds.ndim != 3 or preds.shape[0] != lams.size:
        raise ValueError(
            f"predictions must be [L={lams.size}, M, T] (one per lambda), got {preds.shape}"
        )
    rho = per_target_spearman_by_lambda(None, masks, actual, predictions=preds)
    actual = _actual_2d(actual)
    lds_by_lambda = 100.0 * _nanmean_quiet(rho)
    best = _best_lambda(rho)
    out = {
        "lam": float(lams[best]),
        "lambda_selection": mode,
        "lds_by_lambda": [float(v) for v in lds_by_lambda],
        "lams": [float(v) for v in lams],
    }
    if mode == "paper":
        res = _result(rho[best], preds[best], actual, n_boot, seed, ci)
        out.update(pred=preds[best], weights=None)
    else:
        res, extra = _heldout(rho, preds, actual, lams, split_seed, n_boot, seed, ci)
        out.update(extra)
    out.update(lds=res.lds, ci_low=res.ci_low, ci_high=res.ci_high, boot_sd=res.boot_sd)
    return out


def _heldout(
    rho: np.ndarray,
    preds: np.ndarray,
    actual: np.ndarray,
    lams: np.ndarray,
    split_seed: int,
    n_boot: int,
    seed: int,
    ci: float,
) -> tuple[LDSResult, dict]:
    """Cross-fitted LDS: each half scored at the lambda chosen on the other half."""
    idx_a, idx_b = split_targets(rho.shape[1], split_seed)
    lam_a, lam_b = _best_lambda(rho, idx_a), _best_lambda(rho, idx_b)
    # Target t in B uses lam_a, t in A uses lam_b; never its own half's choice.
    choice = np.empty(rho.shape[1], dtype=int)
    choice[idx_b], choice[idx_a] = lam_a, lam_b
    cols = np.arange(rho.shape[1])
    per_target = rho[choice, cols]
    pred = preds[choice, :, cols].T  # [M, T]
    weights = np.empty(rho.shape[1])
    weights[idx_a], weights[idx_b] = 0.5 / idx_a.size, 0.5 / idx_b.size
    res = _result(per_target, pred, actual, n_boot, seed, ci, weights=weights)
    on_b, on_a = _nanmean_quiet(per_target[idx_b]), _nanmean_quiet(per_target[idx_a])
    extra = {
        "lams_heldout": [float(lams[lam_a]), float(lams[lam_b])],
        "lds_heldout": [100.0 * float(on_b), 100.0 * float(on_a)],
        "pred": pred,
        "weights": weights,
    }
    return res, extra
