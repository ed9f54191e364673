"""Linear datamodeling score (LDS), its bootstrap interval, the seed ceiling, lambda selection.

Protocol (SPEC section 5). M random subsets ``S_m`` of the training set (:func:`subset_masks`,
half its size, stratified, subset m drawn with ``random_state = 42 + 2m``); a model is trained
on each; its output ``y_m(x)`` on target x is a **loss** (L_Simple averaged over timesteps,
noise seeds and, usually, training seeds).

Sign convention. A score ``tau_z(x) > 0`` means z *helps* x, i.e. lowers its loss. The
attribution's prediction of model m's output is therefore::

    g_m(x) = sum_{z in S_m} (-tau_z(x))          # predicted_outputs

and ``LDS = mean over targets x of Spearman_m(g_m(x), y_m(x))``, in %. A good method has a
positive LDS; a method whose signs are flipped comes out negative (SPEC section 7: correlate
with the loss through ``-tau``, or with the negative loss through ``+tau``; never mix).

Intervals are percentile bootstraps over **subsets**: the M subsets are resampled with
replacement (ties from repeated subsets get average ranks) and the mean Spearman recomputed.
Targets are held fixed: the interval is about the draw of subsets, not about which targets
were chosen. All resamples are computed exactly without sorting (one matrix product per
target, see ``_bootstrap_spearman``), about 10x faster than ranking each resample.

The seed ceiling (:func:`seed_ceiling`) is the LDS that the model outputs of one training
seed achieve at predicting another seed's: a method can hardly beat it (SPEC section 7
asks for it next to every LDS).

Lambda selection, which needs these statistics, is in :mod:`dtrak.lambdas`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata
from sklearn.model_selection import train_test_split

__all__ = [
    "LDSResult",
    "difference",
    "lds",
    "mean_spearman",
    "predicted_outputs",
    "seed_ceiling",
    "spearman_rows",
    "subset_masks",
]

logger = logging.getLogger(__name__)

# The bootstrap works on chunks of targets with about this many [resample, subset] entries.
_BOOT_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True, eq=False)
class LDSResult:
    """An LDS (or seed-ceiling) estimate.

    Attributes:
        lds: mean over targets of the per-target Spearman correlation, in % (NaN targets,
            e.g. constant outputs, are left out of the mean).
        ci_low, ci_high: percentile bootstrap interval over subsets, in %.
        per_target: ``[T]`` per-target Spearman correlations (fractions, not %).
        n_subsets: M.
        n_targets: T.
        ci: the interval's coverage (e.g. 0.95).
        n_boot: bootstrap resamples.
        boot_sd: standard deviation of the bootstrap replicates, in % (NaN without them).

    The bootstrap also reproduces the small-sample downward bias of Spearman's rho (about
    -1 point at M = 64 and rho = 0.7); when many independent targets make the interval very
    narrow it can sit just below ``lds``. Compare methods on the same subsets (the bias is
    common to them) and report ``boot_sd`` next to differences.
    """

    lds: float
    ci_low: float
    ci_high: float
    per_target: np.ndarray
    n_subsets: int
    n_targets: int
    ci: float = 0.95
    n_boot: int = 0
    boot_sd: float = float("nan")

    def to_dict(self) -> dict:
        """JSON-ready summary (``per_target`` as a list)."""
        return {
            "lds": self.lds,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "per_target": [float(v) for v in self.per_target],
            "n_subsets": self.n_subsets,
            "n_targets": self.n_targets,
            "ci": self.ci,
            "n_boot": self.n_boot,
            "boot_sd": self.boot_sd,
        }


# ---------------------------------------------------------------------------------------------
# Subsets
# ---------------------------------------------------------------------------------------------


def subset_masks(
    labels: np.ndarray,
    n_subsets: int,
    alpha: float = 0.5,
    seed_base: int = 42,
    seed_step: int = 2,
) -> np.ndarray:
    """The LDS subsets as inclusion masks ``[n_subsets, N]`` bool.

    Subset m is ``train_test_split(np.arange(N), train_size=alpha, stratify=labels,
    random_state=seed_base + seed_step * m)[0]`` (the paper's protocol), so every subset is
    reproducible from its seed alone. If some class has fewer than 2 members stratification
    is impossible: the split falls back to unstratified, with a warning. ``labels=None``
    means unstratified.

    Args:
        labels: ``[N]`` class labels (or None).
        n_subsets: M >= 1.
        alpha: subset fraction in (0, 1).
        seed_base, seed_step: subset m uses ``random_state = seed_base + seed_step * m``.
    """
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha (the subset fraction) must be in (0, 1), got {alpha}")
    labels = None if labels is None else np.asarray(labels)
    if labels is not None and labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N], got shape {labels.shape}")
    stratify = _stratify_labels(labels)
    n = len(labels)
    masks = np.zeros((n_subsets, n), dtype=bool)
    for m in range(n_subsets):
        try:
            idx = train_test_split(
                np.arange(n),
                train_size=alpha,
                stratify=stratify,
                random_state=seed_base + seed_step * m,
            )[0]
        except ValueError as err:
            raise ValueError(
                f"cannot draw subset {m} of N={n} with alpha={alpha}: {err}; "
                "use a larger training set or alpha closer to 0.5"
            ) from err
        masks[m, idx] = True
    return masks


def _stratify_labels(labels: np.ndarray | None) -> np.ndarray | None:
    """The labels to stratify by, or None (with a warning) when some class has < 2 members."""
    if labels is None:
        return None
    _, counts = np.unique(labels, return_counts=True)
    if counts.min() < 2:
        logger.warning(
            "subset_masks: %d class(es) have fewer than 2 members; drawing unstratified subsets",
            int(np.sum(counts < 2)),
        )
        return None
    return labels


# ---------------------------------------------------------------------------------------------
# Predictions and Spearman
# ---------------------------------------------------------------------------------------------


def _check_masks(masks: np.ndarray, n_train: int | None = None) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 2 or masks.dtype != bool:
        raise ValueError(
            f"masks must be a bool array [M subsets, N], got {masks.dtype} {masks.shape}; "
            "use subset_masks"
        )
    if n_train is not None and masks.shape[1] != n_train:
        raise ValueError(
            f"masks cover {masks.shape[1]} training examples but the scores have {n_train} "
            "columns; scores must be [targets, N train]"
        )
    return masks


def predicted_outputs(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Predicted losses ``g_m(x) = sum_{z in S_m} (-tau_z(x))``: ``[T, N], [M, N] -> [M, T]``.

    The minus sign makes the prediction a loss (positive score = helps = lowers the loss),
    comparable with the measured loss ``y_m(x)``. Float64.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [targets, N train], got shape {scores.shape}")
    masks = _check_masks(masks, scores.shape[1])
    return -(masks.astype(np.float64) @ scores.T)


def _pearson_axis(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """Pearson correlation along ``axis``; NaN where either side is constant."""
    a = a - a.mean(axis=axis, keepdims=True)
    b = b - b.mean(axis=axis, keepdims=True)
    num = (a * b).sum(axis=axis)
    den = np.sqrt((a * a).sum(axis=axis) * (b * b).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    # Rank vectors are exact small multiples of 0.5; a tiny den only arises for constants.
    return np.where(den > 0, np.clip(r, -1.0, 1.0), np.nan)


def _check_pair(pred: np.ndarray, actual: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if pred.ndim != 2 or pred.shape != actual.shape:
        raise ValueError(
            f"pred and actual must both be [M subsets, T targets], got {pred.shape} and "
            f"{actual.shape}"
        )
    return pred, actual


def spearman_rows(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Per-target Spearman correlation over the subsets: ``[M, T], [M, T] -> [T]``.

    Column t is ``spearmanr(pred[:, t], actual[:, t])`` (average ranks for ties), fully
    vectorised. A column that is constant, or has a NaN/inf, gives NaN.
    """
    pred, actual = _check_pair(pred, actual)
    bad = ~(np.isfinite(pred).all(axis=0) & np.isfinite(actual).all(axis=0))
    rho = _pearson_axis(rankdata(pred, axis=0), rankdata(actual, axis=0), axis=0)
    rho[bad] = np.nan
    return rho


def mean_spearman(per_target: np.ndarray, what: str = "LDS") -> float:
    """NaN-mean of per-target correlations, warning how many targets were NaN."""
    per_target = np.asarray(per_target, dtype=np.float64)
    n_nan = int(np.isnan(per_target).sum())
    if n_nan == per_target.size:
        raise ValueError(
            f"{what}: every target's Spearman is NaN (constant or non-finite outputs); "
            "check the scores and the measured losses"
        )
    if n_nan:
        logger.warning(
            "%s: %d of %d targets have an undefined Spearman (constant outputs); "
            "left out of the mean",
            what,
            n_nan,
            per_target.size,
        )
    return float(np.nanmean(per_target))


# ---------------------------------------------------------------------------------------------
# Bootstrap over subsets
# ---------------------------------------------------------------------------------------------


def _weighted_nanmean(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean over the last axis with per-target weights ``[T]``, skipping NaN: ``[..., T] -> [...]``.

    All-NaN rows give NaN (without a warning).
    """
    ok = ~np.isnan(values)
    w = np.where(ok, weights, 0.0)
    total = w.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (np.where(ok, values, 0.0) * w).sum(axis=-1) / total, np.nan)


def _nanmean_quiet(values: np.ndarray) -> np.ndarray:
    """Unweighted NaN-skipping mean over the last axis, NaN (no warning) when all are NaN."""
    return _weighted_nanmean(values, np.ones(values.shape[-1]))


def _resample_counts(n_subsets: int, n_boot: int, seed: int) -> np.ndarray:
    """``[n_boot, M]`` multiplicities: resample b draws M subsets with replacement."""
    idx = np.random.default_rng(seed).integers(0, n_subsets, size=(n_boot, n_subsets))
    counts = np.zeros((n_boot, n_subsets), dtype=np.float32)
    np.add.at(counts, (np.repeat(np.arange(n_boot), n_subsets), idx.ravel()), 1.0)
    return counts


def _below(x: np.ndarray) -> np.ndarray:
    """``[M, Tc] -> [Tc, M, M]``: ``[x_i < x_j] + 0.5 [x_i == x_j]`` per target."""
    xt = x.T
    lt = xt[:, :, None] < xt[:, None, :]
    eq = xt[:, :, None] == xt[:, None, :]
    return lt.astype(np.float32) + 0.5 * eq.astype(np.float32)


def _bootstrap_spearman(pred: np.ndarray, actual: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-target Spearman of every resample: ``[M, T], [M, T], [B, M] -> [B, T]``.

    Exact and sort-free: with multiplicities w, the average rank of original subset j within
    the resample is ``sum_i w_i ([x_i < x_j] + 0.5 [x_i == x_j]) + 0.5`` (ties, including the
    copies of j itself, share their mean rank), so all resamples of a target are one matrix
    product, and the Spearman is the w-weighted Pearson of these ranks (mean (M+1)/2).
    Matches ``scipy.stats.spearmanr`` on the resampled rows (tested).
    """
    n_boot, m = counts.shape
    t = pred.shape[1]
    centre = (m + 1) / 2.0
    w = counts.astype(np.float64)
    rho = np.empty((n_boot, t))
    chunk = max(1, _BOOT_CHUNK_ELEMENTS // (n_boot * m))
    for t0 in range(0, t, chunk):
        t1 = min(t0 + chunk, t)
        rp = (counts @ _below(pred[:, t0:t1])).astype(np.float64) + (0.5 - centre)  # [Tc, B, M]
        ra = (counts @ _below(actual[:, t0:t1])).astype(np.float64) + (0.5 - centre)
        num = np.einsum("bm,tbm,tbm->bt", w, rp, ra)
        den = np.sqrt(
            np.einsum("bm,tbm,tbm->bt", w, rp, rp) * np.einsum("bm,tbm,tbm->bt", w, ra, ra)
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            rho[:, t0:t1] = np.where(den > 0, np.clip(num / den, -1.0, 1.0), np.nan)
    return rho


def _bootstrap_means(
    pred: np.ndarray,
    actual: np.ndarray,
    n_boot: int,
    seed: int,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """Weighted mean Spearman of ``n_boot`` resamples of the subsets: ``[M, T] -> [n_boot]``.

    Resample b draws M subset indices with replacement from ``default_rng(seed)``;
    non-finite targets are NaN (left out of the mean), as in :func:`spearman_rows`.
    """
    m, t = pred.shape
    weights = np.ones(t) if weights is None else weights
    bad = ~(np.isfinite(pred).all(axis=0) & np.isfinite(actual).all(axis=0))
    rho = _bootstrap_spearman(
        np.where(bad, 0.0, pred), np.where(bad, 0.0, actual), _resample_counts(m, n_boot, seed)
    )
    rho[:, bad] = np.nan
    return _weighted_nanmean(rho, weights)


def _interval(samples: np.ndarray, ci: float) -> tuple[float, float]:
    """Percentile interval of bootstrap samples (NaN replicates, all-ties resamples, dropped)."""
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return float("nan"), float("nan")
    q = 100.0 * (1.0 - ci) / 2.0
    low, high = np.percentile(samples, [q, 100.0 - q])
    return float(low), float(high)


def _check_boot(n_boot: int, ci: float) -> None:
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0 (0 = no interval), got {n_boot}")
    if not 0 < ci < 1:
        raise ValueError(f"ci must be in (0, 1), e.g. 0.95, got {ci}")


def _result(
    per_target: np.ndarray,
    pred: np.ndarray,
    actual: np.ndarray,
    n_boot: int,
    seed: int,
    ci: float,
    weights: np.ndarray | None = None,
    what: str = "LDS",
) -> LDSResult:
    """Assemble an :class:`LDSResult` from per-target values and the data to bootstrap."""
    if weights is None:
        estimate = mean_spearman(per_target, what)
    else:
        mean_spearman(per_target, what)  # raise / warn on NaN targets
        estimate = float(_weighted_nanmean(per_target, weights))
    low = high = sd = float("nan")
    if n_boot > 0:
        samples = _bootstrap_means(pred, actual, n_boot, seed, weights)
        low, high = _interval(samples, ci)
        finite = samples[np.isfinite(samples)]
        sd = float(finite.std(ddof=1)) if finite.size > 1 else float("nan")
    return LDSResult(
        lds=100.0 * estimate,
        ci_low=100.0 * low,
        ci_high=100.0 * high,
        per_target=per_target,
        n_subsets=pred.shape[0],
        n_targets=per_target.size,
        ci=ci,
        n_boot=n_boot,
        boot_sd=100.0 * sd,
    )


# ---------------------------------------------------------------------------------------------
# LDS
# ---------------------------------------------------------------------------------------------


def _actual_2d(actual: np.ndarray) -> np.ndarray:
    """``[M, T]``, or ``[S, M, T]`` per training seed averaged over seeds."""
    actual = np.asarray(actual, dtype=np.float64)
    if actual.ndim == 3:
        return actual.mean(axis=0)
    if actual.ndim != 2:
        raise ValueError(
            f"actual must be [M subsets, T targets] or [S seeds, M, T], got shape {actual.shape}"
        )
    return actual


def _check_lds_shapes(pred: np.ndarray, actual: np.ndarray) -> None:
    if pred.shape != actual.shape:
        raise ValueError(
            f"predictions are [M={pred.shape[0]}, T={pred.shape[1]}] but actual is "
            f"{actual.shape}; actual must be [M subsets, T targets] in the order of masks and "
            "scores rows"
        )
    if pred.shape[0] < 3:
        raise ValueError(
            f"LDS needs at least 3 subsets for a rank correlation, got {pred.shape[0]}"
        )


def lds(
    scores: np.ndarray,
    masks: np.ndarray,
    actual: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> LDSResult:
    """The linear datamodeling score of one score matrix.

    Args:
        scores: ``[T, N]`` attribution scores (positive = helps).
        masks: ``[M, N]`` bool subset masks (:func:`subset_masks`).
        actual: ``[M, T]`` measured loss of subset model m on target t, or ``[S, M, T]`` per
            training seed (averaged over seeds here).
        n_boot: bootstrap resamples over subsets (0: no interval, ci_low/high NaN).
        seed: bootstrap seed.
        ci: interval coverage.

    Returns:
        :class:`LDSResult` (lds, ci_low, ci_high in %).
    """
    _check_boot(n_boot, ci)
    actual = _actual_2d(actual)
    pred = predicted_outputs(scores, masks)
    _check_lds_shapes(pred, actual)
    return _result(spearman_rows(pred, actual), pred, actual, n_boot, seed, ci)


def seed_ceiling(
    actual_by_seed: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
    variant: str = "pairs",
) -> LDSResult:
    """How well one training seed's outputs predict another's: an upper bound on the LDS.

    Variants:
        ``"pairs"`` (default, reported next to every LDS): the mean over all seed pairs
            s < s' of the per-target Spearman between ``y^(s)`` and ``y^(s')`` over subsets.
            This is the agreement between two single-seed models (SPEC section 7: 0.23-0.28).
        ``"leave_one_out"``: the mean over seeds s of the Spearman between the average of the
            other seeds and ``y^(s)``; less noisy on the predictor side, so higher.
    Both bound an LDS computed against a *single* seed; the seed-averaged ground truth is
    less noisy, so its true ceiling is somewhat higher than either.

    Args:
        actual_by_seed: ``[S, M, T]`` losses per training seed, S >= 2.

    Returns:
        :class:`LDSResult`; ``per_target`` is averaged over the pairs (or held-out seeds).
    """
    _check_boot(n_boot, ci)
    y = np.asarray(actual_by_seed, dtype=np.float64)
    if y.ndim != 3 or y.shape[0] < 2:
        raise ValueError(
            f"actual_by_seed must be [S >= 2 seeds, M subsets, T targets], got {y.shape}; "
            "train every subset with at least two seeds"
        )
    n_seeds, _, t = y.shape
    if variant == "pairs":
        pairs = [(a, b) for a in range(n_seeds) for b in range(a + 1, n_seeds)]
        pred = np.concatenate([y[a] for a, _ in pairs], axis=1)
        actual = np.concatenate([y[b] for _, b in pairs], axis=1)
    elif variant == "leave_one_out":
        others = (y.sum(axis=0, keepdims=True) - y) / (n_seeds - 1)
        pred = np.concatenate(list(others), axis=1)
        actual = np.concatenate(list(y), axis=1)
    else:
        raise ValueError(f"unknown variant {variant!r}; use 'pairs' or 'leave_one_out'")
    _check_lds_shapes(pred, actual)
    stacked = spearman_rows(pred, actual)
    result = _result(stacked, pred, actual, n_boot, seed, ci, what="seed ceiling")
    per_target = _nanmean_quiet(stacked.reshape(-1, t).T)
    return dataclasses.replace(result, per_target=per_target, n_targets=t)


def difference(
    pred_a: np.ndarray,
    pred_b: np.ndarray,
    actual: np.ndarray,
    weights: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    ci: float = 0.95,
) -> dict:
    """LDS(a) - LDS(b) with a paired bootstrap interval over subsets.

    Both methods are scored on the same resamples of the subsets (the draws of
    :func:`lds`, same ``seed``), so the interval is that of the difference itself, narrower
    than comparing two separate intervals when the methods err on the same subsets.

    Args:
        pred_a, pred_b: ``[M, T]`` predicted outputs (``select_lambda(...)["pred"]`` or
            :func:`predicted_outputs`).
        actual: ``[M, T]`` or ``[S, M, T]`` measured outputs.
        weights: ``[T]`` target weights (held-out selection), or None for a plain mean.

    Returns:
        dict with ``diff``, ``ci_low``, ``ci_high`` (percentage points) and ``p_le_0``, the
        fraction of resamples in which a does not beat b.
    """
    _check_boot(n_boot, ci)
    actual = _actual_2d(actual)
    pred_a, pred_b = np.asarray(pred_a, np.float64), np.asarray(pred_b, np.float64)
    _check_lds_shapes(pred_a, actual)
    _check_lds_shapes(pred_b, actual)
    w = np.ones(actual.shape[1]) if weights is None else np.asarray(weights, np.float64)
    est = (_weighted_nanmean(spearman_rows(pred_a, actual), w)
           - _weighted_nanmean(spearman_rows(pred_b, actual), w))
    out = {"diff": 100.0 * float(est), "ci_low": float("nan"), "ci_high": float("nan"),
           "p_le_0": float("nan"), "n_boot": n_boot}
    if n_boot > 0:
        samples = (_bootstrap_means(pred_a, actual, n_boot, seed, w)
                   - _bootstrap_means(pred_b, actual, n_boot, seed, w))
        low, high = _interval(samples, ci)
        finite = samples[np.isfinite(samples)]
        out.update(ci_low=100.0 * low, ci_high=100.0 * high,
                   p_le_0=float(np.mean(finite <= 0)) if finite.size else float("nan"))
    return out


def median_difference(a: np.ndarray, b: np.ndarray, n_boot: int = 1000, seed: int = 0,
                      ci: float = 0.95) -> dict:
    """median(a) - median(b) over paired items, with a paired bootstrap interval.

    ``a[i]`` and ``b[i]`` belong to the same item (a counterfactual target under two
    methods); each resample draws items with replacement and takes both medians from the
    same draw, so the interval is that of the difference itself.

    Returns:
        dict with ``diff``, ``ci_low``, ``ci_high``, ``p_le_0`` (the fraction of resamples
        in which a's median does not exceed b's), ``n`` and ``n_boot``.
    """
    _check_boot(n_boot, ci)
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"a and b must be the same non-empty 1-D shape, got {a.shape} and "
                         f"{b.shape}")
    out = {"diff": float(np.median(a) - np.median(b)), "ci_low": float("nan"),
           "ci_high": float("nan"), "p_le_0": float("nan"), "n": int(a.size), "n_boot": n_boot}
    if n_boot > 0:
        idx = np.random.default_rng(seed).integers(0, a.size, size=(n_boot, a.size))
        samples = np.median(a[idx], axis=1) - np.median(b[idx], axis=1)
        low, high = _interval(samples, ci)
        out.update(ci_low=low, ci_high=high, p_le_0=float(np.mean(samples <= 0)))
    return out
