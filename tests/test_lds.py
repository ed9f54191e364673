"""Tests of dtrak.lds: subsets, Spearman, LDS and its bootstrap, seed ceiling, lambda selection."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from scipy.stats import spearmanr
from sklearn.model_selection import train_test_split

from dtrak import lds as lds_mod
from dtrak.lambdas import (
    per_target_spearman_by_lambda,
    predictions_by_lambda,
    select_lambda,
    split_targets,
)
from dtrak.lds import (
    difference,
    lds,
    predicted_outputs,
    seed_ceiling,
    spearman_rows,
    subset_masks,
)


def _problem(m: int = 24, n: int = 40, t: int = 10, noise: float = 1.0, seed: int = 0):
    """Masks, true scores, and losses that the true scores predict up to noise."""
    rng = np.random.default_rng(seed)
    masks = subset_masks(np.repeat([0, 1], n // 2), m)
    scores = rng.standard_normal((t, n))
    clean = predicted_outputs(scores, masks)
    actual = clean + noise * clean.std() * rng.standard_normal(clean.shape)
    return masks, scores, actual


# --- subsets -----------------------------------------------------------------------------------


def test_subset_masks_follow_the_paper_protocol():
    labels = np.repeat([0, 1, 2], [10, 14, 8])
    masks = subset_masks(labels, 5)
    assert masks.shape == (5, 32) and masks.dtype == bool
    for m in range(5):
        idx = train_test_split(
            np.arange(32), train_size=0.5, stratify=labels, random_state=42 + 2 * m
        )[0]
        np.testing.assert_array_equal(np.flatnonzero(masks[m]), np.sort(idx))
        assert [masks[m][labels == c].sum() for c in range(3)] == [5, 7, 4]  # stratified
    np.testing.assert_array_equal(masks, subset_masks(labels, 5))
    assert len({row.tobytes() for row in masks}) == 5
    other = subset_masks(labels, 2, seed_base=0, seed_step=1)
    assert not np.array_equal(other[0], masks[0])


def test_subset_masks_fall_back_unstratified_with_a_warning(caplog):
    labels = np.array([0] * 9 + [1])
    with caplog.at_level(logging.WARNING):
        masks = subset_masks(labels, 3)
    assert "unstratified" in caplog.text and masks.sum(axis=1).tolist() == [5, 5, 5]
    with pytest.raises(ValueError, match="alpha"):
        subset_masks(labels, 3, alpha=1.5)
    with pytest.raises(ValueError, match="n_subsets"):
        subset_masks(labels, 0)


# --- predictions and Spearman ------------------------------------------------------------------


def test_predicted_outputs_sum_minus_scores_over_the_subset():
    masks = np.array([[1, 1, 0], [0, 1, 1]], dtype=bool)
    scores = np.array([[1.0, 2.0, 4.0], [0.5, 0.0, -1.0]])
    np.testing.assert_allclose(predicted_outputs(scores, masks), [[-3.0, -0.5], [-6.0, 1.0]])
    with pytest.raises(ValueError, match="bool"):
        predicted_outputs(scores, masks.astype(int))
    with pytest.raises(ValueError, match="columns"):
        predicted_outputs(scores[:, :2], masks)


def test_spearman_rows_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(15, 30)).astype(float)  # many ties
    actual = pred + rng.integers(0, 3, size=(15, 30))
    pred[:, 0] = rng.standard_normal(15)  # a column without ties
    got = spearman_rows(pred, actual)
    ref = [spearmanr(pred[:, t], actual[:, t]).statistic for t in range(30)]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)


def test_spearman_rows_is_nan_for_constant_or_nonfinite_columns():
    pred = np.arange(12.0).reshape(4, 3)
    actual = pred.copy()
    actual[:, 1] = 7.0
    actual[2, 2] = np.nan
    rho = spearman_rows(pred, actual)
    assert rho[0] == pytest.approx(1.0) and np.isnan(rho[1]) and np.isnan(rho[2])
    with pytest.raises(ValueError, match="both be"):
        spearman_rows(pred, actual[:, :2])


# --- LDS ---------------------------------------------------------------------------------------


def test_lds_hand_computed_example():
    masks = np.array([[1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=bool)
    scores = np.array([[1.0, 2.0, 4.0]])
    # predictions -(sum) = -3, -5, -6, -1 -> ranks 3, 2, 1, 4; actual ranks 3, 1, 2, 4:
    # d^2 = 0 + 1 + 1 + 0 = 2, rho = 1 - 6 * 2 / (4 * 15) = 0.8
    actual = np.array([[30.0], [10.0], [20.0], [40.0]])
    res = lds(scores, masks, actual, n_boot=0)
    assert res.lds == pytest.approx(80.0)
    assert (res.n_subsets, res.n_targets) == (4, 1) and np.isnan(res.ci_low)


def test_perfect_and_reversed_predictors():
    masks, scores, _ = _problem()
    actual = predicted_outputs(scores, masks)
    good, bad = lds(scores, masks, actual, n_boot=50), lds(-scores, masks, actual, n_boot=50)
    assert good.lds == pytest.approx(100.0) and bad.lds == pytest.approx(-100.0)
    assert good.ci_low == pytest.approx(100.0) and bad.ci_high == pytest.approx(-100.0)
    # A method with flipped convention (scores = harm) lands at -100: the sign is the point.


def test_lds_accepts_per_seed_losses():
    masks, scores, actual = _problem()
    rng = np.random.default_rng(1)
    by_seed = actual + 0.1 * rng.standard_normal((3, *actual.shape))
    a = lds(scores, masks, by_seed, n_boot=0)
    b = lds(scores, masks, by_seed.mean(axis=0), n_boot=0)
    assert a.lds == pytest.approx(b.lds)
    with pytest.raises(ValueError, match="actual must be"):
        lds(scores, masks, actual[:5], n_boot=0)


def test_bootstrap_interval_contains_estimate_and_shrinks_with_more_subsets():
    widths = []
    for m in (12, 96):
        masks, scores, actual = _problem(m=m, n=60, t=8, noise=1.5, seed=3)
        res = lds(scores, masks, actual, n_boot=300, seed=0)
        assert res.ci_low < res.lds < res.ci_high
        assert res.boot_sd > 0
        widths.append(res.ci_high - res.ci_low)
    assert widths[1] < 0.6 * widths[0]


def test_bootstrap_fast_path_matches_resampling_loop():
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 5, size=(9, 6)).astype(float)
    actual = pred + rng.integers(0, 3, size=(9, 6))
    counts = lds_mod._resample_counts(9, 40, seed=4)
    idx = np.random.default_rng(4).integers(0, 9, size=(40, 9))
    np.testing.assert_array_equal(counts, [np.bincount(i, minlength=9) for i in idx])
    fast = lds_mod._bootstrap_spearman(pred, actual, counts)
    with np.errstate(invalid="ignore", divide="ignore"):
        ref = np.array(
            [[spearmanr(pred[i, t], actual[i, t]).statistic for t in range(6)] for i in idx]
        )
    np.testing.assert_array_equal(np.isnan(fast), np.isnan(ref))
    np.testing.assert_allclose(fast, ref, rtol=1e-12, atol=1e-12)


def test_lds_skips_nan_targets_with_a_warning(caplog):
    masks, scores, actual = _problem()
    actual[:, 2] = 1.0
    with caplog.at_level(logging.WARNING):
        res = lds(scores, masks, actual, n_boot=20)
    assert np.isnan(res.per_target[2]) and "1 of 10 targets" in caplog.text
    assert res.lds == pytest.approx(100 * np.nanmean(res.per_target))
    assert np.isfinite(res.ci_low)
    assert res.to_dict()["n_targets"] == 10


# --- seed ceiling ------------------------------------------------------------------------------


def test_seed_ceiling():
    masks, scores, actual = _problem(m=30, t=6)
    rng = np.random.default_rng(0)
    same = seed_ceiling(np.stack([actual] * 3), n_boot=20)
    assert same.lds == pytest.approx(100.0) and same.per_target.shape == (6,)
    noisy = actual + actual.std() * rng.standard_normal((3, *actual.shape))
    pairs = seed_ceiling(noisy, n_boot=50)
    loo = seed_ceiling(noisy, n_boot=50, variant="leave_one_out")
    assert 0 < pairs.lds < loo.lds < 100  # averaging two seeds predicts better than one
    indep = seed_ceiling(rng.standard_normal((2, 30, 40)), n_boot=0)
    assert abs(indep.lds) < 10
    expected = np.mean([spearman_rows(noisy[a], noisy[b]) for a, b in [(0, 1), (0, 2), (1, 2)]], 0)
    np.testing.assert_allclose(pairs.per_target, expected)
    with pytest.raises(ValueError, match="S >= 2"):
        seed_ceiling(noisy[:1])
    with pytest.raises(ValueError, match="variant"):
        seed_ceiling(noisy, variant="best")


# --- lambda selection --------------------------------------------------------------------------


def test_per_target_spearman_by_lambda():
    masks, scores, actual = _problem()
    rng = np.random.default_rng(1)
    stack = np.stack([scores, scores + rng.standard_normal(scores.shape), -scores])
    rho = per_target_spearman_by_lambda(stack, masks, actual)
    assert rho.shape == (3, 10)
    for i in range(3):
        np.testing.assert_allclose(
            rho[i], spearman_rows(predicted_outputs(stack[i], masks), actual)
        )
    np.testing.assert_allclose(
        per_target_spearman_by_lambda(lambda i: stack[i], masks, actual, n_lams=3), rho
    )
    with pytest.raises(ValueError, match="n_lams"):
        per_target_spearman_by_lambda(lambda i: stack[i], masks, actual)


def test_select_lambda_paper_mode_picks_the_best():
    masks, scores, actual = _problem()
    rng = np.random.default_rng(2)
    stack = np.stack([scores + 3 * rng.standard_normal(scores.shape), scores, -scores])
    out = select_lambda(stack, [0.1, 1.0, 10.0], masks, actual, mode="paper", n_boot=30)
    assert out["lam"] == 1.0 and out["lambda_selection"] == "paper"
    assert out["lds"] == pytest.approx(max(out["lds_by_lambda"]))
    assert out["ci_low"] <= out["lds"] <= out["ci_high"]
    assert len(out["lds_by_lambda"]) == 3 and out["lds_by_lambda"][2] < 0
    called = []
    via_callable = select_lambda(
        lambda i: called.append(i) or stack[i], [0.1, 1.0, 10.0], masks, actual, n_boot=0
    )
    assert via_callable["lam"] == 1.0 and called == [0, 1, 2]
    preds = predictions_by_lambda(stack, masks)
    assert preds.shape == (3, 24, 10)
    again = select_lambda(None, [0.1, 1.0, 10.0], masks, actual, n_boot=30, predictions=preds)
    np.testing.assert_array_equal(again.pop("pred"), out.pop("pred"))
    assert again == out
    with pytest.raises(ValueError, match="mode"):
        select_lambda(stack, [0.1, 1.0, 10.0], masks, actual, mode="oracle")
    with pytest.raises(ValueError, match=r"\[L=2"):
        select_lambda(stack, [0.1, 1.0], masks, actual)


def test_split_targets_is_a_seeded_partition():
    a, b = split_targets(11, split_seed=3)
    assert len(a) == 5 and len(b) == 6 and sorted([*a, *b]) == list(range(11))
    np.testing.assert_array_equal(a, split_targets(11, split_seed=3)[0])
    assert not np.array_equal(a, split_targets(11, split_seed=4)[0])


def test_heldout_selection_never_uses_the_evaluation_half():
    # Lambda 0 is perfect on half A and reversed on half B; lambda 1 the opposite. Choosing
    # on the evaluated targets gives 100 on each half; honest cross-fitting gives -100.
    masks, scores, _ = _problem(t=8)
    actual = predicted_outputs(scores, masks)
    idx_a, idx_b = split_targets(8, split_seed=5)
    stack = np.stack([scores, scores])
    stack[0, idx_b] *= -1
    stack[1, idx_a] *= -1
    out = select_lambda(stack, [1.0, 2.0], masks, actual, mode="heldout", split_seed=5, n_boot=20)
    assert out["lambda_selection"] == "heldout"
    assert out["lams_heldout"] == [1.0, 2.0]  # [chosen on A, chosen on B]
    assert out["lds"] == pytest.approx(-100.0) and out["lds_heldout"] == [-100.0, -100.0]
    assert out["ci_high"] == pytest.approx(-100.0)
    paper = select_lambda(stack, [1.0, 2.0], masks, actual, mode="paper", n_boot=0)
    assert paper["lds"] == pytest.approx(0.0)


def test_heldout_selection_agrees_with_paper_when_one_lambda_wins():
    masks, scores, actual = _problem(t=12, noise=0.5)
    rng = np.random.default_rng(3)
    stack = np.stack([scores + 2 * rng.standard_normal(scores.shape), scores])
    held = select_lambda(stack, [1.0, 2.0], masks, actual, mode="heldout", n_boot=0)
    paper = select_lambda(stack, [1.0, 2.0], masks, actual, mode="paper", n_boot=0)
    assert held["lams_heldout"] == [2.0, 2.0] and held["lam"] == paper["lam"] == 2.0
    assert held["lds"] == pytest.approx(paper["lds"])  # equal halves (12 targets)


# --- paired comparison -------------------------------------------------------------------------


def test_difference_is_the_gap_with_a_paired_interval():
    masks, scores, actual = _problem(m=20, n=60, t=12, noise=2.0, seed=5)
    rng = np.random.default_rng(7)
    worse = scores + 1.5 * rng.standard_normal(scores.shape)
    pa, pb = predicted_outputs(scores, masks), predicted_outputs(worse, masks)
    a, b = lds(scores, masks, actual, n_boot=400), lds(worse, masks, actual, n_boot=400)
    d = difference(pa, pb, actual, n_boot=400)
    assert d["diff"] == pytest.approx(a.lds - b.lds)
    assert d["ci_low"] < d["diff"] < d["ci_high"] and 0 <= d["p_le_0"] <= 1
    # the paired resamples are those of lds(): each side's interval comes back
    same = difference(pa, pa, actual, n_boot=400)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0
    # pairing removes the shared subset noise: narrower than the two intervals side by side
    assert d["ci_high"] - d["ci_low"] < (a.ci_high - a.ci_low) + (b.ci_high - b.ci_low)
    # weights: the held-out selection's target weights give the weighted gap
    w = np.r_[np.full(6, 1 / 12), np.full(6, 1 / 4)]
    dw = difference(pa, pb, actual, weights=w, n_boot=0)
    ra, rb = spearman_rows(pa, actual), spearman_rows(pb, actual)
    assert dw["diff"] == pytest.approx(100 * (np.sum(w * ra) - np.sum(w * rb)) / w.sum())
    assert np.isnan(dw["ci_low"])
    with pytest.raises(ValueError):
        difference(pa[:, :5], pb, actual)


def test_select_lambda_returns_the_predictions_it_scored():
    masks, scores, actual = _problem(t=12)
    stack = np.stack([scores * 0 + np.random.default_rng(1).standard_normal(scores.shape),
                      scores])
    for mode in ("paper", "heldout"):
        sel = select_lambda(stack, [1.0, 2.0], masks, actual, mode=mode, n_boot=0)
        assert sel["pred"].shape == actual.shape
        if mode == "paper":
            np.testing.assert_allclose(sel["pred"], predicted_outputs(scores, masks))
            assert sel["weights"] is None
        else:
            assert sel["weights"].shape == (12,)
            d = difference(sel["pred"], sel["pred"], actual, sel["weights"], n_boot=0)
            assert d["diff"] == 0


def test_median_difference_is_a_paired_bootstrap_of_medians():
    rng = np.random.default_rng(3)
    b = rng.uniform(1, 3, 9)
    a = b + rng.uniform(0.5, 1.5, 9)  # a beats b on every item
    d = lds_mod.median_difference(a, b, n_boot=300, seed=7)
    assert d["diff"] == pytest.approx(np.median(a) - np.median(b)) and d["n"] == 9
    # oracle: the same draws, one resample at a time
    idx = np.random.default_rng(7).integers(0, 9, size=(300, 9))
    ref = [np.median(a[i]) - np.median(b[i]) for i in idx]
    assert (d["ci_low"], d["ci_high"]) == pytest.approx(tuple(np.percentile(ref, [2.5, 97.5])))
    assert d["ci_low"] > 0 and d["p_le_0"] == 0.0
    assert np.isnan(lds_mod.median_difference(a, b, n_boot=0)["ci_low"])
    with pytest.raises(ValueError, match="same non-empty 1-D"):
        lds_mod.median_difference(a, b[:4])
